//! Key/value caches for incremental decoding and for cross-attention.
//!
//! - [`KvCache`]: self-attention cache, owned by the caller (one per layer), filled by
//!   [`MultiHeadAttention::attend_cached`](crate::MultiHeadAttention::attend_cached). It stores the
//!   projected (and [positionally hooked](crate::rope)) keys and values `(B, S, Hkv, D)` (the layout
//!   the kernels read in place), never the queries. Storage grows in chunks: a preallocated buffer receives each step's keys with
//!   `slice_set`, and is reallocated (one copy) only when full, to the next multiple of
//!   [`KvCache::chunk`] positions, so decoding copies only the new token per step.
//! - [`StaticKv`]: the keys and values of a fixed memory (an encoder output), projected once
//!   ([`MultiHeadAttention::static_kv`](crate::MultiHeadAttention::static_kv)) and reused by every
//!   decoder step ([`MultiHeadAttention::attend_static`](crate::MultiHeadAttention::attend_static)):
//!   Whisper / T5 / BART cross-attention.
//!
//! ## Batches of different lengths
//!
//! Sequences of a batch are **left-padded** (right-aligned), as Hugging Face generates: the
//! prefill input of sequence `b` starts with `pad[b]` padding rows, given once with
//! [`MhaInput::left_padding`](crate::MhaInput::left_padding) on the first call into an empty
//! cache. The cache records `pad` and from then on masks the keys of those slots in every call
//! and numbers positions per sequence: slot `j` of sequence `b` is position `j - pad[b]` (what
//! the RoPE hook and the sliding window see). All sequences then advance in lock-step (one new
//! row each per decode step), so the bottom-right causal alignment is shared.
//!
//! Query rows that are padding see no key at all: with the default
//! [`MaskedRowPolicy::Zero`](crate::MaskedRowPolicy::Zero) they produce zeros, and they must not
//! produce NaN (a NaN key would poison every query through `0 · NaN`), so decoding with left
//! padding needs `MaskedRowPolicy::Zero`.

use candle_core::{bail, Result, Tensor};

/// The default growth step of a [`KvCache`], in positions.
pub const DEFAULT_CHUNK: usize = 256;

/// A caller-owned self-attention key/value cache for one attention layer. See the
/// [module docs](self).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_mha::{CausalAlignment, KvCache, MhaConfig, MhaInput, MultiHeadAttention};
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let mha = MultiHeadAttention::new(MhaConfig::new(8, 2).with_batch_first(true), vb)?;
/// let mut cache = KvCache::new();
/// let prompt = Tensor::randn(0f32, 1., (1, 5, 8), &Device::Cpu)?;
/// let out = mha.attend_cached(&MhaInput::new(prompt), &mut cache)?; // prefill
/// assert_eq!(cache.len(), 5);
/// let next = Tensor::randn(0f32, 1., (1, 1, 8), &Device::Cpu)?;
/// let out = mha.attend_cached(&MhaInput::new(next), &mut cache)?; // one decode step
/// assert_eq!((cache.len(), out.output.dims()), (6, &[1, 1, 8][..]));
/// cache.truncate(5)?; // drop the last position (e.g. a rejected speculative token)
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    chunk: usize,
    left_padding: Option<Vec<usize>>,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

impl KvCache {
    /// An empty cache growing by [`DEFAULT_CHUNK`] positions.
    pub fn new() -> Self {
        Self::with_chunk(DEFAULT_CHUNK)
    }

