//! Quantized key/value storage: one byte per value and one f32 scale per `(position, KV head)`
//! row.
//!
//! - int8: a row `x` of `D` values is stored as `q = round(x / s)` with `s = max|x| / 127`, `q`
//!   in `[-127, 127]`, kept in a `U8` tensor offset by 128 (candle has no `i8`), so that
//!   `x ≈ (q_u8 − 128) · s` with an error of at most `s / 2` per value (0.4% of the row's
//!   largest magnitude).
//! - fp8 e4m3 (OCP `e4m3fn`, candle's `F8E4M3`): `q = e4m3(x / s)` with `s = max|x| / 448` (the
//!   largest e4m3 value), rounded to nearest: a relative error of at most 2⁻⁴ per value (3 bits
//!   of mantissa), finer than int8 for small values, coarser for large ones.
//!
//! One scale per row rather than per head or per block of positions: a decode step's new row
//! is quantized alone, once, never re-quantized when later rows arrive, and never saturates
//! (no calibration); the scales cost 4 bytes per `D` values (3% at `D = 128`).

use candle_core::{DType, Result, Tensor};

/// The storage format of a [`KvCache`](super::KvCache)'s keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KvFormat {
    /// The projections' own dtype (f32, f16, bf16): exact.
    #[default]
    Native,
    /// Symmetric int8 with one f32 scale per `(position, KV head)`: 1 byte per value plus
    /// 4 bytes per row (`D = 128`: 0.52× of bf16). Quantized once when appended; the fused CPU
    /// kernel reads the int8 rows in place, other kernels read them dequantized. See the
    /// [module docs](super#quantized-storage) for the error.
    Int8,
    /// fp8 e4m3 (`e4m3fn`) with one f32 scale per `(position, KV head)` (the row's largest
    /// magnitude maps to 448): the same size as [`KvFormat::Int8`], a relative error of at
    /// most 2⁻⁴ per value instead of an absolute one.
    Fp8E4M3,
}

/// Quantized keys and values with their scales, as views into a cache's buffers: `k`, `v`
/// `(B, S, Hkv, D | Dv)`, `U8` (int8 + 128) or `F8E4M3`; `k_scale`, `v_scale` `(B, S, Hkv)` f32.
#[derive(Debug, Clone)]
pub(crate) struct QuantKv {
    pub k: Tensor,
    pub k_scale: Tensor,
    pub v: Tensor,
    pub v_scale: Tensor,
}

impl QuantKv {
    /// Keys and values dequantized to `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            dequantize(&self.k, &self.k_scale, dtype)?,
            dequantize(&self.v, &self.v_scale, dtype)?,
        ))
    }
}

/// `x` `(B, L, H, D)` quantized in `format` (int8 or fp8): the rows and their scales
/// `(B, L, H)` f32. A row of zeros gets scale 0.
pub(crate) fn quantize(x: &Tensor, format: KvFormat) -> Result<(Tensor, Tensor)> {
    match format {
        KvFormat::Fp8E4M3 => quantize_fp8(x),
        _ => quantize_int8(x),
    }
}

/// `x` `(B, L, H, D)` as fp8 e4m3 rows (each row's largest magnitude at 448) and their scales.
fn quantize_fp8(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let scale = (x.abs()?.max_keepdim(3)? / 448.0)?;
    let divisor = scale.maximum(f32::MIN_POSITIVE)?;
    let q = x
        .broadcast_div(&divisor)?
        .clamp(-448f32, 448f32)?
        .to_dtype(DType::F8E4M3)?;
    Ok((q, scale.squeeze(3)?))
}

/// The rows `q` (`U8` int8 + 128, or `F8E4M3`) times their scales, in `dtype`.
pub(crate) fn dequantize(q: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
    match q.dtype() {
        DType::F8E4M3 => q
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.unsqueeze(3)?)?
            .to_dtype(dtype),
        _ => dequantize_int8(q, scale, dtype),
    }
}

/// `x` `(B, L, H, D)` (any float dtype) as int8 rows offset by 128 (`U8`) and their scales
/// `(B, L, H)` f32. A row of zeros gets scale 0.
fn quantize_int8(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let scale = (x.abs()?.max_keepdim(3)? / 127.0)?;
    // A zero row divides by the smallest normal instead (its values are 0 whatever the scale).
    let divisor = scale.maximum(f32::MIN_POSITIVE)?;
    let q = ((x.broadcast_div(&divisor)?.round()?.clamp(-127f32, 127f32)? + 128.0)?)
        .to_dtype(DType::U8)?;
    Ok((q, scale.squeeze(3)?))
}

/// `(q − 128) · scale` in `dtype`, for `q` `(B, S, H, D)` `U8` and `scale` `(B, S, H)`.
fn dequantize_int8(q: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
    (q.to_dtype(DType::F32)? - 128.0)?
        .broadcast_mul(&scale.unsqueeze(3)?)?
        .to_dtype(dtype)
}
