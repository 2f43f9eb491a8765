#!/usr/bin/env python3
"""Attention-core parity cases for candle-mha: ``case_kind=sdpa`` and ``case_kind=varlen``.

Writes ``tests/cases/sdpa_*.safetensors`` and ``tests/cases/varlen_*.safetensors`` in the
``mha-case`` format's sections "Attention-core cases" and "Packed variable-length cases"
(``../shared/spec/mha-case.md``), deterministically (each case seeded from crc32 of its name).
Stale ``sdpa_*`` / ``varlen_*`` files are deleted first; the MHA cases of
``scripts/gen_fixtures.py`` are left alone.

Usage: ``python scripts/gen_core_cases.py`` (torch, numpy, safetensors: see
``scripts/requirements.txt``).

How expectations are computed
-----------------------------
* ``sdpa``: ``F.scaled_dot_product_attention`` in **float64** on the stored (case-dtype) inputs
  upcast to float64, with ``enable_gqa=True`` and the case's ``scale``. The mask handed to torch
  is the case's own (bool: 1 = may attend; float: additive), merged with the causal / window
  structure as one boolean or additive mask when the case has both (torch rejects ``is_causal``
  together with ``attn_mask``; the crate merges them, which is what this computes). Cases with
  only ``is_causal`` call torch with ``is_causal=True``.
* ``varlen``: per sequence, the same float64 SDPA on that sequence's rows (causal alignment and
  window applied with its own lengths); a sequence with no keys gives zero rows.
* Every expectation is recomputed by an independent float64 softmax reference written here and
  must agree with torch to 1e-12.
* Score modifiers (spec section "Score modifiers": ``softcap`` metadata, ``alibi_slopes`` and
  ``sinks`` tensors, listed in ``score_modifiers``): torch's SDPA has none, so the expectation is
  the float64 reference below with them applied (scale, soft-cap, ALiBi, masks, softmax with the
  sink); without soft-capping it is checked against float64 SDPA too (ALiBi as an additive
  mask, the sink as the factor ``1 / (1 + exp(sink - logsumexp))`` on SDPA's output). The half
  dtypes' "torch's own error" is that reference run in the half dtype.
* Fully masked query rows (no key allowed) are 0 in ``expected.output`` (metadata
  ``fully_masked_rows=zero``), whatever torch returns there.
* Tolerances: float32 1e-5 / rtol 1e-4, asserted against torch's own float32 run; float64
  1e-10; float16 / bfloat16: torch is also run in the half dtype (CPU), its own max abs error vs
  float64 is measured and ``suggested_atol_output = max(2 * torch_own_error, floor)`` with floor
  1e-3 (f16) / 8e-3 (bf16), ``suggested_rtol = 0``.
* Metadata ``generator_sha256`` is the sha256 of this script; ``tests/core_cases.rs`` checks
  that every committed core case carries the sha256 of the committed script, so a script edit
  without regenerating fails CI.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = ROOT / "tests" / "cases"
F64 = torch.float64
DTYPES = {"float32": torch.float32, "float64": F64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
SCRIPT_SHA = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@dataclass
class Sdpa:
    name: str
    B: int = 2
    H: int = 4
    Hkv: int = 4
    L: int = 5
    S: int = 7
    D: int = 8
    Dv: Optional[int] = None
    dtype: str = "float32"
    # "bool" (1 = may attend) or "float" (additive) with `mask_shape` (broadcastable), or None
    mask: Optional[str] = None
    mask_shape: Optional[tuple] = None
    # how to fill the mask: "random", "keypad" (per batch, keys >= len masked), "rows" (some
    # query rows fully masked)
    mask_fill: str = "random"
    causal: Optional[str] = None  # "top_left" / "bottom_right"
    via_is_causal: bool = False  # metadata says is_causal=true instead of causal_alignment
    window: Optional[int] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None
    alibi: Optional[str] = None  # "h": slopes (H,), "bh": (B, H)
    sinks: bool = False


@dataclass
class Varlen:
    name: str
    q_lens: list = field(default_factory=list)
    k_lens: Optional[list] = None  # None: same as q_lens
    H: int = 4
    Hkv: int = 4
    D: int = 8
    Dv: Optional[int] = None
    dtype: str = "float32"
    causal: str = "none"
    window: Optional[int] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None
    alibi: Optional[str] = None  # "h": slopes (H,), "bh": (sequences, H)
    sinks: bool = False


def sdpa_cases() -> list[Sdpa]:
    c = [
        Sdpa("sdpa_basic"),
        Sdpa("sdpa_basic_f64", dtype="float64"),
        Sdpa("sdpa_bool_keypad_b11s", mask="bool", mask_shape=(2, 1, 1, 7), mask_fill="keypad"),
        Sdpa("sdpa_bool_keypad_bs_holes", mask="bool", mask_shape=(2, 1, 1, 7)),
        Sdpa("sdpa_bool_4d_full_rows", mask="bool", mask_shape=(2, 4, 5, 7), mask_fill="rows"),
        Sdpa("sdpa_bool_2d_ls", mask="bool", mask_shape=(5, 7)),
        Sdpa("sdpa_bool_3d_hls", mask="bool", mask_shape=(4, 5, 7)),
        Sdpa("sdpa_bool_1d_s", mask="bool", mask_shape=(7,), mask_fill="keypad"),
        Sdpa("sdpa_bool_b1ls", mask="bool", mask_shape=(2, 1, 5, 7)),
        Sdpa("sdpa_float_2d_ls_inf", mask="float", mask_shape=(5, 7)),
        Sdpa("sdpa_float_4d", mask="float", mask_shape=(2, 4, 5, 7)),
        Sdpa("sdpa_float_keypad_b11s", mask="float", mask_shape=(2, 1, 1, 7), mask_fill="keypad"),
        Sdpa("sdpa_float_bcast_s1", mask="float", mask_shape=(1, 1, 5, 1)),
        Sdpa("sdpa_float_rows_masked", mask="float", mask_shape=(1, 4, 5, 7), mask_fill="rows"),
        Sdpa("sdpa_is_causal_square", L=6, S=6, causal="top_left", via_is_causal=True),
        Sdpa("sdpa_is_causal_l4_s7", L=4, S=7, causal="top_left", via_is_causal=True),
        Sdpa("sdpa_is_causal_l7_s4", L=7, S=4, causal="top_left", via_is_causal=True),
        Sdpa("sdpa_bottom_right_l3_s9", L=3, S=9, causal="bottom_right"),
        Sdpa("sdpa_bottom_right_l6_s4", L=6, S=4, causal="bottom_right"),
        Sdpa("sdpa_top_left_explicit_l5_s8", L=5, S=8, causal="top_left"),
        Sdpa("sdpa_window_top_left", L=10, S=10, causal="top_left", window=3),
        Sdpa("sdpa_window_bottom_right", L=3, S=12, causal="bottom_right", window=4),
        Sdpa("sdpa_window_w1", L=6, S=6, causal="top_left", window=1),
        Sdpa("sdpa_gqa_causal", H=8, Hkv=2, L=6, S=6, causal="top_left", via_is_causal=True),
        Sdpa("sdpa_mqa_keypad", H=6, Hkv=1, mask="bool", mask_shape=(2, 1, 1, 7),
             mask_fill="keypad"),
        Sdpa("sdpa_scale", scale=0.3),
        Sdpa("sdpa_dv_differs", D=16, Dv=8),
        Sdpa("sdpa_causal_and_float_mask", L=6, S=6, causal="top_left", mask="float",
             mask_shape=(2, 1, 6, 6)),
        Sdpa("sdpa_bottom_right_and_keypad", L=3, S=8, causal="bottom_right", mask="bool",
             mask_shape=(2, 1, 1, 8), mask_fill="keypad"),
        Sdpa("sdpa_decode_gqa", B=3, H=8, Hkv=2, L=1, S=33, D=16, causal="bottom_right",
             mask="bool", mask_shape=(3, 1, 1, 33), mask_fill="keypad"),
        Sdpa("sdpa_head_dim_1", D=1),
        # more than one tile of queries and keys (the fused CPU kernel's 64 × 256 tiles)
        Sdpa("sdpa_long_causal_keypad", B=2, H=2, Hkv=1, L=270, S=270, D=16, causal="top_left",
             mask="bool", mask_shape=(2, 1, 1, 270), mask_fill="keypad"),
        Sdpa("sdpa_long_window", B=1, H=2, Hkv=2, L=300, S=300, D=16, causal="bottom_right",
             window=70),
    ]
    # score modifiers
    c += [
        Sdpa("sdpa_softcap", softcap=2.0),
        Sdpa("sdpa_softcap_causal_gqa", H=8, Hkv=2, L=6, S=9, causal="bottom_right",
             softcap=1.5, scale=0.7),
        Sdpa("sdpa_alibi_h_causal", L=6, S=6, causal="top_left", via_is_causal=True, alibi="h"),
        Sdpa("sdpa_alibi_bh_cross_l3_s9", L=3, S=9, alibi="bh", mask="float",
             mask_shape=(2, 1, 1, 9), mask_fill="keypad"),
        Sdpa("sdpa_alibi_l7_s4_bottom_right", L=7, S=4, causal="bottom_right", alibi="h"),
        Sdpa("sdpa_sinks", sinks=True),
        Sdpa("sdpa_sinks_full_rows", mask="bool", mask_shape=(2, 4, 5, 7), mask_fill="rows",
             sinks=True),
        Sdpa("sdpa_sinks_window_gqa", H=8, Hkv=2, L=10, S=10, causal="top_left", window=3,
             sinks=True),
        Sdpa("sdpa_all_modifiers", H=8, Hkv=2, L=6, S=8, causal="bottom_right", mask="bool",
             mask_shape=(2, 1, 1, 8), mask_fill="keypad", softcap=3.0, alibi="bh", sinks=True),
        Sdpa("sdpa_all_modifiers_long", B=1, H=2, Hkv=1, L=270, S=270, D=16, causal="top_left",
             window=100, softcap=5.0, alibi="h", sinks=True),
        Sdpa("sdpa_all_modifiers_f64", L=6, S=8, causal="bottom_right", softcap=3.0, alibi="bh",
             sinks=True, dtype="float64"),
    ]
    for dt, tag in (("float16", "f16"), ("bfloat16", "bf16")):
        c += [
            Sdpa(f"sdpa_{tag}_all_modifiers", H=8, Hkv=2, L=6, S=8, causal="bottom_right",
                 D=64, softcap=3.0, alibi="bh", sinks=True, dtype=dt),
        ]
    for dt, tag in (("float16", "f16"), ("bfloat16", "bf16")):
        c += [
            Sdpa(f"sdpa_{tag}_basic", dtype=dt),
            Sdpa(f"sdpa_{tag}_gqa_causal", H=8, Hkv=2, L=6, S=6, causal="top_left",
                 via_is_causal=True, dtype=dt),
            Sdpa(f"sdpa_{tag}_keypad_bottom_right", L=3, S=8, causal="bottom_right",
                 mask="bool", mask_shape=(2, 1, 1, 8), mask_fill="keypad", dtype=dt),
            Sdpa(f"sdpa_{tag}_float_mask", mask="float", mask_shape=(2, 4, 5, 7), dtype=dt),
            Sdpa(f"sdpa_{tag}_window_d64", B=1, H=2, Hkv=2, L=40, S=40, D=64, causal="top_left",
                 window=9, dtype=dt),
        ]
    return c


def varlen_cases() -> list[Varlen]:
    c = [
        Varlen("varlen_basic", q_lens=[3, 5, 1, 4]),
        Varlen("varlen_basic_f64", q_lens=[3, 5, 1, 4], dtype="float64"),
        Varlen("varlen_causal_top_left_empty_seq", q_lens=[4, 7, 1, 0, 6], causal="top_left"),
        Varlen("varlen_causal_bottom_right_cross", q_lens=[2, 1, 3], k_lens=[5, 4, 3],
               causal="bottom_right"),
        Varlen("varlen_causal_top_left_cross", q_lens=[4, 2], k_lens=[2, 6], causal="top_left"),
        Varlen("varlen_bottom_right_masked_rows", q_lens=[5, 2], k_lens=[3, 4],
               causal="bottom_right"),
        Varlen("varlen_zero_keys", q_lens=[3, 2, 4], k_lens=[5, 0, 3]),
        Varlen("varlen_zero_queries", q_lens=[0, 3, 0], k_lens=[4, 2, 5]),
        Varlen("varlen_window_top_left", q_lens=[10, 7, 12], causal="top_left", window=3),
        Varlen("varlen_window_bottom_right_cross", q_lens=[3, 5], k_lens=[9, 6],
               causal="bottom_right", window=4),
        Varlen("varlen_gqa_causal", q_lens=[6, 3, 8], H=8, Hkv=2, causal="top_left"),
        Varlen("varlen_mqa", q_lens=[5, 5], k_lens=[3, 7], H=6, Hkv=1),
        Varlen("varlen_scale_dv", q_lens=[4, 6], D=16, Dv=8, scale=0.25),
        Varlen("varlen_single_seq", q_lens=[9], causal="top_left"),
        Varlen("varlen_long_causal", q_lens=[300, 70, 200], H=2, Hkv=1, D=16, causal="top_left"),
        Varlen("varlen_softcap", q_lens=[3, 5, 1, 4], softcap=1.0),
        Varlen("varlen_alibi_h_cross", q_lens=[2, 4, 3], k_lens=[5, 4, 6], causal="bottom_right",
               alibi="h"),
        Varlen("varlen_alibi_per_seq", q_lens=[4, 2, 5], k_lens=[6, 2, 5], alibi="bh"),
        Varlen("varlen_sinks_zero_keys", q_lens=[3, 2, 4], k_lens=[5, 0, 3], sinks=True),
        Varlen("varlen_sinks_masked_rows", q_lens=[5, 2], k_lens=[3, 4], causal="bottom_right",
               sinks=True),
        Varlen("varlen_all_modifiers_gqa", q_lens=[6, 3, 8], k_lens=[9, 3, 8], H=8, Hkv=2,
               causal="bottom_right", window=4, softcap=2.5, alibi="bh", sinks=True),
        Varlen("varlen_bf16_all_modifiers", q_lens=[6, 3], k_lens=[7, 5], causal="bottom_right",
               D=64, softcap=2.5, alibi="bh", sinks=True, dtype="bfloat16"),
    ]
    for dt, tag in (("float16", "f16"), ("bfloat16", "bf16")):
        c += [
            Varlen(f"varlen_{tag}_gqa_causal", q_lens=[6, 3, 8], H=8, Hkv=2, causal="top_left",
                   dtype=dt),
            Varlen(f"varlen_{tag}_cross_bottom_right", q_lens=[2, 4], k_lens=[7, 5],
                   causal="bottom_right", D=64, dtype=dt),
        ]
    return c


# ------------------------------------------------------------------------------------------
def gen_of(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randn(g, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def allowed_structure(L: int, S: int, causal: Optional[str], window: Optional[int]) -> torch.Tensor:
    """(L, S) bool: True = query i may see key j by the causal alignment and window."""
    if causal is None or causal == "none":
        return torch.ones(L, S, dtype=torch.bool)
    off = 0 if causal == "top_left" else S - L
    i = torch.arange(L).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    last = i + off
    ok = j <= last
    if window is not None:
        ok &= j > last - window
    return ok


def make_mask(c: Sdpa, g: torch.Generator):
    """(stored mask, allowed-bool broadcastable to (B,H,L,S) or None, additive f64 or None)."""
    if c.mask is None:
        return None, None, None
    shape = c.mask_shape
    full = [c.B, c.H, c.L, c.S]
    if c.mask_fill == "keypad":
        # per batch element the keys >= len are masked; shapes (B,1,1,S) or (S,)
        lens = [c.S - (b * 3) % max(c.S - 1, 1) for b in range(c.B)] if len(shape) == 4 else [c.S - 2]
        allowed = torch.zeros(shape, dtype=torch.bool)
        flat = allowed.view(-1, c.S)
        for r in range(flat.shape[0]):
            flat[r, :lens[r % len(lens)]] = True
    elif c.mask_fill == "rows":
        allowed = torch.rand(shape, generator=g) > 0.3
        # fully mask some query rows
        allowed[..., 1, :] = False
        if shape[-2] > 3:
            allowed[0, ..., 3, :] = False
    else:
        allowed = torch.rand(shape, generator=g) > 0.35
        if len(shape) >= 2 and shape[-1] > 1:
            allowed[..., 0] = True  # random masks keep one key per row (no accidental NaN rows)
    if c.mask == "bool":
        return allowed.to(torch.uint8), allowed, None
    add = randn(g, *shape)
    add = torch.where(allowed, add, torch.full_like(add, -math.inf))
    if c.mask_fill == "random":
        # a few large negative finite values too (-1e9 style masks next to -inf)
        add = torch.where(torch.rand(shape, generator=g) > 0.9, torch.full_like(add, -1e9), add)
    return add, None, add


def merged_mask_f64(c: Sdpa, allowed, additive, dt_store):
    """The one mask torch sees (f64 additive, or bool), structure merged in; None if nothing."""
    struct = allowed_structure(c.L, c.S, c.causal, c.window) if c.causal else None
    if additive is not None:
        add = additive.to(dt_store).to(F64)  # the stored (rounded) mask
        if struct is not None:
            add = add + torch.where(struct, 0.0, -math.inf).to(F64)
        return add
    if allowed is not None:
        return allowed & struct if struct is not None else allowed
    return struct


def reference_sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """Independent float64 softmax reference; mask bool (True = attend) or additive; fully
    masked rows -> 0."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:
            s = s + mask
    m = s.amax(-1, keepdim=True)
    dead = torch.isneginf(m)
    e = torch.exp(s - torch.where(dead, torch.zeros_like(m), m))
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    p = torch.where(dead, torch.zeros_like(p), p)
    return p @ v


