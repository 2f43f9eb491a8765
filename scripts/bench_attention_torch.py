#!/usr/bin/env python3
"""PyTorch CPU side of `examples/bench_attention.rs`.

Server mode (default): reads one JSON request per line on stdin, answers one JSON line on
stdout, so that the Rust bench can interleave its own runs with PyTorch's (A/B/A/B) in one
session. Request fields:

    dtype  "f32" (default), "bf16" or "f16"
    kind   "sdpa" (F.scaled_dot_product_attention, the attention core),
           "mha" (nn.MultiheadAttention forward, need_weights=False, batch_first, eval)
           or "linear" (F.linear(x, w, bias): x (m, k), w (n, k), bias (n))
    b, l, s, e, h, hkv, d   shapes (s = key length; hkv < h: GQA, SDPA only)
    m, n, k                 shapes of "linear"
    causal  bool (top-left; L == S or L == 1 in the bench configs)
    pad     list of per-batch valid key lengths, or null
    reps    timed repetitions (after one warm-up)

Answer: {"times": [seconds...]} or {"error": "..."}.

Peak mode: `--peak '<request json>'` runs the request once and prints
{"peak_rss_bytes": ..., "baseline_rss_bytes": ...} (VmHWM after the run / before it).

Threads: `--threads N` (default: all cores) sets torch.set_num_threads.
"""

import argparse
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F


def rss_peak_bytes():
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: Linux carries that across
    fork/exec, so a child of a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(req):
    torch.manual_seed(0)
    if req["kind"] == "linear":
        dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[
            req.get("dtype", "f32")
        ]
        m, n, k = req["m"], req["n"], req["k"]
        x, w, b = torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt), torch.randn(n, dtype=dt)
        return lambda: F.linear(x, w, b)
    b, l, s, e, h, hkv, d = (req[k] for k in ("b", "l", "s", "e", "h", "hkv", "d"))
    causal, pad = req["causal"], req.get("pad")
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[
        req.get("dtype", "f32")
    ]
    if req["kind"] == "sdpa":
        q = torch.randn(b, h, l, d, dtype=dt)
        k = torch.randn(b, hkv, s, d, dtype=dt)
        v = torch.randn(b, hkv, s, d, dtype=dt)
        mask = None
        if pad is not None:
            keep = torch.arange(s)[None, :] < torch.tensor(pad)[:, None]  # (B, S) True = keep
            mask = keep[:, None, None, :]
        kw = {"enable_gqa": True} if hkv != h else {}
        is_causal = causal and l > 1

        def run():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kw)

        return run
    if req["kind"] == "mha":
        mha = torch.nn.MultiheadAttention(e, h, batch_first=True).eval().to(dt)
        x = torch.randn(b, l, e, dtype=dt)
        kv = torch.randn(b, s, e, dtype=dt) if s != l else x
        kpm = None
        if pad is not None:
            kpm = torch.arange(s)[None, :] >= torch.tensor(pad)[:, None]  # True = ignore
        attn_mask = None
        if causal and l > 1:
            attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(l)

        def run():
            return mha(x, kv, kv, key_padding_mask=kpm, attn_mask=attn_mask,
                       need_weights=False, is_causal=attn_mask is not None)[0]

        return run
    raise ValueError(f"unknown kind {req['kind']}")


def timed(req):
    run = build(req)
    with torch.inference_mode():
        run()  # warm-up
        times = []
        for _ in range(req.get("reps", 3)):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak:
        req = json.loads(args.peak)
        base = rss_peak_bytes()
        run = build(req)
        with torch.inference_mode():
            run()
        print(json.dumps({"peak_rss_bytes": rss_peak_bytes(), "baseline_rss_bytes": base}))
        return
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}),
          flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            out = {"times": timed(json.loads(line))}
        except Exception as e:  # reported to the Rust side, which prints it
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
