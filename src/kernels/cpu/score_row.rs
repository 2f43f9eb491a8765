//! The scores of one row of a tile before the softmax: ALiBi, then the masks (the row's
//! structured range, the dense key padding, the attention bias); soft-capping runs over the
//! whole tile before these (`Mods::cap`).

use super::tile::Ctx;

/// Additive bias, broadcast over B/H/L by zero strides; the key dim is contiguous.
#[derive(Clone, Copy)]
pub(super) struct Bias<'a> {
    pub data: &'a [f32],
    pub sb: usize,
    pub sh: usize,
    pub sl: usize,
}

impl Ctx<'_> {
    /// ALiBi, then (with `masked`) the masks ([`Ctx::mask_row`]), on the scores `row` of keys
    /// `j0..j0 + row.len()` for folded row `fr` of KV head `kh` in batch `bi`, whose structured
    /// range is `range`. Soft-capping comes first, over the whole tile
    /// ([`super::modifiers::Mods::cap`]). Returns `false` (row untouched) when no key of the tile
    /// is visible.
    pub fn score_row(
        &self,
        (bi, kh, fr): (usize, usize, usize),
        (range, masked): ((usize, usize), bool),
        j0: usize,
        row: &mut [f32],
    ) -> bool {
        let j1 = j0 + row.len();
        let (lo, hi) = if masked {
            (range.0.clamp(j0, j1), range.1.clamp(j0, j1))
        } else {
            (j0, j1)
        };
        if lo >= hi {
            return false;
        }
        // ALiBi over the visible keys (the masks overwrite the others) among the first
        // `kv_len` (appended keys are at distance 0).
        if self.mods.has_alibi() && j0 < self.real_s {
            let (hh, i) = (kh * self.g + fr / self.l, fr % self.l);
            let vis = &mut row[lo - j0..hi - j0];
            self.mods
                .alibi(self.paths.isa, self.plan, (bi, hh, i), lo, vis);
        }
        !masked || self.mask_row(bi, kh, fr, range, j0, row)
    }

    /// Masks the scores `row` of keys `j0..j0 + row.len()` (all among the first `real_s`) for
    /// folded row `fr` of KV head `kh`, whose structured range is `range`: `-inf` outside it,
    /// the dense key padding and attention bias added inside. Returns `false` (row untouched)
    /// when no key of the tile is visible.
    fn mask_row(
        &self,
        bi: usize,
        kh: usize,
        fr: usize,
        range: (usize, usize),
        j0: usize,
        row: &mut [f32],
    ) -> bool {
        let j1 = j0 + row.len();
        let (lo, hi) = (range.0.clamp(j0, j1), range.1.clamp(j0, j1));
        if lo >= hi {
            return false;
        }
        row[..lo - j0].fill(f32::NEG_INFINITY);
        row[hi - j0..].fill(f32::NEG_INFINITY);
        let vis = &mut row[lo - j0..hi - j0];
        if let Some(p) = self.key_bias {
            add_assign(vis, &p[bi * self.real_s + lo..bi * self.real_s + hi]);
        }
        if let Some(bias) = self.bias {
            let (hh, i) = (kh * self.g + fr / self.l, fr % self.l);
            let base = bi * bias.sb + hh * bias.sh + i * bias.sl;
            add_assign(vis, &bias.data[base + lo..base + hi]);
        }
        true
    }
}

fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}
