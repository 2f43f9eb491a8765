#!/usr/bin/env python3
"""Golden-fixture generator for candle-mha.

Regenerates, deterministically (every case is seeded from crc32 of its name):

* ``tests/cases/<name>.safetensors`` -- one PyTorch parity case per file, in the
  ``mha-case`` format (``/work/shared/spec/mha-case.md``; summary below);
* ``weights/toy_e8_h2.safetensors`` + ``weights/toy_e8_h2.expected.safetensors``;
* ``weights/bert_base_attention.safetensors`` (f16, HF BERT names) +
  ``weights/bert_base_attention.expected.safetensors``.

Usage: ``python scripts/gen_fixtures.py`` (stale ``tests/cases/*.safetensors`` are
deleted first). Needs torch, numpy, safetensors (see ``scripts/requirements.txt``).

How expectations are computed
-----------------------------
* ``torch.backends.mha.set_fastpath_enabled(False)``, module in ``eval()``, CPU.
  The expectation comes from ``nn.MultiheadAttention`` run in **float64** on the stored
  (case-dtype) weights/inputs upcast to float64. It is stored as f32 (f64 for float64 cases).
* Every case is also recomputed by an independent float64 reference written here
  (``reference_attention``) and must agree with torch to 1e-12 wherever torch is finite.
* ``expected.output`` comes from the same torch call as ``expected.weights`` /
  ``expected.weights_avg`` (need_weights=True). Cases that store neither weights tensor
  are computed with ``need_weights=False`` (torch then goes through
  ``scaled_dot_product_attention``).
* ``expected.*`` holds what PyTorch returns, NaN rows included. Whenever some query row is
  fully masked, ``expected_sanitized.*`` holds the "a fully masked row attends to nothing"
  policy computed by the float64 reference with those rows zeroed explicitly (attention
  weights 0, pre-projection output 0, so the output row is ``out_proj.bias``, or 0 without
  bias). The same ``_sanitized`` suffix is applied to the ``expected_top_left`` /
  ``expected_bottom_right`` pair.
* Tolerances: float32 cases 1e-5 / 1e-5 / rtol 1e-4 (asserted against torch's own f32 run);
  float64 cases 1e-10; float16 / bfloat16 cases: torch is also run in the half dtype on CPU,
  its own max abs error vs the float64 reference is measured, and
  ``suggested_atol_* = max(2 * torch_own_error, floor)`` with floor 1e-3 (f16) / 8e-3 (bf16),
  ``suggested_rtol = 0``.

Tensors (spec, plus the extensions marked *ext*)
------------------------------------------------
* ``weights.<state_dict name>`` -- exactly ``nn.MultiheadAttention.state_dict()``.
* ``weights_split.{q,k,v,out}_proj.{weight,bias}`` and
  ``weights_bert.attention.{self.query,self.key,self.value,output.dense}.{weight,bias}``
  (spec, optional) -- written whenever kdim == vdim == embed_dim.
* *ext* ``weights_gpt2.c_attn.weight`` (E, 3E) = ``in_proj_weight.T`` (GPT-2 Conv1D is
  transposed w.r.t. nn.Linear), ``weights_gpt2.c_attn.bias`` (3E),
  ``weights_gpt2.c_proj.weight`` (E, E) = ``out_proj.weight.T``, ``weights_gpt2.c_proj.bias``
  -- written whenever kdim == vdim == embed_dim (no ``.bias`` tensors when bias=false).
* *ext* ``weights_llama.{q_proj,k_proj,v_proj,o_proj}.weight`` (nn.Linear orientation) --
  written only when bias=false and kdim == vdim == embed_dim.
* *ext* for ``add_bias_kv`` cases every alternative layout above also carries its own copy
  ``<prefix>.bias_k`` / ``<prefix>.bias_v`` (1, 1, E), identical to ``weights.bias_k/v``,
  so that each layout alone is a complete description of the module.
* ``query``, ``key``, ``value`` always stored (for self-attention key/value are copies of
  query and metadata ``self_attention_same_tensor=true``).
* ``key_padding_mask`` u8 (1 = ignore); ``attn_mask`` u8 (``bool_u8_1_means_masked``) or
  case dtype (``float_additive``, may contain -inf). torch is fed bool masks (u8 != 0).
* ``expected.output``, ``expected.weights`` (per head), ``expected.weights_avg`` (mean over
  heads); some cases store neither weights tensor (output only).
* ``expected_sanitized.*`` -- see above.
* causal cases, L == S: ``attn_mask`` holds the explicit causal mask (bool or float -inf upper
  triangle) and ``is_causal_flag=true`` (torch was called with ``is_causal=True`` and that
  mask). L != S: ``expected_top_left.*`` (key j allowed iff j <= i) and
  ``expected_bottom_right.*`` (j <= i + S - L), each computed by torch with the corresponding
  explicit bool mask (together with the key_padding_mask, if any); ``attn_mask`` +
  ``expected.*`` repeat the top-left alignment; ``is_causal_flag=false``.
* *ext* ``expected_bottom_right_sanitized.*`` (and ``expected_top_left_sanitized.*``) -- the
  sanitized policy for a pair entry that has fully masked rows (bottom-right with L > S:
  the first L - S queries see no key).
* gradient cases (``grad_*``, spec section "Gradient cases"): ``grad_output`` (case dtype,
  same shape/layout as ``expected.output``) and ``expected_grad.<name>`` (f32 for f32 cases)
  for ``query``, ``key``, ``value`` and every ``weights.<state_dict name>``
  (``expected_grad.weights.in_proj_weight``, ``expected_grad.weights.out_proj.bias``,
  ``expected_grad.weights.bias_k``, ``expected_grad.weights.q_proj_weight``, ...): the
  gradients of ``sum(output * grad_output)`` w.r.t. the expectation ``expected.output``
  describes (the case's own masks / ``is_causal_flag``). Gradients are only given for the
  spec layout ``weights.*`` (for layout=llama: ``weights_llama.*``, see below); the
  alternative layouts carry none. Self-attention cases (``self_attention_same_tensor=true``)
  store ``expected_grad.query`` only: ONE leaf tensor was passed as query, key and value, so
  it is the sum of the three input gradients; otherwise all three are stored. Gradient cases
  have no fully masked rows (torch's gradients are undefined/NaN there) and carry all the
  usual expectations too, so the forward runner checks them as well.

Gradient expectations
---------------------
Computed with PyTorch autograd in **float64**: ``nn.MultiheadAttention`` (eval, so dropout 0;
fastpath disabled) built from the stored weights upcast to float64, inputs and
``grad_output`` upcast likewise, ``need_weights=False``; cross-checked (1e-11, scale-aware)
against the ``need_weights=True`` path and against autograd through the independent float64
reference. torch's own float32 autograd must be within ``suggested_atol_grad`` /
``suggested_rtol_grad`` = 1e-5 / 1e-4 of it (asserted; the observed max abs difference is
written as ``torch_own_max_abs_err_grad``).

GQA / MQA cases (*ext*, metadata ``layout=llama``)
-------------------------------------------------
Not expressible with nn.MultiheadAttention. Weights only under
``weights_llama.{q_proj,k_proj,v_proj,o_proj}.weight`` (no ``weights.*``, bias=false):
``q_proj`` (Hq*D, E), ``k_proj``/``v_proj`` (Hkv*D, E), ``o_proj`` (E, Hq*D). Extra metadata:
``num_kv_heads`` (Hkv), ``head_dim`` (D, may differ from E/Hq), ``softmax_scale`` (only when
not 1/sqrt(D)); ``num_heads`` is Hq. Computed in float64 with
``F.scaled_dot_product_attention(q, k, v, attn_mask, scale, enable_gqa=True)`` (kv head j
serves query heads j*G .. j*G+G-1, G = Hq/Hkv, like HF ``repeat_kv``), then ``o_proj``.
Masks, causal conventions and the other metadata are as for the MHA cases
(batch_first=true, unbatched=false). Weights (per head) are given for one of them
(computed by the float64 reference, checked against SDPA's output).
Gradient cases with layout=llama (*ext*): the gradients are w.r.t. the ``weights_llama.*``
tensors and are stored as ``expected_grad.weights_llama.{q_proj,k_proj,v_proj,o_proj}.weight``
(plus ``expected_grad.query`` / ``key`` / ``value`` as for the MHA cases); computed by float64
autograd through ``F.linear`` + ``scaled_dot_product_attention(enable_gqa=True)``.

Causal pairs together with add_bias_kv / add_zero_attn: the causal structure (either
alignment) covers the S real keys only; the appended bias_k / zero columns stay visible to
every query, exactly as torch pads an explicit attn_mask with an unmasked column. In
``causal_pair_l6_s4_kpm_bias_kv`` that column is the only key the first bottom-right queries
see, so there are no NaN rows there.

Observed PyTorch behaviour (2.15.0, CPU), which the fixtures record as is
-------------------------------------------------------------------------
* Fully masked query row, ``need_weights=True`` (explicit softmax path): NaN output row and
  NaN weights row (all dtypes). ``need_weights=False`` (SDPA path): a finite row equal to the
  sanitized policy (output = out_proj.bias). So output-only cases with fully masked rows have
  ``expected.output`` == ``expected_sanitized.output`` (no NaN), while cases storing weights
  have NaN rows in ``expected.*``. The generator prints a note for every such case.
* ``is_causal=True`` without ``attn_mask`` raises; with a mask, no key_padding_mask and
  need_weights=False torch *ignores the mask* and uses SDPA's top-left causal; otherwise the
  mask is used and the hint dropped. Hence the explicit masks here are always exactly causal.
* u8 masks are rejected by torch ("only bool and floating types"): files store u8, torch is
  fed ``mask != 0``. Mixing a bool key_padding_mask with a float attn_mask only warns.

Determinism: every case is seeded from crc32(name); safetensors writes ``__metadata__`` in
hash-map order, so ``save`` rewrites the JSON header with sorted keys, making reruns
byte-identical. After writing, every case file is read back and each expectation re-derived
from the file alone (every weight layout present) by the float64 reference (self-check);
for gradient cases every ``expected_grad.*`` is likewise re-derived from the file alone by
float64 autograd through that reference (w.r.t. ``weights.*`` / ``weights_llama.*`` and the
inputs, one shared leaf when ``self_attention_same_tensor=true``), and the set of gradient
tensors is checked to be complete.

Metadata (all strings)
----------------------
Spec keys, always written: embed_dim, num_heads, kdim, vdim, bias, add_bias_kv,
add_zero_attn, batch_first, unbatched, dtype, causal, is_causal_flag, attn_mask_kind,
key_padding_mask_kind, suggested_atol_output, suggested_atol_weights, suggested_rtol.
Extra keys, always written: layout (``torch_mha`` or ``llama``), description,
self_attention_same_tensor, has_fully_masked_rows, torch_own_max_abs_err_output,
torch_own_max_abs_err_weights (torch run in the case dtype vs the float64 reference;
"nan" when no weights are stored or, for llama cases, since SDPA returns none), seed,
generator, torch_version. Tolerances are written like "1e-5" or "2.2e-03" (any float parser
reads them).
llama only: num_kv_heads, head_dim, softmax_scale (optional).
Gradient cases only: suggested_atol_grad ("1e-5"), suggested_rtol_grad ("1e-4"),
torch_own_max_abs_err_grad (torch's float32 autograd vs the float64 gradients).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = ROOT / "tests" / "cases"
WEIGHTS_DIR = ROOT / "weights"

DT = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
HALF_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3}
F64 = torch.float64


# --------------------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    desc: str
    E: int = 16
    H: int = 4
    B: int = 2
    L: int = 5
    S: Optional[int] = None  # None -> self-attention (S = L, key = value = query)
    kdim: Optional[int] = None
    vdim: Optional[int] = None
    bias: bool = True
    bias_kv: bool = False
    zero_attn: bool = False
    batch_first: bool = True
    unbatched: bool = False
    dtype: str = "float32"
    # key_padding_mask: None | "random" (key 0 never padded) | "tail" (element b pads its
    # last 2*b keys) | "full_last" (tail, and the last batch element fully padded)
    kpm: Optional[str] = None
    # attn_mask: None | "bool2d" | "bool3d" | "float2d" | "float3d" (finite random) |
    # "float2d_inf" | "float3d_inf" (random with ~25% -inf)
    mask: Optional[str] = None
    mask_full_row: bool = False  # one attn_mask row entirely masked (u8 1 / -inf)
    combo_full: bool = False  # bool3d row whose allowed keys are exactly the kpm-padded ones
    causal: Optional[str] = None  # None | "square" (L == S) | "pair" (L != S)
    causal_kind: str = "bool"  # square causal mask as "bool" or "float" (-inf / 0)
    need: str = "both"  # "both" | "head" | "avg" | "none" (which weights to store)
    # GQA (layout=llama)
    llama: bool = False
    Hkv: Optional[int] = None
    head_dim: Optional[int] = None
    scale: Optional[float] = None
    # gradient case: also store grad_output and expected_grad.* (float64 autograd VJP)
    grad: bool = False

    @property
    def self_attn(self) -> bool:
        return self.S is None and self.kdim is None and self.vdim is None

    @property
    def S_(self) -> int:
        return self.L if self.S is None else self.S

    @property
    def kdim_(self) -> int:
        return self.E if self.kdim is None else self.kdim

    @property
    def vdim_(self) -> int:
        return self.E if self.vdim is None else self.vdim


def _cases() -> list[Case]:
    C = Case
    cs = [
        # ---- basic layouts --------------------------------------------------------------
        C("self_bf_basic", "self-attention, batch_first, no masks, per-head and averaged weights"),
        C("self_seqfirst_basic", "self-attention, batch_first=false (L,B,E), no masks", batch_first=False, B=3, L=6),
        C("self_unbatched", "unbatched (L,E) self-attention, no masks", unbatched=True, B=1, L=6, batch_first=False),
        C("cross_unbatched_kpm_bool3d", "unbatched cross-attention L=4,S=6, kpm (S,), bool mask (H,L,S)",
          unbatched=True, B=1, L=4, S=6, kpm="random", mask="bool3d"),
        C("cross_l3_s7", "cross-attention L=3,S=7, distinct key and value tensors", L=3, S=7),
        C("cross_l7_s3_seqfirst", "cross-attention L=7,S=3, batch_first=false", L=7, S=3, batch_first=False),
        C("cross_kdim12_vdim20", "cross-attention with kdim=12, vdim=20 (separate q/k/v_proj_weight)",
          L=4, S=6, kdim=12, vdim=20),
        C("cross_kdim_vdim_seqfirst_kpm_bias_kv", "kdim=10, vdim=6, batch_first=false, kpm, add_bias_kv",
          L=5, S=7, kdim=10, vdim=6, batch_first=False, kpm="tail", bias_kv=True),
        C("self_nobias", "bias=false self-attention (llama layout present)", bias=False),
        C("cross_nobias_kpm_float2d", "bias=false cross-attention with kpm and finite float 2-D mask",
          bias=False, L=4, S=6, kpm="random", mask="float2d"),
        C("self_bias_kv", "add_bias_kv self-attention", bias_kv=True),
        C("self_zero_attn", "add_zero_attn self-attention", zero_attn=True),
        C("cross_bias_kv_zero_attn_kpm_bool2d", "add_bias_kv + add_zero_attn, kpm, bool 2-D mask (masks padded by torch)",
          L=4, S=6, bias_kv=True, zero_attn=True, kpm="random", mask="bool2d"),
        C("nobias_bias_kv_zero_attn", "bias=false with add_bias_kv + add_zero_attn", bias=False, bias_kv=True,
          zero_attn=True, L=4, S=5),
        C("heads1_e8", "num_heads=1, E=8", E=8, H=1, kpm="tail", mask="float2d"),
        C("medium_e64_h4_l33_s47_kpm_float2d_inf", "medium cross-attention E=64,H=4,L=33,S=47, kpm + float mask with -inf",
          E=64, H=4, L=33, S=47, kpm="random", mask="float2d_inf"),
        C("medium_e64_h8_l40_causal_kpm", "medium causal self-attention E=64,H=8,L=40 with kpm (weights avg only)",
          E=64, H=8, L=40, kpm="tail", causal="square", need="avg"),
        # ---- mask kinds --------------------------------------------------------------------
        C("kpm_only", "key_padding_mask only (random, B=3)", B=3, kpm="random"),
        C("mask_bool2d", "bool (L,S) attn_mask", mask="bool2d"),
        C("mask_bool3d", "bool (B*H,L,S) attn_mask", mask="bool3d"),
        C("mask_float2d", "finite float additive (L,S) mask", mask="float2d"),
        C("mask_float2d_inf", "float additive (L,S) mask with -inf entries", mask="float2d_inf", L=6),
        C("mask_float3d", "finite float additive (B*H,L,S) mask", mask="float3d"),
        C("mask_float3d_inf_seqfirst", "float (B*H,L,S) mask with -inf, batch_first=false", mask="float3d_inf",
          batch_first=False),
        C("kpm_bool2d", "kpm + bool (L,S) mask", kpm="random", mask="bool2d", L=6),
        C("kpm_bool3d", "kpm + bool (B*H,L,S) mask, cross L=4,S=6", kpm="random", mask="bool3d", L=4, S=6),
        C("kpm_float2d", "kpm + finite float (L,S) mask", kpm="tail", mask="float2d"),
        C("kpm_float2d_inf", "kpm + float (L,S) mask with -inf", kpm="random", mask="float2d_inf", L=6),
        C("kpm_float3d", "kpm + finite float (B*H,L,S) mask", kpm="random", mask="float3d"),
        C("kpm_float3d_inf_cross", "kpm + float (B*H,L,S) mask with -inf, cross L=5,S=8", kpm="random",
          mask="float3d_inf", L=5, S=8, B=3),
        C("bias_kv_kpm_float3d", "add_bias_kv + kpm + float 3-D mask", bias_kv=True, kpm="random", mask="float3d"),
        C("zero_attn_kpm_bool3d_seqfirst", "add_zero_attn + kpm + bool 3-D mask, batch_first=false",
          zero_attn=True, kpm="random", mask="bool3d", batch_first=False),
        C("bias_kv_zero_attn_kpm_float2d_inf", "add_bias_kv + add_zero_attn + kpm + float 2-D mask with -inf",
          bias_kv=True, zero_attn=True, kpm="tail", mask="float2d_inf", L=6, S=7),
        C("unbatched_kpm_float3d_inf_nobias", "unbatched self, kpm (S,), float (H,L,S) mask with -inf, bias=false",
          unbatched=True, B=1, kpm="random", mask="float3d_inf", bias=False, L=6),
        # ---- causal ------------------------------------------------------------------------
        C("causal_bool_self", "causal L==S: bool triu mask + is_causal=True", causal="square", L=6),
        C("causal_float_self_noweights", "causal L==S: float -inf triu mask + is_causal=True, output only",
          causal="square", causal_kind="float", need="none", L=6),
        C("causal_bool_kpm", "causal L==S + kpm", causal="square", kpm="tail", L=6, B=3),
        C("causal_float_kpm_seqfirst", "causal L==S float mask + kpm, batch_first=false", causal="square",
          causal_kind="float", kpm="random", batch_first=False, L=7),
        C("causal_unbatched", "causal L==S unbatched", causal="square", unbatched=True, B=1, L=5),
        C("causal_pair_l3_s7", "causal cross-shaped L=3,S=7: top-left and bottom-right expectations",
          causal="pair", L=3, S=7),
        C("causal_pair_l7_s3", "causal L=7,S=3: bottom-right fully masks the first 4 queries (sanitized pair)",
          causal="pair", L=7, S=3),
        C("causal_pair_l4_s9_kpm_noweights", "causal L=4,S=9 + kpm, output only", causal="pair", L=4, S=9,
          kpm="tail", need="none"),
        C("causal_pair_l6_s4_kpm_bias_kv", "causal L=6,S=4 + kpm + add_bias_kv (bias column rescues bottom-right rows)",
          causal="pair", L=6, S=4, kpm="tail", bias_kv=True),
        # ---- fully masked rows ---------------------------------------------------------------
        C("fullmask_kpm_batch", "last batch element fully padded (B=3): NaN rows in torch", B=3, kpm="full_last"),
        C("fullmask_kpm_batch_noweights", "last batch element fully padded, need_weights=False path", B=3,
          kpm="full_last", need="none"),
        C("fullmask_bool2d_row", "a bool (L,S) mask row fully masked, per-head weights", mask="bool2d",
          mask_full_row=True, need="head"),
        C("fullmask_float2d_row_inf", "a float (L,S) mask row all -inf, averaged weights", mask="float2d_inf",
          mask_full_row=True, need="avg", kpm="random"),
        C("fullmask_float3d_row_inf_noweights", "one (b,h) row of a float 3-D mask all -inf, output only",
          mask="float3d", mask_full_row=True, need="none"),
        C("fullmask_bool3d_kpm_combo", "bool 3-D mask allows exactly the kpm-padded keys in one row",
          mask="bool3d", kpm="tail", combo_full=True, L=6),
        C("fullmask_kpm_batch_bias_kv", "fully padded batch element rescued by add_bias_kv column (no NaN)",
          B=3, kpm="full_last", bias_kv=True),
        C("fullmask_kpm_batch_zero_attn", "fully padded batch element rescued by add_zero_attn column (no NaN)",
          B=3, kpm="full_last", zero_attn=True, need="head"),
        C("fullmask_unbatched_bool2d_row", "unbatched, a bool mask row fully masked", unbatched=True, B=1,
          mask="bool2d", mask_full_row=True),
        # ---- float64 -------------------------------------------------------------------------
        C("f64_self_kpm_float3d", "float64 self-attention, kpm + float 3-D mask", dtype="float64", kpm="random",
          mask="float3d"),
        C("f64_cross_bias_kv_zero_attn_kdim", "float64 cross kdim=12,vdim=8 + bias_kv + zero_attn",
          dtype="float64", L=4, S=6, kdim=12, vdim=8, bias_kv=True, zero_attn=True),
        C("f64_causal_pair_l7_s3", "float64 causal pair L=7,S=3 (bottom-right sanitized)", dtype="float64",
          causal="pair", L=7, S=3),
        C("f64_fullmask_kpm_batch", "float64, fully padded batch element", dtype="float64", kpm="full_last"),
        # ---- float16 -------------------------------------------------------------------------
        C("f16_self_basic", "float16 self-attention, no masks", dtype="float16"),
        C("f16_cross_kpm_bool2d", "float16 cross-attention, kpm + bool 2-D mask", dtype="float16", L=4, S=6,
          kpm="random", mask="bool2d"),
        C("f16_bias_kv_kpm_float3d_inf", "float16 add_bias_kv + kpm + float 3-D mask with -inf",
          dtype="float16", bias_kv=True, kpm="random", mask="float3d_inf"),
        C("f16_causal_kpm_seqfirst", "float16 causal L==S + kpm, batch_first=false", dtype="float16",
          causal="square", kpm="tail", batch_first=False, L=6),
        C("f16_zero_attn_nobias_e32", "float16 E=32,H=4 bias=false + add_zero_attn + float 2-D mask",
          dtype="float16", E=32, zero_attn=True, bias=False, mask="float2d", L=8),
        # ---- bfloat16 ------------------------------------------------------------------------
        C("bf16_self_basic", "bfloat16 self-attention, no masks", dtype="bfloat16"),
        C("bf16_cross_kpm_float3d", "bfloat16 cross-attention, kpm + float 3-D mask", dtype="bfloat16", L=4,
          S=6, kpm="random", mask="float3d"),
        C("bf16_bias_kv_zero_attn_bool2d", "bfloat16 add_bias_kv + add_zero_attn + bool 2-D mask",
          dtype="bfloat16", bias_kv=True, zero_attn=True, mask="bool2d"),
        C("bf16_causal_e32", "bfloat16 causal L==S, E=32,H=8", dtype="bfloat16", E=32, H=8, causal="square", L=8),
        # ---- GQA / MQA (layout=llama) --------------------------------------------------------
        C("gqa_hq4_hkv2_weights", "GQA Hq=4,Hkv=2,E=16, per-head weights", llama=True, H=4, Hkv=2, bias=False),
        C("mqa_hq6_hkv1_kpm", "MQA Hq=6,Hkv=1,E=24 + kpm", llama=True, E=24, H=6, Hkv=1, bias=False, kpm="random",
          need="none"),
        C("gqa_head_dim8_e16_hq4_hkv2", "GQA head_dim override: E=16,Hq=4,Hkv=2,D=8 (Hq*D != E)", llama=True,
          H=4, Hkv=2, head_dim=8, bias=False, need="none"),
        C("gqa_scale_bool2d", "GQA Hq=4,Hkv=2 with softmax_scale=0.3 and bool 2-D mask", llama=True, H=4, Hkv=2,
          scale=0.3, bias=False, mask="bool2d", need="none"),
        C("gqa_float2d_kpm", "GQA Hq=8,Hkv=2,E=32, kpm + finite float 2-D mask", llama=True, E=32, H=8, Hkv=2,
          bias=False, mask="float2d", kpm="tail", need="none"),
        C("gqa_causal_kpm", "GQA causal L==S + kpm", llama=True, H=4, Hkv=2, bias=False, causal="square",
          kpm="tail", need="none", L=6),
        C("gqa_causal_pair_l3_s7", "GQA causal cross-shaped L=3,S=7 pair", llama=True, H=4, Hkv=2, bias=False,
          causal="pair", L=3, S=7, need="none"),
        C("gqa_causal_pair_l6_s3_d8_scale", "GQA causal L=6,S=3 pair (bottom-right sanitized), D=8, scale=0.25",
          llama=True, H=4, Hkv=2, head_dim=8, scale=0.25, bias=False, causal="pair", L=6, S=3, need="none"),
        # ---- gradient cases (grad_output + expected_grad.*; no fully masked rows) ----------------
        C("grad_self_bf", "grad: self-attention, batch_first, one shared query/key/value tensor",
          grad=True, E=16, H=4, B=2, L=5),
        C("grad_cross_l3_s6", "grad: cross-attention L=3,S=6, distinct query/key/value",
          grad=True, E=12, H=3, B=2, L=3, S=6),
        C("grad_cross_kdim10_vdim6", "grad: cross-attention kdim=10, vdim=6 (q/k/v_proj_weight)",
          grad=True, E=8, H=2, B=2, L=4, S=5, kdim=10, vdim=6),
        C("grad_kpm_bool2d_cross", "grad: cross L=5,S=6, key_padding_mask + bool 2-D mask",
          grad=True, E=12, H=2, B=2, L=5, S=6, kpm="random", mask="bool2d"),
        C("grad_float3d_cross", "grad: cross L=4,S=6, finite float additive (B*H,L,S) mask",
          grad=True, E=8, H=2, B=2, L=4, S=6, mask="float3d"),
        C("grad_causal_kpm_seqfirst", "grad: causal L==S self-attention (explicit bool mask + is_causal) + kpm, "
          "batch_first=false, shared tensor", grad=True, E=16, H=4, B=2, L=6, causal="square", kpm="tail",
          batch_first=False),
        C("grad_bias_kv_zero_attn_kpm", "grad: add_bias_kv + add_zero_attn + kpm, cross L=4,S=5",
          grad=True, E=8, H=2, B=2, L=4, S=5, bias_kv=True, zero_attn=True, kpm="random"),
        C("grad_unbatched_kpm", "grad: unbatched (L,E) cross-attention L=4,S=6 + kpm (S,)",
          grad=True, E=8, H=2, B=1, L=4, S=6, unbatched=True, batch_first=False, kpm="random"),
        C("grad_nobias_cross", "grad: bias=false cross-attention L=5,S=4 (llama layout also present)",
          grad=True, E=12, H=3, B=2, L=5, S=4, bias=False),
        C("grad_gqa_hq4_hkv2_kpm", "grad: GQA Hq=4,Hkv=2,E=16 cross L=4,S=6 + kpm (grads w.r.t. weights_llama.*)",
          grad=True, llama=True, E=16, H=4, Hkv=2, B=2, L=4, S=6, bias=False, kpm="random"),
    ]
    names = [c.name for c in cs]
    assert len(names) == len(set(names)), "duplicate case name"
    return cs


# --------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------
def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def s(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def fmt_err(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3e}"


def nan_max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error where ref is finite; asserts NaN patterns agree."""
    a = a.to(F64)
    ref = ref.to(F64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    rn, an = torch.isnan(ref), torch.isnan(a)
    if not torch.equal(rn, an):
        raise AssertionError(f"NaN pattern differs: ref {int(rn.sum())} NaNs, got {int(an.sum())}")
    fin = ~rn
    if fin.sum() == 0:
        return 0.0
    return float((a[fin] - ref[fin]).abs().max())


def assert_close(a, ref, atol, rtol, what):
    a = a.to(F64)
    ref = ref.to(F64)
    rn = torch.isnan(ref)
    assert torch.equal(rn, torch.isnan(a)), f"{what}: NaN pattern differs"
    fin = ~rn
    bad = (a[fin] - ref[fin]).abs() > atol + rtol * ref[fin].abs()
    if bad.any():
        raise AssertionError(f"{what}: max abs err {float((a[fin]-ref[fin]).abs().max()):.3e} > tol")


def causal_bool(L: int, S: int, align: str) -> torch.Tensor:
    """True = masked. top-left: j <= i allowed; bottom-right: j <= i + S - L allowed."""
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    off = 0 if align == "top_left" else S - L
    return j > i + off


# --------------------------------------------------------------------------------------
# Independent float64 reference (handles MHA and GQA)
# --------------------------------------------------------------------------------------
def reference_attention(P: dict, q, k, v, *, H, Hkv, D, scale, batch_first, unbatched,
                        kpm=None, attn_mask=None, sanitize=False):
    """P: float64 params: Wq (H*D,E), Wk (Hkv*D,kdim), Wv (Hkv*D,vdim), Wo (E,H*D), optional
    bq,bk,bv,bo, bias_k/bias_v (1,1,Hkv*D), zero_attn flag. Masks in spec convention:
    kpm bool (B,S)/(S,) True = ignore; attn_mask bool (True = masked) or float additive,
    (L,S) or (B*H,L,S)/(H,L,S). Returns (output in query layout, weights (B,H,L,S'))."""
    if unbatched:
        q, k, v = q[None], k[None], v[None]
        if kpm is not None:
            kpm = kpm[None]
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    B, L, _ = q.shape
    S = k.shape[1]
    Q = q @ P["Wq"].T + (P["bq"] if P.get("bq") is not None else 0)
    K = k @ P["Wk"].T + (P["bk"] if P.get("bk") is not None else 0)
    V = v @ P["Wv"].T + (P["bv"] if P.get("bv") is not None else 0)
    # additive logit bias and allowed mask, shape (B,H,L,S)
    add = torch.zeros(B, H, L, S, dtype=F64)
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    if attn_mask is not None:
        m = attn_mask
        m = m.view(B, H, L, S) if m.dim() == 3 else m.expand(B, H, L, S)
        if m.dtype == torch.bool:
            allowed &= ~m
        else:
            add = add + m.to(F64)
    if kpm is not None:
        allowed &= ~kpm[:, None, None, :]
    extra = 0
    if P.get("bias_k") is not None:
        K = torch.cat([K, P["bias_k"].expand(B, 1, -1)], 1)
        V = torch.cat([V, P["bias_v"].expand(B, 1, -1)], 1)
        extra += 1
    Qh = Q.view(B, L, H, D).transpose(1, 2)
    Kh = K.view(B, S + extra, Hkv, D).transpose(1, 2)
    Vh = V.view(B, S + extra, Hkv, D).transpose(1, 2)
    if P.get("zero_attn"):
        Kh = torch.cat([Kh, torch.zeros(B, Hkv, 1, D, dtype=F64)], 2)
        Vh = torch.cat([Vh, torch.zeros(B, Hkv, 1, D, dtype=F64)], 2)
        extra += 1
    if extra:
        add = F.pad(add, (0, extra))
        allowed = F.pad(allowed, (0, extra), value=True)
    G = H // Hkv
    Kh = Kh.repeat_interleave(G, dim=1)
    Vh = Vh.repeat_interleave(G, dim=1)
    logits = (Qh @ Kh.transpose(-1, -2)) * scale + add
    logits = logits.masked_fill(~allowed, float("-inf"))
    full = torch.isneginf(logits).all(-1, keepdim=True)
    if sanitize:
        mx = logits.amax(-1, keepdim=True).masked_fill(full, 0.0)
        e = torch.exp(logits - mx)
        w = e / e.sum(-1, keepdim=True).masked_fill(full, 1.0)
        w = w.masked_fill(full, 0.0)
    else:
        w = torch.softmax(logits, -1)
    O = (w @ Vh).transpose(1, 2).reshape(B, L, H * D)
    out = O @ P["Wo"].T + (P["bo"] if P.get("bo") is not None else 0)
    if unbatched:
        out, w = out[0], w[0]
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, w, bool(full.any())


# --------------------------------------------------------------------------------------
# Building one case
# --------------------------------------------------------------------------------------
def make_params(c: Case, g: torch.Generator) -> dict:
    """float64 master parameters (later rounded to the case dtype)."""
    E, kd, vd = c.E, c.kdim_, c.vdim_
    if c.llama:
        D = c.head_dim or E // c.H
        return {
            "q_proj.weight": randn(g, c.H * D, E, scale=E ** -0.5),
            "k_proj.weight": randn(g, c.Hkv * D, E, scale=E ** -0.5),
            "v_proj.weight": randn(g, c.Hkv * D, E, scale=E ** -0.5),
            "o_proj.weight": randn(g, E, c.H * D, scale=(c.H * D) ** -0.5),
        }
    p = {}
    if kd == E and vd == E:
        p["in_proj_weight"] = randn(g, 3 * E, E, scale=E ** -0.5)
    else:
        p["q_proj_weight"] = randn(g, E, E, scale=E ** -0.5)
        p["k_proj_weight"] = randn(g, E, kd, scale=kd ** -0.5)
        p["v_proj_weight"] = randn(g, E, vd, scale=vd ** -0.5)
    if c.bias:
        p["in_proj_bias"] = randn(g, 3 * E, scale=0.1)
    if c.bias_kv:
        p["bias_k"] = randn(g, 1, 1, E, scale=0.5)
        p["bias_v"] = randn(g, 1, 1, E, scale=0.5)
    p["out_proj.weight"] = randn(g, E, E, scale=E ** -0.5)
    if c.bias:
        p["out_proj.bias"] = randn(g, E, scale=0.1)
    return p


def ref_params(c: Case, p: dict) -> dict:
    """Convert (float64-upcast) state-dict params to the reference's P dict."""
    E = c.E
    if c.llama:
        return {"Wq": p["q_proj.weight"], "Wk": p["k_proj.weight"], "Wv": p["v_proj.weight"],
                "Wo": p["o_proj.weight"]}
    if "in_proj_weight" in p:
        Wq, Wk, Wv = p["in_proj_weight"].split(E)
    else:
        Wq, Wk, Wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    P = {"Wq": Wq, "Wk": Wk, "Wv": Wv, "Wo": p["out_proj.weight"], "zero_attn": c.zero_attn}
    if "in_proj_bias" in p:
        P["bq"], P["bk"], P["bv"] = p["in_proj_bias"].split(E)
        P["bo"] = p["out_proj.bias"]
    if "bias_k" in p:
        P["bias_k"], P["bias_v"] = p["bias_k"].view(1, 1, E), p["bias_v"].view(1, 1, E)
    return P


def alt_layouts(c: Case, p: dict) -> dict:
    """weights_split / weights_bert / weights_gpt2 / weights_llama views of the same params."""
    out = {}
    E = c.E
    if c.llama or "in_proj_weight" not in p:
        return out
    Wq, Wk, Wv = [t.contiguous() for t in p["in_proj_weight"].split(E)]
    Wo = p["out_proj.weight"]
    b = c.bias
    if b:
        bq, bk, bv = [t.contiguous() for t in p["in_proj_bias"].split(E)]
        bo = p["out_proj.bias"]
    for prefix, names in [("weights_split", ["q_proj", "k_proj", "v_proj", "out_proj"]),
                          ("weights_bert", ["attention.self.query", "attention.self.key",
                                            "attention.self.value", "attention.output.dense"])]:
        for n, W, bb in zip(names, [Wq, Wk, Wv, Wo], [bq, bk, bv, bo] if b else [None] * 4):
            out[f"{prefix}.{n}.weight"] = W
            if b:
                out[f"{prefix}.{n}.bias"] = bb
    out["weights_gpt2.c_attn.weight"] = p["in_proj_weight"].T.contiguous()
    out["weights_gpt2.c_proj.weight"] = Wo.T.contiguous()
    if b:
        out["weights_gpt2.c_attn.bias"] = p["in_proj_bias"]
        out["weights_gpt2.c_proj.bias"] = bo
    prefixes = ["weights_split", "weights_bert", "weights_gpt2"]
    if not b:
        for n, W in zip(["q_proj", "k_proj", "v_proj", "o_proj"], [Wq, Wk, Wv, Wo]):
            out[f"weights_llama.{n}.weight"] = W
        prefixes.append("weights_llama")
    if c.bias_kv:
        for pre in prefixes:
            out[f"{pre}.bias_k"] = p["bias_k"]
            out[f"{pre}.bias_v"] = p["bias_v"]
    return out


def make_masks(c: Case, g: torch.Generator):
    """Returns (kpm bool or None, attn_mask bool/float64 or None, mask_kind)."""
    B, L, S, H = c.B, c.L, c.S_, c.H
    kpm = None
    safe = torch.ones(S, dtype=torch.bool)  # keys that no batch element pads
    if c.kpm is not None:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        if c.kpm == "random":
            kpm[:, 1:] = torch.rand(B, S - 1, generator=g, dtype=F64) < 0.3
        elif c.kpm in ("tail", "full_last"):
            for b in range(B):
                n = min(2 * b, S - 1)
                if n:
                    kpm[b, S - n:] = True
        else:
            raise ValueError(c.kpm)
        safe = ~kpm.any(0)
        if c.kpm == "full_last":
            kpm[B - 1, :] = True
    safe_idx = safe.nonzero().flatten()
    assert len(safe_idx) > 0

    mask = None
    kind = "none"
    if c.causal is not None:
        cm = causal_bool(L, S, "top_left")
        if c.causal_kind == "bool":
            mask, kind = cm, "bool_u8_1_means_masked"
        else:
            mask = torch.zeros(L, S, dtype=F64).masked_fill(cm, float("-inf"))
            kind = "float_additive"
    elif c.mask is not None:
        three = "3d" in c.mask
        shape = ((H if c.unbatched else B * H), L, S) if three else (L, S)
        # one guaranteed-allowed key per row, chosen among keys no batch element pads
        guard = safe_idx[torch.randint(len(safe_idx), shape[:-1], generator=g)]
        guard_oh = F.one_hot(guard, S).bool()
        is_bool = c.mask.startswith("bool")
        if is_bool:
            mask = (torch.rand(*shape, generator=g, dtype=F64) < 0.35) & ~guard_oh
            kind = "bool_u8_1_means_masked"
        else:
            mask = randn(g, *shape)
            if c.mask.endswith("_inf"):
                inf = (torch.rand(*shape, generator=g, dtype=F64) < 0.25) & ~guard_oh
                mask = mask.masked_fill(inf, float("-inf"))
            kind = "float_additive"
        if c.mask_full_row:
            fill = True if is_bool else float("-inf")
            row = L // 2
            if three:
                mask[min(1, shape[0] - 1), row, :] = fill  # one (b, h) slice only
            else:
                mask[row, :] = fill
        if c.combo_full:
            assert three and is_bool and kpm is not None
            b = B - 1
            assert kpm[b].any()
            mask[b * H + 1, 2, :] = ~kpm[b]  # only the padded keys are allowed
    return kpm, mask, kind


def to_store_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask.to(torch.uint8)
    return mask.to(dtype)


class TorchRunner:
    """Runs the case in a given dtype through nn.MultiheadAttention / SDPA."""

    def __init__(self, c: Case, p_stored: dict, dtype):
        self.c, self.dtype = c, dtype
        if not c.llama:
            m = nn.MultiheadAttention(c.E, c.H, bias=c.bias, add_bias_kv=c.bias_kv,
                                      add_zero_attn=c.zero_attn, kdim=c.kdim, vdim=c.vdim,
                                      batch_first=c.batch_first, dtype=dtype)
            sd = {k: v.to(dtype) for k, v in p_stored.items()}
            m.load_state_dict(sd, strict=True)
            self.m = m.eval()
        else:
            self.p = {k: v.to(dtype) for k, v in p_stored.items()}

    def run(self, q, k, v, kpm, mask, is_causal, need_weights, average):
        """Returns (output, weights or None)."""
        c, dt = self.c, self.dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if c.self_attn:
            k = v = q
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(dt)
        with torch.no_grad():
            if not c.llama:
                return self.m(q, k, v, key_padding_mask=kpm, attn_mask=mask,
                              need_weights=need_weights, average_attn_weights=average,
                              is_causal=is_causal)
            assert not need_weights
            return self._gqa(q, k, v, kpm, mask, is_causal), None

    def _gqa(self, x, kin, vin, kpm, mask, is_causal):
        c, p = self.c, self.p
        B, L, E = x.shape
        S = kin.shape[1]
        D = c.head_dim or E // c.H
        q = F.linear(x, p["q_proj.weight"]).view(B, L, c.H, D).transpose(1, 2)
        k = F.linear(kin, p["k_proj.weight"]).view(B, S, c.Hkv, D).transpose(1, 2)
        v = F.linear(vin, p["v_proj.weight"]).view(B, S, c.Hkv, D).transpose(1, 2)
        # SDPA bool masks are "True = take part"; build one additive/bool (B,1,L,S) mask.
        sd_mask = None
        if mask is not None or kpm is not None:
            allowed = torch.ones(B, 1, L, S, dtype=torch.bool)
            addm = torch.zeros(B, 1, L, S, dtype=self.dtype)
            if mask is not None:
                if mask.dtype == torch.bool:
                    allowed &= ~mask
                else:
                    addm = addm + mask
            if kpm is not None:
                allowed &= ~kpm[:, None, None, :]
            sd_mask = addm.masked_fill(~allowed, float("-inf")) if mask is not None and mask.dtype != torch.bool \
                else allowed
        if is_causal and kpm is None and mask is not None:
            # cross-check: SDPA's own causal path (top-left) must give the same as the mask
            o_causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.scale, enable_gqa=True)
        else:
            o_causal = None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=sd_mask, scale=c.scale, enable_gqa=True)
        if o_causal is not None:
            assert torch.allclose(o, o_causal, atol=1e-6 if self.dtype != F64 else 1e-12)
        o = o.transpose(1, 2).reshape(B, L, c.H * D)
        return F.linear(o, p["o_proj.weight"])


