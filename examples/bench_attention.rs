//! Attention-core and module-forward timings on CPU: the reference path, the fused CPU kernel,
//! candle-nn's `attention::flash_attn`, and PyTorch (`F.scaled_dot_product_attention` and
//! `nn.MultiheadAttention`), in one session; plus peak RSS for long causal runs.
//!
//! ```text
//! cargo run --release --example bench_attention -- --python /root/.venv-torch/bin/python
//! cargo run --release --example bench_attention -- --crossover   # Backend::Auto's threshold
//! cargo run --release --example bench_attention -- --modifiers   # softcap / ALiBi / sinks costs
//! cargo run --release --example bench_attention -- --paged       # decode over a paged pool vs dense
//! cargo run --release --example bench_attention -- --kv-formats  # decode over bf16 / int8 / fp8 caches
//! ```
//!
//! PyTorch runs in `scripts/bench_attention_torch.py`, a child process kept alive for the whole
//! session (`torch.set_num_threads` = rayon's thread count). For each config the two sides are
//! interleaved round by round (candle, torch, candle, torch, ...) so that both see the same
//! machine load; every number is the median over all rounds' repetitions. Peak RSS is measured
//! in fresh child processes (this example re-run with `--child`, or the torch script with
//! `--peak`), one run each, as the process's high-water mark (`VmHWM` / `ru_maxrss`).
//!
//! At the end, the machine's rates: candle's f32 GEMM (the causal configs' GFLOP/s are put
//! against it) and a 1 GiB copy and streaming read of random bytes. Decode configs are also
//! held to a copy (one thread, and rayon's threads) and a streaming read of K's and V's own
//! bytes, timed in the same rounds right after the fused runs: on a VM a buffer's rate depends
//! on its pages and its contents (constant bytes can copy twice as fast).
//!
//! Options: `--python PY` (default `$CANDLE_MHA_BENCH_PYTHON` or `python3`), `--no-torch`,
//! `--rounds N` (default 3), `--only SUBSTR` (configs whose name contains it), `--no-peak`,
//! `--no-reference-8k` (skip the ~13 GB reference run at L=8192), `--dtype f32|bf16|f16` (inputs,
//! weights and PyTorch's side; candle-nn's flash_attn is f32 only), `--isa avx512bf16|avx512|avx2|portable`
//! (force the instruction set of the fused kernel and of the projections' GEMMs, e.g. to time the AVX2 path on an AVX-512 CPU; with
//! `avx2` PyTorch is held to AVX2 too, as on a CPU without AVX-512: `ATEN_CPU_CAPABILITY=avx2`,
//! `ONEDNN_MAX_CPU_ISA=AVX2`, `MKL_ENABLE_INSTRUCTIONS=AVX2` in its environment, unless
//! `--torch-native`), `--no-module` (attention core only).

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_mha::kernels::test_support::{peak_gflops, PeakKind};
use candle_mha::kernels::{attention, test_support, AttnParams};
use candle_mha::mask::{Causal, KeyPaddingMask, MaskDims, MaskPlan};
use candle_mha::{Backend, CausalAlignment, MhaConfig, MhaInput, MultiHeadAttention};
use candle_nn::{VarBuilder, VarMap};

#[path = "common/timing.rs"]
mod timing;
use timing::{loadavg, median, time_it};

#[path = "common/torch.rs"]
mod torch;
use serde_json::{json, Value};
use torch::{script, Torch};

/// The dtype of every input, weight and module (`--dtype`).
static DTYPE: std::sync::OnceLock<DType> = std::sync::OnceLock::new();

fn dtype() -> DType {
    *DTYPE.get().unwrap_or(&DType::F32)
}

