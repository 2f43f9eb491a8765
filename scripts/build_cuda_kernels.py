#!/usr/bin/env python3
"""Compiles kernels/triton/flash_attention.py ahead of time, without a GPU, into the artifacts the
`cuda` feature ships: src/kernels/cuda/kernels.ptx.xz (every variant's PTX, concatenated, xz) and
src/kernels/cuda/manifest.rs (entry, parameters, launch shape, shared memory, scratch sizes and the
offset of each variant's PTX in the blob, plus the SHA-256 of the kernel source and of each PTX).

    python scripts/build_cuda_kernels.py            # regenerate
    python scripts/build_cuda_kernels.py --check    # recompile, compare with what is committed

Needs triton==3.6.0 (scripts/requirements-cuda.txt; scripts/cuda-cpu-check.sh installs it).
Triton's line info is disabled (TRITON_DISABLE_LINE_INFO=1): it triples the PTX and names this
machine's paths. The PTX is deterministic for a given triton version; --check compares each
variant's PTX hash, so it fails whenever the source, the variant table or triton changes without a
regeneration.
"""

import argparse
import hashlib
import importlib.util
import lzma
import os
import sys
from pathlib import Path

os.environ["TRITON_DISABLE_LINE_INFO"] = "1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kernels" / "triton" / "flash_attention.py"
OUT_DIR = ROOT / "src" / "kernels" / "cuda"
BLOB = OUT_DIR / "kernels.ptx.xz"
MANIFEST = OUT_DIR / "manifest.rs"
TRITON_VERSION = "3.6.0"

DTYPES = {"f16": "fp16", "bf16": "bf16"}
HEAD_DIMS = [64, 80, 96, 128, 256]
ARCHS = [80, 90]  # PTX for sm_80 (sm_86/89 JIT it too) and for sm_90a (wgmma)
# Row/head strides of q, k, v and the output, and the tensor pointers: the launcher checks these
# divisibility assumptions (16 elements, 16 bytes) and falls back to the reference otherwise.
DIVISIBLE = ["Q", "K", "V", "O", "stride_ql", "stride_qh", "stride_ks", "stride_kh", "stride_vs",
             "stride_vh", "stride_ol", "stride_oh"]
I64 = ["stride_qb", "stride_kb", "stride_vb", "stride_ob", "stride_mb"]


