//! The paged KV pool (`cache::PagedKvPool`), `kernels::paged::paged_attention` and
//! `MultiHeadAttention::attend_paged`: fork, prefix sharing, copy on write, release and reuse,
//! exhaustion, bad input, and paged == dense over random sequence mixes.

mod support;

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::cache::{PagedKvPool, PagedPoolConfig, PagedStep, SeqId};
use candle_mha::kernels::paged::{gather, paged_attention, PagedKv};
use candle_mha::rope::{Rope, RopeStyle};
use candle_mha::sdpa::{sdpa_varlen, SdpaOptions, SeqOffsets};
use candle_mha::{CausalAlignment, KvCache, KvFormat, MhaConfig, MhaInput, MultiHeadAttention};
use candle_nn::{VarBuilder, VarMap};
use support::{check_close, tolerances, Rng};

const DEV: Device = Device::Cpu;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn pool_types_are_send_and_sync() {
    assert_send_sync::<PagedKvPool>();
    assert_send_sync::<PagedStep>();
    assert_send_sync::<SeqId>();
    assert_send_sync::<PagedPoolConfig>();
}

#[test]
fn a_pool_moves_between_threads() -> Result<()> {
    let mut pool = small_pool(4, 4);
    let a = pool.add_sequence();
    append(&mut pool, a, &[1., 2., 3.])?;
    let mut pool = std::thread::spawn(move || append(&mut pool, a, &[4., 5.]).map(|_| pool))
        .join()
        .expect("the thread ran")?;
    assert_eq!(keys(&mut pool, a)?, [1., 2., 3., 4., 5.]);
    Ok(())
}

/// A pool of one layer, one KV head of size 2.
fn small_pool(block_size: usize, num_blocks: usize) -> PagedKvPool {
    PagedKvPool::new(
        PagedPoolConfig::new(1, 1, 2, block_size, num_blocks, DType::F32),
        &DEV,
    )
    .unwrap()
}

/// Appends keys = values = `vals` (one row per value, both features equal) to `id`.
fn append(pool: &mut PagedKvPool, id: SeqId, vals: &[f32]) -> Result<()> {
    let step = pool.begin_step(&[(id, vals.len())])?;
    let rows: Vec<f32> = vals.iter().flat_map(|&x| [x, x]).collect();
    let t = Tensor::from_vec(rows, (vals.len(), 1, 2), &DEV)?;
    pool.write(0, &step, &t, &t)?;
    pool.commit(&step)
}

/// The keys of `id` as the attention reads them (first feature of each row).
fn keys(pool: &mut PagedKvPool, id: SeqId) -> Result<Vec<f32>> {
    let step = pool.begin_step(&[(id, 0)])?;
    let (k, _, _) = gather(&pool.paged_kv(0, &step)?)?;
    k.narrow(2, 0, 1)?.flatten_all()?.to_vec1()
}

#[test]
fn fork_shares_blocks_and_copies_on_write() -> Result<()> {
    let mut pool = small_pool(4, 8);
    let a = pool.add_sequence();
    append(&mut pool, a, &[1., 2., 3., 4., 5., 6.])?;
    assert_eq!(pool.used_blocks(), 2);
    let b = pool.fork(a)?;
    assert_eq!(pool.used_blocks(), 2, "a fork copies nothing");
    let shared = pool.block_table(a)?.to_vec();
    assert_eq!(pool.block_table(b)?, &shared[..]);
    assert!(shared.iter().all(|&x| pool.block_refs(x).unwrap() == 2));
    // Each writes its own 7th token into the shared, partly filled block: copy on write.
    append(&mut pool, a, &[70.])?;
    append(&mut pool, b, &[-70.])?;
    assert_eq!(keys(&mut pool, a)?, [1., 2., 3., 4., 5., 6., 70.]);
    assert_eq!(keys(&mut pool, b)?, [1., 2., 3., 4., 5., 6., -70.]);
    assert_eq!(
        pool.block_table(a)?[0],
        pool.block_table(b)?[0],
        "the full block stays shared"
    );
    assert_ne!(pool.block_table(a)?[1], pool.block_table(b)?[1]);
    assert_eq!(pool.block_refs(shared[0])?, 2);
    assert_eq!(pool.used_blocks(), 3);
    // A fork at a block boundary shares everything and needs no copy.
    append(&mut pool, a, &[80.])?;
    let c = pool.fork(a)?;
    append(&mut pool, c, &[90.])?;
    assert_eq!(keys(&mut pool, a)?, [1., 2., 3., 4., 5., 6., 70., 80.]);
    assert_eq!(keys(&mut pool, c)?, [1., 2., 3., 4., 5., 6., 70., 80., 90.]);
    assert_eq!(pool.used_blocks(), 4);
    for id in [a, b, c] {
        pool.release(id)?;
    }
    assert_eq!((pool.used_blocks(), pool.free_blocks()), (0, 8));
    Ok(())
}

