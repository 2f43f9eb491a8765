//! The fused CPU backward against the reference's candle autograd: random shapes, every mask
//! kind, GQA, strided inputs, packed sequences, appended keys, f32 / f16 / bf16, both product
//! paths (AVX-512 where present, portable); and the gradient parity cases through
//! `Backend::CpuFused` (fused forward and backward, never the reference).

#[cfg(feature = "runner")]
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
#[cfg(feature = "runner")]
use candle_mha::case::{run_case, RunOptions};
use candle_mha::kernels::test_support::{
    cpu_backward_calls, cpu_isa, cpu_isas, cpu_pair_backward_calls, force_cpu_isa,
    fused_forward_backward, set_portable_only,
};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};
use candle_mha::{Backend, MaskedRowPolicy};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.unit() - 0.5) * 3.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn max_rel(got: &Tensor, want: &Tensor) -> f32 {
    let g = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
    g.iter().zip(&w).fold(0f32, |m, (a, b)| {
        assert!(
            a.is_finite() && b.is_finite(),
            "non-finite gradient {a} vs {b}"
        );
        m.max((a - b).abs() / scale)
    })
}

/// A random mask plan, with (half the time) random score modifiers; the sinks, when there are
/// some, as a variable whose gradient the caller checks.
fn random_plan(
    rng: &mut Rng,
    b: usize,
    h: usize,
    l: usize,
    s: usize,
) -> (MaskPlan, String, Option<Var>) {
    let dev = Device::Cpu;
    let dims = MaskDims::new(b, h, l, s);
    let mut plan = MaskPlan::new(dims);
    let mut desc = String::new();
    if b == 1 && rng.below(4) == 0 && l == s {
        // Packed sequences.
        let mut cu = vec![0];
        while *cu.last().unwrap() < l {
            let n = (1 + rng.below(l / 2 + 1)).min(l - cu.last().unwrap());
            cu.push(cu.last().unwrap() + n);
        }
        plan = plan.with_packed_sequences(&cu, &cu).unwrap();
        desc += &format!("packed {cu:?} ");
    }
    if rng.below(2) == 0 {
        let alignment = if rng.below(2) == 0 {
            CausalAlignment::TopLeft
        } else {
            CausalAlignment::BottomRight
        };
        let window = (rng.below(3) == 0).then(|| 1 + rng.below(s + 1));
        plan = plan.with_causal(Causal { alignment, window }).unwrap();
        desc += &format!("causal {alignment:?} {window:?} ");
    }
    match rng.below(4) {
        0 if !plan.is_packed() => {
            let lens: Vec<usize> = (0..b).map(|_| rng.below(s + 1)).collect();
            desc += &format!("lengths {lens:?} ");
            plan = plan
                .with_key_padding(&KeyPaddingMask::from_lengths(&lens), DType::F32, &dev)
                .unwrap();
        }
        1 if !plan.is_packed() => {
            let v: Vec<f32> = (0..b * s)
                .map(|_| match rng.below(4) {
                    0 => f32::NEG_INFINITY,
                    1 => rng.unit() - 0.5,
                    _ => 0.0,
                })
                .collect();
            desc += "float key padding ";
            let t = Tensor::from_vec(v, (b, s), &dev).unwrap();
            plan = plan
                .with_key_padding(&KeyPaddingMask::new(t), DType::F32, &dev)
                .unwrap();
        }
        _ => {}
    }
    if rng.below(3) == 0 {
        let (mb, mh) = (
            if rng.below(2) == 0 { 1 } else { b },
            if rng.below(2) == 0 { 1 } else { h },
        );
        let v: Vec<f32> = (0..mb * mh * l * s)
            .map(|_| {
                if rng.below(6) == 0 {
                    f32::NEG_INFINITY
                } else {
                    rng.unit() * 2.0 - 1.0
                }
            })
            .collect();
        desc += &format!("bias ({mb}, {mh}, {l}, {s}) ");
        let t = Tensor::from_vec(v, (mb, mh, l, s), &dev).unwrap();
        plan = plan
            .with_attn_mask(&AttnMask::Additive(t), DType::F32, &dev)
            .unwrap();
    }
    let mut sinks = None;
    if rng.below(2) == 0 {
        if rng.below(2) == 0 {
            let c = 0.5 + rng.unit() as f64 * 8.0;
            desc += &format!("softcap {c:.2} ");
            plan = plan.with_softcap(c).unwrap();
        }
        if rng.below(2) == 0 {
            // (H,), or one row per batch element / packed sequence; some slopes 0.
            let rows = match plan.packed_offsets() {
                Some((cu, _)) => cu.len() - 1,
                None => b,
            };
            let rows = if rng.below(2) == 0 { 1 } else { rows };
            let v: Vec<f32> = (0..rows * h)
                .map(|_| {
                    if rng.below(4) == 0 {
                        0.0
                    } else {
                        rng.unit() * 0.5
                    }
                })
                .collect();
            desc += &format!("alibi ({rows}, {h}) ");
            let t = Tensor::from_vec(v, (rows, h), &dev).unwrap();
            plan = plan.with_alibi_slopes(&t).unwrap();
        }
        if rng.below(2) == 0 {
            let v: Vec<f32> = (0..h).map(|_| rng.unit() * 4.0 - 2.0).collect();
            desc += "sinks ";
            let var = Var::from_tensor(&Tensor::new(v, &dev).unwrap()).unwrap();
            plan = plan.with_sinks(var.as_tensor()).unwrap();
            sinks = Some(var);
        }
    }
    (plan, desc, sinks)
}

