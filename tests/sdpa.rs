//! The functional API: `sdpa` (PyTorch SDPA semantics), `sdpa_varlen` (packed sequences),
//! `Packing`, and the module's packed entry point. Properties, against independent candle-op
//! formulas and against each other; the PyTorch numbers are in `tests/core_cases.rs`.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_mha::kernels::test_support::cpu_calls;
use candle_mha::kernels::test_support::test_device;
use candle_mha::sdpa::{sdpa_varlen_with_kernel, sdpa_with_kernel};
use candle_mha::{
    sdpa, sdpa_varlen, Backend, CausalAlignment, MaskedRowPolicy, MhaConfig, MhaInput,
    MultiHeadAttention, Packing, Rope, RopeStyle, SdpaLayout, SdpaMask, SdpaOptions, SeqOffsets,
};
use candle_nn::{VarBuilder, VarMap};

fn dev() -> Device {
    test_device().expect("CANDLE_MHA_DEVICE")
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic without a device RNG: a hash of the index.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 31;
            x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 29;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    if a.elem_count() == 0 {
        return 0.0;
    }
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

/// softmax(scale·q·kᵀ + bias)·v on plain candle ops, `(B, H, L, D)`, K/V repeated for GQA;
/// `allowed` (B|1, H|1, L, S) u8, 1 = attend. Fully masked rows give 0.
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, allowed: Option<&Tensor>, scale: f64) -> Tensor {
    let (b, h, l, _) = q.dims4().unwrap();
    let (_, hkv, s, dv) = v.dims4().unwrap();
    let rep = |t: &Tensor| {
        let (_, _, s, d) = t.dims4().unwrap();
        t.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, hkv, h / hkv, s, d))
            .unwrap()
            .reshape((b, h, s, d))
            .unwrap()
    };
    let (k, v) = (rep(k), rep(v));
    let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    if let Some(a) = allowed {
        let a = a.broadcast_as((b, h, l, s)).unwrap();
        let ninf = Tensor::full(f32::NEG_INFINITY, (b, h, l, s), q.device()).unwrap();
        scores = a.eq(0u8).unwrap().where_cond(&ninf, &scores).unwrap();
    }
    let m = scores.max_keepdim(D::Minus1).unwrap();
    let dead = m.eq(f32::NEG_INFINITY).unwrap();
    let m = dead.where_cond(&m.zeros_like().unwrap(), &m).unwrap();
    let e = scores.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e
        .broadcast_div(
            &e.sum_keepdim(D::Minus1)
                .unwrap()
                .clamp(1e-30, f64::MAX)
                .unwrap(),
        )
        .unwrap();
    let out = p.matmul(&v).unwrap();
    let dead = dead.broadcast_as((b, h, l, dv)).unwrap();
    dead.where_cond(&out.zeros_like().unwrap(), &out).unwrap()
}

fn causal_allowed(l: usize, s: usize, align: CausalAlignment, window: Option<usize>) -> Tensor {
    let c = candle_mha::mask::Causal {
        alignment: align,
        window,
    };
    let mut v = vec![0u8; l * s];
    for i in 0..l {
        let (lo, hi) = c.key_range(i, l, s);
        v[i * s + lo..i * s + hi].fill(1);
    }
    Tensor::from_vec(v, (1, 1, l, s), &dev()).unwrap()
}

