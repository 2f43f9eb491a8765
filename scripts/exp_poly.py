#!/usr/bin/env python3
"""Fits the `exp` polynomial of the fused CPU kernel's softmax (`exp_poly::P` in
`src/kernels/cpu/softmax.rs`) and checks it as the kernels evaluate it.

exp(x) = 2^n · exp(r), n = round(x · log2 e), r = x − n · ln 2 (|r| ≤ ln 2 / 2), and
exp(r) ≈ 1 + r·(c1 + r·(c2 + … + r·c6)): c1..c6 minimise the largest relative error on
|r| ≤ ln 2 / 2 (iteratively reweighted least squares, converging to the minimax fit). The
constant term stays 1, so exp(0) = 1 exactly. Prints the coefficients as the Rust literals of
`P` (highest degree first) and the error of Horner's rule in f32 with fused multiply-adds.

Usage: python3 scripts/exp_poly.py                                   (numpy)
       python3 scripts/exp_poly.py --check src/kernels/cpu/softmax.rs  (CI)
With --check, the committed `P` must be this fit (each coefficient within 2 f32 units of the
fitted one, so that a different LAPACK cannot fail it) and, evaluated as the kernels evaluate
it, within 7.5e-8 of exp on the reduced range (the bound the source states).
"""
import re
import sys

import numpy as np

TOLERANCE = 7.5e-8

DEGREE = 6
HALF_LN2 = 0.3467  # ln 2 / 2 and a little more: n is rounded from x · log2 e in f32


def fit(degree, iters=200):
    x = np.linspace(-HALF_LN2, HALF_LN2, 40001)
    y = np.exp(x)
    cols = np.vander(x, degree, increasing=True) * x[:, None]  # r, r², …
    w = np.ones_like(x)
    for _ in range(iters):
        a = cols / y[:, None] * w[:, None]
        b = (y - 1) / y * w
        c, *_ = np.linalg.lstsq(a, b, rcond=None)
        err = (1 + cols @ c - y) / y
        w = w * (np.abs(err) / np.abs(err).max()) ** 0.5 + 1e-15
        w /= w.max()
    return c, np.abs(err).max()


def horner_f32(c32, r):
    """Horner's rule as the kernels run it: every step one f32 fused multiply-add (the f32
    product is exact in f64, so one rounding of the f64 sum to f32 emulates it)."""
    p = np.full_like(r, c32[-1])
    for k in range(len(c32) - 2, -1, -1):
        p = (p.astype(np.float64) * r + np.float64(c32[k])).astype(np.float32)
    return (p.astype(np.float64) * r + 1.0).astype(np.float32)


def f32_error(c32):
    r = np.linspace(-HALF_LN2, HALF_LN2, 400001).astype(np.float32)
    want = np.exp(r.astype(np.float64))
    return (np.abs(horner_f32(c32, r) - want) / want).max()


def committed(path):
    """`P` as written in `path` (highest degree first), as f32."""
    src = open(path, encoding="utf-8").read()
    m = re.search(r"pub const P: \[f32; (\d+)\] = \[([^\]]*)\]", src)
    if not m:
        sys.exit(f"{path}: no `pub const P: [f32; N] = [...]`")
    vals = [v.strip().replace("_", "") for v in m.group(2).split(",") if v.strip()]
    if len(vals) != int(m.group(1)):
        sys.exit(f"{path}: P has {len(vals)} values for a length of {m.group(1)}")
    return np.array([float(v) for v in vals], dtype=np.float32)


def main():
    c, exact = fit(DEGREE)
    c32 = c.astype(np.float32)
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        got = committed(sys.argv[2])[::-1]  # lowest degree first, as `c32`
        if len(got) != DEGREE:
            sys.exit(f"P has degree {len(got)}, the fit {DEGREE}")
        units = np.abs(got.view(np.int32).astype(np.int64) - c32.view(np.int32).astype(np.int64))
        err = f32_error(got)
        print(f"P: {units.max()} f32 units from the fit at most; error {err:.2e} in f32")
        if units.max() > 2 or err > TOLERANCE:
            sys.exit("P does not match scripts/exp_poly.py's fit (run it and paste its output)")
        return
    print(f"degree {DEGREE}: relative error {exact:.2e} exact, {f32_error(c32):.2e} in f32")
    print("pub const P: [f32; %d] = [" % DEGREE)
    for v in c32[::-1]:
        print("    %s," % np.format_float_scientific(v, unique=True))
    print("];")


if __name__ == "__main__":
    main()
