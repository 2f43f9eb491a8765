//! The projections' matrix product `y = x · wᵀ (+ bias)` on packed panels: `x` is `M × K`
//! row-major, `w` is `N × K` (`nn.Linear`'s orientation, any strides), f32 accumulation, the bias
//! added in f32, one rounding to the output dtype (PyTorch's numerics in every dtype).
//!
//! The design is BLIS's: the weight is packed once into panels of `NR` columns
//! ([`PackedWeight`]; the module packs its own weights on first use and keeps them), the rows
//! of `x` are packed per `MC × KC` block into slivers of `MR` rows, and register-tiled
//! micro-kernels ([`ukr`]) broadcast `x` against vectors of the weight panel into `MR × NR`
//! accumulators. Block sizes come from this CPU's L1 and L2 ([`blocking`]): a sliver of `x`
//! (`MR × KC`) stays in L1, a block of weight panels (`KC × NC`) and the block of `x` in L2.
//!
//! Which kernel multiplies each dtype is one decision per process ([`kernel_for`]):
//!
//! | dtype | AVX-512 | AVX2 + FMA |
//! |---|---|---|
//! | f32 | f32 14 × 32 | f32 6 × 16 |
//! | f16 | widened to f32 while packing, f32 14 × 32 | widened, f32 6 × 16 |
//! | bf16 | `vdpbf16ps` 14 × 32 on bf16 pairs **or** widened to f32, by measurement | widened, f32 6 × 16 |
//!
//! For bf16 the faster of the two is chosen once per process by timing both instructions
//! ([`bf16_strategy`]): on AMD Zen 4/5 `vdpbf16ps` does twice the f32 FMA's work per cycle, on
//! Intel's Xeons of family 6 model 207 half of it. `CANDLE_MHA_BF16_GEMM=dot|widen` overrides.

// Off x86-64 no kernel exists: the module compiles (its peak probe answers `None`) and is never
// reached (`kernel_for` is x86-64 only, so projections keep candle's matmul).
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_macros, unused_variables)
)]

mod driver;
pub(crate) mod isa;
pub(crate) mod pack;
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
// the benches' peak rate, through the test hooks
pub mod peak;
pub(crate) mod ukr;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use rayon::prelude::*;

pub(crate) use driver::{gemm, OutPtr};
pub(crate) use isa::GemmIsa;
// Row epilogues and the fused two-layer product serve the models only.
#[cfg_attr(not(feature = "models"), allow(unused_imports))]
pub(crate) use driver::{mlp, ResidualFn, RowFn};
pub(crate) use pack::Elem;
use pack::{Form, Src};

/// A micro-kernel with its tile shape and operand form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// f32 FMAs, AVX-512F, 14 × 32 (also f16 and bf16 widened).
    Avx512F32,
    /// `vdpbf16ps` on bf16 pairs, AVX512-BF16, 14 × 32.
    Avx512Bf16,
    /// f32 FMAs, AVX2 + FMA (+ F16C for its f16 outputs), 6 × 16 (also f16 and bf16 widened).
    Avx2F32,
}

impl Kernel {
    /// Rows × columns of the register tile.
    pub(crate) fn tile(self) -> (usize, usize) {
        match self {
            Kernel::Avx512F32 | Kernel::Avx512Bf16 => (ukr::MR_512, ukr::NR_512),
            Kernel::Avx2F32 => (ukr::MR_256, ukr::NR_256),
        }
    }

    /// How both operands are packed.
    pub(crate) fn form(self) -> Form {
        match self {
            Kernel::Avx512Bf16 => Form::Bf16Pairs,
            _ => Form::F32,
        }
    }

    /// Short name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Avx512F32 => "packed AVX-512 f32 14x32",
            Kernel::Avx512Bf16 => "packed AVX512-BF16 14x32",
            Kernel::Avx2F32 => "packed AVX2 f32 6x16",
        }
    }

    /// Whether this CPU has the kernel's instructions (the only way a kernel is run).
    pub(crate) fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512F32 => is_x86_feature_detected!("avx512f"),
                Kernel::Avx512Bf16 => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512bf16")
                }
                Kernel::Avx2F32 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The micro-kernel (call only when [`Kernel::supported`]).
    #[cfg(target_arch = "x86_64")]
    fn ukr(self) -> ukr::Ukr {
        match self {
            Kernel::Avx512F32 => ukr::f32_avx512,
            Kernel::Avx512Bf16 => ukr::bf16_avx512,
            Kernel::Avx2F32 => ukr::f32_avx2,
        }
    }
}

