//! The instruction set the fused kernel computes with, chosen at run time (the best the CPU
//! has, or one forced by the crate's tests), and the tile products dispatched on it: AVX-512 and
//! AVX2 + FMA register-blocked micro-kernels, or the `gemm` crate (portable: any CPU, e.g.
//! aarch64, where `gemm` itself uses NEON).

use std::sync::atomic::{AtomicU8, Ordering};

use super::mat::{HalfMat, Mat, MatMut};
use super::portable::{self, matmul};

/// An instruction set of the fused CPU kernel's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F micro-kernels (16 lanes).
    Avx512,
    /// AVX2 + FMA micro-kernels (8 lanes).
    Avx2,
    /// The `gemm` crate.
    Portable,
}

impl Isa {
    /// Short name (`"avx512"`, `"avx2"`, `"portable"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Avx512 => 1,
            Isa::Avx2 => 2,
            Isa::Portable => 3,
        }
    }

    fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// 0: the best available; else a forced [`Isa`] code.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// The instruction sets this CPU can run, best first.
pub fn available() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.supported())
        .collect()
}

/// The instruction set calls use now.
pub fn current() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Avx512,
        2 => Isa::Avx2,
        3 => Isa::Portable,
        _ => available()[0],
    }
}

/// Forces `isa` for every following call (process-wide; `None`: the best available). Errors
/// when the CPU lacks it.
pub fn force(isa: Option<Isa>) -> Result<(), String> {
    match isa {
        None => FORCED.store(0, Ordering::Relaxed),
        Some(i) if i.supported() => FORCED.store(i.code(), Ordering::Relaxed),
        Some(i) => return Err(format!("this CPU cannot run the {} kernels", i.name())),
    }
    Ok(())
}

/// `out = scale · a · kt` for `a` (`nr × d`, any row stride) and a transposed key tile `kt`
/// (`d × bk`). `out` rows must hold `round_up(bk, 16)` columns (the AVX-512 kernel stores whole
/// vectors).
pub(super) fn qk_t(isa: Isa, a: Mat, kt: Mat, out: MatMut, scale: f32) {
    let (nr, bk) = (a.rows, kt.cols);
    assert!(kt.rows == a.cols && out.rows == nr && out.cols == bk);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let padded = bk.div_ceil(16) * 16;
            assert!(
                nr == 0
                    || (out.stride >= padded && out.data.len() >= (nr - 1) * out.stride + padded)
            );
            // SAFETY: `isa` is only ever a supported one (see `force`); rows of `out` hold the
            // padded columns (asserted).
            unsafe { super::avx512::qk(a, kt, out, scale) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: as above; only the `bk` columns are written.
            unsafe { super::avx2::qk(a, kt, out, scale) }
        }
        _ => matmul(
            (nr, bk, a.cols),
            out.data,
            out.stride,
            false,
            (a.data, a.stride, 1),
            (kt.data, kt.stride, 1),
            scale,
        ),
    }
}

/// `out = scale · q · kᵀ` for a few query rows against key rows read in place (`k` is
/// `bk × d`, any row stride): dot products (decode-like items, no transposed K).
pub(super) fn qk_rows(isa: Isa, q: Mat, k: Mat, out: MatMut, scale: f32) {
    let (nr, bk) = (q.rows, k.rows);
    assert!(k.cols == q.cols && out.rows == nr && out.cols == bk);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a supported one (see `force`); every access is inside the
        // checked matrices (masked loads past `d` touch nothing).
        Isa::Avx512 => unsafe { super::avx512::qk_rows(q, k, out, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::avx2::qk_rows(q, k, out, scale) },
        _ => portable::qk(q, k, out, scale),
    }
}

/// Whether `isa` reads bf16 (`bf16`) or f16 operands of `cols` columns in place
/// ([`qk_rows_half`], [`pv_half`]): AVX-512 both, on multiples of 16 columns; AVX2 bf16, on
/// multiples of 8. Elsewhere half tiles are converted to f32 first.
pub(super) fn reads_half(isa: Isa, bf16: bool, cols: usize) -> bool {
    match isa {
        Isa::Avx512 => cols.is_multiple_of(16),
        Isa::Avx2 => bf16 && cols.is_multiple_of(8),
        Isa::Portable => false,
    }
}

/// [`qk_rows`] with bf16/f16 key rows read in place; only where [`reads_half`] says so.
pub(super) fn qk_rows_half(isa: Isa, q: Mat, k: HalfMat, out: MatMut, scale: f32) {
    assert!(
        reads_half(isa, k.bf16, k.cols)
            && k.cols == q.cols
            && out.rows == q.rows
            && out.cols == k.rows
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a supported one (see `force`); every access is inside the
        // checked matrices (whole vectors of 16 columns).
        Isa::Avx512 => unsafe { super::avx512::qk_rows_half(q, k, out, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX2 takes bf16 only, asserted by `reads_half`).
        Isa::Avx2 => unsafe { super::avx2::qk_rows_bf16(q, k, out, scale) },
        _ => {
            let _ = (q, k, out, scale);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// [`pv`] with bf16/f16 rows of `v` read in place; only where [`reads_half`] says so.
pub(super) fn pv_half(isa: Isa, p: Mat, v: HalfMat, acc: MatMut) {
    assert!(
        reads_half(isa, v.bf16, v.cols)
            && v.rows == p.cols
            && acc.rows == p.rows
            && acc.cols == v.cols
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { super::avx512::pv_half(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::avx2::pv_bf16(p, v, acc) },
        _ => {
            let _ = (p, v, acc);
            unreachable!("reads_half is false for {isa:?}")
        }
    }
}

/// `acc += p · v`.
pub(super) fn pv(isa: Isa, p: Mat, v: Mat, acc: MatMut) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a supported one (see `force`).
        Isa::Avx512 => unsafe { super::avx512::pv(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::avx2::pv(p, v, acc) },
        _ => portable::pv(p, v, acc),
    }
}

/// `acc += pᵀ · v` for `p` stored `k × m`.
pub(super) fn pv_t(isa: Isa, p: Mat, v: Mat, acc: MatMut) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only ever a supported one (see `force`).
        Isa::Avx512 => unsafe { super::avx512::pv_t(p, v, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::avx2::pv_t(p, v, acc) },
        _ => {
            let (m, k, n) = (p.cols, p.rows, v.cols);
            assert!(v.rows == k && acc.rows == m && acc.cols == n);
            matmul(
                (m, n, k),
                acc.data,
                acc.stride,
                true,
                (p.data, 1, p.stride),
                (v.data, v.stride, 1),
                1.0,
            )
        }
    }
}
