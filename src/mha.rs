//! [`MultiHeadAttention`]: the module, its input builder [`MhaInput`] and output [`MhaOutput`].

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::cache::{KvCache, StaticKv};
use crate::config::MhaConfig;
use crate::kernels::{self, compute_dtype, AttnParams};
use crate::layout::{Projections, WeightLayout};
use crate::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskSpec};
use crate::rope::{PositionalHook, Rope};

/// Whether (and how) to return attention weights: PyTorch's `need_weights` and
/// `average_attn_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NeedWeights {
    /// Output only (PyTorch `need_weights=False`).
    #[default]
    No,
    /// Weights per head: `(B, H, L, S)`, `(H, L, S)` unbatched.
    PerHead,
    /// Weights averaged over heads: `(B, L, S)`, `(L, S)` unbatched.
    Averaged,
}

/// The inputs of one attention call, built fluently.
///
/// `query` is `(B, L, E)` with `batch_first`, `(L, B, E)` without, or `(L, E)` unbatched; `key` and
/// `value` likewise with `kdim` / `vdim` features and length S (`key = value = query` when not
/// given: self-attention).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_mha::{CausalAlignment, KeyPaddingMask, MhaInput, NeedWeights};
/// let x = Tensor::zeros((2, 5, 8), candle_core::DType::F32, &Device::Cpu)?;
/// let input = MhaInput::new(x)
///     .key_padding_mask(KeyPaddingMask::from_lengths(&[5, 3]))
///     .causal(CausalAlignment::TopLeft)
///     .need_weights(NeedWeights::PerHead);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MhaInput {
    /// Queries.
    pub query: Tensor,
    /// Keys (`None`: the query).
    pub key: Option<Tensor>,
    /// Values (`None`: the query).
    pub value: Option<Tensor>,
    /// Keys to ignore per batch element.
    pub key_padding_mask: Option<KeyPaddingMask>,
    /// Explicit attention mask.
    pub attn_mask: Option<AttnMask>,
    /// The crate's causal mask, with its alignment.
    pub causal: Option<CausalAlignment>,
    /// Sliding window of the causal mask (requires `causal`).
    pub sliding_window: Option<usize>,
    /// Whether to return the attention weights.
    pub need_weights: NeedWeights,
    /// Applied to the projected queries and keys (e.g. RoPE); see [`crate::rope`].
    pub positional: Option<PositionalHook>,
    /// Left padding per batch element (self-attention): see [`Self::left_padding`].
    pub left_padding: Option<Vec<usize>>,
}

impl MhaInput {
    /// Self-attention over `query`.
    pub fn new(query: Tensor) -> Self {
        Self {
            query,
            key: None,
            value: None,
            key_padding_mask: None,
            attn_mask: None,
            causal: None,
            sliding_window: None,
            need_weights: NeedWeights::No,
            positional: None,
            left_padding: None,
        }
    }

    /// Attention of `query` over `key` / `value` (cross-attention when they differ).
    pub fn cross(query: Tensor, key: Tensor, value: Tensor) -> Self {
        Self::new(query).key_value(key, value)
    }

    /// Sets the keys and values.
    pub fn key_value(mut self, key: Tensor, value: Tensor) -> Self {
        self.key = Some(key);
        self.value = Some(value);
        self
    }

    /// Sets the key padding mask.
    pub fn key_padding_mask(mut self, mask: KeyPaddingMask) -> Self {
        self.key_padding_mask = Some(mask);
        self
    }

    /// Sets the explicit attention mask.
    pub fn attn_mask(mut self, mask: AttnMask) -> Self {
        self.attn_mask = Some(mask);
        self
    }

    /// Adds a causal mask with the given alignment (merged with any other mask).
    pub fn causal(mut self, alignment: CausalAlignment) -> Self {
        self.causal = Some(alignment);
        self
    }

    /// Limits the causal mask to a sliding window of `w` keys per query: query `i` sees keys
    /// `j` with `i + off - w < j <= i + off` (see [`crate::mask`]). Requires [`Self::causal`].
    pub fn sliding_window(mut self, w: usize) -> Self {
        self.sliding_window = Some(w);
        self
    }

    /// The causal mask this input asks for: alignment plus sliding window.
    fn causal_mask(&self) -> Result<Option<Causal>> {
        match (self.causal, self.sliding_window) {
            (Some(alignment), window) => Ok(Some(Causal { alignment, window })),
            (None, Some(w)) => {
                bail!("sliding_window({w}) needs a causal mask: add .causal(CausalAlignment::...)")
            }
            (None, None) => Ok(None),
        }
    }

