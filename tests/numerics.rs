//! The numerics policy (README, "Numerics policy"), on every kernel and through `sdpa`: NaN and
//! ±inf in inputs and masks, huge logits, denormals, `-1e9` masks against `-inf` masks, and the
//! fully-masked-row policies.

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{CausalAlignment, MaskDims, MaskPlan};
use candle_mha::{sdpa, AttnMask, Backend, MaskedRowPolicy, SdpaLayout, SdpaMask, SdpaOptions};

const B: usize = 1;
const H: usize = 2;
const L: usize = 5;
const S: usize = 5;
const D: usize = 8;

const BACKENDS: [Backend; 2] = [Backend::Reference, Backend::CpuFused];
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn dev() -> Device {
    Device::Cpu
}

/// Deterministic inputs in `(B, T, H, D)`.
fn input(t: usize, seed: u64, dtype: DType) -> Result<Tensor> {
    let n = B * t * H * D;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed) >> 40;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (B, t, H, D), &dev())?.to_dtype(dtype)
}

/// Sets element `[0, row, head, col]` of a `(B, T, H, D)` tensor.
fn set(t: &Tensor, row: usize, head: usize, col: usize, x: f32) -> Result<Tensor> {
    let dtype = t.dtype();
    let mut v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (tt, h, d) = (t.dim(1)?, t.dim(2)?, t.dim(3)?);
    assert!(row < tt);
    v[(row * h + head) * d + col] = x;
    Tensor::from_vec(v, t.dims(), &dev())?.to_dtype(dtype)
}

fn params(backend: Backend, policy: MaskedRowPolicy) -> AttnParams {
    let mut p = AttnParams::new(D);
    p.backend = backend;
    p.masked_rows = policy;
    p
}

/// The output `(B, L, H, Dv)` as f32 rows: `rows[i][h]` is query row `i`, head `h`.
fn rows(t: &Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
    let t = t.to_dtype(DType::F32)?.squeeze(0)?;
    t.to_vec3::<f32>()
}

/// Per query row (head 0): `'N'` a NaN anywhere in the row, `'I'` an infinity, `'.'` finite.
fn pattern(t: &Tensor, head: usize) -> Result<String> {
    Ok(rows(t)?
        .iter()
        .map(|r| {
            let r = &r[head];
            if r.iter().any(|x| x.is_nan()) {
                'N'
            } else if r.iter().any(|x| x.is_infinite()) {
                'I'
            } else {
                '.'
            }
        })
        .collect())
}

fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &MaskPlan,
    backend: Backend,
    policy: MaskedRowPolicy,
) -> Result<Tensor> {
    let out = attention(q, k, v, plan, &params(backend, policy))?;
    let want = match backend {
        Backend::Reference => "reference",
        _ => "cpu",
    };
    assert_eq!(out.kernel, want);
    Ok(out.output)
}

/// `sdpa` in `(B, L, H, D)` layout on `backend`.
fn run_sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: SdpaOptions,
    backend: Backend,
) -> Result<Tensor> {
    sdpa(q, k, v, &opts.layout(SdpaLayout::Blhd).backend(backend))
}

fn plain() -> MaskPlan {
    MaskPlan::new(MaskDims::new(B, H, L, S))
}

fn causal() -> MaskPlan {
    plain().with_causal(CausalAlignment::TopLeft).unwrap()
}

/// An additive `(L, S)` mask hiding key `j` from every query, with `value` (`-inf`, `-1e9`).
fn hide_key(j: usize, value: f32) -> Result<Tensor> {
    let mut m = vec![0f32; L * S];
    for i in 0..L {
        m[i * S + j] = value;
    }
    Tensor::from_vec(m, (L, S), &dev())
}

