//! Keys gathered by row ([`attention_paged`], [`paged_attention`](super::paged::paged_attention)):
//! batches with each element's keys right-aligned in `S` positions (a paged cache's decoding
//! steps) and packed sequences, against the same calls on the gathered keys.

use candle_core::{DType, Device, Result, Tensor};

use super::{attention, attention_paged, AttnParams};
use crate::config::Backend;
use crate::kernels::KernelId;
use crate::mask::{Causal, CausalAlignment, MaskDims, MaskPlan};

/// The largest absolute difference between two tensors, in f32.
fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

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
    // Under Miri, which interprets every step: 2 short cases.
    for case in 0..if cfg!(miri) { 3 } else { 40 } {
        if cfg!(miri) && case % 10 == 0 {
            continue;
        }
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
        let diff = max_diff(&got.output, &want.output)?;
        let tol = if dtype == DType::F32 { 5e-6 } else { 1.6e-2 };
        assert!(diff <= tol, "case {case} bs {bs} b {b} l {l} s {s}: {diff}");
    }
    assert!(
        super::test_support::cpu_split_calls() > splits,
        "no call was split"
    );
    Ok(())
}

/// [`paged_attention`](super::paged::paged_attention) against `sdpa_varlen` on the gathered
/// keys: sequences with 1 to 300 keys in shuffled blocks of 1 to 64 positions, their last 1 to
/// 9 (or, every other case, the same number: the batch route) as new tokens, random windows and
/// soft-caps, f32 and bf16; the fused kernel reads the blocks in place (tiles cut at block
/// edges), the reference gathers.
#[test]
fn paged_attention_equals_sdpa_varlen_on_gathered_keys() -> Result<()> {
    use super::paged::{paged_attention, PagedKv};
    use crate::sdpa::{sdpa_varlen_with_kernel, SdpaOptions, SeqOffsets};
    let dev = Device::Cpu;
    let mut rng = Lcg(7);
    // Under Miri, which interprets every step: 2 cases.
    for case in 0..if cfg!(miri) { 2 } else { 48 } {
        let bs = [1usize, 3, 16, 64][case % 4];
        let dtype = if case % 3 == 2 {
            DType::BF16
        } else {
            DType::F32
        };
        let (hkv, g, d) = (
            1 + rng.below(2),
            1 + rng.below(3),
            [8usize, 32, 64][rng.below(3)],
        );
        let n = 1 + rng.below(4);
        let uniform = case % 2 == 0;
        let l = 1 + rng.below(4);
        let news: Vec<usize> = (0..n)
            .map(|_| if uniform { l } else { 1 + rng.below(9) })
            .collect();
        let lens: Vec<usize> = news.iter().map(|&x| x + rng.below(300)).collect();
        let blocks: Vec<usize> = lens.iter().map(|s| s.div_ceil(bs)).collect();
        let nb = blocks.iter().sum::<usize>() + 3;
        // Blocks handed out in a shuffled order (sometimes in order: long runs).
        let mut free: Vec<u32> = (0..nb as u32).collect();
        if case % 5 != 0 {
            for i in (1..free.len()).rev() {
                free.swap(i, rng.below(i + 1));
            }
        }
        let tables: Vec<Vec<u32>> = blocks.iter().map(|&m| free.drain(..m).collect()).collect();
        let mut rows = vec![];
        for (table, &s) in tables.iter().zip(&lens) {
            rows.extend((0..s).map(|t| table[t / bs] * bs as u32 + (t % bs) as u32));
        }
        let t = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)
        };
        let (kp, vp) = (t((nb, bs, hkv, d))?, t((nb, bs, hkv, d))?);
        let q = t((1, news.iter().sum(), hkv * g, d))?.squeeze(0)?;
        let ids = Tensor::from_slice(&rows, rows.len(), &dev)?;
        let flat = |p: &Tensor| p.reshape((nb * bs, hkv, d))?.index_select(&ids, 0);
        let (kd, vd) = (flat(&kp)?, flat(&vp)?);
        let (cu_q, cu_k) = (
            SeqOffsets::from_lengths(&news),
            SeqOffsets::from_lengths(&lens),
        );
        let mut opts = SdpaOptions::new().causal(CausalAlignment::BottomRight);
        if rng.below(3) == 0 {
            opts = opts.sliding_window(1 + rng.below(40));
        }
        if rng.below(3) == 0 {
            opts = opts.softcap(5.0);
        }
        let kv = PagedKv {
            k_pool: &kp,
            v_pool: &vp,
            block_size: bs,
            tables: &tables,
            seq_lens: &lens,
        };
        for backend in [Backend::Auto, Backend::Reference] {
            let opts = opts.clone().backend(backend);
            let want = sdpa_varlen_with_kernel(&q, &kd, &vd, &cu_q, &cu_k, &opts)?;
            let got = paged_attention(&q, &cu_q, &kv, &opts)?;
            if backend == Backend::Auto {
                assert_eq!(got.kernel, KernelId::Cpu, "case {case}");
            }
            let diff = max_diff(&got.output, &want.output)?;
            let tol = if dtype == DType::F32 { 5e-6 } else { 1.6e-2 };
            assert!(diff <= tol, "case {case} {backend:?} bs {bs}: {diff}");
        }
    }
    Ok(())
}

/// A block id outside the pool is an error naming it, not a read out of bounds.
#[test]
fn block_outside_the_pool_is_an_error() -> Result<()> {
    use super::paged::{paged_attention, PagedKv};
    use crate::sdpa::{SdpaOptions, SeqOffsets};
    let dev = Device::Cpu;
    let kv = Tensor::zeros((4, 2, 1, 8), DType::F32, &dev)?;
    let q = Tensor::zeros((1, 1, 8), DType::F32, &dev)?;
    let tables = vec![vec![0, 4]];
    let pkv = PagedKv {
        k_pool: &kv,
        v_pool: &kv,
        block_size: 2,
        tables: &tables,
        seq_lens: &[3],
    };
    let err = paged_attention(
        &q,
        &SeqOffsets::from_lengths(&[1]),
        &pkv,
        &SdpaOptions::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("block 4"), "{err}");
    Ok(())
}
