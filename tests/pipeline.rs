//! The attention pipeline's contracts: a mask plan built once equals the per-call masks, plans
//! keep structure as structure, packed sequences equal separate sequences, and the inference
//! switch takes the fused path with the same numbers.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{MaskDims, MaskPlan};
use candle_mha::{
    AttnMask, Backend, CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention,
};
use candle_nn::{VarBuilder, VarMap};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn module(cfg: MhaConfig) -> (VarMap, MultiHeadAttention) {
    let vm = VarMap::new();
    let m = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    (vm, m)
}

#[test]
fn a_var_module_tracks_gradients_through_the_fused_kernel_and_its_inference_view_does_not(
) -> Result<()> {
    let (vm, train) = module(MhaConfig::new(16, 4).with_batch_first(true));
    let infer = train.inference();
    assert!(train.tracks_gradients());
    assert!(!infer.tracks_gradients());
    let x = Tensor::randn(0f32, 1., (2, 9, 16), &Device::Cpu)?;
    let input = MhaInput::new(x.clone())
        .key_padding_mask(KeyPaddingMask::from_lengths(&[9, 5]))
        .causal(CausalAlignment::TopLeft);
    let slow = train.attend(&input)?;
    let fast = infer.attend(&input)?;
    // Both take the fused kernel; the trained module's output is an autograd node (fused
    // backward), the inference view's is not.
    assert_eq!(slow.kernel, "cpu");
    assert_eq!(fast.kernel, "cpu");
    assert!(slow.output.track_op() && !fast.output.track_op());
    assert!(max_abs(&slow.output, &fast.output) < 1e-5);
    // The view shares the weights: an optimizer step on the Vars is visible to it.
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.contains("out_proj.bias") {
            var.set(&Tensor::ones(var.shape(), DType::F32, &Device::Cpu)?)?;
        }
    }
    let slow = train.attend(&input)?.output;
    let fast = infer.attend(&input)?.output;
    assert!(max_abs(&slow, &fast) < 1e-5);
    Ok(())
}

#[test]
fn a_plan_built_once_equals_the_per_call_masks() -> Result<()> {
    let dev = Device::Cpu;
    let (_vm, m) = module(MhaConfig::new(16, 4).with_batch_first(true));
    let m = m.inference();
    let x = Tensor::randn(0f32, 1., (3, 7, 16), &dev)?;
    let allowed = Tensor::randn(0f32, 1., (7, 7), &dev)?.ge(-1.0)?;
    let masks = |x: Tensor| {
        MhaInput::new(x)
            .key_padding_mask(KeyPaddingMask::from_lengths(&[7, 4, 2]))
            .attn_mask(AttnMask::from_allowed(&allowed).unwrap())
            .causal(CausalAlignment::TopLeft)
            .sliding_window(3)
    };
    let plan = m.mask_plan(&masks(x.clone()))?;
    assert_eq!(plan.key_ranges(), Some(&[(0, 7), (0, 4), (0, 2)][..]));
    // Two layers sharing the plan give bit-identical results to building it per call.
    let mut a = x.clone();
    let mut b = x;
    for _ in 0..2 {
        a = m.attend(&masks(a))?.output;
        b = m.attend(&MhaInput::new(b).mask_plan(plan.clone()))?.output;
    }
    assert_eq!(max_abs(&a, &b), 0.0);
    // A plan replaces the input's masks: giving both is an error, as is a plan of other shapes.
    let x = Tensor::randn(0f32, 1., (3, 7, 16), &dev)?;
    let err = m
        .attend(&masks(x.clone()).mask_plan(plan.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mask_plan") && err.contains("key_padding_mask"),
        "{err}"
    );
    let short = x.narrow(1, 0, 6)?;
    let err = m
        .attend(&MhaInput::new(short).mask_plan(plan))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(3, 4, 7, 7)") && err.contains("(3, 4, 6, 6)"),
        "{err}"
    );
    Ok(())
}

#[test]
fn boolean_key_padding_becomes_ranges_when_contiguous() -> Result<()> {
    let dev = Device::Cpu;
    let dims = MaskDims::new(3, 2, 4, 5);
    let plan_of = |m: [[u8; 5]; 3]| -> Result<MaskPlan> {
        let m = KeyPaddingMask::new(Tensor::new(&m, &dev)?);
        MaskPlan::new(dims).with_key_padding(&m, DType::F32, &dev)
    };
    // Left padding, right padding, both: contiguous kept keys.
    let plan = plan_of([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 1]])?;
    assert_eq!(plan.key_ranges(), Some(&[(2, 5), (0, 3), (1, 4)][..]));
    assert!(plan.key_bias().is_none());
    assert_eq!(plan.row_range(2, 0), (1, 4));
    // A hole: stays dense.
    let plan = plan_of([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])?;
    assert!(plan.key_ranges().is_none());
    assert_eq!(plan.key_bias().unwrap().dims(), &[3, 5]);
    // Key padding twice is an error.
    let err = MaskPlan::new(dims)
        .with_left_padding(&[1, 0, 2])?
        .with_key_padding(&KeyPaddingMask::from_lengths(&[5, 5, 5]), DType::F32, &dev)
        .unwrap_err();
    assert!(err.to_string().contains("key padding given twice"), "{err}");
    Ok(())
}

