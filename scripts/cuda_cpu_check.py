#!/usr/bin/env python3
"""The fused CUDA kernel checked on the CPU, before any GPU: run by scripts/cuda-cpu-check.sh.

1. The Triton kernels of kernels/triton/flash_attention.py under TRITON_INTERPRET=1 (numpy, no
   torch, no GPU) against a float64 NumPy implementation of the crate's reference semantics, on a
   sweep of random shapes and every mask kind: odd L and S, L = 1, S not a multiple of the tile,
   GQA/MQA, both causal alignments, sliding windows, key ranges, packed sequences (empty ones
   too), additive biases of every broadcast shape, fully masked rows under both policies, f16 and
   bf16, each head size, the block shapes of both compiled architectures and a small one, and
   the split-K decode path. Then the score modifiers (soft-capping, ALiBi, attention sinks, as
   `../shared/spec/mha-case.md` section "Score modifiers" defines them): random cases with one,
   two or all three of them over the same masks (`--mod-cases`), and directed ones: each alone
   and all three with causal, windows, key padding, packed sequences (slopes per sequence), GQA,
   fully masked rows with a sink (0, even under nan_rows), each tile shape and the split decode
   path (the sink joined once, in the combine kernel). Outputs are poisoned before each launch;
   a poisoned value left over fails the case.
2. The committed artifacts (src/kernels/cuda/kernels.cubin.xz, kernels.ptx.xz, manifest.rs):
   each variant's cubin hash, that it is an ELF image holding the entry, and that the manifest
   records no spill for it; its PTX (sm_80) hash, `.entry` parameters (the kernel's own, then
   Triton's two scratch pointers) against the manifest's parameter list, its thread count
   (.reqntid) against num_warps; zero scratch sizes. Then a fresh ahead-of-time compile, assembled
   by the pinned ptxas, compared byte for byte with the committed files
   (scripts/build_cuda_kernels.py --check), which fails on any spill.

Ends with `N passed, M failed`; exits non-zero on any failure.

The bf16 trap (triton issue 11584): the interpreter keeps bf16 as uint16 bit patterns and its
`tl.dot` multiplies those bits. `patch_interpreter_bf16_dot` wraps the interpreter's `create_dot`
to widen bf16 operands to f32 first (exact: bf16 is the top half of an f32), so the kernel source
runs unchanged. The kernel's own bf16 casts (p before p @ v, the output) go through the
interpreter's correct conversion path.
"""

import argparse
import importlib.util
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kernels" / "triton" / "flash_attention.py"
MANIFEST = ROOT / "src" / "kernels" / "cuda" / "manifest.rs"
BLOB = ROOT / "src" / "kernels" / "cuda" / "kernels.ptx.xz"
CUBIN_BLOB = ROOT / "src" / "kernels" / "cuda" / "kernels.cubin.xz"

# ---------------------------------------------------------------------------------------------
# numpy arrays as the tensors Triton's interpreter expects (it wants torch's storage API).


class _DType:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name

    __repr__ = __str__


# One object per dtype: Triton's specialisation cache keys on the dtype object, so a fresh one per
# array could alias a freed one's cache entry and give a pointer a stale element type.
_DTYPES = {k: _DType(v) for k, v in
           {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "i32": "int32"}.items()}


class _Storage:
    def __init__(self, buf):
        self.buf = buf

    def data_ptr(self):
        return self.buf.arr.ctypes.data

    def cpu(self):
        return self

    def copy_(self, other):
        pass


class Buf:
    """A contiguous numpy array handed to the interpreter in place (its memory is the host
    memory the interpreter reads and writes). bf16 is carried as uint16 bit patterns."""

    def __init__(self, arr, dtype):
        assert arr.flags.c_contiguous
        self.arr = arr
        self.dtype = _DTYPES[dtype]

    def data_ptr(self):
        return self.arr.ctypes.data

    def untyped_storage(self):
        return _Storage(self)

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.arr.shape

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)

    def copy_(self, other):
        pass


def patch_interpreter_bf16_dot():
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar == tl.bfloat16 or getattr(t.dtype, "name", "") == "bf16":
            bits = t.data.astype(np.uint32) << 16
            return interp.TensorHandle(bits.view(np.float32), tl.float32)
        return t

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot


