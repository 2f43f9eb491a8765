//! The machine's limit: register-only loops of each product instruction the GEMM can use, timed
//! on one thread and on several at once. No loads or stores in the loop, so the rate is what
//! the execution units issue: the ceiling a compute-bound kernel is held to (benchmarks print
//! every rate as a share of it), and the measurement that decides how bf16 is multiplied
//! ([`super::bf16_strategy`]).

use std::time::Instant;

/// A product instruction whose peak rate can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeakKind {
    /// `vfmadd231ps zmm` (AVX-512F): 32 flops an instruction.
    Avx512Fma,
    /// `vdpbf16ps zmm` (AVX512-BF16): 16 lanes × 2 bf16 products, 64 flops an instruction
    /// (counting a bf16 product and its addition as 2 flops, as for f32).
    Avx512Bf16Dot,
    /// `vfmadd231ps ymm` (AVX2 + FMA): 16 flops an instruction.
    Avx2Fma,
}

impl PeakKind {
    /// Every kind, in a fixed order.
    pub const ALL: [PeakKind; 3] = [
        PeakKind::Avx512Fma,
        PeakKind::Avx512Bf16Dot,
        PeakKind::Avx2Fma,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            PeakKind::Avx512Fma => "AVX-512 f32 FMA",
            PeakKind::Avx512Bf16Dot => "AVX512-BF16 vdpbf16ps",
            PeakKind::Avx2Fma => "AVX2 f32 FMA",
        }
    }

    /// Whether this CPU has the instruction.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                PeakKind::Avx512Fma => is_x86_feature_detected!("avx512f"),
                PeakKind::Avx512Bf16Dot => {
                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
                }
                PeakKind::Avx2Fma => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Instructions per loop iteration of each probe (independent accumulators: enough chains to
/// cover a 4–5 cycle latency on two pipes).
const CHAINS: usize = 12;

/// Runs `iters` iterations of `kind`'s loop; returns the flops done. The CPU must have the
/// instruction ([`PeakKind::supported`]).
fn run(kind: PeakKind, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the callers check `kind.supported()` first.
        unsafe {
            match kind {
                PeakKind::Avx512Fma => x86::fma512(iters),
                PeakKind::Avx512Bf16Dot => x86::dp512(iters),
                PeakKind::Avx2Fma => x86::fma256(iters),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, iters);
        0.0
    }
}

/// The peak rate of `kind` in GFLOP/s on `threads` threads at once (each timing its own loop of
/// about `millis` ms; the rate is the sum of theirs, the best of three such runs; at most 256
/// threads), or `None` when the CPU lacks it.
pub fn peak_gflops(kind: PeakKind, threads: usize, millis: u64) -> Option<f64> {
    if !kind.supported() {
        return None;
    }
    // Calibrate the iteration count on this thread (also wakes the vector units).
    let mut iters = 1u64 << 14;
    loop {
        let t = Instant::now();
        run(kind, iters);
        let s = t.elapsed().as_secs_f64();
        if s > 2e-3 || iters > 1 << 40 {
            iters = ((iters as f64) * (millis as f64 * 1e-3) / s.max(1e-9)).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    let threads = threads.clamp(1, 256);
    // The best of three: a thread descheduled for part of one run (a VM's neighbours) would
    // otherwise lower the limit that every share is measured against.
    (0..3).map(|_| rate(kind, threads, iters)).reduce(f64::max)
}

/// The summed rate of `threads` threads each running `iters` steps of `kind`'s loop.
fn rate(kind: PeakKind, threads: usize, iters: u64) -> f64 {
    let rates: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    run(kind, iters / 8); // warm-up
                    let t = Instant::now();
                    let flops = run(kind, iters);
                    flops / t.elapsed().as_secs_f64() / 1e9
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
    });
    rates.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// `iters` × [`CHAINS`] AVX-512 FMAs; returns their flops.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) -> f64 {
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        let (a, b) = (
            black_box(_mm512_set1_ps(0.999)),
            black_box(_mm512_set1_ps(1e-3)),
        );
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        black_box(acc);
        (iters * CHAINS as u64 * 32) as f64
    }

    /// `iters` × [`CHAINS`] `vdpbf16ps zmm`; returns their flops (64 each).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dp512(iters: u64) -> f64 {
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        // SAFETY: plain bit reinterpretations of 512-bit vectors.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(black_box(_mm512_set1_epi16(0x3F80))),
                std::mem::transmute::<__m512i, __m512bh>(black_box(_mm512_set1_epi16(0x0001))),
            )
        };
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        black_box(acc);
        (iters * CHAINS as u64 * 64) as f64
    }

    /// `iters` × [`CHAINS`] AVX2 FMAs; returns their flops.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) -> f64 {
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        let (a, b) = (
            black_box(_mm256_set1_ps(0.999)),
            black_box(_mm256_set1_ps(1e-3)),
        );
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        black_box(acc);
        (iters * CHAINS as u64 * 16) as f64
    }
}