#[test]
fn prefix_sharing_copies_the_partial_block() -> Result<()> {
    let mut pool = small_pool(4, 8);
    let a = pool.add_sequence();
    append(&mut pool, a, &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])?;
    // 6 positions: block 0 shared, block 1 (2 of its rows) copied.
    let b = pool.fork_prefix(a, 6)?;
    assert_eq!(pool.seq_len(b)?, 6);
    assert_eq!(pool.block_table(b)?[0], pool.block_table(a)?[0]);
    assert_ne!(pool.block_table(b)?[1], pool.block_table(a)?[1]);
    assert_eq!(pool.block_refs(pool.block_table(a)?[1])?, 1);
    assert_eq!(pool.used_blocks(), 4);
    append(&mut pool, b, &[60., 70.])?;
    assert_eq!(keys(&mut pool, b)?, [0., 1., 2., 3., 4., 5., 60., 70.]);
    assert_eq!(
        keys(&mut pool, a)?,
        [0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]
    );
    // 8 positions: two full blocks shared, nothing copied.
    let c = pool.fork_prefix(a, 8)?;
    assert_eq!(pool.used_blocks(), 4);
    assert_eq!(pool.block_table(c)?, &pool.block_table(a)?[..2]);
    assert!(pool.fork_prefix(a, 11).is_err());
    // Released in any order, every block comes back.
    pool.release(a)?;
    assert_eq!(keys(&mut pool, c)?, [0., 1., 2., 3., 4., 5., 6., 7.]);
    pool.release(c)?;
    pool.release(b)?;
    assert_eq!(pool.free_blocks(), 8);
    Ok(())
}

#[test]
fn truncate_releases_the_blocks_past_the_end() -> Result<()> {
    let mut pool = small_pool(4, 8);
    let a = pool.add_sequence();
    append(&mut pool, a, &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])?;
    let b = pool.fork(a)?;
    pool.truncate(a, 5)?;
    assert_eq!((pool.seq_len(a)?, pool.block_table(a)?.len()), (5, 2));
    assert_eq!(pool.used_blocks(), 3, "b still holds the third block");
    // a's second block is shared with b and partly filled now: a's write copies it.
    append(&mut pool, a, &[50.])?;
    assert_eq!(keys(&mut pool, a)?, [0., 1., 2., 3., 4., 50.]);
    assert_eq!(
        keys(&mut pool, b)?,
        [0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]
    );
    assert!(pool.truncate(a, 7).is_err(), "past the end");
    pool.truncate(b, 0)?;
    assert!(pool.block_table(b)?.is_empty());
    pool.release(b)?;
    assert_eq!(pool.used_blocks(), 2);
    Ok(())
}

#[test]
fn released_blocks_are_reused_and_memory_is_what_sequences_hold() -> Result<()> {
    let mut pool = small_pool(4, 6);
    let per_block = pool.config().bytes_per_block();
    let ids: Vec<SeqId> = (0..3).map(|_| pool.add_sequence()).collect();
    let lens = [5usize, 1, 8];
    let step = pool.begin_step(&ids.iter().copied().zip(lens).collect::<Vec<_>>())?;
    let t = Tensor::ones((14, 1, 2), DType::F32, &DEV)?;
    pool.write(0, &step, &t, &t)?;
    pool.commit(&step)?;
    let want: usize = lens.iter().map(|l| l.div_ceil(4)).sum();
    assert_eq!(pool.used_blocks(), want);
    assert_eq!(pool.memory_bytes(), want * per_block);
    let freed = pool.block_table(ids[2])?.to_vec();
    pool.release(ids[2])?;
    assert!(pool.release(ids[2]).is_err(), "released twice");
    let d = pool.add_sequence();
    append(&mut pool, d, &[1.; 8])?;
    let mut got = pool.block_table(d)?.to_vec();
    got.sort();
    let mut freed = freed;
    freed.sort();
    assert_eq!(got, freed, "the freed blocks are the ones reused");
    Ok(())
}