/// Packed sequences in one row give, per sequence, what attending to that sequence alone gives:
/// both alignments, grouped KV heads, empty sequences, on every kernel.
#[test]
fn packed_sequences_equal_separate_sequences() -> Result<()> {
    let dev = Device::Cpu;
    let (h, hkv, d) = (4, 2, 16);
    let cu_q = [0usize, 3, 3, 10, 11];
    let cu_k = [0usize, 5, 7, 14, 14];
    let (l, s) = (11, 14);
    let q = Tensor::randn(0f32, 1., (1, l, h, d), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, s, hkv, d), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, s, hkv, d), &dev)?;
    for causal in [
        None,
        Some(CausalAlignment::TopLeft),
        Some(CausalAlignment::BottomRight),
    ] {
        for backend in [Backend::Reference, Backend::CpuFused] {
            let mut params = AttnParams::new(d);
            params.backend = backend;
            let mut plan = MaskPlan::new(MaskDims::new(1, h, l, s));
            if let Some(c) = causal {
                plan = plan.with_causal(c)?;
            }
            let plan = plan.with_packed_sequences(&cu_q, &cu_k)?;
            let packed = attention(&q, &k, &v, &plan, &params)?.output;
            for n in 0..cu_q.len() - 1 {
                let (q0, q1, k0, k1) = (cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]);
                if q0 == q1 {
                    continue;
                }
                let got = packed.i((.., q0..q1))?;
                if k0 == k1 {
                    // No keys: fully masked rows, zeros by default.
                    assert_eq!(got.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
                    continue;
                }
                let mut one = MaskPlan::new(MaskDims::new(1, h, q1 - q0, k1 - k0));
                if let Some(c) = causal {
                    one = one.with_causal(c)?;
                }
                let (qs, ks, vs) = (q.i((.., q0..q1))?, k.i((.., k0..k1))?, v.i((.., k0..k1))?);
                let want = attention(&qs, &ks, &vs, &one, &params)?.output;
                assert!(
                    max_abs(&got, &want) < 1e-6,
                    "{causal:?} {backend:?} sequence {n}"
                );
            }
        }
    }
    // Offsets are validated.
    let plan = MaskPlan::new(MaskDims::new(1, h, l, s));
    assert!(plan
        .clone()
        .with_packed_sequences(&[0, 12], &[0, 14])
        .is_err());
    assert!(plan
        .clone()
        .with_packed_sequences(&[0, 5, 3, 11], &[0, 1, 2, 14])
        .is_err());
    assert!(MaskPlan::new(MaskDims::new(2, h, l, s))
        .with_packed_sequences(&[0, 11], &[0, 14])
        .is_err());
    Ok(())
}

/// The module reads its packed projection as views and writes `(B, L, H, D)`: the result does
/// not depend on which kernel or layout produced it (the packed torch layout against separate
/// projections with the same weights, on both kernels).
#[test]
fn packed_and_separate_projections_agree_on_both_kernels() -> Result<()> {
    let dev = Device::Cpu;
    let (vm, packed) = module(MhaConfig::new(24, 4).with_batch_first(true));
    let packed = packed.inference();
    let w = vm.data().lock().unwrap().clone();
    let t = |n: &str| w[n].as_tensor().detach();
    let e = 24;
    let mut sep = std::collections::HashMap::new();
    for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        sep.insert(
            format!("{p}.weight"),
            t("in_proj_weight").narrow(0, i * e, e)?,
        );
        sep.insert(format!("{p}.bias"), t("in_proj_bias").narrow(0, i * e, e)?);
    }
    sep.insert("out_proj.weight".into(), t("out_proj.weight"));
    sep.insert("out_proj.bias".into(), t("out_proj.bias"));
    let x = Tensor::randn(0f32, 1., (2, 6, 24), &dev)?;
    let want = packed.forward(&x)?;
    for backend in [Backend::Reference, Backend::CpuFused] {
        let cfg = MhaConfig::new(24, 4)
            .with_batch_first(true)
            .with_backend(backend);
        let vb = VarBuilder::from_tensors(sep.clone(), DType::F32, &dev);
        let m = MultiHeadAttention::load(cfg, &candle_mha::WeightLayout::separate(), vb)?;
        assert!(max_abs(&m.forward(&x)?, &want) < 1e-5, "{backend:?}");
    }
    Ok(())
}