/// The gradients of `sum(out * g)` through `backend`
type Grads = (Tensor, [Tensor; 3], Option<Tensor>, &'static str);

/// `(out, [dq, dk, dv], d(sinks), kernel)` of `sum(out * g)` through `backend`; `sinks` is the
/// plan's sinks variable, if any.
#[allow(clippy::too_many_arguments)]
fn grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (plan, sinks): (&MaskPlan, Option<&Var>),
    scale: f64,
    g: &Tensor,
    backend: Backend,
) -> Result<Grads> {
    let (qv, kv, vv) = (
        Var::from_tensor(q)?,
        Var::from_tensor(k)?,
        Var::from_tensor(v)?,
    );
    let mut p = AttnParams::new(q.dim(3)?);
    p.scale = scale;
    p.backend = backend;
    let out = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), plan, &p)?;
    let gr = (out.output.to_dtype(DType::F32)? * g)?
        .sum_all()?
        .backward()?;
    let get = |x: &Var| gr.get(x).expect("gradient").clone();
    let ds = sinks.map(get);
    Ok((
        out.output,
        [get(&qv), get(&kv), get(&vv)],
        ds,
        out.kernel.as_str(),
    ))
}

fn sweep(seed: u64, cases: usize) {
    let mut rng = Rng(seed);
    for case in 0..cases {
        let hkv = 1 + rng.below(3);
        let h = hkv * (1 + rng.below(3));
        let b = 1 + rng.below(2);
        let l = 1 + rng.below(if case % 4 == 0 { 150 } else { 40 });
        let s = if rng.below(2) == 0 {
            l
        } else {
            // Up to three key tiles of the backward.
            1 + rng.below(700)
        };
        let d = [8, 16, 32, 64][rng.below(4)];
        let dv = if rng.below(4) == 0 { 8 } else { d };
        let extra = if rng.below(5) == 0 {
            1 + rng.below(2)
        } else {
            0
        };
        let dtype = [DType::F32, DType::F32, DType::BF16, DType::F16][rng.below(4)];
        let (plan, desc, sinks) = random_plan(&mut rng, b, h, l, s);
        let ps = (&plan, sinks.as_ref());
        // q as a strided view (every other head of a wider tensor), k/v contiguous; or, a
        // third of the time, q and g head-major (each head's rows contiguous: the backward
        // reads them in place instead of copying them).
        let head_major = rng.below(3) == 0;
        let (q, g) = if head_major {
            let mut t = |w| rng.tensor(&[b, h, l, w]).transpose(1, 2).unwrap();
            (t(d), t(dv))
        } else {
            let q = rng.tensor(&[b, l, 2 * h, d]).narrow(2, 0, h).unwrap();
            (q, rng.tensor(&[b, l, h, dv]))
        };
        let k = rng.tensor(&[b, s + extra, hkv, d]);
        let v = rng.tensor(&[b, s + extra, hkv, dv]);
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (q, k, v) = (c(&q), c(&k), c(&v));
        let scale = 0.3 + rng.unit() as f64 * 0.2;
        let what =
            format!("case {case}: b{b} l{l} s{s}+{extra} h{h}/{hkv} d{d}/{dv} {dtype:?} head-major {head_major} {desc}");
        let before = cpu_backward_calls();
        let (o_f, g_f, ds_f, kernel) = grads(&q, &k, &v, ps, scale, &g, Backend::Auto).unwrap();
        assert_eq!(kernel, "cpu", "{what}");
        assert!(
            cpu_backward_calls() > before,
            "{what}: the fused backward did not run"
        );
        let (o_r, g_r, ds_r, _) = grads(&q, &k, &v, ps, scale, &g, Backend::Reference).unwrap();
        // Half outputs: Δ = dO · O is taken from the output rounded to f16 / bf16 (as PyTorch's
        // CPU flash backward does), while the reference's autograd keeps it in f32; soft-capping
        // flattens the softmax, so more rows carry that rounding into each dK row.
        let tol = match dtype {
            DType::F32 => 2e-5,
            DType::F16 => 6e-3,
            _ => 3e-2,
        };
        let e = max_rel(&o_f, &o_r);
        assert!(e <= tol, "{what}: output {e}");
        for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(g_f.iter().zip(&g_r)) {
            assert_eq!(a.dims(), r.dims(), "{what}: {name} shape");
            assert_eq!(a.dtype(), dtype, "{what}: {name} dtype");
            let e = max_rel(a, r);
            assert!(
                e <= tol,
                "{what}: {name} off by {e} (relative to its largest entry)"
            );
        }
        if let (Some(a), Some(r)) = (ds_f, ds_r) {
            let e = max_rel(&a, &r);
            assert!(e <= tol, "{what}: d(sinks) off by {e}");
        }
    }
}