/// How bf16 products are computed on AVX-512 CPUs with AVX512-BF16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Strategy {
    /// `vdpbf16ps` on bf16 pairs.
    Dot,
    /// Widened to f32 while packing, f32 FMAs.
    Widen,
}

/// The bf16 strategy of this process: `CANDLE_MHA_BF16_GEMM` (`dot` or `widen`) when set, else
/// measured once: `vdpbf16ps` when its register-only rate beats the f32 FMA's by 10%.
pub(crate) fn bf16_strategy() -> Bf16Strategy {
    static S: OnceLock<Bf16Strategy> = OnceLock::new();
    *S.get_or_init(|| {
        match std::env::var("CANDLE_MHA_BF16_GEMM").as_deref() {
            Ok("dot") => return Bf16Strategy::Dot,
            Ok("widen") => return Bf16Strategy::Widen,
            _ => {}
        }
        // The best of three alternating samples of each: a busy neighbour (these are often
        // shared VMs) only ever slows a sample down, and one slowed sample must not flip the
        // choice.
        let (mut dot, mut fma) = (0f64, 0f64);
        for _ in 0..3 {
            let dp = peak::peak_gflops(peak::PeakKind::Avx512Bf16Dot, 1, 2);
            dot = dot.max(dp.unwrap_or(0.0));
            let fp = peak::peak_gflops(peak::PeakKind::Avx512Fma, 1, 2);
            fma = fma.max(fp.unwrap_or(0.0));
        }
        if fma > 0.0 && dot > 1.1 * fma {
            Bf16Strategy::Dot
        } else {
            Bf16Strategy::Widen
        }
    })
}

/// The packed kernel for `dtype` when the projections' instruction set is `isa`
/// ([`isa::current`]; `None`: none, candle's matmul then), see the module docs.
#[cfg(target_arch = "x86_64")]
pub(crate) fn kernel_for(dtype: candle_core::DType, isa: GemmIsa) -> Option<Kernel> {
    use candle_core::DType;
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
    let k = match isa {
        GemmIsa::Avx512Bf16 if dtype == DType::BF16 && isa::dots_bf16(isa) => Kernel::Avx512Bf16,
        GemmIsa::Avx512Bf16 | GemmIsa::Avx512 => Kernel::Avx512F32,
        GemmIsa::Avx2 => Kernel::Avx2F32,
        GemmIsa::Portable => return None,
    };
    k.supported().then_some(k)
}

/// Cache-blocking sizes of one kernel: `kc` packed steps per block of `K`, `mc` rows of `x`
/// per block (a multiple of `MR`), `nc` weight columns per block (a multiple of `NR`), `nb`
/// weight panels per pass of the slivers of `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocking {
    /// Packed steps of `K` per block (a sliver of `x`, `MR × kc` packed elements, fills about
    /// two thirds of L1).
    pub kc: usize,
    /// Rows of `x` per block (its packed block fills about a third of L2).
    pub mc: usize,
    /// Weight columns per block (its panels, `kc × nc`, up to 8 MiB).
    pub nc: usize,
    /// Weight panels (`kc × NR` each) every sliver of `x` passes before the slivers move on to
    /// the next ones: about a fifth of L2, so that the block's other slivers re-read them from
    /// L2 rather than L3.
    pub nb: usize,
}

/// The data cache sizes of this CPU in bytes (L1d, L2), read once from Linux's sysfs; 32 KiB
/// and 1 MiB where they cannot be read.
pub(crate) fn cache_sizes() -> (usize, usize) {
    static C: OnceLock<(usize, usize)> = OnceLock::new();
    *C.get_or_init(|| {
        let mut l1 = None;
        let mut l2 = None;
        for i in 0..8 {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
            let (Some(level), Some(ty), Some(size)) = (read("level"), read("type"), read("size"))
            else {
                continue;
            };
            let size = size.trim();
            let bytes = match size.strip_suffix('K') {
                Some(k) => k.parse::<usize>().ok().map(|k| k * 1024),
                None => match size.strip_suffix('M') {
                    Some(m) => m.parse::<usize>().ok().map(|m| m << 20),
                    None => size.parse().ok(),
                },
            };
            match (level.trim(), ty.trim()) {
                ("1", "Data") => l1 = bytes,
                ("2", "Unified") => l2 = bytes,
                _ => {}
            }
        }
        (
            l1.unwrap_or(32 << 10).clamp(16 << 10, 128 << 10),
            l2.unwrap_or(1 << 20).clamp(256 << 10, 8 << 20),
        )
    })
}