    /// An empty cache that grows by `chunk` positions (at least 1) whenever it is full. With
    /// `chunk` = the maximum sequence length the buffer is allocated once.
    pub fn with_chunk(chunk: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            chunk: chunk.max(1),
            left_padding: None,
        }
    }

    /// Number of cached positions (slots, padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The growth step in positions.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Allocated positions (`>= len`).
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    /// The batch size of the cached keys (`None` when nothing was ever cached).
    pub fn batch_size(&self) -> Option<usize> {
        self.k.as_ref().map(|k| k.dims()[0])
    }

    /// Left padding per sequence recorded at prefill (`None`: no padding).
    pub fn left_padding(&self) -> Option<&[usize]> {
        self.left_padding.as_deref()
    }

    /// Forgets everything cached (and the left padding); keeps the allocation for reuse with
    /// the same batch size.
    pub fn reset(&mut self) {
        self.len = 0;
        self.left_padding = None;
    }

    /// Keeps the first `n` positions (`n <= len`), e.g. to rewind to a shared prefix or drop
    /// rejected speculative tokens. The allocation is kept.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n > self.len {
            bail!(
                "KvCache::truncate({n}): the cache holds only {} positions",
                self.len
            )
        }
        self.len = n;
        if n == 0 {
            self.left_padding = None;
        }
        Ok(())
    }

    /// The cached keys and values `(B, len, Hkv, D)` (views into the buffer), `None` if empty.
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if self.len > 0 => {
                Ok(Some((k.narrow(1, 0, self.len)?, v.narrow(1, 0, self.len)?)))
            }
            _ => Ok(None),
        }
    }

    pub(crate) fn set_left_padding(&mut self, pad: Option<Vec<usize>>) {
        self.left_padding = pad;
    }

    /// Appends `k` `(B, L, Hkv, D)` and `v` `(B, L, Hkv, Dv)` and returns all cached keys and
    /// values including them (views of length `len + L`).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l, hkv, d) = k.dims4()?;
        let (bv, lv, hv, dv) = v.dims4()?;
        if (bv, hv, lv) != (b, hkv, l) {
            bail!(
                "KvCache::append: keys {:?} and values {:?} disagree",
                k.dims(),
                v.dims()
            )
        }
        if let (Some(ck), Some(cv)) = (&self.k, &self.v) {
            let (cb, _, ch, cd) = ck.dims4()?;
            let cdv = cv.dims()[3];
            let compatible = (cb, ch, cd, cdv) == (b, hkv, d, dv)
                && ck.dtype() == k.dtype()
                && ck.device().same_device(k.device());
            if !compatible && self.len > 0 {
                bail!(
                    "KvCache::append: the cache holds (B, Hkv, D) = ({cb}, {ch}, {cd}) {:?} keys, got {:?} {:?} (reset the cache to change batch size or model)",
                    ck.dtype(),
                    k.dims(),
                    k.dtype()
                )
            }
            if !compatible {
                self.k = None;
                self.v = None;
            }
        }
        let needed = self.len + l;
        if needed > self.capacity() {
            let cap = needed.div_ceil(self.chunk) * self.chunk;
            let nk = Tensor::zeros((b, cap, hkv, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, cap, hkv, dv), v.dtype(), v.device())?;
            if let Some((ok, ov)) = self.kv()? {
                nk.slice_set(&ok.contiguous()?, 1, 0)?;
                nv.slice_set(&ov.contiguous()?, 1, 0)?;
            }
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (ck, cv) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = needed;
        Ok(self.kv()?.expect("non-empty after append"))
    }
}

/// Keys and values of a fixed memory (encoder output), projected once for cross-attention:
/// `(B, S, Hkv, D)` each, already split into heads. Built by
/// [`MultiHeadAttention::static_kv`](crate::MultiHeadAttention::static_kv).
#[derive(Debug, Clone)]
pub struct StaticKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

impl StaticKv {
    /// Keys `(B, S, Hkv, D)`.
    pub fn keys(&self) -> &Tensor {
        &self.k
    }

    /// Values `(B, S, Hkv, Dv)`.
    pub fn values(&self) -> &Tensor {
        &self.v
    }

    /// Memory length S.
    pub fn len(&self) -> usize {
        self.k.dims()[1]
    }

    /// Batch size B.
    pub fn batch_size(&self) -> usize {
        self.k.dims()[0]
    }

    /// Whether the memory is empty (never, for one built by `static_kv`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
