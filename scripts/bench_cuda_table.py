#!/usr/bin/env python3
"""Merges examples/bench_cuda.rs's and scripts/bench_cuda_torch.py's JSON lines into one table:
per config and dtype, each implementation's time, TFLOP/s (decode: GB/s) and candle-mha's speed
ratio to it (> 1: candle-mha is faster).

    python3 scripts/bench_cuda_table.py ours.jsonl torch.jsonl
"""

import json
import os
import sys


def main():
    rows = []
    for path in sys.argv[1:]:
        if not os.path.exists(path):
            print(f"(no {path})")
            continue
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    keys = []
    for r in rows:
        if (r["config"], r["dtype"]) not in keys:
            keys.append((r["config"], r["dtype"]))
    print("| config | dtype | implementation | ms | TFLOP/s | GB/s | candle-mha speed-up |")
    print("|---|---|---|---|---|---|---|")
    for config, dtype in keys:
        group = [r for r in rows if r["config"] == config and r["dtype"] == dtype]
        ours = next((r for r in group if r["impl"] == "candle-mha" and "ms" in r), None)
        for r in group:
            if "ms" not in r:
                print(f"| {config} | {dtype} | {r['impl']} | {r['error'][:60]} | | | |")
                continue
            ratio = f"{r['ms'] / ours['ms']:.2f}x" if ours else "n/a"
            if r is ours:
                ratio = "1"
            print(f"| {config} | {dtype} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['gbps']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