fn dtype_name() -> &'static str {
    match dtype() {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// One benchmark configuration.
#[derive(Clone, Debug)]
struct Cfg {
    name: &'static str,
    b: usize,
    l: usize,
    s: usize,
    e: usize,
    h: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    pad: Option<Vec<usize>>,
    /// Timed repetitions per round.
    reps: usize,
}

fn configs() -> Vec<Cfg> {
    vec![
        Cfg {
            name: "B8 L128 E768 H12 pad",
            b: 8,
            l: 128,
            s: 128,
            e: 768,
            h: 12,
            hkv: 12,
            d: 64,
            causal: false,
            pad: Some(vec![128, 100, 77, 128, 50, 90, 128, 64]),
            reps: 10,
        },
        Cfg {
            name: "B4 L512 E768 H12 pad",
            b: 4,
            l: 512,
            s: 512,
            e: 768,
            h: 12,
            hkv: 12,
            d: 64,
            causal: false,
            pad: Some(vec![512, 300, 450, 200]),
            reps: 5,
        },
        Cfg {
            name: "causal B1 L2048 E1024 H16",
            b: 1,
            l: 2048,
            s: 2048,
            e: 1024,
            h: 16,
            hkv: 16,
            d: 64,
            causal: true,
            pad: None,
            reps: 3,
        },
        Cfg {
            name: "causal B1 L8192 E768 H12",
            b: 1,
            l: 8192,
            s: 8192,
            e: 768,
            h: 12,
            hkv: 12,
            d: 64,
            causal: true,
            pad: None,
            reps: 1,
        },
        Cfg {
            name: "decode B8 L1 S4096 H32 Hkv8 D128",
            b: 8,
            l: 1,
            s: 4096,
            e: 4096,
            h: 32,
            hkv: 8,
            d: 128,
            causal: true,
            pad: None,
            reps: 5,
        },
    ]
}

fn long_causal(l: usize) -> Cfg {
    Cfg {
        name: "causal B1 E768 H12 (peak)",
        b: 1,
        l,
        s: l,
        e: 768,
        h: 12,
        hkv: 12,
        d: 64,
        causal: true,
        pad: None,
        reps: 1,
    }
}

/// Environment of the PyTorch child processes (set by `--isa avx2`: PyTorch held to AVX2).
static TORCH_ENV: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
    std::sync::OnceLock::new();

/// The inputs of one config on the candle side.
struct Inputs {
    /// `(B, L, H, D)` / `(B, S, Hkv, D)`: the layout of our kernels and of candle-nn's
    /// flash_attn.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskPlan,
    kpm: Option<KeyPaddingMask>,
    x: Tensor,
    kv: Tensor,
    module_ref: MultiHeadAttention,
    module_auto: MultiHeadAttention,
}

fn alignment(c: &Cfg) -> CausalAlignment {
    if c.l == c.s {
        CausalAlignment::TopLeft
    } else {
        CausalAlignment::BottomRight
    }
}

impl Inputs {
    fn new(c: &Cfg, with_module: bool) -> Result<Self> {
        let dev = Device::Cpu;
        let dt = dtype();
        let q = Tensor::randn(0f32, 1., (c.b, c.l, c.h, c.d), &dev)?.to_dtype(dt)?;
        let k = Tensor::randn(0f32, 1., (c.b, c.s, c.hkv, c.d), &dev)?.to_dtype(dt)?;
        let v = Tensor::randn(0f32, 1., (c.b, c.s, c.hkv, c.d), &dev)?.to_dtype(dt)?;
        let kpm = match &c.pad {
            None => None,
            Some(lens) => {
                let m: Vec<u8> = (0..c.b * c.s)
                    .map(|i| u8::from(i % c.s >= lens[i / c.s]))
                    .collect();
                Some(KeyPaddingMask::new(Tensor::from_vec(m, (c.b, c.s), &dev)?))
            }
        };
        let mask = MaskPlan::build(
            MaskDims {
                batch: c.b,
                heads: c.h,
                q_len: c.l,
                kv_len: c.s,
                unbatched: false,
            },
            kpm.as_ref(),
            None,
            c.causal.then(|| Causal::new(alignment(c))),
            DType::F32,
            &dev,
        )?;
        let (x, kv) = if with_module {
            let x = Tensor::randn(0f32, 1., (c.b, c.l, c.e), &dev)?.to_dtype(dt)?;
            let kv = if c.l == c.s {
                x.clone()
            } else {
                Tensor::randn(0f32, 1., (c.b, c.s, c.e), &dev)?.to_dtype(dt)?
            };
            (x, kv)
        } else {
            let z = Tensor::zeros(1, DType::F32, &dev)?;
            (z.clone(), z)
        };
        let (e, h) = if with_module { (c.e, c.h) } else { (8, 1) };
        let mut cfg = MhaConfig::new(e, h).with_batch_first(true);
        if with_module && c.hkv != c.h {
            cfg = cfg.with_num_kv_heads(c.hkv).with_head_dim(c.d);
        }
        // Random weights from a VarMap, then detached: a module whose weights are `Var`s is
        // tracked by autograd and (by rule) always takes the reference path.
        let varmap = VarMap::new();
        MultiHeadAttention::new(
            cfg.clone(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )?;
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(weights.clone(), dt, &dev);
        let module_ref = MultiHeadAttention::new(cfg.clone().with_backend(Backend::Reference), vb)?;
        let vb = VarBuilder::from_tensors(weights, dt, &dev);
        let module_auto = MultiHeadAttention::new(cfg.with_backend(Backend::Auto), vb)?;
        Ok(Self {
            q,
            k,
            v,
            mask,
            kpm,
            x,
            kv,
            module_ref,
            module_auto,
        })
    }

    fn core(&self, c: &Cfg, backend: Backend) -> Result<Tensor> {
        let mut p = AttnParams::new(c.d);
        p.backend = backend;
        Ok(attention(&self.q, &self.k, &self.v, &self.mask, &p)?.output)
    }

    fn flash(&self, c: &Cfg) -> Result<Tensor> {
        use candle_nn::attention::AttnMask as FMask;
        let mask = match (&c.pad, c.causal && c.l > 1) {
            (Some(_), _) => {
                // An additive (B, 1, L, S)-style mask: the only way to express padding.
                let t = self
                    .mask
                    .materialize(0, DType::F32, &Device::Cpu)?
                    .context("mask")?;
                FMask::Mask(t.broadcast_as((c.b, c.h, c.l, c.s))?.contiguous()?)
            }
            (None, true) => FMask::causal(),
            (None, false) => FMask::None,
        };
        if dtype() != DType::F32 {
            bail!("the f32 build of candle-nn's flash_attn is the one benchmarked")
        }
        let scale = 1.0 / (c.d as f32).sqrt();
        Ok(candle_nn::attention::flash_attn::<f32>(
            &self.q, &self.k, &self.v, scale, mask, None, None,
        )?)
    }

    fn module(&self, c: &Cfg, fused: bool) -> Result<Tensor> {
        let mut input = if c.l == c.s {
            MhaInput::new(self.x.clone())
        } else {
            MhaInput::cross(self.x.clone(), self.kv.clone(), self.kv.clone())
        };
        if let Some(k) = &self.kpm {
            input = input.key_padding_mask(k.clone());
        }
        if c.causal {
            input = input.causal(alignment(c));
        }
        let m = if fused {
            &self.module_auto
        } else {
            &self.module_ref
        };
        Ok(m.attend(&input)?.output)
    }
}

fn torch_req(c: &Cfg, kind: &str) -> Value {
    json!({"kind": kind, "b": c.b, "l": c.l, "s": c.s, "e": c.e, "h": c.h, "hkv": c.hkv,
           "d": c.d, "causal": c.causal, "pad": c.pad, "reps": c.reps, "dtype": dtype_name()})
}

/// Bytes of K and V in a config (what decode reads).
fn kv_bytes(c: &Cfg) -> usize {
    2 * c.b * c.s * c.hkv * c.d * dtype().size_in_bytes()
}

/// A memory copy and a streaming read of K's and V's own bytes: their pages and contents (on a
/// VM a buffer's rate depends on both), the copy into a new buffer.
struct MemProbe<'a> {
    src: [&'a [u8]; 2],
    dst: Vec<u8>,
}

/// The bytes of a contiguous CPU tensor's storage.
fn storage_bytes(t: &Tensor) -> Result<&[u8]> {
    use candle_core::{CpuStorage, Storage};
    let (st, layout) = t.storage_and_layout();
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("not contiguous")
    };
    let (ptr, size) = match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => (v[a..b].as_ptr().cast::<u8>(), 4),
        Storage::Cpu(CpuStorage::BF16(v)) => (v[a..b].as_ptr().cast::<u8>(), 2),
        Storage::Cpu(CpuStorage::F16(v)) => (v[a..b].as_ptr().cast::<u8>(), 2),
        _ => bail!("an f32, bf16 or f16 CPU tensor"),
    };
    // SAFETY: the storage outlives the borrow of `t` (the tensor holds it), and `b - a`
    // elements of `size` bytes start at `ptr`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, (b - a) * size) })
}

