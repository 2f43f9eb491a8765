//! Loading the shipped cubins (or PTX) and launching them (the `cuda` feature).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, StorageRef, Tensor,
};
use half::{bf16, f16};

use super::artifact::{self, Artifact, Dt, KernelKind};
use super::{
    check_args, decode_combine_args, decode_split_args, dense_bias, fwd_args, strides3, use_decode,
    Arg, Flags,
};
use crate::kernels::AttnCall;

/// Tests: fill each output with 0xFF bytes (NaN in f16/bf16) before the kernel writes it, so
/// that an element the kernel never writes cannot pass for a stale correct value.
static POISON: AtomicBool = AtomicBool::new(false);

/// Sets the output poisoning of [`POISON`] (see `kernels::test_support::set_cuda_poison`).
pub(crate) fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// An xz blob, decompressed.
fn decompress(mut input: &[u8], what: &str) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut input, &mut out)
        .map(|_| out)
        .map_err(|e| format!("cannot decompress the shipped CUDA {what}: {e}"))
}

/// The uncompressed PTX blob, decompressed once.
fn ptx_blob() -> Result<&'static [u8]> {
    static BLOB: OnceLock<std::result::Result<Vec<u8>, String>> = OnceLock::new();
    match BLOB.get_or_init(|| decompress(include_bytes!("kernels.ptx.xz"), "PTX")) {
        Ok(v) => Ok(v),
        Err(e) => bail!("{e}"),
    }
}

/// The uncompressed cubin blob, decompressed once.
fn cubin_blob() -> Result<&'static [u8]> {
    static BLOB: OnceLock<std::result::Result<Vec<u8>, String>> = OnceLock::new();
    match BLOB.get_or_init(|| decompress(include_bytes!("kernels.cubin.xz"), "cubins")) {
        Ok(v) => Ok(v),
        Err(e) => bail!("{e}"),
    }
}

/// The variant's module on this GPU: its cubin where the GPU runs it, else its PTX (compiled by
/// the driver, which caches it); an `sm_80` cubin the driver refuses falls back to the PTX.
fn load_module(
    dev: &CudaDevice,
    info: &DeviceInfo,
    a: &Artifact,
) -> Result<Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>> {
    let ctx = dev.cuda_stream().context().clone();
    let load_ptx = || -> Result<_> {
        if a.ptx_len == 0 {
            bail!("no PTX shipped for the sm_{} {}", a.arch, a.entry)
        }
        let bytes = &ptx_blob()?[a.ptx_offset..a.ptx_offset + a.ptx_len];
        let Ok(src) = std::str::from_utf8(bytes) else {
            bail!("the shipped PTX of {} is not text", a.entry)
        };
        ctx.load_module(Ptx::from_src(src)).w()
    };
    match artifact::image_for(a.arch, info.major, info.minor) {
        Some(artifact::Image::Cubin) => {
            let bytes = &cubin_blob()?[a.cubin_offset..a.cubin_offset + a.cubin_len];
            match ctx.load_module(Ptx::from_binary(bytes.to_vec())).w() {
                Ok(m) => Ok(m),
                Err(e) if a.ptx_len > 0 => load_ptx().map_err(|p| {
                    candle_core::Error::Msg(format!(
                        "the sm_{} cubin of {} failed to load ({e}), and its PTX too ({p})",
                        a.arch, a.entry
                    ))
                }),
                Err(e) => Err(e),
            }
        }
        Some(artifact::Image::Ptx) => load_ptx(),
        None => bail!(
            "no sm_{} image of {} runs on compute capability {}.{}",
            a.arch,
            a.entry,
            info.major,
            info.minor
        ),
    }
}

/// What the launcher needs to know about a GPU, read once per device.
#[derive(Debug, Clone, Copy)]
struct DeviceInfo {
    major: i32,
    minor: i32,
    sms: usize,
    max_shared: u32,
}

