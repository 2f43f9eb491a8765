//! Score modifiers in the module: a layer with soft-capping, ALiBi and sinks equals its
//! projections through `sdpa` with the same modifiers; the sinks load through the layout (and
//! its rename hook) and train, with the fused kernel's gradients equal to the reference's;
//! configs and slopes are checked. (The kernels' own tests: `sdpa.rs`, `cpu_kernel.rs`,
//! `cpu_backward.rs`, `core_cases.rs`; incremental decoding with modifiers: `decode.rs`.)

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_mha::kernels::test_support::cpu_backward_calls;
use candle_mha::sdpa::{sdpa, SdpaLayout, SdpaOptions};
use candle_mha::{
    Backend, CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention, WeightLayout,
};
use candle_nn::{VarBuilder, VarMap};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()
}

/// A Llama-layout layer with every variable drawn at random (sinks included).
fn layer(cfg: MhaConfig, varmap: &VarMap) -> Result<MultiHeadAttention> {
    let dev = Device::Cpu;
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &dev);
    let mha = MultiHeadAttention::load(cfg, &WeightLayout::llama(), vb)?;
    for (_, var) in varmap.data().lock().unwrap().iter() {
        let std = match var.dims() {
            [_, fan_in] => 1.0 / (*fan_in as f32).sqrt(),
            _ => 1.0,
        };
        var.set(&Tensor::randn(0f32, std, var.shape(), &dev)?)?;
    }
    Ok(mha)
}

fn var(varmap: &VarMap, name: &str) -> Tensor {
    varmap.data().lock().unwrap()[name].as_tensor().clone()
}

fn cfg() -> MhaConfig {
    MhaConfig::llama(32, 4, 2, 8)
        .with_softcap(3.0)
        .with_alibi()
        .with_sinks(true)
}

