//! The instruction set the fused kernel computes with, chosen at run time (the best the CPU
//! has, or one forced by the crate's tests), and the tile products dispatched on it: AVX-512 and
//! AVX2 + FMA register-blocked micro-kernels, or the `gemm` crate (portable: any CPU, e.g.
//! aarch64, where `gemm` itself uses NEON).

use crate::isa_select::{self, Selection};

use super::mat::{ByteMat, HalfMat, Mat, MatMut, PairMat, PanelMat};
use super::portable::{self, matmul};
#[cfg(target_arch = "x86_64")]
use super::quant::QRows;

/// Proof that the CPU runs an instruction set: made only in this module, from run-time
/// detection ([`available`], [`current`]), so that the SIMD dispatch below can trust any [`Isa`]
/// it is given (no other code can name an AVX-512 or AVX2 [`Isa`] the CPU lacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected(());

/// An instruction set of the fused CPU kernel's products; the SIMD ones carry the proof that
/// the CPU runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86 detects the SIMD sets
pub enum Isa {
    /// [`Isa::Avx512`], and for bf16 inputs AVX512-BF16 dot products (`vdpbf16ps`: two bf16
    /// products per f32 lane) in the tile products where they are faster than widening to f32
    /// (measured once per process, see `dots_bf16`).
    Avx512Bf16(Detected),
    /// AVX-512F micro-kernels (16 lanes).
    Avx512(Detected),
    /// AVX2 + FMA micro-kernels (8 lanes).
    Avx2(Detected),
    /// The `gemm` crate.
    Portable,
}

impl Isa {
    /// Short name (`"avx512bf16"`, `"avx512"`, `"avx2"`, `"portable"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16(_) => "avx512bf16",
            Isa::Avx512(_) => "avx512",
            Isa::Avx2(_) => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this is one of the AVX-512 sets (16-lane micro-kernels).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // x86-only int16 products
    pub fn avx512(self) -> bool {
        matches!(self, Isa::Avx512(_) | Isa::Avx512Bf16(_))
    }
}

/// The instruction set with code `code`, when this CPU runs it (see [`crate::isa_select`]).
fn detect(code: u8) -> Option<Isa> {
    if !isa_select::runs(code) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The only place a `Detected` proof is made: `runs` checked the CPU's features.
        let proof = Detected(());
        match code {
            isa_select::AVX512BF16 => return Some(Isa::Avx512Bf16(proof)),
            isa_select::AVX512 => return Some(Isa::Avx512(proof)),
            isa_select::AVX2 => return Some(Isa::Avx2(proof)),
            _ => {}
        }
    }
    Some(Isa::Portable)
}

/// The attention kernel's selection (the projections keep their own).
static SELECTION: Selection = Selection::new();

/// The instruction sets this CPU can run, best first.
pub fn available() -> Vec<Isa> {
    isa_select::NAMES
        .iter()
        .filter_map(|&(_, c)| detect(c))
        .collect()
}

/// The instruction set calls use now.
pub fn current() -> Isa {
    detect(SELECTION.code()).unwrap_or(Isa::Portable)
}

/// Forces the instruction set named `name` for every following call of the fused kernel
/// (process-wide; `None`: the best available; the projections' GEMMs keep their own,
/// `crate::gemm::isa`). Errors when the name is unknown or the CPU lacks it.
pub fn force(name: Option<&str>) -> Result<(), String> {
    SELECTION.force(name)
}

/// Whether `nr` rows `stride` apart in `len` elements each hold `round_up(bk, 16)` columns: the
/// AVX-512 score kernels store (and their epilogues read) whole vectors.
fn holds_vectors(nr: usize, bk: usize, stride: usize, len: usize) -> bool {
    let padded = bk.div_ceil(16) * 16;
    nr == 0 || (stride >= padded && len >= (nr - 1) * stride + padded)
}

