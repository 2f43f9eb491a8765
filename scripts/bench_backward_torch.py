#!/usr/bin/env python3
"""PyTorch CPU side of `examples/bench_backward.rs`: forward + backward of
``F.scaled_dot_product_attention`` (training), interleaved with candle-mha's runs.

Server mode (default): one JSON request per line on stdin, one JSON answer per line on stdout.
Request: ``{"l": L, "h": H, "d": D, "dtype": "f32"|"bf16", "reps": N}`` (B = 1, causal,
top-left; q, k, v ``(1, H, L, D)`` leaves with ``requires_grad``). Each rep runs
``out = sdpa(q, k, v, is_causal=True)`` then ``out.backward(g)``; answer
``{"times": [seconds...]}`` (after one warm-up).

Peak mode: ``--peak '<request json>'`` runs it once in a fresh process and prints
``{"peak_rss_bytes": VmHWM after, "baseline_rss_bytes": VmRSS before}``.

``--threads N`` sets ``torch.set_num_threads`` (default 2).
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def build(req):
    torch.manual_seed(0)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[req["dtype"]]
    l, h, d = req["l"], req["h"], req["d"]
    q, k, v = (torch.randn(1, h, l, d, dtype=dt).requires_grad_() for _ in range(3))
    g = torch.randn(1, h, l, d, dtype=dt)
    return q, k, v, g


def step(q, k, v, g):
    for t in (q, k, v):
        t.grad = None
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(g)
    return q.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        req = json.loads(args.peak)
        q, k, v, g = build(req)
        base = status("VmRSS")
        step(q, k, v, g)
        print(json.dumps({"peak_rss_bytes": status("VmHWM"), "baseline_rss_bytes": base}))
        return
    print(json.dumps({"ready": True, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            q, k, v, g = build(req)
            step(q, k, v, g)  # warm-up
            times = []
            for _ in range(req["reps"]):
                t0 = time.perf_counter()
                step(q, k, v, g)
                times.append(time.perf_counter() - t0)
            print(json.dumps({"times": times}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"error": str(e)}), flush=True)


if __name__ == "__main__":
    main()