/// The blocking of `kernel` on this CPU (see [`Blocking`]'s fields): a sliver of `x`
/// (`MR × kc`) fills about two thirds of L1, the packed block of `x` (`mc × kc`) a third of L2,
/// and a block of weight panels (`kc × nc`) up to 8 MiB, passed by the slivers `nb` panels at
/// a time (a fifth of L2: the packed block of `x` and those panels share L2, and the panels
/// come from L3 or memory once per block of `x` rather than once per sliver; f32 4096³ on
/// AMD Zen 4: 189–194 → 195–205 GFLOP/s). (A weight block sized to L2 instead repacked `x` 9
/// times at N = 4096 and ran 5% slower on Zen 4.)
pub(crate) fn blocking(kernel: Kernel) -> Blocking {
    let (l1, l2) = cache_sizes();
    let (mr, nr) = kernel.tile();
    let kc = (l1 * 2 / 3 / (mr * 4) / 32 * 32).clamp(64, 512);
    let mc = (l2 / 3 / (kc * 4) / mr * mr).max(mr);
    let nc = ((8 << 20) / (kc * 4) / nr * nr).max(nr);
    let nb = (l2 / 5 / (kc * nr * 4)).max(1);
    Blocking { kc, mc, nc, nb }
}

/// A 64-byte aligned line of packed elements.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Aligned storage of packed elements.
#[derive(Clone, Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// At least `n` elements (zeros where newly grown).
    fn reserve(&mut self, n: usize) {
        let lines = n.div_ceil(16);
        if self.0.capacity() < lines {
            // A weight of several MiB streams from L3 and memory panel by panel: in 2 MiB
            // pages one TLB entry covers 64 panels of 32 × 256 f32 instead of an eighth of
            // one (f32 4096³ on AMD Zen 4: 164–173 → 182–194 GFLOP/s).
            let mut grown = crate::pages::with_capacity(lines);
            grown.extend_from_slice(&self.0);
            self.0 = grown;
        }
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 16]));
        }
    }

    fn as_slice(&self) -> &[u32] {
        // SAFETY: `Line` is 16 u32 with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u32, self.0.len() * 16) }
    }

    fn as_mut_slice(&mut self) -> &mut [u32] {
        // SAFETY: as `as_slice`, uniquely borrowed.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u32, self.0.len() * 16)
        }
    }
}

/// A weight (`N × K`) packed for one kernel: panels of `NR` columns, each `units` packed steps
/// of `NR` elements (`units` = `K`, or `⌈K / 2⌉` bf16 pairs).
#[derive(Clone)]
pub(crate) struct PackedWeight {
    kernel: Kernel,
    n: usize,
    k: usize,
    units: usize,
    data: Lines,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("kernel", &self.kernel)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedWeight {
    /// Packs `w` (`n` rows of `k` elements, rows `stride` apart) for `kernel`, on rayon's pool.
    ///
    /// # Panics
    /// When `w` is shorter than its rows, or `kernel` packs pairs and `T` is not bf16.
    pub(crate) fn new<T: Elem>(
        kernel: Kernel,
        w: &[T],
        (n, k): (usize, usize),
        stride: usize,
    ) -> Self {
        assert!(
            n == 0 || w.len() >= (n - 1) * stride + k,
            "pack: weight too short"
        );
        let (_, nr) = kernel.tile();
        let form = kernel.form();
        let units = k.div_ceil(form.k_per_unit());
        let panels = n.div_ceil(nr);
        let mut data = Lines::default();
        data.reserve(panels * units * nr);
        let src = Src {
            data: w,
            stride,
            rows: n,
            k,
        };
        let per_panel = units * nr;
        if per_panel > 0 {
            data.as_mut_slice()[..panels * per_panel]
                .par_chunks_mut(per_panel)
                .enumerate()
                .for_each(|(p, dst)| {
                    pack::pack(form, src, p * nr, 1, nr, (0, units), dst, per_panel)
                });
        }
        Self {
            kernel,
            n,
            k,
            units,
            data,
        }
    }

    /// The kernel this weight is packed for.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Output columns (`N`).
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Elements per row (`K`).
    #[cfg_attr(not(feature = "models"), allow(dead_code))]
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
    /// Bytes of packed storage.
    pub(crate) fn bytes(&self) -> usize {
        self.data.0.len() * 64
    }
}
