//! Properties every correct attention module has, beyond the PyTorch parity cases.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_mha::case::test_device;
use candle_mha::{
    AttnMask, CausalAlignment, KeyPaddingMask, MaskedRowPolicy, MhaConfig, MhaInput,
    MultiHeadAttention, NeedWeights,
};
use candle_nn::{VarBuilder, VarMap};

fn build(cfg: MhaConfig, dtype: DType, dev: &Device) -> (VarMap, MultiHeadAttention) {
    let vm = VarMap::new();
    let m = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, dtype, dev)).unwrap();
    // Non-zero biases so that "output = out_proj.bias" style checks mean something.
    for (name, var) in vm.data().lock().unwrap().iter() {
        if name.contains("bias") {
            let r = Tensor::randn(0f32, 0.5, var.shape(), dev).unwrap();
            var.set(&r.to_dtype(dtype).unwrap()).unwrap();
        }
    }
    (vm, m)
}

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

fn randn(shape: &[usize], dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1., shape, dev).unwrap()
}

#[test]
fn padding_does_not_change_unpadded_outputs() -> Result<()> {
    let dev = test_device()?;
    let (_vm, mha) = build(
        MhaConfig::new(16, 4).with_batch_first(true),
        DType::F32,
        &dev,
    );
    let lens = [7usize, 4, 1];
    let x = randn(&[3, 7, 16], &dev);
    let padded = mha
        .attend(&MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::from_lengths(&lens)))?;
    for (b, &n) in lens.iter().enumerate() {
        let alone = mha.forward(&x.i((b..b + 1, ..n))?)?;
        let got = padded.output.i((b..b + 1, ..n))?;
        assert!(
            max_abs(&alone, &got) < 1e-5,
            "batch {b}: padding changed the output"
        );
    }
    Ok(())
}

#[test]
fn mask_forms_agree() -> Result<()> {
    // lengths == PyTorch-polarity mask == HF keep mask == 4-D additive mask == 3-D bool mask.
    let dev = test_device()?;
    let (b, h, l, e) = (2, 2, 5, 8);
    let (_vm, mha) = build(
        MhaConfig::new(e, h).with_batch_first(true),
        DType::F32,
        &dev,
    );
    let x = randn(&[b, l, e], &dev);
    let run = |i: MhaInput| mha.attend(&i.need_weights(NeedWeights::PerHead)).unwrap();
    let base =
        run(MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::from_lengths(&[5, 3])));
    let ignore = Tensor::new(&[[0u8, 0, 0, 0, 0], [0, 0, 0, 1, 1]], &dev)?;
    let keep = Tensor::new(&[[1u8, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
    let additive4 = ignore
        .to_dtype(DType::F32)?
        .affine(-1e30, 0.)?
        .reshape((b, 1, 1, l))?
        .broadcast_as((b, 1, l, l))?
        .contiguous()?;
    let bool3 = ignore
        .reshape((b, 1, 1, l))?
        .broadcast_as((b, h, l, l))?
        .reshape((b * h, l, l))?;
    let variants = [
        (
            "pytorch mask",
            run(MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::new(ignore.clone()))),
        ),
        (
            "keep mask",
            run(MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::from_keep_mask(&keep)?)),
        ),
        (
            "4-D additive broadcast",
            run(MhaInput::new(x.clone()).attn_mask(AttnMask::new(additive4))),
        ),
        (
            "3-D bool",
            run(MhaInput::new(x.clone()).attn_mask(AttnMask::new(bool3))),
        ),
        (
            "allowed polarity",
            run(MhaInput::new(x.clone())
                .attn_mask(AttnMask::from_allowed(&keep.reshape((b, 1, 1, l))?)?)),
        ),
    ];
    for (name, v) in variants {
        assert!(
            max_abs(&base.output, &v.output) < 1e-6,
            "{name}: output differs"
        );
        assert!(
            max_abs(base.weights.as_ref().unwrap(), v.weights.as_ref().unwrap()) < 1e-6,
            "{name}: weights differ"
        );
    }
    Ok(())
}

#[test]
fn causal_alignments() -> Result<()> {
    let dev = test_device()?;
    let (_vm, mha) = build(
        MhaConfig::new(8, 2).with_batch_first(true),
        DType::F32,
        &dev,
    );
    let (l, s) = (3usize, 6usize);
    let q = randn(&[1, l, 8], &dev);
    let kv = randn(&[1, s, 8], &dev);
    let w = |a| {
        mha.attend(
            &MhaInput::cross(q.clone(), kv.clone(), kv.clone())
                .causal(a)
                .need_weights(NeedWeights::Averaged),
        )
        .unwrap()
        .weights
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
    };
    let tl = w(CausalAlignment::TopLeft);
    let br = w(CausalAlignment::BottomRight);
    for i in 0..l {
        for j in 0..s {
            assert_eq!(tl[i][j] > 0.0, j <= i, "top-left ({i},{j})");
            assert_eq!(br[i][j] > 0.0, j <= i + s - l, "bottom-right ({i},{j})");
        }
    }
    // L == S: both alignments are the same mask.
    let x = randn(&[2, 4, 8], &dev);
    let a = mha
        .attend(&MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft))?
        .output;
    let b = mha
        .attend(&MhaInput::new(x).causal(CausalAlignment::BottomRight))?
        .output;
    assert!(max_abs(&a, &b) == 0.0);
    Ok(())
}