/// The layer equals its own projections through `sdpa` with the same soft-cap, slopes and
/// sinks (the reference kernel), with the fused kernel and with the reference, causal and
/// padded.
#[test]
fn layer_equals_sdpa_with_the_same_modifiers() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    layer(cfg(), &varmap)?;
    let (b, l, e, h, hkv, d) = (2, 7, 32, 4, 2, 8);
    let x = Tensor::randn(0f32, 1., (b, l, e), &dev)?;
    let lens = [7, 4];
    let input = MhaInput::new(x.clone())
        .causal(CausalAlignment::TopLeft)
        .key_padding_mask(KeyPaddingMask::from_lengths(&lens));
    let proj = |name: &str, heads: usize| -> Result<Tensor> {
        let w = var(&varmap, &format!("{name}.weight"));
        x.broadcast_matmul(&w.t()?)?.reshape((b, l, heads, d))
    };
    let (q, k, v) = (
        proj("q_proj", h)?,
        proj("k_proj", hkv)?,
        proj("v_proj", hkv)?,
    );
    let pad: Vec<f32> = (0..b * l)
        .map(|x| {
            if x % l < lens[x / l] {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let pad = Tensor::from_vec(pad, (b, 1, 1, l), &dev)?;
    let slopes: Vec<f32> = MhaConfig::standard_alibi_slopes(h)
        .iter()
        .map(|&m| m as f32)
        .collect();
    let opts = SdpaOptions::new()
        .layout(SdpaLayout::Blhd)
        .causal(CausalAlignment::TopLeft)
        .attn_mask(candle_mha::SdpaMask::Additive(pad))
        .softcap(3.0)
        .alibi_slopes(Tensor::new(slopes, &dev)?)
        .sinks(var(&varmap, "sinks"))
        .backend(Backend::Reference);
    let att = sdpa(&q, &k, &v, &opts)?.reshape((b, l, h * d))?;
    let want = att.broadcast_matmul(&var(&varmap, "o_proj.weight").t()?)?;
    for backend in [Backend::Auto, Backend::CpuFused, Backend::Reference] {
        let m = MultiHeadAttention::load(
            cfg().with_backend(backend),
            &WeightLayout::llama(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )?;
        let got = m.attend(&input)?.output;
        let diff = max_abs_diff(&got, &want)?;
        assert!(
            diff <= 2e-5,
            "{backend:?}: the layer differs from sdpa by {diff}"
        );
    }
    // Without the modifiers the output is another one (they are applied, not ignored).
    let plain = MultiHeadAttention::load(
        MhaConfig::llama(32, 4, 2, 8),
        &WeightLayout::llama(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    assert!(max_abs_diff(&plain.attend(&input)?.output, &want)? > 1e-3);
    Ok(())
}

/// Training a layer with sinks: every variable (sinks included) gets the same gradient through
/// the fused CPU kernel as through the reference's autograd.
#[test]
fn sinks_train_with_the_fused_kernel() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    layer(cfg(), &varmap)?;
    let x = Tensor::randn(0f32, 1., (2, 9, 32), &dev)?;
    let g = Tensor::randn(0f32, 1., (2, 9, 32), &dev)?;
    let mut grads: Vec<HashMap<String, Tensor>> = vec![];
    let before = cpu_backward_calls();
    for backend in [Backend::CpuFused, Backend::Reference] {
        let m = MultiHeadAttention::load(
            cfg().with_backend(backend),
            &WeightLayout::llama(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )?;
        assert!(m.tracks_gradients());
        let input = MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft);
        let out = m.attend(&input)?.output;
        let gs = (out * &g)?.sum_all()?.backward()?;
        let data = varmap.data().lock().unwrap();
        let mut mine = HashMap::new();
        for (name, v) in data.iter() {
            let gr = gs
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{backend:?}: no gradient for {name}"));
            mine.insert(name.clone(), gr.clone());
        }
        grads.push(mine);
    }
    assert!(
        cpu_backward_calls() > before,
        "the fused backward did not run"
    );
    assert!(grads[0].contains_key("sinks"));
    for (name, a) in &grads[0] {
        let r = &grads[1][name];
        let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
        let diff = max_abs_diff(a, r)? / scale;
        assert!(
            diff <= 1e-5,
            "{name}: fused gradient off by {diff} of its largest entry"
        );
    }
    // A detached view records nothing and gives the same output.
    let m = MultiHeadAttention::load(
        cfg(),
        &WeightLayout::llama(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    let inf = m.inference();
    assert!(!inf.tracks_gradients());
    assert!(max_abs_diff(&inf.forward(&x)?, &m.forward(&x)?)? == 0.0);
    Ok(())
}

/// The sinks load from a checkpoint under the layout's name `sinks`, through its rename hook;
/// a missing or mis-shaped tensor is an error naming it.
#[test]
fn sinks_load_through_the_layout() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    layer(cfg(), &varmap)?;
    let mut tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("self_attn.{k}"), v.as_tensor().detach()))
        .collect();
    let sinks = tensors.remove("self_attn.sinks").unwrap();
    tensors.insert("self_attn.attn_sinks".into(), sinks.clone());
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let renamed = WeightLayout::llama().with_rename(|n| match n {
        "sinks" => "attn_sinks".to_string(),
        other => other.to_string(),
    });
    let m = MultiHeadAttention::load(cfg(), &renamed, vb.pp("self_attn"))?;
    let trained = MultiHeadAttention::load(
        cfg(),
        &WeightLayout::llama(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    let x = Tensor::randn(0f32, 1., (1, 5, 32), &dev)?;
    // (Checkpoint weights are packed once for our GEMM; VarMap ones go through candle's.)
    let diff = max_abs_diff(&m.forward(&x)?, &trained.forward(&x)?)?;
    assert!(diff <= 1e-5, "loaded vs trained layer: {diff}");
    // Without the rename the layout looks for `sinks` and says where.
    let e = MultiHeadAttention::load(cfg(), &WeightLayout::llama(), vb.pp("self_attn"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("self_attn.sinks"), "{e}");
    // A wrong shape names the tensor and both shapes.
    tensors.insert(
        "self_attn.sinks".into(),
        Tensor::zeros((2, 4), DType::F32, &dev)?,
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let e = MultiHeadAttention::load(cfg(), &WeightLayout::llama(), vb.pp("self_attn"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("self_attn.sinks") && e.contains("[4]") && e.contains("[2, 4]"),
        "{e}"
    );
    Ok(())
}

/// The slopes are BLOOM's `build_alibi_tensor` slopes (written here from its Python source);
/// configs with bad modifiers are rejected with the values in the message.
#[test]
fn slopes_and_config_checks() -> Result<()> {
    for n in [1usize, 2, 3, 5, 8, 12, 16, 24, 40, 64, 80] {
        let closest = 1usize << (63 - (n as u64).leading_zeros());
        let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
        let mut want: Vec<f64> = (1..=closest).map(|k| base.powf(k as f64)).collect();
        if closest != n {
            let extra = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
            let rest = (n - closest).min(closest);
            want.extend((0..rest).map(|k| extra.powf((2 * k + 1) as f64)));
        }
        let got = MhaConfig::standard_alibi_slopes(n);
        assert_eq!(got.len(), n);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-15 * b, "{n} heads: {got:?} vs {want:?}");
        }
    }
    let bad = |c: MhaConfig| c.validate().unwrap_err().to_string();
    let e = bad(MhaConfig::new(16, 4).with_softcap(-1.0));
    assert!(e.contains("softcap") && e.contains("-1"), "{e}");
    let e = bad(MhaConfig::new(16, 4).with_alibi_slopes(vec![0.5; 3]));
    assert!(e.contains("alibi_slopes") && e.contains('4'), "{e}");
    let e = bad(MhaConfig::new(16, 4).with_alibi_slopes(vec![0.5, f64::NAN, 0.1, 0.2]));
    assert!(e.contains("finite"), "{e}");
    Ok(())
}

/// A plan built once by one layer carries the masks only: each layer applies its own
/// modifiers (a layer without sinks does not inherit another's).
#[test]
fn shared_mask_plan_keeps_each_layers_modifiers() -> Result<()> {
    let dev = Device::Cpu;
    let (vm1, vm2) = (VarMap::new(), VarMap::new());
    let with = layer(cfg(), &vm1)?;
    let without = layer(MhaConfig::llama(32, 4, 2, 8), &vm2)?;
    let x = Tensor::randn(0f32, 1., (2, 6, 32), &dev)?;
    let input = MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft);
    let plan = with.mask_plan(&input)?;
    assert!(!plan.has_score_modifiers());
    for m in [&with, &without] {
        let direct = m.attend(&input)?.output;
        let shared = m
            .attend(&MhaInput::new(x.clone()).mask_plan(plan.clone()))?
            .output;
        assert_eq!(max_abs_diff(&direct, &shared)?, 0.0);
    }
    Ok(())
}