#[test]
fn exhaustion_is_an_error_and_leaves_the_pool_usable() -> Result<()> {
    let mut pool = small_pool(4, 4);
    let (a, b) = (pool.add_sequence(), pool.add_sequence());
    append(&mut pool, a, &[1.; 10])?;
    assert_eq!(pool.free_blocks(), 1);
    let err = pool.begin_step(&[(a, 1), (b, 8)]).unwrap_err().to_string();
    assert!(
        err.contains("exhausted") && err.contains("needs 2 blocks, 1 of 4 are free"),
        "{err}"
    );
    assert_eq!(
        (pool.free_blocks(), pool.seq_len(a)?, pool.seq_len(b)?),
        (1, 10, 0)
    );
    assert!(pool.block_table(b)?.is_empty(), "nothing allocated for b");
    // A fork's copy on write needs a block too.
    let c = pool.fork(a)?;
    append(&mut pool, b, &[2.; 4])?;
    let err = pool.begin_step(&[(c, 1)]).unwrap_err().to_string();
    assert!(err.contains("exhausted"), "{err}");
    assert!(
        pool.fork_prefix(a, 5).is_err(),
        "the prefix copy finds no block"
    );
    // Releasing makes room; the pool still works and holds the right keys.
    pool.release(b)?;
    append(&mut pool, c, &[3.])?;
    assert_eq!(keys(&mut pool, c)?.len(), 11);
    assert_eq!(keys(&mut pool, a)?, vec![1.; 10]);
    Ok(())
}

#[test]
fn sequences_writing_one_shared_block_copy_it_once_each_but_the_last() -> Result<()> {
    let mut pool = small_pool(4, 2);
    let b = pool.add_sequence();
    append(&mut pool, b, &[2.; 3])?;
    let (e, f) = (pool.fork(b)?, pool.fork(b)?);
    assert_eq!(
        (
            pool.free_blocks(),
            pool.block_refs(pool.block_table(b)?[0])?
        ),
        (1, 3)
    );
    // Three holders write: two copies.
    let err = pool
        .begin_step(&[(b, 1), (e, 1), (f, 1)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs 2 blocks, 1 of 2 are free"), "{err}");
    // Two holders, both writing: one copy, the second writer then holds it alone.
    pool.release(f)?;
    let step = pool.begin_step(&[(b, 1), (e, 1)])?;
    assert_eq!(pool.free_blocks(), 0);
    let t = Tensor::from_vec(vec![5f32, 5., 6., 6.], (2, 1, 2), &DEV)?;
    pool.write(0, &step, &t, &t)?;
    pool.commit(&step)?;
    assert_eq!(keys(&mut pool, b)?, [2., 2., 2., 5.]);
    assert_eq!(keys(&mut pool, e)?, [2., 2., 2., 6.]);
    Ok(())
}

#[test]
fn stale_steps_and_bad_steps_are_refused() -> Result<()> {
    let mut pool = small_pool(4, 4);
    let a = pool.add_sequence();
    let step = pool.begin_step(&[(a, 2)])?;
    let _b = pool.add_sequence();
    let t = Tensor::ones((2, 1, 2), DType::F32, &DEV)?;
    let err = pool.write(0, &step, &t, &t).unwrap_err().to_string();
    assert!(err.contains("changed since this step began"), "{err}");
    assert!(pool.commit(&step).is_err());
    assert!(pool.begin_step(&[(a, 1), (a, 1)]).is_err(), "duplicate");
    assert!(pool.begin_step(&[(a, usize::MAX)]).is_err(), "overflow");
    let step = pool.begin_step(&[(a, 2)])?;
    assert!(pool.write(1, &step, &t, &t).is_err(), "no layer 1");
    let bad = Tensor::ones((3, 1, 2), DType::F32, &DEV)?;
    assert!(pool.write(0, &step, &bad, &bad).is_err(), "wrong row count");
    let half = t.to_dtype(DType::BF16)?;
    assert!(pool.write(0, &step, &half, &half).is_err(), "wrong dtype");
    let cfg = PagedPoolConfig::new(1, 1, 2, 4, 4, DType::F32).with_format(KvFormat::Int8);
    let err = PagedKvPool::new(cfg, &DEV).unwrap_err().to_string();
    assert!(err.contains("not supported"), "{err}");
    assert!(PagedKvPool::new(PagedPoolConfig::new(1, 1, 2, 0, 4, DType::F32), &DEV).is_err());
    Ok(())
}

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

/// Random rows.
fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.normal_vec(n), dims, &DEV)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
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

/// A module, its rope, and one token stream per sequence.
struct Setup {
    mha: MultiHeadAttention,
    rope: Rope,
    e: usize,
    hkv: usize,
    d: usize,
}

fn setup(dtype: DType) -> Result<Setup> {
    let (e, h, hkv) = (32, 4, 2);
    let vm = VarMap::new();
    let cfg = MhaConfig::new(e, h)
        .with_num_kv_heads(hkv)
        .with_batch_first(true);
    let mha = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, dtype, &DEV))?.inference();
    let d = e / h;
    let rope = Rope::from_theta(10_000.0, d, 512, RopeStyle::HalfSplit, dtype, &DEV)?;
    Ok(Setup {
        mha,
        rope,
        e,
        hkv,
        d,
    })
}

