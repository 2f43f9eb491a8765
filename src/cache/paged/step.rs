//! A batched step over a [`PagedKvPool`]: allocation for the new tokens, per-layer writes and
//! reads, commit.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{bail, Result, Tensor};

use super::{PagedKvPool, SeqId};
use crate::cache::quant::quantize;
use crate::kernels::paged::PagedKv;
use crate::sdpa::SeqOffsets;

/// One step of a batch of sequences over a [`PagedKvPool`], from
/// [`PagedKvPool::begin_step`]: which sequences, how many new tokens each (packed in that
/// order), where their keys go and which blocks the attention reads.
#[derive(Debug, Clone)]
pub struct PagedStep {
    seqs: Vec<SeqId>,
    /// Positions cached before the step, per sequence.
    past: Vec<usize>,
    cu_q: SeqOffsets,
    /// Absolute position of every new token.
    positions: Vec<usize>,
    /// Live blocks per sequence, covering `past + new` positions (minus the dropped ones).
    tables: Vec<Vec<u32>>,
    /// Keys per sequence in `tables` (cached + new, minus the released leading blocks).
    kv_lens: Vec<usize>,
    cu_k: SeqOffsets,
    /// Writes: (first packed row, first pool row, rows), each within one block.
    writes: Vec<(usize, usize, usize)>,
    /// The pool epoch this step belongs to.
    epoch: u64,
}

impl PagedStep {
    /// The sequences, in packing order.
    pub fn seqs(&self) -> &[SeqId] {
        &self.seqs
    }

    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Offsets of each sequence's new tokens in the packed batch (`cu_seqlens_q`).
    pub fn cu_q(&self) -> &SeqOffsets {
        &self.cu_q
    }

    /// New tokens of all sequences.
    pub fn total_q(&self) -> usize {
        self.cu_q.total()
    }

    /// Positions cached before this step, per sequence.
    pub fn past_lens(&self) -> &[usize] {
        &self.past
    }

    /// The absolute position of every new token (its sequence's cached length + its index):
    /// the RoPE positions.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// The blocks the attention reads, per sequence (live blocks only).
    pub fn tables(&self) -> &[Vec<u32>] {
        &self.tables
    }

    /// Keys the attention reads per sequence (`seq_lens` of the paged read).
    pub fn kv_lens(&self) -> &[usize] {
        &self.kv_lens
    }

    /// Offsets of each sequence's keys once gathered (`cu_seqlens_k`).
    pub fn cu_k(&self) -> &SeqOffsets {
        &self.cu_k
    }

    /// The row of `step`'s packed batch holding the last new token of each sequence (`None`
    /// for a sequence without new tokens).
    pub fn last_rows(&self) -> Vec<Option<usize>> {
        (0..self.num_seqs())
            .map(|b| {
                let r = self.cu_q.range(b);
                (!r.is_empty()).then(|| r.end - 1)
            })
            .collect()
    }
}

