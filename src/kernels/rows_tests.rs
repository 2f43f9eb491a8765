//! [`attention_paged`] on batches: keys gathered by row for each batch element (left-aligned
//! into `S` positions, a paged cache's decode and chunked-prefill steps) against the same call on
//! the gathered keys.

use candle_core::{DType, Device, Result, Tensor};

use super::{attention, attention_paged, AttnParams};
use crate::config::Backend;
use crate::kernels::KernelId;
use crate::mask::{Causal, CausalAlignment, MaskDims, MaskPlan};

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n.max(1) as u64) as usize
    }
}

/// Batches of 1 to 4 sequences with their keys in shuffled blocks of 1 to 64 positions, each
/// sequence's keys right-aligned in `S` (left padding), `L` new tokens each, bottom-right causal,
/// random windows, soft-caps and sinks; decode-shaped calls (`L = 1`, several KV heads: all
/// heads walking the keys together, and the flash-decoding split at 2 500 keys) included. The
/// fused kernel reads the rows in place and matches the reference on the gathered keys.
#[test]
fn gathered_rows_per_batch_element_equal_gathered_keys() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Lcg(11);
    let splits = super::test_support::cpu_split_calls();
    for case in 0..40 {
        let bs = [1usize, 16, 5, 64][case % 4];
        let dtype = if case % 3 == 1 {
            DType::BF16
        } else {
            DType::F32
        };
        // Every tenth: one long decode over several KV heads (split across threads).
        let long = case % 10 == 0;
        let hkv = if long {
            2 + rng.below(3)
        } else {
            1 + rng.below(4)
        };
        let (g, d) = (1 + rng.below(4), [16usize, 64][rng.below(2)]);
        let b = if long { 1 } else { 1 + rng.below(4) };
        let l = if case % 2 == 0 { 1 } else { 1 + rng.below(6) };
        let lens: Vec<usize> = (0..b)
            .map(|_| {
                if long {
                    2100 + rng.below(400)
                } else {
                    l + rng.below(300)
                }
            })
            .collect();
        let s = *lens.iter().max().unwrap();
        let blocks: Vec<usize> = lens.iter().map(|x| x.div_ceil(bs)).collect();
        let nb = blocks.iter().sum::<usize>() + 2;
        let mut free: Vec<u32> = (0..nb as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.below(i + 1));
        }
        let mut rows = vec![];
        let mut pads = vec![];
        for (bi, &len) in lens.iter().enumerate() {
            let table: Vec<u32> = free.drain(..blocks[bi]).collect();
            let pad = s - len;
            pads.push(pad);
            rows.extend(std::iter::repeat_n(0u32, pad));
            rows.extend((0..len).map(|t| table[t / bs] * bs as u32 + (t % bs) as u32));
        }
        let t = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)
        };
        let (kp, vp) = (t((1, nb * bs, hkv, d))?, t((1, nb * bs, hkv, d))?);
        let q = t((b, l, hkv * g, d))?;
        let ids = Tensor::from_slice(&rows, rows.len(), &dev)?;
        let gather = |p: &Tensor| p.squeeze(0)?.index_select(&ids, 0)?.reshape((b, s, hkv, d));
        let (kd, vd) = (gather(&kp)?, gather(&vp)?);
        let causal = Causal {
            alignment: CausalAlignment::BottomRight,
            window: (rng.below(3) == 0).then(|| 1 + rng.below(50)),
        };
        let mut plan = MaskPlan::new(MaskDims::new(b, hkv * g, l, s))
            .with_left_padding(&pads)?
            .with_causal(causal)?;
        if rng.below(3) == 0 {
            plan = plan.with_softcap(8.0)?;
        }
        if rng.below(3) == 0 {
            plan = plan.with_sinks(&Tensor::randn(0f32, 1., hkv * g, &dev)?)?;
        }
        let mut params = AttnParams::new(d);
        let got = attention_paged(&q, (&kp, &vp), &rows, &plan, &params)?;
        assert_eq!(got.kernel, KernelId::Cpu, "case {case}");
        params.backend = Backend::Reference;
        let want = attention(&q, &kd, &vd, &plan, &params)?;
        let diff = (got.output.to_dtype(DType::F32)? - want.output.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let tol = if dtype == DType::F32 { 5e-6 } else { 1.6e-2 };
        assert!(diff <= tol, "case {case} bs {bs} b {b} l {l} s {s}: {diff}");
    }
    assert!(
        super::test_support::cpu_split_calls() > splits,
        "no call was split"
    );
    Ok(())
}
