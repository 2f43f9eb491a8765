//! Trainability: PyTorch-style initialisation, finite-difference gradients, finite gradients
//! through every option. (Gradient parity with PyTorch autograd lives in the parity cases:
//! `tests/parity.rs` runs every `grad_*` case with `grad: true`.)

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_mha::case::test_device;
use candle_mha::{
    AttnMask, CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention,
    WeightLayout,
};
use candle_nn::{VarBuilder, VarMap};

fn stats(t: &Tensor) -> (f64, f64, f64) {
    let v = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let max = v.iter().fold(0f64, |a, x| a.max(x.abs()));
    (mean, std, max)
}

fn fresh(cfg: MhaConfig, layout: &WeightLayout) -> VarMap {
    let vm = VarMap::new();
    MultiHeadAttention::load(
        cfg,
        layout,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    vm
}

fn var(vm: &VarMap, name: &str) -> Tensor {
    vm.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}"))
        .as_tensor()
        .clone()
}

/// Uniform(-b, b): every |x| <= b, std = b/sqrt(3).
fn assert_uniform(name: &str, t: &Tensor, bound: f64) {
    let (mean, std, max) = stats(t);
    assert!(
        max <= bound + 1e-7,
        "{name}: |x| up to {max}, bound {bound}"
    );
    assert!(
        max > 0.9 * bound,
        "{name}: max {max} far below bound {bound}"
    );
    let want = bound / 3f64.sqrt();
    assert!(
        (std / want - 1.0).abs() < 0.05,
        "{name}: std {std}, want {want}"
    );
    assert!(mean.abs() < 0.05 * bound, "{name}: mean {mean}");
}

fn assert_zero(name: &str, t: &Tensor) {
    assert_eq!(stats(t).2, 0.0, "{name} must start at zero");
}

#[test]
fn initialisation_follows_pytorch() {
    let e = 128;
    // nn.MultiheadAttention: xavier_uniform_ on the packed (3E, E) in_proj_weight, zero biases,
    // out_proj as nn.Linear (kaiming_uniform(a=sqrt(5)) => U(±1/sqrt(E))) with zero bias,
    // xavier_normal_ bias_k/bias_v of shape (1, 1, E) => N(0, 1/E).
    let packed = (6.0 / (4 * e) as f64).sqrt();
    let out = 1.0 / (e as f64).sqrt();
    let cfg = MhaConfig::new(e, 4).with_add_bias_kv(true);
    let vm = fresh(cfg.clone(), &WeightLayout::torch());
    assert_uniform("in_proj_weight", &var(&vm, "in_proj_weight"), packed);
    assert_zero("in_proj_bias", &var(&vm, "in_proj_bias"));
    assert_uniform("out_proj.weight", &var(&vm, "out_proj.weight"), out);
    assert_zero("out_proj.bias", &var(&vm, "out_proj.bias"));
    let (m, s, _) = stats(&Tensor::cat(&[var(&vm, "bias_k"), var(&vm, "bias_v")], 2).unwrap());
    let want = (1.0 / e as f64).sqrt();
    // Five standard errors of the mean and of the standard deviation of n = 2E normal draws
    // (tighter bounds failed about once in 300 runs).
    let n = (2 * e) as f64;
    assert!(
        m.abs() < 5.0 * want / n.sqrt() && (s / want - 1.0).abs() < 5.0 / (2.0 * (n - 1.0)).sqrt(),
        "bias_k/v: mean {m} std {s}, want std {want}"
    );

    // The same distribution in every other layout.
    let vm = fresh(cfg.clone(), &WeightLayout::separate());
    for p in ["q_proj", "k_proj", "v_proj"] {
        assert_uniform(p, &var(&vm, &format!("{p}.weight")), packed);
        assert_zero(p, &var(&vm, &format!("{p}.bias")));
    }
    assert_uniform("out_proj", &var(&vm, "out_proj.weight"), out);
    let vm = fresh(cfg.clone(), &WeightLayout::gpt2());
    assert_uniform("c_attn", &var(&vm, "c_attn.weight"), packed);
    assert_uniform("c_proj", &var(&vm, "c_proj.weight"), out);
    let vm = fresh(cfg.clone(), &WeightLayout::bert());
    assert_uniform("query", &var(&vm, "attention.self.query.weight"), packed);

    // kdim/vdim != E: PyTorch initialises q/k/v_proj_weight one by one.
    let (kd, vd) = (64, 32);
    let vm = fresh(
        MhaConfig::new(e, 4).with_kdim(kd).with_vdim(vd),
        &WeightLayout::torch(),
    );
    assert_uniform(
        "q_proj_weight",
        &var(&vm, "q_proj_weight"),
        (6.0 / (2 * e) as f64).sqrt(),
    );
    assert_uniform(
        "k_proj_weight",
        &var(&vm, "k_proj_weight"),
        (6.0 / (e + kd) as f64).sqrt(),
    );
    assert_uniform(
        "v_proj_weight",
        &var(&vm, "v_proj_weight"),
        (6.0 / (e + vd) as f64).sqrt(),
    );
}

