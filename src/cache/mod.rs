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
//! - [`PagedKvPool`] ([`mod@paged`]): a paged KV cache for serving: fixed-size blocks shared
//!   by many sequences (block tables, prefix sharing, copy on write, batched steps over
//!   sequences of different lengths).
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
//! ## Clones
//!
//! A clone of a [`KvCache`] is a cache of its own: the clones share their buffers until one of
//! them writes where another still reads (after a clone, or after rewinding with
//! [`KvCache::truncate`] below what a clone holds), which first copies them (copy on write).
//! Appending past every clone's length writes in place, so a decode loop never copies.
//!
//! ## Quantized storage
//!
//! [`KvCache::with_format`]`(`[`KvFormat::Int8`]`)` stores keys and values as int8 with one f32
//! scale per `(position, KV head)` row (`s = max|x| / 127`, quantized once when appended): about
//! half the memory of bf16 and a quarter of f32, and half the bytes a decode step reads.
//! [`KvFormat::Fp8E4M3`] stores fp8 e4m3 values with the same per-row scales (`max|x| / 448`).
//! The fused CPU kernel reads the rows where they are and widens them as it goes; the
//! reference (and a call it cannot serve: tracked by autograd, asking for weights, with
//! `bias_k` / `add_zero_attn`) reads them dequantized. An int8 value is off by at most half its
//! row's scale (0.4% of the row's largest magnitude), an fp8 one by at most 2⁻⁴ of itself (and
//! of the row's smallest normal step); what that does to outputs and to a real model's tokens
//! is measured in `tests/quantized_cache.rs` and the README.
//!
//! Query rows that are padding see no key at all: with the default
//! [`MaskedRowPolicy::Zero`](crate::MaskedRowPolicy::Zero) they produce zeros, and they must not
//! produce NaN (a NaN key would poison every query through `0 · NaN`), so decoding with left
//! padding needs `MaskedRowPolicy::Zero`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Result, Tensor};

pub mod paged;
mod quant;

pub use paged::{PagedKvPool, PagedPoolConfig, PagedStep, SeqId};
use quant::quantize;
pub use quant::KvFormat;
pub(crate) use quant::QuantKv;

internal! {
    /// The default growth step of a [`KvCache`], in positions.
    const DEFAULT_CHUNK: usize = 256;
}

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
#[derive(Debug)]
pub struct KvCache {
    /// The stored keys and values `(B, capacity, Hkv, D | Dv)`: in the inputs' dtype, or int8
    /// offset by 128 (`U8`).
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// The int8 rows' scales `(B, capacity, Hkv)` (f32).
    k_scale: Option<Tensor>,
    v_scale: Option<Tensor>,
    /// The dtype of the keys and values appended (and handed back).
    dtype: Option<DType>,
    format: KvFormat,
    len: usize,
    chunk: usize,
    left_padding: Option<Vec<usize>>,
    /// This instance (a clone gets its own).
    id: u64,
    /// Who may write the buffers in place, shared by the clones that share them.
    owner: Arc<Mutex<Owner>>,
}

/// Copy-on-write state of a cache's buffers: the instance that may write them in place, and how
/// many leading positions a clone still reads (never overwritten in place).
#[derive(Debug)]
struct Owner {
    writer: u64,
    shared: usize,
}

impl Owner {
    fn new(writer: u64) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self { writer, shared: 0 }))
    }
}

/// A fresh instance id.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Clone for KvCache {
    /// An independent cache holding the same positions: it shares the buffers until either cache
    /// writes where the other still reads, which then copies them first (copy on write), so
    /// branches of a beam search, speculative drafts or a reused prefix never see each other's
    /// keys.
    fn clone(&self) -> Self {
        let mut c = self.same_instance();
        let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        owner.shared = owner.shared.max(self.len);
        c.id = next_id();
        c
    }
}

/// The keys and values a cached call attends to.
pub(crate) enum CachedKv {
    Dense(Tensor, Tensor),
    Quant(QuantKv),
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}

impl KvCache {
    /// An empty cache growing by 256 positions at a time (see [`Self::with_chunk`]).
    pub fn new() -> Self {
        Self::with_chunk(DEFAULT_CHUNK)
    }

