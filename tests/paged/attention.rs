//! `paged_attention` against `sdpa_varlen` on the gathered keys, and its errors.

use candle_core::{DType, Result, Tensor};
use candle_mha::kernels::paged::{gather, paged_attention, PagedKv};
use candle_mha::sdpa::{sdpa_varlen, SdpaOptions, SeqOffsets};
use candle_mha::CausalAlignment;

use super::support::{check_close, tolerances, Rng};
use super::{randn, DEV};

#[test]
fn paged_attention_rejects_bad_input() -> Result<()> {
    let k = Tensor::zeros((4, 2, 1, 8), DType::F32, &DEV)?;
    let q = Tensor::zeros((3, 2, 8), DType::F32, &DEV)?;
    let cu = SeqOffsets::from_lengths(&[2, 1]);
    let opts = SdpaOptions::new();
    let call =
        |tables: Vec<Vec<u32>>, lens: Vec<usize>, k: &Tensor, q: &Tensor, cu: &SeqOffsets| {
            let kv = PagedKv {
                k_pool: k,
                v_pool: k,
                block_size: 2,
                tables: &tables,
                seq_lens: &lens,
            };
            paged_attention(q, cu, &kv, &opts)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
    let e = call(vec![vec![0, 4], vec![1]], vec![3, 1], &k, &q, &cu);
    assert!(
        e.contains("tables[0][1] = block 4") && e.contains("4 blocks"),
        "{e}"
    );
    let e = call(vec![vec![0], vec![1]], vec![3, 1], &k, &q, &cu);
    assert!(e.contains("seq_lens[0] = 3"), "{e}");
    let e = call(vec![vec![0]], vec![2], &k, &q, &cu);
    assert!(
        e.contains("2 sequences but there are 1 block tables"),
        "{e}"
    );
    let e = call(vec![vec![0], vec![1]], vec![1, 1], &k, &q, &cu);
    assert!(e.contains("2 new tokens but only 1 keys"), "{e}");
    let e = call(
        vec![vec![0], vec![1]],
        vec![2, 1],
        &k.to_dtype(DType::BF16)?,
        &q,
        &cu,
    );
    assert!(e.contains("k_pool is BF16 but q is F32"), "{e}");
    let e = call(
        vec![vec![0], vec![1]],
        vec![2, 1],
        &k,
        &q.narrow(2, 0, 4)?,
        &cu,
    );
    assert!(e.contains("head_dim"), "{e}");
    let e = call(
        vec![vec![0], vec![1]],
        vec![2, 1],
        &k,
        &q,
        &SeqOffsets::from_lengths(&[1, 1]),
    );
    assert!(e.contains("cu_q ends at 2"), "{e}");
    let (k2, q3) = (
        Tensor::zeros((4, 2, 2, 8), DType::F32, &DEV)?,
        Tensor::zeros((3, 3, 8), DType::F32, &DEV)?,
    );
    let e = call(vec![vec![0], vec![1]], vec![2, 1], &k2, &q3, &cu);
    assert!(e.contains("must divide"), "{e}");
    let e = call(vec![vec![0], vec![1]], vec![2, 1], &k.squeeze(2)?, &q, &cu);
    assert!(e.contains("k_pool must be 4-D"), "{e}");
    Ok(())
}

#[test]
fn paged_attention_equals_varlen_on_the_gathered_keys() -> Result<()> {
    let mut rng = Rng(0x5eed_9a9e);
    for iter in 0..60 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let odd = 2 + rng.below(7);
        let bs = rng.pick(&[1, 16, 32, odd]);
        let (h, hkv) = rng.pick(&[(4, 2), (4, 1), (6, 3), (2, 2)]);
        let d = rng.pick(&[8, 16]);
        let n = 1 + rng.below(5);
        // Mixed prefill and decode (and a sequence with no new token).
        let seq_lens: Vec<usize> = (0..n).map(|_| rng.below(70)).collect();
        let new: Vec<usize> = seq_lens
            .iter()
            .map(|&s| match rng.below(3) {
                0 => s.min(1),
                1 => s,
                _ => rng.below(s + 1),
            })
            .collect();
        let blocks_needed: usize = seq_lens.iter().map(|s| s.div_ceil(bs)).sum();
        let num_blocks = blocks_needed + 1 + rng.below(4);
        // Blocks handed out in a random order.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut next = ids.into_iter();
        let tables: Vec<Vec<u32>> = seq_lens
            .iter()
            .map(|s| (0..s.div_ceil(bs)).map(|_| next.next().unwrap()).collect())
            .collect();
        let k_pool = randn(&mut rng, &[num_blocks, bs, hkv, d], dtype);
        let v_pool = randn(&mut rng, &[num_blocks, bs, hkv, d], dtype);
        let cu_q = SeqOffsets::from_lengths(&new);
        let q = randn(&mut rng, &[cu_q.total(), h, d], dtype);
        let kv = PagedKv {
            k_pool: &k_pool,
            v_pool: &v_pool,
            block_size: bs,
            tables: &tables,
            seq_lens: &seq_lens,
        };
        // The dense keys, row by row from the tables.
        let mut kd = Vec::new();
        let mut vd = Vec::new();
        for (t, &s) in tables.iter().zip(&seq_lens) {
            for p in 0..s {
                let (b, r) = (t[p / bs] as usize, p % bs);
                kd.push(k_pool.narrow(0, b, 1)?.narrow(1, r, 1)?.squeeze(0)?);
                vd.push(v_pool.narrow(0, b, 1)?.narrow(1, r, 1)?.squeeze(0)?);
            }
        }
        let cu_k = SeqOffsets::from_lengths(&seq_lens);
        let (kd, vd) = if kd.is_empty() {
            let z = Tensor::zeros((0, hkv, d), dtype, &DEV)?;
            (z.clone(), z)
        } else {
            (Tensor::cat(&kd, 0)?, Tensor::cat(&vd, 0)?)
        };
        let mut opts = SdpaOptions::new().causal(CausalAlignment::BottomRight);
        if iter % 3 == 0 {
            opts = opts.sliding_window(1 + rng.below(20));
        }
        if iter % 5 == 0 {
            opts = opts.softcap(20.0);
        }
        let want = sdpa_varlen(&q, &kd, &vd, &cu_q, &cu_k, &opts)?;
        let got = paged_attention(&q, &cu_q, &kv, &opts)?.output;
        let (atol, rtol) = tolerances(dtype);
        check_close(
            &got,
            &want,
            atol,
            rtol,
            &format!("iter {iter} bs {bs} {dtype:?}"),
        );
        if iter % 3 != 0 && iter % 5 != 0 {
            // No alignment given: bottom-right by default.
            let got = paged_attention(&q, &cu_q, &kv, &SdpaOptions::new())?.output;
            check_close(
                &got,
                &want,
                atol,
                rtol,
                &format!("iter {iter} default alignment"),
            );
        }
    }
    Ok(())
}