#[test]
fn attend_paged_equals_dense_kv_cache_over_random_mixes() -> Result<()> {
    let mut rng = Rng(0xca11_ab1e);
    for iter in 0..24 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let s = setup(dtype)?;
        let odd = 3 + rng.below(6);
        let bs = rng.pick(&[1, 16, 32, odd]);
        let window = (iter % 4 == 3).then(|| 4 + rng.below(20));
        let n = 1 + rng.below(6);
        // Per sequence: its tokens, its prompt length, the step it arrives at.
        let streams: Vec<Tensor> = (0..n)
            .map(|_| {
                let len = 1 + rng.below(50);
                randn(&mut rng, &[len, s.e], dtype)
            })
            .collect();
        let prompts: Vec<usize> = streams
            .iter()
            .map(|t| 1 + rng.below(t.dim(0).unwrap()))
            .collect();
        let arrive: Vec<usize> = (0..n).map(|_| rng.below(6)).collect();
        // Chunks per sequence: the prompt, then mostly single tokens and some chunks of 2 to 4
        // (chunked prefill, speculative tokens).
        let chunks: Vec<Vec<usize>> = streams
            .iter()
            .zip(&prompts)
            .map(|(x, &p)| {
                let mut c = vec![p];
                let mut at = p;
                while at < x.dim(0).unwrap() {
                    let len = if rng.below(4) == 0 {
                        2 + rng.below(3)
                    } else {
                        1
                    };
                    let len = len.min(x.dim(0).unwrap() - at);
                    c.push(len);
                    at += len;
                }
                c
            })
            .collect();
        // Dense: each sequence alone, in the same chunks.
        let mut want = Vec::new();
        for (x, c) in streams.iter().zip(&chunks) {
            let mut cache = KvCache::new();
            let mut outs = Vec::new();
            let mut at = 0;
            for &len in c {
                let mut input =
                    MhaInput::new(x.narrow(0, at, len)?.unsqueeze(0)?).rope(s.rope.clone());
                if let Some(w) = window {
                    input = input.sliding_window(w);
                }
                outs.push(s.mha.attend_cached(&input, &mut cache)?.output.squeeze(0)?);
                at += len;
            }
            want.push(Tensor::cat(&outs, 0)?);
        }
        // Paged: every step, the arrived sequences bring their prompt or their next token.
        let mut cfg = PagedPoolConfig::new(1, s.hkv, s.d, bs, 0, dtype);
        cfg.num_blocks = streams
            .iter()
            .map(|x| x.dim(0).unwrap().div_ceil(bs))
            .sum::<usize>()
            + 1;
        if let Some(w) = window {
            cfg = cfg.with_sliding_window(w);
        }
        let mut pool = PagedKvPool::new(cfg, &DEV)?;
        let ids: Vec<SeqId> = (0..n).map(|_| pool.add_sequence()).collect();
        let mut done = vec![0usize; n];
        let mut next_chunk = vec![0usize; n];
        let mut got: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        let mut t = 0;
        while (0..n).any(|b| done[b] < streams[b].dim(0).unwrap()) {
            let mut batch = Vec::new();
            let mut rows = Vec::new();
            for b in 0..n {
                let total = streams[b].dim(0)?;
                if arrive[b] > t || done[b] == total {
                    continue;
                }
                let len = chunks[b][next_chunk[b]];
                next_chunk[b] += 1;
                batch.push((ids[b], len));
                rows.push(streams[b].narrow(0, done[b], len)?);
            }
            t += 1;
            if batch.is_empty() {
                continue;
            }
            let step = pool.begin_step(&batch)?;
            let mut input = MhaInput::new(Tensor::cat(&rows, 0)?).rope(s.rope.clone());
            if let Some(w) = window {
                input = input.sliding_window(w);
            } else {
                input = input.mask_plan(s.mha.mask_plan_paged(&step)?);
            }
            let out = s.mha.attend_paged(&input, &mut pool, 0, &step)?.output;
            pool.commit(&step)?;
            for (i, &(id, len)) in batch.iter().enumerate() {
                let b = ids.iter().position(|&x| x == id).unwrap();
                got[b].push(out.narrow(0, step.cu_q().range(i).start, len)?);
                done[b] += len;
            }
        }
        let (atol, rtol) = tolerances(dtype);
        for b in 0..n {
            let g = Tensor::cat(&got[b], 0)?;
            check_close(
                &g,
                &want[b],
                atol * 2.0,
                rtol * 2.0,
                &format!("iter {iter} seq {b} bs {bs} window {window:?} {dtype:?}"),
            );
            if window.is_none() {
                assert_eq!(
                    pool.block_table(ids[b])?.len(),
                    streams[b].dim(0)?.div_ceil(bs)
                );
            }
        }
        if let Some(w) = window {
            // Blocks out of the window were released: a sequence whose last step was a decode
            // keeps at most ⌈(w + bs) / bs⌉ + 1 blocks.
            for (b, &id) in ids.iter().enumerate() {
                if chunks[b].last() == Some(&1) && chunks[b].len() > 1 {
                    assert!(pool.block_table(id)?.len() <= (w + bs).div_ceil(bs) + 1);
                }
            }
        }
        for id in ids {
            pool.release(id)?;
        }
        assert_eq!(pool.used_blocks(), 0);
    }
    Ok(())
}

