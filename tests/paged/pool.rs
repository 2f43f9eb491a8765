//! The pool's bookkeeping: sharing, copy on write, release, exhaustion, stale steps.

use candle_core::{DType, Result, Tensor};
use candle_mha::cache::{PagedKvPool, PagedPoolConfig, PagedStep, SeqId};
use candle_mha::KvFormat;

use super::{append, keys, small_pool, DEV};

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
fn quantized_pools_count_one_byte_per_value_and_the_scales() -> Result<()> {
    let native = PagedPoolConfig::new(2, 3, 64, 16, 10, DType::BF16);
    assert_eq!(native.bytes_per_block(), 2 * 16 * 3 * 128 * 2);
    for format in [KvFormat::Int8, KvFormat::Fp8E4M3] {
        let cfg = native.clone().with_format(format);
        assert_eq!(cfg.bytes_per_block(), 2 * 16 * 3 * (128 + 8));
        let mut pool = PagedKvPool::new(cfg, &DEV)?;
        assert!(pool.is_quantized() && pool.layer_scales(1)?.is_some());
        let a = pool.add_sequence();
        let step = pool.begin_step(&[(a, 20)])?;
        let x = Tensor::randn(0f32, 1., (20, 3, 64), &DEV)?.to_dtype(DType::BF16)?;
        pool.write(1, &step, &x, &x)?;
        pool.commit(&step)?;
        // A fork's copy on write copies the scales too.
        let b = pool.fork(a)?;
        let step = pool.begin_step(&[(b, 1)])?;
        let scales = pool.layer_scales(1)?.unwrap().0.clone();
        let (old, new) = (pool.block_table(a)?[1], pool.block_table(b)?[1]);
        assert_ne!(old, new);
        let row = |blk: u32| -> Result<Vec<f32>> {
            scales
                .get(blk as usize)?
                .narrow(0, 0, 4)?
                .flatten_all()?
                .to_vec1()
        };
        assert_eq!(row(old)?, row(new)?);
        assert!(row(old)?.iter().all(|&s| s > 0.0));
        let _ = step;
        assert_eq!(pool.memory_bytes(), 3 * pool.config().bytes_per_block());
    }
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
    // A quantized pool is read through attend_paged, not as a PagedKv.
    let cfg = PagedPoolConfig::new(1, 1, 2, 4, 4, DType::F32).with_format(KvFormat::Int8);
    let mut q8 = PagedKvPool::new(cfg, &DEV)?;
    let b = q8.add_sequence();
    let step = q8.begin_step(&[(b, 2)])?;
    q8.write(0, &step, &t, &t)?;
    let err = q8.paged_kv(0, &step).unwrap_err().to_string();
    assert!(err.contains("attend_paged reads a quantized pool"), "{err}");
    assert!(PagedKvPool::new(PagedPoolConfig::new(1, 1, 2, 0, 4, DType::F32), &DEV).is_err());
    Ok(())
}
