//! A paged KV cache for serving: a pool of fixed-size blocks per layer shared by many
//! sequences (vLLM's PagedAttention memory layout).
//!
//! - [`PagedKvPool`]: per layer, key and value tensors `(num_blocks, block_size, Hkv, D)`
//!   allocated once ([`PagedPoolConfig`]: a block count or a byte budget), a free list and a
//!   reference count per block, and per sequence ([`SeqId`]) a block table and a length.
//!   A sequence holds `⌈len / block_size⌉` blocks: memory in use is what the sequences hold, not
//!   their maximum length.
//! - Sharing: [`PagedKvPool::fork`] gives a sequence all of another's blocks (reference counts
//!   go up, nothing is copied); [`PagedKvPool::fork_prefix`] starts a sequence from another's
//!   first `n` positions (a shared prompt): the full blocks are shared and the partly filled
//!   one is copied. A sequence that writes into a shared, partly filled last block first copies
//!   it (copy on write), so sequences never see each other's keys.
//! - A step ([`PagedKvPool::begin_step`]): a batch of sequences, each with its own number of
//!   new tokens (prefill of new requests and decode of running ones together); it allocates
//!   the blocks they need (all or nothing: an exhausted pool is an error that names the blocks
//!   needed and free, and changes nothing), then every layer writes its new keys and values in
//!   place and attends over the batch
//!   ([`MultiHeadAttention::attend_paged`](crate::MultiHeadAttention::attend_paged), which
//!   writes through [`PagedKvPool::write`]); [`PagedKvPool::commit`] records the new lengths once
//!   every layer has run (on error, the lengths stay).
//! - [`PagedKvPool::release`] returns a finished sequence's blocks (those no other sequence
//!   holds go back to the free list); [`PagedKvPool::truncate`] drops a sequence's last
//!   positions (rejected speculative tokens).
//! - Sliding window ([`PagedPoolConfig::with_sliding_window`]): at each step, the blocks of a
//!   sequence that lie entirely before its window (no future query can see them) are released
//!   and its table starts later: the sequence's start offset advances by whole blocks. A step
//!   then reads the live blocks only, which leaves the bottom-right causal alignment and the
//!   window unchanged; positions (RoPE) stay absolute ([`PagedStep::positions`]).
//!
//! Storage: the keys' native dtype, or ([`PagedPoolConfig::with_format`]) the int8 / fp8 rows
//! of [`KvCache`](crate::KvCache)'s [quantized storage](crate::cache#quantized-storage) with
//! one f32 scale per `(position, KV head)`, quantized once when written. A quantized pool is
//! read through [`MultiHeadAttention::attend_paged`](crate::MultiHeadAttention::attend_paged)
//! like a native one (the fused CPU kernel reads the int8 / fp8 blocks in place).
//!
//! The pool is `Send + Sync` and takes `&mut self` to change: a server thread owns it (or puts
//! it behind a `Mutex`) and may hand it to another thread.
//!
//! Files: this one (the pool, its sequences), `config.rs` (its shape and storage format),
//! `blocks.rs` (free list and reference counts), `step.rs` (a batched step: allocation,
//! writes, reads, commit).

use std::collections::BTreeMap;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::cache::KvFormat;

mod blocks;
mod config;
mod step;

use blocks::Blocks;
pub use config::PagedPoolConfig;
pub use step::PagedStep;

/// A sequence in a [`PagedKvPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The id as a number (unique within its pool).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The blocks of one layer.
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    pub(super) scales: Option<(Tensor, Tensor)>,
}

impl Layer {
    /// Every tensor of the layer, each with block as its first dimension.
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.k, &self.v]
            .into_iter()
            .chain(self.scales.iter().flat_map(|(a, b)| [a, b]))
    }
}

/// One sequence: its live blocks and length.
#[derive(Debug, Clone)]
pub(super) struct Seq {
    /// Its blocks from block index `dropped` on (position `t` is in `blocks[t / bs - dropped]`).
    pub(super) blocks: Vec<u32>,
    /// Leading blocks released because they fell out of the sliding window.
    pub(super) dropped: usize,
    /// Positions written (committed).
    pub(super) len: usize,
}

