//! Incremental decoding: "cache equals full forward", RoPE, sliding window, left padding,
//! truncate/reset, cross-attention with a static memory.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_mha::{
    Backend, CausalAlignment, KvCache, KvFormat, MhaConfig, MhaInput, MultiHeadAttention,
    NeedWeights, Rope, RopeStyle,
};
use candle_nn::{VarBuilder, VarMap};

const TOL: f32 = 1e-5;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()
}

/// A seeded module: VarMap initialisation is random, so fill every variable from a fixed seed.
fn module(cfg: MhaConfig, seed: u64) -> Result<MultiHeadAttention> {
    let dev = Device::Cpu;
    let _ = seed; // candle cannot seed its CPU RNG: the inputs are random per run
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mha = MultiHeadAttention::load(cfg, &candle_mha::WeightLayout::llama(), vb)?;
    // Non-zero biases so that they matter; weights ~ N(0, 1/fan_in).
    for (_, var) in varmap.data().lock().unwrap().iter() {
        let std = match var.dims() {
            [_, fan_in] => 1.0 / (*fan_in as f32).sqrt(),
            _ => 0.3,
        };
        var.set(&Tensor::randn(0f32, std, var.shape(), &dev)?)?;
    }
    Ok(mha)
}

struct Case {
    name: &'static str,
    cfg: MhaConfig,
    style: Option<RopeStyle>,
    window: Option<usize>,
    pad: Vec<usize>,
    len: usize,
    /// Sizes of the successive calls (prefill chunk(s), then single tokens); sum = len.
    steps: Vec<usize>,
}

fn gqa() -> MhaConfig {
    MhaConfig::new(48, 6)
        .with_num_kv_heads(2)
        .with_batch_first(true)
}

fn cases() -> Vec<Case> {
    let ones = |n: usize| vec![1; n];
    let prefill = |p: usize, n: usize| {
        let mut v = vec![p];
        v.extend(ones(n - p));
        v
    };
    vec![
        Case {
            name: "gqa rope half-split window 3, batch 3 left-padded, prefill 4 + 1s",
            cfg: gqa(),
            style: Some(RopeStyle::HalfSplit),
            window: Some(3),
            pad: vec![0, 2, 5],
            len: 11,
            steps: prefill(4, 11),
        },
        Case {
            name: "gqa rope interleaved window 4, batch 2, token by token from slot 0",
            cfg: gqa(),
            style: Some(RopeStyle::Interleaved),
            window: Some(4),
            pad: vec![3, 0],
            len: 9,
            steps: ones(9),
        },
        Case {
            name: "gqa rope, no window, batch 3, prefill chunks 5+3 then 1s",
            cfg: gqa(),
            style: Some(RopeStyle::HalfSplit),
            window: None,
            pad: vec![1, 0, 4],
            len: 12,
            steps: vec![5, 3, 1, 1, 1, 1],
        },
        Case {
            name: "MQA (1 KV head), head_dim 12, no bias, window 1",
            cfg: MhaConfig::new(32, 4)
                .with_num_kv_heads(1)
                .with_head_dim(12)
                .with_bias(false)
                .with_batch_first(true),
            style: Some(RopeStyle::Interleaved),
            window: Some(1),
            pad: vec![0, 1],
            len: 7,
            steps: prefill(2, 7),
        },
        Case {
            name: "gqa with soft-capping, ALiBi and sinks, batch 2 left-padded, prefill 3 + 1s",
            cfg: gqa().with_softcap(2.5).with_alibi().with_sinks(true),
            style: None,
            window: None,
            pad: vec![0, 2],
            len: 8,
            steps: prefill(3, 8),
        },
        Case {
            name: "plain MHA without hook, sequence-first layout, window 2",
            cfg: MhaConfig::new(16, 4),
            style: None,
            window: Some(2),
            pad: vec![0, 0],
            len: 6,
            steps: prefill(3, 6),
        },
    ]
}

fn rope_for(cfg: &MhaConfig, style: RopeStyle) -> Result<Rope> {
    Rope::from_theta(
        10_000.0,
        cfg.head_dim(),
        64,
        style,
        DType::F32,
        &Device::Cpu,
    )
}

fn input(x: Tensor, case: &Case, rope: &Option<Rope>) -> MhaInput {
    let mut i = MhaInput::new(x).causal(CausalAlignment::BottomRight);
    if let Some(w) = case.window {
        i = i.sliding_window(w);
    }
    if let Some(r) = rope {
        i = i.rope(r.clone());
    }
    i
}

/// Time dim of the module's layout.
fn tdim(cfg: &MhaConfig) -> usize {
    if cfg.batch_first {
        1
    } else {
        0
    }
}

