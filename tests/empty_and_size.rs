//! Empty inputs (`B = 0`, `L = 0`, `S = 0`) through every entry point give a correctly shaped
//! empty output (the functional core and the dispatcher) or a clear error (the module), never a
//! panic; a call over the reference's size budget is routed or refused before allocating
//! (`tests/size_budget.rs` changes the process-wide budget, so it lives in its own binary).

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{CausalAlignment, MaskDims, MaskPlan};
use candle_mha::{
    sdpa, sdpa_varlen, Backend, KvCache, MaskedRowPolicy, MhaConfig, MhaInput, MultiHeadAttention,
    SdpaLayout, SdpaOptions, SeqOffsets,
};
use candle_nn::{VarBuilder, VarMap};

const E: usize = 8;
const H: usize = 2;
const D: usize = E / H;

fn z(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn ones(shape: &[usize]) -> Tensor {
    Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn dispatcher_empty_shapes() -> Result<()> {
    for (b, l, s) in [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)] {
        for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
            for policy in [MaskedRowPolicy::Zero, MaskedRowPolicy::Nan] {
                for causal in [false, true] {
                    let (q, kv) = (ones(&[b, l, H, D]), ones(&[b, s, H, D]));
                    let mut plan = MaskPlan::new(MaskDims::new(b, H, l, s));
                    if causal {
                        plan = plan.with_causal(CausalAlignment::BottomRight)?;
                    }
                    let mut p = AttnParams::new(D);
                    p.backend = backend;
                    p.masked_rows = policy;
                    let tag = format!("B{b} L{l} S{s} {backend:?} {policy:?} causal={causal}");
                    let out = attention(&q, &kv, &kv, &plan, &p)
                        .unwrap_or_else(|e| panic!("{tag}: {e}"))
                        .output;
                    assert_eq!(out.dims(), &[b, l, H, D], "{tag}");
                    // No keys: every row is fully masked.
                    let v = out.flatten_all()?.to_vec1::<f32>()?;
                    match policy {
                        MaskedRowPolicy::Zero => assert!(v.iter().all(|&x| x == 0.0), "{tag}"),
                        MaskedRowPolicy::Nan => assert!(v.iter().all(|x| x.is_nan()), "{tag}"),
                        other => panic!("no expectation for {other:?}"),
                    }
                }
            }
        }
    }
    // Zero-sized head dimensions.
    for (d, dv) in [(0, 4), (4, 0), (0, 0)] {
        for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
            let (q, k, v) = (
                ones(&[1, 3, H, d]),
                ones(&[1, 4, H, d]),
                ones(&[1, 4, H, dv]),
            );
            let mut p = AttnParams::new(4);
            p.backend = backend;
            let plan = MaskPlan::new(MaskDims::new(1, H, 3, 4));
            let out = attention(&q, &k, &v, &plan, &p)?.output;
            assert_eq!(out.dims(), &[1, 3, H, dv], "D{d} Dv{dv} {backend:?}");
        }
    }
    Ok(())
}

#[test]
fn sdpa_empty_shapes() -> Result<()> {
    for (b, l, s) in [(0, 3, 4), (2, 0, 4), (2, 3, 0)] {
        for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
            let opts = SdpaOptions::new().backend(backend);
            let out = sdpa(
                &ones(&[b, H, l, D]),
                &ones(&[b, H, s, D]),
                &ones(&[b, H, s, D]),
                &opts,
            )?;
            assert_eq!(out.dims(), &[b, H, l, D]);
            let opts = opts.layout(SdpaLayout::Blhd).is_causal(true);
            let out = sdpa(
                &ones(&[b, l, H, D]),
                &ones(&[b, s, H, D]),
                &ones(&[b, s, H, D]),
                &opts,
            )?;
            assert_eq!(out.dims(), &[b, l, H, D]);
        }
    }
    // Varlen: no tokens at all, no keys, and empty sequences among others.
    let opts = SdpaOptions::new().causal(CausalAlignment::BottomRight);
    for (lq, lk) in [
        (vec![0], vec![0]),
        (vec![0, 0], vec![3, 0]),
        (vec![2, 0, 3], vec![0, 4, 3]),
    ] {
        let (tq, tk): (usize, usize) = (lq.iter().sum(), lk.iter().sum());
        let out = sdpa_varlen(
            &ones(&[tq, H, D]),
            &ones(&[tk, H, D]),
            &ones(&[tk, H, D]),
            &SeqOffsets::from_lengths(&lq),
            &SeqOffsets::from_lengths(&lk),
            &opts,
        )?;
        assert_eq!(out.dims(), &[tq, H, D], "{lq:?} {lk:?}");
    }
    let none = SeqOffsets::from_lengths(&[]);
    let r = sdpa_varlen(
        &ones(&[0, H, D]),
        &ones(&[0, H, D]),
        &ones(&[0, H, D]),
        &none,
        &none,
        &opts,
    );
    match r {
        Ok(o) => assert_eq!(o.dims(), &[0, H, D]),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

fn mha() -> Result<MultiHeadAttention> {
    let vm = VarMap::new();
    Ok(MultiHeadAttention::new(
        MhaConfig::new(E, H).with_batch_first(true),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?
    .inference())
}

/// The module refuses empty inputs with an error naming the sizes (a projection of nothing has
/// no meaning to check), on every entry point.
#[test]
fn module_empty_inputs_are_clear_errors() -> Result<()> {
    let m = mha()?;
    let msg = |r: Result<candle_mha::MhaOutput>| match r {
        Ok(o) => panic!("expected an error, got {:?}", o.output.dims()),
        Err(e) => e.to_string(),
    };
    for shape in [[0, 3, E], [2, 0, E]] {
        let e = msg(m.attend(&MhaInput::new(z(&shape))));
        assert!(e.contains("empty input"), "{e}");
    }
    let e = msg(m.attend(&MhaInput::cross(
        z(&[2, 3, E]),
        z(&[2, 0, E]),
        z(&[2, 0, E]),
    )));
    assert!(e.contains("key length 0"), "{e}");
    let e = msg(m.attend(&MhaInput::new(z(&[0, E]))));
    assert!(e.contains("empty"), "{e}");
    // Cached: an empty step on an empty cache, and after a prefill.
    let mut cache = KvCache::new();
    let e = msg(m.attend_cached(&MhaInput::new(z(&[1, 0, E])), &mut cache));
    assert!(e.contains("empty"), "{e}");
    m.attend_cached(&MhaInput::new(ones(&[1, 4, E])), &mut cache)?;
    let e = msg(m.attend_cached(&MhaInput::new(z(&[1, 0, E])), &mut cache));
    assert!(e.contains("empty"), "{e}");
    assert_eq!(cache.len(), 4);
    // Static memory: empty memory, and an empty query over a real memory.
    assert!(m
        .static_kv(&z(&[1, 0, E]))
        .unwrap_err()
        .to_string()
        .contains("empty"));
    let mem = m.static_kv(&ones(&[1, 5, E]))?;
    let e = msg(m.attend_static(&MhaInput::new(z(&[1, 0, E])), &mem));
    assert!(e.contains("empty"), "{e}");
    Ok(())
}
