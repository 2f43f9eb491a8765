//! The score modifiers in the fused kernel (see `crate::mask` for their semantics): soft-capping
//! and ALiBi applied to each score row before the masks, and the attention sink joined to each
//! row's softmax when the row is finished.
//!
//! - Soft-capping: `s ← c · tanh(s / c)` over the row's visible keys, vectorised
//!   ([`softmax::softcap`]); the backward multiplies `dS` by `1 − (s / c)²` from the capped
//!   scores it keeps.
//! - ALiBi: `s_ij ← s_ij − m · |i + S − L − j|` over the visible keys of the first `kv_len`
//!   (keys appended after them are at distance 0), with the row's own sequence's lengths for
//!   packed sequences. A constant per score: no gradient beyond the softmax's.
//! - Sinks: a row's online softmax runs over its keys as usual; when the row is finished the
//!   sink `σ_h` joins its running max and sum (`l ← l · e^{m − m'} + e^{σ − m'}`), so that the
//!   output and the saved log-sum-exp are the sink's. The same merge covers the flash-decoding
//!   split (the sink joins once, after the chunks). A row with no visible key keeps only the
//!   sink: output 0, log-sum-exp `σ_h`. The backward needs nothing more (`P = exp(S − lse)` with
//!   the sink's `lse`, and `Δ = dO · O` is unchanged because the sink has no value); the sinks'
//!   own gradient is `−Σ_i p_sink,i Δ_i`, which [`sink_path`] gives autograd.

use candle_core::{DType, Result, Tensor};

use super::products::Isa;
use super::softmax;
use super::AttnCall;
use crate::mask::MaskPlan;

/// The modifiers of one call, read once into plain numbers.
#[derive(Default)]
pub(super) struct Mods {
    /// The soft-cap `c`.
    pub softcap: Option<f32>,
    /// The `tanh` soft-capping computes: the precision the inputs' dtype needs.
    tanh: softmax::Tanh,
    /// ALiBi slopes, `(rows, H)` row-major: one row for all, or one per batch element (per
    /// sequence when packed).
    alibi: Option<(Vec<f32>, usize)>,
    /// Sink logits `(H,)`.
    sinks: Option<Vec<f32>>,
}

/// The f32 values of a small tensor (slopes, sinks), flattened.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Mods {
    /// The modifiers of `plan`, for inputs of `dtype`.
    pub fn new(plan: &MaskPlan, dtype: DType) -> Result<Self> {
        let alibi = match plan.alibi_slopes() {
            Some(t) => Some((values(t)?, t.dim(0)?)),
            None => None,
        };
        Ok(Self {
            softcap: plan.softcap().map(|c| c as f32),
            tanh: softmax::Tanh::for_dtype(dtype),
            alibi,
            sinks: plan.sinks().map(values).transpose()?,
        })
    }

    /// Whether the call has ALiBi slopes.
    pub fn has_alibi(&self) -> bool {
        self.alibi.is_some()
    }

    /// The sink logit of query head `hh`, when the call has sinks (a `-inf` sink is none).
    pub fn sink(&self, hh: usize) -> Option<f32> {
        self.sinks
            .as_ref()
            .map(|s| s[hh])
            .filter(|&x| x != f32::NEG_INFINITY)
    }

    /// Soft-caps the scores of `row` (all of them: masked keys are overwritten afterwards), when
    /// the call has a soft-cap; callers cap a whole tile at once (its set-up costs as much as a
    /// row of 64 scores).
    pub fn cap(&self, isa: Isa, row: &mut [f32]) {
        if let Some(c) = self.softcap {
            softmax::softcap(isa, row, c, self.tanh);
        }
    }

    /// Subtracts ALiBi's `m · |i + off − j|` from `row`, the scores of keys `j0..` of query `i`
    /// of head `hh` in batch `bi` (keys among the first `kv_len`), on `isa`'s vectors.
    pub fn alibi(
        &self,
        isa: Isa,
        plan: &MaskPlan,
        (bi, hh, i): (usize, usize, usize),
        j0: usize,
        row: &mut [f32],
    ) {
        let Some((slopes, rows)) = &self.alibi else {
            return;
        };
        let h = slopes.len() / rows;
        let (l, s) = (plan.dims().q_len as i64, plan.dims().kv_len as i64);
        let (slot, off) = match plan.packed_offsets() {
            None => (bi, s - l),
            Some((cu_q, cu_k)) => {
                // The row's sequence: the last whose first query is at or before i.
                let n = cu_q.partition_point(|&x| x <= i).saturating_sub(1);
                let n = n.min(cu_q.len().saturating_sub(2));
                (n, cu_k[n + 1] as i64 - cu_q[n + 1] as i64)
            }
        };
        let m = slopes[if *rows == 1 { hh } else { slot * h + hh }];
        if m == 0.0 {
            return;
        }
        // Distances are integers, exact in f32 below 2^24 (the vector paths count in f32).
        let centre = i as i64 + off - j0 as i64;
        const EXACT: i64 = 1 << 24;
        match i32::try_from(centre) {
            Ok(c) if centre.abs() < EXACT && (centre - row.len() as i64).abs() < EXACT => {
                softmax::alibi(isa, row, m, c)
            }
            _ => {
                for (k, x) in row.iter_mut().enumerate() {
                    *x -= m * (centre - k as i64).unsigned_abs() as f32;
                }
            }
        }
    }
}