#[test]
fn cache_equals_full_forward() -> Result<()> {
    for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
        for (ci, case) in cases().into_iter().enumerate() {
            let cfg = case.cfg.clone().with_backend(backend);
            let mha = module(cfg.clone(), 7 + ci as u64)?;
            let b = case.pad.len();
            let e = cfg.embed_dim;
            let shape = if cfg.batch_first {
                (b, case.len, e)
            } else {
                (case.len, b, e)
            };
            let x = Tensor::randn(0f32, 1., shape, &Device::Cpu)?;
            let rope = case.style.map(|s| rope_for(&cfg, s)).transpose()?;
            let td = tdim(&cfg);

            // One full causal forward over the whole (left-padded) sequence.
            let full = mha
                .attend(&input(x.clone(), &case, &rope).left_padding(&case.pad))?
                .output;

            // The same sequence through the cache, in the case's steps; small chunks force
            // several reallocations.
            let mut cache = KvCache::with_chunk(3);
            let mut outs = vec![];
            let mut pos = 0;
            for (si, &n) in case.steps.iter().enumerate() {
                let xi = x.narrow(td, pos, n)?;
                let mut inp = input(xi, &case, &rope);
                if si == 0 {
                    inp = inp.left_padding(&case.pad);
                }
                outs.push(mha.attend_cached(&inp, &mut cache)?.output);
                pos += n;
                assert_eq!(cache.len(), pos);
            }
            assert_eq!(pos, case.len);
            let inc = Tensor::cat(&outs, td)?;
            let diff = max_abs_diff(&full, &inc)?;
            println!("{backend:?} {}: max |cache - full| = {diff:.3e}", case.name);
            assert!(
                diff <= TOL,
                "{backend:?} {}: cache differs from the full forward by {diff}",
                case.name
            );

            // Rewind and redo the last 3 positions: same outputs.
            let keep = case.len - 3;
            cache.truncate(keep)?;
            let redo = mha
                .attend_cached(&input(x.narrow(td, keep, 3)?, &case, &rope), &mut cache)?
                .output;
            let d2 = max_abs_diff(&redo, &full.narrow(td, keep, 3)?)?;
            assert!(d2 <= TOL, "{}: after truncate: {d2}", case.name);

            // Reset: the cache starts over (no padding now): equals a fresh unpadded forward.
            cache.reset();
            assert!(cache.is_empty() && cache.left_padding().is_none());
            let y = mha.attend_cached(&input(x.clone(), &case, &rope), &mut cache)?;
            let fresh = mha.attend(&input(x.clone(), &case, &rope))?;
            assert!(max_abs_diff(&y.output, &fresh.output)? <= TOL);
        }
    }
    Ok(())
}

/// The left-padded sequences of a batch decode exactly like each sequence alone, unpadded.
#[test]
fn left_padding_equals_unpadded_single_sequences() -> Result<()> {
    let cfg = gqa();
    let mha = module(cfg.clone(), 3)?;
    let rope = rope_for(&cfg, RopeStyle::HalfSplit)?;
    let pad = [0usize, 3, 1];
    let len = 8;
    let x = Tensor::randn(0f32, 1., (3, len, 48), &Device::Cpu)?;
    let mk = |x: Tensor| {
        MhaInput::new(x)
            .causal(CausalAlignment::BottomRight)
            .sliding_window(4)
            .rope(rope.clone())
    };
    let mut cache = KvCache::new();
    let pre = 5;
    let mut outs = vec![
        mha.attend_cached(&mk(x.narrow(1, 0, pre)?).left_padding(&pad), &mut cache)?
            .output,
    ];
    for t in pre..len {
        outs.push(
            mha.attend_cached(&mk(x.narrow(1, t, 1)?), &mut cache)?
                .output,
        );
    }
    let batched = Tensor::cat(&outs, 1)?;
    for (bi, &p) in pad.iter().enumerate() {
        let alone = x.i((bi..bi + 1, p.., ..))?;
        let mut c = KvCache::new();
        let y = mha.attend_cached(&mk(alone), &mut c)?.output;
        let d = max_abs_diff(&y, &batched.i((bi..bi + 1, p.., ..))?)?;
        println!("sequence {bi} (pad {p}): max diff {d:.3e}");
        assert!(d <= TOL, "sequence {bi}: {d}");
    }
    Ok(())
}