fn device_info(dev: &CudaDevice) -> Result<DeviceInfo> {
    static INFO: OnceLock<Mutex<HashMap<candle_core::cuda_backend::DeviceId, DeviceInfo>>> =
        OnceLock::new();
    let map = INFO.get_or_init(Default::default);
    if let Some(i) = map.lock().ok().and_then(|m| m.get(&dev.id()).copied()) {
        return Ok(i);
    }
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let get = |a| ctx.attribute(a).w();
    use sys::CUdevice_attribute as A;
    let info = DeviceInfo {
        major: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        minor: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        sms: get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize,
        max_shared: get(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u32,
    };
    if let Ok(mut m) = map.lock() {
        m.insert(dev.id(), info);
    }
    Ok(info)
}

/// The variant's function on `dev`, its module loaded ([`load_module`]) and its shared-memory
/// limit raised once.
fn function(dev: &CudaDevice, index: usize, a: &Artifact) -> Result<CudaFunction> {
    type Cache = HashMap<(candle_core::cuda_backend::DeviceId, usize), CudaFunction>;
    static FUNCS: OnceLock<Mutex<Cache>> = OnceLock::new();
    let map = FUNCS.get_or_init(Default::default);
    let key = (dev.id(), index);
    if let Some(f) = map.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(f);
    }
    let module = load_module(dev, &device_info(dev)?, a)?;
    let func = module.load_function(a.entry).w()?;
    if a.shared_bytes > 48 * 1024 {
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            a.shared_bytes as i32,
        )
        .w()?;
    }
    if let Ok(mut m) = map.lock() {
        m.insert(key, func.clone());
    }
    Ok(func)
}

fn cuda_device(d: &Device) -> Option<&CudaDevice> {
    match d {
        Device::Cuda(c) => Some(c),
        _ => None,
    }
}

/// The variants a call would launch.
fn variants(
    c: &AttnCall,
    info: &DeviceInfo,
) -> std::result::Result<Vec<(usize, &'static Artifact)>, String> {
    let Some(arch) = artifact::arch_for(info.major, info.minor) else {
        return Err(format!(
            "the fused CUDA kernel needs compute capability 8.0 or later, this GPU has {}.{}",
            info.major, info.minor
        ));
    };
    let dt = Dt::of(c.q.dtype()).ok_or("f16/bf16 only")?;
    let has_bias = c.mask.bias().is_some() || c.mask.key_bias().is_some();
    let has_mods = c.mask.softcap().is_some() || c.mask.alibi_slopes().is_some();
    let kinds: &[KernelKind] = if use_decode(c) {
        &[KernelKind::DecodeSplit, KernelKind::DecodeCombine]
    } else {
        &[KernelKind::Fwd]
    };
    kinds
        .iter()
        .map(|&k| {
            artifact::find(k, arch, dt, c.d, has_bias, has_mods).ok_or_else(|| {
                format!(
                    "no compiled {k:?} variant for sm_{arch} {dt:?} head size {}",
                    c.d
                )
            })
        })
        .collect()
}

/// Why this GPU cannot run the call (compute capability, shared memory), if it cannot.
pub(super) fn unsupported_device(c: &AttnCall) -> Option<String> {
    let dev = cuda_device(c.q.device())?;
    let info = match device_info(dev) {
        Ok(i) => i,
        Err(e) => return Some(format!("cannot query the GPU: {e}")),
    };
    match variants(c, &info) {
        Err(why) => Some(why),
        Ok(vs) => vs
            .iter()
            .find(|(_, a)| a.shared_bytes + a.static_shared_bytes > info.max_shared)
            .map(|(_, a)| {
                format!(
                    "the {:?} variant needs {} bytes of shared memory a block, this GPU allows {}",
                    a.kind,
                    a.shared_bytes + a.static_shared_bytes,
                    info.max_shared
                )
            }),
    }
}

/// Runs an eligible call.
pub(super) fn forward(c: &AttnCall) -> Result<Tensor> {
    let Some(dev) = cuda_device(c.q.device()) else {
        bail!("the fused CUDA kernel needs CUDA tensors")
    };
    let info = device_info(dev)?;
    let vs = variants(c, &info).map_err(candle_core::Error::Msg)?;
    // The score modifiers' tensors as the kernel reads them: f32, contiguous, on q's GPU.
    let on_gpu = |t: &Tensor| -> Result<Tensor> {
        t.to_device(c.q.device())?
            .to_dtype(DType::F32)?
            .contiguous()
    };
    let op = CudaAttention {
        b: c.b,
        l: c.l,
        h: c.h,
        hkv: c.hkv,
        s: c.s,
        d: c.d,
        flags: Flags::of(c),
        bias: dense_bias(c)?,
        alibi: c.mask.alibi_slopes().map(on_gpu).transpose()?,
        sinks: c.mask.sinks().map(on_gpu).transpose()?,
        key_ranges: c.mask.key_ranges().map(|r| {
            r.iter()
                .flat_map(|&(lo, hi)| [lo as i32, hi as i32])
                .collect()
        }),
        packed: c.mask.packed_offsets().map(|(q, k)| {
            (
                q.iter().map(|&x| x as i32).collect(),
                k.iter().map(|&x| x as i32).collect(),
            )
        }),
        variants: vs,
        sms: info.sms,
    };
    c.q.apply_op3_no_bwd(c.k, c.v, &op)
}