/// A pool of key/value blocks for every layer of a model, shared by many sequences. See the
/// [module docs](self).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::cache::{PagedKvPool, PagedPoolConfig};
/// let dev = Device::Cpu;
/// // 1 layer, 2 KV heads of size 8, 8 blocks of 4 positions.
/// let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, 2, 8, 4, 8, DType::F32), &dev)?;
/// let a = pool.add_sequence();
/// // Prefill 6 tokens of `a`.
/// let step = pool.begin_step(&[(a, 6)])?;
/// let kv = Tensor::randn(0f32, 1., (6, 2, 8), &dev)?; // (new tokens, Hkv, D)
/// pool.write(0, &step, &kv, &kv)?;
/// pool.commit(&step)?;
/// assert_eq!((pool.seq_len(a)?, pool.used_blocks()), (6, 2));
/// // `b` shares `a`'s prompt: one block shared, the partly filled one copied.
/// let b = pool.fork_prefix(a, 6)?;
/// assert_eq!(pool.used_blocks(), 3);
/// // Both decode one token in one step.
/// let step = pool.begin_step(&[(a, 1), (b, 1)])?;
/// assert_eq!(step.positions(), &[6, 6]);
/// let kv = Tensor::randn(0f32, 1., (2, 2, 8), &dev)?;
/// pool.write(0, &step, &kv, &kv)?;
/// pool.commit(&step)?;
/// pool.release(a)?;
/// pool.release(b)?;
/// assert_eq!(pool.used_blocks(), 0);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
pub struct PagedKvPool {
    cfg: PagedPoolConfig,
    /// Per layer: keys `(num_blocks, block_size, Hkv, D)` and values `(…, Dv)`, and for a
    /// quantized pool their scales `(num_blocks, block_size, Hkv)`.
    layers: Vec<Layer>,
    blocks: Blocks,
    seqs: BTreeMap<SeqId, Seq>,
    next_id: u64,
    /// Bumped by every change to tables or lengths: a step is valid only in the epoch
    /// `begin_step` left.
    epoch: u64,
}

