#!/usr/bin/env python3
"""Reference attention weights for tests/attentions.rs (examples/attention_map draws the same).

Hugging Face transformers with ``attn_implementation="eager"`` and ``output_attentions=True``,
float32 on CPU, one text at a time (no padding), for:

* all-MiniLM-L6-v2 (the files ``scripts/fetch-minilm.sh`` puts in the cache dir, loaded as
  ``BertModel``), on ``MINILM_TEXTS``: ``minilm.N.input_ids`` (L,) i64 -- the tokenizer's ids,
  special tokens included -- and ``minilm.N.attentions`` (layers, heads, L, L) f32;
* SmolLM2-135M-Instruct (the Q4_1 GGUF of ``scripts/fetch-smollm2.sh``, dequantized by
  transformers), on ``SMOLLM2_TEXTS`` tokenized without special tokens (as the example does):
  ``smollm2.N.input_ids`` and ``smollm2.N.attentions``.

Writes ``tests/attentions_reference.safetensors``. Its metadata holds the texts (JSON), the
library versions, the attention implementation actually used, and ``script_sha256``: the
sha256 of this file, which the test compares with the committed script (so a changed script
without a regenerated reference fails CI, which has no torch).

Usage: ``python scripts/gen_attentions_ref.py [--model-dir DIR] [--gguf PATH] [--out PATH]``
(needs the pins of scripts/requirements.txt: torch, transformers, gguf).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_TEXTS = [
    "The cat sat on the mat because it was tired.",
    "Les élèves du café naïve à Zürich.",
]
SMOLLM2_TEXTS = ["The cat sat on the mat because it was tired."]


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "candle-mha"


def default_model_dir() -> Path:
    env = os.environ.get("CANDLE_MHA_MINILM_DIR")
    return Path(env) if env else cache_dir() / "all-MiniLM-L6-v2"


def default_gguf() -> Path:
    env = os.environ.get("CANDLE_MHA_SMOLLM2_GGUF")
    return Path(env) if env else cache_dir() / "smollm2" / GGUF


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(atts, n_layers, n_heads, length):
    assert len(atts) == n_layers, len(atts)
    for a in atts:
        assert tuple(a.shape) == (1, n_heads, length, length), a.shape
        sums = a.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument("--gguf", type=Path, default=default_gguf())
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "attentions_reference.safetensors")
    args = ap.parse_args()
    if not (args.model_dir / "model.safetensors").is_file():
        sys.exit(f"no model.safetensors in {args.model_dir}: run scripts/fetch-minilm.sh first")
    if not args.gguf.is_file():
        sys.exit(f"no {args.gguf}: run scripts/fetch-smollm2.sh first")

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel

    torch.manual_seed(0)
    tensors = {}
    impls = {}

    bert = BertModel.from_pretrained(str(args.model_dir), attn_implementation="eager",
                                     dtype=torch.float32)
    bert.eval()
    impls["minilm"] = bert.config._attn_implementation
    tok = AutoTokenizer.from_pretrained(str(args.model_dir))
    for n, text in enumerate(MINILM_TEXTS):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = bert(**enc, output_attentions=True)
        ids = enc["input_ids"][0]
        check(out.attentions, bert.config.num_hidden_layers, bert.config.num_attention_heads,
              len(ids))
        tensors[f"minilm.{n}.input_ids"] = ids.to(torch.int64).contiguous()
        tensors[f"minilm.{n}.attentions"] = torch.cat(out.attentions).float().contiguous()

    d, name = os.path.split(os.path.abspath(args.gguf))
    ltok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    llama = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    llama.eval()
    impls["smollm2"] = llama.config._attn_implementation
    for n, text in enumerate(SMOLLM2_TEXTS):
        ids = ltok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = llama(ids, output_attentions=True, use_cache=False)
        check(out.attentions, llama.config.num_hidden_layers, llama.config.num_attention_heads,
              ids.shape[1])
        tensors[f"smollm2.{n}.input_ids"] = ids[0].to(torch.int64).contiguous()
        tensors[f"smollm2.{n}.attentions"] = torch.cat(out.attentions).float().contiguous()

    assert impls == {"minilm": "eager", "smollm2": "eager"}, impls
    metadata = {
        "minilm_texts": json.dumps(MINILM_TEXTS, ensure_ascii=False),
        "smollm2_texts": json.dumps(SMOLLM2_TEXTS, ensure_ascii=False),
        "script_sha256": sha256(Path(__file__).resolve()),
        "minilm_model_sha256": sha256(args.model_dir / "model.safetensors"),
        "smollm2_gguf_sha256": sha256(args.gguf),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": json.dumps(impls),
    }
    save_file(tensors, str(args.out), metadata=metadata)
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if k.endswith("attentions")}
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {shapes}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, {impls}")


if __name__ == "__main__":
    main()
