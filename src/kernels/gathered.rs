//! Calls whose keys and values the fused CPU kernel reads where they are stored: a quantized
//! cache's int8 / fp8 rows ([`attention_quantized`]), a paged cache's blocks gathered by row
//! ([`attention_paged`]), or both ([`attention_quantized_rows`]). Calls it cannot serve get
//! the keys and values copied (gathered, dequantized) for [`attention`].

use candle_core::{bail, Result, Tensor};

use super::validate::dims4;
use super::{attention, cpu, missing_capability, AttnCall, AttnOutput, AttnParams, Kernel};
use crate::config::Backend;
use crate::mask::MaskPlan;

/// The fused CPU kernel's output for `call` when it serves it: shapes it takes (`shapes_ok`, the
/// caller's checks), [`Backend::Auto`] or [`Backend::CpuFused`], CPU tensors, nothing autograd
/// tracks, no capability it lacks (weights, dropout) and inputs it reads.
fn fused_cpu(call: &AttnCall, shapes_ok: bool) -> Option<Result<AttnOutput>> {
    let serves = shapes_ok
        && matches!(call.params.backend, Backend::Auto | Backend::CpuFused)
        && call.q.device().is_cpu()
        && !call.tracked()
        && missing_capability(&cpu::CpuFused, call).is_none()
        && cpu::CpuFused.unsupported_inputs(call).is_none();
    serves.then(|| {
        call.mask
            .check_dims("attention", call.b, call.h, call.l, call.s)?;
        cpu::CpuFused.forward(call)
    })
}

/// [`attention`] over the int8 keys and values of a quantized cache: read in place by the fused
/// CPU kernel when it can serve the call (CPU, [`Backend::Auto`] or [`Backend::CpuFused`], not
/// tracked by autograd, no weights or dropout), else dequantized to `q`'s dtype for
/// [`attention`].
pub(crate) fn attention_quantized(
    q: &Tensor,
    kv: &crate::cache::QuantKv,
    mask: &MaskPlan,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, l, h, d) = dims4("q", q)?;
    let (bk, s, hkv, dk) = dims4("k", &kv.k)?;
    let dv = kv.v.dim(3)?;
    let md = mask.dims();
    let shapes_ok = bk == b
        && dk == d
        && hkv > 0
        && h.is_multiple_of(hkv)
        && md.kv_len == s
        && kv.v.dims()[..3] == kv.k.dims()[..3]
        && b * h * l * dv > 0;
    let call = AttnCall {
        q,
        k: &kv.k,
        v: &kv.v,
        mask,
        params,
        b,
        l,
        h,
        hkv,
        s,
        d,
        dv,
        extra_keys: 0,
        kv_scales: Some((&kv.k_scale, &kv.v_scale)),
        key_rows: None,
    };
    let quant_ok = cpu::quant_rows(&kv.k, &kv.k_scale) && cpu::quant_rows(&kv.v, &kv.v_scale);
    if let Some(out) = fused_cpu(&call, shapes_ok && quant_ok) {
        return out;
    }
    let (k, v) = kv.dequantize(q.dtype())?;
    attention(q, &k, &v, mask, params)
}

/// [`attention`] over keys and values gathered by row: key `j` of batch element `b` is row
/// `rows[b·S + j]` of `k` `(1, R, Hkv, D)` and `v` `(1, R, Hkv, Dv)` (a paged KV cache's
/// blocks, viewed as rows), `S = rows.len() / B`. The fused CPU kernel reads the rows in place
/// when it can serve the call (CPU, not tracked by autograd, no weights or dropout,
/// [`Backend::Auto`] or [`Backend::CpuFused`]), cutting its key tiles where consecutive keys
/// stop being consecutive rows; other calls gather the rows first. `mask` is built for
/// `(B, H, L, S)`.
pub(crate) fn attention_paged(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    rows: &[u32],
    mask: &MaskPlan,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, l, h, d) = dims4("q", q)?;
    let (bk, r, hkv, dk) = dims4("k", k)?;
    let (bv, rv, hv, dv) = dims4("v", v)?;
    if (bk, bv) != (1, 1) || (rv, hv) != (r, hkv) || dk != d {
        bail!(
            "attention: paged k {:?} and v {:?} must be (1, R, Hkv, D) and (1, R, Hkv, Dv) for q {:?}",
            k.dims(),
            v.dims(),
            q.dims()
        )
    }
    let s = keys_per_element(rows, b, k)?;
    let call = AttnCall {
        q,
        k,
        v,
        mask,
        params,
        b,
        l,
        h,
        hkv,
        s,
        d,
        dv,
        extra_keys: 0,
        kv_scales: None,
        key_rows: Some(rows),
    };
    let shapes_ok = hkv > 0
        && h.is_multiple_of(hkv)
        && mask.dims().kv_len == s
        && l * h * dv * s > 0
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if let Some(out) = fused_cpu(&call, shapes_ok) {
        return out;
    }
    let ids = Tensor::from_slice(rows, b * s, k.device())?;
    let (k, v) = (take(k, &ids, b)?, take(v, &ids, b)?);
    attention(q, &k, &v, mask, params)
}