def alibi_distance(L: int, S: int) -> torch.Tensor:
    """(L, S) |i + S - L - j|: queries aligned to the end of the keys (flash-attn)."""
    i = torch.arange(L, dtype=F64).unsqueeze(1)
    j = torch.arange(S, dtype=F64).unsqueeze(0)
    return (i + S - L - j).abs()


def modifier_inputs(c, g, rows: int):
    """(slopes (rows or 1, H) f32 or None, sinks (H,) f32 or None) for a case."""
    slopes = sinks = None
    if c.alibi is not None:
        n = rows if c.alibi == "bh" else 1
        slopes = torch.rand(n, c.H, generator=g, dtype=F64) * 0.6
        slopes[..., 1] = 0.0  # a head with slope 0
        slopes = slopes.to(torch.float32)
        if c.alibi == "h":
            slopes = slopes[0]
    if c.sinks:
        sinks = (randn(g, c.H) * 1.5).to(torch.float32)
        sinks[0] = 4.0  # a sink that takes most of the weight
    return slopes, sinks


def reference_mod(q, k, v, mask, scale, softcap, alibi, sinks, dtype=F64) -> torch.Tensor:
    """The spec's order in `dtype`: scale, soft-cap, ALiBi (`alibi`: (B|1, H, L, S) bias to
    subtract), masks (bool True = attend, or additive), softmax with the sink (H,); a row with no
    key gives 0."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        s = s - alibi.to(dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:
            s = s + mask.to(dtype)
    if sinks is not None:
        s = torch.cat([sinks.to(dtype).view(1, H, 1, 1).expand(B, H, L, 1), s], -1)
    m = s.amax(-1, keepdim=True)
    dead = torch.isneginf(m)
    e = torch.exp(s - torch.where(dead, torch.zeros_like(m), m))
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300 if dtype == F64 else 1e-30)
    p = torch.where(dead, torch.zeros_like(p), p)
    if sinks is not None:
        p = p[..., 1:]
    return p @ v


def modifiers_via_sdpa(q, k, v, mask, scale, alibi, sinks) -> torch.Tensor:
    """Without soft-capping, the same through float64 SDPA: ALiBi in an additive mask, the
    sink as the factor 1 / (1 + exp(sink - logsumexp)) on SDPA's output."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    add = torch.zeros(B, H, L, S, dtype=F64)
    if alibi is not None:
        add = add - alibi
    if mask is not None:
        add = add + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask)
    o = torch_sdpa(q, k, v, add, False, scale)
    G = H // k.shape[1]
    s = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)) * scale + add
    lse = torch.logsumexp(s, -1, keepdim=True)
    dead = torch.isneginf(lse)
    o = torch.where(dead, torch.zeros_like(o), o)
    if sinks is not None:
        factor = torch.where(dead, torch.zeros_like(lse),
                             1.0 / (1.0 + torch.exp(sinks.to(F64).view(1, H, 1, 1) - lse)))
        o = o * factor
    return o


