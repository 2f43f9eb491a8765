#!/usr/bin/env python3
"""PyTorch's side of examples/bench_cuda.rs: F.scaled_dot_product_attention with each CUDA backend
(flash, efficient, cuDNN) on the same configs, same timing rule (3 warm-up calls, the median of 7
runs of `reps` calls, CUDA events around each run). Writes JSON lines (--json) and prints a table.

    python3 scripts/bench_cuda_torch.py [--json OUT]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CONFIGS = [
    dict(name="causal B1 L4096 H32 D128", b=1, l=4096, s=4096, h=32, hkv=32, d=128, causal=True, lengths=None),
    dict(name="causal B1 L16384 H16 D128", b=1, l=16384, s=16384, h=16, hkv=16, d=128, causal=True, lengths=None),
    dict(name="padded B4 L512 H12 D64", b=4, l=512, s=512, h=12, hkv=12, d=64, causal=False,
         lengths=[512, 384, 256, 128]),
    dict(name="decode B8 S4096 H32/8 D128", b=8, l=1, s=4096, h=32, hkv=8, d=128, causal=True, lengths=None),
]
BACKENDS = [("torch flash", SDPBackend.FLASH_ATTENTION), ("torch efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("torch cudnn", SDPBackend.CUDNN_ATTENTION)]


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / reps)
    runs.sort()
    return runs[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    out = open(args.json, "w") if args.json else None
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| config | dtype | impl | ms | TFLOP/s | GB/s |")
    print("|---|---|---|---|---|---|")
    for c in CONFIGS:
        for dtype in (torch.bfloat16, torch.float16):
            dn = "bf16" if dtype == torch.bfloat16 else "f16"
            q = torch.randn(c["b"], c["h"], c["l"], c["d"], device="cuda", dtype=dtype)
            k = torch.randn(c["b"], c["hkv"], c["s"], c["d"], device="cuda", dtype=dtype)
            v = torch.randn(c["b"], c["hkv"], c["s"], c["d"], device="cuda", dtype=dtype)
            mask = None
            if c["lengths"]:
                keep = torch.arange(c["s"], device="cuda")[None, :] < torch.tensor(c["lengths"], device="cuda")[:, None]
                mask = keep[:, None, None, :]
            # L = S causal: top-left = bottom-right. L = 1 decode sees every key: no mask.
            causal = c["causal"] and c["l"] > 1
            gqa = c["hkv"] != c["h"]
            full = 4.0 * c["b"] * c["h"] * c["l"] * c["s"] * c["d"]
            flops = full / 2 if causal else full
            kv_bytes = 2.0 * c["b"] * c["s"] * c["hkv"] * c["d"] * q.element_size()
            for name, backend in BACKENDS:
                def run():
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
                reps = 50 if c["l"] == 1 else 3
                try:
                    ms = time_ms(run, reps)
                    rec = dict(config=c["name"], dtype=dn, impl=name, ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
                               gbps=kv_bytes / (ms * 1e-3) / 1e9)
                    print(f"| {c['name']} | {dn} | {name} | {ms:.3f} | {rec['tflops']:.1f} | {rec['gbps']:.0f} |")
                except Exception as e:  # a backend that cannot run the config
                    rec = dict(config=c["name"], dtype=dn, impl=name, error=str(e).splitlines()[0][:200])
                    print(f"| {c['name']} | {dn} | {name} | unsupported: {rec['error'][:80]} | | |")
                if out:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
