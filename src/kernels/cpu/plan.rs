//! The products of one call of the fused forward: which `Q · Kᵀ` and `P · V` products it runs,
//! on which instruction set, and the operand forms they read. Decided once per call, in one
//! place ([`super::inputs::product_plan`], which lists the rule), and matched once per tile by
//! `tile.rs`: no flag is decoded again in the hot loop.

use super::products::Isa;

/// How a call computes `scores = scale · Q · Kᵀ` for a tile, and the forms of its operands.
#[derive(Clone, Copy)]
pub(super) enum QkPath<'a> {
    /// f32 query rows against the call's transposed f32 copy of K (`(B, Hkv, D, S)`, rows
    /// [`super::kt::KeyTiles::stride`] apart): the register-blocked micro-kernel
    /// ([`super::products::qk_t`]).
    KtF32(&'a [f32]),
    /// The query rows as bf16 pairs against the call's transposed copy of K in bf16 pairs
    /// (`(B, Hkv, D/2, S)`): AVX512-BF16 dot products ([`super::products::qk_pairs`]).
    KtPairs(&'a [u32]),
    /// The query rows as bf16 pairs against bf16 key rows read in place: AVX512-BF16 dot
    /// products ([`super::products::qk_rows_pairs`]).
    RowsPairs,
    /// f32 query rows against bf16 / f16 key rows read in place, widened in registers
    /// ([`super::products::qk_rows_half`]).
    RowsHalf,
    /// The query rows quantized to int16 against int8 key rows read in place, as exact integer
    /// products on AVX512-VNNI or AVX2 ([`super::products::qk_rows_q16`], see [`super::quant`]); the
    /// keys' scales applied to the tile's columns after.
    #[cfg(target_arch = "x86_64")]
    RowsInt16,
    /// The query rows as bf16 pairs against fp8 e4m3 key rows widened to a bf16 tile (exactly,
    /// by table lookups on AVX512-VBMI: [`super::products::fp8_to_pairs`]), then AVX512-BF16 dot
    /// products as for a bf16 cache ([`super::products::qk_rows_pairs`]); the keys' scales
    /// applied to the tile's columns after. The same exact products as the widening path,
    /// summed in f32. (`P · V` keeps the widening path, [`PvPath::Bytes`]: rounding the
    /// scaled probabilities to bf16 for the dot products moved SmolLM2-135M's largest logit
    /// difference to the bf16 cache from 2.4 to 5.8 on one of the three test prompts.)
    #[cfg(target_arch = "x86_64")]
    Fp8Pairs,
    /// f32 query rows against quantized (int8 or fp8) key rows read in place, widened in
    /// registers ([`super::products::qk_rows_bytes`]); the keys' scales applied after.
    RowsBytes,
    /// f32 query rows against f32 key rows: read in place for f32 keys, else converted to an
    /// f32 tile first ([`super::products::qk_rows`]).
    RowsF32,
}

/// How a call computes `acc += P · V` for a tile, and the forms of its operands.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PvPath {
    /// The probabilities rounded to bf16 pairs, bf16 value rows read in place: AVX512-BF16 dot
    /// products ([`super::products::pv_pairs`]).
    Pairs,
    /// f32 probabilities, bf16 / f16 value rows read in place, widened in registers
    /// ([`super::products::pv_half`]).
    Half,
    /// The probabilities (scaled by the rows' scales) quantized to int16 per row against int8
    /// value rows read in place, as exact integer products on AVX512-VNNI or AVX2
    /// ([`super::products::pv_q16`]); a tile whose probabilities are not all finite falls back
    /// to [`PvPath::Bytes`] ([`super::quant::pv_quantized`]).
    #[cfg(target_arch = "x86_64")]
    Int16,
    /// The probabilities scaled by the rows' scales, quantized (int8 or fp8) value rows read in
    /// place, widened in registers ([`super::products::pv_bytes`]).
    Bytes,
    /// f32 probabilities, f32 value rows: read in place for f32 values, else converted to an
    /// f32 tile first ([`super::products::pv`]).
    F32,
}

/// The products of one call: the instruction set and the path of each product.
#[derive(Clone, Copy)]
pub(super) struct ProductPlan<'a> {
    /// The instruction set of the products, the softmax and the score modifiers.
    pub isa: Isa,
    /// How `Q · Kᵀ` is computed.
    pub qk: QkPath<'a>,
    /// How `P · V` is computed.
    pub pv: PvPath,
}

impl ProductPlan<'_> {
    /// Whether the query rows are gathered as bf16 pairs (the `Q · Kᵀ` dot products read them
    /// so) rather than as f32 rows.
    pub fn query_pairs(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.qk, QkPath::Fp8Pairs) {
            return true;
        }
        matches!(self.qk, QkPath::KtPairs(_) | QkPath::RowsPairs)
    }

    /// Whether K tiles are widened from fp8 to bf16 ([`QkPath::Fp8Pairs`]): the scratch then
    /// holds one.
    pub fn fp8_keys(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(self.qk, QkPath::Fp8Pairs);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether the gathered f32 query rows are also quantized to int16 ([`QkPath::RowsInt16`]).
    pub fn int16_queries(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(self.qk, QkPath::RowsInt16);
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether `Q · Kᵀ` reads the call's transposed copy of K rather than K's rows.
    pub fn transposed_k(&self) -> bool {
        matches!(self.qk, QkPath::KtF32(_) | QkPath::KtPairs(_))
    }
}
