//! Thread safety: the shareable types are `Send + Sync` (checked at compile time), one module
//! shared by many threads gives every call bit-for-bit the single-threaded result, and the fused
//! kernel's per-thread scratch (reused across calls) never leaks one call's state into the next.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{CausalAlignment, MaskDims, MaskPlan};
use candle_mha::{
    AttnMask, Backend, KeyPaddingMask, KvCache, MaskedRowPolicy, MhaConfig, MhaInput,
    MultiHeadAttention, Rope, SdpaOptions, StaticKv,
};
use candle_nn::{VarBuilder, VarMap};

fn assert_send_sync<T: Send + Sync>() {}
#[cfg(feature = "models")]
fn assert_send<T: Send>() {}

/// Compile-time: what a server shares between threads is `Send + Sync`; what a thread owns
/// (a cache) is at least `Send`, so that it can move between threads.
#[test]
fn shareable_types_are_send_and_sync() {
    assert_send_sync::<MultiHeadAttention>();
    assert_send_sync::<MhaConfig>();
    assert_send_sync::<candle_mha::WeightLayout>();
    assert_send_sync::<MhaInput>();
    assert_send_sync::<KvCache>();
    assert_send_sync::<StaticKv>();
    assert_send_sync::<MaskPlan>();
    assert_send_sync::<Rope>();
    assert_send_sync::<SdpaOptions>();
    assert_send_sync::<AttnParams>();
    assert_send_sync::<candle_mha::kernels::AttnOutput>();
    #[cfg(feature = "models")]
    {
        use candle_mha::models::{bert::BertModel, llama, sentence::SentenceEmbedder};
        assert_send_sync::<BertModel>();
        assert_send_sync::<SentenceEmbedder>();
        assert_send_sync::<llama::Llama>();
        assert_send::<llama::LlamaCache>();
        assert_send_sync::<llama::LlamaCache>();
    }
}

const E: usize = 32;
const H: usize = 4;