#[test]
fn fused_backward_equals_reference_backward() {
    sweep(0x5eed_0001, 60);
}

/// Tests that force the instruction set (a process-wide switch) hold this lock.
static ISA_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every instruction set this CPU has, each forced in turn (process-wide switch).
#[test]
fn fused_backward_every_isa() {
    let _guard = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (n, isa) in cpu_isas().iter().enumerate() {
        force_cpu_isa(Some(isa)).unwrap();
        assert_eq!(cpu_isa(), *isa);
        sweep(0x5eed_0002 + n as u64, 25);
    }
    force_cpu_isa(None).unwrap();
    set_portable_only(false);
}

/// bf16 gradients against float64 gradients of the same (bf16) inputs, on every instruction set
/// (AVX512-BF16 computes the products on bf16 pairs, rounding `P` and `dS` to bf16 as PyTorch's
/// CPU flash backward does; the others widen to f32): causal and padded, GQA, head sizes 32 to
/// 128, several key tiles. The bound is 1% of each gradient's largest entry: a few bf16 units
/// of rounding (2⁻⁹ each). We reach 0.07–0.5% here; PyTorch 2.15's own bf16 SDPA backward on
/// inputs of these shapes and distribution is off by 0.35–1.2% (measured against float64), and
/// a lost or doubled term by far more.
#[test]
fn bf16_backward_against_float64() {
    let _guard = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng(0x5eed_bf16);
    let dev = Device::Cpu;
    let configs = [
        // (b, l, s, h, hkv, d, causal, padded)
        (1, 520, 520, 4, 2, 64, true, false),
        (2, 130, 560, 2, 1, 32, false, true),
        (1, 200, 200, 2, 2, 128, true, true),
    ];
    for isa in cpu_isas() {
        force_cpu_isa(Some(isa)).unwrap();
        for (n, &(b, l, s, h, hkv, d, causal, padded)) in configs.iter().enumerate() {
            let mut plan = MaskPlan::new(MaskDims::new(b, h, l, s));
            // Every other config with all three score modifiers (the sinks a variable).
            let sinks = (n % 2 == 1).then(|| {
                let v: Vec<f32> = (0..h).map(|x| x as f32 * 0.7 - 0.5).collect();
                Var::new(v, &dev).unwrap()
            });
            if let Some(sinks) = &sinks {
                let slopes: Vec<f32> = (0..h).map(|x| 0.25 / (x + 1) as f32).collect();
                plan = plan
                    .with_softcap(5.0)
                    .unwrap()
                    .with_alibi_slopes(&Tensor::new(slopes, &dev).unwrap())
                    .unwrap()
                    .with_sinks(sinks.as_tensor())
                    .unwrap();
            }
            if causal {
                plan = plan.with_causal(CausalAlignment::BottomRight).unwrap();
            }
            if padded {
                let lens: Vec<usize> = (0..b).map(|i| s - 37 * i - 5).collect();
                plan = plan
                    .with_key_padding(&KeyPaddingMask::from_lengths(&lens), DType::F32, &dev)
                    .unwrap();
            }
            let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
            let (q, k, v) = (
                bf(rng.tensor(&[b, l, h, d])),
                bf(rng.tensor(&[b, s, hkv, d])),
                bf(rng.tensor(&[b, s, hkv, d])),
            );
            // A gradient that bf16 holds exactly.
            let g = bf(rng.tensor(&[b, l, h, d])).to_dtype(DType::F32).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let mods = sinks.is_some();
            let what = format!(
                "{isa}: b{b} l{l} s{s} h{h}/{hkv} d{d} causal {causal} padded {padded} modifiers {mods}"
            );
            let ps = (&plan, sinks.as_ref());
            let pairs_before = cpu_pair_backward_calls();
            let (_, got, ds_got, kernel) = grads(&q, &k, &v, ps, scale, &g, Backend::Auto).unwrap();
            assert_eq!(kernel, "cpu", "{what}");
            if isa == "avx512bf16" {
                assert!(
                    cpu_pair_backward_calls() > pairs_before,
                    "{what}: the pair products did not run"
                );
            }
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (_, want, ds_want, _) = grads(
                &f64s(&q),
                &f64s(&k),
                &f64s(&v),
                ps,
                scale,
                &g,
                Backend::Reference,
            )
            .unwrap();
            for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(a.dtype(), DType::BF16, "{what}: {name}");
                let e = max_rel(a, r);
                println!("{what}: {name} {e:.2e}");
                assert!(e <= 1e-2, "{what}: {name} off by {e} of its largest entry");
            }
            if let (Some(a), Some(r)) = (ds_got, ds_want) {
                let e = max_rel(&a, &r);
                println!("{what}: d(sinks) {e:.2e}");
                assert!(
                    e <= 1e-2,
                    "{what}: d(sinks) off by {e} of its largest entry"
                );
            }
        }
    }
    force_cpu_isa(None).unwrap();
}

