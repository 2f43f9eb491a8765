//! The fused CUDA kernel (`Backend::CudaFused`): its routing rules everywhere, and, on a GPU
//! (`CANDLE_MHA_DEVICE=cuda`, a `--features cuda` build), its output against the reference
//! kernel on the same GPU: random shapes, every mask kind, both fully-masked-row policies, f16
//! and bf16, every compiled head size, the decode path, score modifiers (soft-cap, ALiBi,
//! sinks), strided and misaligned inputs; each output poisoned with NaN before the kernel writes
//! it.
//!
//! Without a GPU the GPU sweeps return after saying so on stderr: they cannot run here, and the
//! Triton source they exercise is checked on the CPU by `scripts/cuda-cpu-check.sh` instead.

use candle_core::{DType, Device, Tensor};
use candle_mha::kernels::test_support::test_device;
use candle_mha::kernels::{attention, cuda, AttnParams};
use candle_mha::mask::{Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};
use candle_mha::{Backend, MaskedRowPolicy};

mod support;
use support::{check_close, random_mask, random_modifiers, Rng};

/// The GPU under test, or `None` (with a note) when the tests run on the CPU.
fn gpu() -> Option<Device> {
    let dev = test_device().expect("CANDLE_MHA_DEVICE");
    if dev.is_cuda() {
        // An output element the kernel never writes reads as NaN, never as a stale value.
        candle_mha::kernels::test_support::set_cuda_poison(true);
        Some(dev)
    } else {
        eprintln!("CANDLE_MHA_DEVICE is not a CUDA device: the GPU sweep does not run here");
        None
    }
}

fn tensor(
    rng: &mut Rng,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    dev: &Device,
) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(rng.normal_vec(n), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// Forced CudaFused against the reference on the same device, both on the same half inputs.
fn compare(q: &Tensor, k: &Tensor, v: &Tensor, mask: &MaskPlan, params: &AttnParams, desc: &str) {
    let mut p = *params;
    p.backend = Backend::Reference;
    let want = attention(q, k, v, mask, &p).unwrap();
    p.backend = Backend::CudaFused;
    let got = attention(q, k, v, mask, &p).unwrap_or_else(|e| panic!("{desc}: {e}"));
    assert_eq!(got.kernel, "cuda", "{desc}");
    let (atol, rtol) = match q.dtype() {
        DType::F16 => (3e-3, 5e-3),
        _ => (2e-2, 2e-2),
    };
    check_close(&got.output, &want.output, atol, rtol, desc);
}

/// On the CPU, forcing the CUDA kernel is an error that says why; `Auto` keeps the CPU kernel;
/// f32 is refused by name even before a device is involved.
#[test]
fn routing_rules() {
    let dev = Device::Cpu;
    let mut rng = Rng(3);
    let q = tensor(&mut rng, (1, 4, 2, 64), DType::F16, &dev);
    let plan = MaskPlan::new(MaskDims::new(1, 2, 4, 4));
    let mut p = AttnParams::new(64);
    p.backend = Backend::CudaFused;
    let err = attention(&q, &q, &q, &plan, &p).unwrap_err().to_string();
    assert!(
        err.contains("Backend::CudaFused") && err.contains("CUDA tensors"),
        "{err}"
    );
    p.backend = Backend::Auto;
    assert_eq!(attention(&q, &q, &q, &plan, &p).unwrap().kernel, "cpu");
    // Weights always go to the reference, whatever the backend.
    p.backend = Backend::CudaFused;
    p.need_weights = true;
    assert_eq!(
        attention(&q, &q, &q, &plan, &p).unwrap().kernel,
        "reference"
    );
    assert_eq!(cuda::TRITON_VERSION, "3.6.0");
}

/// Random shapes and every mask kind (the CPU kernel tests' generator), f16 and bf16.
#[test]
fn gpu_matches_reference_random() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(0xc0da_0001);
    // scripts/gpu-check.sh runs a short sweep under compute-sanitizer (CUDA_SWEEP_CASES).
    let cases = std::env::var("CUDA_SWEEP_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(160);
    for it in 0..cases {
        let b = 1 + rng.below(3);
        let hkv = 1 + rng.below(3);
        let h = hkv * rng.pick(&[1, 1, 2, 4]);
        let l = if rng.below(5) == 0 {
            1
        } else {
            rng.pick(&[1, 7, 63, 64, 65, 130, 257])
        };
        let s = rng.pick(&[1, 5, 64, 127, 128, 129, 300, 600]);
        let d = rng.pick(&[64, 64, 80, 96, 128, 128, 256]);
        let dtype = rng.pick(&[DType::F16, DType::BF16]);
        let policy = rng.pick(&[MaskedRowPolicy::Zero, MaskedRowPolicy::Nan]);
        let mut desc = format!("#{it} B={b} H={h}/{hkv} L={l} S={s} D={d} {dtype:?} {policy:?}");
        let mask = random_mask(&mut rng, b, h, l, s, &mut desc, &dev);
        // A third of the calls with score modifiers (soft-cap, ALiBi, sinks).
        let mask = if it % 3 == 0 {
            random_modifiers(&mut rng, mask, &mut desc, &dev)
        } else {
            mask
        };
        let q = tensor(&mut rng, (b, l, h, d), dtype, &dev);
        let k = tensor(&mut rng, (b, s, hkv, d), dtype, &dev);
        let v = tensor(&mut rng, (b, s, hkv, d), dtype, &dev);
        let mut params = AttnParams::new(d);
        params.masked_rows = policy;
        compare(&q, &k, &v, &mask, &params, &desc);
    }
}

/// The split-K decode path: one to a few query rows per KV head over long keys, GQA groups up
/// to 16 rows, causal (bottom-right, as a KV cache), windows and key padding.
#[test]
fn gpu_decode_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(0xdec0_0002);
    for it in 0..40 {
        let b = 1 + rng.below(8);
        let hkv = rng.pick(&[1, 2, 8]);
        let g = rng.pick(&[1, 4, 8, 16]);
        let l = if g == 16 { 1 } else { rng.pick(&[1, 1, 2]) };
        let h = hkv * g;
        let s = rng.pick(&[1024, 1500, 4096, 9000]);
        let d = rng.pick(&[64, 80, 128, 256]);
        let dtype = rng.pick(&[DType::F16, DType::BF16]);
        let mut plan = MaskPlan::new(MaskDims::new(b, h, l, s));
        let mut desc = format!("decode #{it} B={b} H={h}/{hkv} L={l} S={s} D={d} {dtype:?}");
        if rng.below(2) == 0 {
            let window = (rng.below(3) == 0).then(|| 1 + rng.below(s));
            plan = plan
                .with_causal(Causal {
                    alignment: CausalAlignment::BottomRight,
                    window,
                })
                .unwrap();
            desc += &format!(" causal window={window:?}");
        }
        if rng.below(2) == 0 {
            let lens: Vec<usize> = (0..b).map(|_| rng.below(s + 1)).collect();
            plan = plan
                .with_key_padding(&KeyPaddingMask::from_lengths(&lens), DType::F32, &dev)
                .unwrap();
            desc += &format!(" lengths={lens:?}");
        }
        // Score modifiers on a third: the sink joins the split's combine once.
        if it % 3 == 0 {
            plan = random_modifiers(&mut rng, plan, &mut desc, &dev);
        }
        let q = tensor(&mut rng, (b, l, h, d), dtype, &dev);
        let k = tensor(&mut rng, (b, s, hkv, d), dtype, &dev);
        let v = tensor(&mut rng, (b, s, hkv, d), dtype, &dev);
        compare(&q, &k, &v, &plan, &AttnParams::new(d), &desc);
    }
}

