#!/usr/bin/env python3
"""Compiles kernels/triton/flash_attention.py ahead of time, without a GPU, into the artifacts the
`cuda` feature ships:

* src/kernels/cuda/kernels.cubin.xz: every variant assembled for its own target (`sm_80`, which
  `sm_86`/`sm_89` run as well, and `sm_90a`) by the ptxas that the triton wheel bundles (pinned:
  PTXAS_VERSION), concatenated, xz;
* src/kernels/cuda/kernels.ptx.xz: the `sm_80` variants' PTX, concatenated, xz, for the GPUs no
  cubin fits (the driver compiles it);
* src/kernels/cuda/manifest.rs: per variant the entry, parameters, launch shape, shared memory,
  what ptxas reported (registers, spill stores/loads, stack), scratch sizes, and where its PTX and
  cubin are in the blobs with their SHA-256; the SHA-256 of the kernel source and of each blob.

    python scripts/build_cuda_kernels.py            # regenerate
    python scripts/build_cuda_kernels.py --check    # recompile, compare with what is committed

Either way it fails when a variant spills registers (any spill store or load, or a stack frame)
or needs scratch memory. Needs triton==3.6.0 (scripts/requirements-cuda.txt;
scripts/cuda-cpu-check.sh installs it). Triton's line info is disabled (TRITON_DISABLE_LINE_INFO=1):
it triples the PTX and names this machine's paths. The PTX and the cubins are deterministic for a
given triton (and its ptxas); --check compares every byte, so it fails whenever the source, the
variant table, triton or ptxas changes without a regeneration.
"""

import argparse
import hashlib
import importlib.util
import lzma
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
os.environ.pop("TRITON_PTXAS_PATH", None)  # the wheel's own ptxas, never another one

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kernels" / "triton" / "flash_attention.py"
OUT_DIR = ROOT / "src" / "kernels" / "cuda"
PTX_BLOB = OUT_DIR / "kernels.ptx.xz"
CUBIN_BLOB = OUT_DIR / "kernels.cubin.xz"
MANIFEST = OUT_DIR / "manifest.rs"
TRITON_VERSION = "3.6.0"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
PTXAS_VERSION = "12.8.93"
# Triton's own ptxas flags (make_cubin with line info disabled): the cubin is byte-identical to the
# one triton.compile assembles, which the build checks.
PTXAS_FLAGS = ["-lineinfo", "-suppress-debug-info", "-v"]

DTYPES = {"f16": "fp16", "bf16": "bf16"}
HEAD_DIMS = [64, 80, 96, 128, 256]
ARCHS = [80, 90]  # cubins for sm_80 (sm_86/89 run them too) and sm_90a (wgmma)
PTX_ARCHS = [80]  # PTX shipped for the driver to compile: sm_80's, for every other GPU from 8.0
# Pointers, and the strides of q, k, v and the output, that the artifacts assume are multiples of
# 16 (bytes for pointers, elements for strides): the launcher checks these and falls back to the
# reference otherwise. The batch strides matter most: without them no load of q, k or v is
# vectorised, and the per-element addresses spilled.
DIVISIBLE = ["Q", "K", "V", "O", "PartO",
             "stride_qb", "stride_ql", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
             "stride_vb", "stride_vs", "stride_vh", "stride_ob", "stride_ol", "stride_oh"]
I64 = ["stride_qb", "stride_kb", "stride_vb", "stride_ob", "stride_mb"]