fn with_mask(m: &Tensor, dtype: DType) -> Result<MaskPlan> {
    plain().with_attn_mask(
        &AttnMask::Additive(m.clone()),
        candle_mha::kernels::compute_dtype(dtype),
        &dev(),
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// A NaN in query row 1 makes output row 1 NaN (every head that reads it: head 0 here) and
/// nothing else, on the reference and through sdpa (PyTorch's math backend; its CPU flash
/// kernel returns a finite row there).
#[test]
fn nan_in_a_query_row_poisons_that_row_only() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        let q = set(&q, 1, 0, 0, f32::NAN)?;
        for plan in [plain(), causal()] {
            let out = run(&q, &k, &v, &plan, Backend::Reference, MaskedRowPolicy::Zero)?;
            assert_eq!(pattern(&out, 0)?, ".N...", "{dtype:?}");
            assert_eq!(pattern(&out, 1)?, ".....", "{dtype:?}");
        }
        let out = run_sdpa(&q, &k, &v, SdpaOptions::new(), Backend::Reference)?;
        assert_eq!(pattern(&out, 0)?, ".N...", "sdpa {dtype:?}");
        // The fused kernel: the other rows and heads are untouched (the NaN row itself: the
        // next test).
        let out = run(
            &q,
            &k,
            &v,
            &plain(),
            Backend::CpuFused,
            MaskedRowPolicy::Zero,
        )?;
        assert_eq!(pattern(&out, 1)?, ".....", "{dtype:?}");
        let (o, r) = (
            rows(&out)?,
            rows(&run(
                &q,
                &k,
                &v,
                &plain(),
                Backend::Reference,
                MaskedRowPolicy::Zero,
            )?)?,
        );
        for i in [0, 2, 3, 4] {
            assert_eq!(
                o[i][0].iter().map(|x| x.is_finite()).collect::<Vec<_>>(),
                vec![true; D]
            );
            assert!(o[i][0]
                .iter()
                .zip(&r[i][0])
                .all(|(a, b)| (a - b).abs() < 2e-2));
        }
    }
    Ok(())
}

/// The fused CPU kernel propagates a NaN query row too: its online softmax's running max lets
/// NaN win and stick, so the row is NaN rather than looking fully masked.
#[test]
fn fused_kernel_propagates_a_nan_query_row() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        let q = set(&q, 1, 0, 0, f32::NAN)?;
        let out = run(
            &q,
            &k,
            &v,
            &plain(),
            Backend::CpuFused,
            MaskedRowPolicy::Zero,
        )?;
        assert_eq!(pattern(&out, 0)?, ".N...", "{dtype:?}");
    }
    Ok(())
}

/// A NaN in key (or value) row 2 makes every query row that can see key 2 NaN, on every kernel,
/// and never leaks into another head. Rows that *cannot* see it: kernel-dependent, deliberately
/// unspecified (README): the reference, like PyTorch's math backend, poisons them too (masks are
/// added to the NaN logit, and `0 · NaN` is NaN in `P·V`); the fused kernel, like PyTorch's CPU
/// flash kernel, never reads keys outside a row's structural range (causal, window, key
/// padding ranges), so those rows stay finite, except that a NaN *value* inside a key tile the
/// row reads (causal: the diagonal tile) poisons it through `0 · NaN`.
#[test]
fn nan_in_a_key_or_value_row_poisons_the_rows_that_see_it() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        for (which, kk, vv) in [
            ("k", set(&k, 2, 0, 0, f32::NAN)?, v.clone()),
            ("v", k.clone(), set(&v, 2, 0, 0, f32::NAN)?),
        ] {
            let tag = |b: Backend| format!("NaN {which}: {b:?} {dtype:?}");
            for backend in BACKENDS {
                let out = run(&q, &kk, &vv, &plain(), backend, MaskedRowPolicy::Zero)?;
                assert_eq!(pattern(&out, 0)?, "NNNNN", "{}", tag(backend));
                assert_eq!(pattern(&out, 1)?, ".....", "{}", tag(backend));
                // Causal: rows 2.. see key 2, whatever the kernel.
                let out = run(&q, &kk, &vv, &causal(), backend, MaskedRowPolicy::Zero)?;
                assert!(pattern(&out, 0)?.ends_with("NNN"), "{}", tag(backend));
                assert_eq!(pattern(&out, 1)?, ".....", "{}", tag(backend));
                let out = run_sdpa(&q, &kk, &vv, SdpaOptions::new().is_causal(true), backend)?;
                assert!(pattern(&out, 0)?.ends_with("NNN"), "sdpa {}", tag(backend));
            }
            // What each kernel does with the rows that cannot see it (documented, pinned).
            let fused = |plan: &MaskPlan| -> Result<String> {
                pattern(
                    &run(&q, &kk, &vv, plan, Backend::CpuFused, MaskedRowPolicy::Zero)?,
                    0,
                )
            };
            let reference = |plan: &MaskPlan| -> Result<String> {
                pattern(
                    &run(
                        &q,
                        &kk,
                        &vv,
                        plan,
                        Backend::Reference,
                        MaskedRowPolicy::Zero,
                    )?,
                    0,
                )
            };
            let ranges = plain().with_key_ranges(&[(0, 2)])?;
            assert_eq!(
                reference(&causal())?,
                "NNNNN",
                "{}",
                tag(Backend::Reference)
            );
            assert_eq!(reference(&ranges)?, "NNNNN", "{}", tag(Backend::Reference));
            assert_eq!(fused(&ranges)?, ".....", "{}", tag(Backend::CpuFused));
            let want = if which == "k" { "..NNN" } else { "NNNNN" };
            assert_eq!(fused(&causal())?, want, "{}", tag(Backend::CpuFused));
        }
    }
    Ok(())
}