/// The sliding-window convention, read off the attention weights: with the cache holding S keys
/// and L new queries, query i sees exactly keys j with i + S - L - W < j <= i + S - L.
#[test]
fn sliding_window_convention() -> Result<()> {
    let cfg = MhaConfig::new(8, 2).with_batch_first(true);
    let mha = module(cfg, 5)?;
    let x = Tensor::randn(0f32, 1., (1, 9, 8), &Device::Cpu)?;
    let w = 3;
    let mut cache = KvCache::new();
    mha.attend_cached(&MhaInput::new(x.narrow(1, 0, 5)?), &mut cache)?;
    let out = mha.attend_cached(
        &MhaInput::new(x.narrow(1, 5, 4)?)
            .sliding_window(w)
            .need_weights(NeedWeights::PerHead),
        &mut cache,
    )?;
    let weights = out.weights.unwrap().i((0, 0))?.to_vec2::<f32>()?; // (L=4, S=9)
    let (l, s) = (4i64, 9i64);
    for (i, row) in weights.iter().enumerate() {
        for (j, &p) in row.iter().enumerate() {
            let (i, j) = (i as i64, j as i64);
            let visible = i + s - l - (w as i64) < j && j <= i + s - l;
            assert_eq!(p > 0.0, visible, "query {i}, key {j}: weight {p}");
        }
    }
    Ok(())
}

/// RoPE against the textbook formulas (HF `rotate_half` and GPT-J interleaved pairs).
#[test]
fn rope_matches_formula() -> Result<()> {
    let dev = Device::Cpu;
    let (d, t) = (8usize, 5usize);
    let x = Tensor::randn(0f32, 1., (1, t, 1, d), &dev)?; // (B, T, H, D)
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let theta = 500.0f32;
    let start = 3usize;
    for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
        let rope = Rope::from_theta(theta as f64, d, 16, style, DType::F32, &dev)?;
        let got = rope
            .apply(&x, &[start as i64])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for ti in 0..t {
            let pos = (start + ti) as f32;
            for i in 0..d / 2 {
                let ang = pos * theta.powf(-2.0 * i as f32 / d as f32);
                let (c, s) = (ang.cos(), ang.sin());
                let (a, b) = match style {
                    RopeStyle::HalfSplit => (i, i + d / 2),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    other => panic!("no formula for {other:?}"),
                };
                let (xa, xb) = (xs[ti * d + a], xs[ti * d + b]);
                let (ea, eb) = (xa * c - xb * s, xb * c + xa * s);
                assert!((got[ti * d + a] - ea).abs() < 1e-5, "{style:?}");
                assert!((got[ti * d + b] - eb).abs() < 1e-5, "{style:?}");
            }
        }
    }
    // Per-sequence starts equal separate calls.
    let rope = Rope::from_theta(1e4, d, 16, RopeStyle::HalfSplit, DType::F32, &dev)?;
    let x2 = Tensor::randn(0f32, 1., (2, t, 3, d), &dev)?;
    let both = rope.apply(&x2, &[2, 6])?;
    for (bi, s) in [(0usize, 2i64), (1, 6)] {
        let one = rope.apply(&x2.narrow(0, bi, 1)?, &[s])?;
        assert!(max_abs_diff(&one, &both.narrow(0, bi, 1)?)? < 1e-6);
    }
    // The differentiable path (inputs tracked by autograd) rotates the same way, for both
    // styles, shared and per-sequence starts (negative ones: left padding), strided inputs.
    for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
        let rope = Rope::from_theta(1e4, d, 16, style, DType::F32, &dev)?;
        let packed = Tensor::randn(0f32, 1., (2, t, 5, d), &dev)?;
        let x3 = packed.narrow(2, 1, 3)?; // a (B, T, H, D) view, as a packed projection gives
        let var = candle_core::Var::from_tensor(&x3.contiguous()?)?;
        for starts in [&[4i64][..], &[-2, 7]] {
            let fused = rope.apply(&x3, starts)?;
            let slow = rope.apply(var.as_tensor(), starts)?;
            assert!(var.as_tensor().track_op());
            assert!(max_abs_diff(&fused, &slow)? < 1e-6, "{style:?} {starts:?}");
        }
    }
    Ok(())
}

/// Cross-attention: keys/values of an encoder output projected once equal the plain call.
#[test]
fn static_kv_equals_cross_attention() -> Result<()> {
    let cfg = MhaConfig::new(24, 6)
        .with_num_kv_heads(3)
        .with_kdim(24)
        .with_vdim(24)
        .with_batch_first(true);
    let mha = module(cfg, 9)?;
    let dev = Device::Cpu;
    let memory = Tensor::randn(0f32, 1., (2, 7, 24), &dev)?;
    let kv = mha.static_kv(&memory)?;
    assert_eq!(kv.len(), 7);
    let kpm = candle_mha::KeyPaddingMask::from_lengths(&[7, 4]);
    for step in 0..3 {
        let q = Tensor::randn(0f32, 1., (2, 1 + step, 24), &dev)?;
        let a = mha.attend_static(&MhaInput::new(q.clone()).key_padding_mask(kpm.clone()), &kv)?;
        let b = mha.attend(
            &MhaInput::cross(q, memory.clone(), memory.clone()).key_padding_mask(kpm.clone()),
        )?;
        assert!(max_abs_diff(&a.output, &b.output)? <= TOL);
    }
    Ok(())
}

