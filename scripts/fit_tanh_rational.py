#!/usr/bin/env python3
"""Fits the 9/6 rational `tanh(y) ~ y * P(y^2) / Q(y^2)` the fused CPU kernel soft-caps bf16
scores with (`TANH_9` in src/kernels/cpu/softmax.rs), and reports its error in f32 arithmetic.

Minimax by Lawson's iteration (iteratively reweighted least squares of the linearised error
`y P(y^2) - tanh(y) Q(y^2)`) on [0, clamp], for several clamps; prints the best one's
coefficients (highest degree first, as the Rust constant lists them) and its maximum absolute
error over [-12, 12] evaluated in float32 (clamping included).

    python3 scripts/fit_tanh_rational.py      # needs numpy
"""
import numpy as np


def fit(n_p, n_q, clamp, iters=120):
    y = np.linspace(1e-4, clamp, 20000)
    t = np.tanh(y)
    w = np.ones_like(y)
    for _ in range(iters):
        a_cols = [y ** (2 * k + 1) for k in range(n_p)]
        b_cols = [-t * y ** (2 * k) for k in range(1, n_q)]
        m = np.stack(a_cols + b_cols, 1)
        sw = np.sqrt(w)
        sol, *_ = np.linalg.lstsq(m * sw[:, None], t * sw, rcond=None)
        a = sol[:n_p]
        b = np.concatenate([[1.0], sol[n_p:]])
        p = sum(a[k] * y ** (2 * k + 1) for k in range(n_p))
        q = sum(b[k] * y ** (2 * k) for k in range(n_q))
        err = p / q - t
        w = w * np.abs(err) / np.abs(q) + 1e-30
        w = w / w.sum() * len(w)
    return a, b


def f32_error(a, b, clamp):
    f = np.float32
    x = np.linspace(-12, 12, 2_000_001).astype(f)
    want = np.tanh(x.astype(np.float64))
    y = np.clip(x, -f(clamp), f(clamp)).astype(f)
    y2 = (y * y).astype(f)
    a32, b32 = [f(v) for v in a], [f(v) for v in b]
    p = a32[-1]
    for c in a32[-2::-1]:
        p = (p * y2 + c).astype(f)
    p = (p * y).astype(f)
    q = b32[-1]
    for c in b32[-2::-1]:
        q = (q * y2 + c).astype(f)
    return float(np.abs((p / q).astype(f) - want).max())


def main():
    best = None
    for clamp in [7.0, 7.25, 7.5, 7.75, 8.0]:
        a, b = fit(5, 4, clamp)
        err = f32_error(a, b, clamp)
        print(f"clamp {clamp}: max |error| {err:.3e}")
        if best is None or err < best[0]:
            best = (err, clamp, a, b)
    err, clamp, a, b = best
    print(f"\nbest: clamp {clamp}, max |error| {err:.3e} (f32)")
    print("alpha (highest degree first):", [float(np.float32(v)) for v in a[::-1]])
    print("beta  (highest degree first):", [float(np.float32(v)) for v in b[::-1]])


if __name__ == "__main__":
    main()
