//! A test per guard: every safe product function in [`super::products`] checks the shapes its
//! unsafe micro-kernel relies on (and that the instruction set it needs runs here) with an
//! `assert!`, so that no arguments reach out-of-bounds accesses. Each guard is exercised on
//! every instruction set this CPU has: the well-formed call runs, and each call that breaks one
//! condition panics instead of running the kernel. (The matrices' own constructors are checked
//! against their slices in `mat.rs`; a matrix that does not fit panics there, tested last.)

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use super::mat::{ByteMat, HalfMat, Mat, MatMut};
use super::products::{self, Isa};

/// Rows, head size (a multiple of 32, as the pair and int16 products need), keys.
const NR: usize = 3;
const D: usize = 32;
const BK: usize = 5;

thread_local! {
    /// The file of this thread's last panic.
    static PANIC_FILE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The file where `f` panicked, if it did. (The hook records the location of each panic for
/// its thread, then runs the previous hook.)
fn panic_file(f: impl FnOnce()) -> Option<String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file().to_string());
            PANIC_FILE.with(|p| *p.borrow_mut() = file);
            previous(info)
        }));
    });
    PANIC_FILE.with(|p| p.borrow_mut().take());
    catch_unwind(AssertUnwindSafe(f)).err()?;
    Some(
        PANIC_FILE
            .with(|p| p.borrow_mut().take())
            .unwrap_or_default(),
    )
}

/// `valid` runs where `applies` (else it must panic too: the product refuses that instruction
/// set), and every case of `bad` panics in the guard of `products.rs` itself (not in a
/// micro-kernel's `debug_assert!`, which release builds leave out).
fn check(isa: Isa, name: &str, applies: bool, valid: impl FnOnce(), bad: Bad) {
    let file = panic_file(valid);
    assert!(
        if applies {
            file.is_none()
        } else {
            file.as_deref().is_some_and(|f| f.ends_with("products.rs"))
        },
        "{isa:?} {name}: the well-formed call (applies: {applies}) panicked in {file:?}"
    );
    for (what, f) in bad {
        let file = panic_file(f);
        assert!(
            file.as_deref().is_some_and(|f| f.ends_with("products.rs")),
            "{isa:?} {name}: {what} did not panic in products.rs ({file:?})"
        );
    }
}

/// Calls that break one condition each, with what they break.
type Bad = Vec<(&'static str, Box<dyn FnOnce()>)>;

fn f32s(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect()
}

fn halves(n: usize) -> Vec<half::bf16> {
    f32s(n).into_iter().map(half::bf16::from_f32).collect()
}

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 37 % 256) as u8).collect()
}

/// `out`-like buffers: `rows × cols` with row stride `stride`.
fn out(rows: usize, stride: usize) -> Vec<f32> {
    vec![0.0; rows * stride]
}