/// Finishes a row's online softmax state `(m, l)` with the sink `σ`: the new `(m, l)` and the
/// factor by which the row's unnormalised output is rescaled. A row with no visible key
/// (`l == 0`) keeps only the sink.
pub(super) fn join_sink(m: f32, l: f32, sink: f32) -> (f32, f32, f32) {
    if l == 0.0 {
        return (sink, 1.0, 0.0);
    }
    let m2 = if sink > m { sink } else { m };
    let corr = (m - m2).exp();
    (m2, l * corr + (sink - m2).exp(), corr)
}

/// The sinks' own autograd path for a fused call `c` whose sinks autograd tracks (`None`
/// otherwise), from the saved log-sum-exp `(B, H, L)`: [`SinkPath::apply`] turns the output
/// `out` into `out + (out' ∘ w) ∘ (σ − σ')`, where `'` means detached and `w = −exp(σ_h − lse)`
/// (minus the sink's probability) per row. Its value is `out` exactly (the last factor is 0) and
/// its gradient with respect to `σ` is `−Σ p_sink Δ`, the sinks' gradient, while `q`, `k`, `v`
/// keep the fused backward's. Built before the log-sum-exp is handed to the backward (no copy).
pub(super) fn sink_path(c: &AttnCall, lse: &[f32]) -> Result<Option<SinkPath>> {
    let Some(sinks) = c.mask.sinks().filter(|s| s.track_op()) else {
        return Ok(None);
    };
    let (b, l, h) = (c.b, c.l, c.h);
    let sig = values(sinks)?;
    if sig.iter().any(|x| !x.is_finite()) {
        // σ − σ' would be NaN; an infinite sink has no useful gradient anyway.
        return Ok(None);
    }
    let mut w = vec![0f32; b * l * h];
    for bi in 0..b {
        for hh in 0..h {
            for i in 0..l {
                // Rows without sink or keys (lse −inf) and infinite sinks: no path.
                let p = (sig[hh] - lse[(bi * h + hh) * l + i]).exp();
                w[(bi * l + i) * h + hh] = if p.is_finite() { -p } else { 0.0 };
            }
        }
    }
    let dev = c.q.device();
    let w = Tensor::from_vec(w, (b, l, h, 1), dev)?;
    let zero = (sinks.to_dtype(DType::F32)? - sinks.detach().to_dtype(DType::F32)?)?;
    let zero = zero.to_device(dev)?.reshape((1, 1, h, 1))?;
    Ok(Some(SinkPath { w, zero }))
}

/// See [`sink_path`].
pub(super) struct SinkPath {
    /// `−p_sink` per row, `(B, L, H, 1)`.
    w: Tensor,
    /// `σ − σ'`, `(1, 1, H, 1)`: zero, with the sinks' gradient.
    zero: Tensor,
}

impl SinkPath {
    /// `out + (out' ∘ w) ∘ (σ − σ')`.
    pub fn apply(self, out: Tensor) -> Result<Tensor> {
        let path = out
            .detach()
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.w)?
            .broadcast_mul(&self.zero)?;
        let path = path.to_dtype(out.dtype())?;
        out + path
    }
}
