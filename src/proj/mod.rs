//! The projections' matrix product: [`candle_nn::Linear`]'s `forward`, computed on x86-64 CPUs
//! by our GEMMs where they compute the same function faster, with PyTorch's numerics in every
//! dtype (f32 accumulation, the bias added in f32, one rounding to the output dtype; candle's
//! bf16 matmul rounds twice and its f16 one adds the bias in f16). Two GEMMs, chosen per call:
//!
//! - **the packed GEMM** ([`crate::gemm`]) from [`PACK_MIN_ROWS`] rows: register-tiled
//!   micro-kernels on packed panels (AVX-512 f32 14 × 32, AVX512-BF16 14 × 32, AVX2 f32
//!   6 × 16; f16, and bf16 where `vdpbf16ps` is measured slower than the f32 FMA, widened to
//!   f32 while packing). A [`Proj`] (every projection the crate's modules and models own) packs
//!   its weight on first use and keeps it; [`linear`] packs per call.
//! - **the dot-product kernels** ([`gemm`](crate::kernels::cpu::gemm)) for fewer rows (a decode
//!   step): operands read in place, no packing; bf16 by `vdpbf16ps` or AVX2 halves, f16
//!   widened in registers, f32 on AVX-512.
//!
//! The fast path is taken only when it computes the same function: CPU tensors, input, weight
//! and bias of one of those dtypes, a weight stored row-major in `nn.Linear`'s `(out, in)`
//! orientation (GPT-2's transposed `Conv1D` view keeps candle's path), and nothing tracked by
//! autograd (the op has no backward). The projections' own instruction set
//! ([`crate::gemm::isa`], apart from the fused attention kernel's) decides which kernels run
//! ([`proj_kernel`], [`packed_kernel`]): forcing AVX2, as `bench_gemm --isa` and
//! `bench_attention --isa` do, picks what a CPU without AVX-512 runs, and the portable path
//! turns ours off. Everything else is `Linear::forward`, with f16 / bf16 CPU tensors widened
//! to f32 around it so that the numerics stay PyTorch's (aarch64, tracked tensors, other weight
//! layouts; see `half_in_f32`).

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Linear;

use crate::gemm::{Kernel as Packed, PackedWeight};
use crate::kernels::cpu::{proj_kernel, ProjKernel};

/// Rows of `x` from which a call takes the packed GEMM: below, the dot-product kernels read the
/// weight where it is (a decode step reads each weight byte once; packing or reading a widened
/// copy would cost more than the products).
pub(crate) const PACK_MIN_ROWS: usize = 16;

thread_local! {
    /// Calls served by our GEMM from this thread (lets tests check which path ran).
    static FAST_CALLS: Cell<usize> = const { Cell::new(0) };
    /// Calls served by the packed GEMM from this thread.
    static PACKED_CALLS: Cell<usize> = const { Cell::new(0) };
}

/// How many projections our GEMM has computed for calls from this thread.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn fast_calls() -> usize {
    FAST_CALLS.with(Cell::get)
}

/// How many of them took the packed GEMM.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn packed_calls() -> usize {
    PACKED_CALLS.with(Cell::get)
}

/// A projection that packs its weight once for the packed GEMM and keeps it: `Linear` plus the
/// packed copy, made on the first call that takes the packed path and shared by clones. Only
/// weights that cannot change are kept packed: a weight that is a `Var` or a view of one (and
/// so the `.inference()` view of a trained module) is packed per call, so that optimizer steps
/// are always seen.
#[derive(Clone, Debug)]
pub(crate) struct Proj {
    lin: Linear,
    /// Whether the weight can never change (not a `Var` when the projection was made).
    frozen: bool,
    packed: Arc<PackCache>,
}

impl Proj {
    /// Wraps `lin`; its weight is kept packed when it is not tracked by autograd (neither a
    /// `Var` nor a view of one: those may change between calls).
    pub(crate) fn new(lin: Linear) -> Self {
        let frozen = !lin.weight().track_op();
        Self {
            lin,
            frozen,
            packed: Arc::default(),
        }
    }

    /// The same projection detached from autograd (sharing storage, and the packed copy).
    pub(crate) fn detached(&self) -> Self {
        Self {
            lin: Linear::new(
                self.lin.weight().detach(),
                self.lin.bias().map(Tensor::detach),
            ),
            frozen: self.frozen,
            packed: self.packed.clone(),
        }
    }