impl PagedKvPool {
    /// Allocates the pool's blocks (zeros) on `device`. Errors on a zero size.
    pub fn new(cfg: PagedPoolConfig, device: &Device) -> Result<Self> {
        let sizes = [
            ("num_layers", cfg.num_layers),
            ("num_kv_heads", cfg.num_kv_heads),
            ("head_dim", cfg.head_dim),
            ("v_head_dim", cfg.v_head_dim),
            ("block_size", cfg.block_size),
            ("num_blocks", cfg.num_blocks),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, n)| *n == 0) {
            bail!("PagedKvPool: {name} must be > 0 ({cfg:?})")
        }
        if cfg.sliding_window == Some(0) {
            bail!("PagedKvPool: sliding_window must be > 0")
        }
        if cfg.num_blocks.saturating_mul(cfg.block_size) > u32::MAX as usize {
            bail!(
                "PagedKvPool: {} blocks of {} positions: more than 2^32 rows",
                cfg.num_blocks,
                cfg.block_size
            )
        }
        if cfg.num_blocks.saturating_mul(cfg.bytes_per_block()) == usize::MAX {
            bail!(
                "PagedKvPool: {} blocks of {} bytes overflow",
                cfg.num_blocks,
                cfg.bytes_per_block()
            )
        }
        if !cfg.dtype.is_float() {
            bail!(
                "PagedKvPool: dtype must be a float type, got {:?}",
                cfg.dtype
            )
        }
        let (nb, bs, h) = (cfg.num_blocks, cfg.block_size, cfg.num_kv_heads);
        let stored = match cfg.format {
            KvFormat::Native => cfg.dtype,
            KvFormat::Int8 => DType::U8,
            KvFormat::Fp8E4M3 => DType::F8E4M3,
        };
        let layers = (0..cfg.num_layers)
            .map(|_| {
                let scales = match cfg.format {
                    KvFormat::Native => None,
                    _ => Some((
                        Tensor::zeros((nb, bs, h), DType::F32, device)?,
                        Tensor::zeros((nb, bs, h), DType::F32, device)?,
                    )),
                };
                Ok(Layer {
                    k: Tensor::zeros((nb, bs, h, cfg.head_dim), stored, device)?,
                    v: Tensor::zeros((nb, bs, h, cfg.v_head_dim), stored, device)?,
                    scales,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks: Blocks::new(nb),
            cfg,
            layers,
            seqs: BTreeMap::new(),
            next_id: 0,
            epoch: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PagedPoolConfig {
        &self.cfg
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.cfg.num_blocks
    }

    /// Blocks free for allocation.
    pub fn free_blocks(&self) -> usize {
        self.blocks.available()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.blocks.in_use()
    }

    /// Bytes of keys and values in the blocks in use (every layer).
    pub fn memory_bytes(&self) -> usize {
        self.used_blocks() * self.cfg.bytes_per_block()
    }

    /// Bytes allocated for the whole pool.
    pub fn capacity_bytes(&self) -> usize {
        self.cfg
            .num_blocks
            .saturating_mul(self.cfg.bytes_per_block())
    }

    /// The key and value blocks of layer `layer`: `(num_blocks, block_size, Hkv, D)` (for a
    /// quantized pool, the int8 (`U8`, offset by 128) or fp8 rows; [`Self::layer_scales`] has
    /// their scales).
    pub fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let l = self.layer_blocks(layer)?;
        Ok((&l.k, &l.v))
    }

    /// The scales `(num_blocks, block_size, Hkv)` (f32) of a quantized pool's layer `layer`
    /// (`None` for a native pool).
    pub fn layer_scales(&self, layer: usize) -> Result<Option<(&Tensor, &Tensor)>> {
        Ok(self
            .layer_blocks(layer)?
            .scales
            .as_ref()
            .map(|(k, v)| (k, v)))
    }

    /// Whether keys and values are stored quantized (int8 or fp8).
    pub fn is_quantized(&self) -> bool {
        self.cfg.format != KvFormat::Native
    }

    pub(super) fn layer_blocks(&self, layer: usize) -> Result<&Layer> {
        match self.layers.get(layer) {
            Some(l) => Ok(l),
            None => bail!(
                "PagedKvPool: layer {layer} out of range (the pool has {} layers)",
                self.layers.len()
            ),
        }
    }

    /// How many sequences hold `block` (0: free). Errors on an id outside the pool.
    pub fn block_refs(&self, block: u32) -> Result<u32> {
        match self.blocks.refs(block) {
            Some(r) => Ok(r),
            None => bail!(
                "PagedKvPool: block {block} out of range ({} blocks)",
                self.cfg.num_blocks
            ),
        }
    }

    /// Sequences in the pool.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Whether the pool holds `id`.
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Positions cached for `id` (committed steps).
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// The live blocks of `id`, in position order (after the blocks released by the sliding
    /// window, [`Self::dropped_blocks`]).
    pub fn block_table(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.blocks)
    }

    /// Leading blocks of `id` released by the sliding window.
    pub fn dropped_blocks(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.dropped)
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                blocks: Vec::new(),
                dropped: 0,
                len: 0,
            },
        );
        self.epoch += 1;
        id
    }

    /// A new sequence holding everything `id` holds (beam search, parallel sampling): every
    /// block is shared (reference counted, nothing copied); whichever writes into a shared,
    /// partly filled block copies it first.
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        let mut seq = self.seq(id)?.clone();
        // Only the blocks holding positions: blocks reserved by a step that never committed
        // stay with `id`.
        let keep = seq
            .len
            .div_ceil(self.cfg.block_size)
            .saturating_sub(seq.dropped);
        seq.blocks.truncate(keep);
        for &b in &seq.blocks {
            self.blocks.retain(b);
        }
        let new = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(new, seq);
        self.epoch += 1;
        Ok(new)
    }

    /// A new sequence starting from the first `n` positions of `id` (a shared prompt): the
    /// blocks those positions fill are shared, a partly filled last one is copied into a new
    /// block. Errors when `n` exceeds `id`'s length, when `id` has released leading blocks
    /// (sliding window) and `n > 0`, and when the copy finds the pool exhausted (nothing
    /// changes then).
    pub fn fork_prefix(&mut self, id: SeqId, n: usize) -> Result<SeqId> {
        let bs = self.cfg.block_size;
        let src = self.seq(id)?.clone();
        if n > src.len {
            bail!(
                "PagedKvPool::fork_prefix: sequence {} has {} positions, asked for {n}",
                id.0,
                src.len
            )
        }
        if n > 0 && src.dropped > 0 {
            bail!(
                "PagedKvPool::fork_prefix: sequence {} released its first {} blocks (sliding window); its prefix is gone",
                id.0,
                src.dropped
            )
        }
        let (full, partial) = (n / bs, n % bs);
        let mut blocks = src.blocks[..full].to_vec();
        if partial > 0 {
            let copy = self.copy_block(src.blocks[full])?;
            blocks.push(copy);
        }
        for &b in &blocks[..full] {
            self.blocks.retain(b);
        }
        let new = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            new,
            Seq {
                blocks,
                dropped: 0,
                len: n,
            },
        );
        self.epoch += 1;
        Ok(new)
    }

    /// Keeps the first `n` positions of `id` (`n <= len`): rejected speculative tokens, a
    /// rewind. Its blocks past position `n` are released; a kept block it shares stays shared
    /// (the next write copies it). Errors when `n` exceeds the length or reaches into blocks
    /// the sliding window released.
    pub fn truncate(&mut self, id: SeqId, n: usize) -> Result<()> {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            bail!("PagedKvPool: no sequence {} in the pool", id.0)
        };
        if n > seq.len || n < seq.dropped * bs {
            bail!(
                "PagedKvPool::truncate({n}): sequence {} holds positions {}..{}",
                id.0,
                seq.dropped * bs,
                seq.len
            )
        }
        let keep = n.div_ceil(bs).saturating_sub(seq.dropped);
        for b in seq.blocks.drain(keep.min(seq.blocks.len())..) {
            self.blocks.release(b);
        }
        seq.len = n;
        self.epoch += 1;
        Ok(())
    }

    /// Removes `id`; its blocks that no other sequence holds go back to the free list.
    pub fn release(&mut self, id: SeqId) -> Result<()> {
        let Some(seq) = self.seqs.remove(&id) else {
            bail!("PagedKvPool: no sequence {} in the pool", id.0)
        };
        for b in seq.blocks {
            self.blocks.release(b);
        }
        self.epoch += 1;
        Ok(())
    }

    pub(super) fn seq(&self, id: SeqId) -> Result<&Seq> {
        match self.seqs.get(&id) {
            Some(s) => Ok(s),
            None => bail!("PagedKvPool: no sequence {} in the pool", id.0),
        }
    }

    /// A new block (one reference) holding a copy of block `src` in every layer. Errors, with
    /// nothing allocated, when the pool is exhausted.
    pub(super) fn copy_block(&mut self, src: u32) -> Result<u32> {
        let Some(dst) = self.blocks.alloc() else {
            bail!(
                "PagedKvPool: pool exhausted: copying a shared block needs 1 free block, 0 of {} are free",
                self.cfg.num_blocks
            )
        };
        let copy = |t: &Tensor| -> Result<()> {
            let rows = t.narrow(0, src as usize, 1)?.copy()?;
            t.slice_set(&rows, 0, dst as usize)
        };
        let res = self
            .layers
            .iter()
            .flat_map(Layer::tensors)
            .try_for_each(copy);
        if let Err(e) = res {
            self.blocks.release(dst);
            return Err(e);
        }
        Ok(dst)
    }
}
