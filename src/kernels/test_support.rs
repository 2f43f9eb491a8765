//! Hooks for the crate's own tests and benchmarks (`#[doc(hidden)]`, not part of the API).

/// Tests: whether the fused CUDA kernel fills each output with NaN bytes before writing it
/// (an element it never writes then shows up as NaN instead of a stale value). A no-op
/// without the `cuda` feature.
pub fn set_cuda_poison(on: bool) {
    #[cfg(feature = "cuda")]
    super::cuda::set_poison(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// [`super::attention`] of `q` over everything `cache` holds, as it is stored (an int8
/// cache's rows read in place by the fused CPU kernel where it serves the call): what a
/// cached decode step runs, without the projections (lets the benchmarks time it alone).
pub fn attention_over_cache(
    q: &candle_core::Tensor,
    cache: &crate::cache::KvCache,
    mask: &crate::mask::MaskPlan,
    params: &super::AttnParams,
) -> candle_core::Result<super::AttnOutput> {
    match cache.stored()? {
        None => candle_core::bail!("attention_over_cache: the cache is empty"),
        Some(crate::cache::CachedKv::Dense(k, v)) => super::attention(q, &k, &v, mask, params),
        Some(crate::cache::CachedKv::Quant(kv)) => super::attention_quantized(q, &kv, mask, params),
    }
}

/// How many calls the fused CPU kernel has served in this process.
pub fn cpu_calls() -> usize {
    super::cpu::calls()
}

/// How many fused CPU calls were split over their keys (flash-decoding).
pub fn cpu_split_calls() -> usize {
    super::cpu::split_calls()
}

/// How many backward passes the fused CPU backward has served in this process.
pub fn cpu_backward_calls() -> usize {
    super::cpu::bwd_calls()
}

/// How many of those computed their products on bf16 pairs (AVX512-BF16 dot products).
pub fn cpu_pair_backward_calls() -> usize {
    super::cpu::pair_bwd_calls()
}

/// How many fused CPU calls widened fp8 e4m3 key tiles to bf16 for AVX512-BF16 dot products
/// (bf16 queries, CPUs with AVX512-VBMI where `vdpbf16ps` is the chosen instruction).
pub fn cpu_fp8_tile_calls() -> usize {
    super::cpu::fp8_tile_calls()
}

/// The instruction sets of the fused CPU kernel this CPU can run (`"avx512bf16"`,
/// `"avx512"`, `"avx2"`, `"portable"`), best first.
pub fn cpu_isas() -> Vec<&'static str> {
    super::cpu::isas()
}

/// Forces the fused CPU kernel's instruction set (`None`: the best available),
/// process-wide; an error when the CPU lacks it. The projections' GEMMs keep theirs
/// ([`force_gemm_isa`]).
pub fn force_cpu_isa(name: Option<&str>) -> Result<(), String> {
    super::cpu::force_isa(name)
}

/// The fused CPU kernel's instruction set now.
pub fn cpu_isa() -> &'static str {
    super::cpu::isa_name()
}

/// Forces the projections' GEMM instruction set (the same names as [`force_cpu_isa`]; `None`:
/// the best available), process-wide; an error when the CPU lacks it. The fused attention
/// kernel keeps its own.
pub fn force_gemm_isa(name: Option<&str>) -> Result<(), String> {
    crate::gemm::isa::force(name)
}

/// The projections' GEMM instruction set now.
pub fn gemm_isa() -> &'static str {
    crate::gemm::isa::current().name()
}

/// The projections' matmul, `lin.forward(x)`: our GEMMs where the projections' instruction
/// set ([`gemm_isa`]) has a kernel for the dtype, else candle's (lets the benchmarks time the
/// projections alone).
pub fn linear(
    lin: &candle_nn::Linear,
    x: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    crate::proj::linear(lin, x)
}

/// The GEMM kernel projections of `dtype` use now for calls of few rows (`None`: candle's
/// matmul).
pub fn proj_gemm_kernel(dtype: candle_core::DType) -> Option<&'static str> {
    super::cpu::proj_kernel(dtype).map(|k| k.name())
}

/// The packed GEMM kernel projections of `dtype` use now for calls of at least
/// [`packed_min_rows`] rows (`None`: the dot-product kernels or candle's matmul).
pub fn packed_gemm_kernel(dtype: candle_core::DType) -> Option<&'static str> {
    crate::proj::packed_kernel(dtype).map(|k| k.name())
}

/// Rows from which projections take the packed GEMM.
pub fn packed_min_rows() -> usize {
    crate::proj::PACK_MIN_ROWS
}

/// The machine's register-only peak rates ([`PeakKind`]).
pub use crate::gemm::peak::{peak_gflops, PeakKind};

/// The CPU's L1d and L2 sizes in bytes as the packed GEMM reads them.
pub fn cache_sizes() -> (usize, usize) {
    crate::gemm::cache_sizes()
}

/// A projection that keeps its weight packed (as the module's own projections do).
#[derive(Clone, Debug)]
pub struct PackedLinear(crate::proj::Proj);

impl PackedLinear {
    /// Wraps `lin`.
    pub fn new(lin: candle_nn::Linear) -> Self {
        Self(crate::proj::Proj::new(lin))
    }

    /// `x · Wᵀ + b`.
    pub fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        self.0.forward(x)
    }

    /// Bytes of the packed weight kept (0 before the first call that packs).
    pub fn packed_bytes(&self) -> usize {
        self.0.packed_bytes()
    }
}

/// Forces the portable path everywhere (process-wide): the fused CPU kernel's `gemm` crate
/// products and candle's matmul for the projections, what a CPU without AVX2 or AVX-512 runs,
/// so that tests cover both paths on one machine. `false` gives both their best instruction
/// set back.
pub fn set_portable_only(on: bool) {
    super::cpu::set_portable_only(on);
    let _ = crate::gemm::isa::force(on.then_some("portable"));
}

/// Parses a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
///
/// ```
/// assert!(candle_mha::kernels::test_support::parse_device("cpu").unwrap().is_cpu());
/// assert!(candle_mha::kernels::test_support::parse_device("tpu").is_err());
/// ```
pub fn parse_device(name: &str) -> candle_core::Result<candle_core::Device> {
    use candle_core::{bail, Device};
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// The device the tests run on: `$CANDLE_MHA_DEVICE` (`cpu`, `cuda`, `cuda:N`), default CPU.
pub fn test_device() -> candle_core::Result<candle_core::Device> {
    match std::env::var("CANDLE_MHA_DEVICE") {
        Ok(name) if !name.is_empty() => parse_device(&name),
        _ => Ok(candle_core::Device::Cpu),
    }
}

/// The fused CPU forward of `q`, `k`, `v` (layouts as [`super::attention`]) and its fused
/// backward against the output gradient `grad`, called directly rather than through candle's
/// autograd (no loss, no gradient bookkeeping): what PyTorch's `out.backward(grad)` runs, for
/// the training benchmark's kernels-only comparison. Returns `[output, dq, dk, dv]`.
pub fn fused_forward_backward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    mask: &crate::mask::MaskPlan,
    params: &super::AttnParams,
    grad: &candle_core::Tensor,
) -> candle_core::Result<[candle_core::Tensor; 4]> {
    let call = super::checked_call(q, k, v, mask, params)?;
    if call.b * call.h * call.l * call.dv == 0 || call.s == 0 {
        candle_core::bail!("fused_forward_backward: nothing to compute (an empty dimension)")
    }
    super::cpu::forward_backward(&call, grad)
}