/// Random, mostly invalid calls (block ids past the pool, lengths past the tables, counts that
/// disagree, new tokens past the keys): a result or an error, never a panic, and every call that
/// passes equals `sdpa_varlen` on the gathered keys (to f32 rounding).
#[test]
fn paged_attention_never_panics_on_random_input() -> Result<()> {
    let mut rng = Rng(0xbad0_1a01);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..400 {
        let (nb, bs, hkv, d) = (1 + rng.below(6), 1 + rng.below(4), 1 + rng.below(2), 4);
        let h = hkv * (1 + rng.below(2)) + usize::from(rng.below(8) == 0);
        let k = randn(&mut rng, &[nb, bs, hkv, d], DType::F32);
        let n = rng.below(4);
        let tables: Vec<Vec<u32>> = (0..n + usize::from(rng.below(10) == 0))
            .map(|_| {
                (0..rng.below(3))
                    .map(|_| rng.below(nb + 1) as u32)
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = (0..n).map(|_| rng.below(3 * bs + 1)).collect();
        let new: Vec<usize> = (0..n).map(|_| rng.below(3)).collect();
        let cu = SeqOffsets::from_lengths(&new);
        let q = randn(&mut rng, &[cu.total(), h, d], DType::F32);
        let kv = PagedKv {
            k_pool: &k,
            v_pool: &k,
            block_size: bs,
            tables: &tables,
            seq_lens: &lens,
        };
        match paged_attention(&q, &cu, &kv, &SdpaOptions::new()) {
            Ok(out) => {
                ok += 1;
                let (kd, vd, cu_k) = gather(&kv)?;
                let opts = SdpaOptions::new().causal(CausalAlignment::BottomRight);
                let want = sdpa_varlen(&q, &kd, &vd, &cu, &cu_k, &opts)?;
                // The fused kernel reads the blocks in place (decoding steps as a batch): the
                // same sums in another order.
                let (atol, rtol) = tolerances(DType::F32);
                check_close(&out.output, &want, atol, rtol, "a valid random call");
            }
            Err(_) => err += 1,
        }
    }
    assert!(ok >= 10 && err >= 100, "{ok} valid, {err} refused");
    Ok(())
}