/// sum(output * g) with every parameter and input a variable.
struct Setup {
    vm: VarMap,
    mha: MultiHeadAttention,
    inputs: Vec<Var>,
    g: Tensor,
}

fn setup(
    cfg: MhaConfig,
    layout: &WeightLayout,
    dev: &Device,
    dtype: DType,
    b: usize,
    l: usize,
    s: usize,
) -> Setup {
    let vm = VarMap::new();
    let mha = MultiHeadAttention::load(
        cfg.clone(),
        layout,
        VarBuilder::from_varmap(&vm, dtype, dev),
    )
    .unwrap();
    // Random (not zero) biases so their gradients matter.
    for (name, v) in vm.data().lock().unwrap().iter() {
        if name.contains("bias") {
            v.set(
                &Tensor::randn(0f32, 0.3, v.shape(), dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let r = |shape: (usize, usize, usize)| {
        Var::from_tensor(
            &Tensor::randn(0f32, 1., shape, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    let inputs = vec![
        r((b, l, cfg.embed_dim)),
        r((b, s, cfg.kdim())),
        r((b, s, cfg.vdim())),
    ];
    let g = Tensor::randn(0f32, 1., (b, l, cfg.embed_dim), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Setup { vm, mha, inputs, g }
}

fn loss(st: &Setup, build: &dyn Fn(MhaInput) -> MhaInput) -> Result<Tensor> {
    let [q, k, v] = &st.inputs[..] else {
        unreachable!()
    };
    let input = build(MhaInput::cross(
        q.as_tensor().clone(),
        k.as_tensor().clone(),
        v.as_tensor().clone(),
    ));
    (st.mha.attend(&input)?.output * &st.g)?.sum_all()
}

#[test]
fn gradients_match_finite_differences_f64() -> Result<()> {
    let dev = Device::Cpu;
    let (b, l, s) = (2, 3, 4);
    let cfg = MhaConfig::new(4, 2)
        .with_batch_first(true)
        .with_kdim(3)
        .with_vdim(5)
        .with_add_bias_kv(true)
        .with_add_zero_attn(true);
    let st = setup(cfg, &WeightLayout::torch(), &dev, DType::F64, b, l, s);
    let mask = Tensor::randn(0f64, 1., (l, s), &dev)?;
    let build = |i: MhaInput| {
        i.key_padding_mask(KeyPaddingMask::from_lengths(&[4, 2]))
            .attn_mask(AttnMask::new(mask.clone()))
            .causal(CausalAlignment::BottomRight)
    };
    let grads = loss(&st, &build)?.backward()?;
    let mut vars: Vec<(String, Var)> = st
        .vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.extend(
        ["query", "key", "value"]
            .iter()
            .zip(&st.inputs)
            .map(|(n, v)| (n.to_string(), v.clone())),
    );
    let eps = 1e-6;
    let mut worst = 0f64;
    for (name, v) in &vars {
        let an = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let an = an.flatten_all()?.to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in 0..base.len() {
            let at = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.shape(), &dev)?)?;
                loss(&st, &build)?.to_scalar::<f64>()
            };
            let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &dev)?)?;
            let err = (fd - an[i]).abs() / an[i].abs().max(1.0);
            worst = worst.max(err);
            assert!(
                err < 1e-6,
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                an[i]
            );
        }
    }
    println!("worst relative finite-difference error: {worst:e}");
    Ok(())
}

#[test]
fn gradients_are_finite_through_every_option() -> Result<()> {
    let dev = test_device()?;
    let (b, l, s) = (3, 4, 5);
    let configs = [
        (
            "gqa+bias_kv",
            MhaConfig::new(16, 4)
                .with_num_kv_heads(2)
                .with_batch_first(true)
                .with_add_bias_kv(true),
            WeightLayout::llama(),
        ),
        (
            "kdim/vdim+zero_attn",
            MhaConfig::new(8, 2)
                .with_batch_first(true)
                .with_kdim(6)
                .with_vdim(10)
                .with_add_zero_attn(true),
            WeightLayout::torch(),
        ),
        (
            "gpt2",
            MhaConfig::new(8, 2).with_batch_first(true),
            WeightLayout::gpt2(),
        ),
    ];
    for (what, cfg, layout) in configs {
        let st = setup(cfg, &layout, &dev, DType::F32, b, l, s);
        let h = st.mha.config().num_heads;
        // A fully padded batch element, a boolean 3-D mask and a float 2-D mask with -inf.
        let bool3 = Tensor::rand(0f32, 1., (b * h, l, s), &dev)?.ge(0.7)?;
        let float2 = Tensor::randn(0f32, 1., (l, s), &dev)?;
        let float2 = float2
            .ge(1.0)?
            .where_cond(&Tensor::full(f32::NEG_INFINITY, (l, s), &dev)?, &float2)?;
        let builds: Vec<Box<dyn Fn(MhaInput) -> MhaInput>> = vec![
            Box::new(|i: MhaInput| i.key_padding_mask(KeyPaddingMask::from_lengths(&[5, 0, 2]))),
            Box::new(|i: MhaInput| {
                i.attn_mask(AttnMask::new(bool3.clone()))
                    .causal(CausalAlignment::TopLeft)
            }),
            Box::new(|i: MhaInput| {
                i.attn_mask(AttnMask::new(float2.clone()))
                    .causal(CausalAlignment::BottomRight)
            }),
        ];
        for (j, build) in builds.iter().enumerate() {
            let grads = loss(&st, build.as_ref())?.backward()?;
            for (name, v) in st.vm.data().lock().unwrap().iter() {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{what}/{j}: no gradient for {name}"));
                let bad = g
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .filter(|x| !x.is_finite())
                    .count();
                assert_eq!(
                    bad, 0,
                    "{what}/{j}: {bad} non-finite gradient entries in {name}"
                );
            }
            let gq = grads.get(st.inputs[0].as_tensor()).expect("query gradient");
            assert!(gq
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite()));
        }
    }
    Ok(())
}

#[test]
fn dropout_is_differentiable_in_training() -> Result<()> {
    let dev = test_device()?;
    let st = setup(
        MhaConfig::new(8, 2)
            .with_batch_first(true)
            .with_dropout(0.3),
        &WeightLayout::torch(),
        &dev,
        DType::F32,
        2,
        4,
        4,
    );
    let q = st.inputs[0].as_tensor();
    let out = st.mha.attend_t(&MhaInput::new(q.clone()), true)?.output;
    let grads = (out * &st.g)?.sum_all()?.backward()?;
    let g = grads.get(q).expect("query gradient");
    assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}
