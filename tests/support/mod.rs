//! Helpers shared by the kernel tests: a deterministic RNG, a tolerance check that compares NaN
//! positions, and random mask plans of every kind.
#![allow(dead_code)] // each test crate uses its own subset

use candle_core::{DType, Device, Tensor};
use candle_mha::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};

/// xorshift64*: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.unit() - 0.5) * 3.5).collect()
    }
}

/// Max |a - b| where both are finite; NaN positions must agree.
pub fn check_close(got: &Tensor, want: &Tensor, atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtypes");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if b.is_nan() || a.is_nan() {
            assert!(
                a.is_nan() && b.is_nan(),
                "{what}: [{i}] fused {a} vs reference {b}"
            );
            continue;
        }
        assert!(
            (a - b).abs() <= atol + rtol * b.abs(),
            "{what}: [{i}] fused {a} vs reference {b}"
        );
    }
}

pub fn tolerances(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 1e-4),
        DType::F16 => (2e-3, 5e-3),
        _ => (1.6e-2, 1.6e-2),
    }
}

/// A random (mask, masked-key-count) for the given shape, covering every mask kind.
/// `n` additive mask values: `-inf` with probability `1/inf_one_in`, else uniform in
/// `[-amp, amp)`.
pub fn additive(rng: &mut Rng, n: usize, inf_one_in: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.below(inf_one_in) == 0 {
                f32::NEG_INFINITY
            } else {
                (rng.unit() * 2.0 - 1.0) * amp
            }
        })
        .collect()
}

