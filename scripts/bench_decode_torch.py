#!/usr/bin/env python3
"""PyTorch / transformers side of candle-mha's `bench_decode` example.

Loads SmolLM2-135M-Instruct from the same Q4_1 GGUF (transformers dequantizes it to float32),
runs a greedy generation of N tokens after the given prompt ids on CPU, and prints one JSON line
per (attention implementation, thread count): `sdpa` (transformers' default) and `eager`, each
with every `--threads` count (torch's OpenMP pool can be much slower with 2 threads than with 1
when the cores are shared with other work). Each line holds prefill and decode tokens/s with
transformers' KV cache and the generated ids; the first line also the decode tokens/s when
recomputing the full prefix at every step.

    python scripts/bench_decode_torch.py --gguf PATH --ids 1,9690,... --tokens 64 --threads 2,1
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--full-tokens", type=int, default=16, help="steps of the no-cache run")
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts")
    args = ap.parse_args()
    d, name = os.path.split(os.path.abspath(args.gguf))
    ids = torch.tensor([[int(x) for x in args.ids.split(",")]])
    first = True
    for attn in ["sdpa", "eager"]:
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=name, dtype=torch.float32, attn_implementation=attn
        )
        model.eval()
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            bench(model, ids, args, attn, threads, with_full=first)
            first = False


def bench(model, ids, args, attn, threads, with_full):
    def cached(n):
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past, gen = out.past_key_values, [nxt]
        for _ in range(n - 1):
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
            gen.append(nxt)
        t2 = time.perf_counter()
        return gen, t1 - t0, t2 - t1

    def full(n):
        seq = ids[0].tolist()
        gen = []
        t0 = time.perf_counter()
        for i in range(n):
            logits = model(torch.tensor([seq]), use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            gen.append(nxt)
            seq.append(nxt)
            if i == 0:
                t1 = time.perf_counter()
        return gen, time.perf_counter() - t1

    with torch.inference_mode():
        cached(4)  # warm-up
        gen, prefill_s, decode_s = cached(args.tokens)
        full_tps = None
        if with_full:
            fgen, full_s = full(args.full_tokens)
            assert fgen == gen[: args.full_tokens], "cached and full-prefix generations differ"
            full_tps = (args.full_tokens - 1) / full_s
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "attn_implementation": attn,
                "threads": threads,
                "prompt_tokens": ids.shape[1],
                "prefill_tokens_per_s": ids.shape[1] / prefill_s,
                "decode_tokens_per_s": (args.tokens - 1) / decode_s,
                "full_prefix_tokens_per_s": full_tps,
                "generated_ids": gen,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