#[test]
fn f32_products_refuse_mismatched_shapes() {
    for isa in products::available() {
        // qk_t: a (NR × D) · kt (D × BK); AVX-512 stores whole vectors, so `out` rows hold 16.
        let (a, kt) = (f32s(NR * D), f32s((D + 1) * BK));
        let qk_t = |kt_rows: usize, o_rows: usize, o_cols: usize, o_stride: usize| {
            let (a, kt) = (a.clone(), kt.clone());
            move || {
                let mut o = out(o_rows.max(NR + 1), o_stride);
                let om = MatMut::new(&mut o, o_rows, o_cols, o_stride);
                products::qk_t(
                    isa,
                    Mat::new(&a, NR, D, D),
                    Mat::new(&kt, kt_rows, BK, BK),
                    om,
                    1.0,
                )
            }
        };
        let mut bad: Bad = vec![
            ("kt with D + 1 rows", Box::new(qk_t(D + 1, NR, BK, 16))),
            ("out with a row too many", Box::new(qk_t(D, NR + 1, BK, 16))),
            (
                "out with a column too many",
                Box::new(qk_t(D, NR, BK + 1, 16)),
            ),
        ];
        if isa.avx512() {
            bad.push((
                "out rows without the padded columns",
                Box::new(qk_t(D, NR, BK, BK)),
            ));
        }
        check(isa, "qk_t", true, qk_t(D, NR, BK, 16), bad);

        // qk_t_grad: as qk_t, with p (NR × BK) at out's row stride and NR row offsets.
        let pp = f32s((NR + 1) * 16);
        let grad = |p_rows: usize, p_stride: usize, deltas: usize, o_stride: usize| {
            let (a, kt, pp) = (a.clone(), kt.clone(), pp.clone());
            move || {
                let mut o = out(NR + 1, o_stride);
                let om = MatMut::new(&mut o, NR, BK, o_stride);
                let pm = Mat::new(&pp, p_rows, BK, p_stride);
                let (ga, vt) = (Mat::new(&a, NR, D, D), Mat::new(&kt, D, BK, BK));
                let delta = vec![0.5; deltas];
                products::qk_t_grad(isa, (ga, vt), (pm, &delta), om, 1.0)
            }
        };
        let mut bad: Bad = vec![
            ("p with a row too few", Box::new(grad(NR - 1, 16, NR, 16))),
            ("p at another row stride", Box::new(grad(NR, 8, NR, 16))),
            (
                "delta with a row too few",
                Box::new(grad(NR, 16, NR - 1, 16)),
            ),
        ];
        if isa.avx512() {
            bad.push((
                "p and out rows without the padded columns",
                Box::new(grad(NR, BK, NR, BK)),
            ));
        }
        check(isa, "qk_t_grad", true, grad(NR, 16, NR, 16), bad);

        // qk_t_exp: as qk_t, with NR row statistics.
        let exp = |lse_rows: usize, o_stride: usize| {
            let (a, kt) = (a.clone(), kt.clone());
            move || {
                let mut o = out(NR + 1, o_stride);
                let om = MatMut::new(&mut o, NR, BK, o_stride);
                let (qa, kt) = (Mat::new(&a, NR, D, D), Mat::new(&kt, D, BK, BK));
                products::qk_t_exp(isa, (qa, kt), &vec![0.5; lse_rows], om, 1.0)
            }
        };
        let mut bad: Bad = vec![("lse with a row too few", Box::new(exp(NR - 1, 16)))];
        if isa.avx512() {
            bad.push(("out rows without the padded columns", Box::new(exp(NR, BK))));
        }
        check(isa, "qk_t_exp", true, exp(NR, 16), bad);

        // qk_rows: q (NR × D) · kᵀ, k (BK × D).
        let (q, k) = (f32s(NR * D), f32s(BK * D));
        let qk_rows = |k_cols: usize, o_rows: usize, o_cols: usize| {
            let (q, k) = (q.clone(), k.clone());
            move || {
                let mut o = out(o_rows, o_cols);
                let om = MatMut::new(&mut o, o_rows, o_cols, o_cols);
                products::qk_rows(
                    isa,
                    Mat::new(&q, NR, D, D),
                    Mat::new(&k, BK, k_cols, D),
                    om,
                    1.0,
                )
            }
        };
        let bad: Bad = vec![
            ("k with D - 1 columns", Box::new(qk_rows(D - 1, NR, BK))),
            ("out with a row too many", Box::new(qk_rows(D, NR + 1, BK))),
            ("out with a key too many", Box::new(qk_rows(D, NR, BK + 1))),
        ];
        check(isa, "qk_rows", true, qk_rows(D, NR, BK), bad);

        // pv: acc (NR × D) += p (NR × BK) · v (BK × D); pv_t: p stored BK × NR.
        let (p, v) = (f32s((NR + 1) * (BK + 1)), f32s((BK + 1) * D));
        for transposed in [false, true] {
            let pv = |p_inner: usize, acc_rows: usize, acc_cols: usize| {
                let (p, v) = (p.clone(), v.clone());
                move || {
                    let mut acc = out(acc_rows, acc_cols);
                    let am = MatMut::new(&mut acc, acc_rows, acc_cols, acc_cols);
                    let vm = Mat::new(&v, BK, D, D);
                    if transposed {
                        products::pv_t(isa, Mat::new(&p, p_inner, NR, NR), vm, am)
                    } else {
                        products::pv(isa, Mat::new(&p, NR, p_inner, p_inner), vm, am)
                    }
                }
            };
            let bad: Bad = vec![
                ("p with a key too many", Box::new(pv(BK + 1, NR, D))),
                ("acc with a row too many", Box::new(pv(BK, NR + 1, D))),
                ("acc with a column too many", Box::new(pv(BK, NR, D + 1))),
            ];
            check(
                isa,
                if transposed { "pv_t" } else { "pv" },
                true,
                pv(BK, NR, D),
                bad,
            );
        }
    }
}

