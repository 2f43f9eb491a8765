//! Score modifiers: logit soft-capping (Gemma 2, Grok), ALiBi (BLOOM, MPT, Baichuan) and
//! attention sinks (gpt-oss, StreamingLLM), with the semantics of the `mha-case` format's
//! section "Score modifiers". For query row `i`, key `j`, `s_ij = scale · q_i · k_j`:
//!
//! 1. soft-capping with `c > 0`: `s_ij ← c · tanh(s_ij / c)`, before anything is added;
//! 2. ALiBi with slope `m` of the query head (of the batch element): `s_ij ← s_ij − m · |i + S −
//!    L − j|` (queries aligned to the end of the keys, as flash-attn; for packed sequences `L`,
//!    `S`, `i`, `j` are the sequence's own);
//! 3. then the masks, then the softmax with a sink: one extra logit `σ_h` per query head joined
//!    to every row's softmax as a key with no value, `p_ij = exp(s_ij) / (exp(σ_h) + Σ exp(s_ij'))`.
//!    A row whose keys are all masked keeps only the sink: its output is 0, whatever the
//!    fully-masked-row policy says.

use candle_core::{bail, DType, Device, Result, Tensor};

use super::MaskDims;

/// The score modifiers of a call (none by default).
#[derive(Clone, Debug, Default)]
pub(crate) struct ScoreMods {
    pub softcap: Option<f64>,
    /// `(B or 1, H)` slopes.
    pub alibi: Option<Tensor>,
    /// `(H,)` sink logits.
    pub sinks: Option<Tensor>,
}

impl ScoreMods {
    /// Whether any modifier is set.
    pub fn any(&self) -> bool {
        self.softcap.is_some() || self.alibi.is_some() || self.sinks.is_some()
    }

    /// The names of the modifiers set, for messages (`"softcap, alibi"`).
    pub fn names(&self) -> String {
        let mut v = vec![];
        if self.softcap.is_some() {
            v.push("softcap");
        }
        if self.alibi.is_some() {
            v.push("alibi");
        }
        if self.sinks.is_some() {
            v.push("sinks");
        }
        v.join(", ")
    }
}

/// A validated soft-cap `c`.
pub(crate) fn check_softcap(c: f64) -> Result<f64> {
    if !(c.is_finite() && c > 0.0) {
        bail!("softcap: expected a finite value > 0, got {c}")
    }
    Ok(c)
}

/// ALiBi slopes of shape `(H,)`, `(1, H)` or `(B, H)` as `(B or 1, H)`; for packed sequences
/// (`seqs` of them) `B` is the number of sequences.
pub(crate) fn check_alibi(slopes: &Tensor, dims: MaskDims, seqs: Option<usize>) -> Result<Tensor> {
    let (b, h) = (seqs.unwrap_or(dims.batch), dims.heads);
    let what = if seqs.is_some() {
        "(sequences, H)"
    } else {
        "(B, H)"
    };
    if !slopes.dtype().is_float() {
        bail!(
            "alibi_slopes: expected a float tensor of shape (H,) = ({h},) or {what} = ({b}, {h}), got {:?} {:?}",
            slopes.dtype(),
            slopes.dims()
        )
    }
    match *slopes.dims() {
        [hh] if hh == h => slopes.reshape((1, h)),
        [bb, hh] if hh == h && (bb == b || bb == 1) => Ok(slopes.clone()),
        _ => bail!(
            "alibi_slopes: expected shape (H,) = ({h},) or {what} = ({b}, {h}), got {:?}",
            slopes.dims()
        ),
    }
}

/// Sink logits of shape `(H,)`.
pub(crate) fn check_sinks(sinks: &Tensor, dims: MaskDims) -> Result<Tensor> {
    let h = dims.heads;
    if !sinks.dtype().is_float() || sinks.dims() != [h] {
        bail!(
            "sinks: expected a float tensor of shape (H,) = ({h},), got {:?} {:?}",
            sinks.dtype(),
            sinks.dims()
        )
    }
    Ok(sinks.clone())
}

/// The ALiBi distances `|i + off − j|` as `(1, 1, L, S)` in `dtype`, where `off` is `S − L`, or,
/// for packed sequences (`cu_q`, `cu_k`), the row's own sequence's `S_b − L_b` relative to its
/// own offsets (entries across sequences are masked anyway and get 0).
pub(crate) fn alibi_distances(
    (l, s): (usize, usize),
    packed: Option<(&[usize], &[usize])>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut v = vec![0f64; l * s];
    let mut row = |i: usize, off: i64, keys: std::ops::Range<usize>| {
        for j in keys {
            v[i * s + j] = (i as i64 + off - j as i64).unsigned_abs() as f64;
        }
    };
    match packed {
        None => (0..l).for_each(|i| row(i, s as i64 - l as i64, 0..s)),
        Some((cu_q, cu_k)) => {
            for (w_q, w_k) in cu_q.windows(2).zip(cu_k.windows(2)) {
                // i − cu_q[b] + (S_b − L_b) − (j − cu_k[b]) = i − j + cu_k[b+1] − cu_q[b+1].
                let off = w_k[1] as i64 - w_q[1] as i64;
                (w_q[0]..w_q[1]).for_each(|i| row(i, off, w_k[0]..w_k[1]));
            }
        }
    }
    Tensor::from_vec(v, (1, 1, l, s), device)?.to_dtype(dtype)
}