/// A NaN key hidden by an *additive* (`-inf`) or boolean attention mask: NaN + (-inf) is NaN, so
/// every row is NaN, as in PyTorch (both backends). The fused kernel matches (it adds the mask
/// like the reference). To mask a corrupt key, use key padding (lengths, ranges): structure.
#[test]
fn nan_key_behind_a_dense_mask_poisons_like_pytorch() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        let kk = set(&k, 2, 0, 0, f32::NAN)?;
        let plan = with_mask(&hide_key(2, f32::NEG_INFINITY)?, dtype)?;
        for backend in BACKENDS {
            let out = run(&q, &kk, &v, &plan, backend, MaskedRowPolicy::Zero)?;
            assert_eq!(pattern(&out, 0)?, "NNNNN", "{backend:?} {dtype:?}");
        }
    }
    Ok(())
}

/// +inf anywhere in a row's logits (an infinite key, or a `+inf` additive mask entry) gives
/// `inf - inf = NaN` in the max-subtracted softmax: that row is NaN, as in PyTorch. An infinite
/// value element gives ±inf (or NaN) in that output column for the rows that weight it.
#[test]
fn infinities_in_keys_values_and_masks() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        // A +inf mask entry at (1, 2).
        let mut m = vec![0f32; L * S];
        m[S + 2] = f32::INFINITY;
        let plan = with_mask(&Tensor::from_vec(m, (L, S), &dev())?, dtype)?;
        for backend in BACKENDS {
            let out = run(&q, &k, &v, &plan, backend, MaskedRowPolicy::Zero)?;
            assert_eq!(
                pattern(&out, 0)?,
                ".N...",
                "+inf mask {backend:?} {dtype:?}"
            );
            let vv = set(&v, 2, 0, 0, f32::INFINITY)?;
            let out = run(&q, &k, &vv, &plain(), backend, MaskedRowPolicy::Zero)?;
            assert_eq!(
                pattern(&out, 0)?,
                "IIIII",
                "+inf value {backend:?} {dtype:?}"
            );
            for r in rows(&out)? {
                assert_eq!(r[0][0], f32::INFINITY);
                assert!(r[0][1..].iter().all(|x| x.is_finite()));
            }
        }
    }
    Ok(())
}

/// Huge finite logits (q scaled by 1e30 in f32, a `1e30` scale) do not overflow: the softmax
/// subtracts the row max first, so the output is the value row of the arg-max key, finite.
#[test]
fn huge_logits_do_not_overflow() -> Result<()> {
    let (q, k, v) = (
        input(L, 1, DType::F32)?,
        input(S, 2, DType::F32)?,
        input(S, 3, DType::F32)?,
    );
    for backend in BACKENDS {
        let mut p = params(backend, MaskedRowPolicy::Zero);
        p.scale = 1e30;
        let out = attention(&q, &k, &v, &plain(), &p)?.output;
        assert_eq!(pattern(&out, 0)?, ".....", "{backend:?}");
        assert_eq!(pattern(&out, 1)?, ".....", "{backend:?}");
        let big = (&q * 1e30)?;
        let out2 = run(&big, &k, &v, &plain(), backend, MaskedRowPolicy::Zero)?;
        assert_eq!(pattern(&out2, 0)?, ".....", "{backend:?}");
        // Each row is (numerically) one value row: the arg-max key's.
        let vr = rows(&v)?;
        for r in rows(&out)? {
            let hit = vr
                .iter()
                .any(|kv| kv[0].iter().zip(&r[0]).all(|(a, b)| (a - b).abs() <= 1e-6));
            assert!(hit, "{backend:?}: row {:?} is not a value row", r[0]);
        }
    }
    Ok(())
}

/// Denormal inputs give the same result as the f64 computation (no flush to zero in the
/// kernels' f32 arithmetic), to f32 accuracy.
#[test]
fn denormal_inputs() -> Result<()> {
    let tiny = |seed| -> Result<Tensor> { input(S, seed, DType::F32)? * 1e-39 };
    let (q, k, v) = (tiny(1)?, tiny(2)?, tiny(3)?);
    let want = run(
        &q.to_dtype(DType::F64)?,
        &k.to_dtype(DType::F64)?,
        &v.to_dtype(DType::F64)?,
        &plain(),
        Backend::Reference,
        MaskedRowPolicy::Zero,
    )?;
    for backend in BACKENDS {
        let out = run(&q, &k, &v, &plain(), backend, MaskedRowPolicy::Zero)?;
        let err = max_abs_diff(&out, &want)?;
        assert!(err <= 1e-44, "{backend:?}: {err:e}");
        // Not flushed: the output is as small as the inputs, and not all zero.
        let m = out.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(m > 0.0 && m < 1.2e-38, "{backend:?}: max {m:e}");
    }
    Ok(())
}

