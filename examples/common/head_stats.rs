//! What one attention head does, measured: the statistics of its `(L, S)` weight matrix that
//! the attention explainers name (attends to the previous token, to `[CLS]` / BOS, to `[SEP]`,
//! to itself; broad or sharp; near or far). Shared by `examples/attention_map` and
//! `tests/attentions.rs` (each includes this file with `#[path]`).
//!
//! Every statistic is a mean over the query rows that attend to something (a row of zeros, a
//! fully masked query, is left out). Query `i` sits at key position `i + S - L` (the keys of a
//! KV cache come first), so for self-attention without a cache it is key `i`.
#![allow(dead_code)]

/// The statistics of one head (see [`head_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HeadStats {
    /// Attention entropy in **nats**, `-Σ_j p_ij ln p_ij`, mean over query rows: 0 when every
    /// query looks at one key, `ln S` when every query spreads evenly over all `S` keys.
    pub entropy: f64,
    /// Mean query–key distance `Σ_j p_ij |pos(i) - j|` in tokens, mean over query rows.
    pub distance: f64,
    /// Share of attention on the first key (`[CLS]` for BERT, the first token / BOS of a
    /// decoder): mean over query rows of `p_i0`.
    pub first: f64,
    /// Share on the separator keys (`[SEP]`): mean over query rows of `Σ_{j ∈ sep} p_ij`; 0 when
    /// the text has none.
    pub sep: f64,
    /// Share on the previous token, `p_{i, pos(i)-1}`, mean over the query rows that have one.
    pub previous: f64,
    /// Share on the query's own position, `p_{i, pos(i)}`.
    pub itself: f64,
}

/// The share above which [`HeadStats::pattern`] names a head by one kind of key.
pub const PATTERN_SHARE: f64 = 0.5;

impl HeadStats {
    /// A one-word name for the head's dominant pattern: `previous`, `first`, `[SEP]`, `self`
    /// when that share is over [`PATTERN_SHARE`] (the largest wins), else `broad` when the
    /// entropy is over 60% of `ln S` (close to uniform), else `mixed`.
    pub fn pattern(&self, keys: usize) -> &'static str {
        let named = [
            (self.previous, "previous"),
            (self.first, "first"),
            (self.sep, "[SEP]"),
            (self.itself, "self"),
        ];
        let (share, name) = named
            .into_iter()
            .fold((0.0, ""), |best, x| if x.0 > best.0 { x } else { best });
        if share > PATTERN_SHARE {
            name
        } else if keys > 1 && self.entropy > 0.6 * (keys as f64).ln() {
            "broad"
        } else {
            "mixed"
        }
    }
}

/// The statistics of one head's weights `w`, row-major `(l, s)` (query rows, key columns);
/// `sep` lists the key positions that are separators. Panics when `w.len() != l * s`.
pub fn head_stats(w: &[f32], l: usize, s: usize, sep: &[usize]) -> HeadStats {
    assert_eq!(w.len(), l * s, "weights are not {l} x {s}");
    let offset = s.saturating_sub(l);
    let (mut entropy, mut distance, mut first, mut sep_share, mut itself) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut previous, mut rows, mut rows_with_previous) = (0.0, 0usize, 0usize);
    for (i, row) in w.chunks_exact(s.max(1)).enumerate().take(l) {
        let total: f64 = row.iter().map(|&p| p as f64).sum();
        if total <= 0.0 {
            continue; // a fully masked query attends to nothing
        }
        rows += 1;
        let pos = i + offset;
        for (j, &p) in row.iter().enumerate() {
            let p = p as f64;
            if p > 0.0 {
                entropy -= p * p.ln();
            }
            distance += p * pos.abs_diff(j) as f64;
        }
        first += row[0] as f64;
        sep_share += sep
            .iter()
            .filter(|&&j| j < s)
            .map(|&j| row[j] as f64)
            .sum::<f64>();
        if pos < s {
            itself += row[pos] as f64;
        }
        if pos >= 1 && pos - 1 < s {
            previous += row[pos - 1] as f64;
            rows_with_previous += 1;
        }
    }
    let mean = |x: f64, n: usize| if n == 0 { 0.0 } else { x / n as f64 };
    HeadStats {
        entropy: mean(entropy, rows),
        distance: mean(distance, rows),
        first: mean(first, rows),
        sep: mean(sep_share, rows),
        previous: mean(previous, rows_with_previous),
        itself: mean(itself, rows),
    }
}