#[test]
fn fully_masked_rows_follow_the_policy() -> Result<()> {
    let dev = test_device()?;
    let cfg = MhaConfig::new(8, 2).with_batch_first(true);
    let (vm, zero) = build(cfg.clone(), DType::F32, &dev);
    let nan = MultiHeadAttention::new(
        cfg.with_masked_rows(MaskedRowPolicy::Nan),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let x = randn(&[2, 4, 8], &dev);
    let input = MhaInput::new(x)
        .key_padding_mask(KeyPaddingMask::from_lengths(&[4, 0]))
        .need_weights(NeedWeights::PerHead);
    let z = zero.attend(&input)?;
    let bias = vm.data().lock().unwrap()["out_proj.bias"]
        .as_tensor()
        .clone();
    let row = z.output.i(1)?; // every query of batch 1 is fully masked
    assert!(max_abs(&row, &bias.unsqueeze(0)?.broadcast_as((4, 8))?) < 1e-6);
    assert_eq!(
        z.weights
            .as_ref()
            .unwrap()
            .i(1)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    assert!(z
        .output
        .i(0)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    let n = nan.attend(&input)?;
    assert!(n
        .output
        .i(1)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_nan()));
    assert!(max_abs(&n.output.i(0)?, &z.output.i(0)?) == 0.0);
    Ok(())
}

#[test]
fn module_trait_and_layouts_agree() -> Result<()> {
    let dev = test_device()?;
    // batch_first=false: (L, B, E); unbatched (L, E) equals batch of one.
    let (_vm, mha) = build(MhaConfig::new(8, 2), DType::F32, &dev);
    let x = randn(&[5, 3, 8], &dev);
    let a = mha.forward(&x)?;
    let b = mha
        .attend(&MhaInput::cross(x.clone(), x.copy()?, x.copy()?))?
        .output; // unfused q/k/v path
    assert!(max_abs(&a, &b) < 1e-5);
    let one = mha.forward(&x.i((.., 1))?)?;
    assert!(max_abs(&one, &a.i((.., 1))?) < 1e-5);
    assert_eq!(mha.forward_t(&x, true)?.dims(), &[5, 3, 8]);
    Ok(())
}

#[test]
fn dropout_only_in_training() -> Result<()> {
    let dev = test_device()?;
    let (_vm, mha) = build(
        MhaConfig::new(8, 2)
            .with_batch_first(true)
            .with_dropout(0.5),
        DType::F32,
        &dev,
    );
    let x = randn(&[2, 6, 8], &dev);
    let input = MhaInput::new(x.clone()).need_weights(NeedWeights::PerHead);
    let e1 = mha.attend(&input)?;
    let e2 = mha.attend_t(&input, false)?;
    assert!(
        max_abs(&e1.output, &e2.output) == 0.0,
        "eval must be deterministic"
    );
    let t = mha.attend_t(&input, true)?;
    assert!(
        max_abs(&e1.output, &t.output) > 1e-3,
        "training must apply dropout"
    );
    // Dropped weights are 0 or the eval weight scaled by 1/(1-p).
    let ew = e1.weights.unwrap().flatten_all()?.to_vec1::<f32>()?;
    let tw = t.weights.unwrap().flatten_all()?.to_vec1::<f32>()?;
    let zeros = tw.iter().filter(|v| **v == 0.0).count();
    assert!(
        zeros > ew.len() / 5 && zeros < ew.len() * 4 / 5,
        "about half dropped: {zeros}/{}",
        ew.len()
    );
    for (e, t) in ew.iter().zip(&tw) {
        assert!(*t == 0.0 || (t - 2.0 * e).abs() < 1e-5);
    }
    Ok(())
}

#[test]
fn half_precision_keeps_dtype_and_tracks_f32() -> Result<()> {
    let dev = test_device()?;
    let cfg = MhaConfig::new(16, 4).with_batch_first(true);
    let (vm, m32) = build(cfg.clone(), DType::F32, &dev);
    let x = randn(&[2, 9, 16], &dev);
    let input = |dt| {
        MhaInput::new(x.to_dtype(dt).unwrap())
            .causal(CausalAlignment::TopLeft)
            .need_weights(NeedWeights::Averaged)
    };
    let r32 = m32.attend(&input(DType::F32))?;
    for (dt, tol) in [(DType::F16, 1e-2f32), (DType::BF16, 6e-2)] {
        let m = MultiHeadAttention::new(cfg.clone(), VarBuilder::from_varmap(&vm, dt, &dev))?;
        let r = m.attend(&input(dt))?;
        assert_eq!(r.output.dtype(), dt);
        assert_eq!(r.weights.as_ref().unwrap().dtype(), dt);
        let err = max_abs(&r.output.to_dtype(DType::F32)?, &r32.output);
        assert!(err < tol, "{dt:?}: {err}");
        // Weights rows still sum to 1.
        let sums = r.weights.unwrap().to_dtype(DType::F32)?.sum(D::Minus1)?;
        assert!(max_abs(&sums, &sums.ones_like()?) < tol);
    }
    Ok(())
}