#[test]
fn sdpa_matches_the_formula_for_every_option() -> Result<()> {
    let (b, h, hkv, d) = (2, 6, 2, 16);
    for (l, s) in [(5, 9), (9, 5), (1, 40), (70, 300)] {
        let q = randn(&[b, h, l, d], 1);
        let k = randn(&[b, hkv, s, d], 2);
        let v = randn(&[b, hkv, s, d], 3);
        for backend in [Backend::Reference, Backend::CpuFused] {
            let base = SdpaOptions::new().backend(backend);
            let scale = 1.0 / (d as f64).sqrt();
            // plain
            let got = sdpa(&q, &k, &v, &base)?;
            assert!(max_abs(&got, &naive(&q, &k, &v, None, scale)) < 1e-5);
            // causal, both alignments, with and without window
            for align in [CausalAlignment::TopLeft, CausalAlignment::BottomRight] {
                for w in [None, Some(1), Some(3)] {
                    let mut o = base.clone().causal(align);
                    if let Some(w) = w {
                        o = o.sliding_window(w);
                    }
                    let got = sdpa(&q, &k, &v, &o)?;
                    let want = naive(&q, &k, &v, Some(&causal_allowed(l, s, align, w)), scale);
                    let err = max_abs(&got, &want);
                    assert!(err < 1e-5, "{backend:?} l{l} s{s} {align:?} w{w:?}: {err}");
                }
            }
            // is_causal = top-left
            let a = sdpa(&q, &k, &v, &base.clone().is_causal(true))?;
            let t = sdpa(&q, &k, &v, &base.clone().causal(CausalAlignment::TopLeft))?;
            assert_eq!(max_abs(&a, &t), 0.0);
            // scale
            let got = sdpa(&q, &k, &v, &base.clone().scale(0.05))?;
            assert!(max_abs(&got, &naive(&q, &k, &v, None, 0.05)) < 1e-5);
            // boolean masks of every broadcast shape (1 = attend), with fully masked rows
            let full = randn(&[b, h, l, s], 7).ge(-0.6)?.to_dtype(DType::U8)?;
            for shape in [
                vec![b, h, l, s],
                vec![b, 1, 1, s],
                vec![1, h, l, s],
                vec![l, s],
                vec![s],
                vec![h, l, s],
            ] {
                let mut m = full.clone();
                // Take the corner of `full` with this shape (aligned from the right).
                let pad = 4 - shape.len();
                for dim in 0..pad {
                    m = m.narrow(dim, 0, 1)?;
                }
                for (dim, &n) in shape.iter().enumerate() {
                    m = m.narrow(dim + pad, 0, n)?;
                }
                let m = m.reshape(shape.as_slice())?.contiguous()?;
                let mut m4 = vec![1usize; pad];
                m4.extend(&shape);
                let want = naive(&q, &k, &v, Some(&m.reshape(m4.as_slice())?), scale);
                let got = sdpa(
                    &q,
                    &k,
                    &v,
                    &base.clone().attn_mask(SdpaMask::Allowed(m.clone())),
                )?;
                assert!(max_abs(&got, &want) < 1e-5, "{backend:?} mask {shape:?}");
                // The same mask as an additive float mask.
                let add = m.eq(0u8)?.where_cond(
                    &Tensor::full(f32::NEG_INFINITY, m.shape(), &dev())?,
                    &Tensor::zeros(m.shape(), DType::F32, &dev())?,
                )?;
                let got = sdpa(&q, &k, &v, &base.clone().attn_mask(SdpaMask::new(add)))?;
                assert!(
                    max_abs(&got, &want) < 1e-5,
                    "{backend:?} additive {shape:?}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn layouts_agree_and_blhd_reads_projections_in_place() -> Result<()> {
    let (b, h, hkv, l, s, d) = (2, 4, 2, 7, 11, 8);
    let q = randn(&[b, h, l, d], 11);
    let k = randn(&[b, hkv, s, d], 12);
    let v = randn(&[b, hkv, s, d], 13);
    let o = SdpaOptions::new().causal(CausalAlignment::BottomRight);
    let bhld = sdpa(&q, &k, &v, &o)?;
    let t = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    let blhd = sdpa(&t(&q), &t(&k), &t(&v), &o.clone().layout(SdpaLayout::Blhd))?;
    assert_eq!(blhd.dims(), &[b, l, h, d]);
    assert_eq!(max_abs(&blhd.transpose(1, 2)?, &bhld), 0.0);
    // 3-D = one unbatched sequence.
    let one = sdpa(&q.get(1)?, &k.get(1)?, &v.get(1)?, &o)?;
    assert_eq!(max_abs(&one, &bhld.get(1)?), 0.0);
    Ok(())
}

#[test]
fn half_dtypes_keep_their_dtype_and_track_f32() -> Result<()> {
    let (b, h, l, s, d) = (2, 4, 9, 9, 32);
    let q = randn(&[b, h, l, d], 21);
    let k = randn(&[b, h, s, d], 22);
    let v = randn(&[b, h, s, d], 23);
    let o = SdpaOptions::new().is_causal(true);
    let want = sdpa(&q, &k, &v, &o)?;
    for (dt, tol) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let c = |x: &Tensor| x.to_dtype(dt).unwrap();
        let got = sdpa(&c(&q), &c(&k), &c(&v), &o)?;
        assert_eq!(got.dtype(), dt);
        let err = max_abs(&got, &want);
        assert!(err < tol, "{dt:?}: {err}");
    }
    Ok(())
}

#[test]
fn fully_masked_rows_are_zero_or_nan_by_policy() -> Result<()> {
    let q = randn(&[1, 2, 4, 8], 31);
    let k = randn(&[1, 2, 3, 8], 32);
    // bottom-right with L > S: query 0 sees no key.
    for backend in [Backend::Reference, Backend::CpuFused] {
        let o = SdpaOptions::new()
            .causal(CausalAlignment::BottomRight)
            .backend(backend);
        let z = sdpa(&q, &k, &k, &o)?;
        let row0 = z.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(row0.iter().all(|&x| x == 0.0), "{backend:?}: {row0:?}");
        let n = sdpa(&q, &k, &k, &o.masked_rows(MaskedRowPolicy::Nan))?;
        let row0 = n.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(row0.iter().all(|x| x.is_nan()), "{backend:?}: {row0:?}");
        let rest = n.narrow(2, 1, 3)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rest.iter().all(|x| x.is_finite()));
    }
    Ok(())
}

#[test]
fn empty_inputs_give_empty_or_masked_outputs() -> Result<()> {
    let q = randn(&[2, 4, 3, 8], 41);
    let k0 = Tensor::zeros((2, 4, 0, 8), DType::F32, &dev())?;
    let out = sdpa_with_kernel(&q, &k0, &k0, &SdpaOptions::new())?;
    assert_eq!(out.output.dims(), &[2, 4, 3, 8]);
    assert_eq!(out.kernel, "none");
    assert_eq!(out.output.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    let q0 = Tensor::zeros((2, 4, 0, 8), DType::F32, &dev())?;
    let k = randn(&[2, 4, 5, 8], 42);
    assert_eq!(
        sdpa(&q0, &k, &k, &SdpaOptions::new())?.dims(),
        &[2, 4, 0, 8]
    );
    // varlen with nothing at all
    let e = Tensor::zeros((0, 4, 8), DType::F32, &dev())?;
    let cu = SeqOffsets::from_lengths(&[0, 0]);
    assert_eq!(
        sdpa_varlen(&e, &e, &e, &cu, &cu, &SdpaOptions::new())?.dims(),
        &[0, 4, 8]
    );
    Ok(())
}

#[test]
fn gradients_flow_through_sdpa_like_through_the_formula() -> Result<()> {
    let (b, h, hkv, l, s, d) = (1, 4, 2, 5, 6, 8);
    let q = Var::from_tensor(&randn(&[b, h, l, d], 51))?;
    let k = Var::from_tensor(&randn(&[b, hkv, s, d], 52))?;
    let v = Var::from_tensor(&randn(&[b, hkv, s, d], 53))?;
    let g = randn(&[b, h, l, d], 54);
    let allowed = causal_allowed(l, s, CausalAlignment::BottomRight, None);
    let out = sdpa_with_kernel(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        &SdpaOptions::new().causal(CausalAlignment::BottomRight),
    )?;
    assert_eq!(
        out.kernel, "cpu",
        "tracked inputs take the fused kernel and its backward"
    );
    let grads = (out.output * &g)?.sum_all()?.backward()?;
    let want = naive(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        Some(&allowed),
        1.0 / 8f64.sqrt(),
    );
    let wgrads = (want * &g)?.sum_all()?.backward()?;
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = grads.get(var).expect("grad");
        let w = wgrads.get(var).expect("grad");
        let err = max_abs(a, w);
        assert!(err < 1e-5, "d{name}: {err}");
    }
    Ok(())
}

/// Sequences of random lengths, packed vs. one sdpa call per sequence.
#[test]
fn varlen_equals_per_sequence_sdpa() -> Result<()> {
    let (h, hkv, d, dv) = (6, 3, 16, 8);
    let q_lens = [5usize, 0, 70, 1, 33, 130];
    let k_lens = [5usize, 4, 90, 0, 33, 100];
    let (cu_q, cu_k) = (
        SeqOffsets::from_lengths(&q_lens),
        SeqOffsets::from_lengths(&k_lens),
    );
    let q = randn(&[cu_q.total(), h, d], 61);
    let k = randn(&[cu_k.total(), hkv, d], 62);
    let v = randn(&[cu_k.total(), hkv, dv], 63);
    let causal = [
        None,
        Some((CausalAlignment::TopLeft, None)),
        Some((CausalAlignment::BottomRight, None)),
        Some((CausalAlignment::BottomRight, Some(7))),
    ];
    for backend in [Backend::Reference, Backend::CpuFused] {
        for c in causal {
            let mut o = SdpaOptions::new().backend(backend).scale(0.2);
            if let Some((a, w)) = c {
                o = o.causal(a);
                if let Some(w) = w {
                    o = o.sliding_window(w);
                }
            }
            let calls = cpu_calls();
            let got = sdpa_varlen_with_kernel(&q, &k, &v, &cu_q, &cu_k, &o)?;
            assert_eq!(got.output.dims(), &[cu_q.total(), h, dv]);
            if backend == Backend::CpuFused {
                assert_eq!(got.kernel, "cpu");
                assert!(cpu_calls() > calls);
            }
            for n in 0..q_lens.len() {
                let (rq, rk) = (cu_q.range(n), cu_k.range(n));
                let part = got.output.narrow(0, rq.start, rq.len())?;
                let per = |t: &Tensor, r: &std::ops::Range<usize>| {
                    t.narrow(0, r.start, r.len()).unwrap().unsqueeze(0).unwrap()
                };
                let want = sdpa(
                    &per(&q, &rq),
                    &per(&k, &rk),
                    &per(&v, &rk),
                    &o.clone().layout(SdpaLayout::Blhd),
                )?
                .squeeze(0)?;
                let err = max_abs(&part, &want);
                assert!(err < 1e-5, "{backend:?} {c:?} sequence {n}: {err}");
            }
        }
    }
    Ok(())
}

/// The packed results equal the padded batch's unpadded rows (right and left padding).
#[test]
fn packed_equals_padded_batch() -> Result<()> {
    let (h, d, t) = (4, 16, 40);
    let lens = [40usize, 13, 1, 27];
    let b = lens.len();
    let x = randn(&[b, t, h * 3, d], 71); // q, k, v for every position
    for left in [false, true] {
        let mut keep = vec![0u8; b * t];
        for (bi, &n) in lens.iter().enumerate() {
            let r = if left { t - n..t } else { 0..n };
            keep[bi * t + r.start..bi * t + r.end].fill(1);
        }
        let keep = Tensor::from_vec(keep, (b, t), &dev())?;
        let packing = Packing::from_attention_mask(&keep)?;
        assert_eq!(packing.offsets().lengths(), lens);
        let packed = packing.pack(&x)?; // (total, 3H, D)
        let (qp, kp, vp) = (
            packed.narrow(1, 0, h)?,
            packed.narrow(1, h, h)?,
            packed.narrow(1, 2 * h, h)?,
        );
        let cu = packing.offsets();
        // Padded: key padding as an SDPA mask (B, 1, 1, S), 1 = attend.
        let (qb, kb, vb) = (
            x.narrow(2, 0, h)?,
            x.narrow(2, h, h)?,
            x.narrow(2, 2 * h, h)?,
        );
        let mask = SdpaMask::Allowed(keep.reshape((b, 1, 1, t))?);
        let base = SdpaOptions::new().layout(SdpaLayout::Blhd);
        let padded = sdpa(&qb, &kb, &vb, &base.clone().attn_mask(mask))?;
        let var = sdpa_varlen(&qp, &kp, &vp, cu, cu, &SdpaOptions::new())?;
        let err = max_abs(&var, &packing.pack(&padded)?);
        assert!(err < 1e-5, "left={left}: {err}");
        // And back: unpack puts the rows where they were, zeros elsewhere.
        let back = packing.unpack(&var)?;
        assert_eq!(back.dims(), &[b, t, h, d]);
        let keep4 = keep.to_dtype(DType::F32)?.reshape((b, t, 1, 1))?;
        assert!(max_abs(&back, &padded.broadcast_mul(&keep4)?) < 1e-5);
        assert_eq!(max_abs(&packing.keep_mask(DType::U8)?, &keep), 0.0);
    }
    Ok(())
}

/// `MhaInput::packed` equals attending each sequence alone, with causal masks and RoPE
/// positions restarting at every sequence.
#[test]
fn module_packed_entry_equals_one_call_per_sequence() -> Result<()> {
    let dev = dev();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = MhaConfig::new(32, 4)
        .with_batch_first(true)
        .with_num_kv_heads(2)
        .with_bias(false);
    let mha = MultiHeadAttention::new(cfg, vb)?.inference();
    let rope = Rope::from_theta(10_000.0, 8, 256, RopeStyle::HalfSplit, DType::F32, &dev)?;
    let lens = [7usize, 1, 20, 0, 12];
    let offsets = SeqOffsets::from_lengths(&lens);
    let x = randn(&[offsets.total(), 32], 81);
    for causal in [false, true] {
        let mut input = MhaInput::packed(x.clone(), offsets.clone()).rope(rope.clone());
        if causal {
            input = input.causal(CausalAlignment::TopLeft);
        }
        let out = mha.attend(&input)?;
        assert_eq!(out.output.dims(), &[offsets.total(), 32]);
        assert_eq!(out.kernel, "cpu");
        for (n, &len) in lens.iter().enumerate() {
            if len == 0 {
                continue;
            }
            let r = offsets.range(n);
            let xs = x.narrow(0, r.start, len)?.unsqueeze(0)?;
            let mut one = MhaInput::new(xs).rope(rope.clone());
            if causal {
                one = one.causal(CausalAlignment::TopLeft);
            }
            let want = mha.attend(&one)?.output.squeeze(0)?;
            let err = max_abs(&out.output.narrow(0, r.start, len)?, &want);
            assert!(err < 1e-5, "causal={causal} sequence {n}: {err}");
        }
    }
    // The plan built once from a packed input serves the layers (as BERT does).
    let plan = mha.mask_plan(&MhaInput::packed(x.clone(), offsets.clone()))?;
    assert!(plan.is_packed());
    let a = mha
        .attend(&MhaInput::new(x.clone()).mask_plan(plan))?
        .output;
    let b = mha.attend(&MhaInput::packed(x, offsets))?.output;
    assert_eq!(max_abs(&a, &b), 0.0);
    Ok(())
}

#[test]
fn seq_offsets_accept_both_conventions_and_tensors() -> Result<()> {
    let a = SeqOffsets::from_lengths(&[2, 0, 3]);
    for t in [
        Tensor::new(&[0i64, 2, 2, 5], &dev())?,
        Tensor::new(&[0u32, 2, 2, 5], &dev())?,
        Tensor::new(&[0u8, 2, 2, 5], &dev())?,
        Tensor::new(&[0i64, 2, 2, 5], &dev())?.to_dtype(DType::I32)?,
    ] {
        assert_eq!(SeqOffsets::from_cumulative_tensor(&t)?, a);
    }
    assert_eq!(
        SeqOffsets::from_lengths_tensor(&Tensor::new(&[2u32, 0, 3], &dev())?)?,
        a
    );
    assert_eq!(a.positions(), [0, 1, 0, 1, 2]);
    assert_eq!(a.to_tensor(&dev())?.to_vec1::<u32>()?, [0, 2, 2, 5]);
    for bad in [&[][..], &[0][..], &[1, 2][..], &[0, 3, 2][..]] {
        assert!(SeqOffsets::from_cumulative(bad).is_err(), "{bad:?}");
    }
    let neg = Tensor::new(&[0i64, -1], &dev())?;
    assert!(SeqOffsets::from_cumulative_tensor(&neg).is_err());
    // A batch of empty sequences (T = 0): one offset per sequence all the same.
    let none = Packing::from_attention_mask(&Tensor::zeros((3, 0), DType::U8, &dev())?)?;
    assert_eq!(none.offsets().as_slice(), &[0, 0, 0, 0]);
    let x = Tensor::zeros((0, 4), DType::F32, &dev())?;
    assert_eq!(none.unpack(&x)?.dims(), &[3, 0, 4]);
    Ok(())
}

fn err_of(r: Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_get_errors_naming_tensors_and_shapes() -> Result<()> {
    let q = randn(&[2, 4, 5, 8], 91);
    let k = randn(&[2, 2, 7, 8], 92);
    let o = SdpaOptions::new();
    let cases: Vec<(Result<Tensor>, &[&str])> = vec![
        (sdpa(&q.get(0)?.get(0)?, &k, &k, &o), &["q", "[5, 8]"]),
        (
            sdpa(&q, &randn(&[2, 3, 7, 8], 1), &randn(&[2, 3, 7, 8], 1), &o),
            &["KV heads (3)", "query heads (4)"],
        ),
        (
            sdpa(&q, &randn(&[2, 2, 7, 6], 1), &k, &o),
            &["head_dim", "[2, 2, 7, 6]"],
        ),
        (
            sdpa(&q, &k, &randn(&[2, 2, 6, 8], 1), &o),
            &["k [2, 2, 7, 8]", "v [2, 2, 6, 8]"],
        ),
        (
            sdpa(&q, &randn(&[3, 2, 7, 8], 1), &randn(&[3, 2, 7, 8], 1), &o),
            &["batch", "[3, 2, 7, 8]"],
        ),
        (
            sdpa(&q, &k.to_dtype(DType::F16)?, &k, &o),
            &["dtype", "F16"],
        ),
        (
            sdpa(
                &q,
                &k,
                &k,
                &o.clone()
                    .attn_mask(SdpaMask::Allowed(Tensor::ones((5, 6), DType::U8, &dev())?)),
            ),
            &["attn_mask", "[5, 6]", "[2, 4, 5, 7]"],
        ),
        (
            sdpa(
                &q,
                &k,
                &k,
                &o.clone()
                    .attn_mask(SdpaMask::Allowed(Tensor::ones((5, 7), DType::F32, &dev())?)),
            ),
            &["Allowed", "F32"],
        ),
        (
            sdpa(
                &q,
                &k,
                &k,
                &o.clone()
                    .attn_mask(SdpaMask::Additive(Tensor::ones((5, 7), DType::U8, &dev())?)),
            ),
            &["Additive", "U8"],
        ),
        (
            sdpa(&q, &k, &k, &o.clone().sliding_window(3)),
            &["sliding_window(3)", "causal"],
        ),
        (
            sdpa(
                &q,
                &k,
                &k,
                &o.clone().causal(CausalAlignment::TopLeft).sliding_window(0),
            ),
            &["window", "0"],
        ),
        (
            sdpa(&q, &k, &k, &o.clone().dropout(1.5)),
            &["dropout", "1.5"],
        ),
    ];
    for (r, words) in cases {
        let msg = err_of(r);
        for w in words {
            assert!(msg.contains(w), "error {msg:?} should mention {w:?}");
        }
    }
    let q3 = randn(&[10, 4, 8], 93);
    let k3 = randn(&[10, 2, 8], 94);
    let cu = SeqOffsets::from_lengths(&[4, 6]);
    let cu9 = SeqOffsets::from_lengths(&[4, 5]);
    let cu3 = SeqOffsets::from_lengths(&[4, 6, 0]);
    let varlen_cases: Vec<(Result<Tensor>, &[&str])> = vec![
        (
            sdpa_varlen(&q3, &k3, &k3, &cu9, &cu, &o),
            &["cu_seqlens_q", "ends at 9", "[10, 4, 8]"],
        ),
        (
            sdpa_varlen(&q3, &k3, &k3, &cu, &cu9, &o),
            &["cu_seqlens_k", "ends at 9"],
        ),
        (
            sdpa_varlen(&q3, &k3, &k3, &cu, &cu3, &o),
            &["2 sequences", "3"],
        ),
        (
            sdpa_varlen(&q, &k, &k, &cu, &cu, &o),
            &["q", "3-D", "[2, 4, 5, 8]"],
        ),
        (
            sdpa_varlen(
                &q3,
                &k3,
                &k3,
                &cu,
                &cu,
                &o.clone()
                    .attn_mask(SdpaMask::new(Tensor::ones((10, 10), DType::U8, &dev())?)),
            ),
            &["attention mask", "packed"],
        ),
    ];
    for (r, words) in varlen_cases {
        let msg = err_of(r);
        for w in words {
            assert!(msg.contains(w), "error {msg:?} should mention {w:?}");
        }
    }
    // The module's packed entry.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let mha = MultiHeadAttention::new(MhaConfig::new(8, 2), vb)?.inference();
    let x = randn(&[10, 8], 95);
    let msg = mha
        .attend(&MhaInput::packed(x.clone(), cu9.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("(9, features)") && msg.contains("[10, 8]"),
        "{msg}"
    );
    let msg = mha
        .attend(
            &MhaInput::packed(x, cu)
                .key_padding_mask(candle_mha::KeyPaddingMask::from_lengths(&[1])),
        )
        .unwrap_err()
        .to_string();
    assert!(msg.contains("key_padding_mask"), "{msg}");
    Ok(())
}

/// Score modifiers on the reference: gradients of a float64 loss with respect to q and to the
/// sink logits equal central finite differences (soft-cap's tanh and ALiBi in the path, a
/// causal mask with a fully masked row); the fused CPU kernel, forced, gives the same output and
/// gradients (d(sinks) included) in f32, and refuses tracked ALiBi slopes by name; bad modifier
/// inputs are errors naming the tensor and the shapes.
#[test]
fn score_modifiers_differentiate_on_every_kernel() -> Result<()> {
    let dev = Device::Cpu;
    let (b, h, l, s, d) = (1, 2, 4, 5, 3);
    let f64s = |t: Tensor| t.to_dtype(DType::F64).unwrap();
    let q = Var::from_tensor(&f64s(randn(&[b, h, l, d], 1)))?;
    let k = f64s(randn(&[b, h, s, d], 2));
    let v = f64s(randn(&[b, h, s, d], 3));
    let g = f64s(randn(&[b, h, l, d], 4));
    let sinks = Var::from_tensor(&Tensor::new(&[0.3f64, -1.2], &dev)?)?;
    let slopes = Tensor::new(&[0.25f64, 0.0], &dev)?;
    // Top-left causal with L < S leaves no row fully masked; a window of 1 on bottom-right
    // alignment keeps one key per row, so hide query 0's key with an additive mask instead.
    let mut mask = vec![0f64; l * s];
    mask[1] = f64::NEG_INFINITY; // query 0, key 1: its only key under bottom-right + window 1
    let mask = Tensor::from_vec(mask, (l, s), &dev)?;
    let opts = |sinks: &Tensor| {
        SdpaOptions::new()
            .causal(CausalAlignment::BottomRight)
            .sliding_window(1)
            .attn_mask(SdpaMask::Additive(mask.clone()))
            .softcap(0.8)
            .alibi_slopes(slopes.clone())
            .sinks(sinks.clone())
            .backend(Backend::Reference)
    };
    let loss = |q: &Tensor, sinks: &Tensor| -> Result<f64> {
        let out = sdpa_with_kernel(q, &k, &v, &opts(sinks))?.output;
        (out * &g)?.sum_all()?.to_scalar::<f64>()
    };
    let out = sdpa_with_kernel(q.as_tensor(), &k, &v, &opts(sinks.as_tensor()))?;
    assert_eq!(out.kernel, "reference");
    // Query 0 sees no key: only the sink, so its output is 0.
    let row0 = out
        .output
        .narrow(2, 0, 1)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert_eq!(row0, 0.0);
    let grads = (&out.output * &g)?.sum_all()?.backward()?;
    let eps = 1e-6;
    for (var, n) in [(&q, b * h * l * d), (&sinks, h)] {
        let analytic = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()?;
        let analytic = analytic.to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        for i in 0..n {
            let at = |delta: f64| -> Result<f64> {
                let mut x = base.clone();
                x[i] += delta;
                let t = Tensor::from_vec(x, var.as_tensor().dims(), &dev)?;
                if n == h {
                    loss(q.as_tensor(), &t)
                } else {
                    loss(&t, sinks.as_tensor())
                }
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
            assert!(
                (numeric - analytic[i]).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "element {i} of a {n}-element input: analytic {} vs numeric {numeric}",
                analytic[i]
            );
        }
    }
    // The fused CPU kernel (forced) in f32: the same output and gradients, d(sinks) included.
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (q32, s32) = (
        Var::from_tensor(&f32s(q.as_tensor()))?,
        Var::from_tensor(&f32s(sinks.as_tensor()))?,
    );
    let forced = opts(s32.as_tensor())
        .alibi_slopes(f32s(&slopes))
        .backend(Backend::CpuFused);
    let fused = sdpa_with_kernel(q32.as_tensor(), &f32s(&k), &f32s(&v), &forced)?;
    assert_eq!(fused.kernel, "cpu");
    let fg = (fused.output.to_dtype(DType::F64)? * &g)?
        .sum_all()?
        .backward()?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
        let err = (a.to_dtype(DType::F64)? - b)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err <= 2e-6, "fused {what} off by {err}");
        Ok(())
    };
    close(&fused.output, &out.output, "output")?;
    close(
        fg.get(q32.as_tensor()).unwrap(),
        grads.get(q.as_tensor()).unwrap(),
        "dq",
    )?;
    close(
        fg.get(s32.as_tensor()).unwrap(),
        grads.get(sinks.as_tensor()).unwrap(),
        "d(sinks)",
    )?;
    // ALiBi slopes that autograd tracks: the fused kernel has no gradient for them and says so.
    let tracked = Var::from_tensor(&f32s(&slopes))?;
    let e = sdpa_with_kernel(
        &f32s(q.as_tensor()),
        &f32s(&k),
        &f32s(&v),
        &forced.alibi_slopes(tracked.as_tensor().clone()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("ALiBi slopes"), "{e}");
    // Bad inputs: named, with the shapes.
    let (q32, k32) = (f32s(q.as_tensor()), f32s(&k));
    let bad = |o: SdpaOptions| {
        sdpa_with_kernel(&q32, &k32, &k32, &o)
            .unwrap_err()
            .to_string()
    };
    let e = bad(SdpaOptions::new().alibi_slopes(Tensor::zeros(3, DType::F32, &dev)?));
    assert!(
        e.contains("alibi_slopes") && e.contains("[3]") && e.contains("(2,)"),
        "{e}"
    );
    let e = bad(SdpaOptions::new().sinks(Tensor::zeros((1, 2), DType::F32, &dev)?));
    assert!(e.contains("sinks") && e.contains("[1, 2]"), "{e}");
    let e = bad(SdpaOptions::new().softcap(0.0));
    assert!(e.contains("softcap") && e.contains("> 0"), "{e}");
    Ok(())
}