/// `out = scale · a · kt` for `a` (`nr × d`, any row stride) and a transposed key tile `kt`
/// (`d × bk`). `out` rows must hold `round_up(bk, 16)` columns (the AVX-512 kernel stores whole
/// vectors).
pub(super) fn qk_t(isa: Isa, a: Mat, kt: Mat, mut out: MatMut, scale: f32) {
    let (nr, bk) = (a.rows(), kt.cols());
    assert!(kt.rows() == a.cols() && out.rows() == nr && out.cols() == bk);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => {
            assert!(holds_vectors(nr, bk, out.stride(), out.data().len()));
            // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); rows of `out` hold the
            // padded columns (asserted).
            unsafe { super::avx512::qk(a, kt, out, scale) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(_) => {
            // SAFETY: as above; only the `bk` columns are written.
            unsafe { super::avx2::qk(a, kt, out, scale) }
        }
        _ => {
            let st = out.stride();
            matmul(
                (nr, bk, a.cols()),
                out.data(),
                st,
                false,
                (a.data(), a.stride(), 1),
                (kt.data(), kt.stride(), 1),
                scale,
            )
        }
    }
}

/// The backward's probabilities in one pass: `out[r][c] = exp(min(0, (scale · a · kt)[r][c] −
/// lse[r]))` (`softmax::exp_sub` of the scores) for `a` (`nr × d`) and a transposed key tile
/// `kt` (`d × bk`), rows that see every key of the tile. As in [`qk_t`], `out` rows must hold
/// `round_up(bk, 16)` columns.
pub(super) fn qk_t_exp(isa: Isa, (a, kt): (Mat, Mat), lse: &[f32], mut out: MatMut, scale: f32) {
    let (nr, bk) = (a.rows(), kt.cols());
    assert!(kt.rows() == a.cols() && out.rows() == nr && out.cols() == bk && lse.len() >= nr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => {
            assert!(holds_vectors(nr, bk, out.stride(), out.data().len()));
            // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); rows of `out`
            // hold the padded columns, and `lse` the rows (asserted).
            unsafe { super::avx512::qk_exp(a, kt, lse, out, scale) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; only the `bk` columns are written.
        Isa::Avx2(_) => unsafe { super::avx2::qk_exp(a, kt, lse, out, scale) },
        _ => {
            qk_t(isa, a, kt, out.reborrow(), scale);
            let st = out.stride();
            let o = out.data();
            for (r, &m) in lse[..nr].iter().enumerate() {
                super::softmax::exp_sub(isa, &mut o[r * st..r * st + bk], m);
            }
        }
    }
}

/// The backward's `dS` from `dP = g · vt` in one pass: `out[r][c] = (scale · p[r][c]) ·
/// (dP[r][c] − delta[r])` for `g` (`nr × dv`), a transposed value tile `vt` (`dv × bk`), the
/// probabilities `p` (`nr × bk`, `out`'s row stride) and the rows' `delta`. As in [`qk_t`],
/// `out` and `p` rows must hold `round_up(bk, 16)` columns.
pub(super) fn qk_t_grad(
    isa: Isa,
    (g, vt): (Mat, Mat),
    (p, delta): (Mat, &[f32]),
    mut out: MatMut,
    scale: f32,
) {
    let (nr, bk) = (g.rows(), vt.cols());
    assert!(vt.rows() == g.cols() && out.rows() == nr && out.cols() == bk);
    assert!(p.rows() == nr && p.cols() == bk && p.stride() == out.stride() && delta.len() >= nr);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => {
            let holds = |m: &Mat| holds_vectors(nr, bk, m.stride(), m.data().len());
            assert!(holds(&p) && holds_vectors(nr, bk, out.stride(), out.data().len()));
            // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); rows of `out`
            // and `p` hold the padded columns, and `delta` the rows (asserted).
            unsafe { super::avx512::qk_grad(g, vt, p, delta, out, scale) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; only the `bk` columns are read and written.
        Isa::Avx2(_) => unsafe { super::avx2::qk_grad(g, vt, p, delta, out, scale) },
        _ => {
            qk_t(isa, g, vt, out.reborrow(), 1.0);
            let st = out.stride();
            let o = out.data();
            for (r, &dl) in delta[..nr].iter().enumerate() {
                let (o, pr) = (&mut o[r * st..r * st + bk], &p.data()[r * st..r * st + bk]);
                o.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &pp)| *x = scale * pp * (*x - dl));
            }
        }
    }
}

/// `out = scale · q · kᵀ` for a few query rows against key rows read in place (`k` is
/// `bk × d`, any row stride): dot products (decode-like items, no transposed K).
pub(super) fn qk_rows(isa: Isa, q: Mat, k: Mat, out: MatMut, scale: f32) {
    let (nr, bk) = (q.rows(), k.rows());
    assert!(k.cols() == q.cols() && out.rows() == nr && out.cols() == bk);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); every access is inside the
        // checked matrices (masked loads past `d` touch nothing).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { super::avx512::qk_rows(q, k, out, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2(_) => unsafe { super::avx2_rows::qk_rows(q, k, out, scale) },
        _ => portable::qk(q, k, out, scale),
    }
}