impl PagedKvPool {
    /// Starts a step: `batch` lists sequences (each at most once) and how many new tokens each
    /// brings (a prompt, or 1 when decoding), in the order they are packed. Releases the blocks
    /// that fell out of the sliding window, copies shared, partly filled last blocks that will
    /// be written (copy on write) and allocates the blocks the new tokens need.
    ///
    /// All or nothing: when the pool lacks blocks the error says how many are needed and free,
    /// and no block is allocated (blocks released by the window stay released).
    pub fn begin_step(&mut self, batch: &[(SeqId, usize)]) -> Result<PagedStep> {
        let bs = self.cfg.block_size;
        let mut seen = BTreeSet::new();
        for &(id, n) in batch {
            let len = self.seq(id)?.len;
            if len.checked_add(n).is_none_or(|end| end > u32::MAX as usize) {
                bail!(
                    "PagedKvPool::begin_step: sequence {} has {len} positions, {n} more is too many",
                    id.0
                )
            }
            if !seen.insert(id) {
                bail!(
                    "PagedKvPool::begin_step: sequence {} appears twice in the batch",
                    id.0
                )
            }
        }
        // Blocks entirely before the window of the step's first query (position len) are never
        // read again.
        if let Some(w) = self.cfg.sliding_window {
            for &(id, _) in batch {
                let seq = self.seqs.get_mut(&id).expect("checked above");
                let keep_from = (seq.len + 1).saturating_sub(w);
                let dead = (keep_from / bs).saturating_sub(seq.dropped);
                let dead = dead.min(seq.blocks.len());
                for b in seq.blocks.drain(..dead) {
                    self.blocks.release(b);
                }
                seq.dropped += dead;
                if dead > 0 {
                    self.epoch += 1;
                }
            }
        }
        // What the batch needs: new blocks, plus a copy of each shared, partly filled last block
        // that will be written.
        let mut needed = 0;
        // Shared blocks to be written: how many of the batch's sequences write each one.
        let mut writers: BTreeMap<u32, usize> = BTreeMap::new();
        for &(id, n) in batch {
            let seq = self.seq(id)?;
            let have = seq.dropped + seq.blocks.len();
            needed += (seq.len + n).div_ceil(bs).saturating_sub(have);
            if n > 0 {
                if let Some(b) = self.cow_block(id)? {
                    *writers.entry(b).or_default() += 1;
                }
            }
        }
        // A block held by r sequences, m of which write it: m copies, or r - 1 when all of
        // them write (the last one then holds it alone and writes in place).
        for (&b, &m) in &writers {
            let r = self.blocks.refs(b).unwrap_or(0) as usize;
            needed += m.min(r.saturating_sub(1));
        }
        if needed > self.blocks.available() {
            let new: usize = batch.iter().map(|&(_, n)| n).sum();
            bail!(
                "PagedKvPool: pool exhausted: the step ({} sequences, {new} new tokens) needs {needed} blocks, {} of {} are free (release finished sequences, or admit fewer)",
                batch.len(),
                self.blocks.available(),
                self.cfg.num_blocks
            )
        }
        for &(id, n) in batch {
            if n > 0 {
                if let Some(shared) = self.cow_block(id)? {
                    let copy = self.copy_block(shared)?;
                    self.blocks.release(shared);
                    let seq = self.seqs.get_mut(&id).expect("checked above");
                    *seq.blocks.last_mut().expect("a shared last block") = copy;
                }
            }
            let seq = self.seqs.get_mut(&id).expect("checked above");
            while seq.dropped + seq.blocks.len() < (seq.len + n).div_ceil(bs) {
                let b = self.blocks.alloc().expect("counted above");
                seq.blocks.push(b);
            }
        }
        self.epoch += 1;
        // The step's view: packed rows, positions, tables and writes.
        let (mut seqs, mut past, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        let (mut positions, mut tables, mut kv_lens) = (Vec::new(), Vec::new(), Vec::new());
        let mut writes = Vec::new();
        let mut row = 0;
        for &(id, n) in batch {
            let seq = self.seq(id)?;
            seqs.push(id);
            past.push(seq.len);
            lens.push(n);
            positions.extend(seq.len..seq.len + n);
            tables.push(seq.blocks.clone());
            kv_lens.push(seq.len + n - seq.dropped * bs);
            let mut pos = seq.len;
            while pos < seq.len + n {
                let rows = (bs - pos % bs).min(seq.len + n - pos);
                let block = seq.blocks[pos / bs - seq.dropped] as usize;
                writes.push((row, block * bs + pos % bs, rows));
                row += rows;
                pos += rows;
            }
        }
        Ok(PagedStep {
            seqs,
            past,
            cu_q: SeqOffsets::from_lengths(&lens),
            positions,
            tables,
            cu_k: SeqOffsets::from_lengths(&kv_lens),
            kv_lens,
            writes,
            epoch: self.epoch,
        })
    }

    /// The last block of `id` when a write would have to copy it first: partly filled and held
    /// by another sequence too.
    fn cow_block(&self, id: SeqId) -> Result<Option<u32>> {
        let seq = self.seq(id)?;
        let bs = self.cfg.block_size;
        if seq.len % bs == 0 || seq.dropped * bs >= seq.len {
            return Ok(None);
        }
        let last = seq.blocks[(seq.len - 1) / bs - seq.dropped];
        Ok((self.blocks.refs(last).unwrap_or(0) > 1).then_some(last))
    }

    fn check_step(&self, what: &str, step: &PagedStep) -> Result<()> {
        if step.epoch != self.epoch {
            bail!("PagedKvPool::{what}: the pool changed since this step began (sequences added, forked, released or another step begun): begin the step again")
        }
        Ok(())
    }

    /// Writes the new keys `k` `(total_q, Hkv, D)` and values `v` `(total_q, Hkv, Dv)` of
    /// `step` (packed in the step's order) into layer `layer`'s blocks, in place.
    pub fn write(&self, layer: usize, step: &PagedStep, k: &Tensor, v: &Tensor) -> Result<()> {
        self.check_step("write", step)?;
        let blocks = self.layer_blocks(layer)?;
        let cfg = &self.cfg;
        let t = step.total_q();
        let scales = match &blocks.scales {
            Some((ks, vs)) => [Some(ks), Some(vs)],
            None => [None, None],
        };
        let inputs = [
            ("k", k, &blocks.k, scales[0], cfg.head_dim),
            ("v", v, &blocks.v, scales[1], cfg.v_head_dim),
        ];
        for (name, x, pool, scale_pool, d) in inputs {
            if x.dims() != [t, cfg.num_kv_heads, d] {
                bail!(
                    "PagedKvPool::write: {name} must be (total_q, Hkv, D) = ({t}, {}, {d}), got {:?}",
                    cfg.num_kv_heads,
                    x.dims()
                )
            }
            if x.dtype() != cfg.dtype {
                bail!(
                    "PagedKvPool::write: {name} is {:?}, the pool stores {:?}",
                    x.dtype(),
                    cfg.dtype
                )
            }
            if !x.device().same_device(pool.device()) {
                bail!(
                    "PagedKvPool::write: {name} is on {:?}, the pool on {:?}",
                    x.device(),
                    pool.device()
                )
            }
            // What is stored: the rows, or int8 / fp8 rows and their scales.
            let (rows, row_scales) = match scale_pool {
                None => (x.contiguous()?, None),
                Some(_) => {
                    let (q, s) = quantize(&x.unsqueeze(0)?, cfg.format)?;
                    (
                        q.squeeze(0)?.contiguous()?,
                        Some(s.squeeze(0)?.contiguous()?),
                    )
                }
            };
            let (nb, bs, h, d) = pool.dims4()?;
            let flat = pool.reshape((nb * bs, h, d))?;
            let flat_scales = match scale_pool {
                Some(sp) => Some(sp.reshape((nb * bs, h))?),
                None => None,
            };
            for &(row, at, n) in &step.writes {
                flat.slice_set(&rows.narrow(0, row, n)?, 0, at)?;
                if let (Some(fs), Some(rs)) = (&flat_scales, &row_scales) {
                    fs.slice_set(&rs.narrow(0, row, n)?, 0, at)?;
                }
            }
        }
        Ok(())
    }

    internal! {
        /// Layer `layer`'s keys and values of `step`'s sequences, as
        /// [`paged_attention`](crate::kernels::paged::paged_attention) reads them. A native pool
        /// only (a quantized pool is an error: read it through
        /// [`attend_paged`](crate::MultiHeadAttention::attend_paged)).
        fn paged_kv<'a>(&'a self, layer: usize, step: &'a PagedStep) -> Result<PagedKv<'a>> {
            if self.is_quantized() {
                bail!(
                    "PagedKvPool::paged_kv: the pool stores {:?} rows with scales, which a PagedKv does not carry (attend_paged reads a quantized pool)",
                    self.cfg.format
                )
            }
            self.paged_rows(layer, step)
        }
    }

    /// [`Self::paged_kv`] whatever the format: the stored rows (int8 / fp8 for a quantized
    /// pool) without their scales.
    fn paged_rows<'a>(&'a self, layer: usize, step: &'a PagedStep) -> Result<PagedKv<'a>> {
        self.check_step("paged_kv", step)?;
        let (k_pool, v_pool) = self.layer(layer)?;
        Ok(PagedKv {
            k_pool,
            v_pool,
            block_size: self.cfg.block_size,
            tables: &step.tables,
            seq_lens: &step.kv_lens,
        })
    }

    /// Layer `layer`'s rows of `step`'s sequences and, for a quantized pool, their scales.
    pub(crate) fn paged_stored<'a>(
        &'a self,
        layer: usize,
        step: &'a PagedStep,
    ) -> Result<(PagedKv<'a>, Option<(&'a Tensor, &'a Tensor)>)> {
        Ok((self.paged_rows(layer, step)?, self.layer_scales(layer)?))
    }

    /// Ends `step`: every sequence's length now counts its new tokens. Call once every layer
    /// has written them; until then (and if a layer fails) the lengths stay as they were.
    pub fn commit(&mut self, step: &PagedStep) -> Result<()> {
        self.check_step("commit", step)?;
        for (b, &id) in step.seqs.iter().enumerate() {
            let seq = self
                .seqs
                .get_mut(&id)
                .expect("the epoch guards the sequences");
            seq.len = step.past[b] + step.cu_q.range(b).len();
        }
        self.epoch += 1;
        Ok(())
    }
}