impl<'a> MemProbe<'a> {
    fn new(k: &'a Tensor, v: &'a Tensor) -> Result<Self> {
        let src = [storage_bytes(k)?, storage_bytes(v)?];
        let dst = vec![0; src[0].len() + src[1].len()];
        Ok(Self { src, dst })
    }

    /// One single-threaded copy (`copy_from_slice`, the libc `memmove`).
    fn copy(&mut self) -> Result<()> {
        let n = self.src[0].len();
        self.dst[..n].copy_from_slice(self.src[0]);
        self.dst[n..].copy_from_slice(self.src[1]);
        std::hint::black_box(&self.dst);
        Ok(())
    }

    /// The same copy on rayon's threads, 1 MiB each.
    fn copy_par(&mut self) -> Result<()> {
        use rayon::prelude::*;
        let n = self.src[0].len();
        let (d0, d1) = self.dst.split_at_mut(n);
        for (src, dst) in [(self.src[0], d0), (self.src[1], d1)] {
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
        std::hint::black_box(&self.dst);
        Ok(())
    }

    /// The sum of the bytes as u64 words on rayon's threads, 1 MiB each (a loop the compiler
    /// vectorises).
    fn read(&self) -> Result<()> {
        std::hint::black_box(sum_words(self.src[0]).wrapping_add(sum_words(self.src[1])));
        Ok(())
    }
}

/// Rows of the result table: label → samples (None: not applicable / refused, with a reason).
#[derive(Default)]
struct Row {
    samples: Vec<f64>,
    note: Option<String>,
}

impl Row {
    fn add(&mut self, r: Result<Vec<f64>>) {
        match r {
            Ok(v) => self.samples.extend(v),
            Err(e) => {
                self.note
                    .get_or_insert_with(|| e.to_string().lines().next().unwrap_or("").into());
            }
        }
    }
    fn med(&self) -> f64 {
        median(self.samples.clone())
    }
}

fn fmt_t(t: f64) -> String {
    if t.is_nan() {
        "—".into()
    } else if t < 1e-3 {
        format!("{:.1} µs", t * 1e6)
    } else if t < 1.0 {
        format!("{:.2} ms", t * 1e3)
    } else {
        format!("{t:.3} s")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() {
        "—".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn vm_hwm() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmHWM")?.parse()?;
    Ok(kb * 1024)
}

/// `--child L WHAT [DTYPE]`: one run in a fresh process, in the parent's `--dtype`; prints
/// `{"secs", "peak_rss_bytes"}`.
fn child(l: usize, what: &str) -> Result<()> {
    let c = long_causal(l);
    let with_module = what.starts_with("module");
    let inp = Inputs::new(&c, with_module)?;
    let base = vm_hwm()?;
    let t = Instant::now();
    let out = match what {
        "fused" => inp.core(&c, Backend::CpuFused)?,
        "reference" => inp.core(&c, Backend::Reference)?,
        "flash" => inp.flash(&c)?,
        "module-fused" => inp.module(&c, true)?,
        "module-reference" => inp.module(&c, false)?,
        other => bail!("unknown child run {other}"),
    };
    let secs = t.elapsed().as_secs_f64();
    drop(out);
    println!(
        "{}",
        json!({"secs": secs, "peak_rss_bytes": vm_hwm()?, "baseline_rss_bytes": base})
    );
    Ok(())
}

fn run_child(args: &[String]) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!(
            "child {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `n` pseudo-random bytes (xorshift64).
fn random_bytes(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = vec![0u8; n];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// GB/s (read + write) of a single-threaded copy of `src` into a new buffer, median of 5.
fn copy_rate_of(src: &[u8]) -> Result<f64> {
    let mut dst = vec![0u8; src.len()];
    let t = median(time_it(5, || {
        dst.copy_from_slice(src);
        std::hint::black_box(&dst);
        Ok(())
    })?);
    Ok(2.0 * src.len() as f64 / t / 1e9)
}

/// The wrapping sum of `bytes` as u64 words (the bytes outside whole words added one by one),
/// on rayon's threads, 1 MiB each.
fn sum_words(bytes: &[u8]) -> u64 {
    use rayon::prelude::*;
    bytes
        .par_chunks(1 << 20)
        .map(|c| {
            // SAFETY: every bit pattern is a valid u64.
            let (head, words, tail) = unsafe { c.align_to::<u64>() };
            let rest = head.iter().chain(tail).fold(0u64, |a, &x| a + x as u64);
            words.iter().fold(rest, |a, &x| a.wrapping_add(x))
        })
        .sum()
}

/// This machine's f32 GEMM rate, memory-copy bandwidth and streaming-read rate, measured now, and what the fused
/// kernel achieved against them: GFLOP/s on the causal configs (`4·H·D·L(L+1)/2` per batch
/// element), GB/s of K and V read on the decode config.
fn rates(results: &[(Cfg, Vec<Row>)]) -> Result<()> {
    let dev = Device::Cpu;
    let n = 4096;
    let a = Tensor::randn(0f32, 1., (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1., (n, n), &dev)?;
    let gemm = median(time_it(3, || a.matmul(&b).map(drop).map_err(Into::into))?);
    let gemm_rate = 2.0 * (n as f64).powi(3) / gemm / 1e9;
    let bytes = 1usize << 30;
    // Random bytes, like K's and V's: on this VM a buffer of constant bytes (`vec![1; n]`)
    // was often copied about twice as fast as random bytes (66–70 vs 36 GB/s in one process),
    // a rate no real tensor gets; the constant rate is printed for comparison.
    let src = random_bytes(bytes);
    let copy_rate = copy_rate_of(&src)?;
    let constant_copy_rate = copy_rate_of(&vec![1u8; bytes])?;
    // A plain streaming read on rayon's threads (what decode does with K and V): the sum of
    // 1 GiB of u64 words, a loop the compiler vectorises.
    let read = median(time_it(5, || {
        std::hint::black_box(sum_words(&src));
        Ok(())
    })?);
    let read_rate = bytes as f64 / read / 1e9;
    drop(src);
    // The compute limit: register-only loops of the product instructions the kernels use, on
    // rayon's threads at once (the f32 FMA of the instruction set in use; vdpbf16ps too when
    // the bf16 kernels use it).
    let threads = rayon::current_num_threads();
    let isa = test_support::cpu_isa();
    let fma_kind = if isa.starts_with("avx512") {
        PeakKind::Avx512Fma
    } else {
        PeakKind::Avx2Fma
    };
    let fma_peak = peak_gflops(fma_kind, threads, 200);
    let dot_peak = (isa == "avx512bf16")
        .then(|| peak_gflops(PeakKind::Avx512Bf16Dot, threads, 200))
        .flatten();
    println!("\nMachine rates (measured now): f32 GEMM {n}³ (candle matmul, the `gemm` crate): {gemm_rate:.0} GFLOP/s; memory copy of 1 GiB of random bytes: {copy_rate:.1} GB/s (read + write; of constant bytes: {constant_copy_rate:.1}); streaming read of 1 GiB: {read_rate:.1} GB/s");
    println!(
        "Peak ({threads} threads, register-only loops): {} {}{}\n",
        fma_kind.name(),
        fma_peak.map_or("—".into(), |p| format!("{p:.0} GFLOP/s")),
        dot_peak.map_or(String::new(), |p| format!(
            "; {} {p:.0} GFLOP/s",
            PeakKind::Avx512Bf16Dot.name()
        ))
    );
    let of_peak = |rate: f64| -> String {
        let mut v = vec![];
        if let Some(p) = fma_peak {
            v.push(format!("{:.0}% of the f32 FMA peak", 100.0 * rate / p));
        }
        if let (Some(p), DType::BF16) = (dot_peak, dtype()) {
            v.push(format!("{:.0}% of the vdpbf16ps peak", 100.0 * rate / p));
        }
        v.join(", ")
    };
    // The projections' matmul in the bench's dtype: ours (the weight packed once, as the
    // module keeps it) and candle's, at 4096³, a BERT-base projection's shape (B8 L128 E768)
    // and a decode step's.
    for (m, k, nn) in [(n, n, n), (1024, 768, 768), (8, 4096, 4096)] {
        let which = match (
            m >= test_support::packed_min_rows(),
            test_support::packed_gemm_kernel(dtype()),
            test_support::proj_gemm_kernel(dtype()),
        ) {
            (true, Some(k), _) | (false, _, Some(k)) => k.to_string(),
            _ => "candle's path".to_string(),
        };
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?.to_dtype(dtype())?;
        let w = Tensor::randn(0f32, 1., (nn, k), &dev)?.to_dtype(dtype())?;
        let lin = candle_nn::Linear::new(w, None);
        let packed = test_support::PackedLinear::new(lin.clone());
        let rate = |t: f64| 2.0 * (m * k * nn) as f64 / t / 1e9;
        let reps = if m == n { 3 } else { 10 };
        let ours = median(time_it(reps, || {
            packed.forward(&x).map(drop).map_err(Into::into)
        })?);
        let theirs = median(time_it(reps, || {
            candle_nn::Module::forward(&lin, &x)
                .map(drop)
                .map_err(Into::into)
        })?);
        println!(
            "{} projection GEMM ({m}, {k}) · ({nn}, {k})ᵀ: ours ({which}) {:.0} GFLOP/s ({}), candle's matmul {:.0} GFLOP/s",
            dtype_name(),
            rate(ours),
            of_peak(rate(ours)),
            rate(theirs)
        );
    }
    println!();
    println!("| config | fused | achieved | of the machine's |");
    println!("|---|---|---|---|");
    for (c, rows) in results {
        let t = rows[1].med();
        if t.is_nan() {
            continue;
        }
        if c.l == 1 {
            let kv = kv_bytes(c) as f64;
            let rate = kv / t / 1e9;
            let (copy1, copy2) = (
                2.0 * kv / rows[7].med() / 1e9,
                2.0 * kv / rows[9].med() / 1e9,
            );
            let read = kv / rows[8].med() / 1e9;
            let pct = |x: f64| 100.0 * rate / x;
            println!(
                "| {} | {} | {rate:.1} GB/s of K/V | {:.0}% of a copy of 1 GiB; of K's and V's own {:.0} MB timed in the same rounds: {:.0}% of a copy ({copy1:.1} GB/s), {:.0}% of a copy on {} threads ({copy2:.1} GB/s), {:.0}% of a streaming read ({read:.1} GB/s) |",
                c.name,
                fmt_t(t),
                pct(copy_rate),
                kv / 1e6,
                pct(copy1),
                pct(copy2),
                rayon::current_num_threads(),
                pct(read),
            );
        } else if c.causal {
            let flops = 4.0 * (c.b * c.h * c.d) as f64 * (c.l * (c.l + 1) / 2) as f64;
            let rate = flops / t / 1e9;
            println!(
                "| {} | {} | {rate:.0} GFLOP/s | {}; {:.0}% of candle's GEMM |",
                c.name,
                fmt_t(t),
                of_peak(rate),
                100.0 * rate / gemm_rate
            );
        }
    }
    Ok(())
}

/// `--modifiers`: what the score modifiers cost the fused kernel on long causal attention (B1
/// H12 D64, the bench's dtype): plain, soft-capping (Gemma 2's 50), ALiBi (the usual slopes),
/// sinks, all three; alternating rounds, medians, each as a ratio to plain and a share of the
/// f32 FMA peak measured in the same run. Forward only, then forward + backward.
fn modifier_costs(rounds: usize, d: usize, lengths: &[usize]) -> Result<()> {
    let dev = Device::Cpu;
    let h = 12usize;
    let threads = rayon::current_num_threads();
    let isa = test_support::cpu_isa();
    let kind = if isa.starts_with("avx512") {
        PeakKind::Avx512Fma
    } else {
        PeakKind::Avx2Fma
    };
    let slopes: Vec<f32> = candle_mha::MhaConfig::standard_alibi_slopes(h)
        .iter()
        .map(|&m| m as f32)
        .collect();
    let slopes = Tensor::new(slopes, &dev)?;
    let sinks = Tensor::randn(0f32, 1., h, &dev)?;
    let names = ["plain", "softcap 50", "alibi", "sinks", "all three"];
    println!(
        "dtype {}, {threads} threads, fused kernel ISA {isa}, load at start: {}",
        dtype_name(),
        loadavg()
    );
    let mut table = vec![];
    for &l in lengths {
        let dt = dtype();
        let t =
            |shape| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dt)?) };
        let (q, k, v) = (t((1, l, h, d))?, t((1, l, h, d))?, t((1, l, h, d))?);
        let g = t((1, l, h, d))?;
        let base =
            MaskPlan::new(MaskDims::new(1, h, l, l)).with_causal(CausalAlignment::TopLeft)?;
        let plans = [
            base.clone(),
            base.clone().with_softcap(50.0)?,
            base.clone().with_alibi_slopes(&slopes)?,
            base.clone().with_sinks(&sinks)?,
            base.with_softcap(50.0)?
                .with_alibi_slopes(&slopes)?
                .with_sinks(&sinks)?,
        ];
        let mut p = AttnParams::new(d);
        p.backend = Backend::CpuFused;
        let reps = if l >= 8192 { 2 } else { 5 };
        let (mut fwd, mut train) = (vec![vec![]; plans.len()], vec![vec![]; plans.len()]);
        for _ in 0..rounds {
            for (i, plan) in plans.iter().enumerate() {
                fwd[i].extend(time_it(reps, || {
                    attention(&q, &k, &v, plan, &p).map(drop)?;
                    Ok(())
                })?);
                let (qv, kv, vv) = (
                    candle_core::Var::from_tensor(&q)?,
                    candle_core::Var::from_tensor(&k)?,
                    candle_core::Var::from_tensor(&v)?,
                );
                train[i].extend(time_it(1, || {
                    let o = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), plan, &p)?;
                    (o.output * &g)?.sum_all()?.backward()?;
                    Ok(())
                })?);
            }
        }
        let fwd: Vec<f64> = fwd.into_iter().map(median).collect();
        let train: Vec<f64> = train.into_iter().map(median).collect();
        table.push((l, fwd, train));
    }
    let peak = peak_gflops(kind, threads, 200);
    println!(
        "peak ({threads} threads, register-only): {} {}\n",
        kind.name(),
        peak.map_or("—".into(), |p| format!("{p:.0} GFLOP/s"))
    );
    println!("| causal B1 H12 D{d} | modifiers | forward | / plain | GFLOP/s (share of peak) | forward + backward | / plain |");
    println!("|---|---|---|---|---|---|---|");
    for (l, fwd, train) in &table {
        let flops = 4.0 * (h * d) as f64 * (*l as f64) * (*l as f64 + 1.0) / 2.0;
        for (i, name) in names.iter().enumerate() {
            let rate = flops / fwd[i] / 1e9;
            println!(
                "| L{l} | {name} | {} | {:.3} | {rate:.0} ({}) | {} | {:.3} |",
                fmt_t(fwd[i]),
                fwd[i] / fwd[0],
                peak.map_or("—".into(), |p| format!("{:.0}%", 100.0 * rate / p)),
                fmt_t(train[i]),
                train[i] / train[0]
            );
        }
    }
    println!("load at end: {}", loadavg());
    Ok(())
}

/// `--kv-formats`: the decode core (B8 L1 H32 Hkv8 D128, bf16 queries) over a bf16, an int8
/// and an fp8 `KvCache` at S = 4096, 16384, 32768: alternating rounds, medians, the bytes each
/// step reads (K and V, and the quantized rows' scales) and the rate against a streaming read
/// of the bf16 cache's bytes measured in the same round.
fn kv_formats(rounds: usize) -> Result<()> {
    use candle_mha::kernels::test_support::attention_over_cache;
    use candle_mha::{KvCache, KvFormat};
    let dev = Device::Cpu;
    let (b, h, hkv, d) = (8usize, 32usize, 8usize, 128usize);
    println!(
        "decode core B{b} L1 H{h} Hkv{hkv} D{d}, bf16 queries, {} threads, fused kernel ISA {}, load at start: {}",
        rayon::current_num_threads(),
        test_support::cpu_isa(),
        loadavg()
    );
    println!("\n| S | cache | time | bytes read | GB/s | share of streaming read | KV memory | vs bf16 |");
    println!("|---|---|---|---|---|---|---|---|");
    let formats = [
        ("bf16", KvFormat::Native),
        ("int8", KvFormat::Int8),
        ("fp8 e4m3", KvFormat::Fp8E4M3),
    ];
    for s_len in [4096usize, 16384, 32768] {
        let q = Tensor::randn(0f32, 1., (b, 1, h, d), &dev)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1., (b, s_len, hkv, d), &dev)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1., (b, s_len, hkv, d), &dev)?.to_dtype(DType::BF16)?;
        let caches = formats
            .iter()
            .map(|&(_, f)| {
                let mut c = KvCache::with_chunk(s_len).with_format(f);
                c.append(&k, &v)?;
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = MaskPlan::new(MaskDims::new(b, h, 1, s_len))
            .with_causal(CausalAlignment::BottomRight)?;
        let mut p = AttnParams::new(d);
        p.backend = Backend::CpuFused;
        let probe = MemProbe::new(&k, &v)?;
        let mut times = vec![vec![]; caches.len()];
        let mut tr = vec![];
        for _ in 0..rounds {
            for (t, c) in times.iter_mut().zip(&caches) {
                t.extend(time_it(5, || {
                    attention_over_cache(&q, c, &plan, &p).map(drop)?;
                    Ok(())
                })?);
            }
            tr.extend(time_it(5, || probe.read())?);
        }
        let times: Vec<f64> = times.into_iter().map(median).collect();
        let tr = median(tr);
        let rows = (b * s_len * hkv) as f64;
        let bytes16 = 2.0 * rows * d as f64 * 2.0;
        let read_rate = bytes16 / tr / 1e9;
        for (i, (name, format)) in formats.iter().enumerate() {
            let bytes = match format {
                KvFormat::Native => bytes16,
                _ => 2.0 * rows * (d as f64 + 4.0),
            };
            let rate = bytes / times[i] / 1e9;
            println!(
                "| {s_len} | {name} | {} | {:.1} MB | {rate:.1} | {:.0}% (of {read_rate:.1} GB/s) | {:.1} MiB | {:.2}× |",
                fmt_t(times[i]),
                bytes / 1e6,
                100.0 * rate / read_rate,
                caches[i].memory_bytes() as f64 / (1u64 << 20) as f64,
                times[0] / times[i]
            );
        }
    }
    println!("load at end: {}", loadavg());
    Ok(())
}

/// `--paged`: the decode core (B8 L1 H32 Hkv8 D128, bf16) over a dense cache `(B, S, Hkv, D)`
/// and over a paged pool (blocks of 16 and of 64 positions handed out in a shuffled order, the
/// worst case for locality) at S = 4096 and 16384: alternating rounds, medians, each as a ratio
/// to the dense cache and a share of a streaming read of the same bytes timed in the same
/// rounds; then the KV memory of a mix of lengths, paged against dense.
fn paged(rounds: usize) -> Result<()> {
    use candle_mha::kernels::paged::{paged_attention, PagedKv};
    use candle_mha::sdpa::{SdpaOptions, SeqOffsets};
    let dev = Device::Cpu;
    let (b, h, hkv, d) = (8usize, 32usize, 8usize, 128usize);
    println!(
        "decode core B{b} L1 H{h} Hkv{hkv} D{d}, bf16, {} threads, fused kernel ISA {}, load at start: {}",
        rayon::current_num_threads(),
        test_support::cpu_isa(),
        loadavg()
    );
    println!("\n| S | cache | time | / dense | GB/s | share of streaming read |");
    println!("|---|---|---|---|---|---|");
    let blocks = [16usize, 64];
    for s_len in [4096usize, 16384] {
        let bf = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::BF16)?)
        };
        let q = bf((b, 1, h, d))?;
        let (k, v) = (bf((b, s_len, hkv, d))?, bf((b, s_len, hkv, d))?);
        let plan = MaskPlan::new(MaskDims::new(b, h, 1, s_len))
            .with_causal(CausalAlignment::BottomRight)?;
        let p = AttnParams::new(d);
        // The same keys in pools, blocks shuffled.
        let pools = blocks
            .iter()
            .map(|&bs| -> Result<_> {
                let per = s_len / bs;
                let nb = b * per;
                let mut order: Vec<u32> = (0..nb as u32).collect();
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for i in (1..nb).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    order.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let tables: Vec<Vec<u32>> = (0..b)
                    .map(|bi| order[bi * per..(bi + 1) * per].to_vec())
                    .collect();
                // Block `tables[bi][n]` holds positions n·bs.. of sequence bi.
                let mut rows = vec![0u32; nb * bs];
                for (bi, t) in tables.iter().enumerate() {
                    for (n, &blk) in t.iter().enumerate() {
                        for o in 0..bs {
                            rows[blk as usize * bs + o] = (bi * s_len + n * bs + o) as u32;
                        }
                    }
                }
                let ids = Tensor::from_slice(&rows, rows.len(), &dev)?;
                let pool = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.reshape((b * s_len, hkv, d))?
                        .index_select(&ids, 0)?
                        .reshape((nb, bs, hkv, d))?)
                };
                Ok((bs, pool(&k)?, pool(&v)?, tables))
            })
            .collect::<Result<Vec<_>>>()?;
        let qp = q.reshape((b, h, d))?;
        let cu_q = SeqOffsets::from_lengths(&vec![1; b]);
        let lens = vec![s_len; b];
        let opts = SdpaOptions::new();
        let probe = MemProbe::new(&k, &v)?;
        let mut dense = vec![];
        let mut paged_t = vec![vec![]; pools.len()];
        let mut tr = vec![];
        for _ in 0..rounds {
            dense.extend(time_it(5, || {
                attention(&q, &k, &v, &plan, &p).map(drop)?;
                Ok(())
            })?);
            for (t, (bs, kp, vp, tables)) in paged_t.iter_mut().zip(&pools) {
                let kv = PagedKv {
                    k_pool: kp,
                    v_pool: vp,
                    block_size: *bs,
                    tables,
                    seq_lens: &lens,
                };
                t.extend(time_it(5, || {
                    paged_attention(&qp, &cu_q, &kv, &opts).map(drop)?;
                    Ok(())
                })?);
            }
            tr.extend(time_it(5, || probe.read())?);
        }
        let (dense, tr) = (median(dense), median(tr));
        let bytes = 2.0 * (b * s_len * hkv * d) as f64 * 2.0;
        let read_rate = bytes / tr / 1e9;
        let row = |name: String, t: f64| {
            let rate = bytes / t / 1e9;
            println!(
                "| {s_len} | {name} | {} | {:.2} | {rate:.1} | {:.0}% (of {read_rate:.1} GB/s) |",
                fmt_t(t),
                t / dense,
                100.0 * rate / read_rate
            );
        };
        row("dense".into(), dense);
        for (t, (bs, ..)) in paged_t.into_iter().zip(&pools) {
            row(format!("paged, blocks of {bs}"), median(t));
        }
    }
    // KV memory: 16 sequences of 100 to 4000 positions, blocks of 16, against a dense batch
    // sized for the longest.
    let lens: Vec<usize> = (0..16).map(|i| 100 + (i * 2371) % 3900).collect();
    let per_pos = 2 * hkv * d * 2;
    let paged_bytes: usize = lens.iter().map(|l| l.div_ceil(16) * 16 * per_pos).sum();
    let dense_bytes = lens.len() * lens.iter().max().unwrap() * per_pos;
    println!(
        "\nKV memory of 16 sequences of 100..4000 positions (one layer, bf16): paged (blocks of 16) {:.1} MiB, dense batch {:.1} MiB ({:.2}×)",
        paged_bytes as f64 / (1u64 << 20) as f64,
        dense_bytes as f64 / (1u64 << 20) as f64,
        paged_bytes as f64 / dense_bytes as f64
    );
    println!("load at end: {}", loadavg());
    Ok(())
}