    /// Asks for the attention weights.
    pub fn need_weights(mut self, w: NeedWeights) -> Self {
        self.need_weights = w;
        self
    }

    /// Applies `hook` to the projected queries and keys, after the split into heads and before
    /// caching (see [`crate::rope`] for the positions it sees).
    pub fn positional(mut self, hook: impl Into<PositionalHook>) -> Self {
        self.positional = Some(hook.into());
        self
    }

    /// Shorthand for [`Self::positional`] with a rotary embedding.
    pub fn rope(self, rope: Rope) -> Self {
        self.positional(rope)
    }

    /// Self-attention over left-padded (right-aligned) sequences: the first `pad[b]` rows of
    /// batch element `b` are padding. Their keys are masked for every query, and positions are
    /// counted per sequence from its first real row (row `t` is position `t - pad[b]`). With
    /// [`MultiHeadAttention::attend_cached`] it is given on the first call into an empty cache,
    /// which records it (see [`crate::cache`]). Cannot be combined with a key padding mask.
    pub fn left_padding(mut self, pad: &[usize]) -> Self {
        self.left_padding = Some(pad.to_vec());
        self
    }
}

/// What [`MultiHeadAttention::attend`] returns.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// Same layout as the query, with `embed_dim` features, in the input dtype.
    pub output: Tensor,
    /// Attention probabilities when asked for (see [`NeedWeights`]), in the input dtype.
    /// In training mode with dropout they are the dropped-out weights, as in PyTorch.
    pub weights: Option<Tensor>,
}

/// Multi-head attention, numerically equal to `torch.nn.MultiheadAttention`, with grouped KV
/// heads and the weight layouts of real checkpoints.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_mha::{MhaConfig, MhaInput, MultiHeadAttention, NeedWeights};
/// let varmap = VarMap::new(); // fresh weights; use VarBuilder::from_mmaped_safetensors to load
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let mha = MultiHeadAttention::new(MhaConfig::new(8, 2).with_batch_first(true), vb)?;
/// let x = Tensor::randn(0f32, 1., (3, 5, 8), &Device::Cpu)?;
/// let y = mha.forward(&x)?; // self-attention through candle's Module trait
/// assert_eq!(y.dims(), &[3, 5, 8]);
/// let out = mha.attend(&MhaInput::new(x).need_weights(NeedWeights::Averaged))?;
/// assert_eq!(out.weights.unwrap().dims(), &[3, 5, 5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    cfg: MhaConfig,
    proj: Projections,
    dtype: DType,
    device: Device,
}

impl MultiHeadAttention {
    /// Builds the module from `torch.nn.MultiheadAttention`'s `state_dict` names.
    pub fn new(cfg: MhaConfig, vb: VarBuilder) -> Result<Self> {
        Self::load(cfg, &WeightLayout::torch(), vb)
    }