/// Strided views that fit the artifacts' alignment run in place (a narrowed packed projection,
/// a KV-cache buffer longer than the keys); views that do not are refused by name when forced
/// and served by the reference under `Auto`, never computed wrongly.
#[test]
fn gpu_strided_inputs() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(5);
    let (b, l, h, d) = (2, 70, 4, 64);
    let qkv = tensor(&mut rng, (b, l, 3 * h, d), DType::BF16, &dev);
    let (q, k, v) = (
        qkv.narrow(2, 0, h).unwrap(),
        qkv.narrow(2, h, h).unwrap(),
        qkv.narrow(2, 2 * h, h).unwrap(),
    );
    let plan = MaskPlan::new(MaskDims::new(b, h, l, l))
        .with_causal(CausalAlignment::TopLeft)
        .unwrap();
    compare(&q, &k, &v, &plan, &AttnParams::new(d), "narrowed qkv");
    let cache = tensor(&mut rng, (b, 512, h, d), DType::BF16, &dev);
    let kc = cache.narrow(1, 0, 300).unwrap();
    let plan = MaskPlan::new(MaskDims::new(b, h, l, 300))
        .with_causal(CausalAlignment::BottomRight)
        .unwrap();
    compare(&q, &kc, &kc, &plan, &AttnParams::new(d), "kv cache view");
    // Starting one element into the buffer: not 16-byte aligned.
    let odd = tensor(&mut rng, (1, b * l * h * d + 1, 1, 1), DType::F16, &dev)
        .flatten_all()
        .unwrap()
        .narrow(0, 1, b * l * h * d)
        .unwrap()
        .reshape((b, l, h, d))
        .unwrap();
    let plan = MaskPlan::new(MaskDims::new(b, h, l, l));
    let mut p = AttnParams::new(d);
    p.backend = Backend::CudaFused;
    let err = attention(&odd, &odd, &odd, &plan, &p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("16-byte aligned"), "{err}");
    p.backend = Backend::Auto;
    assert_eq!(
        attention(&odd, &odd, &odd, &plan, &p).unwrap().kernel,
        "reference"
    );
}

/// f32 on the GPU is refused by the kernel (no silent TF32) and stays on the reference.
#[test]
fn gpu_f32_stays_on_the_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(9);
    let q = tensor(&mut rng, (1, 8, 2, 64), DType::F32, &dev);
    let plan = MaskPlan::new(MaskDims::new(1, 2, 8, 8));
    let mut p = AttnParams::new(64);
    p.backend = Backend::CudaFused;
    let err = attention(&q, &q, &q, &plan, &p).unwrap_err().to_string();
    assert!(err.contains("TF32"), "{err}");
    p.backend = Backend::Auto;
    assert_eq!(
        attention(&q, &q, &q, &plan, &p).unwrap().kernel,
        "reference"
    );
}