/// [`attention_quantized`] over rows gathered in place: key `j` of batch element `b` is row
/// `rows[b·S + j]` of the quantized pool `kv` (`(1, R, Hkv, D)` rows, `(1, R, Hkv)` scales).
/// The fused CPU kernel reads them where they are when it can serve the call; else the rows
/// (and their scales) are gathered and [`attention_quantized`] dequantizes them.
pub(crate) fn attention_quantized_rows(
    q: &Tensor,
    kv: &crate::cache::QuantKv,
    rows: &[u32],
    mask: &MaskPlan,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, l, h, d) = dims4("q", q)?;
    let (bk, _, hkv, dk) = dims4("k", &kv.k)?;
    let dv = kv.v.dim(3)?;
    if bk != 1 {
        bail!(
            "attention: paged k {:?} must be (1, R, Hkv, D)",
            kv.k.dims()
        )
    }
    let s = keys_per_element(rows, b, &kv.k)?;
    let shapes_ok = dk == d
        && hkv > 0
        && h.is_multiple_of(hkv)
        && mask.dims().kv_len == s
        && kv.v.dims()[..3] == kv.k.dims()[..3]
        && l * h * dv * s > 0;
    let call = AttnCall {
        q,
        k: &kv.k,
        v: &kv.v,
        mask,
        params,
        b,
        l,
        h,
        hkv,
        s,
        d,
        dv,
        extra_keys: 0,
        kv_scales: Some((&kv.k_scale, &kv.v_scale)),
        key_rows: Some(rows),
    };
    let quant_ok = cpu::quant_rows(&kv.k, &kv.k_scale) && cpu::quant_rows(&kv.v, &kv.v_scale);
    if let Some(out) = fused_cpu(&call, shapes_ok && quant_ok) {
        return out;
    }
    let ids = Tensor::from_slice(rows, b * s, kv.k.device())?;
    let gathered = crate::cache::QuantKv {
        k: take(&kv.k, &ids, b)?,
        k_scale: take(&kv.k_scale, &ids, b)?,
        v: take(&kv.v, &ids, b)?,
        v_scale: take(&kv.v_scale, &ids, b)?,
    };
    attention_quantized(q, &gathered, mask, params)
}

/// Keys per batch element of a call over `rows` (`B·S` row ids of `k`'s `R` rows), checking
/// that they split evenly over the `b` elements and that every id names a row of `k`.
fn keys_per_element(rows: &[u32], b: usize, k: &Tensor) -> Result<usize> {
    let r = k.dim(1)?;
    if b == 0 || !rows.len().is_multiple_of(b) {
        bail!(
            "attention: {} paged key rows for a batch of {b}",
            rows.len()
        )
    }
    if let Some(&bad) = rows.iter().find(|&&x| x as usize >= r) {
        bail!(
            "attention: paged key row {bad} is outside the {r} rows of k {:?}",
            k.dims()
        )
    }
    Ok(rows.len() / b)
}

/// Rows `ids` of `t` `(1, R, ...)`, copied out as `(b, ids.len() / b, ...)`.
fn take(t: &Tensor, ids: &Tensor, b: usize) -> Result<Tensor> {
    let mut shape = t.dims().to_vec();
    shape[0] = b;
    shape[1] = ids.dim(0)? / b;
    t.squeeze(0)?.index_select(ids, 0)?.reshape(shape)
}