def torch_grads(c: Case, p_src: dict, dtype, query, key, value, kpm, mask, is_causal, gout,
                need_weights: bool = False):
    """Vector-Jacobian product of torch's forward in ``dtype``: gradients of
    ``sum(output * gout)`` w.r.t. the inputs and every parameter (state_dict names).
    Self-attention: ONE leaf tensor is passed as query, key and value (its gradient is the sum
    of the three), returned under ``query`` only. Returns (output, {name: grad}) with names
    ``query``/``key``/``value`` and ``weights.<name>`` (``weights_llama.<name>`` for GQA)."""
    r = TorchRunner(c, p_src, dtype)
    if c.llama:
        r.p = {k: v.detach().clone().requires_grad_(True) for k, v in r.p.items()}
        params = {f"weights_llama.{k}": v for k, v in r.p.items()}
    else:
        r.m.requires_grad_(True)
        params = {f"weights.{k}": v for k, v in r.m.named_parameters()}
        assert set(params) == {f"weights.{k}" for k in p_src}, (sorted(params), sorted(p_src))
    q = query.to(dtype).detach().clone().requires_grad_(True)
    if c.self_attn:
        k = v = q
        inputs = {"query": q}
    else:
        k = key.to(dtype).detach().clone().requires_grad_(True)
        v = value.to(dtype).detach().clone().requires_grad_(True)
        inputs = {"query": q, "key": k, "value": v}
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    with torch.enable_grad():
        if c.llama:
            out = r._gqa(q, k, v, kpm, mask, is_causal)
        else:
            out, _ = r.m(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights,
                         average_attn_weights=False, is_causal=is_causal)
        loss = (out * gout.to(dtype)).sum()
        leaves = {**inputs, **params}
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach(), {n: gr.detach() for n, gr in zip(leaves, grads)}