    /// The weight, `(out, in)`.
    pub(crate) fn weight(&self) -> &Tensor {
        self.lin.weight()
    }

    /// The bias, if any.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.lin.bias()
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
    /// Bytes of the packed copy kept (0 before the first packed call or for a `Var`).
    pub(crate) fn packed_bytes(&self) -> usize {
        let slot = self.packed.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map_or(0, |p| p.bytes())
    }

    /// `x · Wᵀ + b` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_impl(&self.lin, self.frozen.then_some(&*self.packed), x)
    }

    /// The weight packed for `kernel`: the kept copy (packed now if there is none yet), or,
    /// for a weight that may change, a fresh one.
    #[cfg_attr(not(feature = "models"), allow(dead_code))]
    pub(crate) fn packed_for(&self, kernel: Packed) -> Result<Arc<PackedWeight>> {
        if self.frozen {
            cached(kernel, self.weight(), &self.packed)
        } else {
            Ok(Arc::new(pack_weight(kernel, self.weight())?))
        }
    }
}

impl From<Linear> for Proj {
    fn from(lin: Linear) -> Self {
        Self::new(lin)
    }
}

#[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
/// `lin.forward(x)`: `x · Wᵀ + b` over the last dimension of `x` (the weight packed per call
/// where the packed GEMM is taken; [`Proj`] keeps it).
pub(crate) fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    linear_impl(lin, None, x)
}

/// A packed weight kept between calls.
type PackCache = Mutex<Option<Arc<PackedWeight>>>;

fn linear_impl(lin: &Linear, cache: Option<&PackCache>, x: &Tensor) -> Result<Tensor> {
    let Some(plan) = fast_path(lin, x, cache.is_some()) else {
        return match half_in_f32(lin, x)? {
            Some(y) => Ok(y),
            None => lin.forward(x),
        };
    };
    let w = lin.weight();
    let (n, k) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let m = x.elem_count() / k.max(1);
    let flat = x.contiguous()?.reshape((m, k))?;
    let bias = bias_f32(lin)?;
    let packed = match (plan, cache) {
        (Plan::Packed(kernel), Some(cache)) => Some(cached(kernel, w, cache)?),
        _ => None,
    };
    let op = DotLinear { bias, plan, packed };
    let y = flat.apply_op2_no_bwd(w, &op)?;
    FAST_CALLS.with(|c| c.set(c.get() + 1));
    if matches!(plan, Plan::Packed(_)) {
        PACKED_CALLS.with(|c| c.set(c.get() + 1));
    }
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    y.reshape(dims)
}

/// `lin.forward(x)` with PyTorch's numerics for f16 / bf16 CPU tensors that our GEMMs do not
/// serve (CPUs without AVX2 / AVX-512, e.g. aarch64; the portable instruction set; tensors
/// tracked by autograd; weights in other layouts): operands widened to f32 (exact), the
/// product accumulated in f32 (candle's f32 matmul), the bias added in f32, one rounding to
/// the input dtype. candle's own half matmul rounds twice in bf16 and adds the bias in f16.
/// Built from candle ops, so gradients flow. `None` for other dtypes and devices.
fn half_in_f32(lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let w = lin.weight();
    let half = matches!(dtype, DType::F16 | DType::BF16);
    if !half || !x.device().is_cpu() || w.dtype() != dtype {
        return Ok(None);
    }
    let b32 = lin.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
    let wide = Linear::new(w.to_dtype(DType::F32)?, b32);
    Ok(Some(
        wide.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?,
    ))
}

/// `lin`'s bias as f32 (the GEMMs add it in f32), if it has one.
fn bias_f32(lin: &Linear) -> Result<Option<Vec<f32>>> {
    lin.bias()
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()
}

/// `w` packed for `kernel`: the copy kept in `cache` when it was packed for that kernel, else
/// packed now and kept.
fn cached(kernel: Packed, w: &Tensor, cache: &PackCache) -> Result<Arc<PackedWeight>> {
    let mut slot = cache.lock().unwrap_or_else(|e| e.into_inner());
    match &*slot {
        Some(p) if p.kernel() == kernel => Ok(p.clone()),
        _ => {
            let p = Arc::new(pack_weight(kernel, w)?);
            *slot = Some(p.clone());
            Ok(p)
        }
    }
}