/// A `-1e9` additive mask and a `-inf` one give the same output where a row has a visible key;
/// a row that is `-1e9` everywhere is not masked: it gets the uniform softmax (the mean of the
/// values), as PyTorch, whatever the fully-masked-row policy. A row that is `-inf` everywhere is
/// fully masked: zeros under `Zero`, NaN under `Nan`.
#[test]
fn large_negative_masks_and_fully_masked_rows() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        for backend in BACKENDS {
            let a = run(
                &q,
                &k,
                &v,
                &with_mask(&hide_key(2, -1e9)?, dtype)?,
                backend,
                MaskedRowPolicy::Zero,
            )?;
            let b = run(
                &q,
                &k,
                &v,
                &with_mask(&hide_key(2, f32::NEG_INFINITY)?, dtype)?,
                backend,
                MaskedRowPolicy::Zero,
            )?;
            assert_eq!(max_abs_diff(&a, &b)?, 0.0, "{backend:?} {dtype:?}");

            // Row 1 fully masked, with -1e9 (uniform) and -inf (policy).
            for (value, policy, want) in [
                (-1e9f32, MaskedRowPolicy::Zero, "uniform"),
                (-1e9, MaskedRowPolicy::Nan, "uniform"),
                (f32::NEG_INFINITY, MaskedRowPolicy::Zero, "zero"),
                (f32::NEG_INFINITY, MaskedRowPolicy::Nan, "nan"),
            ] {
                let mut m = vec![0f32; L * S];
                m[S..2 * S].fill(value);
                let plan = with_mask(&Tensor::from_vec(m, (L, S), &dev())?, dtype)?;
                let out = rows(&run(&q, &k, &v, &plan, backend, policy)?)?;
                let row = &out[1];
                let tag = format!("{backend:?} {dtype:?} {value} {policy:?}");
                match want {
                    "uniform" => {
                        let mean = v
                            .to_dtype(DType::F32)?
                            .mean(1)?
                            .squeeze(0)?
                            .to_vec2::<f32>()?;
                        for h in 0..H {
                            for (x, y) in row[h].iter().zip(&mean[h]) {
                                assert!((x - y).abs() < 2e-2, "{tag}: {x} vs mean {y}");
                            }
                        }
                    }
                    "zero" => assert!(row.iter().flatten().all(|&x| x == 0.0), "{tag}"),
                    _ => assert!(row.iter().flatten().all(|x| x.is_nan()), "{tag}"),
                }
                // The other rows never change with the policy.
                assert!(out[0].iter().flatten().all(|x| x.is_finite()), "{tag}");
            }
        }
    }
    Ok(())
}

/// The fully-masked-row policies through sdpa (a boolean mask row of all "may not attend") and
/// through structure (key lengths 0), on every kernel.
#[test]
fn fully_masked_rows_through_sdpa_and_structure() -> Result<()> {
    for dtype in DTYPES {
        let (q, k, v) = (
            input(L, 1, dtype)?,
            input(S, 2, dtype)?,
            input(S, 3, dtype)?,
        );
        let mut allowed = vec![1u8; L * S];
        allowed[S..2 * S].fill(0);
        let allowed = Tensor::from_vec(allowed, (L, S), &dev())?;
        for backend in BACKENDS {
            for (policy, want) in [
                (MaskedRowPolicy::Zero, ".Z..."),
                (MaskedRowPolicy::Nan, ".N..."),
            ] {
                let opts = SdpaOptions::new()
                    .attn_mask(SdpaMask::Allowed(allowed.clone()))
                    .masked_rows(policy);
                let out = run_sdpa(&q, &k, &v, opts, backend)?;
                let got: String = rows(&out)?
                    .iter()
                    .map(|r| {
                        if r[0].iter().all(|x| x.is_nan()) {
                            'N'
                        } else if r[0].iter().all(|&x| x == 0.0) {
                            'Z'
                        } else {
                            '.'
                        }
                    })
                    .collect();
                assert_eq!(got, want, "sdpa {backend:?} {dtype:?} {policy:?}");
                let plan = plain().with_key_ranges(&[(0, 0)])?;
                let out = run(&q, &k, &v, &plan, backend, policy)?;
                let all = rows(&out)?
                    .into_iter()
                    .flatten()
                    .flatten()
                    .collect::<Vec<_>>();
                match policy {
                    MaskedRowPolicy::Zero => assert!(all.iter().all(|&x| x == 0.0)),
                    MaskedRowPolicy::Nan => assert!(all.iter().all(|x| x.is_nan())),
                    other => panic!("no expectation for {other:?}"),
                }
            }
        }
    }
    Ok(())
}