def to_dtype(x, dt):
    """f32 array -> array in dt's storage (f16, or bf16 bits rounded to nearest even)."""
    if dt == "f16":
        return x.astype(np.float16)
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = 0x7FC0
    return out


def from_dtype(x, dt):
    if dt == "f16":
        return x.astype(np.float64)
    return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# The crate's reference semantics, in float64.


def reference(q, k, v, bias, key_range, cu, causal, bottom_right, window, scale, nan_rows,
              softcap=None, alibi=None, sinks=None):
    """Attention in float64. The score modifiers as `mha-case.md`, section "Score modifiers",
    defines them: `s = scale q.k`; soft-capping `s <- c tanh(s / c)`; ALiBi `s_ij <- s_ij - m |i +
    S - L - j|` (slope row: the batch element, or the packed sequence; `i`, `j`, `L`, `S` the
    sequence's own); then the bias and the masks; then the softmax with the sink, a key with no
    value: `p_ij = exp(s_ij) / (exp(sigma_h) + sum_j' exp(s_ij'))`, so a row with every key masked
    gives 0 whatever `nan_rows` says."""
    b_, l_, h_, d_ = q.shape
    s_, hkv = k.shape[1], k.shape[2]
    g = h_ // hkv
    out = np.zeros(q.shape)
    if cu is None:
        seqs = [(b, 0, l_, 0, s_, b) for b in range(b_)]
    else:
        cq, ck = cu
        seqs = [(0, cq[n], cq[n + 1], ck[n], ck[n + 1], n) for n in range(len(cq) - 1)]
    fill = np.nan if nan_rows else 0.0
    for b, q0, q1, k0, k1, seq in seqs:
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        diag = lk - lq if bottom_right else 0
        i = np.arange(lq)[:, None]
        j = np.arange(lk)[None, :]
        vis = np.ones((lq, lk), bool)
        if key_range is not None:
            lo, hi = key_range[b]
            vis &= (j + k0 >= lo) & (j + k0 < hi)
        if causal:
            vis &= j <= i + diag
            if window > 0:
                vis &= j > i + diag - window
        for h in range(h_):
            kh = h // g
            sc = q[b, q0:q1, h] @ k[b, k0:k1, kh].T * scale
            if softcap is not None:
                sc = softcap * np.tanh(sc / softcap)
            if alibi is not None:
                slope = alibi[seq if alibi.shape[0] > 1 else 0, h]
                sc = sc - slope * np.abs(i + (lk - lq) - j)
            if bias is not None:
                sc = sc + bias[b, h, q0:q1, k0:k1]
            sc = np.where(vis, sc, -np.inf)
            if sinks is not None:
                sigma = float(sinks[h])
                with np.errstate(invalid="ignore", over="ignore"):
                    m = np.maximum(sc.max(axis=1, initial=-np.inf, keepdims=True), sigma)
                    p = np.exp(sc - m)
                    o = p @ v[b, k0:k1, kh] / (p.sum(axis=1) + np.exp(sigma - m[:, 0]))[:, None]
                out[b, q0:q1, h] = o
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                m = sc.max(axis=1, initial=-np.inf, keepdims=True) if lk else np.full((lq, 1), -np.inf)
                masked = np.isneginf(m[:, 0])
                p = np.exp(sc - np.where(np.isneginf(m), 0.0, m))
                o = p @ v[b, k0:k1, kh] / np.where(masked, 1.0, p.sum(axis=1))[:, None]
            o[masked] = fill
            out[b, q0:q1, h] = o
    return out


# ---------------------------------------------------------------------------------------------
# The launcher, as src/kernels/cuda/ does it (grid, split choice, strides, flags).

DECODE_MAX_ROWS = 16  # GROUP * L rows per decode program (BLOCK_M of attn_decode_split)