def load_source():
    spec = importlib.util.spec_from_file_location("flash_attention", SOURCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fwd_config(arch, d, bias, mods=0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of `attn_fwd`: the largest tiles that assemble with
    no spill (every variant is checked), shared memory within 99 KiB on sm_8x (what sm_86/89 allow
    a block; A100 allows 163 KiB) and 227 KiB on sm_90a. 8 warps throughout (16 query rows a warp
    on sm_80's mma, two warpgroups on sm_90a's wgmma), as FlashAttention-2 and Triton's
    fused-attention tutorial do for these head sizes. A bias tile costs registers (read with
    scalar loads: its key mask varies per element), so biased variants pipeline one stage less.
    The score-modifier variants (`mods`: soft-capping and ALiBi, `HAS_MODIFIERS`) take the same
    tiles except where those spilled: see MOD_CONFIGS."""
    if mods and (arch, d, bias) in MOD_CONFIGS:
        return MOD_CONFIGS[(arch, d, bias)]
    if arch == 90:
        if d == 64:
            return (128, 64, 8, 3) if bias else (128, 128, 8, 3)
        if d <= 128:
            return (128, 64, 8, 2) if bias else (128, 64, 8, 3)
        return (64, 64, 8, 2)
    if d == 64:
        return (128, 64, 8, 2) if bias else (128, 64, 8, 3)
    if d <= 128:
        return (128, 32, 8, 2) if bias else (128, 32, 8, 3)
    return (64, 32, 8, 2)


# Tiles of the score-modifier variants that differ from the plain ones, (arch, D, bias) ->
# (BLOCK_M, BLOCK_N, warps, stages): where the plain tile spilled once the modifiers were added
# (sm_90a d64: 4 bytes with 128 x 128; sm_80 d256 with a bias: 20 bytes with 64 x 32).
MOD_CONFIGS = {(90, 64, 0): (128, 64, 8, 3), (80, 256, 1): (64, 16, 8, 2)}


def decode_config(arch, d):
    """(BLOCK_N, num_warps, num_stages) of `attn_decode_split` (BLOCK_M is DECODE_MAX_ROWS, 16)."""
    return (64 if d <= 128 else 32), 4, (3 if arch == 90 else 2)


def variants():
    """Every compiled variant: (kernel, arch, dtype, head_dim, has_bias, constexprs, warps, stages)."""
    out = []
    for arch in ARCHS:
        for dt in DTYPES:
            for d in HEAD_DIMS:
                bd = 1 << (d - 1).bit_length()
                for mods in (0, 1):
                    for bias in (0, 1):
                        bm, bn, w, st = fwd_config(arch, d, bias, mods)
                        out.append(("fwd", arch, dt, d, bias,
                                    dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_BIAS=bias,
                                         HAS_MODIFIERS=mods), w, st))
                dbn, dw, dst = decode_config(arch, d)
                out.append(("decode_split", arch, dt, d, 0,
                            dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=dbn), dw, dst))
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
    for name in ["Bias", "PartO", "PartM", "PartL", "Alibi", "Sinks"]:
        if name in sig:
            sig[name] = "*fp32"
    for name in ["KeyRange", "CuQ", "CuK"]:
        if name in sig:
            sig[name] = "*i32"
    for name in I64:
        if name in sig:
            sig[name] = "i64"
    for name in ["scale", "softcap"]:
        if name in sig:
            sig[name] = "fp32"
    return sig


def ptxas_version():
    out = subprocess.run([str(PTXAS), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\bV(\d+\.\d+\.\d+)", out)
    if m is None:
        sys.exit(f"error: cannot read the version of {PTXAS}:\n{out}")
    return m.group(1)


def assemble(ptx, gpu):
    """The cubin of `ptx` for `gpu` (`sm_80`, `sm_90a`) and what `ptxas -v` reported about it."""
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "kernel.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(PTXAS), *PTXAS_FLAGS, f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: ptxas failed for {gpu}:\n{r.stderr}")
        cubin = Path(str(src) + ".o").read_bytes()
    log = r.stderr

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    usage = dict(registers=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                 spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                 static_shared=num(r"(\d+) bytes smem"))
    if "Used" not in log:
        sys.exit(f"error: no register count in the ptxas log for {gpu}:\n{log}")
    return cubin, usage


def compile_variant(mod, v):
    kind, arch, dt, d, bias, const, warps, stages = v
    fn = getattr(mod, "attn_" + kind)
    sig = signature(fn, kind, dt)
    for k in const:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    cc = "90a" if arch == 90 else "80"
    target = GPUTarget("cuda", arch, 32)
    ck = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    md = ck.metadata
    ptx = ck.asm["ptx"]
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    cubin, usage = assemble(ptx, "sm_" + cc)
    if cubin != ck.asm["cubin"]:
        sys.exit(f"error: {kind} sm_{cc} {dt} d{d}: the cubin differs from the one triton assembled")
    params = [(n, sig[n]) for n in fn.arg_names if sig[n] != "constexpr"]
    return dict(kind=kind, arch=arch, cc=cc, dtype=dt, head_dim=d, has_bias=bias, const=const,
                warps=md.num_warps, stages=stages, shared=md.shared, entry=md.name,
                global_scratch=getattr(md, "global_scratch_size", 0),
                profile_scratch=getattr(md, "profile_scratch_size", 0),
                ptx=ptx if arch in PTX_ARCHS else "", cubin=cubin, params=params, **usage)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def name(r):
    return (f"{r['kind']} sm_{r['cc']} {r['dtype']} d{r['head_dim']} bias={r['has_bias']}"
            f" mods={r['const'].get('HAS_MODIFIERS', 0)}")


def problems(r):
    """Why a compiled variant cannot ship, if it cannot."""
    out = []
    if r["spill_stores"] or r["spill_loads"] or r["stack"]:
        out.append(f"spills ({r['spill_stores']} bytes of spill stores, {r['spill_loads']} of spill"
                   f" loads, {r['stack']} bytes of stack, {r['registers']} registers)")
    for key in ("global_scratch", "profile_scratch"):
        if r[key]:
            out.append(f"needs {key}")
    return out


def rust_manifest(results, source_sha, ptx_sha, cubin_sha, ptxas):
    kinds = {"fwd": "Fwd", "decode_split": "DecodeSplit", "decode_combine": "DecodeCombine"}
    lines = [
        "// @generated by scripts/build_cuda_kernels.py from kernels/triton/flash_attention.py: do not edit.",
        "// Regenerate with `python scripts/build_cuda_kernels.py`; CI checks it matches the source.",
        "",
        "use super::artifact::{Artifact, Dt, KernelKind};",
        "",
        "/// The triton version that compiled the shipped kernels.",
        f'pub const TRITON_VERSION: &str = "{TRITON_VERSION}";',
        "/// The version of the ptxas (bundled with that triton) that assembled the shipped cubins and",
        "/// reported each variant's registers and spills.",
        f'pub const PTXAS_VERSION: &str = "{ptxas}";',
        "/// SHA-256 of the Triton source (`kernels/triton/flash_attention.py`) the shipped kernels",
        "/// were compiled from.",
        f'pub const SOURCE_SHA256: &str = "{source_sha}";',
        "/// SHA-256 of the uncompressed PTX blob (the shipped PTX, concatenated).",
        f'pub const BLOB_SHA256: &str = "{ptx_sha}";',
        "/// SHA-256 of the uncompressed cubin blob (every variant's cubin, concatenated).",
        f'pub const CUBIN_BLOB_SHA256: &str = "{cubin_sha}";',
        "",
        "/// Every compiled variant, in blob order.",
        "pub(crate) static ARTIFACTS: &[Artifact] = &[",
    ]
    ptx_off = cubin_off = 0
    for r in results:
        n = len(r["ptx"].encode())
        nc = len(r["cubin"])
        c = r["const"]
        params = ",".join(f"{a}:{t}" for a, t in r["params"])
        lines.append(
            "    Artifact {"
            f' kind: KernelKind::{kinds[r["kind"]]}, arch: {r["arch"]}, dtype: Dt::{r["dtype"].upper()},'
            f' head_dim: {r["head_dim"]}, has_bias: {str(bool(r["has_bias"])).lower()},'
            f' has_modifiers: {str(bool(c.get("HAS_MODIFIERS", 0))).lower()},'
            f' block_m: {c.get("BLOCK_M", 1)}, block_n: {c.get("BLOCK_N", 1)}, block_d: {c["BLOCK_D"]},'
            f' num_warps: {r["warps"]}, num_stages: {r["stages"]}, shared_bytes: {r["shared"]},'
            f' registers: {r["registers"]}, spill_store_bytes: {r["spill_stores"]},'
            f' spill_load_bytes: {r["spill_loads"]}, stack_bytes: {r["stack"]},'
            f' static_shared_bytes: {r["static_shared"]}, ptxas_version: PTXAS_VERSION,'
            f' global_scratch_bytes: {r["global_scratch"]}, profile_scratch_bytes: {r["profile_scratch"]},'
            f' entry: "{r["entry"]}", params: "{params}", ptx_offset: {ptx_off}, ptx_len: {n},'
            f' ptx_sha256: "{sha256(r["ptx"].encode()) if n else ""}",'
            f' cubin_offset: {cubin_off}, cubin_len: {nc}, cubin_sha256: "{sha256(r["cubin"])}" }},')
        ptx_off += n
        cubin_off += nc
    lines.append("];")
    return "\n".join(lines) + "\n"


def xz(data):
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the committed artifacts")
    args = ap.parse_args()
    if triton.__version__ != TRITON_VERSION:
        sys.exit(f"error: triton {triton.__version__}; the artifacts are built with {TRITON_VERSION}")
    ptxas = ptxas_version()
    if ptxas != PTXAS_VERSION:
        sys.exit(f"error: {PTXAS} is ptxas {ptxas}; the artifacts are assembled with {PTXAS_VERSION}")
    mod = load_source()
    source_sha = sha256(SOURCE.read_bytes())
    results = [compile_variant(mod, v) for v in variants()]
    bad = [(r, p) for r in results for p in [problems(r)] if p]
    for r, p in bad:
        print(f"FAIL {name(r)}: {'; '.join(p)}")
    ptx_blob = "".join(r["ptx"] for r in results).encode()
    cubin_blob = b"".join(r["cubin"] for r in results)
    manifest = rust_manifest(results, source_sha, sha256(ptx_blob), sha256(cubin_blob), ptxas)
    spills = sum(1 for r in results if r["spill_stores"] or r["spill_loads"])
    regs = [r["registers"] for r in results]
    print(f"ptxas {ptxas}: {len(results)} variants, {spills} spilling; registers {min(regs)}..{max(regs)}")
    if args.check:
        ok = not bad
        if not MANIFEST.exists() or MANIFEST.read_text() != manifest:
            print(f"MISMATCH {MANIFEST.relative_to(ROOT)} differs from a fresh compile of {SOURCE.relative_to(ROOT)}")
            ok = False
        else:
            print(f"ok {MANIFEST.relative_to(ROOT)}: {len(results)} variants match the source")
        for path, blob, what in [(PTX_BLOB, ptx_blob, "PTX"), (CUBIN_BLOB, cubin_blob, "cubins")]:
            committed = lzma.decompress(path.read_bytes()) if path.exists() else b""
            if committed != blob:
                print(f"MISMATCH {path.relative_to(ROOT)} differs from a fresh compile")
                ok = False
            else:
                print(f"ok {path.relative_to(ROOT)}: {len(blob)} bytes of {what} match")
        sys.exit(0 if ok else 1)
    if bad:
        sys.exit(f"error: {len(bad)} variants cannot ship; nothing written")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    PTX_BLOB.write_bytes(xz(ptx_blob))
    CUBIN_BLOB.write_bytes(xz(cubin_blob))
    MANIFEST.write_text(manifest)
    print(f"wrote {len(results)} variants: {len(ptx_blob)} bytes of PTX ({PTX_BLOB.stat().st_size} xz), "
          f"{len(cubin_blob)} bytes of cubins ({CUBIN_BLOB.stat().st_size} xz)")
    for r in results:
        c = r["const"]
        print(f"  {r['kind']:14} sm_{r['cc']:3} {r['dtype']:4} d{r['head_dim']:<3} bias={r['has_bias']} "
              f"mods={c.get('HAS_MODIFIERS', '-')} "
              f"BM={c.get('BLOCK_M', '-')} BN={c.get('BLOCK_N', '-')} warps={r['warps']} stages={r['stages']} "
              f"shared={r['shared']} regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} "
              f"stack={r['stack']} cubin={len(r['cubin'])}")


if __name__ == "__main__":
    main()