/// Which of our GEMMs computes a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// The dot-product kernels, operands read in place (few rows).
    Dot(ProjKernel),
    /// The packed, register-tiled GEMM.
    Packed(Packed),
}

/// The GEMM [`linear`] can use for this call, if any (see the module docs): the packed GEMM
/// from [`PACK_MIN_ROWS`] rows, and below where the weight is kept packed (`keeps_packed`) and no
/// dot-product kernel serves the dtype (f32 without AVX-512); else the dot-product kernels.
fn fast_path(lin: &Linear, x: &Tensor, keeps_packed: bool) -> Option<Plan> {
    let w = lin.weight();
    let dtype = x.dtype();
    let ok = |t: &Tensor| t.dtype() == dtype && t.device().is_cpu() && !t.track_op();
    // K = 0 (no input features) keeps candle's path: the rows of x cannot be counted from its
    // elements.
    let shapes_ok = w.rank() == 2
        && x.rank() >= 1
        && x.dims().last() == w.dims().get(1)
        && w.dims().get(1).is_some_and(|&k| k > 0);
    let usable = shapes_ok
        && ok(x)
        && ok(w)
        && w.is_contiguous()
        && lin
            .bias()
            .is_none_or(|b| ok(b) && b.rank() == 1 && b.dim(0).ok() == w.dims().first().copied());
    if !usable {
        return None;
    }
    let rows = x.elem_count() / w.dim(1).ok()?.max(1);
    let dot = proj_kernel(dtype);
    let packed =
        packed_kernel(dtype).filter(|_| rows >= PACK_MIN_ROWS || (keeps_packed && dot.is_none()));
    match packed {
        Some(p) => Some(Plan::Packed(p)),
        None => dot.map(Plan::Dot),
    }
}

/// The packed GEMM kernel for `dtype` under the projections' instruction set in use
/// ([`crate::gemm::isa`]).
pub(crate) fn packed_kernel(dtype: DType) -> Option<Packed> {
    #[cfg(target_arch = "x86_64")]
    {
        crate::gemm::kernel_for(dtype, crate::gemm::isa::current())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        None
    }
}

/// `w` (`(N, K)`, contiguous, on the CPU) packed for `kernel`.
fn pack_weight(kernel: Packed, w: &Tensor) -> Result<PackedWeight> {
    let (n, k) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("linear: the packed GEMM needs a CPU weight")
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("linear: the packed GEMM needs a contiguous weight")
    };
    pack_storage(kernel, (cpu, a..b), (n, k))
}

/// A weight's storage packed for `kernel` (checked: bf16 pairs only from bf16).
fn pack_storage(kernel: Packed, (ws, wr): Operand, (n, k): (usize, usize)) -> Result<PackedWeight> {
    use crate::gemm::pack::Form;
    Ok(match ws {
        CpuStorage::BF16(w) => PackedWeight::new(kernel, &w[wr], (n, k), k),
        CpuStorage::F16(w) if kernel.form() == Form::F32 => {
            PackedWeight::new(kernel, &w[wr], (n, k), k)
        }
        CpuStorage::F32(w) if kernel.form() == Form::F32 => {
            PackedWeight::new(kernel, &w[wr], (n, k), k)
        }
        _ => bail!(
            "linear: cannot pack a {:?} weight for {}",
            candle_core::backend::BackendStorage::dtype(ws),
            kernel.name()
        ),
    })
}

/// `(M, K) · (N, K)ᵀ + bias` with f32 accumulation, in bf16, f16 or f32 (no backward: only
/// reached with nothing tracked).
struct DotLinear {
    bias: Option<Vec<f32>>,
    plan: Plan,
    /// The weight already packed for the plan's kernel (else packed here, for this call).
    packed: Option<Arc<PackedWeight>>,
}

