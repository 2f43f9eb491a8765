//! [`PagedPoolConfig`]: the shape and storage format of a [`PagedKvPool`](super::PagedKvPool).

use candle_core::DType;

use crate::cache::KvFormat;

/// The shape of a [`PagedKvPool`](super::PagedKvPool): layers, heads, block size and count, dtype.
///
/// ```
/// use candle_core::DType;
/// use candle_mha::cache::PagedPoolConfig;
/// // 30 layers, 3 KV heads of 64, blocks of 16 positions, as many as fit in 64 MiB.
/// let cfg = PagedPoolConfig::new(30, 3, 64, 16, 0, DType::F32).with_memory_budget(64 << 20);
/// assert_eq!(cfg.bytes_per_block(), 30 * 2 * 16 * 3 * 64 * 4);
/// assert_eq!(cfg.num_blocks, (64 << 20) / cfg.bytes_per_block());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PagedPoolConfig {
    /// Attention layers (each has its own key and value blocks; a block id names the same
    /// block in every layer).
    pub num_layers: usize,
    /// Key/value heads `Hkv`.
    pub num_kv_heads: usize,
    /// Key head size `D`.
    pub head_dim: usize,
    /// Value head size `Dv`.
    pub v_head_dim: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// The dtype of the keys and values stored (the model's).
    pub dtype: DType,
    /// How keys and values are stored: native, int8 or fp8 e4m3 rows with per-row scales.
    pub format: KvFormat,
    /// Keys older than this many positions are never read again (see the
    /// [module docs](super)); `None`: full attention.
    pub sliding_window: Option<usize>,
}

impl PagedPoolConfig {
    /// `num_blocks` blocks of `block_size` positions for `num_layers` layers of `num_kv_heads`
    /// heads of size `head_dim` (values too), in `dtype`, native storage, no window.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: DType,
    ) -> Self {
        Self {
            num_layers,
            num_kv_heads,
            head_dim,
            v_head_dim: head_dim,
            block_size,
            num_blocks,
            dtype,
            format: KvFormat::Native,
            sliding_window: None,
        }
    }

    /// Values of head size `dv` (when it differs from the keys').
    pub fn with_v_head_dim(mut self, dv: usize) -> Self {
        self.v_head_dim = dv;
        self
    }

    /// A sliding window of `w` positions for every layer (see the [module docs](super)).
    pub fn with_sliding_window(mut self, w: usize) -> Self {
        self.sliding_window = Some(w);
        self
    }

    /// The storage format: [`KvFormat::Int8`] or [`KvFormat::Fp8E4M3`] store one byte per value
    /// and one f32 scale per `(position, KV head)` (see the [module docs](super)).
    pub fn with_format(mut self, format: KvFormat) -> Self {
        self.format = format;
        self
    }

    /// As many blocks as fit in `bytes` (keys and values of every layer).
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.num_blocks = bytes / self.bytes_per_block().max(1);
        self
    }

    /// Bytes of one block: its keys and values in every layer (saturating).
    pub fn bytes_per_block(&self) -> usize {
        // Per position and KV head: the key and value rows, and with a quantized format their
        // two f32 scales.
        let row = match self.format {
            KvFormat::Native => self
                .head_dim
                .saturating_add(self.v_head_dim)
                .saturating_mul(self.dtype.size_in_bytes()),
            _ => self
                .head_dim
                .saturating_add(self.v_head_dim)
                .saturating_add(8),
        };
        [self.block_size, self.num_kv_heads, row]
            .into_iter()
            .fold(self.num_layers, usize::saturating_mul)
    }
}