    /// An empty cache that grows by `chunk` positions (at least 1) whenever it is full. With
    /// `chunk` = the maximum sequence length the buffer is allocated once.
    pub fn with_chunk(chunk: usize) -> Self {
        Self {
            k: None,
            v: None,
            k_scale: None,
            v_scale: None,
            dtype: None,
            format: KvFormat::Native,
            len: 0,
            chunk: chunk.max(1),
            left_padding: None,
            id: 0,
            owner: Owner::new(0),
        }
        .with_new_id()
    }

    fn with_new_id(mut self) -> Self {
        self.id = next_id();
        self.owner = Owner::new(self.id);
        self
    }

    /// The same instance (the same right to write the buffers in place): the pipeline's working
    /// copy of a caller's cache during a step, which replaces it once the step succeeds.
    pub(crate) fn same_instance(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
            k_scale: self.k_scale.clone(),
            v_scale: self.v_scale.clone(),
            dtype: self.dtype,
            format: self.format,
            len: self.len,
            chunk: self.chunk,
            left_padding: self.left_padding.clone(),
            id: self.id,
            owner: self.owner.clone(),
        }
    }

    /// Whether this instance may write position `at` of its buffers in place (no clone reads it).
    fn writes_in_place(&self, at: usize) -> bool {
        let owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        owner.writer == self.id && at >= owner.shared
    }

    /// The same (empty) cache storing its keys and values in `format` (see the
    /// [module docs](self#quantized-storage)).
    ///
    /// ```
    /// use candle_mha::{KvCache, KvFormat};
    /// let cache = KvCache::new().with_format(KvFormat::Int8);
    /// assert_eq!(cache.format(), KvFormat::Int8);
    /// ```
    pub fn with_format(self, format: KvFormat) -> Self {
        if format == self.format {
            return self;
        }
        Self {
            format,
            ..Self::with_chunk(self.chunk)
        }
    }

    /// How keys and values are stored.
    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Bytes allocated for the keys, the values and their scales (the whole capacity).
    pub fn memory_bytes(&self) -> usize {
        [&self.k, &self.v, &self.k_scale, &self.v_scale]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
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

    /// The cached keys and values `(B, len, Hkv, D)` in the dtype they were appended in (views
    /// into the buffer; for an int8 cache, dequantized copies), `None` if empty.
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        match self.stored()? {
            None => Ok(None),
            Some(CachedKv::Dense(k, v)) => Ok(Some((k, v))),
            Some(CachedKv::Quant(q)) => {
                let dtype = self.dtype.unwrap_or(DType::F32);
                Ok(Some(q.dequantize(dtype)?))
            }
        }
    }

    /// The first `len` stored positions, as stored (views into the buffers).
    pub(crate) fn stored(&self) -> Result<Option<CachedKv>> {
        let n = self.len;
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(match (&self.k_scale, &self.v_scale) {
            (Some(ks), Some(vs)) => CachedKv::Quant(QuantKv {
                k: k.narrow(1, 0, n)?,
                k_scale: ks.narrow(1, 0, n)?,
                v: v.narrow(1, 0, n)?,
                v_scale: vs.narrow(1, 0, n)?,
            }),
            _ => CachedKv::Dense(k.narrow(1, 0, n)?, v.narrow(1, 0, n)?),
        }))
    }

    pub(crate) fn set_left_padding(&mut self, pad: Option<Vec<usize>>) {
        self.left_padding = pad;
    }

    /// Appends `k` `(B, L, Hkv, D)` and `v` `(B, L, Hkv, Dv)` and returns all cached keys and
    /// values including them (views of length `len + L`; dequantized copies for an int8 cache).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.store(k, v)?;
        Ok(self.kv()?.expect("non-empty after append"))
    }

    /// Appends like [`Self::append`] and returns everything cached as stored (int8 rows are not
    /// dequantized).
    pub(crate) fn append_stored(&mut self, k: &Tensor, v: &Tensor) -> Result<CachedKv> {
        self.store(k, v)?;
        Ok(self.stored()?.expect("non-empty after append"))
    }

    fn store(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, l, hkv, d) = k.dims4()?;
        let (bv, lv, hv, dv) = v.dims4()?;
        if (bv, hv, lv) != (b, hkv, l) {
            bail!(
                "KvCache::append: keys {:?} and values {:?} disagree",
                k.dims(),
                v.dims()
            )
        }
        if k.dtype() != v.dtype() || !k.device().same_device(v.device()) {
            bail!(
                "KvCache::append: keys ({:?}) and values ({:?}) must share dtype and device",
                k.dtype(),
                v.dtype()
            )
        }
        if let (Some(ck), Some(cv)) = (&self.k, &self.v) {
            let (cb, _, ch, cd) = ck.dims4()?;
            let cdv = cv.dims()[3];
            let compatible = (cb, ch, cd, cdv) == (b, hkv, d, dv)
                && self.dtype == Some(k.dtype())
                && ck.device().same_device(k.device());
            if !compatible && self.len > 0 {
                bail!(
                    "KvCache::append: the cache holds (B, Hkv, D) = ({cb}, {ch}, {cd}) {:?} keys, got {:?} {:?} (reset the cache to change batch size or model)",
                    self.dtype.unwrap_or(ck.dtype()),
                    k.dims(),
                    k.dtype()
                )
            }
            if !compatible {
                self.k = None;
                self.v = None;
            }
        }
        // What is stored: the rows themselves, or int8 rows and their scales.
        let (k_rows, v_rows, scales) = match self.format {
            KvFormat::Native => (k.contiguous()?, v.contiguous()?, None),
            format => {
                let (qk, sk) = quantize(k, format)?;
                let (qv, sv) = quantize(v, format)?;
                (qk, qv, Some((sk, sv)))
            }
        };
        let needed = self.len + l;
        // Buffers a clone still reads at these positions are copied first (copy on write).
        let shared = self.k.is_some() && !self.writes_in_place(self.len);
        if needed > self.capacity() || self.k.is_none() || shared {
            let cap = (needed.div_ceil(self.chunk) * self.chunk).max(self.capacity());
            let dev = k.device();
            let nk = Tensor::zeros((b, cap, hkv, d), k_rows.dtype(), dev)?;
            let nv = Tensor::zeros((b, cap, hkv, dv), v_rows.dtype(), dev)?;
            let ns = match &scales {
                Some(_) => Some((
                    Tensor::zeros((b, cap, hkv), DType::F32, dev)?,
                    Tensor::zeros((b, cap, hkv), DType::F32, dev)?,
                )),
                None => None,
            };
            match (self.stored()?, &ns) {
                (Some(CachedKv::Dense(ok, ov)), _) => {
                    nk.slice_set(&ok.contiguous()?, 1, 0)?;
                    nv.slice_set(&ov.contiguous()?, 1, 0)?;
                }
                (Some(CachedKv::Quant(q)), Some((nks, nvs))) => {
                    nk.slice_set(&q.k.contiguous()?, 1, 0)?;
                    nv.slice_set(&q.v.contiguous()?, 1, 0)?;
                    nks.slice_set(&q.k_scale.contiguous()?, 1, 0)?;
                    nvs.slice_set(&q.v_scale.contiguous()?, 1, 0)?;
                }
                _ => {}
            }
            self.k = Some(nk);
            self.v = Some(nv);
            (self.k_scale, self.v_scale) = match ns {
                Some((a, b)) => (Some(a), Some(b)),
                None => (None, None),
            };
            self.dtype = Some(k.dtype());
            self.owner = Owner::new(self.id);
        }
        let (ck, cv) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        ck.slice_set(&k_rows, 1, self.len)?;
        cv.slice_set(&v_rows, 1, self.len)?;
        if let (Some((sk, sv)), Some(cks), Some(cvs)) = (&scales, &self.k_scale, &self.v_scale) {
            cks.slice_set(&sk.contiguous()?, 1, self.len)?;
            cvs.slice_set(&sv.contiguous()?, 1, self.len)?;
        }
        self.len = needed;
        Ok(())
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
