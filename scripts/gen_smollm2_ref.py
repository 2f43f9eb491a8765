#!/usr/bin/env python3
"""Reference logits and greedy tokens of SmolLM2-135M-Instruct (Q4_1 GGUF) with HF transformers.

Writes, for candle-mha's tests/smollm2.rs and examples/generate.rs:
- tests/smollm2_reference.safetensors: `prompt_ids` (i64, (L,)), `last_logits` (f32, (vocab,)):
  the logits at the last prompt position, `greedy_ids` (i64, (32,)): the first 32 greedily
  decoded tokens (argmax, EOS not treated specially).
- weights/smollm2-tokenizer.json: the tokenizer transformers builds from the GGUF's vocabulary.
- weights/smollm2-chat-template.jinja: the GGUF's chat template.

transformers reads the GGUF through the `gguf` package, dequantizes the same Q4_1 / Q8_0 weights
to float32 and un-permutes q/k back to Hugging Face's half-split RoPE layout; the model runs in
float32 on CPU. Run with the venv that has torch, transformers and gguf:

    python scripts/gen_smollm2_ref.py [--gguf PATH]
"""
import argparse
import os
import pathlib

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The fixed prompt of the test, as a chat message (with the model's chat template).
MESSAGE = "What is the capital of France? Answer in one sentence."
N_GREEDY = 32


def default_gguf():
    env = os.environ.get("CANDLE_MHA_SMOLLM2_GGUF")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "candle-mha", "smollm2", GGUF)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=default_gguf())
    args = ap.parse_args()
    d, name = os.path.split(os.path.abspath(args.gguf))
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    emb = model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, emb), "expected tied embeddings (no output.weight)"

    # Tokenizer + chat template, committed once so that Rust needs neither python nor the hub.
    (ROOT / "weights").mkdir(exist_ok=True)
    tok.backend_tokenizer.save(str(ROOT / "weights" / "smollm2-tokenizer.json"), pretty=False)
    (ROOT / "weights" / "smollm2-chat-template.jinja").write_text(tok.chat_template)

    text = tok.apply_chat_template(
        [{"role": "user", "content": MESSAGE}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, use_cache=True)
        last = out.logits[0, -1].float().clone()
        past = out.past_key_values
        nxt = int(last.argmax())
        greedy = [nxt]
        for _ in range(N_GREEDY - 1):
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            greedy.append(nxt)
        # Sanity: the cached greedy run equals a full forward over prompt + generated tokens.
        full = model(torch.cat([ids, torch.tensor([greedy[:-1]])], dim=1)).logits[0, -N_GREEDY:]
        assert full.argmax(-1).tolist() == greedy
    save_file(
        {
            "prompt_ids": ids[0].to(torch.int64).contiguous(),
            "last_logits": last.contiguous(),
            "greedy_ids": torch.tensor(greedy, dtype=torch.int64),
        },
        str(ROOT / "tests" / "smollm2_reference.safetensors"),
        metadata={"prompt_text": text, "message": MESSAGE, "gguf": name},
    )
    print("prompt:", repr(text))
    print("prompt ids:", ids[0].tolist())
    print("greedy:", greedy)
    print("text:", repr(tok.decode(greedy)))


if __name__ == "__main__":
    main()