def reference_grads(P_leaves: dict, named: dict, q, k, v, same_tensor: bool, gout, **kw):
    """Gradients of sum(reference_attention(...) * gout) in float64. ``P_leaves``: reference
    params built (differentiably) from the leaf tensors in ``named`` ({name: leaf}); q/k/v
    are float64; with ``same_tensor`` one leaf serves as query, key and value."""
    ql = q.detach().clone().requires_grad_(True)
    if same_tensor:
        kl = vl = ql
        inputs = {"query": ql}
    else:
        kl = k.detach().clone().requires_grad_(True)
        vl = v.detach().clone().requires_grad_(True)
        inputs = {"query": ql, "key": kl, "value": vl}
    with torch.enable_grad():
        out, _, full = reference_attention(P_leaves, ql, kl, vl, **kw)
        assert not full and not torch.isnan(out).any(), "gradient case with a fully masked row"
        leaves = {**inputs, **named}
        grads = torch.autograd.grad((out * gout.to(F64)).sum(), list(leaves.values()))
    return out.detach(), {n: gr.detach() for n, gr in zip(leaves, grads)}


def grad_rel_err(a: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    """max |a - ref| / (atol + |ref|) (a scale-aware error; with atol=1 it is the abs error for
    small values and the relative error for large ones)."""
    a, ref = a.to(F64), ref.to(F64)
    return float(((a - ref).abs() / (atol + ref.abs())).max())


NOTES: list[str] = []  # observed PyTorch behaviour, printed at the end
GRAD_STATS: list[tuple] = []  # (case, max abs err f32 vs f64, max |grad|, fraction of tolerance used)


def build_case(c: Case) -> tuple[dict, dict]:
    seed = seed_of(c.name)
    g = torch.Generator().manual_seed(seed)
    dt = DT[c.dtype]
    B, L, S, E, H = c.B, c.L, c.S_, c.E, c.H
    if c.causal == "square":
        assert S == L
    if c.causal == "pair":
        assert S != L

    # ---- params & inputs, rounded to the case dtype ----
    p_store = {k: v.to(dt) for k, v in make_params(c, g).items()}
    p64 = {k: v.to(F64) for k, v in p_store.items()}

    def layout(n, d):
        if c.unbatched:
            return (n, d)
        return (B, n, d) if c.batch_first else (n, B, d)

    query = randn(g, *layout(L, E)).to(dt)
    if c.self_attn:
        key = value = query
    else:
        key = randn(g, *layout(S, c.kdim_)).to(dt)
        value = randn(g, *layout(S, c.vdim_)).to(dt)
    kpm, mask, mask_kind = make_masks(c, g)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dt)  # stored value; the float64 runs upcast it exactly
    if c.unbatched and kpm is not None:
        kpm = kpm[0]

    D = (c.head_dim or E // H) if c.llama else E // H
    Hkv = c.Hkv if c.llama else H
    scale = c.scale if c.scale is not None else D ** -0.5
    P = ref_params(c, p64)

    def ref(m, sanitize):
        mm = m if (m is None or m.dtype == torch.bool) else m.to(F64)
        return reference_attention(P, query.to(F64), key.to(F64), value.to(F64), H=H, Hkv=Hkv, D=D,
                                   scale=scale, batch_first=c.batch_first, unbatched=c.unbatched,
                                   kpm=kpm, attn_mask=mm, sanitize=sanitize)

    r64 = TorchRunner(c, p64, F64)
    rlow = TorchRunner(c, p_store, dt)

    want_head = c.need in ("both", "head") or (c.llama and c.need != "none")
    want_avg = c.need in ("both", "avg") and not c.llama

    # list of (prefix, mask, is_causal) expectations to compute
    exps = [("expected", mask, c.causal == "square")]
    if c.causal == "pair":
        exps.append(("expected_top_left", causal_bool(L, S, "top_left"), False))
        exps.append(("expected_bottom_right", causal_bool(L, S, "bottom_right"), False))

    tensors: dict[str, torch.Tensor] = {}
    err_out, err_w = 0.0, float("nan")
    any_full = False
    store_dt = F64 if c.dtype == "float64" else torch.float32

    for prefix, m, is_causal in exps:
        res64, reslow = {}, {}
        for runner, res in ((r64, res64), (rlow, reslow)):
            if c.llama:
                res["output"], _ = runner.run(query, key, value, kpm, m, is_causal, False, False)
                continue
            if want_head:
                res["output"], res["weights"] = runner.run(query, key, value, kpm, m, is_causal, True, False)
            if want_avg:
                o, res["weights_avg"] = runner.run(query, key, value, kpm, m, is_causal, True, True)
                if "output" in res:
                    assert torch.equal(torch.isnan(o), torch.isnan(res["output"]))
                res.setdefault("output", o)
            if not (want_head or want_avg):
                res["output"], _ = runner.run(query, key, value, kpm, m, is_causal, False, False)
        # independent reference
        ref_out, ref_w, full = ref(m, sanitize=False)
        san_out, san_w, _ = ref(m, sanitize=True)
        any_full |= full
        if c.llama and want_head:
            res64["weights"] = ref_w  # SDPA returns no weights: use the reference's (checked via output)
            reslow["weights"] = None
        # torch f64 vs reference
        fin = ~torch.isnan(res64["output"])
        both = fin & ~torch.isnan(ref_out)
        assert (res64["output"][both] - ref_out[both]).abs().max() < 1e-12, f"{c.name}/{prefix}: torch vs ref"
        nan_rows = int(torch.isnan(res64["output"]).any(-1).sum())
        if full:
            # rows that torch did not turn into NaN must equal the sanitized ones
            assert (res64["output"][fin] - san_out[fin]).abs().max() < 1e-12
            note = (f"{c.name}/{prefix}: fully masked rows present; torch "
                    f"{'need_weights' if (want_head or want_avg) and not c.llama else 'need_weights=False/SDPA'}"
                    f" path gives {'NaN' if nan_rows else 'finite (== sanitized)'} rows")
            NOTES.append(note)
        else:
            assert nan_rows == 0
        if "weights" in res64 and not c.llama:
            assert nan_max_abs(res64["weights"], ref_w) < 1e-12
        if "weights_avg" in res64:
            assert nan_max_abs(res64["weights_avg"], ref_w.mean(-3)) < 1e-12

        # also check torch's need_weights=False path agrees with the need_weights=True path
        if not c.llama and (want_head or want_avg):
            o_nw, _ = r64.run(query, key, value, kpm, m, is_causal, False, False)
            nwn = torch.isnan(o_nw)
            if not torch.equal(nwn, torch.isnan(res64["output"])):
                NOTES.append(f"{c.name}/{prefix}: need_weights=False gives {int(nwn.any(-1).sum())} NaN rows vs "
                             f"{nan_rows} with need_weights=True")
            fin2 = ~nwn & fin
            assert (o_nw[fin2] - res64["output"][fin2]).abs().max() < 1e-12

        for kname, t in res64.items():
            tensors[f"{prefix}.{kname}"] = t.to(store_dt).contiguous()
        if full:
            tensors[f"{prefix}_sanitized.output"] = san_out.to(store_dt).contiguous()
            if "weights" in res64:
                tensors[f"{prefix}_sanitized.weights"] = san_w.to(store_dt).contiguous()
            if "weights_avg" in res64:
                tensors[f"{prefix}_sanitized.weights_avg"] = san_w.mean(-3).to(store_dt).contiguous()

        # torch in the case dtype vs the float64 expectation
        if c.dtype != "float64":
            e = nan_max_abs(reslow["output"], res64["output"])
            err_out = max(err_out, e)
            for kname in ("weights", "weights_avg"):
                if reslow.get(kname) is not None:
                    ew = nan_max_abs(reslow[kname], res64[kname])
                    err_w = ew if math.isnan(err_w) else max(err_w, ew)
            if c.dtype == "float32":
                for kname, t in reslow.items():
                    if t is not None:
                        assert_close(t, res64[kname], 1e-5, 1e-4, f"{c.name}/{prefix}.{kname} f32 vs f64")

    # ---- tolerances ----
    if c.dtype == "float64":
        atol_o = atol_w = "1e-10"
        rtol = "1e-10"
        err_out, err_w = 0.0, (0.0 if (want_head or want_avg) else float("nan"))
    elif c.dtype == "float32":
        atol_o = atol_w = "1e-5"
        rtol = "1e-4"
    else:
        floor = HALF_FLOOR[c.dtype]
        atol_o = f"{max(2 * err_out, floor):.1e}"
        atol_w = f"{max(2 * err_w, floor) if not math.isnan(err_w) else floor:.1e}"
        rtol = "0"

    # ---- tensors ----
    if c.llama:
        for k, v in p_store.items():
            tensors[f"weights_llama.{k}"] = v.contiguous()
    else:
        for k, v in p_store.items():
            tensors[f"weights.{k}"] = v.contiguous()
        for k, v in alt_layouts(c, p_store).items():
            tensors[k] = v.contiguous()
    tensors["query"] = query.contiguous()
    tensors["key"] = key.clone().contiguous()
    tensors["value"] = value.clone().contiguous()
    if kpm is not None:
        tensors["key_padding_mask"] = kpm.to(torch.uint8).contiguous()
    if mask is not None:
        tensors["attn_mask"] = to_store_mask(mask, dt).contiguous()

    meta = {
        "embed_dim": s(E), "num_heads": s(H), "kdim": s(c.kdim_), "vdim": s(c.vdim_),
        "bias": s(c.bias), "add_bias_kv": s(c.bias_kv), "add_zero_attn": s(c.zero_attn),
        "batch_first": s(c.batch_first), "unbatched": s(c.unbatched), "dtype": c.dtype,
        "causal": s(c.causal is not None), "is_causal_flag": s(c.causal == "square"),
        "attn_mask_kind": mask_kind,
        "key_padding_mask_kind": "none" if kpm is None else "bool_u8_1_means_ignore",
        "suggested_atol_output": atol_o, "suggested_atol_weights": atol_w, "suggested_rtol": rtol,
        "layout": "llama" if c.llama else "torch_mha",
        "description": c.desc,
        "self_attention_same_tensor": s(c.self_attn),
        "has_fully_masked_rows": s(any_full),
        "torch_own_max_abs_err_output": fmt_err(err_out),
        "torch_own_max_abs_err_weights": fmt_err(err_w),
        "seed": s(seed),
        "generator": "scripts/gen_fixtures.py",
        "torch_version": torch.__version__,
    }
    if c.llama:
        meta["num_kv_heads"] = s(c.Hkv)
        meta["head_dim"] = s(D)
        if c.scale is not None:
            meta["softmax_scale"] = repr(float(c.scale))

    # ---- gradient expectations ----
    if c.grad:
        assert c.dtype == "float32" and c.causal != "pair" and not any_full, c.name
        gout = randn(g, *tensors["expected.output"].shape).to(dt)
        is_causal = c.causal == "square"
        out64, g64 = torch_grads(c, p64, F64, query, key, value, kpm, mask, is_causal, gout)
        assert (out64 - tensors["expected.output"].to(F64)).abs().max() < 1e-6
        # the need_weights=True (explicit softmax) path must give the same gradients
        if not c.llama:
            _, g64w = torch_grads(c, p64, F64, query, key, value, kpm, mask, is_causal, gout,
                                  need_weights=True)
            for n in g64:
                assert grad_rel_err(g64w[n], g64[n], 1.0) < 1e-11, f"{c.name}: need_weights grad {n}"
        # independent float64 reference, differentiated through the same leaves' values
        pre = "weights_llama." if c.llama else "weights."
        named = {pre + n: t.detach().clone().requires_grad_(True) for n, t in p64.items()}
        Pl = ref_params(c, {n[len(pre):]: t for n, t in named.items()})
        mm = mask if (mask is None or mask.dtype == torch.bool) else mask.to(F64)
        _, gref = reference_grads(Pl, named, query.to(F64), key.to(F64), value.to(F64), c.self_attn, gout,
                                  H=H, Hkv=Hkv, D=D, scale=scale, batch_first=c.batch_first,
                                  unbatched=c.unbatched, kpm=kpm, attn_mask=mm)
        assert set(gref) == set(g64), (sorted(gref), sorted(g64))
        for n in g64:
            assert grad_rel_err(gref[n], g64[n], 1.0) < 1e-11, f"{c.name}: reference grad {n}"
        # torch's own float32 autograd vs the float64 expectation
        _, g32 = torch_grads(c, p_store, dt, query, key, value, kpm, mask, is_causal, gout)
        atol_g, rtol_g = 1e-5, 1e-4
        err_g = max(nan_max_abs(g32[n], g64[n]) for n in g64)
        # fraction of the tolerance used: max |d| / (atol + rtol |ref|) (must be <= 1)
        worst = max(float(((g32[n].to(F64) - g64[n]).abs() / (atol_g + rtol_g * g64[n].abs())).max())
                    for n in g64)
        gmax = max(float(t.abs().max()) for t in g64.values())
        GRAD_STATS.append((c.name, err_g, gmax, worst))
        for n in g64:
            assert_close(g32[n], g64[n], atol_g, rtol_g, f"{c.name}/expected_grad.{n} f32 vs f64")
        tensors["grad_output"] = gout.contiguous()
        for n, t in g64.items():
            tensors[f"expected_grad.{n}"] = t.to(store_dt).contiguous()
        meta["suggested_atol_grad"] = "1e-5"
        meta["suggested_rtol_grad"] = "1e-4"
        meta["torch_own_max_abs_err_grad"] = fmt_err(err_g)
    return tensors, meta


def save(tensors: dict, path: Path, metadata: dict) -> None:
    """save_file, then rewrite the JSON header with sorted keys: safetensors writes
    ``__metadata__`` in hash-map order, which would make reruns differ byte-wise."""
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    path.chmod(0o644)  # safetensors creates files 0600


# --------------------------------------------------------------------------------------
# weights/ files (toy and BERT-sized)
# --------------------------------------------------------------------------------------
def mha_expectations(sd64: dict, E: int, H: int, x: torch.Tensor, kpm: torch.Tensor) -> dict:
    """float64 nn.MultiheadAttention (batch_first) runs: padded (kpm) and causal (top-left)."""
    m = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64).eval()
    m.load_state_dict(sd64)
    x64 = x.to(F64)
    L = x.shape[1]
    causal = causal_bool(L, L, "top_left")
    out = {}
    with torch.no_grad():
        o, w = m(x64, x64, x64, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
        out["expected.padded.output"], out["expected.padded.weights"] = o, w
        o, w = m(x64, x64, x64, attn_mask=causal, is_causal=True, need_weights=True, average_attn_weights=False)
        out["expected.causal.output"], out["expected.causal.weights"] = o, w
    # cross-check with the independent reference
    P = {"Wq": sd64["in_proj_weight"][:E], "Wk": sd64["in_proj_weight"][E:2 * E],
         "Wv": sd64["in_proj_weight"][2 * E:], "Wo": sd64["out_proj.weight"],
         "bq": sd64["in_proj_bias"][:E], "bk": sd64["in_proj_bias"][E:2 * E],
         "bv": sd64["in_proj_bias"][2 * E:], "bo": sd64["out_proj.bias"]}
    kw = dict(H=H, Hkv=H, D=E // H, scale=(E // H) ** -0.5, batch_first=True, unbatched=False)
    ro, rw, _ = reference_attention(P, x64, x64, x64, kpm=kpm, **kw)
    assert (ro - out["expected.padded.output"]).abs().max() < 1e-10
    assert (rw - out["expected.padded.weights"]).abs().max() < 1e-12
    ro, rw, _ = reference_attention(P, x64, x64, x64, attn_mask=causal, **kw)
    assert (ro - out["expected.causal.output"]).abs().max() < 1e-10
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def gen_toy():
    g = torch.Generator().manual_seed(seed_of("toy_e8_h2"))
    E, H, B, L = 8, 2, 2, 5
    torch.manual_seed(seed_of("toy_e8_h2"))
    m = nn.MultiheadAttention(E, H, batch_first=True)  # default (xavier) init, seeded
    with torch.no_grad():
        m.in_proj_bias.copy_(randn(g, 3 * E, scale=0.1))
        m.out_proj.bias.copy_(randn(g, E, scale=0.1))
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in m.state_dict().items()}
    assert set(sd) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    x = randn(g, B, L, E).to(torch.float32)
    lengths = torch.tensor([5, 3], dtype=torch.int64)
    kpm = torch.arange(L)[None, :] >= lengths[:, None]
    exp = mha_expectations({k: v.to(F64) for k, v in sd.items()}, E, H, x, kpm)
    save(sd, WEIGHTS_DIR / "toy_e8_h2.safetensors",
              metadata={"format": "pt", "embed_dim": "8", "num_heads": "2", "batch_first": "true",
                        "layout": "torch_mha", "generator": "scripts/gen_fixtures.py"})
    t = {"input": x.contiguous(), "key_padding_mask": kpm.to(torch.uint8).contiguous(), "lengths": lengths, **exp}
    save(t, WEIGHTS_DIR / "toy_e8_h2.expected.safetensors",
              metadata={"embed_dim": "8", "num_heads": "2", "batch_first": "true",
                        "key_padding_mask_kind": "bool_u8_1_means_ignore",
                        "causal_alignment": "top_left", "reference_dtype": "float64",
                        "generator": "scripts/gen_fixtures.py", "torch_version": torch.__version__})


def gen_bert():
    g = torch.Generator().manual_seed(seed_of("bert_base_attention"))
    E, H, B, L = 768, 12, 2, 16
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    w = {}
    for n in names:
        w[f"{n}.weight"] = randn(g, E, E, scale=0.02).to(torch.float16).contiguous()
        w[f"{n}.bias"] = randn(g, E, scale=0.02).to(torch.float16).contiguous()
    x = randn(g, B, L, E).to(torch.float32)
    lengths = torch.tensor([16, 11], dtype=torch.int64)
    kpm = torch.arange(L)[None, :] >= lengths[:, None]
    sd64 = {
        "in_proj_weight": torch.cat([w[f"{n}.weight"] for n in names[:3]]).to(F64),
        "in_proj_bias": torch.cat([w[f"{n}.bias"] for n in names[:3]]).to(F64),
        "out_proj.weight": w["attention.output.dense.weight"].to(F64),
        "out_proj.bias": w["attention.output.dense.bias"].to(F64),
    }
    exp = mha_expectations(sd64, E, H, x, kpm)
    save(w, WEIGHTS_DIR / "bert_base_attention.safetensors",
              metadata={"format": "pt", "embed_dim": "768", "num_heads": "12", "dtype": "float16",
                        "layout": "bert", "generator": "scripts/gen_fixtures.py"})
    t = {"input": x.contiguous(), "key_padding_mask": kpm.to(torch.uint8).contiguous(), "lengths": lengths, **exp}
    save(t, WEIGHTS_DIR / "bert_base_attention.expected.safetensors",
              metadata={"embed_dim": "768", "num_heads": "12", "batch_first": "true",
                        "weights_dtype": "float16", "key_padding_mask_kind": "bool_u8_1_means_ignore",
                        "causal_alignment": "top_left", "reference_dtype": "float64",
                        "generator": "scripts/gen_fixtures.py", "torch_version": torch.__version__})


# --------------------------------------------------------------------------------------
# Self-check: read every case file back like a spec-following runner would
# --------------------------------------------------------------------------------------
LAYOUT_NAMES = {
    "weights_split": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "weights_bert": ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"),
    "weights_llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def params_from_file(t: dict, meta: dict, prefix: str) -> Optional[dict]:
    """float64 reference params built from one weight layout of a case file."""
    g = lambda n: t[f"{prefix}.{n}"].to(F64) if f"{prefix}.{n}" in t else None  # noqa: E731
    E = int(meta["embed_dim"])
    if prefix == "weights":
        if g("in_proj_weight") is not None:
            Wq, Wk, Wv = g("in_proj_weight").split(E)
        else:
            Wq, Wk, Wv = g("q_proj_weight"), g("k_proj_weight"), g("v_proj_weight")
        P = {"Wq": Wq, "Wk": Wk, "Wv": Wv, "Wo": g("out_proj.weight")}
        if g("in_proj_bias") is not None:
            P["bq"], P["bk"], P["bv"] = g("in_proj_bias").split(E)
            P["bo"] = g("out_proj.bias")
    elif prefix == "weights_gpt2":
        if g("c_attn.weight") is None:
            return None
        Wq, Wk, Wv = g("c_attn.weight").T.split(E)
        P = {"Wq": Wq, "Wk": Wk, "Wv": Wv, "Wo": g("c_proj.weight").T}
        if g("c_attn.bias") is not None:
            P["bq"], P["bk"], P["bv"] = g("c_attn.bias").split(E)
            P["bo"] = g("c_proj.bias")
    else:
        nq, nk, nv, no = LAYOUT_NAMES[prefix]
        if g(f"{nq}.weight") is None:
            return None
        P = {"Wq": g(f"{nq}.weight"), "Wk": g(f"{nk}.weight"), "Wv": g(f"{nv}.weight"), "Wo": g(f"{no}.weight")}
        if g(f"{nq}.bias") is not None:
            P.update(bq=g(f"{nq}.bias"), bk=g(f"{nk}.bias"), bv=g(f"{nv}.bias"), bo=g(f"{no}.bias"))
    if g("bias_k") is not None:
        P["bias_k"], P["bias_v"] = g("bias_k").view(1, 1, E), g("bias_v").view(1, 1, E)
    elif meta["add_bias_kv"] == "true":
        raise AssertionError(f"{prefix}: add_bias_kv but no bias_k")
    P["zero_attn"] = meta["add_zero_attn"] == "true"
    return P


def verify_case_file(path: Path) -> int:
    """Recompute every expectation in a case file with the float64 reference, from each weight
    layout present. Returns the number of comparisons made; raises on mismatch."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    E, H = int(meta["embed_dim"]), int(meta["num_heads"])
    llama = meta.get("layout") == "llama"
    Hkv = int(meta["num_kv_heads"]) if llama else H
    D = int(meta["head_dim"]) if llama else E // H
    scale = float(meta["softmax_scale"]) if "softmax_scale" in meta else D ** -0.5
    kpm = t["key_padding_mask"].bool() if "key_padding_mask" in t else None
    am = t.get("attn_mask")
    if am is not None:
        am = am.bool() if meta["attn_mask_kind"] == "bool_u8_1_means_masked" else am.to(F64)
    q, k, v = t["query"].to(F64), t["key"].to(F64), t["value"].to(F64)
    unb, bf = meta["unbatched"] == "true", meta["batch_first"] == "true"
    L = q.shape[0] if (unb or not bf) else q.shape[1]
    S = k.shape[0] if (unb or not bf) else k.shape[1]
    prefixes = [p for p in ("weights", "weights_split", "weights_bert", "weights_gpt2", "weights_llama")
                if any(key.startswith(p + ".") for key in t)]
    assert prefixes, "no weights"
    exps = {"expected": am}
    if "expected_top_left.output" in t:
        exps["expected_top_left"] = causal_bool(L, S, "top_left")
        exps["expected_bottom_right"] = causal_bool(L, S, "bottom_right")
    tol = 1e-9 if meta["dtype"] == "float64" else 2e-6
    n = 0
    for wp in prefixes:
        P = params_from_file(t, meta, wp)
        if P is None:
            continue
        for ep, m in exps.items():
            for sanitize in (False, True):
                name = f"{ep}_sanitized" if sanitize else ep
                if f"{name}.output" not in t:
                    continue
                out, w, _ = reference_attention(P, q, k, v, H=H, Hkv=Hkv, D=D, scale=scale, batch_first=bf,
                                                unbatched=unb, kpm=kpm, attn_mask=m, sanitize=sanitize)
                got = {"output": out, "weights": w, "weights_avg": w.mean(-3)}
                for kind, ref in got.items():
                    if f"{name}.{kind}" not in t:
                        continue
                    exp = t[f"{name}.{kind}"]
                    if not sanitize and kind == "output":
                        # torch's SDPA path may already give finite rows where the reference has NaN
                        fin = ~torch.isnan(ref)
                        assert torch.isnan(exp[fin]).sum() == 0
                        err = float((exp[fin].to(F64) - ref[fin]).abs().max()) if fin.any() else 0.0
                    else:
                        err = nan_max_abs(exp, ref)
                    assert err < tol, f"{path.name}: {wp} {name}.{kind} err {err:.3e}"
                    n += 1
    n += verify_grads(path.name, t, meta, q, k, v, H=H, Hkv=Hkv, D=D, scale=scale, batch_first=bf,
                      unbatched=unb, kpm=kpm, attn_mask=am)
    return n


def verify_grads(fname: str, t: dict, meta: dict, q, k, v, **kw) -> int:
    """Re-derive every ``expected_grad.*`` of a case file from the file alone: float64 autograd
    of sum(reference_attention(...) * grad_output) w.r.t. the weights of the spec layout
    (``weights.*``; ``weights_llama.*`` for layout=llama) and the inputs (one shared leaf when
    self_attention_same_tensor=true). Checks the set of gradient tensors is complete."""
    gkeys = {key for key in t if key.startswith("expected_grad.")}
    if "grad_output" not in t:
        assert not gkeys, f"{fname}: expected_grad.* without grad_output"
        return 0
    same = meta["self_attention_same_tensor"] == "true"
    if same:
        assert torch.equal(t["key"], t["query"]) and torch.equal(t["value"], t["query"]), fname
    prefix = "weights_llama" if meta.get("layout") == "llama" else "weights"
    named = {key: t[key].to(F64).detach().clone().requires_grad_(True) for key in t
             if key.startswith(prefix + ".")}
    P = params_from_file({**t, **named}, meta, prefix)
    gout = t["grad_output"]
    assert gout.shape == t["expected.output"].shape and gout.dtype == t["query"].dtype, fname
    _, gref = reference_grads(P, named, q, k, v, same, gout, **kw)
    want = {f"expected_grad.{n}" for n in gref}
    assert gkeys == want, f"{fname}: grad tensors {sorted(gkeys)} != {sorted(want)}"
    tol = 1e-9 if meta["dtype"] == "float64" else 1e-6
    for n, ref in gref.items():
        exp = t[f"expected_grad.{n}"]
        assert exp.shape == ref.shape, (fname, n, exp.shape, ref.shape)
        e = grad_rel_err(exp, ref, 1.0)  # |err| / (1 + |ref|)
        assert e < tol, f"{fname}: expected_grad.{n} err {e:.3e}"
    return len(gref)


# --------------------------------------------------------------------------------------
def main():
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
    torch.backends.mha.set_fastpath_enabled(False)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    CASES_DIR.mkdir(parents=True, exist_ok=True)
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    for f in CASES_DIR.glob("*.safetensors"):
        if not f.name.startswith(("sdpa_", "varlen_")):  # scripts/gen_core_cases.py writes those
            f.unlink()

    rows = []
    for c in _cases():
        tensors, meta = build_case(c)
        path = CASES_DIR / f"{c.name}.safetensors"
        save(tensors, path, meta)
        rows.append((c.name, path.stat().st_size, c.dtype, meta["suggested_atol_output"],
                     meta["suggested_atol_weights"], meta["torch_own_max_abs_err_output"],
                     meta["torch_own_max_abs_err_weights"], meta["has_fully_masked_rows"]))
    gen_toy()
    gen_bert()
    n_checks = sum(verify_case_file(CASES_DIR / f"{r[0]}.safetensors") for r in rows)

    print(f"{'case':48s} {'bytes':>8s} {'dtype':9s} {'atol_o':>8s} {'atol_w':>8s} {'err_o':>10s} {'err_w':>10s} full")
    for r in rows:
        print(f"{r[0]:48s} {r[1]:8d} {r[2]:9s} {r[3]:>8s} {r[4]:>8s} {r[5]:>10s} {r[6]:>10s} {r[7]}")
    total = sum(r[1] for r in rows)
    print(f"\n{len(rows)} cases, tests/cases total {total} bytes ({total / 1e6:.2f} MB)")
    for f in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        print(f"{str(f.relative_to(ROOT)):48s} {f.stat().st_size:9d} bytes")
    print(f"self-check: {n_checks} expectation tensors re-derived from the files (every weight layout, "
          f"gradients included)")
    if GRAD_STATS:
        print(f"\n{'gradient case':48s} {'f32-vs-f64 max abs':>18s} {'max |grad|':>10s} {'tol used (1e-5/1e-4)':>20s}")
        for name, e, gm, w in GRAD_STATS:
            print(f"{name:48s} {e:18.3e} {gm:10.3e} {w:20.3e}")
    if NOTES:
        print("\nPyTorch behaviour notes:")
        for n in NOTES:
            print("  " + n)


if __name__ == "__main__":
    sys.exit(main())