def load_source():
    spec = importlib.util.spec_from_file_location("flash_attention", SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fwd_config(arch, d, bias):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): shared memory within 99 KiB on sm_8x (sm_86/89
    allow 99 KiB a block), wgmma-sized tiles on sm_90a (two stages with a bias: its f32 tiles are
    pipelined through shared memory too)."""
    if arch == 90:
        return (128, 128, 8, 2 if bias else 3) if d <= 128 else (128, 64, 8, 2)
    return (128, 64, 4, 2) if d <= 128 else (64, 32, 4, 2)


def variants():
    """Every compiled variant: (kernel, arch, dtype, head_dim, has_bias, constexprs, warps, stages)."""
    out = []
    for arch in ARCHS:
        for dt in DTYPES:
            for d in HEAD_DIMS:
                bd = 1 << (d - 1).bit_length()
                for bias in (0, 1):
                    bm, bn, w, st = fwd_config(arch, d, bias)
                    out.append(("fwd", arch, dt, d, bias,
                                dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_BIAS=bias), w, st))
                dbn = 64 if d <= 128 else 32
                out.append(("decode_split", arch, dt, d, 0,
                            dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=dbn), 4, 3 if arch == 90 else 2))
                out.append(("decode_combine", arch, dt, d, 0, dict(HEAD_DIM=d, BLOCK_D=bd), 1, 1))
    return out


def signature(fn, kind, dt):
    ty = DTYPES[dt]
    sig = {}
    for name in fn.arg_names:
        sig[name] = "i32"
    for name in ["Q", "K", "V", "O"]:
        if name in sig:
            sig[name] = "*" + ty
    for name in ["Bias", "PartO", "PartM", "PartL"]:
        if name in sig:
            sig[name] = "*fp32"
    for name in ["KeyRange", "CuQ", "CuK"]:
        if name in sig:
            sig[name] = "*i32"
    for name in I64:
        if name in sig:
            sig[name] = "i64"
    if "scale" in sig:
        sig["scale"] = "fp32"
    return sig


def compile_variant(mod, v):
    kind, arch, dt, d, bias, const, warps, stages = v
    fn = getattr(mod, "attn_" + kind)
    sig = signature(fn, kind, dt)
    for k in const:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    cc = "90a" if arch == 90 else 80
    target = GPUTarget("cuda", 90 if arch == 90 else 80, 32)
    ck = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    md = ck.metadata
    ptx = ck.asm["ptx"]
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    params = [(n, sig[n]) for n in fn.arg_names if sig[n] != "constexpr"]
    return dict(kind=kind, arch=arch, cc=cc, dtype=dt, head_dim=d, has_bias=bias, const=const,
                warps=md.num_warps, stages=stages, shared=md.shared, entry=md.name,
                global_scratch=getattr(md, "global_scratch_size", 0),
                profile_scratch=getattr(md, "profile_scratch_size", 0), ptx=ptx, params=params)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def rust_manifest(results, source_sha, blob_sha):
    kinds = {"fwd": "Fwd", "decode_split": "DecodeSplit", "decode_combine": "DecodeCombine"}
    lines = [
        "// @generated by scripts/build_cuda_kernels.py from kernels/triton/flash_attention.py: do not edit.",
        "// Regenerate with `python scripts/build_cuda_kernels.py`; CI checks it matches the source.",
        "",
        "use super::artifact::{Artifact, Dt, KernelKind};",
        "",
        "/// The triton version that compiled the shipped kernels.",
        f'pub const TRITON_VERSION: &str = "{TRITON_VERSION}";',
        "/// SHA-256 of the Triton source (`kernels/triton/flash_attention.py`) the shipped kernels",
        "/// were compiled from.",
        f'pub const SOURCE_SHA256: &str = "{source_sha}";',
        "/// SHA-256 of the uncompressed blob (every variant's PTX, concatenated).",
        f'pub const BLOB_SHA256: &str = "{blob_sha}";',
        "",
        "/// Every compiled variant, in blob order.",
        "pub(crate) static ARTIFACTS: &[Artifact] = &[",
    ]
    off = 0
    for r in results:
        n = len(r["ptx"].encode())
        c = r["const"]
        params = ",".join(f"{a}:{t}" for a, t in r["params"])
        lines.append(
            "    Artifact {"
            f' kind: KernelKind::{kinds[r["kind"]]}, arch: {r["arch"]}, dtype: Dt::{r["dtype"].upper()},'
            f' head_dim: {r["head_dim"]}, has_bias: {str(bool(r["has_bias"])).lower()},'
            f' block_m: {c.get("BLOCK_M", 1)}, block_n: {c.get("BLOCK_N", 1)}, block_d: {c["BLOCK_D"]},'
            f' num_warps: {r["warps"]}, num_stages: {r["stages"]}, shared_bytes: {r["shared"]},'
            f' global_scratch_bytes: {r["global_scratch"]}, profile_scratch_bytes: {r["profile_scratch"]},'
            f' entry: "{r["entry"]}", params: "{params}", ptx_offset: {off}, ptx_len: {n},'
            f' ptx_sha256: "{sha256(r["ptx"].encode())}" }},')
        off += n
    lines.append("];")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the committed artifacts")
    args = ap.parse_args()
    if triton.__version__ != TRITON_VERSION:
        sys.exit(f"error: triton {triton.__version__}; the artifacts are built with {TRITON_VERSION}")
    mod = load_source()
    source_sha = sha256(SOURCE.read_bytes())
    results = [compile_variant(mod, v) for v in variants()]
    for r in results:
        for key in ("global_scratch", "profile_scratch"):
            if r[key]:
                sys.exit(f"error: {r['kind']} sm_{r['cc']} {r['dtype']} d{r['head_dim']} needs {key}")
    blob = "".join(r["ptx"] for r in results).encode()
    manifest = rust_manifest(results, source_sha, sha256(blob))
    if args.check:
        ok = True
        if not MANIFEST.exists() or MANIFEST.read_text() != manifest:
            print(f"MISMATCH {MANIFEST.relative_to(ROOT)} differs from a fresh compile of {SOURCE.relative_to(ROOT)}")
            ok = False
        else:
            print(f"ok {MANIFEST.relative_to(ROOT)}: {len(results)} variants match the source")
        committed = lzma.decompress(BLOB.read_bytes()) if BLOB.exists() else b""
        if committed != blob:
            print(f"MISMATCH {BLOB.relative_to(ROOT)} differs from a fresh compile")
            ok = False
        else:
            print(f"ok {BLOB.relative_to(ROOT)}: {len(blob)} bytes of PTX match")
        sys.exit(0 if ok else 1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    BLOB.write_bytes(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))
    MANIFEST.write_text(manifest)
    print(f"wrote {len(results)} variants: {len(blob)} bytes of PTX, {BLOB.stat().st_size} bytes xz")
    for r in results:
        print(f"  {r['kind']:14} sm_{r['cc']:3} {r['dtype']:4} d{r['head_dim']:<3} bias={r['has_bias']} "
              f"warps={r['warps']} stages={r['stages']} shared={r['shared']}")


if __name__ == "__main__":
    main()