def decode_splits(s, block_n, programs, num_sms):
    """The Rust launcher's rule: enough splits for two waves over the SMs, whole blocks each."""
    blocks = -(-s // block_n)
    splits = max(1, min(blocks, -(-2 * num_sms // max(programs, 1))))
    chunk = -(-blocks // splits) * block_n
    return -(-s // chunk), chunk


def launch(mod, case, cfg, use_decode, num_sms):
    q, k, v = case["q"], case["k"], case["v"]
    dt = case["dtype"]
    b_, l_, h_, d = q.shape
    s_, hkv = k.shape[1], k.shape[2]
    g = h_ // hkv
    bd = 1 << (d - 1).bit_length()
    out = np.full(q.shape, 12345.0, np.float32)
    out = to_dtype(out, dt)
    bias = case["bias"]
    if bias is None:
        bias_arr = np.zeros(1, np.float32)
        mstr = (0, 0, 0)
    else:
        bias_arr = np.ascontiguousarray(bias, np.float32)
        full = bias_arr.shape
        st = bias_arr.strides
        mstr = tuple(0 if full[i] == 1 else st[i] // 4 for i in range(3))
    kr = case["key_range"]
    kr_arr = np.array(kr if kr is not None else [[0, 0]], np.int32).reshape(-1)
    cu = case["cu"]
    cq = np.array(cu[0] if cu is not None else [0], np.int32)
    ck = np.array(cu[1] if cu is not None else [0], np.int32)
    # Score modifiers, as the Rust launcher passes them: softcap 0 = off; the slopes (1, B or
    # sequences, H) f32 with a row stride of 0 for one row; the sinks (H,) f32.
    softcap = float(case.get("softcap") or 0.0)
    alibi = case.get("alibi")
    alibi_arr = np.zeros(1, np.float32) if alibi is None else np.ascontiguousarray(alibi, np.float32)
    stride_ab = 0 if alibi is None or alibi.shape[0] == 1 else h_
    sinks = case.get("sinks")
    sinks_arr = np.zeros(1, np.float32) if sinks is None else np.ascontiguousarray(sinks, np.float32)
    mods = (softcap, int(alibi is not None), stride_ab)
    qb, kb, vb, ob = (Buf(q, dt), Buf(k, dt), Buf(v, dt), Buf(out, dt))
    strides = lambda a: [a.strides[i] // a.itemsize for i in range(3)]  # noqa: E731
    sq, sk, sv, so = strides(q), strides(k), strides(v), strides(out)
    flags = dict(causal=int(case["causal"]), bottom_right=int(case["bottom_right"]),
                 window=case["window"], has_range=int(kr is not None))
    if use_decode:
        bm, bn = DECODE_MAX_ROWS, cfg["decode_bn"]
        splits, chunk = decode_splits(s_, bn, b_ * hkv, num_sms)
        rows = b_ * h_ * l_ * splits
        part_o = np.full(rows * d, np.nan, np.float32)
        part_m = np.full(rows, np.nan, np.float32)
        part_l = np.full(rows, np.nan, np.float32)
        mod.attn_decode_split[(splits, b_, hkv)](
            qb, kb, vb, Buf(bias_arr, "f32"), Buf(kr_arr, "i32"), Buf(alibi_arr, "f32"),
            Buf(part_o, "f32"), Buf(part_m, "f32"), Buf(part_l, "f32"),
            *sq, *sk, *sv, *mstr, l_, s_, h_, g, case["scale"],
            flags["causal"], flags["bottom_right"], flags["window"], flags["has_range"],
            *mods, int(bias is not None), chunk, splits,
            HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn)
        mod.attn_decode_combine[(l_, h_, b_)](
            Buf(part_o, "f32"), Buf(part_m, "f32"), Buf(part_l, "f32"), ob, Buf(sinks_arr, "f32"), *so,
            l_, h_, splits, int(sinks is not None), int(case["nan_rows"]), HEAD_DIM=d, BLOCK_D=bd)
    else:
        bm, bn = cfg["bm"], cfg["bn"]
        if cu is not None:
            nseq = len(cu[0]) - 1
            max_lq = max([cu[0][n + 1] - cu[0][n] for n in range(nseq)] + [0])
        else:
            nseq, max_lq = b_, l_
        grid = (max(1, -(-max_lq // bm)), nseq, h_)
        mod.attn_fwd[grid](
            qb, kb, vb, ob, Buf(bias_arr, "f32"), Buf(kr_arr, "i32"), Buf(cq, "i32"), Buf(ck, "i32"),
            Buf(alibi_arr, "f32"), Buf(sinks_arr, "f32"),
            *sq, *sk, *sv, *so, *mstr, l_, s_, g, case["scale"],
            flags["causal"], flags["bottom_right"], flags["window"], flags["has_range"],
            *mods, int(sinks is not None), int(cu is not None), int(case["nan_rows"]),
            HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_BIAS=int(bias is not None),
            HAS_MODIFIERS=int(has_mods(case)))
    return out


# ---------------------------------------------------------------------------------------------
# The sweep.

def _build_script():
    spec = importlib.util.spec_from_file_location("build_cuda_kernels", ROOT / "scripts" / "build_cuda_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_script()


def has_mods(c):
    """Whether a case takes the score-modifier variant of attn_fwd (HAS_MODIFIERS: soft-capping
    or ALiBi; the sinks are runtime arguments of every variant)."""
    return c.get("softcap") is not None or c.get("alibi") is not None


def tile_config(cfg_name, d, has_bias, mods=False):
    """The tile shapes a case runs with: those of the shipped sm_80 or sm_90a variant for its head
    size, bias and modifiers (scripts/build_cuda_kernels.py's tables), or small 16x16 tiles."""
    if cfg_name == "small":
        return dict(bm=16, bn=16, decode_bn=16)
    arch = 90 if cfg_name == "sm90a" else 80
    bm, bn, _, _ = BUILD.fwd_config(arch, d, int(has_bias), int(mods))
    return dict(bm=bm, bn=bn, decode_bn=BUILD.decode_config(arch, d)[0])


def random_case(rng, i, kind, small):
    dt = ["f16", "bf16"][i % 2]
    d = [64, 80, 96, 128, 64, 256][i % 6] if not small else [64, 80, 96][i % 3]
    hkv = int(rng.choice([1, 2, 3]))
    g = int(rng.choice([1, 2, 4]))
    h = hkv * g
    b = int(rng.integers(1, 3))
    decode = kind == "decode"
    l_ = int(rng.choice([1, 2, 3])) if decode else int(rng.integers(1, 140))
    s_ = int(rng.integers(100, 700)) if decode else int(rng.integers(1, 200))
    if decode:
        g = min(g, DECODE_MAX_ROWS // l_)
        h = hkv * g
    packed = (not decode) and rng.random() < 0.25
    cu = None
    if packed:
        b = 1
        n = int(rng.integers(1, 5))
        lq = rng.integers(0, 60, n)
        lk = lq.copy() if rng.random() < 0.5 else rng.integers(0, 70, n)
        cu = ([0] + list(np.cumsum(lq)), [0] + list(np.cumsum(lk)))
        cu = ([int(x) for x in cu[0]], [int(x) for x in cu[1]])
        l_, s_ = cu[0][-1], cu[1][-1]
        if l_ == 0:
            l_, cu = 1, ([0, 1], [0, cu[1][-1]])
        if s_ == 0:
            return None
    causal = rng.random() < 0.5
    window = int(rng.integers(1, 40)) if causal and rng.random() < 0.3 else 0
    bottom_right = rng.random() < 0.5
    key_range = None
    if rng.random() < 0.35:
        key_range = []
        for _ in range(b):
            lo = int(rng.integers(0, max(1, s_ // 3)))
            hi = int(rng.integers(lo, s_ + 1))
            key_range.append([lo, hi])
    bias = None
    if rng.random() < 0.4:
        shape = [(1, 1, l_, s_), (b, 1, 1, s_), (b, h, l_, s_), (1, h, 1, s_)][int(rng.integers(0, 4))]
        bias = rng.standard_normal(shape).astype(np.float32)
        if rng.random() < 0.5:
            bias[rng.random(shape) < 0.3] = -np.inf
        if rng.random() < 0.3:
            bias[..., 0, :] = -np.inf  # a fully masked row (or more, with broadcasting)
        bias = np.broadcast_to(bias, (b, h, l_, s_)) if shape[0] == b and shape[1] == h else bias
    f = lambda *sh: rng.standard_normal(sh).astype(np.float32)  # noqa: E731
    q = to_dtype(f(b, l_, h, d), dt)
    kv_heads_first = rng.random() < 0.3  # (B, S, Hkv, D) views of a strided buffer
    if kv_heads_first:
        kbuf = to_dtype(f(b, s_, 2 * hkv, d), dt)
        k = np.ascontiguousarray(kbuf[:, :, :hkv])
        v = np.ascontiguousarray(kbuf[:, :, hkv:])
    else:
        k = to_dtype(f(b, s_, hkv, d), dt)
        v = to_dtype(f(b, s_, hkv, d), dt)
    return dict(q=q, k=k, v=v, dtype=dt, bias=None if bias is None else np.ascontiguousarray(
        np.broadcast_to(bias, np.broadcast_shapes(bias.shape, (1, 1, l_, s_)))) if bias is not None and bias.shape[2] == 1 and False else bias,
        key_range=key_range, cu=cu, causal=causal, bottom_right=bottom_right, window=window,
        scale=float(d ** -0.5 * (1.0 if rng.random() < 0.7 else 2.0)), nan_rows=bool(rng.random() < 0.3))


def add_modifiers(rng, c, which):
    """Sets the score modifiers named in `which` (`softcap`, `alibi`, `sinks`) on case `c`:
    caps small enough to bite (the scores are about N(0, 1)), ALiBi slopes of one row or one per
    batch element (per packed sequence), BLOOM's or random ones with a zero slope now and then,
    sink logits around the scores' scale (a large one now and then: the sink dominates)."""
    h = c["q"].shape[2]
    rows = c["q"].shape[0] if c["cu"] is None else len(c["cu"][0]) - 1
    if "softcap" in which:
        c["softcap"] = float(rng.choice([0.7, 1.5, 4.0, 30.0]))
    if "alibi" in which:
        nb = int(rng.choice([1, rows])) if rows > 1 else 1
        if rng.random() < 0.5:
            base = 2.0 ** (-8.0 * np.arange(1, h + 1) / h)  # BLOOM's slopes
            slopes = np.broadcast_to(base, (nb, h)) * rng.uniform(0.5, 1.0, (nb, 1))
        else:
            slopes = rng.uniform(0.0, 0.3, (nb, h))
            slopes[rng.random((nb, h)) < 0.2] = 0.0
        c["alibi"] = np.ascontiguousarray(slopes, np.float32)
    if "sinks" in which:
        sinks = rng.standard_normal(h) * 2.0
        if rng.random() < 0.3:
            sinks[int(rng.integers(0, h))] = 6.0
        c["sinks"] = sinks.astype(np.float32)
    return c


def make_case(rng, dt, b, l_, s_, h, hkv, d, causal=False, bottom_right=False, window=0,
              key_range=None, cu=None, bias_rows_dead=False, nan_rows=False):
    """A directed case: the shapes and masks given, random data."""
    f = lambda *sh: rng.standard_normal(sh).astype(np.float32)  # noqa: E731
    bias = None
    if bias_rows_dead:
        bias = f(1, h, l_, s_)
        bias[..., ::3, :] = -np.inf  # every third row of every head fully masked
        bias = np.ascontiguousarray(bias)
    return dict(q=to_dtype(f(b, l_, h, d), dt), k=to_dtype(f(b, s_, hkv, d), dt),
                v=to_dtype(f(b, s_, hkv, d), dt), dtype=dt, bias=bias, key_range=key_range, cu=cu,
                causal=causal, bottom_right=bottom_right, window=window, scale=float(d ** -0.5),
                nan_rows=nan_rows)


def modifier_cases(rng):
    """Directed score-modifier cases, `(kind, tiles, case)`: each modifier alone and all three,
    with causal (both alignments), sliding windows, key padding (an empty key range: fully masked
    rows, which a sink turns into zeros even under nan_rows), packed sequences (slopes per
    sequence), GQA, biases with fully masked rows, each tile shape, and the split decode path."""
    all3 = ("softcap", "alibi", "sinks")
    packed = ([0, 5, 5, 40, 77], [0, 9, 20, 50, 121])  # an empty query sequence included
    out = []

    def add(kind, tiles, which, **kw):
        out.append((kind, tiles, add_modifiers(rng, make_case(rng, **kw), which)))

    add("fwd", "small", ("softcap",), dt="f16", b=2, l_=37, s_=53, h=4, hkv=2, d=64,
        causal=True, bottom_right=True, window=9)
    add("fwd", "sm80", ("alibi",), dt="bf16", b=2, l_=70, s_=90, h=3, hkv=3, d=80,
        causal=True, key_range=[[3, 80], [0, 90]])
    add("fwd", "sm90a", ("sinks",), dt="f16", b=2, l_=33, s_=40, h=4, hkv=1, d=96,
        key_range=[[0, 40], [7, 7]], nan_rows=True)
    add("fwd", "small", all3, dt="bf16", b=1, l_=77, s_=121, h=4, hkv=2, d=64,
        causal=True, bottom_right=True, window=12, cu=packed)
    add("fwd", "sm80", all3, dt="f16", b=1, l_=77, s_=121, h=2, hkv=2, d=128, cu=packed,
        nan_rows=True)
    add("fwd", "sm90a", all3, dt="f16", b=2, l_=29, s_=61, h=4, hkv=2, d=128,
        causal=True, bias_rows_dead=True, nan_rows=True)
    add("fwd", "sm80", all3, dt="bf16", b=2, l_=65, s_=65, h=2, hkv=1, d=256,
        causal=True, key_range=[[0, 40], [10, 65]])
    add("fwd", "small", all3, dt="f16", b=2, l_=20, s_=20, h=2, hkv=2, d=64,
        key_range=[[0, 20], [4, 4]], nan_rows=True)
    add("decode", "small", ("softcap",), dt="f16", b=2, l_=1, s_=300, h=4, hkv=1, d=64)
    add("decode", "sm80", ("alibi",), dt="bf16", b=2, l_=2, s_=500, h=8, hkv=2, d=128,
        causal=True, bottom_right=True)
    add("decode", "small", ("sinks",), dt="bf16", b=2, l_=1, s_=200, h=2, hkv=2, d=96,
        key_range=[[5, 180], [50, 50]], nan_rows=True)
    add("decode", "sm80", all3, dt="f16", b=2, l_=3, s_=400, h=6, hkv=2, d=64,
        causal=True, bottom_right=True, window=150, bias_rows_dead=True, nan_rows=True)
    add("decode", "sm80", all3, dt="bf16", b=1, l_=1, s_=640, h=4, hkv=4, d=256,
        key_range=[[100, 600]])
    return out


def describe(c, kind, cfg_name):
    b, l_, h, d = c["q"].shape
    s_, hkv = c["k"].shape[1], c["k"].shape[2]
    t = tile_config(cfg_name, d, c["bias"] is not None, has_mods(c))
    tiles = f"{DECODE_MAX_ROWS}x{t['decode_bn']}" if kind == "decode" else f"{t['bm']}x{t['bn']}"
    parts = [f"{kind}/{cfg_name}({tiles})", c["dtype"], f"B{b} L{l_} S{s_} H{h}/{hkv} D{d}"]
    if c["causal"]:
        parts.append(("causal-br" if c["bottom_right"] else "causal-tl") + (f" w{c['window']}" if c["window"] else ""))
    if c["key_range"] is not None:
        parts.append(f"ranges{c['key_range']}")
    if c["cu"] is not None:
        parts.append(f"packed{c['cu']}")
    if c["bias"] is not None:
        parts.append(f"bias{tuple(c['bias'].shape)}")
    if c["nan_rows"]:
        parts.append("nan-rows")
    if c.get("softcap") is not None:
        parts.append(f"softcap{c['softcap']:g}")
    if c.get("alibi") is not None:
        parts.append(f"alibi{tuple(c['alibi'].shape)}")
    if c.get("sinks") is not None:
        parts.append("sinks")
    return " ".join(parts)


def check_case(mod, c, kind, cfg_name):
    cfg = tile_config(cfg_name, c["q"].shape[3], c["bias"] is not None, has_mods(c))
    dt = c["dtype"]
    q, k, v = (from_dtype(c[n], dt) for n in "qkv")
    bias = None if c["bias"] is None else np.broadcast_to(
        c["bias"].astype(np.float64), (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    ref = reference(q, k, v, bias, c["key_range"], c["cu"], c["causal"], c["bottom_right"],
                    c["window"], c["scale"], c["nan_rows"], softcap=c.get("softcap"),
                    alibi=None if c.get("alibi") is None else c["alibi"].astype(np.float64),
                    sinks=None if c.get("sinks") is None else c["sinks"].astype(np.float64))
    out = from_dtype(launch(mod, c, cfg, kind == "decode", num_sms=4), dt)
    poison = from_dtype(to_dtype(np.array([12345.0], np.float32), dt), dt)[0]
    if np.any(out == poison):
        return f"{int(np.sum(out == poison))} output elements never written"
    nan_ref, nan_out = np.isnan(ref), np.isnan(out)
    if not np.array_equal(nan_ref, nan_out):
        return f"NaN pattern differs: {int(nan_ref.sum())} NaN expected, {int(nan_out.sum())} got"
    ok = ~nan_ref
    err = np.abs(out[ok] - ref[ok])
    tol = (4e-3 if dt == "f16" else 3e-2) + (4e-3 if dt == "f16" else 2e-2) * np.abs(ref[ok])
    if err.size and np.any(err > tol):
        w = int(np.argmax(err - tol))
        return f"max |err| {err.max():.3e} (worst {err[w]:.3e} vs tol {tol[w]:.3e})"
    return None


def sweep(n_random, n_mods, seed):
    spec = importlib.util.spec_from_file_location("flash_attention", SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(seed)
    passed = failed = 0
    plan = []
    for i in range(n_random):
        plan.append(("fwd", ["sm80", "sm90a", "small"][i % 3], i, None))
    for i in range(max(6, n_random // 4)):
        plan.append(("decode", ["sm80", "small"][i % 2], i, None))
    # Score modifiers: random cases (their own generator, so the plain cases above stay the
    # same for a seed) with one, two or three modifiers, then the directed ones.
    mrng = np.random.default_rng(seed + 1000)
    combos = [("softcap",), ("alibi",), ("sinks",), ("softcap", "alibi", "sinks"),
              ("softcap", "sinks"), ("alibi", "sinks")]
    for i in range(n_mods):
        plan.append(("fwd", ["sm80", "sm90a", "small"][i % 3], i, combos[i % len(combos)]))
    for i in range(max(4, n_mods // 4)):
        plan.append(("decode", ["sm80", "small"][i % 2], i, combos[(i + 1) % len(combos)]))
    directed = modifier_cases(mrng) if n_mods else []
    for kind, cfg_name, i, which in plan + [(k, t, c, "directed") for k, t, c in directed]:
        if which == "directed":
            c = i
        else:
            c = None
            while c is None:
                c = random_case(rng if which is None else mrng, i, kind, cfg_name == "small")
            if which is not None:
                c = add_modifiers(mrng, c, which)
        name = describe(c, kind, cfg_name)
        try:
            why = check_case(mod, c, kind, cfg_name)
        except Exception as e:  # a kernel that fails to trace or run is a failed case
            why = f"{type(e).__name__}: {e}"
            if os.environ.get("CHECK_TRACEBACK"):
                raise
        if why is None:
            passed += 1
            print(f"ok   {name}", flush=True)
        else:
            failed += 1
            print(f"FAIL {name}: {why}", flush=True)
    return passed, failed


# ---------------------------------------------------------------------------------------------
# The committed artifacts against the manifest.

PTX_TYPE = {"i32": ".u32", "i64": ".u64", "fp32": ".f32"}


def check_artifacts():
    passed = failed = 0
    text = MANIFEST.read_text()
    blob = lzma.decompress(BLOB.read_bytes())
    cubins = lzma.decompress(CUBIN_BLOB.read_bytes())
    import hashlib
    src_sha = re.search(r'SOURCE_SHA256: &str = "([0-9a-f]+)"', text).group(1)
    if src_sha != hashlib.sha256(SOURCE.read_bytes()).hexdigest():
        print("FAIL manifest: SOURCE_SHA256 is not the hash of kernels/triton/flash_attention.py")
        failed += 1
    else:
        passed += 1
    for key, data, what in [("BLOB_SHA256", blob, "PTX"), ("CUBIN_BLOB_SHA256", cubins, "cubin")]:
        if re.search(r"\b" + key + r': &str = "([0-9a-f]+)"', text).group(1) != hashlib.sha256(data).hexdigest():
            print(f"FAIL manifest: {key} is not the hash of the committed {what} blob")
            failed += 1
        else:
            passed += 1
    entries = re.findall(r"Artifact \{(.*?)\},\n", text)
    for e in entries:
        f = dict(re.findall(r'(\w+): ("[^"]*"|[\w:]+)', e))
        name = (f"{f['kind']} sm_{f['arch']} {f['dtype']} d{f['head_dim']} bias={f['has_bias']}"
                f" mods={f['has_modifiers']}")
        problems = []
        off, n = int(f["cubin_offset"]), int(f["cubin_len"])
        cubin = cubins[off:off + n]
        if hashlib.sha256(cubin).hexdigest() != f["cubin_sha256"].strip('"'):
            problems.append("cubin hash differs from the manifest")
        if cubin[:4] != b"\x7fELF" or f["entry"].strip('"').encode() not in cubin:
            problems.append("the cubin is not an ELF image holding the entry")
        spills = [int(f[k]) for k in ("spill_store_bytes", "spill_load_bytes", "stack_bytes")]
        if any(spills):
            problems.append(f"spills: {spills[0]} bytes of spill stores, {spills[1]} of spill loads,"
                            f" {spills[2]} of stack")
        off, n = int(f["ptx_offset"]), int(f["ptx_len"])
        if (n == 0) != (f["arch"] == "90"):
            problems.append("PTX shipped for sm_90a, or missing for sm_80")
        ptx = blob[off:off + n].decode()
        if n and hashlib.sha256(ptx.encode()).hexdigest() != f["ptx_sha256"].strip('"'):
            problems.append("PTX hash differs from the manifest")
        entry = f["entry"].strip('"')
        m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
        if n and m is None:
            problems.append(f"no .entry {entry}")
        elif n:
            got = re.findall(r"\.param\s+(\.\w+)[^,]*?_param_\d+", m.group(1))
            params = [p.split(":") for p in f["params"].strip('"').split(",")]
            want = [".u64" if t.startswith("*") else PTX_TYPE[t] for _, t in params] + [".u64", ".u64"]
            if got != want:
                problems.append(f"entry parameters {got} != manifest {want}")
            ntid = re.search(r"\.reqntid\s+(\d+)", ptx)
            if ntid is None or int(ntid.group(1)) != 32 * int(f["num_warps"]):
                problems.append(f".reqntid {ntid and ntid.group(1)} != 32 x num_warps {f['num_warps']}")
            if ".target sm_80" not in ptx:
                problems.append("not compiled for sm_80")
        if int(f["global_scratch_bytes"]) or int(f["profile_scratch_bytes"]):
            problems.append("needs scratch memory the launcher does not allocate")
        if problems:
            failed += 1
            print(f"FAIL artifact {name}: {'; '.join(problems)}")
        else:
            passed += 1
    print(f"artifacts: {len(entries)} variants read from the manifest")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_cuda_kernels.py"), "--check"],
                       capture_output=True, text=True, env=env)
    print(r.stdout.strip())
    if r.returncode == 0:
        passed += 1
    else:
        failed += 1
        print(f"FAIL fresh compile: {r.stderr.strip()[-2000:]}")
    return passed, failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=48, help="random forward cases (decode: a quarter)")
    ap.add_argument("--mod-cases", type=int, default=24,
                    help="random forward cases with score modifiers (decode: a quarter, at least 4),"
                    " then the directed modifier cases (0: none)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--skip-artifacts", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    patch_interpreter_bf16_dot()
    passed = failed = 0
    if not args.skip_sweep:
        p, f = sweep(args.cases, args.mod_cases, args.seed)
        passed, failed = passed + p, failed + f
    if not args.skip_artifacts:
        p, f = check_artifacts()
        passed, failed = passed + p, failed + f
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