#[test]
fn nan_policy_takes_the_reference_for_gradients() -> Result<()> {
    let mut rng = Rng(7);
    let q = Var::from_tensor(&rng.tensor(&[1, 4, 2, 8]))?;
    let kv = rng.tensor(&[1, 4, 2, 8]);
    let plan = MaskPlan::new(MaskDims::new(1, 2, 4, 4));
    let mut p = AttnParams::new(8);
    p.masked_rows = MaskedRowPolicy::Nan;
    assert_eq!(
        attention(q.as_tensor(), &kv, &kv, &plan, &p)?.kernel,
        "reference"
    );
    p.backend = Backend::CpuFused;
    let err = attention(q.as_tensor(), &kv, &kv, &plan, &p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("MaskedRowPolicy::Zero"), "{err}");
    Ok(())
}

/// The benchmark's kernels-only step (the fused forward and backward called directly, given
/// the output gradient) computes what candle's autograd gets from the same kernels: the same
/// output, `dK` and `dV` bit for bit and `dQ` within rounding, in f32 and bf16 (the loss
/// `sum(out · g)` hands the op exactly `g`, and candle adds each gradient to zeros); a wrong
/// `grad` shape is an error.
#[test]
fn kernels_alone_equal_the_autograd_step() -> Result<()> {
    let mut rng = Rng(11);
    for dtype in [DType::F32, DType::BF16] {
        let mk = |rng: &mut Rng, dims: &[usize]| rng.tensor(dims).to_dtype(dtype);
        let (q, k, v) = (
            Var::from_tensor(&mk(&mut rng, &[2, 37, 4, 16])?)?,
            Var::from_tensor(&mk(&mut rng, &[2, 37, 2, 16])?)?,
            Var::from_tensor(&mk(&mut rng, &[2, 37, 2, 16])?)?,
        );
        let g = mk(&mut rng, &[2, 37, 4, 16])?;
        let plan =
            MaskPlan::new(MaskDims::new(2, 4, 37, 37)).with_causal(CausalAlignment::TopLeft)?;
        let mut p = AttnParams::new(16);
        p.backend = Backend::CpuFused;
        let out = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &plan, &p)?.output;
        let grads = (&out * &g)?.sum_all()?.backward()?;
        let bare =
            fused_forward_backward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &plan, &p, &g)?;
        let want = [
            out,
            grads.get(q.as_tensor()).expect("dq").clone(),
            grads.get(k.as_tensor()).expect("dk").clone(),
            grads.get(v.as_tensor()).expect("dv").clone(),
        ];
        for (i, (got, want)) in bare.iter().zip(&want).enumerate() {
            let want = want.to_dtype(DType::F32)?;
            let diff = (got.to_dtype(DType::F32)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            // dQ may be summed from per-thread parts (when the heads do not share out evenly
            // over the threads), in an order that depends on the scheduling: within rounding.
            let bound = if i == 1 {
                let top = want.abs()?.max_all()?.to_scalar::<f32>()?;
                top * if dtype == DType::F32 {
                    1e-6
                } else {
                    1.0 / 128.0
                }
            } else {
                0.0
            };
            assert!(diff <= bound, "{dtype:?}: tensor {i} differs by {diff}");
        }
        let bad = g.narrow(1, 0, 36)?;
        let err =
            fused_forward_backward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &plan, &p, &bad)
                .unwrap_err()
                .to_string();
        assert!(err.contains("grad must be") && err.contains("36"), "{err}");
    }
    Ok(())
}

/// Every gradient parity case through `Backend::CpuFused`: fused forward and fused backward
/// (the runner labels each check `fwd=… bwd=…`), gradients equal to PyTorch's.
#[test]
#[cfg(feature = "runner")] // the case runner
fn gradient_cases_pass_through_the_fused_backward() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("grad_")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the gradient cases, found {}",
        files.len()
    );
    let opts = RunOptions::new(Device::Cpu)
        .with_grad(true)
        .with_backend(Backend::CpuFused);
    let mut failed = vec![];
    for f in &files {
        let r = run_case(f, &opts);
        println!("{r}");
        let grads: Vec<_> = r
            .checks
            .iter()
            .filter(|c| c.label.starts_with("grad"))
            .collect();
        if !r.passed()
            || grads.is_empty()
            || grads.iter().any(|c| !c.label.contains("fwd=cpu bwd=cpu"))
        {
            failed.push(format!(
                "{r}\n{:?}",
                grads.iter().map(|c| &c.label).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