fn crossover() -> Result<()> {
    println!("| B·H | L=S | D | reference | fused | ref/fused |");
    println!("|---|---|---|---|---|---|");
    for (bh, d) in [(1, 64), (12, 64), (96, 64)] {
        for n in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            let c = Cfg {
                name: "crossover",
                b: 1,
                l: n,
                s: n,
                e: 8,
                h: bh,
                hkv: bh,
                d,
                causal: false,
                pad: None,
                reps: 0,
            };
            let inp = Inputs::new(&c, false)?;
            let reps = (2_000_000 / (bh * n * n * d).max(1)).clamp(20, 2000);
            let mut rr = vec![];
            let mut ff = vec![];
            for _ in 0..5 {
                rr.extend(time_it(reps / 5, || {
                    inp.core(&c, Backend::Reference).map(drop)
                })?);
                ff.extend(time_it(reps / 5, || {
                    inp.core(&c, Backend::CpuFused).map(drop)
                })?);
            }
            let (r, f) = (median(rr), median(ff));
            println!(
                "| {bh} | {n} | {d} | {} | {} | {} |",
                fmt_t(r),
                fmt_t(f),
                ratio(r, f)
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let l: usize = args.get(1).context("--child L WHAT [DTYPE]")?.parse()?;
        match args.get(3).map(String::as_str) {
            Some("bf16") => DTYPE.set(DType::BF16).ok(),
            Some("f16") => DTYPE.set(DType::F16).ok(),
            _ => None,
        };
        return child(l, args.get(2).context("--child L WHAT [DTYPE]")?);
    }
    if args.iter().any(|a| a == "--crossover") {
        return crossover();
    }
    if args.iter().any(|a| a == "--paged") {
        let rounds = match args.iter().position(|a| a == "--rounds") {
            Some(i) => args.get(i + 1).context("--rounds N")?.parse()?,
            None => 3,
        };
        return paged(rounds);
    }
    if args.iter().any(|a| a == "--kv-formats") {
        let rounds = match args.iter().position(|a| a == "--rounds") {
            Some(i) => args.get(i + 1).context("--rounds N")?.parse()?,
            None => 3,
        };
        return kv_formats(rounds);
    }
    if args.iter().any(|a| a == "--modifiers") {
        // `--dtype`, `--rounds`, `--head-dim D` (64) and `--lengths L,L` (2048,8192) apply.
        let (mut rounds, mut d, mut lengths) = (3, 64, vec![2048, 8192]);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
                "--head-dim" => d = it.next().context("--head-dim D")?.parse()?,
                "--lengths" => {
                    lengths = it
                        .next()
                        .context("--lengths L,L")?
                        .split(',')
                        .map(str::parse)
                        .collect::<std::result::Result<_, _>>()?
                }
                "--dtype" => {
                    let d = match it.next().context("--dtype f32|bf16|f16")?.as_str() {
                        "bf16" => DType::BF16,
                        "f16" => DType::F16,
                        _ => DType::F32,
                    };
                    DTYPE.set(d).ok();
                }
                _ => {}
            }
        }
        return modifier_costs(rounds, d, &lengths);
    }
    let mut python =
        std::env::var("CANDLE_MHA_BENCH_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let (mut no_torch, mut no_peak, mut no_ref8k, mut rounds, mut only) =
        (false, false, false, 3usize, None::<String>);
    let (mut no_module, mut torch_native, mut isa_avx2) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--python" => python = it.next().context("--python PY")?.clone(),
            "--no-torch" => no_torch = true,
            "--no-peak" => no_peak = true,
            "--no-module" => no_module = true,
            "-h" | "--help" => {
                println!(
                    "usage: bench_attention [--python PY] [--no-torch] [--rounds N] [--only SUBSTR] \
                     [--no-peak] [--no-reference-8k] [--dtype f32|bf16|f16] \
                     [--isa avx512bf16|avx512|avx2|portable] [--torch-native] [--no-module] | --crossover \
                     | --modifiers [--dtype D] [--rounds N] [--head-dim D] [--lengths L,L] | --kv-formats [--rounds N] | --paged [--rounds N]"
                );
                return Ok(());
            }
            "--no-reference-8k" => no_ref8k = true,
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--only" => only = Some(it.next().context("--only SUBSTR")?.clone()),
            "--dtype" => {
                let d = match it.next().context("--dtype f32|bf16|f16")?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => bail!("--dtype: f32, bf16 or f16, got {other}"),
                };
                DTYPE.set(d).ok();
            }
            "--isa" => {
                let isa = it.next().context("--isa avx512bf16|avx512|avx2|portable")?;
                // Both the attention kernel and the projections' GEMMs (each has its own).
                candle_mha::kernels::test_support::force_cpu_isa(Some(isa))
                    .map_err(anyhow::Error::msg)?;
                candle_mha::kernels::test_support::force_gemm_isa(Some(isa))
                    .map_err(anyhow::Error::msg)?;
                isa_avx2 = isa == "avx2";
            }
            "--torch-native" => torch_native = true,
            other => bail!("unknown option {other}"),
        }
    }
    if isa_avx2 && !torch_native {
        TORCH_ENV
            .set(vec![
                ("ATEN_CPU_CAPABILITY", "avx2"),
                ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
            ])
            .ok();
    }
    let threads = rayon::current_num_threads();
    let mut torch = if no_torch {
        None
    } else {
        let (t, hello) = Torch::spawn(
            &python,
            threads,
            TORCH_ENV.get().map_or(&[], |v| v.as_slice()),
        )?;
        eprintln!("torch: {hello}");
        println!(
            "PyTorch {} CPU capability: {}",
            hello["torch"].as_str().unwrap_or("?"),
            hello["cpu_capability"].as_str().unwrap_or("?")
        );
        Some(t)
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "dtype {}, threads: {threads} (rayon; torch.set_num_threads({threads})), fused kernel ISA: {} (available: {:?}), load at start: {}",
        dtype_name(),
        candle_mha::kernels::test_support::cpu_isa(),
        candle_mha::kernels::test_support::cpu_isas(),
        load.trim()
    );
    const COLS: [&str; 10] = [
        "reference",
        "fused",
        "candle flash_attn",
        "torch SDPA",
        "module reference",
        "module fused (Auto)",
        "torch MHA",
        "copy of K/V's bytes",
        "streaming read of K/V's bytes",
        "parallel copy of K/V's bytes",
    ];
    let mut results = vec![];
    let mut ref_peak: Option<f64> = None;
    for c in configs() {
        if only.as_ref().is_some_and(|o| !c.name.contains(o.as_str())) {
            continue;
        }
        eprintln!("== {}", c.name);
        let inp = Inputs::new(&c, !no_module)?;
        let mut rows: Vec<Row> = (0..COLS.len()).map(|_| Row::default()).collect();
        let big = c.l >= 8192;
        for round in 0..rounds {
            if !big || (round == 0 && !no_ref8k) {
                // The reference at L=8192 needs ~13 GB: a single run, in a child process.
                if big {
                    let v = run_child(&[
                        "--child".into(),
                        c.l.to_string(),
                        "reference".into(),
                        dtype_name().into(),
                    ]);
                    if let Ok(v) = &v {
                        ref_peak = v["peak_rss_bytes"].as_f64();
                    }
                    rows[0].add(v.map(|v| vec![v["secs"].as_f64().unwrap_or(f64::NAN)]));
                } else {
                    rows[0].add(time_it(c.reps, || {
                        inp.core(&c, Backend::Reference).map(drop)
                    }));
                }
            }
            rows[1].add(time_it(c.reps, || {
                inp.core(&c, Backend::CpuFused).map(drop)
            }));
            if c.l == 1 {
                // Decode reads K and V once: the memory rates it is held to, measured on K's
                // and V's own bytes (their pages, their random contents) right after the fused
                // runs: a copy into a new buffer each round, on one thread and on rayon's, and
                // a streaming read.
                let mut probe = MemProbe::new(&inp.k, &inp.v)?;
                rows[7].add(time_it(c.reps, || probe.copy()));
                rows[9].add(time_it(c.reps, || probe.copy_par()));
                rows[8].add(time_it(c.reps, || probe.read()));
            }
            if !big {
                rows[2].add(time_it(c.reps, || inp.flash(&c).map(drop)));
            } else if round == 0 {
                // candle-nn's flash_attn takes about a minute at L=8192: one cold run.
                let t = Instant::now();
                let r = inp.flash(&c).map(drop);
                rows[2].add(r.map(|_| vec![t.elapsed().as_secs_f64()]));
            }
            if let Some(t) = torch.as_mut() {
                rows[3].add(t.times(&torch_req(&c, "sdpa")));
            }
            if no_module {
                continue;
            }
            if !big || (round == 0 && !no_ref8k) {
                rows[4].add(time_it(c.reps, || inp.module(&c, false).map(drop)));
            }
            rows[5].add(time_it(c.reps, || inp.module(&c, true).map(drop)));
            if let Some(t) = torch.as_mut() {
                let mut req = torch_req(&c, "mha");
                if big && round > 0 {
                    req["reps"] = json!(1);
                }
                rows[6].add(t.times(&req));
            }
            eprintln!(
                "  round {round}: {}",
                rows.iter()
                    .zip(COLS)
                    .map(|(r, n)| format!("{n} {}", fmt_t(r.med())))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        results.push((c, rows));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nAttention core (median; ratios = other / fused, > 1 means fused is faster):\n");
    println!("| config | reference | fused | candle flash_attn | torch SDPA | ref/fused | flash/fused | SDPA/fused |");
    println!("|---|---|---|---|---|---|---|---|");
    for (c, rows) in &results {
        let (r, f, fl, sd) = (rows[0].med(), rows[1].med(), rows[2].med(), rows[3].med());
        let fl_s = match &rows[2].note {
            Some(n) if fl.is_nan() => {
                format!("refused: {}", n.chars().take(60).collect::<String>())
            }
            _ => fmt_t(fl),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.name,
            fmt_t(r),
            fmt_t(f),
            fl_s,
            fmt_t(sd),
            ratio(r, f),
            ratio(fl, f),
            ratio(sd, f)
        );
    }
    println!("\nModule forward (projections included):\n");
    println!(
        "| config | module reference | module fused (Auto) | torch MHA | ref/fused | MHA/fused |"
    );
    println!("|---|---|---|---|---|---|");
    for (c, rows) in &results {
        let (r, f, t) = (rows[4].med(), rows[5].med(), rows[6].med());
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            c.name,
            fmt_t(r),
            fmt_t(f),
            fmt_t(t),
            ratio(r, f),
            ratio(t, f)
        );
    }
    for (c, rows) in &results {
        for (row, n) in rows.iter().zip(COLS) {
            if let Some(note) = &row.note {
                println!("note: {} / {n}: {note}", c.name);
            }
        }
    }
    println!("load at end: {}", load.trim());
    rates(&results)?;
    drop(torch);
    if !no_peak {
        println!(
            "\nPeak RSS, causal B=1 E=768 H=12, one run per fresh process (time of that run):\n"
        );
        println!("| L | run | time | peak RSS | baseline RSS |");
        println!("|---|---|---|---|---|");
        let gib = |v: &Value, k: &str| {
            v[k].as_f64().map_or("—".into(), |b| {
                format!("{:.2} GiB", b / (1u64 << 30) as f64)
            })
        };
        for l in [8192usize, 32768] {
            if let (8192, Some(p)) = (l, ref_peak) {
                println!(
                    "| 8192 | reference (from the timing run) | | {:.2} GiB | |",
                    p / (1u64 << 30) as f64
                );
            }
            for what in ["fused", "module-fused"] {
                match run_child(&[
                    "--child".into(),
                    l.to_string(),
                    what.into(),
                    dtype_name().into(),
                ]) {
                    Ok(v) => println!(
                        "| {l} | {what} | {} | {} | {} |",
                        fmt_t(v["secs"].as_f64().unwrap_or(f64::NAN)),
                        gib(&v, "peak_rss_bytes"),
                        gib(&v, "baseline_rss_bytes")
                    ),
                    Err(e) => println!("| {l} | {what} | failed: {e} | | |"),
                }
            }
            if !no_torch {
                let kinds: &[&str] = if l == 8192 {
                    &["sdpa", "mha"]
                } else {
                    &["sdpa"]
                };
                for kind in kinds {
                    let c = long_causal(l);
                    let out = Command::new(&python)
                        .envs(TORCH_ENV.get().into_iter().flatten().copied())
                        .arg(script())
                        .args(["--threads", &threads.to_string()])
                        .arg("--peak")
                        .arg(torch_req(&c, kind).to_string())
                        .output()?;
                    match serde_json::from_slice::<Value>(&out.stdout) {
                        Ok(v) => println!(
                            "| {l} | torch {kind} | | {} | {} |",
                            gib(&v, "peak_rss_bytes"),
                            gib(&v, "baseline_rss_bytes")
                        ),
                        Err(_) => println!(
                            "| {l} | torch {kind} | failed: {} | | |",
                            String::from_utf8_lossy(&out.stderr)
                                .lines()
                                .last()
                                .unwrap_or("")
                        ),
                    }
                }
            }
        }
    }
    Ok(())
}