impl CustomOp2 for DotLinear {
    fn name(&self) -> &'static str {
        "candle-mha-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if k != kw {
            bail!("linear: input has {k} features but the weight {kw} (weight shape ({n}, {kw}))")
        }
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            bail!("linear: the input and the weight must be contiguous")
        };
        let bias = self.bias.as_deref();
        let out = match self.plan {
            Plan::Dot(kernel) => gemm(kernel, (xs, xa..xb), (ws, wa..wb), bias, (m, n, k))?,
            Plan::Packed(kernel) => {
                let fresh;
                let pw = match &self.packed {
                    Some(p) => &**p,
                    None => {
                        fresh = pack_storage(kernel, (ws, wa..wb), (n, k))?;
                        &fresh
                    }
                };
                packed_gemm((xs, xa..xb), pw, bias, m)?
            }
        };
        Ok((out, Shape::from((m, n))))
    }
}

/// `(M, K) · packedᵀ + bias` into a new storage of `x`'s dtype.
fn packed_gemm(
    (xs, xr): Operand,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    m: usize,
) -> Result<CpuStorage> {
    use crate::gemm::gemm as run;
    let n = w.n();
    Ok(match xs {
        CpuStorage::BF16(x) => {
            let mut out = crate::pages::zeroed(m * n);
            run(&x[xr], m, w, bias, &mut out, None);
            CpuStorage::BF16(out)
        }
        CpuStorage::F16(x) => {
            let mut out = crate::pages::zeroed(m * n);
            run(&x[xr], m, w, bias, &mut out, None);
            CpuStorage::F16(out)
        }
        CpuStorage::F32(x) => {
            let mut out = crate::pages::zeroed(m * n);
            run(&x[xr], m, w, bias, &mut out, None);
            CpuStorage::F32(out)
        }
        _ => bail!("linear: expected a bf16, f16 or f32 input"),
    })
}

/// One operand: its storage and the range of its contiguous elements.
type Operand<'a> = (&'a CpuStorage, std::ops::Range<usize>);

/// `(M, K) · (N, K)ᵀ + bias` by `kernel` (x86-64), into a new storage of the operands' dtype.
#[cfg(target_arch = "x86_64")]
fn gemm(
    kernel: ProjKernel,
    (xs, xr): Operand,
    (ws, wr): Operand,
    bias: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
) -> Result<CpuStorage> {
    use crate::kernels::cpu::gemm::gemm_bt;
    let mnk = (m, n, k);
    Ok(match (xs, ws) {
        (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
            let avx2 = kernel == ProjKernel::Avx2Bf16;
            CpuStorage::BF16(half_gemm(&x[xr], &w[wr], bias, mnk, avx2))
        }
        (CpuStorage::F16(x), CpuStorage::F16(w)) => {
            let avx2 = kernel == ProjKernel::Avx2F16;
            CpuStorage::F16(half_gemm(&x[xr], &w[wr], bias, mnk, avx2))
        }
        (CpuStorage::F32(x), CpuStorage::F32(w)) => {
            let mut out = crate::pages::zeroed(m * n);
            gemm_bt(&x[xr], &w[wr], bias, &mut out, mnk);
            CpuStorage::F32(out)
        }
        _ => bail!("linear: expected a bf16, f16 or f32 input and weight of one dtype"),
    })
}

/// A half dtype's product into a new vector: the AVX2 kernel (`avx2`) or the AVX-512 one.
#[cfg(target_arch = "x86_64")]
fn half_gemm<T: crate::kernels::cpu::gemm_avx2::Half + crate::pages::Zero>(
    x: &[T],
    w: &[T],
    bias: Option<&[f32]>,
    mnk: (usize, usize, usize),
    avx2: bool,
) -> Vec<T> {
    use crate::kernels::cpu::gemm::{gemm_bt, gemm_bt_avx2};
    let mut out = crate::pages::zeroed(mnk.0 * mnk.1);
    if avx2 {
        gemm_bt_avx2(x, w, bias, &mut out, mnk)
    } else {
        gemm_bt(x, w, bias, &mut out, mnk)
    }
    out
}

/// Elsewhere never reached ([`fast_path`] is `None`).
#[cfg(not(target_arch = "x86_64"))]
fn gemm(
    _: ProjKernel,
    _: Operand,
    _: Operand,
    _: Option<&[f32]>,
    _: (usize, usize, usize),
) -> Result<CpuStorage> {
    bail!("linear: no SIMD GEMM on this architecture")
}

#[cfg(feature = "models")]
mod mlp;

#[cfg(feature = "models")]
pub(crate) use mlp::mlp;

#[cfg(test)]
mod tests;