/// Whether `isa` reads bf16 or f16 operands of `cols` columns in place
/// ([`qk_rows_half`], [`pv_half`]): AVX-512 on multiples of 16 columns, AVX2 on multiples of
/// 8. Elsewhere half tiles are converted to f32 first.
pub(super) fn reads_half(isa: Isa, cols: usize) -> bool {
    match isa {
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => cols.is_multiple_of(16),
        Isa::Avx2(_) => cols.is_multiple_of(8),
        Isa::Portable => false,
    }
}

/// [`qk_rows`] with bf16/f16 key rows read in place; only where [`reads_half`] says so.
pub(super) fn qk_rows_half(isa: Isa, q: Mat, k: HalfMat, out: MatMut, scale: f32) {
    assert!(
        reads_half(isa, k.cols())
            && k.cols() == q.cols()
            && out.rows() == q.rows()
            && out.cols() == k.rows()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); every access is inside the
        // checked matrices (whole vectors of 16 columns).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe {
            super::avx512::qk_rows_half(q, k, out, scale)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (multiples of 8 columns, asserted by `reads_half`).
        Isa::Avx2(_) => unsafe { super::avx2_rows::qk_rows_half(q, k, out, scale) },
        _ => {
            let _ = (q, k, out, scale);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// [`pv`] with bf16/f16 rows of `v` read in place; only where [`reads_half`] says so.
pub(super) fn pv_half(isa: Isa, p: Mat, v: HalfMat, acc: MatMut) {
    assert!(
        reads_half(isa, v.cols())
            && v.rows() == p.cols()
            && acc.rows() == p.rows()
            && acc.cols() == v.cols()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { super::avx512::pv_half(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2(_) => unsafe { super::avx2::pv_half(p, v, acc) },
        _ => {
            let _ = (p, v, acc);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// `acc += p · v` with `v` stored as panels of 16 columns (`panels.rs`), on AVX2 (the
/// instruction set that copies V into panels, [`panels_for`]).
pub(super) fn pv_panel(isa: Isa, p: Mat, v: PanelMat, acc: MatMut) {
    assert!(
        panels_for(isa) && v.rows() == p.cols() && acc.rows() == p.rows() && acc.cols() == v.cols()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); every access is
        // inside the checked matrices (whole vectors of a panel, padding included).
        Isa::Avx2(_) => unsafe { super::avx2::pv_panel(p, v, acc) },
        _ => {
            let _ = (p, v, acc);
            unreachable!("panels_for is false for {isa:?}")
        }
    }
}

/// Whether `isa`'s `P · V` reads V as panels (`panels.rs`) when a call copies V: AVX2, whose
/// tiles of 6 rows × 16 columns walk a tile's keys once per row block (measured on AMD Zen 3:
/// 58% → 70% of the FMA peak against contiguous rows). AVX-512 reads the rows (94% of its
/// peak in place on AMD Zen 4).
pub(super) fn panels_for(isa: Isa) -> bool {
    matches!(isa, Isa::Avx2(_))
}

/// [`qk_rows`] with int8 key rows (offset by 128) read in place, before their scales (the
/// caller multiplies column `j` of `out` by row `j`'s); only where [`reads_half`] says so.
pub(super) fn qk_rows_bytes(isa: Isa, q: Mat, k: ByteMat, out: MatMut, scale: f32) {
    assert!(
        reads_half(isa, k.cols())
            && k.cols() == q.cols()
            && out.rows() == q.rows()
            && out.cols() == k.rows()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); every access is inside the
        // checked matrices (whole vectors of 16 columns).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe {
            super::avx512::qk_rows_bytes(q, k, out, scale)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (multiples of 8 columns, asserted by `reads_half`).
        Isa::Avx2(_) => unsafe { super::avx2_rows::qk_rows_bytes(q, k, out, scale) },
        _ => {
            let _ = (q, k, out, scale);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// `out[r][j] = scale · q.scale[r] · kscale[j] · Σ_x q.vals[r][x] · (k[j][x] − 128)`: int8 key
/// rows (offset by 128, scales `kscale`) read in place against int16 query rows, each product
/// an exact integer (see [`super::quant`]). Only where [`int16`] says so.
#[cfg(target_arch = "x86_64")]
pub(super) fn qk_rows_q16(
    isa: Isa,
    q: QRows,
    (k, kscale): (ByteMat, &[f32]),
    out: MatMut,
    scale: f32,
) {
    assert!(
        int16(isa)
            && reads_half(isa, q.cols)
            && !k.is_fp8()
            && kscale.len() >= k.rows()
            && k.cols() == q.cols
            && q.cols <= super::MAX_HEAD_DIM
            && q.vals.len() >= q.rows * q.cols
            && q.scale.len() >= q.rows
            && q.corr.len() >= q.rows
            && out.rows() == q.rows
            && out.cols() == k.rows()
    );
    // SAFETY: `int16` proves AVX-512 F/BW/VL/VNNI, or AVX2 and FMA (`Detected`); the keys are
    // int8, the head size at most 256 and read whole (`reads_half`), the shapes agree (asserted
    // above; every matrix is checked against its slice on construction).
    unsafe {
        if isa.avx512() {
            super::avx512_vnni::qk_rows_q16(q, k, kscale, out, scale)
        } else {
            super::avx2_q16::qk_rows_q16(q, k, kscale, out, scale)
        }
    }
}

/// `acc += (p · vscale) · (v − 128)` for int8 value rows (offset by 128, scales `vscale`, one
/// per key: a column of `p`) read in place, as exact integer products of `p · vscale` quantized
/// to int16 per row (see `avx512_vnni::pv_q16`). Only where [`int16`] says so, `v.cols` a
/// multiple of 32 up to `MAX_HEAD_DIM`, at most `BLOCK_K` keys and `BLOCK_Q` rows. `false`
/// (nothing done): a row of `p · vscale` is not finite.
#[cfg(target_arch = "x86_64")]
pub(super) fn pv_q16(isa: Isa, p: Mat, (v, vscale): (ByteMat, &[f32]), acc: MatMut) -> bool {
    assert!(
        int16(isa)
            && !v.is_fp8()
            && vscale.len() >= v.rows()
            && v.cols().is_multiple_of(32)
            && v.cols() <= super::MAX_HEAD_DIM
            && v.rows() == p.cols()
            && p.cols() <= super::BLOCK_K
            && p.rows() <= super::BLOCK_Q
            && acc.rows() == p.rows()
            && acc.cols() == v.cols()
    );
    // SAFETY: `int16` proves AVX-512 F/BW/VL/VNNI, or AVX2 and FMA (`Detected`); the values
    // are int8 and the shapes agree (asserted above; matrices checked on construction).
    unsafe {
        if isa.avx512() {
            super::avx512_vnni::pv_q16(p, v, vscale, acc)
        } else {
            super::avx2_q16::pv_q16(p, v, vscale, acc)
        }
    }
}

/// Whether `isa` has the exact int16 × int8 products ([`qk_rows_q16`], [`pv_q16`]): AVX-512 with
/// VNNI (`vpdpwssd`), AVX2 (`vpmaddwd` + `vpaddd`); AVX-512 without VNNI widens (not measured).
#[cfg(target_arch = "x86_64")]
pub(super) fn int16(isa: Isa) -> bool {
    match isa {
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => super::avx512_vnni::detected(),
        Isa::Avx2(_) => true,
        Isa::Portable => false,
    }
}

/// Whether the CPU has AVX-512 F/BW and VBMI (byte permutations: the fp8 → bf16 table lookups of
/// [`fp8_to_pairs`]), detected once.
#[cfg(target_arch = "x86_64")]
pub(super) fn vbmi() -> bool {
    static VBMI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VBMI.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    })
}

/// The fp8 e4m3 rows of `k` (their scales not applied) widened to bf16, exactly, into `out` as
/// pairs (`k.rows × k.cols / 2`, rows contiguous): the operand of [`qk_rows_pairs`] through
/// [`HalfMat::from_pairs`]. Only where [`vbmi`].
#[cfg(target_arch = "x86_64")]
pub(super) fn fp8_to_pairs(k: ByteMat, out: &mut [u32]) {
    assert!(
        vbmi() && k.is_fp8() && k.cols().is_multiple_of(2) && out.len() >= k.rows() * k.cols() / 2
    );
    // SAFETY: the CPU has AVX-512 F/BW/VBMI (`vbmi`); the rows are fp8 with even columns and
    // `out` holds them (asserted above; `k` is checked against its slice on construction).
    unsafe { super::fp8_vbmi::to_bf16(k, out) }
}

/// [`pv`] with int8 rows of `v` (offset by 128) read in place, their scales folded into `p` by
/// the caller; only where [`reads_half`] says so.
pub(super) fn pv_bytes(isa: Isa, p: Mat, v: ByteMat, acc: MatMut) {
    assert!(
        reads_half(isa, v.cols())
            && v.rows() == p.cols()
            && acc.rows() == p.rows()
            && acc.cols() == v.cols()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`); every access is inside the
        // checked matrices (whole vectors of 16 columns).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { super::avx512::pv_bytes(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (multiples of 8 columns).
        Isa::Avx2(_) => unsafe { super::avx2::pv_bytes(p, v, acc) },
        _ => {
            let _ = (p, v, acc);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// `acc += p · v`.
pub(super) fn pv(isa: Isa, p: Mat, v: Mat, acc: MatMut) {
    // The micro-kernels index the operands by these shapes (each matrix is checked against
    // its slice on construction).
    assert!(v.rows() == p.cols() && acc.rows() == p.rows() && acc.cols() == v.cols());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { super::avx512::pv(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2(_) => unsafe { super::avx2::pv(p, v, acc) },
        _ => portable::pv(p, v, acc),
    }
}

/// `acc += pᵀ · v` for `p` stored `k × m`.
pub(super) fn pv_t(isa: Isa, p: Mat, v: Mat, mut acc: MatMut) {
    assert!(v.rows() == p.rows() && acc.rows() == p.cols() && acc.cols() == v.cols());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { super::avx512::pv_t(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2(_) => unsafe { super::avx2::pv_t(p, v, acc) },
        _ => {
            let (m, k, n) = (p.cols(), p.rows(), v.cols());
            let st = acc.stride();
            matmul(
                (m, n, k),
                acc.data(),
                st,
                true,
                (p.data(), 1, p.stride()),
                (v.data(), v.stride(), 1),
                1.0,
            )
        }
    }
}

/// Whether `isa` multiplies bf16 operands by AVX512-BF16 dot products ([`qk_pairs`],
/// [`to_pairs`], [`pv_pairs`]): on AVX512-BF16 when it was forced (tests, `--isa`), or when
/// the process's measured bf16 strategy ([`crate::gemm::bf16_strategy`]) prefers `vdpbf16ps`.
/// Where it is slower than widening to f32 FMAs (Intel family 6 model 207 issues it at a
/// quarter of the FMA rate), bf16 operands are widened in registers instead, as on
/// [`Isa::Avx512`].
pub(crate) fn dots_bf16(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512Bf16(_))
        && (SELECTION.forced(isa_select::AVX512BF16)
            || crate::gemm::bf16_strategy() == crate::gemm::Bf16Strategy::Dot)
}

/// `out = scale · q · kᵀ` from bf16 pairs: `q` (`nr × D/2`) and the keys' pairs transposed
/// (`kt`, `D/2 × bk`); only where [`dots_bf16`]. `out` rows must hold `round_up(bk, 16)`
/// columns.
pub(super) fn qk_pairs(isa: Isa, q: PairMat, kt: PairMat, mut out: MatMut, scale: f32) {
    let (nr, bk) = (q.rows(), kt.cols());
    assert!(dots_bf16(isa) && kt.rows() == q.cols() && out.rows() == nr && out.cols() == bk);
    assert!(holds_vectors(nr, bk, out.stride(), out.data().len()));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` carries the proof that the CPU runs it (`Detected`), and AVX512-BF16 (asserted);
    // rows of `out` hold the padded columns (asserted), the operands are checked matrices.
    unsafe {
        super::avx512_bf16::qk(q, kt, out, scale)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, kt, out, scale);
}

/// [`qk_rows`] with the query rows as bf16 pairs and bf16 key rows read in place (even `D`);
/// only where [`dots_bf16`].
pub(super) fn qk_rows_pairs(isa: Isa, q: PairMat, k: HalfMat, out: MatMut, scale: f32) {
    assert!(dots_bf16(isa) && k.is_bf16() && k.cols() == 2 * q.cols());
    assert!(out.rows() == q.rows() && out.cols() == k.rows());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `qk_pairs` (shapes asserted; `out` is written at `..bk` only).
    unsafe {
        super::avx512_bf16::qk_rows(q, k, out, scale)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, k, out, scale);
}

/// The rows of `p` rounded to bf16 pairs of consecutive columns into `out` (rows `stride`
/// apart); only where [`dots_bf16`].
pub(super) fn to_pairs(isa: Isa, p: Mat, out: &mut [u32], stride: usize) {
    assert!(dots_bf16(isa));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `qk_pairs`; `to_pairs` checks that `out` holds the rows.
    unsafe {
        super::avx512_bf16::to_pairs(p, out, stride)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, out, stride);
}

/// `acc += p · v` with `p` as bf16 pairs of keys (from [`to_pairs`]) and bf16 rows of `v` read
/// in place (`v.cols` a multiple of 32); only where [`dots_bf16`].
pub(super) fn pv_pairs(isa: Isa, p: PairMat, v: HalfMat, acc: MatMut) {
    assert!(dots_bf16(isa) && v.is_bf16() && v.cols().is_multiple_of(32));
    assert!(p.cols() == v.rows().div_ceil(2) && acc.rows() == p.rows() && acc.cols() == v.cols());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `qk_pairs` (shapes asserted).
    unsafe {
        super::avx512_bf16::pv(p, v, acc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, v, acc);
}

/// `acc += pᵀ · v` for `p` given as pairs of its rows (`pt`, from [`interleave_pairs`]) and the
/// bf16 rows of `v` read in place (`v.cols` a multiple of 32); only where [`dots_bf16`].
pub(super) fn pv_t_pairs(isa: Isa, pt: PairMat, v: HalfMat, acc: MatMut) {
    assert!(dots_bf16(isa) && v.is_bf16() && v.cols().is_multiple_of(32));
    assert!(pt.rows() == v.rows().div_ceil(2) && acc.rows() == pt.cols() && acc.cols() == v.cols());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `qk_pairs` (shapes asserted).
    unsafe {
        super::avx512_bf16::pv_t(pt, v, acc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (pt, v, acc);
}

/// Pairs of consecutive rows of `p` rounded to bf16 into `out` (rows `stride` apart), the
/// operand of [`pv_t_pairs`]; only where [`dots_bf16`].
pub(super) fn interleave_pairs(isa: Isa, p: Mat, out: &mut [u32], stride: usize) {
    assert!(dots_bf16(isa));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `qk_pairs`; `interleave` checks that `out` holds the rows.
    unsafe {
        super::avx512_bf16::interleave(p, out, stride)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, out, stride);
}
