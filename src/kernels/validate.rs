//! The one check of an attention call's `q`, `k`, `v` (ranks, matching batch, sequence, heads
//! and head sizes, KV heads dividing the query heads, one float dtype, one device), shared by
//! every entry point ([`super::attention`], [`crate::sdpa::sdpa`],
//! [`crate::sdpa::sdpa_varlen`]; the module's pipeline reaches it through
//! [`super::attention`]). Each error names the entry point, the tensors and their shapes, as
//! PyTorch's do.

use candle_core::{bail, Result, Tensor};

/// How an entry point lays out `q`, `k` and `v`: what its messages say and where each dim is.
pub(crate) struct QkvLayout<'a> {
    /// The entry point, the prefix of every message (`"sdpa"`).
    pub caller: &'a str,
    /// The rank every tensor must have.
    pub rank: usize,
    /// That shape in words, e.g. `"4-D (B, heads, seq, head_dim)"`.
    pub shape: &'a str,
    /// The axis of the batch, `None` for one unbatched sequence.
    pub batch: Option<usize>,
    /// The axis of the sequence (queries in `q`, keys in `k` and `v`).
    pub seq: usize,
    /// The axis of the heads.
    pub heads: usize,
    /// The axis of the head size.
    pub dim: usize,
    /// How the tensors were read, said when the heads do not divide (sdpa's layouts: a
    /// `(B, L, H, D)` tensor read as `(B, H, L, D)` has its heads and sequence swapped).
    pub read_as: Option<&'a str>,
}

/// [`super::attention`]'s layout: `(B, seq, heads, head_dim)`.
pub(super) const ATTENTION: QkvLayout<'static> = QkvLayout {
    caller: "attention",
    rank: 4,
    shape: "4-D (B, seq, heads, head_dim)",
    batch: Some(0),
    seq: 1,
    heads: 2,
    dim: 3,
    read_as: None,
};

/// The shapes of a call's `q`, `k`, `v`, as the kernels name them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QkvDims {
    /// Batch size (1 when unbatched).
    pub b: usize,
    /// Query length.
    pub l: usize,
    /// Query heads.
    pub h: usize,
    /// Head size of `q` and `k`.
    pub d: usize,
    /// Key length.
    pub s: usize,
    /// KV heads.
    pub hkv: usize,
    /// Head size of `v`.
    pub dv: usize,
}

/// Checks `q`, `k`, `v` laid out as `layout` says (in this order: ranks; batch sizes; `k` and
/// `v` with the same sequence length and heads; `q` and `k` with the same head size; KV heads
/// dividing the query heads; one dtype, a float one; one device) and returns their dims.
pub(crate) fn qkv(layout: &QkvLayout, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<QkvDims> {
    let who = layout.caller;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        rank(layout, name, t)?;
    }
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let batch = |x: &[usize]| layout.batch.map_or(1, |a| x[a]);
    if batch(kd) != batch(qd) || batch(vd) != batch(qd) {
        bail!("{who}: batch sizes differ: q {qd:?}, k {kd:?}, v {vd:?}")
    }
    let (seq, heads, dim) = (layout.seq, layout.heads, layout.dim);
    if vd[seq] != kd[seq] || vd[heads] != kd[heads] {
        bail!("{who}: k {kd:?} and v {vd:?} must have the same sequence length and heads")
    }
    if kd[dim] != qd[dim] {
        bail!("{who}: q {qd:?} and k {kd:?} must have the same head_dim")
    }
    let (h, hkv) = (qd[heads], kd[heads]);
    if hkv == 0 || !h.is_multiple_of(hkv) {
        let read_as = layout
            .read_as
            .map_or(String::new(), |r| format!(", read as {r}"));
        bail!(
            "{who}: the number of KV heads ({hkv}) must divide the number of query heads ({h}): q {qd:?}, k {kd:?}{read_as}"
        )
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "{who}: q, k and v must have the same dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !q.dtype().is_float() {
        bail!("{who}: expected float inputs, got {:?}", q.dtype())
    }
    for (name, t) in [("k", k), ("v", v)] {
        if !t.device().same_device(q.device()) {
            bail!(
                "{who}: {name} is on {:?} but q is on {:?}",
                t.device(),
                q.device()
            )
        }
    }
    Ok(QkvDims {
        b: batch(qd),
        l: qd[seq],
        h,
        d: qd[dim],
        s: kd[seq],
        hkv,
        dv: vd[dim],
    })
}

/// Whether `t` (named `name`) has the rank of `layout`; else the error saying the shape.
fn rank(layout: &QkvLayout, name: &str, t: &Tensor) -> Result<()> {
    if t.rank() != layout.rank {
        bail!(
            "{}: {name} must be {}, got shape {:?}",
            layout.caller,
            layout.shape,
            t.dims()
        )
    }
    Ok(())
}

/// The dims of `t` (named `name`) in [`ATTENTION`]'s layout, for the entry points over caches
/// that check the rest of their shapes against the cache (`gathered.rs`).
pub(super) fn dims4(name: &str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    rank(&ATTENTION, name, t)?;
    t.dims4()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{qkv, QkvLayout};

    /// An unbatched `(heads, seq, head_dim)` layout reads each dim from its axis, and each
    /// failed check names the caller, the tensors and their shapes.
    #[test]
    fn dims_and_messages() {
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let layout = QkvLayout {
            caller: "demo",
            rank: 3,
            shape: "3-D (heads, seq, head_dim)",
            batch: None,
            seq: 1,
            heads: 0,
            dim: 2,
            read_as: Some("(H, L, D)"),
        };
        let d = qkv(&layout, &t(&[4, 5, 8]), &t(&[2, 7, 8]), &t(&[2, 7, 6])).unwrap();
        assert_eq!(
            (d.b, d.l, d.h, d.d, d.s, d.hkv, d.dv),
            (1, 5, 4, 8, 7, 2, 6)
        );
        let err = |q: &[usize], k: &[usize], v: &[usize]| {
            let e = qkv(&layout, &t(q), &t(k), &t(v)).unwrap_err().to_string();
            // The message's first line (a backtrace may follow).
            e.lines().next().unwrap_or_default().to_string()
        };
        let e = err(&[4, 5], &[2, 7, 8], &[2, 7, 8]);
        assert!(
            e.starts_with("demo: q must be 3-D") && e.contains("[4, 5]"),
            "{e}"
        );
        let e = err(&[4, 5, 8], &[2, 7, 8], &[2, 6, 8]);
        assert!(e.contains("k [2, 7, 8] and v [2, 6, 8]"), "{e}");
        let e = err(&[4, 5, 8], &[2, 7, 6], &[2, 7, 8]);
        assert!(e.contains("head_dim") && e.contains("[2, 7, 6]"), "{e}");
        let e = err(&[4, 5, 8], &[3, 7, 8], &[3, 7, 8]);
        assert!(
            e.contains("KV heads (3)") && e.contains("query heads (4)") && e.ends_with("(H, L, D)"),
            "{e}"
        );
        let f16 = t(&[2, 7, 8]).to_dtype(DType::F16).unwrap();
        let e = qkv(&layout, &t(&[4, 5, 8]), &f16, &f16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype") && e.contains("F16"), "{e}");
    }
}
