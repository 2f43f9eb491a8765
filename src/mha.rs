//! [`MultiHeadAttention`]: the module, its input builder [`MhaInput`] and output [`MhaOutput`].

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::MhaConfig;
use crate::kernels::{self, compute_dtype, AttnParams};
use crate::layout::{Projections, WeightLayout};
use crate::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskSpec};

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

    /// Asks for the attention weights.
    pub fn need_weights(mut self, w: NeedWeights) -> Self {
        self.need_weights = w;
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
        let to_bf = |t: &Tensor| -> Result<Tensor> {
            if unbatched {
                t.unsqueeze(0)
            } else if cfg.batch_first {
                Ok(t.clone())
            } else {
                t.transpose(0, 1)
            }
        };
        let (q, k, v) = (to_bf(q_in)?, to_bf(k_in)?, to_bf(v_in)?);
        let (b, l, e) = q.dims3()?;
        let (bk, s, ke) = k.dims3()?;
        let (bv, sv, ve) = v.dims3()?;
        if e != cfg.embed_dim {
            bail!(
                "query: expected embed_dim={} features, got shape {:?}",
                cfg.embed_dim,
                q_in.dims()
            )
        }
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
        if b == 0 || l == 0 || s == 0 {
            bail!("empty input: batch {b}, query length {l}, key length {s} (all must be > 0)")
        }

        let (h, hkv, d) = (cfg.num_heads, cfg.kv_heads(), cfg.head_dim());
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let self_attn = input.key.is_none() || (k_in.id() == q_in.id() && v_in.id() == q_in.id());
        let (qp, kp, vp) = match (&self.proj.qkv, self_attn) {
            (Some(qkv), true) => {
                let all = qkv.forward(&q)?;
                (
                    all.narrow(D::Minus1, 0, qd)?,
                    all.narrow(D::Minus1, qd, kvd)?,
                    all.narrow(D::Minus1, qd + kvd, kvd)?,
                )
            }
            _ => (
                self.proj.q.forward(&q)?,
                self.proj.k.forward(&k)?,
                self.proj.v.forward(&v)?,
            ),
        };
        let heads = |t: Tensor, len: usize, n: usize| -> Result<Tensor> {
            t.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()
        };
        let qh = heads(qp, l, h)?;
        let mut kh = heads(kp, s, hkv)?;
        let mut vh = heads(vp, s, hkv)?;
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
        let causal = match (input.causal, input.sliding_window) {
            (Some(alignment), window) => Some(Causal { alignment, window }),
            (None, Some(w)) => {
                bail!("sliding_window({w}) needs a causal mask: add .causal(CausalAlignment::...)")
            }
            (None, None) => None,
        };
        let mut mask = MaskSpec::build(
            dims,
            input.key_padding_mask.as_ref(),
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

impl Module for MultiHeadAttention {
    /// Self-attention without masks; returns the output only.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.attend(&MhaInput::new(xs.clone()))?.output)
    }
}
