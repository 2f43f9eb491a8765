//! The paged KV pool (`cache::PagedKvPool`), `kernels::paged::paged_attention` and
//! `MultiHeadAttention::attend_paged`: fork, prefix sharing, copy on write, release and reuse,
//! exhaustion, bad input, and paged == dense over random sequence mixes.
//!
//! Files: this one (shared helpers), `pool.rs` (the pool's bookkeeping), `attention.rs`
//! (`paged_attention` against `sdpa_varlen`, bad input), `module.rs` (`attend_paged` against
//! `attend_cached` with a dense `KvCache`).

#[path = "../support/mod.rs"]
mod support;

mod attention;
mod module;
mod pool;

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::cache::{PagedKvPool, PagedPoolConfig, SeqId};
use candle_mha::kernels::paged::gather;
use support::Rng;

const DEV: Device = Device::Cpu;

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

/// Random rows.
fn randn(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.normal_vec(n), dims, &DEV)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}