def modifier_meta(c, meta: dict, tensors: dict, slopes, sinks) -> None:
    names = []
    if c.softcap is not None:
        meta["softcap"] = repr(c.softcap)
        names.append("softcap")
    if slopes is not None:
        tensors["alibi_slopes"] = slopes
        names.append("alibi")
    if sinks is not None:
        tensors["sinks"] = sinks
        names.append("sinks")
    if names:
        meta["score_modifiers"] = ",".join(names)


def dead_rows(mask, shape) -> torch.Tensor:
    """(B,H,L,1) bool: rows with no allowed key."""
    if mask is None:
        return torch.zeros(*shape[:3], 1, dtype=torch.bool)
    ok = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    return ~ok.expand(*shape).any(-1, keepdim=True)


def torch_sdpa(q, k, v, mask, is_causal, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=True)


def tolerance(dtype: str, own_err: float) -> tuple[str, str]:
    if dtype == "float32":
        assert own_err <= 1e-5, f"torch f32 itself is {own_err} off"
        return "1e-5", "1e-4"
    if dtype == "float64":
        return "1e-10", "1e-10"
    floor = 1e-3 if dtype == "float16" else 8e-3
    return f"{max(2 * own_err, floor):.3e}", "0"


def build_sdpa(c: Sdpa) -> tuple[dict, dict]:
    g = gen_of(c.name)
    dt = DTYPES[c.dtype]
    Dv = c.Dv or c.D
    q = randn(g, c.B, c.H, c.L, c.D).to(dt)
    k = randn(g, c.B, c.Hkv, c.S, c.D).to(dt)
    v = randn(g, c.B, c.Hkv, c.S, Dv).to(dt)
    stored_mask, allowed, additive = make_mask(c, g)
    if additive is not None:
        stored_mask = stored_mask.to(dt)
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.D)
    mask = merged_mask_f64(c, allowed, additive, dt)
    only_is_causal = c.via_is_causal and c.mask is None and c.window is None
    shape = (c.B, c.H, c.L, c.S)

    def run(dtype):
        qq, kk, vv = (t.to(dtype) for t in (q, k, v))
        m = None
        if not only_is_causal and mask is not None:
            # torch wants >= 2-D masks: hand it the broadcast (B, H, L, S) view
            m = (mask if mask.dtype == torch.bool else mask.to(dtype)).expand(*shape)
        return torch_sdpa(qq, kk, vv, m, only_is_causal, scale)

    slopes, sinks = modifier_inputs(c, g, c.B)
    alibi = None
    if slopes is not None:
        alibi = slopes.to(F64).view(-1, c.H, 1, 1) * alibi_distance(c.L, c.S)
    mods = c.softcap is not None or slopes is not None or sinks is not None

    with torch.no_grad():
        dead = dead_rows(mask, shape)
        if mods:
            q64, k64, v64 = (t.to(F64) for t in (q, k, v))
            exp = reference_mod(q64, k64, v64, mask, scale, c.softcap, alibi, sinks)
            if c.softcap is None:
                via = modifiers_via_sdpa(q64, k64, v64, mask, scale, alibi, sinks)
                assert (via - exp).abs().max() < 1e-12, c.name
        else:
            exp = run(F64)
            exp = torch.where(dead, torch.zeros_like(exp), exp)
            ref = reference_sdpa(q.to(F64), k.to(F64), v.to(F64), mask, scale)
            assert (ref - exp).abs().max() < 1e-12, c.name
        own = 0.0
        if c.dtype != "float64":
            if mods:
                mine = reference_mod(q, k, v, mask, scale, c.softcap, alibi, sinks, dtype=dt)
                mine = mine.to(F64)
            else:
                mine = run(dt).to(F64)
                mine = torch.where(dead, torch.zeros_like(mine), mine)
            own = float((mine - exp).abs().max()) if mine.numel() else 0.0
    atol, rtol = tolerance(c.dtype, own)
    tensors = {"q": q, "k": k, "v": v,
               "expected.output": exp.to(F64 if c.dtype == "float64" else torch.float32)}
    meta = {"case_kind": "sdpa", "dtype": c.dtype,
            "is_causal": "true" if (c.via_is_causal and c.causal == "top_left") else "false",
            "fully_masked_rows": "zero",
            "has_fully_masked_rows": "true" if bool(dead.any()) else "false",
            "suggested_atol_output": atol, "suggested_rtol": rtol,
            "torch_own_max_abs_err_output": f"{own:.3e}"}
    if c.causal and not c.via_is_causal:
        meta["causal_alignment"] = c.causal
    if c.window is not None:
        meta["window"] = str(c.window)
    if c.scale is not None:
        meta["scale"] = repr(c.scale)
    if stored_mask is not None:
        tensors["attn_mask"] = stored_mask
        meta["attn_mask_kind"] = "bool_u8_1_means_attend" if c.mask == "bool" else "float_additive"
    else:
        meta["attn_mask_kind"] = "none"
    modifier_meta(c, meta, tensors, slopes, sinks)
    return tensors, meta


