"""candle-mha's fused CUDA attention, written in Triton and compiled ahead of time.

Three kernels, compiled by ``scripts/build_cuda_kernels.py`` into the PTX and cubins shipped in
``src/kernels/cuda/`` (``kernels.ptx.xz``, ``kernels.cubin.xz``) and launched from there (see its
module docs):

* ``attn_fwd``: flash attention (online softmax, f32 accumulation, output written once) over
  ``(B, L, H, D)`` queries and ``(B, S, Hkv, D)`` keys/values read in place through their
  strides. One program computes ``BLOCK_M`` query rows of one head of one sequence.
* ``attn_decode_split``: flash-decoding for few query rows and long key sequences. One program
  takes a chunk of the keys of one KV head and *all* the query rows of the heads that share it
  (GQA packing: the ``GROUP * L`` rows form the tile's M dimension), so K/V are read once; it
  writes unnormalised partial results.
* ``attn_decode_combine``: merges the partial results of every chunk into the output.

The semantics are those of the crate's reference kernel (``src/kernels/reference.rs``): scores
``scale * q.k``, soft-capped (``softcap`` = c > 0: ``c * tanh(s / c)``), minus the ALiBi term
(``has_alibi``: ``m * |i + S - L - j|``, one slope per query head and batch element or packed
sequence; ``i``, ``j``, ``L``, ``S`` the sequence's own), plus the bias; the keys a query row may
see are the intersection of its sequence (packed offsets), its batch element's key range (key
padding as a range), the causal band (top-left or bottom-right alignment, optional sliding
window); fully masked rows (no visible key, or every visible score ``-inf``) give 0, or NaN under
``nan_rows``. An attention sink (``has_sinks``: one logit per query head, a key with no value)
joins each row's softmax once the row is finished (in ``attn_decode_combine`` on the split path,
once per row): a row with no visible key then gives 0, whatever ``nan_rows`` says. Every mask and
score modifier is a runtime argument except whether a dense additive bias is read (``HAS_BIAS``,
a compile-time constant: the mask-free variant has no bias code at all).

The q, k, v and output pointers are assumed 16-byte aligned and their batch, row and head strides
divisible by 16 elements (the compile attributes: they let every q, k and v load be a 16-byte
vector); the Rust launcher checks both and falls back to the reference kernel otherwise. The
bias is read with scalar loads and assumes nothing.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tile_mask(offs_m, offs_n, lo, hi, diag, causal, window):
    """Which (row, key) pairs of a tile are visible by the structured masks.

    ``offs_m``: query rows relative to their sequence; ``offs_n``: keys relative to their
    sequence; keys ``lo..hi`` are in range; row ``i`` sees keys ``j <= i + diag`` when causal,
    and ``j > i + diag - window`` when a window is set (``window > 0``).
    """
    last = offs_m[:, None] + diag
    keep = (offs_n[None, :] >= lo) & (offs_n[None, :] < hi)
    keep = keep & ((causal == 0) | (offs_n[None, :] <= last))
    keep = keep & ((causal == 0) | (window <= 0) | (offs_n[None, :] > last - window))
    return keep


@triton.jit
def _kv_tile(k_base, v_base, keys, n_ok, offs_d, d_ok, stride_ks, stride_vs):
    """The key tile transposed, ``(BLOCK_D, BLOCK_N)``, and the value tile, ``(BLOCK_N, BLOCK_D)``,
    of rows ``keys`` (zeros where ``n_ok`` or ``d_ok`` is false)."""
    k = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None],
                mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _modified(qk, offs_m, offs_n, qk_scale, softcap, cap_in, cap_out, slope, shift):
    """The raw products ``q.k`` of a tile to scores in log2 units with the score modifiers,
    without a branch (a runtime branch on the products fails Triton's sm_90a pipeliner):
    scaled, soft-capped where ``softcap > 0`` (``c * tanh(s / c)`` as ``c - 2c / (exp(2s / c) +
    1)``, exact at both ends where ``exp2`` gives ``inf`` or 0; ``cap_in = 2 * scale * log2(e) /
    c``, ``cap_out = c * log2(e)``), minus ALiBi ``slope * |i + shift - j|`` (``slope`` in log2
    units, 0 for none: a scalar, or one per row as ``(BLOCK_M, 1)``; ``shift = S - L`` of the
    sequence)."""
    capped = cap_out - (2.0 * cap_out) / (tl.math.exp2(qk * cap_in) + 1.0)
    qk = tl.where(softcap > 0.0, capped, qk * qk_scale)
    row_at = (offs_m + shift).to(tl.float32)
    return qk - slope * tl.abs(row_at[:, None] - offs_n.to(tl.float32)[None, :])


@triton.jit
def _join_sink(m_i, l_i, sink):
    """The sink logit ``sink`` (log2 units; ``-inf``: none) joined to the finished rows' softmax:
    the new sum and the factor the accumulator takes (``exp2(m_old - m_new)``). A row with no
    visible key keeps ``l = exp2(0) = 1`` and an accumulator of zeros: output 0."""
    m_new = tl.maximum(m_i, sink)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    return l_i * alpha + tl.math.exp2(sink - m_use), alpha


@triton.jit
def _online_step(qk, keep, m_i, l_i, acc, v):
    """One online-softmax step: masks ``qk`` (already in log2 units), rescales the running
    row max ``m_i``, sum ``l_i`` and accumulator ``acc`` and adds ``p @ v``."""
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing visible yet keeps m = -inf; subtract 0 instead (exp2(-inf) = 0).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def attn_fwd(
    Q, K, V, O, Bias, KeyRange, CuQ, CuK, Alibi, Sinks,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_mb, stride_mh, stride_ml,
    L, S, GROUP, scale,
    causal, bottom_right, window, has_range,
    softcap, has_alibi, stride_ab, has_sinks,
    packed, nan_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MODIFIERS: tl.constexpr,
):
    """Grid ``(cdiv(max rows per sequence, BLOCK_M), sequences, H)``. Sequences are the batch
    elements, or the packed sequences of batch element 0 (``packed``: offsets ``CuQ``/``CuK``).
    ``KeyRange``: ``(B, 2)`` int32 visible key range per batch element (``has_range``).
    ``Alibi``: f32 slopes, row ``z * stride_ab`` (``z``: the batch element or packed sequence;
    ``stride_ab`` 0 for one row of slopes), column ``h``; ``Sinks``: ``(H,)`` f32 sink logits."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    h = tl.program_id(2)
    if packed != 0:
        q0 = tl.load(CuQ + z)
        lq = tl.load(CuQ + z + 1) - q0
        k0 = tl.load(CuK + z)
        lk = tl.load(CuK + z + 1) - k0
        bz = 0
    else:
        q0 = 0
        lq = L
        k0 = 0
        lk = S
        bz = z
    start_m = pid_m * BLOCK_M
    if start_m < lq:
        hk = h // GROUP
        bz64 = bz.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = (q0 + offs_m).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < lq
        q = tl.load(
            Q + bz64 * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # Keys this tile may see, relative to the sequence's first key.
        lo = 0
        hi = lk
        if has_range != 0:
            lo = tl.maximum(lo, tl.load(KeyRange + 2 * bz) - k0)
            hi = tl.minimum(hi, tl.load(KeyRange + 2 * bz + 1) - k0)
        diag = 0
        if bottom_right != 0:
            diag = lk - lq
        lo_t = lo
        hi_t = hi
        if causal != 0:
            hi_t = tl.minimum(hi_t, tl.minimum(start_m + BLOCK_M, lq) + diag)
            if window > 0:
                lo_t = tl.maximum(lo_t, start_m + diag + 1 - window)

        qk_scale = scale * LOG2E
        cap_in = 2.0 * qk_scale / tl.where(softcap > 0.0, softcap, 1.0)
        cap_out = softcap * LOG2E
        # ALiBi: the slope in log2 units (0: none); row i's distances are measured from
        # i + S - L (the sequence's own lengths).
        slope = 0.0
        if has_alibi != 0:
            slope = tl.load(Alibi + z * stride_ab + h) * LOG2E
        shift = lk - lq
        k_base = K + bz64 * stride_kb + hk * stride_kh
        v_base = V + bz64 * stride_vb + hk * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(lo_t, hi_t, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi_t
            keys = (k0 + offs_n).to(tl.int64)
            k, v = _kv_tile(k_base, v_base, keys, n_ok, offs_d, d_ok, stride_ks, stride_vs)
            qk = tl.dot(q, k)
            if HAS_MODIFIERS:
                qk = _modified(qk, offs_m, offs_n, qk_scale, softcap, cap_in, cap_out, slope, shift)
            else:
                qk = qk * qk_scale
            keep = _tile_mask(offs_m, offs_n, lo_t, hi_t, diag, causal, window)
            if HAS_BIAS:
                # Masked by rows and keys only (a key outside the causal band is read, then
                # dropped by `keep`): per-element predicates here cost registers that spilled.
                bias = tl.load(
                    Bias + bz64 * stride_mb + h * stride_mh + rows[:, None] * stride_ml + keys[None, :],
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                qk = qk + bias * LOG2E
            m_i, l_i, acc = _online_step(qk, keep, m_i, l_i, acc, v)

        sink = float("-inf")
        if has_sinks != 0:
            sink = tl.load(Sinks + h) * LOG2E
        l_i, alpha = _join_sink(m_i, l_i, sink)
        masked = l_i == 0.0
        out = acc * (alpha / tl.where(masked, 1.0, l_i))[:, None]
        fill = 0.0
        if nan_rows != 0:
            fill = float("nan")
        out = tl.where(masked[:, None], fill, out)
        tl.store(O + bz64 * stride_ob + h * stride_oh + rows[:, None] * stride_ol + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def attn_decode_split(
    Q, K, V, Bias, KeyRange, Alibi, PartO, PartM, PartL,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_mb, stride_mh, stride_ml,
    L, S, H, GROUP, scale,
    causal, bottom_right, window, has_range,
    softcap, has_alibi, stride_ab,
    has_bias, chunk, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(num_splits, B, Hkv)``; needs ``GROUP * L <= BLOCK_M``. Split ``s`` takes keys
    ``s * chunk .. (s + 1) * chunk`` for the ``GROUP * L`` query rows of KV head ``hk``: row ``r``
    is query head ``hk * GROUP + r // L``, position ``r % L``. Writes, per (b, h, i, split), the
    row max (log2 units) to ``PartM``, the sum of exponentials to ``PartL`` and the unnormalised
    ``p @ v`` to ``PartO`` (``(B, H, L, num_splits[, HEAD_DIM])``, f32). Soft-capping and ALiBi
    apply here (``Alibi`` row ``b * stride_ab``, column the row's query head); the sink joins
    in ``attn_decode_combine``, once per row."""
    split = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    b64 = b.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * L
    hq = hk * GROUP + r // L
    offs_m = r % L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + hq[:, None] * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    lo = 0
    hi = S
    if has_range != 0:
        lo = tl.maximum(lo, tl.load(KeyRange + 2 * b))
        hi = tl.minimum(hi, tl.load(KeyRange + 2 * b + 1))
    diag = 0
    if bottom_right != 0:
        diag = S - L
    lo_t = tl.maximum(lo, split * chunk)
    hi_t = tl.minimum(hi, split * chunk + chunk)
    if causal != 0:
        hi_t = tl.minimum(hi_t, L + diag)
        if window > 0:
            lo_t = tl.maximum(lo_t, diag + 1 - window)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * LOG2E
    cap_in = 2.0 * qk_scale / tl.where(softcap > 0.0, softcap, 1.0)
    cap_out = softcap * LOG2E
    slope = tl.zeros([BLOCK_M], tl.float32)
    if has_alibi != 0:
        slope = tl.load(Alibi + b * stride_ab + hq, mask=row_ok, other=0.0) * LOG2E
    shift = S - L
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    for start_n in range(lo_t, hi_t, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi_t
        keys = offs_n.to(tl.int64)
        k, v = _kv_tile(k_base, v_base, keys, n_ok, offs_d, d_ok, stride_ks, stride_vs)
        qk = tl.dot(q, k)
        if (softcap > 0.0) | (has_alibi != 0):
            qk = _modified(qk, offs_m, offs_n, qk_scale, softcap, cap_in, cap_out, slope[:, None],
                           shift)
        else:
            qk = qk * qk_scale
        keep = _tile_mask(offs_m, offs_n, lo_t, hi_t, diag, causal, window) & row_ok[:, None]
        if has_bias != 0:
            bias = tl.load(Bias + b64 * stride_mb + hq[:, None] * stride_mh
                           + offs_m[:, None].to(tl.int64) * stride_ml + keys[None, :],
                           mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            qk = qk + bias * LOG2E
        m_i, l_i, acc = _online_step(qk, keep, m_i, l_i, acc, v)

    part = ((b64 * H + hq) * L + offs_m) * num_splits + split
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)
    tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def attn_decode_combine(
    PartO, PartM, PartL, O, Sinks,
    stride_ob, stride_ol, stride_oh,
    L, H, num_splits, has_sinks, nan_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(L, H, B)``: merges the ``num_splits`` partial results of one output row, and joins
    the head's sink logit (``has_sinks``: ``Sinks``, ``(H,)`` f32) to the merged softmax, once."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    base = ((b.to(tl.int64) * H + h) * L + i) * num_splits
    sink = float("-inf")
    if has_sinks != 0:
        sink = tl.load(Sinks + h) * LOG2E
    m = sink
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(PartM + base + s))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    l = tl.math.exp2(sink - m_use)
    for s in range(0, num_splits):
        w = tl.math.exp2(tl.load(PartM + base + s) - m_use)
        l += w * tl.load(PartL + base + s)
        acc += w * tl.load(PartO + (base + s) * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
    masked = l == 0.0
    out = acc / tl.where(masked, 1.0, l)
    fill = 0.0
    if nan_rows != 0:
        fill = float("nan")
    out = tl.where(masked, fill, out)
    tl.store(O + b.to(tl.int64) * stride_ob + i.to(tl.int64) * stride_ol + h * stride_oh + offs_d,
             out.to(O.dtype.element_ty), mask=d_ok)
