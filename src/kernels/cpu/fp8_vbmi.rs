//! fp8 e4m3 rows widened to bf16 by table lookups (AVX512-VBMI), for the bf16 dot-product
//! kernels: an fp8 key tile becomes a bf16 tile in L1, exactly (e4m3 has 3 mantissa bits and
//! exponents well inside bf16's range, subnormals included), and the AVX512-BF16 `Q · Kᵀ` of a
//! bf16 cache runs on it against the bf16 query rows.
//!
//! The 7 magnitude bits of a byte index two 128-byte tables, the low and the high byte of the
//! bf16 (`vpermi2b` ignores the index's top bit: the sign), the sign is or-ed into the high
//! byte, and two more byte permutations interleave the halves into 32 bf16 words each: 5
//! instructions per 64 values (6.6 ns per row of 128 on an AMD Zen 4, where the byte
//! permutations are the cost). Widening to f32 in the products, as the f32 kernels do, takes 7
//! per 16, and then the f32 FMAs do half the work per instruction of `vdpbf16ps`.

use std::arch::x86_64::*;

use super::mat::ByteMat;

/// The bf16 bits of the e4m3 magnitude `m` (`0..128`, the sign bit clear), as
/// [`super::view::fp8_e4m3`] decodes it (`0x7f`, NaN in e4m3fn, decodes as 480: never stored).
pub(super) const fn bf16_bits(m: u8) -> u16 {
    let (e, f) = ((m >> 3) as u16 & 0xf, (m & 7) as u16);
    if e != 0 {
        // (1 + f/8) · 2^(e − 7): exponent field e − 7 + 127, mantissa f in the top 3 of 7 bits.
        return ((e + 120) << 7) | (f << 4);
    }
    if f == 0 {
        return 0;
    }
    // f · 2⁻⁹ with f < 8: normalised as (f / 2^hb) · 2^(hb − 9).
    let hb = 15 - f.leading_zeros() as u16;
    ((hb + 118) << 7) | ((f ^ (1 << hb)) << (7 - hb))
}

/// The low (`HIGH = false`) or high byte of [`bf16_bits`] for every magnitude.
const fn table<const HIGH: bool>() -> [u8; 128] {
    let mut t = [0u8; 128];
    let mut m = 0;
    while m < 128 {
        let bits = bf16_bits(m as u8);
        t[m] = if HIGH { (bits >> 8) as u8 } else { bits as u8 };
        m += 1;
    }
    t
}

static LOW: [u8; 128] = table::<false>();
static HIGH: [u8; 128] = table::<true>();

/// The byte indices that interleave the low bytes (`0..64`) and high bytes (`64..128`) of
/// values `FIRST..FIRST + 32` into little-endian bf16 words.
const fn interleave<const FIRST: u8>() -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        t[i] = (i / 2) as u8 + FIRST + if i % 2 == 1 { 64 } else { 0 };
        i += 1;
    }
    t
}

static WORDS_LOW: [u8; 64] = interleave::<0>();
static WORDS_HIGH: [u8; 64] = interleave::<32>();

/// The fp8 e4m3 rows of `k` (their scales not applied) as bf16 into `out`, row after row
/// (`k.cols` values per row, contiguous), as pairs of values per `u32` (low half first).
///
/// # Safety
/// avx512f, avx512bw and avx512vbmi must be available; `k` must be fp8 with an even number of
/// columns, and `out` must hold `k.rows · k.cols / 2` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub unsafe fn to_bf16(k: ByteMat, out: &mut [u32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (rows, cols) = (k.rows(), k.cols());
        debug_assert!(k.is_fp8() && cols.is_multiple_of(2) && out.len() >= rows * cols / 2);
        let load = |t: &[u8; 128], at: usize| _mm512_loadu_si512(t.as_ptr().add(at).cast());
        let (lo0, lo1, hi0, hi1) = (
            load(&LOW, 0),
            load(&LOW, 64),
            load(&HIGH, 0),
            load(&HIGH, 64),
        );
        let sign = _mm512_set1_epi8(0x80u8 as i8);
        let ia = _mm512_loadu_si512(WORDS_LOW.as_ptr().cast());
        let ib = _mm512_loadu_si512(WORDS_HIGH.as_ptr().cast());
        let dst = out.as_mut_ptr().cast::<u16>();
        // The mask of the first `n` of 32 words.
        let words = |n: usize| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
        for r in 0..rows {
            let src = k.data().as_ptr().add(r * k.stride());
            let row = dst.add(r * cols);
            let mut c = 0;
            while c < cols {
                let n = (cols - c).min(64);
                let m = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                let x = _mm512_maskz_loadu_epi8(m, src.add(c).cast());
                let lo = _mm512_permutex2var_epi8(lo0, x, lo1);
                // hi | (x & 0x80)
                let hi = _mm512_ternarylogic_epi32::<0xF8>(
                    _mm512_permutex2var_epi8(hi0, x, hi1),
                    x,
                    sign,
                );
                _mm512_mask_storeu_epi16(
                    row.add(c).cast(),
                    words(n),
                    _mm512_permutex2var_epi8(lo, ia, hi),
                );
                if n > 32 {
                    let w1 = _mm512_permutex2var_epi8(lo, ib, hi);
                    _mm512_mask_storeu_epi16(row.add(c + 32).cast(), words(n - 32), w1);
                }
                c += 64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::view::fp8_e4m3;

    /// Every byte: the table's bf16 (with the sign) is the reference decode, bit for bit.
    #[test]
    fn table_decodes_every_byte_exactly() {
        for x in 0..=255u8 {
            let bits = bf16_bits(x & 0x7f) | (u16::from(x & 0x80) << 8);
            let got = half::bf16::from_bits(bits).to_f32();
            assert_eq!(got.to_bits(), fp8_e4m3(x).to_bits(), "byte {x:#04x}");
            let split = u16::from(LOW[usize::from(x & 0x7f)])
                | (u16::from(HIGH[usize::from(x & 0x7f)]) << 8);
            assert_eq!(split, bits & 0x7fff, "byte {x:#04x}");
        }
    }

    /// The SIMD widening equals the reference on every byte value, for row lengths with and
    /// without a partial last block, rows in place at a stride.
    #[test]
    fn simd_rows_match_the_reference() {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi"))
        {
            eprintln!("skipped: no AVX512-VBMI on this CPU (the kernel is never selected here)");
            return;
        }
        for cols in [2, 30, 32, 64, 96, 128, 130, 256] {
            let (rows, stride) = (5, cols + 24);
            let data: Vec<u8> = (0..rows * stride).map(|i| (i * 37 + cols) as u8).collect();
            let k = ByteMat::new(&data, true, rows, cols, stride);
            let mut out = vec![0xdead_beefu32; rows * cols / 2 + 3];
            // SAFETY: the features were detected above; `k` is fp8 with even columns and `out`
            // holds its rows.
            unsafe { to_bf16(k, &mut out) };
            for r in 0..rows {
                for c in 0..cols {
                    let word = out[(r * cols + c) / 2];
                    let bits = if c % 2 == 0 {
                        word as u16
                    } else {
                        (word >> 16) as u16
                    };
                    let want = fp8_e4m3(data[r * stride + c]);
                    assert_eq!(
                        half::bf16::from_bits(bits).to_f32().to_bits(),
                        want.to_bits(),
                        "cols {cols} row {r} col {c}"
                    );
                }
            }
            assert!(
                out[rows * cols / 2..].iter().all(|&w| w == 0xdead_beef),
                "cols {cols}: wrote past the rows"
            );
        }
    }
}