def build_varlen(c: Varlen) -> tuple[dict, dict]:
    g = gen_of(c.name)
    dt = DTYPES[c.dtype]
    Dv = c.Dv or c.D
    kl = c.k_lens if c.k_lens is not None else c.q_lens
    assert len(kl) == len(c.q_lens)
    tq, tk = sum(c.q_lens), sum(kl)
    q = randn(g, tq, c.H, c.D).to(dt)
    k = randn(g, tk, c.Hkv, c.D).to(dt)
    v = randn(g, tk, c.Hkv, Dv).to(dt)
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.D)
    cu_q = [0]
    cu_k = [0]
    for a, b in zip(c.q_lens, kl):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)

    slopes, sinks = modifier_inputs(c, g, len(c.q_lens))
    mods = c.softcap is not None or slopes is not None or sinks is not None

    def run(dtype, reference=False):
        out = torch.zeros(tq, c.H, Dv, dtype=F64)
        dead_all = torch.zeros(tq, c.H, 1, dtype=torch.bool)
        for n in range(len(c.q_lens)):
            q0, q1, k0, k1 = cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]
            if q1 == q0:
                continue
            if k1 == k0:
                dead_all[q0:q1] = True
                continue  # no keys: zero rows
            qs = q[q0:q1].to(dtype).transpose(0, 1).unsqueeze(0)  # (1, H, Lq, D)
            ks = k[k0:k1].to(dtype).transpose(0, 1).unsqueeze(0)
            vs = v[k0:k1].to(dtype).transpose(0, 1).unsqueeze(0)
            m = allowed_structure(q1 - q0, k1 - k0, c.causal, c.window)
            m = None if c.causal == "none" else m
            if mods:
                alibi = None
                if slopes is not None:
                    sl = slopes[n] if slopes.dim() == 2 else slopes
                    alibi = sl.to(F64).view(1, c.H, 1, 1) * alibi_distance(q1 - q0, k1 - k0)
                if reference and c.softcap is None:
                    o = modifiers_via_sdpa(qs, ks, vs, m, scale, alibi, sinks)
                else:
                    o = reference_mod(qs, ks, vs, m, scale, c.softcap, alibi, sinks, dtype=dtype)
            elif reference:
                o = reference_sdpa(qs, ks, vs, m, scale)
            else:
                o = torch_sdpa(qs, ks, vs, m, False, scale)
            d = dead_rows(m, (1, c.H, q1 - q0, k1 - k0))
            o = torch.where(d, torch.zeros_like(o), o)
            out[q0:q1] = o[0].transpose(0, 1).to(F64)
            dead_all[q0:q1] = d[0].transpose(0, 1)
        return out, dead_all

    with torch.no_grad():
        exp, dead = run(F64)
        ref, _ = run(F64, reference=True)
        assert (ref - exp).abs().max() < 1e-12 if exp.numel() else True, c.name
        own = 0.0
        if c.dtype != "float64":
            mine, _ = run(dt)
            own = float((mine - exp).abs().max()) if mine.numel() else 0.0
    atol, rtol = tolerance(c.dtype, own)
    tensors = {"q": q, "k": k, "v": v,
               "cu_seqlens_q": torch.tensor(cu_q, dtype=torch.int32),
               "cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32),
               "expected.output": exp.to(F64 if c.dtype == "float64" else torch.float32)}
    meta = {"case_kind": "varlen", "dtype": c.dtype, "causal_alignment": c.causal,
            "fully_masked_rows": "zero",
            "has_fully_masked_rows": "true" if bool(dead.any()) else "false",
            "suggested_atol_output": atol, "suggested_rtol": rtol,
            "torch_own_max_abs_err_output": f"{own:.3e}"}
    if c.window is not None:
        meta["window"] = str(c.window)
    if c.scale is not None:
        meta["scale"] = repr(c.scale)
    modifier_meta(c, meta, tensors, slopes, sinks)
    return tensors, meta