pub fn random_mask(
    rng: &mut Rng,
    b: usize,
    h: usize,
    l: usize,
    s: usize,
    desc: &mut String,
    dev: &Device,
) -> MaskPlan {
    let dims = MaskDims {
        batch: b,
        heads: h,
        q_len: l,
        kv_len: s,
        unbatched: false,
    };
    let causal = match rng.below(4) {
        0 | 1 => None,
        _ => Some(Causal {
            alignment: rng.pick(&[CausalAlignment::TopLeft, CausalAlignment::BottomRight]),
            window: if rng.below(3) == 0 {
                Some(1 + rng.below(s + 2))
            } else {
                None
            },
        }),
    };
    let kpm = match rng.below(6) {
        0 | 1 => None,
        5 => {
            // Boolean (B, S) with left and right padding: kept keys contiguous (key ranges).
            let v: Vec<u8> = (0..b)
                .flat_map(|_| {
                    let lo = rng.below(s + 1);
                    let hi = lo + rng.below(s - lo + 1);
                    (0..s).map(move |j| u8::from(j < lo || j >= hi))
                })
                .collect();
            Some(KeyPaddingMask::new(
                Tensor::from_vec(v, (b, s), dev).unwrap(),
            ))
        }
        2 => {
            // Lengths, sometimes 0 (every row of that batch element fully masked).
            let lens: Vec<usize> = (0..b)
                .map(|_| {
                    if rng.below(6) == 0 {
                        0
                    } else {
                        rng.below(s + 1)
                    }
                })
                .collect();
            Some(KeyPaddingMask::from_lengths(&lens))
        }
        3 => {
            // Boolean (B, S), sometimes a fully padded batch element.
            let full = rng.below(4) == 0;
            let v: Vec<u8> = (0..b * s)
                .map(|i| u8::from(full && i < s || rng.below(3) == 0))
                .collect();
            Some(KeyPaddingMask::new(
                Tensor::from_vec(v, (b, s), dev).unwrap(),
            ))
        }
        _ => {
            // Additive (B, S) with finite values and -inf runs (whole tiles when s is large).
            let run = rng.below(s + 1);
            let v: Vec<f32> = (0..b * s)
                .map(|i| match rng.below(4) {
                    _ if i % s < run && i / s == 0 => f32::NEG_INFINITY,
                    0 => f32::NEG_INFINITY,
                    1 => rng.unit() - 0.5,
                    _ => 0.0,
                })
                .collect();
            Some(KeyPaddingMask::new(
                Tensor::from_vec(v, (b, s), dev).unwrap(),
            ))
        }
    };
    let attn_mask = match rng.below(7) {
        0..=2 => None,
        3 => {
            let v: Vec<u8> = (0..l * s).map(|_| u8::from(rng.below(4) == 0)).collect();
            Some(AttnMask::new(Tensor::from_vec(v, (l, s), dev).unwrap()))
        }
        4 => {
            let v: Vec<u8> = (0..b * h * l * s)
                .map(|_| u8::from(rng.below(3) == 0))
                .collect();
            Some(AttnMask::new(
                Tensor::from_vec(v, (b * h, l, s), dev).unwrap(),
            ))
        }
        5 => {
            let v = additive(rng, b * h * l * s, 5, 1.0);
            Some(AttnMask::new(
                Tensor::from_vec(v, (b * h, l, s), dev).unwrap(),
            ))
        }
        _ => {
            // 4-D additive with random broadcast dims.
            let (mb, mh, ml) = (rng.pick(&[1, b]), rng.pick(&[1, h]), rng.pick(&[1, l]));
            let v = additive(rng, mb * mh * ml * s, 4, 2.0);
            Some(AttnMask::new(
                Tensor::from_vec(v, (mb, mh, ml, s), dev).unwrap(),
            ))
        }
    };
    *desc += &format!(
        " causal={causal:?} kpm={} mask={}",
        match &kpm {
            None => "none".to_string(),
            Some(KeyPaddingMask::Lengths(l)) => format!("lengths{l:?}"),
            Some(KeyPaddingMask::Tensor(t)) => format!("{:?}", t.dtype()),
            Some(other) => format!("{other:?}"),
        },
        match &attn_mask {
            None => "none".to_string(),
            Some(AttnMask::Bool(t)) => format!("bool{:?}", t.dims()),
            Some(AttnMask::Additive(t)) => format!("additive{:?}", t.dims()),
            Some(other) => format!("{other:?}"),
        }
    );
    let plan = MaskPlan::build(
        dims,
        kpm.as_ref(),
        attn_mask.as_ref(),
        causal,
        DType::F32,
        dev,
    )
    .unwrap();
    if b == 1 && rng.below(3) == 0 {
        // Packed sequences: random cuts of the L queries and S keys into n sequences (some
        // empty); queries of sequence i see only its keys.
        let n = 1 + rng.below(4);
        let cuts = |rng: &mut Rng, total: usize| {
            let mut c: Vec<usize> = (0..n - 1).map(|_| rng.below(total + 1)).collect();
            c.sort();
            let mut cu = vec![0];
            cu.extend(c);
            cu.push(total);
            cu
        };
        let (cu_q, cu_k) = (cuts(rng, l), cuts(rng, s));
        *desc += &format!(" packed q{cu_q:?} k{cu_k:?}");
        return plan.with_packed_sequences(&cu_q, &cu_k).unwrap();
    }
    plan
}

/// `plan` with random score modifiers (each about half the time): a soft-cap, ALiBi slopes of
/// shape `(H,)` or `(B, H)` (some 0), sinks (the plan must not be packed).
pub fn random_modifiers(
    rng: &mut Rng,
    plan: MaskPlan,
    desc: &mut String,
    dev: &Device,
) -> MaskPlan {
    let dims = plan.dims();
    let (b, h) = (dims.batch, dims.heads);
    let mut plan = plan;
    if rng.below(2) == 0 {
        let c = 0.5 + rng.unit() as f64 * 10.0;
        *desc += &format!(" softcap={c:.2}");
        plan = plan.with_softcap(c).unwrap();
    }
    if rng.below(2) == 0 {
        let rows = rng.pick(&[1, b]);
        let v: Vec<f32> = (0..rows * h)
            .map(|_| {
                if rng.below(4) == 0 {
                    0.0
                } else {
                    rng.unit() * 0.3
                }
            })
            .collect();
        *desc += &format!(" alibi=({rows},{h})");
        plan = plan
            .with_alibi_slopes(&Tensor::from_vec(v, (rows, h), dev).unwrap())
            .unwrap();
    }
    if rng.below(2) == 0 {
        let v: Vec<f32> = (0..h).map(|_| rng.unit() * 6.0 - 3.0).collect();
        *desc += " sinks";
        plan = plan.with_sinks(&Tensor::new(v, dev).unwrap()).unwrap();
    }
    plan
}