#[test]
fn attend_paged_refuses_what_it_cannot_do() -> Result<()> {
    let s = setup(DType::F32)?;
    let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, s.hkv, s.d, 4, 8, DType::F32), &DEV)?;
    let a = pool.add_sequence();
    let step = pool.begin_step(&[(a, 3)])?;
    let x = Tensor::zeros((3, s.e), DType::F32, &DEV)?;
    let bad = |input: MhaInput, pool: &mut PagedKvPool| {
        s.mha
            .attend_paged(&input, pool, 0, &step)
            .unwrap_err()
            .to_string()
    };
    let e = bad(MhaInput::new(x.narrow(0, 0, 2)?), &mut pool);
    assert!(e.contains("(total_q, embed_dim) = (3, 32)"), "{e}");
    let e = bad(
        MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft),
        &mut pool,
    );
    assert!(e.contains("BottomRight"), "{e}");
    let e = bad(MhaInput::new(x.clone()).left_padding(&[1]), &mut pool);
    assert!(e.contains("left_padding"), "{e}");
    let mut other = PagedKvPool::new(PagedPoolConfig::new(1, 1, s.d, 4, 8, DType::F32), &DEV)?;
    let e = s
        .mha
        .attend_paged(&MhaInput::new(x.clone()), &mut other, 0, &step)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the pool stores"), "{e}");
    let mut windowed = PagedKvPool::new(
        PagedPoolConfig::new(1, s.hkv, s.d, 4, 8, DType::F32).with_sliding_window(8),
        &DEV,
    )?;
    let w = windowed.add_sequence();
    let wstep = windowed.begin_step(&[(w, 3)])?;
    let e = s
        .mha
        .attend_paged(&MhaInput::new(x), &mut windowed, 0, &wstep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sliding window of 8"), "{e}");
    Ok(())
}