fn module(dtype: DType, backend: Backend) -> Result<MultiHeadAttention> {
    let cfg = MhaConfig::new(E, H)
        .with_batch_first(true)
        .with_backend(backend);
    // Random weights (PyTorch's initialisation) from a VarMap, then loaded in `dtype` as
    // plain tensors (inference: no autograd).
    let vm = VarMap::new();
    MultiHeadAttention::new(
        cfg.clone(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let ts = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vb = VarBuilder::from_tensors(ts, dtype, &Device::Cpu);
    MultiHeadAttention::load(cfg, &candle_mha::WeightLayout::torch(), vb)
}

/// One request: an input and its masks, by index.
#[derive(Clone, Copy, Debug)]
struct Req {
    b: usize,
    l: usize,
    mask: usize,
    seed: u64,
}

fn x(req: Req, dtype: DType) -> Result<Tensor> {
    let n = req.b * req.l * E;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let z = (i as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ req.seed) >> 40;
            (z % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (req.b, req.l, E), &Device::Cpu)?.to_dtype(dtype)
}

fn call(m: &MultiHeadAttention, req: Req, dtype: DType) -> Result<Vec<u32>> {
    let mut input = MhaInput::new(x(req, dtype)?);
    let lens: Vec<usize> = (0..req.b).map(|i| req.l - i % req.l.max(1)).collect();
    input = match req.mask {
        0 => input,
        1 => input.causal(CausalAlignment::TopLeft),
        2 => input.key_padding_mask(KeyPaddingMask::from_lengths(&lens)),
        3 => input
            .key_padding_mask(KeyPaddingMask::from_lengths(&lens))
            .causal(CausalAlignment::TopLeft)
            .sliding_window(3),
        _ => {
            let allowed = Tensor::tril2(req.l, DType::U8, &Device::Cpu)?;
            input.attn_mask(AttnMask::from_allowed(&allowed)?)
        }
    };
    let out = m.attend(&input)?.output.to_dtype(DType::F32)?;
    Ok(out
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

fn requests() -> Vec<Req> {
    let mut out = vec![];
    let mut seed = 1;
    for (b, l) in [(1, 1), (2, 7), (1, 64), (3, 33), (2, 130), (1, 300)] {
        for mask in 0..5 {
            out.push(Req { b, l, mask, seed });
            seed += 1;
        }
    }
    out
}

/// N threads × M forwards of the same modules (f32 and bf16; Auto, Reference and CpuFused) on
/// mixed shapes and masks, in a different order per thread: every result bit-equals the
/// single-threaded one.
#[test]
fn shared_module_under_concurrent_load_is_bit_exact() -> Result<()> {
    let mut modules = vec![];
    for dtype in [DType::F32, DType::BF16] {
        for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
            modules.push((dtype, backend, Arc::new(module(dtype, backend)?)));
        }
    }
    let reqs = requests();
    // The single-threaded results.
    let mut serial = vec![];
    for (dtype, _, m) in &modules {
        for &r in &reqs {
            serial.push(call(m, r, *dtype)?);
        }
    }
    let threads = 4;
    let rounds = 2;
    let jobs: Vec<(usize, usize)> = (0..modules.len())
        .flat_map(|mi| (0..reqs.len()).map(move |ri| (mi, ri)))
        .collect();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (modules, reqs, serial, jobs) = (&modules, &reqs, &serial, &jobs);
                scope.spawn(move || -> Result<usize> {
                    let mut checked = 0;
                    for round in 0..rounds {
                        // A different order per thread and round (stride coprime to the count).
                        let n = jobs.len();
                        let stride = [1, 7, 11, 13, 17, 19, 23, 29][(t + round) % 8];
                        for j in 0..n {
                            let (mi, ri) = jobs[(j * stride + t * 5) % n];
                            let (dtype, backend, m) = &modules[mi];
                            let got = call(m, reqs[ri], *dtype)?;
                            assert!(
                                got == serial[mi * reqs.len() + ri],
                                "thread {t}: {dtype:?} {backend:?} {:?} differs from serial",
                                reqs[ri]
                            );
                            checked += 1;
                        }
                    }
                    Ok(checked)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().expect("a worker panicked")?;
        }
        assert_eq!(total, threads * rounds * jobs.len());
        Ok(())
    })
}

/// One kernel call's setup.
#[derive(Clone, Copy, Debug)]
struct KCall {
    l: usize,
    s: usize,
    d: usize,
    masked: bool,
    causal: bool,
    dtype: DType,
}

fn kernel_call(c: KCall, backend: Backend) -> Result<Vec<u32>> {
    let t = |len: usize, seed: u64| -> Result<Tensor> {
        let n = 2 * len * 2 * c.d;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let z = (i as u64 + 3).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed) >> 40;
                (z % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, (2, len, 2, c.d), &Device::Cpu)?.to_dtype(c.dtype)
    };
    let (q, k, v) = (t(c.l, 1)?, t(c.s, 2)?, t(c.s, 3)?);
    let mut plan = MaskPlan::new(MaskDims::new(2, 2, c.l, c.s));
    if c.causal {
        plan = plan.with_causal(CausalAlignment::BottomRight)?;
    }
    if c.masked {
        plan = plan.with_key_ranges(&[(0, c.s / 2), (c.s / 3, c.s)])?;
    }
    let mut p = AttnParams::new(c.d);
    p.backend = backend;
    p.masked_rows = MaskedRowPolicy::Zero;
    let out = attention(&q, &k, &v, &plan, &p)?
        .output
        .to_dtype(DType::F32)?;
    Ok(out
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

/// The fused kernel's per-thread scratch is reused across calls: calls whose shapes would expose
/// stale scratch (big head size then small, masked then unmasked, long then short, bf16 then
/// f32) give bit-for-bit what the same call gives in another order, and match the reference.
#[test]
fn fused_scratch_never_leaks_between_calls() -> Result<()> {
    let mut calls = vec![];
    for (l, s) in [(300, 700), (1, 1), (70, 5), (3, 300)] {
        for d in [256, 8, 64, 1] {
            for masked in [true, false] {
                calls.push(KCall {
                    l,
                    s,
                    d,
                    masked,
                    causal: masked && d == 64,
                    dtype: if d == 8 { DType::BF16 } else { DType::F32 },
                });
            }
        }
    }
    // Order 1: as listed (big then small); order 2: reversed; order 3: on fresh threads.
    let first: Vec<_> = calls
        .iter()
        .map(|&c| kernel_call(c, Backend::CpuFused))
        .collect::<Result<_>>()?;
    let second: Vec<_> = calls
        .iter()
        .rev()
        .map(|&c| kernel_call(c, Backend::CpuFused))
        .collect::<Result<Vec<_>>>()?;
    for (i, c) in calls.iter().enumerate() {
        assert!(
            first[i] == second[calls.len() - 1 - i],
            "{c:?}: depends on the previous call"
        );
        let fresh = std::thread::spawn({
            let c = *c;
            move || kernel_call(c, Backend::CpuFused)
        })
        .join()
        .unwrap()?;
        assert!(first[i] == fresh, "{c:?}: differs on a fresh thread");
        let want = kernel_call(*c, Backend::Reference)?;
        let tol = if c.dtype == DType::BF16 { 1e-2 } else { 1e-5 };
        for (a, b) in first[i].iter().zip(&want) {
            let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{c:?}: {a} vs reference {b}"
            );
        }
    }
    Ok(())
}