#[test]
fn in_place_products_refuse_mismatched_shapes_and_instruction_sets() {
    for isa in products::available() {
        let applies = products::reads_half(isa, D);
        let (q, kh, kb) = (f32s(NR * D), halves(BK * D), bytes(BK * D));
        // qk_rows_half and qk_rows_bytes: q (NR × D) · kᵀ, k (BK × k_cols) in place.
        for quantized in [false, true] {
            let call = |k_cols: usize, o_rows: usize, o_cols: usize| {
                let (q, kh, kb) = (q.clone(), kh.clone(), kb.clone());
                move || {
                    let mut o = out(o_rows, o_cols);
                    let om = MatMut::new(&mut o, o_rows, o_cols, o_cols);
                    let qm = Mat::new(&q, NR, D, D);
                    if quantized {
                        products::qk_rows_bytes(
                            isa,
                            qm,
                            ByteMat::new(&kb, false, BK, k_cols, D),
                            om,
                            1.0,
                        )
                    } else {
                        products::qk_rows_half(isa, qm, HalfMat::bf16(&kh, BK, k_cols, D), om, 1.0)
                    }
                }
            };
            let bad: Bad = vec![
                ("k with D - 16 columns", Box::new(call(D - 16, NR, BK))),
                ("out with a row too many", Box::new(call(D, NR + 1, BK))),
                ("out with a key too many", Box::new(call(D, NR, BK + 1))),
            ];
            let name = if quantized {
                "qk_rows_bytes"
            } else {
                "qk_rows_half"
            };
            check(isa, name, applies, call(D, NR, BK), bad);
        }
        // pv_half and pv_bytes: acc (NR × D) += p (NR × BK) · v (v_rows × D) in place.
        let (p, vh, vb) = (
            f32s(NR * (BK + 1)),
            halves((BK + 1) * D),
            bytes((BK + 1) * D),
        );
        for quantized in [false, true] {
            let call = |v_rows: usize, acc_rows: usize, acc_cols: usize| {
                let (p, vh, vb) = (p.clone(), vh.clone(), vb.clone());
                move || {
                    let mut acc = out(acc_rows, acc_cols);
                    let am = MatMut::new(&mut acc, acc_rows, acc_cols, acc_cols);
                    let pm = Mat::new(&p, NR, BK, BK);
                    if quantized {
                        products::pv_bytes(isa, pm, ByteMat::new(&vb, false, v_rows, D, D), am)
                    } else {
                        products::pv_half(isa, pm, HalfMat::bf16(&vh, v_rows, D, D), am)
                    }
                }
            };
            let bad: Bad = vec![
                ("v with a row too many", Box::new(call(BK + 1, NR, D))),
                ("acc with a row too many", Box::new(call(BK, NR + 1, D))),
                (
                    "acc with 16 columns too many",
                    Box::new(call(BK, NR, D + 16)),
                ),
            ];
            let name = if quantized { "pv_bytes" } else { "pv_half" };
            check(isa, name, applies, call(BK, NR, D), bad);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn int16_products_refuse_mismatched_shapes_fp8_and_other_instruction_sets() {
    use super::quant::QuantRows;
    for isa in products::available() {
        let applies = products::int16(isa);
        let (q, kb, ks) = (f32s(NR * D), bytes(BK * D), vec![0.5f32; BK]);
        // qk_rows_q16: int16 query rows against int8 keys and their scales.
        let qk = |fp8: bool, scales: usize, k_cols: usize, o_rows: usize, o_cols: usize| {
            let (q, kb, ks) = (q.clone(), kb.clone(), ks.clone());
            move || {
                let mut qr = QuantRows::default();
                qr.quantize(&q, NR, D);
                let mut o = out(o_rows, o_cols);
                let om = MatMut::new(&mut o, o_rows, o_cols, o_cols);
                let k = ByteMat::new(&kb, fp8, BK, k_cols, D);
                products::qk_rows_q16(isa, qr.rows(0, NR), (k, &ks[..scales]), om, 1.0)
            }
        };
        let bad: Bad = vec![
            ("fp8 keys", Box::new(qk(true, BK, D, NR, BK))),
            (
                "a key scale too few",
                Box::new(qk(false, BK - 1, D, NR, BK)),
            ),
            (
                "k with D - 1 columns",
                Box::new(qk(false, BK, D - 1, NR, BK)),
            ),
            (
                "out with a row too many",
                Box::new(qk(false, BK, D, NR + 1, BK)),
            ),
            (
                "out with a key too many",
                Box::new(qk(false, BK, D, NR, BK + 1)),
            ),
        ];
        check(isa, "qk_rows_q16", applies, qk(false, BK, D, NR, BK), bad);

        // pv_q16: acc (NR × v_cols) += p (NR × BK) · (v · scales).
        let (p, vb) = (f32s(NR * BK), bytes((BK + 1) * 2 * D));
        let pv = |fp8: bool, scales: usize, (v_rows, v_cols): (usize, usize), acc_rows: usize| {
            let (p, vb, ks) = (p.clone(), vb.clone(), ks.clone());
            move || {
                let mut acc = out(acc_rows, v_cols);
                let am = MatMut::new(&mut acc, acc_rows, v_cols, v_cols);
                let v = ByteMat::new(&vb, fp8, v_rows, v_cols, v_cols);
                products::pv_q16(isa, Mat::new(&p, NR, BK, BK), (v, &ks[..scales]), am);
            }
        };
        let bad: Bad = vec![
            ("fp8 values", Box::new(pv(true, BK, (BK, D), NR))),
            (
                "a value scale too few",
                Box::new(pv(false, BK - 1, (BK, D), NR)),
            ),
            (
                "v with 16 columns (not a multiple of 32)",
                Box::new(pv(false, BK, (BK, 16), NR)),
            ),
            (
                "v with a row too many",
                Box::new(pv(false, BK, (BK + 1, D), NR)),
            ),
            (
                "acc with a row too many",
                Box::new(pv(false, BK, (BK, D), NR + 1)),
            ),
        ];
        check(isa, "pv_q16", applies, pv(false, BK, (BK, D), NR), bad);
    }
}

/// `fp8_to_pairs` (no instruction-set argument: it needs AVX512-VBMI, checked by the guard).
#[cfg(target_arch = "x86_64")]
#[test]
fn fp8_widening_refuses_int8_odd_rows_and_short_outputs() {
    let kb = bytes(BK * D);
    let widen = |fp8: bool, cols: usize, out_len: usize| {
        let kb = kb.clone();
        move || {
            let mut o = vec![0u32; out_len];
            products::fp8_to_pairs(ByteMat::new(&kb, fp8, BK, cols, D), &mut o);
        }
    };
    let full = BK * D / 2;
    let bad: Bad = vec![
        ("int8 rows", Box::new(widen(false, D, full))),
        (
            "an odd number of columns",
            Box::new(widen(true, D - 1, full)),
        ),
        ("out a pair short", Box::new(widen(true, D, full - 1))),
    ];
    check(
        products::current(),
        "fp8_to_pairs",
        products::vbmi(),
        widen(true, D, full),
        bad,
    );
}

#[test]
fn bf16_pair_products_refuse_mismatched_shapes_and_other_instruction_sets() {
    for isa in products::available() {
        let applies = products::dots_bf16(isa);
        let half = D / 2;
        // qk_pairs: q pairs (NR × D/2) · kt pairs (D/2 × BK); `out` rows hold 16 columns.
        let (qp, ktp) = (
            vec![0x3f80_3f80u32; NR * half],
            vec![0x3f80_3f80u32; (half + 1) * BK],
        );
        let qk = |kt_rows: usize, o_rows: usize, o_stride: usize| {
            let (qp, ktp) = (qp.clone(), ktp.clone());
            move || {
                let mut o = out(o_rows, o_stride);
                let om = MatMut::new(&mut o, o_rows, BK, o_stride);
                products::qk_pairs(
                    isa,
                    Mat::new(&qp, NR, half, half),
                    Mat::new(&ktp, kt_rows, BK, BK),
                    om,
                    1.0,
                )
            }
        };
        let bad: Bad = vec![
            (
                "kt with a pair row too many",
                Box::new(qk(half + 1, NR, 16)),
            ),
            ("out with a row too many", Box::new(qk(half, NR + 1, 16))),
            (
                "out rows without the padded columns",
                Box::new(qk(half, NR, BK)),
            ),
        ];
        check(isa, "qk_pairs", applies, qk(half, NR, 16), bad);

        // qk_rows_pairs: q pairs (NR × D/2) against bf16 key rows (BK × D) in place.
        let kh = halves(BK * D);
        let kf: Vec<half::f16> = kh.iter().map(|x| half::f16::from_f32(x.to_f32())).collect();
        let qkr = |f16: bool, k_cols: usize, o_keys: usize| {
            let (qp, kh, kf) = (qp.clone(), kh.clone(), kf.clone());
            move || {
                let mut o = out(NR, o_keys);
                let om = MatMut::new(&mut o, NR, o_keys, o_keys);
                let k = if f16 {
                    HalfMat::f16(&kf, BK, k_cols, D)
                } else {
                    HalfMat::bf16(&kh, BK, k_cols, D)
                };
                products::qk_rows_pairs(isa, Mat::new(&qp, NR, half, half), k, om, 1.0)
            }
        };
        let bad: Bad = vec![
            ("f16 keys", Box::new(qkr(true, D, BK))),
            ("k with D - 2 columns", Box::new(qkr(false, D - 2, BK))),
            ("out with a key too many", Box::new(qkr(false, D, BK + 1))),
        ];
        check(isa, "qk_rows_pairs", applies, qkr(false, D, BK), bad);

        // pv_pairs: acc (NR × D) += p pairs (NR × ⌈BK/2⌉) · v (BK × D); pv_t_pairs: pairs of
        // p's rows (⌈BK/2⌉ × NR).
        let kp = BK.div_ceil(2);
        let (pp, vh) = (
            vec![0x3f80_3f80u32; (NR + 1) * (kp + 1)],
            halves((BK + 1) * 2 * D),
        );
        for transposed in [false, true] {
            let call = |pair_keys: usize, v_cols: usize, acc_rows: usize| {
                let (pp, vh) = (pp.clone(), vh.clone());
                move || {
                    let mut acc = out(acc_rows, v_cols);
                    let am = MatMut::new(&mut acc, acc_rows, v_cols, v_cols);
                    let v = HalfMat::bf16(&vh, BK, v_cols, v_cols);
                    if transposed {
                        products::pv_t_pairs(isa, Mat::new(&pp, pair_keys, NR, NR), v, am)
                    } else {
                        products::pv_pairs(isa, Mat::new(&pp, NR, pair_keys, pair_keys), v, am)
                    }
                }
            };
            let bad: Bad = vec![
                (
                    "p with a pair of keys too many",
                    Box::new(call(kp + 1, D, NR)),
                ),
                (
                    "v with 16 columns (not a multiple of 32)",
                    Box::new(call(kp, 16, NR)),
                ),
                ("acc with a row too many", Box::new(call(kp, D, NR + 1))),
            ];
            let name = if transposed { "pv_t_pairs" } else { "pv_pairs" };
            check(isa, name, applies, call(kp, D, NR), bad);
        }

        // to_pairs / interleave_pairs: only where the pair products run, into rows of pairs
        // that fit `out`.
        let p = f32s(NR * D);
        let to = |interleave: bool, stride: usize, len: usize| {
            let p = p.clone();
            move || {
                let mut o = vec![0u32; len];
                if interleave {
                    // Pairs of p's 2 rows: one row of D pairs.
                    products::interleave_pairs(isa, Mat::new(&p, 2, D, D), &mut o, stride);
                } else {
                    products::to_pairs(isa, Mat::new(&p, NR, D, D), &mut o, stride);
                }
            }
        };
        check(isa, "to_pairs", applies, to(false, half, NR * half), vec![]);
        check(isa, "interleave_pairs", applies, to(true, D, D), vec![]);
        // Where they run, the conversions check `out` themselves (a real `assert!`).
        let bad: Bad = vec![
            (
                "to_pairs: rows of pairs closer than a row",
                Box::new(to(false, half - 1, NR * D)),
            ),
            (
                "to_pairs: out a pair too short",
                Box::new(to(false, half, NR * half - 1)),
            ),
            (
                "interleave_pairs: out a pair too short",
                Box::new(to(true, D, D - 1)),
            ),
        ];
        for (what, f) in bad {
            let file = panic_file(f);
            let guard = if applies {
                "avx512_bf16.rs"
            } else {
                "products.rs"
            };
            assert!(
                file.as_deref().is_some_and(|f| f.ends_with(guard)),
                "{isa:?} {what}: did not panic in {guard} ({file:?})"
            );
        }
    }
}

#[test]
fn matrices_that_do_not_fit_their_slices_panic() {
    /// Whether `f` panicked, which it may do only in `mat.rs`'s check.
    fn panics(f: impl FnOnce()) -> bool {
        let file = panic_file(f);
        assert!(
            file.as_deref().is_none_or(|f| f.ends_with("mat.rs")),
            "{file:?}"
        );
        file.is_some()
    }
    let (x, h, b) = (f32s(12), halves(12), bytes(12));
    let mut m = f32s(12);
    assert!(
        panics(|| {
            let _ = Mat::new(&x, 3, 4, 5);
        }),
        "3 rows of 4, 5 apart, in 12"
    );
    assert!(
        panics(|| {
            let _ = Mat::new(&x, 2, 13, 13);
        }),
        "a row longer than the slice"
    );
    assert!(
        panics(|| {
            let _ = HalfMat::bf16(&h, 4, 4, 4);
        }),
        "4 rows of 4 in 12"
    );
    assert!(
        panics(|| {
            let _ = ByteMat::new(&b, false, 2, 7, 7);
        }),
        "2 rows of 7 in 12"
    );
    assert!(
        panics(|| {
            let _ = MatMut::new(&mut m, 3, 4, 3);
        }),
        "overlapping written rows"
    );
    // The well-formed ones do not (a read-only view may repeat one row: stride 0).
    assert!(!panics(|| {
        let _ = Mat::new(&x, 3, 4, 4);
    }));
    assert!(!panics(|| {
        let _ = Mat::new(&x, 5, 12, 0);
    }));
    assert!(!panics(|| {
        let _ = ByteMat::new(&b, true, 3, 4, 4);
    }));
}