/// One launch's inputs besides q, k, v.
struct CudaAttention {
    b: usize,
    l: usize,
    h: usize,
    hkv: usize,
    s: usize,
    d: usize,
    flags: Flags,
    bias: Option<Tensor>,
    /// ALiBi slopes, `(1 or sequences, H)` f32 contiguous.
    alibi: Option<Tensor>,
    /// Sink logits, `(H,)` f32 contiguous.
    sinks: Option<Tensor>,
    key_ranges: Option<Vec<i32>>,
    packed: Option<(Vec<i32>, Vec<i32>)>,
    variants: Vec<(usize, &'static Artifact)>,
    sms: usize,
}

fn ptr<T>(
    s: &CudaStorage,
    layout: &Layout,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64>
where
    T: CudaDType + DeviceRepr,
{
    let slice = s.as_cuda_slice::<T>()?;
    let (p, _sync) = slice.device_ptr(stream);
    Ok(p + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// The device address of a held f32 tensor's first element, 0 for none (the kernel's flags then
/// never read it).
fn f32_ptr(
    held: &Option<(StorageRef<'_>, &Layout)>,
    what: &str,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64> {
    match held {
        Some((st, lay)) => match &**st {
            Storage::Cuda(cs) => ptr::<f32>(cs, lay, stream),
            _ => bail!("the {what} are not on the GPU"),
        },
        None => Ok(0),
    }
}

fn launch(
    dev: &CudaDevice,
    (index, a): (usize, &Artifact),
    grid: (u32, u32, u32),
    args: &[(&str, Arg)],
) -> Result<()> {
    check_args(a, args).map_err(candle_core::Error::Msg)?;
    let func = function(dev, index, a)?;
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(&func);
    for (_, arg) in args {
        match arg {
            Arg::Ptr(p) => builder.arg(p),
            Arg::I32(x) => builder.arg(x),
            Arg::I64(x) => builder.arg(x),
            Arg::F32(x) => builder.arg(x),
        };
    }
    let scratch = 0u64; // global and profile scratch: the manifest holds variants needing none
    builder.arg(&scratch);
    builder.arg(&scratch);
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (32 * a.num_warps, 1, 1),
        shared_mem_bytes: a.shared_bytes,
    };
    // SAFETY: the arguments match the PTX entry by name and type (checked above), every pointer
    // is a live device allocation or 0 where the kernel's flags never read it, and the grid
    // covers the shapes the pointers were sized for.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

impl CudaAttention {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        (sq, lq): (&CudaStorage, &Layout),
        (sk, lk): (&CudaStorage, &Layout),
        (sv, lv): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &sq.device;
        let stream = dev.cuda_stream();
        let (b, l, h, s, d) = (self.b, self.l, self.h, self.s, self.d);
        let group = h / self.hkv;
        let n = b * l * h * d;
        // SAFETY: every element is written by the kernel (each row, fully masked or not).
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n.max(1)) }?;
        let o_strides = [
            if b == 1 { 0 } else { l * h * d },
            if l == 1 { 0 } else { h * d },
            if h == 1 { 0 } else { d },
        ];
        let (pq, pk, pv) = (
            ptr::<T>(sq, lq, &stream)?,
            ptr::<T>(sk, lk, &stream)?,
            ptr::<T>(sv, lv, &stream)?,
        );
        let ranges = match &self.key_ranges {
            Some(r) => Some(dev.clone_htod(r.as_slice())?),
            None => None,
        };
        let pr = match &ranges {
            Some(r) => r.device_ptr(&stream).0,
            None => 0,
        };
        let bias_guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let (pb, m_strides) = match &bias_guard {
            Some((st, lay)) => match &**st {
                Storage::Cuda(cs) => (ptr::<f32>(cs, lay, &stream)?, strides_bias(lay)),
                _ => bail!("the attention bias is not on the GPU"),
            },
            None => (0, [0; 3]),
        };
        let has_bias = bias_guard.is_some();
        let alibi_guard = self.alibi.as_ref().map(|t| t.storage_and_layout());
        let sinks_guard = self.sinks.as_ref().map(|t| t.storage_and_layout());
        let pa = f32_ptr(&alibi_guard, "ALiBi slopes", &stream)?;
        let ps = f32_ptr(&sinks_guard, "attention sinks", &stream)?;
        let (po, _og) = out.device_ptr_mut(&stream);
        if POISON.load(Ordering::Relaxed) {
            use candle_core::cuda_backend::cudarc::driver::result::memset_d8_async;
            // SAFETY: `po` is this allocation of `n * size_of::<T>()` bytes, on this stream.
            unsafe { memset_d8_async(po, 0xFF, n * std::mem::size_of::<T>(), stream.cu_stream()) }
                .w()?;
        }
        let (sq3, sk3, sv3) = (strides3(lq), strides3(lk), strides3(lv));
        if self.variants[0].1.kind == KernelKind::DecodeSplit {
            let split = self.variants[0];
            let programs = b * self.hkv;
            let (splits, chunk) = super::decode_splits(s, split.1.block_n, programs, self.sms);
            let rows = b * h * l * splits;
            // SAFETY: the split kernel writes every (row, split) entry these hold.
            let mut part_o: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows * d) }?;
            let mut part_m: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows) }?;
            let mut part_l: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows) }?;
            let (ppo, _g1) = part_o.device_ptr_mut(&stream);
            let (ppm, _g2) = part_m.device_ptr_mut(&stream);
            let (ppl, _g3) = part_l.device_ptr_mut(&stream);
            let args = decode_split_args(
                [pq, pk, pv, pb, pr, pa, ppo, ppm, ppl],
                sq3,
                sk3,
                sv3,
                m_strides,
                (l, s, h, group),
                self.flags,
                has_bias,
                (chunk, splits),
            );
            launch(
                dev,
                split,
                (splits as u32, b as u32, self.hkv as u32),
                &args,
            )?;
            let args = decode_combine_args(
                [ppo, ppm, ppl, po, ps],
                o_strides,
                (l, h, splits),
                self.flags,
            );
            launch(dev, self.variants[1], (l as u32, h as u32, b as u32), &args)?;
        } else {
            let fwd = self.variants[0];
            let bm = fwd.1.block_m;
            let (cu, seqs, max_rows) = match &self.packed {
                Some((cq, ck)) => {
                    let max = cq
                        .windows(2)
                        .map(|w| (w[1] - w[0]) as usize)
                        .max()
                        .unwrap_or(0);
                    let mut all = cq.clone();
                    all.extend_from_slice(ck);
                    (Some(dev.clone_htod(all.as_slice())?), cq.len() - 1, max)
                }
                None => (None, b, l),
            };
            let (pcq, pck) = match &cu {
                Some(c) => {
                    let p = c.device_ptr(&stream).0;
                    let nq = self.packed.as_ref().map_or(0, |(cq, _)| cq.len());
                    (p, p + (nq * 4) as u64)
                }
                None => (0, 0),
            };
            let args = fwd_args(
                [pq, pk, pv, po, pb, pr, pcq, pck, pa, ps],
                sq3,
                sk3,
                sv3,
                o_strides,
                m_strides,
                (l, s, group),
                self.flags,
                self.packed.is_some(),
            );
            let grid = (max_rows.div_ceil(bm).max(1) as u32, seqs as u32, h as u32);
            launch(dev, fwd, grid, &args)?;
        }
        drop(_og);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, l, h, d)),
        ))
    }
}

/// A 4-D bias's `(batch, head, row)` strides, 0 where it broadcasts.
fn strides_bias(layout: &Layout) -> [usize; 3] {
    let dims = layout.dims();
    let st = layout.stride();
    [0, 1, 2].map(|i| if dims[i] == 1 { 0 } else { st[i] })
}

impl CustomOp3 for CudaAttention {
    fn name(&self) -> &'static str {
        "candle-mha-cuda-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused CUDA kernel got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match sq.dtype() {
            DType::F16 => self.run::<f16>((sq, lq), (sk, lk), (sv, lv)),
            DType::BF16 => self.run::<bf16>((sq, lq), (sk, lk), (sv, lv)),
            other => bail!("the fused CUDA kernel takes f16/bf16, got {other:?}"),
        }
    }
}