/// Sequences forked (whole, or a prefix) while others run: each continues with its own tokens,
/// and every output equals a dense `KvCache` cloned (and truncated) at the same point.
#[test]
fn forks_and_prefixes_equal_cloned_dense_caches() -> Result<()> {
    let mut rng = Rng(0xf04c_5eed);
    let mut total_forks = 0;
    for iter in 0..12 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let s = setup(dtype)?;
        let odd = 2 + rng.below(6);
        let bs = rng.pick(&[1, 16, odd]);
        let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, s.hkv, s.d, bs, 400, dtype), &DEV)?;
        // (paged sequence, dense cache, prompt length, decode steps left).
        let mut live: Vec<(SeqId, KvCache, usize, usize)> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let prompt = 1 + rng.below(40);
            live.push((
                pool.add_sequence(),
                KvCache::new(),
                prompt,
                1 + rng.below(8),
            ));
        }
        let (atol, rtol) = tolerances(dtype);
        for step_no in 0..12 {
            // Fork a running sequence, whole or a prefix of it.
            if step_no > 0 && rng.below(2) == 0 {
                let p = rng.below(live.len());
                let (pid, pcache) = (live[p].0, live[p].1.clone());
                let len = pool.seq_len(pid)?;
                if len > 0 {
                    let (id, cache) = if rng.below(2) == 0 {
                        (pool.fork(pid)?, pcache)
                    } else {
                        let n = 1 + rng.below(len);
                        let mut c = pcache;
                        c.truncate(n)?;
                        (pool.fork_prefix(pid, n)?, c)
                    };
                    live.push((id, cache, 0, 1 + rng.below(8)));
                }
            }
            let mut batch = Vec::new();
            let mut rows = Vec::new();
            for (id, cache, prompt, left) in &live {
                if *left == 0 {
                    continue;
                }
                let n = if cache.is_empty() { *prompt } else { 1 };
                batch.push((*id, n));
                rows.push(randn(&mut rng, &[n, s.e], dtype));
            }
            if batch.is_empty() {
                break;
            }
            let step = pool.begin_step(&batch)?;
            let input = MhaInput::new(Tensor::cat(&rows, 0)?).rope(s.rope.clone());
            let out = s.mha.attend_paged(&input, &mut pool, 0, &step)?.output;
            pool.commit(&step)?;
            for (i, &(id, n)) in batch.iter().enumerate() {
                let (_, cache, _, left) = live.iter_mut().find(|l| l.0 == id).unwrap();
                let x = MhaInput::new(rows[i].unsqueeze(0)?).rope(s.rope.clone());
                let want = s.mha.attend_cached(&x, cache)?.output.squeeze(0)?;
                let got = out.narrow(0, step.cu_q().range(i).start, n)?;
                let what = format!(
                    "iter {iter} step {step_no} seq {} bs {bs} {dtype:?}",
                    id.as_u64()
                );
                check_close(&got, &want, atol * 2.0, rtol * 2.0, &what);
                if cache.len() > n {
                    *left -= 1; // a decode step (the prefill is not counted)
                }
                assert_eq!(pool.seq_len(id)?, cache.len());
            }
        }
        let forks = live.len();
        for (id, _, _, _) in live {
            pool.release(id)?;
        }
        assert_eq!(pool.used_blocks(), 0);
        total_forks += forks;
    }
    assert!(total_forks > 30, "{total_forks} sequences");
    Ok(())
}

/// Random, mostly invalid calls (block ids past the pool, lengths past the tables, counts that
/// disagree, new tokens past the keys): a result or an error, never a panic, and every call that
/// passes equals `sdpa_varlen` on the gathered keys.
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
                check_close(&out.output, &want, 0.0, 0.0, "a valid random call");
            }
            Err(_) => err += 1,
        }
    }
    assert!(ok >= 10 && err >= 100, "{ok} valid, {err} refused");
    Ok(())
}