/// Misuse is reported, and a failed call leaves the cache unchanged.
#[test]
fn cache_errors() -> Result<()> {
    let mha = module(gqa(), 1)?;
    let dev = Device::Cpu;
    let mut cache = KvCache::new();
    let x = Tensor::randn(0f32, 1., (2, 4, 48), &dev)?;
    mha.attend_cached(&MhaInput::new(x.clone()), &mut cache)?;
    let err = mha
        .attend_cached(&MhaInput::new(x.narrow(0, 0, 1)?), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch size"), "{err}");
    let err = mha
        .attend_cached(
            &MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft),
            &mut cache,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("BottomRight"), "{err}");
    let err = mha
        .attend_cached(&MhaInput::new(x.clone()).left_padding(&[1, 0]), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("left_padding"), "{err}");
    assert_eq!(cache.len(), 4);
    assert!(cache.truncate(5).is_err());
    let small = Rope::from_theta(1e4, 8, 5, RopeStyle::HalfSplit, DType::F32, &dev)?;
    let err = mha
        .attend_cached(&MhaInput::new(x.clone()).rope(small), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_positions"), "{err}");
    assert_eq!(cache.len(), 4);
    Ok(())
}

/// A cloned cache is a cache of its own: after a prompt, two clones take different tokens for
/// two steps, and each branch's outputs equal a fresh forward over its own sequence; rewinding
/// and rewriting the original afterwards changes neither branch (copy on write, every format).
#[test]
fn cloned_caches_are_independent() -> Result<()> {
    for format in [KvFormat::Native, KvFormat::Int8] {
        let cfg = gqa().with_backend(Backend::Auto);
        let mha = module(cfg.clone(), 3)?;
        let e = cfg.embed_dim;
        let dev = Device::Cpu;
        let prompt = Tensor::randn(0f32, 1., (1, 6, e), &dev)?;
        let tokens: Vec<Tensor> = (0..4)
            .map(|_| Tensor::randn(0f32, 1., (1, 1, e), &dev))
            .collect::<Result<_>>()?;
        let causal = |x: Tensor| MhaInput::new(x).causal(CausalAlignment::BottomRight);
        let mut base = KvCache::with_chunk(64).with_format(format);
        mha.attend_cached(&causal(prompt.clone()), &mut base)?;
        let (mut a, mut b) = (base.clone(), base.clone());
        let mut outs = [vec![], vec![]];
        for step in 0..2 {
            outs[0].push(
                mha.attend_cached(&causal(tokens[step].clone()), &mut a)?
                    .output,
            );
            outs[1].push(
                mha.attend_cached(&causal(tokens[2 + step].clone()), &mut b)?
                    .output,
            );
        }
        // The original rewinds and writes something else where the branches read.
        base.truncate(3)?;
        mha.attend_cached(
            &causal(Tensor::randn(0f32, 1., (1, 5, e), &dev)?),
            &mut base,
        )?;
        for (branch, (cache, toks)) in [(&mut a, &tokens[..2]), (&mut b, &tokens[2..])]
            .into_iter()
            .enumerate()
        {
            let seq = Tensor::cat(&[&prompt, &toks[0], &toks[1]], 1)?;
            // A fresh cache over the whole branch: its last two rows.
            let mut fresh = KvCache::new().with_format(format);
            let want = mha
                .attend_cached(&causal(seq), &mut fresh)?
                .output
                .narrow(1, 6, 2)?;
            let got = Tensor::cat(&outs[branch], 1)?;
            let d = max_abs_diff(&got, &want)?;
            assert!(
                d <= 1e-4,
                "{format:?} branch {branch}: {d} from a fresh prefill"
            );
            // One more step after the original's rewrite still matches.
            let next = Tensor::randn(0f32, 1., (1, 1, e), &dev)?;
            let seq = Tensor::cat(&[&prompt, &toks[0], &toks[1], &next], 1)?;
            let got = mha.attend_cached(&causal(next), cache)?.output;
            let mut fresh = KvCache::new().with_format(format);
            let want = mha
                .attend_cached(&causal(seq), &mut fresh)?
                .output
                .narrow(1, 8, 1)?;
            let d = max_abs_diff(&got, &want)?;
            assert!(
                d <= 1e-4,
                "{format:?} branch {branch}, after the rewrite: {d}"
            );
        }
    }
    Ok(())
}
