#!/usr/bin/env python3
"""PyTorch side of `cargo run --release --example bench_embed` (which runs this script itself).

Loads sentence-transformers' all-MiniLM-L6-v2 from --model-dir with
``torch.set_num_threads(--threads)``, reads the sentences of --sentences (one per line), runs
one warm-up pass and prints one JSON line ``{"ready": true, "torch": ..., ...}``. Then, for
each line ``run`` on standard input, it embeds all the sentences once with
``SentenceTransformer.encode(sentences, batch_size=--batch-size)`` (tokenisation included, as
on the candle side) and prints ``{"time_s": ...}``; ``save PATH`` writes the last embeddings
to PATH (.npy); end of input ends it. The caller interleaves these passes with its own so that
both sides see the same machine load.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    with open(args.sentences, encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f if line.strip()]
    model = SentenceTransformer(args.model_dir, device=args.device)
    model.eval()

    def run():
        emb = model.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True,
                           show_progress_bar=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return emb

    emb = run()  # warm-up
    reply({
        "ready": True,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "attn_implementation": str(getattr(model[0].auto_model.config, "_attn_implementation", "?")),
        "sentences": len(sentences),
    })
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            emb = run()
            reply({"time_s": time.perf_counter() - t0})
        elif cmd.startswith("save "):
            np.save(cmd[5:], np.ascontiguousarray(emb, dtype=np.float32))
            reply({"saved": cmd[5:]})
        elif cmd:
            reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    main()