def save(tensors: dict, path: Path, metadata: dict) -> None:
    """save_file, then rewrite the JSON header with sorted keys (byte-identical reruns)."""
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    path.chmod(0o644)


def main() -> int:
    torch.set_num_threads(2)
    CASES_DIR.mkdir(parents=True, exist_ok=True)
    for pattern in ("sdpa_*.safetensors", "varlen_*.safetensors"):
        for f in CASES_DIR.glob(pattern):
            f.unlink()
    rows = []
    for c in sdpa_cases() + varlen_cases():
        print(c.name, file=sys.stderr)
        t, meta = build_sdpa(c) if isinstance(c, Sdpa) else build_varlen(c)
        meta.update({"generator": "scripts/gen_core_cases.py", "generator_sha256": SCRIPT_SHA,
                     "torch_version": torch.__version__.split("+")[0]})
        path = CASES_DIR / f"{c.name}.safetensors"
        save(t, path, meta)
        rows.append((c.name, path.stat().st_size, meta["dtype"], meta["suggested_atol_output"],
                     meta["torch_own_max_abs_err_output"], meta["has_fully_masked_rows"]))
    print(f"{'case':40s} {'bytes':>8s} {'dtype':9s} {'atol':>9s} {'torch err':>10s} masked_rows")
    for r in rows:
        print(f"{r[0]:40s} {r[1]:8d} {r[2]:9s} {r[3]:>9s} {r[4]:>10s} {r[5]}")
    total = sum(r[1] for r in rows)
    print(f"\n{len(rows)} core cases, {total} bytes ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