    /// Builds the module from the weights of `layout` under `vb`.
    pub fn load(cfg: MhaConfig, layout: &WeightLayout, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let proj = layout.load(&vb, &cfg)?;
        Ok(Self {
            cfg,
            proj,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MhaConfig {
        &self.cfg
    }

    /// The dtype of the weights (inputs must match it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights (inputs must be on it).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Self-attention without masks; `train` enables dropout on the attention weights.
    ///
    /// candle implements [`ModuleT`](candle_core::ModuleT) for every [`Module`] by ignoring
    /// `train`, so generic `ModuleT` code reaches [`Module::forward`] (no dropout); this inherent
    /// method (which method-call syntax picks first) honours `train`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.attend_t(&MhaInput::new(xs.clone()), train)?.output)
    }

    /// Attention in evaluation mode (no dropout).
    pub fn attend(&self, input: &MhaInput) -> Result<MhaOutput> {
        self.attend_t(input, false)
    }

    /// Attention; `train` enables dropout on the attention weights.
    pub fn attend_t(&self, input: &MhaInput, train: bool) -> Result<MhaOutput> {
        let p = self.prepare(input, true)?;
        let (mut qh, mut kh, vh) = self.project(&p)?;
        let (b, l, s) = (p.b, p.l, p.s);
        let pad = match &input.left_padding {
            None => None,
            Some(pad) => {
                if s != l {
                    bail!("left_padding is for self-attention: query length {l} differs from key length {s}")
                }
                Some(check_padding(pad, b, l)?)
            }
        };
        if let Some(hook) = &input.positional {
            let starts = starts_from(pad.as_deref(), b, 0);
            qh = hook.apply(&qh, &starts)?;
            let kstarts = if p.self_attn { starts } else { vec![0] };
            kh = hook.apply(&kh, &kstarts)?;
        }
        let causal = input.causal_mask()?;
        let kpm = match &pad {
            None => input.key_padding_mask.clone(),
            Some(pad) => Some(self.left_padding_mask(input, pad, s, p.unbatched)?),
        };
        self.attend_heads(input, qh, kh, vh, &p, kpm.as_ref(), causal, train)
    }

    /// Self-attention over the new rows `input.query` (prefill: many, decode: one) against the
    /// keys and values in `cache` plus their own, which are appended to the cache (queries are
    /// never cached).
    ///
    /// Always causal with [`CausalAlignment::BottomRight`] (the new rows are the last of the
    /// sequence); `input.causal` may be left unset or set to `BottomRight`, and
    /// [`MhaInput::sliding_window`] restricts it as usual. The positional hook sees positions
    /// continuing from the cache (see [`crate::rope`]); left padding is given on the first call
    /// into an empty cache and then remembered (see [`crate::cache`]). `key`/`value` and a key
    /// padding mask are not accepted; an [`AttnMask`] must cover `(L, cache.len() + L)`.
    ///
    /// Evaluation mode (no dropout). On error the cache is left unchanged.
    pub fn attend_cached(&self, input: &MhaInput, cache: &mut KvCache) -> Result<MhaOutput> {
        if input.key.is_some() || input.value.is_some() {
            bail!("attend_cached is self-attention: give no key/value (use attend_static for a fixed memory)")
        }
        if input.key_padding_mask.is_some() {
            bail!("attend_cached: key padding is tracked by the cache: give .left_padding(..) on the first call instead of a key_padding_mask")
        }
        let alignment = input.causal.unwrap_or(CausalAlignment::BottomRight);
        if alignment != CausalAlignment::BottomRight {
            bail!("attend_cached attends with CausalAlignment::BottomRight (the new rows are the last of the sequence), got {alignment:?}")
        }
        let p = self.prepare(input, false)?;
        let (b, l) = (p.b, p.l);
        if let Some(cb) = cache.batch_size() {
            if !cache.is_empty() && cb != b {
                bail!("attend_cached: the cache holds batch size {cb}, the input has {b} (reset the cache first)")
            }
        }
        let pad = match (&input.left_padding, cache.is_empty()) {
            // The padding may extend beyond this first call (e.g. decoding from the first slot).
            (Some(pad), true) => Some(check_padding(pad, b, usize::MAX)?),
            (Some(pad), false) => {
                if cache.left_padding() != Some(&pad[..]) {
                    bail!("attend_cached: left_padding {pad:?} differs from the one the cache recorded at prefill ({:?})", cache.left_padding())
                }
                Some(pad.clone())
            }
            (None, true) => None,
            (None, false) => cache.left_padding().map(|p| p.to_vec()),
        };
        let past = cache.len();
        let (mut qh, mut kh, vh) = self.project(&p)?;
        if let Some(hook) = &input.positional {
            let starts = starts_from(pad.as_deref(), b, past);
            qh = hook.apply(&qh, &starts)?;
            kh = hook.apply(&kh, &starts)?;
        }
        let mut p = p;
        p.s = past + l;
        let kpm = match &pad {
            None => None,
            Some(pad) => Some(self.left_padding_mask(input, pad, p.s, p.unbatched)?),
        };
        let causal = Some(Causal {
            alignment: CausalAlignment::BottomRight,
            window: input.sliding_window,
        });
        if input.sliding_window == Some(0) {
            bail!("sliding window must be at least 1 key, got 0")
        }
        // Validate everything that can fail before touching the cache.
        let mut next = cache.clone();
        let (ak, av) = next.append(&kh, &vh)?;
        if past == 0 {
            next.set_left_padding(pad);
        }
        let out = self.attend_heads(input, qh, ak, av, &p, kpm.as_ref(), causal, false)?;
        *cache = next;
        Ok(out)
    }

    /// Projects a fixed memory (an encoder output: `(B, S, kdim)` with `batch_first`, `(S, B,
    /// kdim)` without, `(S, kdim)` unbatched) into keys and values once, for
    /// [`Self::attend_static`] (cross-attention in an encoder-decoder: Whisper, T5, BART). No
    /// positional hook is applied. `bias_k`/`bias_v` and `add_zero_attn` keys are appended at
    /// every call, not stored.
    pub fn static_kv(&self, memory: &Tensor) -> Result<StaticKv> {
        let cfg = &self.cfg;
        self.check_tensor("memory", memory)?;
        let m = match memory.rank() {
            2 => memory.unsqueeze(0)?,
            3 if cfg.batch_first => memory.clone(),
            3 => memory.transpose(0, 1)?,
            _ => bail!(
                "memory must be 2-D (S, kdim) or 3-D, got shape {:?}",
                memory.dims()
            ),
        };
        let (b, s, e) = m.dims3()?;
        if e != cfg.kdim() || cfg.kdim() != cfg.vdim() {
            bail!(
                "memory: expected {} features (kdim = vdim), got shape {:?}",
                cfg.kdim(),
                memory.dims()
            )
        }
        if b == 0 || s == 0 {
            bail!("memory is empty: shape {:?}", memory.dims())
        }
        let (hkv, d) = (cfg.kv_heads(), cfg.head_dim());
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, hkv, d))?.transpose(1, 2)?.contiguous()
        };
        Ok(StaticKv {
            k: heads(self.proj.k.forward(&m)?)?,
            v: heads(self.proj.v.forward(&m)?)?,
        })
    }

    /// Attention of `input.query` over a memory projected once by [`Self::static_kv`]. Masks
    /// (key padding over the memory, attention mask, causal) and `need_weights` work as in
    /// [`Self::attend`]; `key`/`value` must not be given. A positional hook applies to the
    /// queries only (positions from 0, or per [`MhaInput::left_padding`]). Evaluation mode.
    pub fn attend_static(&self, input: &MhaInput, memory: &StaticKv) -> Result<MhaOutput> {
        if input.key.is_some() || input.value.is_some() {
            bail!("attend_static: the keys and values come from the StaticKv; give no key/value")
        }
        if input.left_padding.is_some() {
            bail!("attend_static: left_padding is for self-attention; use a key padding mask over the memory")
        }
        let mut p = self.prepare(input, false)?;
        if memory.k.dims()[0] != p.b {
            bail!(
                "attend_static: the memory has batch size {}, the query {}",
                memory.k.dims()[0],
                p.b
            )
        }
        if memory.k.dtype() != self.dtype {
            bail!(
                "attend_static: the memory is {:?}, the module {:?}",
                memory.k.dtype(),
                self.dtype
            )
        }
        p.s = memory.len();
        let qp = self.proj.q.forward(&p.q)?;
        let mut qh = qp
            .reshape((p.b, p.l, self.cfg.num_heads, self.cfg.head_dim()))?
            .transpose(1, 2)?
            .contiguous()?;
        if let Some(hook) = &input.positional {
            qh = hook.apply(&qh, &[0])?;
        }
        let causal = input.causal_mask()?;
        self.attend_heads(
            input,
            qh,
            memory.k.clone(),
            memory.v.clone(),
            &p,
            input.key_padding_mask.as_ref(),
            causal,
            false,
        )
    }

    /// Validates `input` and brings it to batch-first. `with_kv`: validate key/value too.
    fn prepare(&self, input: &MhaInput, with_kv: bool) -> Result<Prepared> {
        let cfg = &self.cfg;
        let q_in = &input.query;
        let (k_in, v_in) = match (&input.key, &input.value) {
            (Some(k), Some(v)) => (k, v),
            (None, None) => (q_in, q_in),
            _ => bail!("key and value must be given together (or neither, for self-attention)"),
        };
        let layout = if cfg.batch_first {
            "(B, L, E)"
        } else {
            "(L, B, E)"
        };
        let unbatched = match q_in.rank() {
            2 => true,
            3 => false,
            _ => bail!(
                "query must be 2-D (L, E) for unbatched input or 3-D {layout}, got shape {:?}",
                q_in.dims()
            ),
        };
        self.check_tensor("query", q_in)?;
        if with_kv {
            for (name, t) in [("key", k_in), ("value", v_in)] {
                if t.rank() != q_in.rank() {
                    bail!(
                        "{name}: for a {}-D query expected a {}-D {name}, got shape {:?}",
                        q_in.rank(),
                        q_in.rank(),
                        t.dims()
                    )
                }
                self.check_tensor(name, t)?;
            }
        }
        let to_bf = |t: &Tensor| -> Result<Tensor> {
            if unbatched {
                t.unsqueeze(0)
            } else if cfg.batch_first {
                Ok(t.clone())
            } else {
                t.transpose(0, 1)
            }
        };
        let q = to_bf(q_in)?;
        let (b, l, e) = q.dims3()?;
        if e != cfg.embed_dim {
            bail!(
                "query: expected embed_dim={} features, got shape {:?}",
                cfg.embed_dim,
                q_in.dims()
            )
        }
        let (k, v, s) = if with_kv {
            let (k, v) = (to_bf(k_in)?, to_bf(v_in)?);
            let (bk, s, ke) = k.dims3()?;
            let (bv, sv, ve) = v.dims3()?;
            if ke != cfg.kdim() {
                bail!(
                    "key: expected kdim={} features, got shape {:?}",
                    cfg.kdim(),
                    k_in.dims()
                )
            }
            if ve != cfg.vdim() {
                bail!(
                    "value: expected vdim={} features, got shape {:?}",
                    cfg.vdim(),
                    v_in.dims()
                )
            }
            if bk != b || bv != b {
                bail!(
                    "key and value batch size must match the query's ({b}), got key {:?} and value {:?}",
                    k_in.dims(),
                    v_in.dims()
                )
            }
            if sv != s {
                bail!(
                    "key and value must have the same sequence length, got key {:?} and value {:?}",
                    k_in.dims(),
                    v_in.dims()
                )
            }
            (k, v, s)
        } else {
            (q.clone(), q.clone(), l)
        };
        if b == 0 || l == 0 || s == 0 {
            bail!("empty input: batch {b}, query length {l}, key length {s} (all must be > 0)")
        }
        let self_attn = input.key.is_none() || (k_in.id() == q_in.id() && v_in.id() == q_in.id());
        Ok(Prepared {
            q,
            k,
            v,
            b,
            l,
            s,
            unbatched,
            self_attn,
        })
    }

    /// The q/k/v projections split into heads: `(B, H, L, D)`, `(B, Hkv, S, D)`, `(B, Hkv, S, Dv)`.
    fn project(&self, p: &Prepared) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (b, l, s) = (p.b, p.l, p.s);
        let (h, hkv, d) = (cfg.num_heads, cfg.kv_heads(), cfg.head_dim());
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let (qp, kp, vp) = match (&self.proj.qkv, p.self_attn) {
            (Some(qkv), true) => {
                let all = qkv.forward(&p.q)?;
                (
                    all.narrow(D::Minus1, 0, qd)?,
                    all.narrow(D::Minus1, qd, kvd)?,
                    all.narrow(D::Minus1, qd + kvd, kvd)?,
                )
            }
            _ => (
                self.proj.q.forward(&p.q)?,
                self.proj.k.forward(&p.k)?,
                self.proj.v.forward(&p.v)?,
            ),
        };
        let heads = |t: Tensor, len: usize, n: usize| -> Result<Tensor> {
            t.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()
        };
        Ok((heads(qp, l, h)?, heads(kp, s, hkv)?, heads(vp, s, hkv)?))
    }

    /// The `(B, S)` (or `(S,)` unbatched) key padding mask of left-padded sequences.
    fn left_padding_mask(
        &self,
        input: &MhaInput,
        pad: &[usize],
        s: usize,
        unbatched: bool,
    ) -> Result<KeyPaddingMask> {
        if input.key_padding_mask.is_some() {
            bail!("give either left_padding or a key_padding_mask, not both")
        }
        let b = pad.len();
        let mut m = vec![0u8; b * s];
        for (bi, &n) in pad.iter().enumerate() {
            m[bi * s..bi * s + n.min(s)].fill(1);
        }
        let t = if unbatched {
            Tensor::from_vec(m, s, &self.device)?
        } else {
            Tensor::from_vec(m, (b, s), &self.device)?
        };
        Ok(KeyPaddingMask::Tensor(t))
    }

    /// Everything after the projections: bias_kv / zero_attn keys, masks, the kernel, the
    /// output projection and the caller's layout. `p.s` is the number of maskable keys.
    #[allow(clippy::too_many_arguments)]
    fn attend_heads(
        &self,
        input: &MhaInput,
        qh: Tensor,
        mut kh: Tensor,
        mut vh: Tensor,
        p: &Prepared,
        key_padding_mask: Option<&KeyPaddingMask>,
        causal: Option<Causal>,
        train: bool,
    ) -> Result<MhaOutput> {
        let cfg = &self.cfg;
        let (b, l, s, unbatched) = (p.b, p.l, p.s, p.unbatched);
        let (h, hkv, d) = (cfg.num_heads, cfg.kv_heads(), cfg.head_dim());
        let qd = cfg.q_dim();
        let mut extra_keys = 0;
        if let (Some(bk), Some(bv)) = (&self.proj.bias_k, &self.proj.bias_v) {
            let row = |t: &Tensor| t.reshape((1, hkv, 1, d))?.broadcast_as((b, hkv, 1, d));
            kh = Tensor::cat(&[&kh, &row(bk)?], 2)?;
            vh = Tensor::cat(&[&vh, &row(bv)?], 2)?;
            extra_keys += 1;
        }
        if cfg.add_zero_attn {
            let z = Tensor::zeros((b, hkv, 1, d), kh.dtype(), kh.device())?;
            kh = Tensor::cat(&[&kh, &z], 2)?;
            vh = Tensor::cat(&[&vh, &z], 2)?;
            extra_keys += 1;
        }
        let dims = MaskDims {
            batch: b,
            heads: h,
            q_len: l,
            kv_len: s,
            unbatched,
        };
        let mut mask = MaskSpec::build(
            dims,
            key_padding_mask,
            input.attn_mask.as_ref(),
            causal,
            compute_dtype(self.dtype),
            &self.device,
        )?;
        mask.extra_keys = extra_keys;
        let params = AttnParams {
            scale: cfg.scale(),
            masked_rows: cfg.masked_rows,
            dropout: if train { cfg.dropout } else { 0.0 },
            need_weights: input.need_weights != NeedWeights::No,
            backend: cfg.backend,
        };
        let att = kernels::attention(&qh, &kh, &vh, &mask, &params)?;
        let o = att.output.transpose(1, 2)?.reshape((b, l, qd))?;
        let o = self.proj.o.forward(&o)?;
        let output = if unbatched {
            o.squeeze(0)?
        } else if cfg.batch_first {
            o
        } else {
            o.transpose(0, 1)?
        };
        let weights = match (att.weights, input.need_weights) {
            (Some(w), NeedWeights::PerHead) => Some(w),
            (Some(w), NeedWeights::Averaged) => Some(w.mean(1)?),
            _ => None,
        };
        let weights = match weights {
            Some(w) if unbatched => Some(w.squeeze(0)?.to_dtype(self.dtype)?),
            Some(w) => Some(w.to_dtype(self.dtype)?),
            None => None,
        };
        Ok(MhaOutput { output, weights })
    }

    fn check_tensor(&self, name: &str, t: &Tensor) -> Result<()> {
        if t.dtype() != self.dtype {
            bail!(
                "{name} has dtype {:?} but the module's weights are {:?}",
                t.dtype(),
                self.dtype
            )
        }
        if !t.device().same_device(&self.device) {
            bail!(
                "{name} is on {:?} but the module's weights are on {:?}",
                t.device(),
                self.device
            )
        }
        Ok(())
    }
}

/// An attention call's inputs after validation, batch-first.
struct Prepared {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    b: usize,
    l: usize,
    /// Number of maskable keys (cached + new with a cache, the memory length with a StaticKv).
    s: usize,
    unbatched: bool,
    self_attn: bool,
}

fn check_padding(pad: &[usize], b: usize, l: usize) -> Result<Vec<usize>> {
    if pad.len() != b {
        bail!(
            "left_padding: expected one count per batch element ({b}), got {}",
            pad.len()
        )
    }
    if let Some(bad) = pad.iter().find(|&&n| n > l) {
        bail!("left_padding: {bad} padding rows but the input has only {l}")
    }
    Ok(pad.to_vec())
}

/// Position of row 0 per batch element: `past - pad[b]`.
fn starts_from(pad: Option<&[usize]>, b: usize, past: usize) -> Vec<i64> {
    match pad {
        None => vec![past as i64],
        Some(pad) => (0..b).map(|i| past as i64 - pad[i] as i64).collect(),
    }
}

impl Module for MultiHeadAttention {
    /// Self-attention without masks; returns the output only.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.attend(&MhaInput::new(xs.clone()))?.output)
    }
}
