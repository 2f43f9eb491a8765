//! [`MhaConfig`]: the validated hyper-parameters of a [`MultiHeadAttention`](crate::MultiHeadAttention).
//!
//! The names and defaults follow `torch.nn.MultiheadAttention`; the extra fields (grouped KV heads,
//! head size and softmax scale overrides, per-projection biases) are what decoder checkpoints such
//! as Llama need. [`MhaConfig::validate`] rejects inconsistent values with PyTorch's own messages.

use candle_core::{bail, Result};

/// What a query row whose keys are *all* masked out produces.
///
/// PyTorch's softmax over a row of `-inf` returns NaN, which then spreads through the rest of a
/// model. candle-mha's default is [`MaskedRowPolicy::Zero`]: such a row attends to nothing, its
/// attention weights are all 0 and its attention output (before the output projection) is 0, so
/// the module output for that row equals the output-projection bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MaskedRowPolicy {
    /// Weights 0, attention output 0 (no NaN). The default.
    #[default]
    Zero,
    /// PyTorch's behaviour: weights and output of a fully masked row are NaN.
    Nan,
}

/// Which attention implementation the dispatcher may use.
///
/// Every backend computes the same function; they differ in speed, memory and in whether they can
/// return attention weights or be differentiated. See [`crate::kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// Let the dispatcher choose by device, dtype and shape.
    #[default]
    Auto,
    /// The reference implementation on candle ops (materialises the score matrix, differentiable,
    /// can return attention weights). Every other kernel is tested against it.
    Reference,
    /// The fused CPU kernel (see [`crate::kernels`]): tiled GEMM + online softmax, O(tile)
    /// memory, with its own fused backward (gradients for q, k, v and attention sinks). Errors
    /// on non-CPU devices and on f64; calls that need the attention weights or use dropout still
    /// go to the reference.
    CpuFused,
    /// The fused CUDA kernel (see [`crate::kernels`]): flash attention compiled from Triton,
    /// f16/bf16, opt-in until it has run on a GPU. Errors, with the reason, on
    /// calls it cannot run (CPU tensors, f32, an uncompiled head size, a build without the `cuda`
    /// feature); calls that need the attention weights, gradients or dropout still go to the
    /// reference.
    CudaFused,
}

/// Hyper-parameters of a multi-head attention layer.
///
/// Build one with [`MhaConfig::new`] and the `with_*` setters; [`MhaConfig::validate`] (called by
/// every constructor of [`MultiHeadAttention`](crate::MultiHeadAttention)) checks it.
///
/// ```
/// use candle_mha::MhaConfig;
/// let cfg = MhaConfig::new(768, 12).with_batch_first(true).with_dropout(0.1);
/// cfg.validate()?;
/// assert_eq!(cfg.head_dim(), 64);
/// assert!(MhaConfig::new(10, 3).validate().is_err()); // embed_dim must be divisible by num_heads
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MhaConfig {
    /// Model width E: size of the query features and of the output.
    pub embed_dim: usize,
    /// Number of query heads H.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when < `num_heads`, multi-query when 1).
    /// `None` means `num_heads`. Must divide `num_heads`.
    pub num_kv_heads: Option<usize>,
    /// Size of each head. `None` means `embed_dim / num_heads` (which must then divide exactly).
    pub head_dim: Option<usize>,
    /// Multiplier of the logits `q·kᵀ`. `None` means `1/sqrt(head_dim)`.
    pub softmax_scale: Option<f64>,
    /// Feature size of the key input. `None` means `embed_dim`.
    pub kdim: Option<usize>,
    /// Feature size of the value input. `None` means `embed_dim`.
    pub vdim: Option<usize>,
    /// Whether the q/k/v input projections have a bias.
    pub qkv_bias: bool,
    /// Whether the output projection has a bias.
    pub out_bias: bool,
    /// PyTorch's `add_bias_kv`: learnt `bias_k`/`bias_v` rows appended to the keys and values.
    pub add_bias_kv: bool,
    /// PyTorch's `add_zero_attn`: a row of zeros appended to the (projected) keys and values.
    pub add_zero_attn: bool,
    /// Dropout probability on the attention weights, applied only in training mode.
    pub dropout: f32,
    /// Inputs and outputs are `(batch, seq, feature)` when true, `(seq, batch, feature)` (PyTorch's
    /// default) when false. Unbatched `(seq, feature)` inputs are accepted either way.
    pub batch_first: bool,
    /// What a fully masked query row produces.
    pub masked_rows: MaskedRowPolicy,
    /// Which attention implementation to use.
    pub backend: Backend,
    /// Logit soft-capping `s ← c · tanh(s / c)` (Gemma 2's `attn_logit_softcapping`, Grok), applied
    /// to the scaled logits before the masks. `None`: off. Must be finite and positive.
    pub softcap: Option<f64>,
    /// ALiBi slopes, one per query head (BLOOM, MPT, Baichuan): `s_ij ← s_ij − m_h · |i + S − L −
    /// j|`. `None`: off. [`MhaConfig::with_alibi`] sets the usual ones
    /// ([`MhaConfig::standard_alibi_slopes`]).
    pub alibi_slopes: Option<Vec<f64>>,
    /// Attention sinks (gpt-oss, StreamingLLM): a learnt logit per query head joined to every
    /// row's softmax as a key with no value, loaded as the `(num_heads,)` tensor `sinks` of the
    /// layout (renamable with [`WeightLayout::with_rename`](crate::WeightLayout::with_rename);
    /// zeros when a `VarMap` creates it).
    pub sinks: bool,
}

impl MhaConfig {
    /// The ALiBi slopes of `num_heads` heads as BLOOM and MPT compute them (Press et al.): the
    /// geometric sequence `2^(−8k/n)`, `k = 1..=n`, for the largest power of two `n ≤ num_heads`,
    /// then, for the heads beyond it, every other slope of the sequence for `2n` heads.
    ///
    /// ```
    /// use candle_mha::MhaConfig;
    /// let m = MhaConfig::standard_alibi_slopes(8);
    /// assert_eq!(m[0], 0.5);
    /// assert_eq!(m[7], 1.0 / 256.0);
    /// assert_eq!(MhaConfig::standard_alibi_slopes(12).len(), 12);
    /// // What `with_alibi` sets:
    /// assert_eq!(MhaConfig::new(64, 8).with_alibi().alibi_slopes, Some(m));
    /// ```
    pub fn standard_alibi_slopes(num_heads: usize) -> Vec<f64> {
        if num_heads == 0 {
            return vec![];
        }
        let n = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
        let geometric = |n: usize| -> Vec<f64> {
            let base = 2f64.powf(-8.0 / n as f64);
            (1..=n).map(|k| base.powi(k as i32)).collect()
        };
        let mut slopes = geometric(n);
        if n < num_heads {
            slopes.extend(geometric(2 * n).into_iter().step_by(2).take(num_heads - n));
        }
        slopes
    }

    /// A config with PyTorch's defaults: biases on, no `bias_kv`/`zero_attn`, no dropout,
    /// `batch_first = false`, as many KV heads as query heads.
    pub fn new(embed_dim: usize, num_heads: usize) -> Self {
        Self {
            embed_dim,
            num_heads,
            num_kv_heads: None,
            head_dim: None,
            softmax_scale: None,
            kdim: None,
            vdim: None,
            qkv_bias: true,
            out_bias: true,
            add_bias_kv: false,
            add_zero_attn: false,
            dropout: 0.0,
            batch_first: false,
            masked_rows: MaskedRowPolicy::Zero,
            backend: Backend::Auto,
            softcap: None,
            alibi_slopes: None,
            sinks: false,
        }
    }

    /// Hugging Face encoder preset (BERT, RoBERTa, MiniLM): `batch_first = true`, biases on.
    pub fn bert(hidden_size: usize, num_heads: usize) -> Self {
        Self::new(hidden_size, num_heads).with_batch_first(true)
    }

    /// Llama-family decoder preset: `batch_first = true`, no biases, `num_kv_heads` KV heads
    /// of `head_dim` features each.
    pub fn llama(
        hidden_size: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self::new(hidden_size, num_heads)
            .with_batch_first(true)
            .with_bias(false)
            .with_num_kv_heads(num_kv_heads)
            .with_head_dim(head_dim)
    }

    /// Sets `num_kv_heads` (grouped-query / multi-query attention).
    pub fn with_num_kv_heads(mut self, n: usize) -> Self {
        self.num_kv_heads = Some(n);
        self
    }

    /// Sets an explicit head size (decoder models where `num_heads * head_dim != embed_dim`).
    pub fn with_head_dim(mut self, d: usize) -> Self {
        self.head_dim = Some(d);
        self
    }

    /// Sets the logit scale (default `1/sqrt(head_dim)`).
    pub fn with_softmax_scale(mut self, scale: f64) -> Self {
        self.softmax_scale = Some(scale);
        self
    }

    /// Sets PyTorch's `kdim`.
    pub fn with_kdim(mut self, kdim: usize) -> Self {
        self.kdim = Some(kdim);
        self
    }

    /// Sets PyTorch's `vdim`.
    pub fn with_vdim(mut self, vdim: usize) -> Self {
        self.vdim = Some(vdim);
        self
    }

    /// Sets PyTorch's `bias`: both the q/k/v and the output projection biases.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.qkv_bias = bias;
        self.out_bias = bias;
        self
    }

    /// Sets the q/k/v and output projection biases separately (e.g. Qwen2: `true, false`).
    pub fn with_biases(mut self, qkv_bias: bool, out_bias: bool) -> Self {
        self.qkv_bias = qkv_bias;
        self.out_bias = out_bias;
        self
    }

    /// Sets PyTorch's `add_bias_kv`.
    pub fn with_add_bias_kv(mut self, on: bool) -> Self {
        self.add_bias_kv = on;
        self
    }

    /// Sets PyTorch's `add_zero_attn`.
    pub fn with_add_zero_attn(mut self, on: bool) -> Self {
        self.add_zero_attn = on;
        self
    }

    /// Sets the attention-weight dropout probability (training mode only).
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// Sets PyTorch's `batch_first`.
    pub fn with_batch_first(mut self, on: bool) -> Self {
        self.batch_first = on;
        self
    }

    /// Sets the fully-masked-row policy.
    pub fn with_masked_rows(mut self, policy: MaskedRowPolicy) -> Self {
        self.masked_rows = policy;
        self
    }

    /// Forces an attention backend.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets logit soft-capping at `c` (see [`MhaConfig::softcap`]).
    pub fn with_softcap(mut self, c: f64) -> Self {
        self.softcap = Some(c);
        self
    }

    /// Turns on ALiBi with the usual slopes for `num_heads` ([`Self::standard_alibi_slopes`]).
    pub fn with_alibi(mut self) -> Self {
        self.alibi_slopes = Some(Self::standard_alibi_slopes(self.num_heads));
        self
    }

    /// Turns on ALiBi with the given slopes, one per query head.
    pub fn with_alibi_slopes(mut self, slopes: Vec<f64>) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Turns attention sinks on or off (see [`MhaConfig::sinks`]).
    pub fn with_sinks(mut self, on: bool) -> Self {
        self.sinks = on;
        self
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }

    /// Size of each head.
    pub fn head_dim(&self) -> usize {
        match self.head_dim {
            Some(d) => d,
            None if self.num_heads > 0 => self.embed_dim / self.num_heads,
            None => 0,
        }
    }

    /// Key input feature size.
    pub fn kdim(&self) -> usize {
        self.kdim.unwrap_or(self.embed_dim)
    }

    /// Value input feature size.
    pub fn vdim(&self) -> usize {
        self.vdim.unwrap_or(self.embed_dim)
    }

    /// Logit scale actually used.
    pub fn scale(&self) -> f64 {
        self.softmax_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim() as f64).sqrt())
    }

    /// Width of the concatenated query heads, `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim()
    }

    /// Width of the concatenated key/value heads, `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }

    /// Whether this config has the same shapes as a plain `torch.nn.MultiheadAttention`
    /// (no GQA, no head size or output-bias overrides).
    pub fn is_torch_compatible(&self) -> bool {
        self.kv_heads() == self.num_heads
            && self.q_dim() == self.embed_dim
            && self.qkv_bias == self.out_bias
            && self.softmax_scale.is_none()
    }

    /// Checks the config, with PyTorch's messages where PyTorch has one.
    pub fn validate(&self) -> Result<()> {
        if self.embed_dim == 0 || self.num_heads == 0 {
            bail!(
                "embed_dim and num_heads must be greater than 0, got embed_dim={} and num_heads={} instead",
                self.embed_dim,
                self.num_heads
            )
        }
        match self.head_dim {
            None if !self.embed_dim.is_multiple_of(self.num_heads) => bail!(
                "embed_dim must be divisible by num_heads, got embed_dim={} and num_heads={}",
                self.embed_dim,
                self.num_heads
            ),
            Some(0) => bail!("head_dim must be greater than 0"),
            _ => {}
        }
        let kv = self.kv_heads();
        if kv == 0 {
            bail!("num_kv_heads must be greater than 0")
        }
        if !self.num_heads.is_multiple_of(kv) {
            bail!(
                "num_heads must be divisible by num_kv_heads, got num_heads={} and num_kv_heads={kv}",
                self.num_heads
            )
        }
        if self.kdim == Some(0) || self.vdim == Some(0) {
            bail!(
                "kdim and vdim must be greater than 0, got kdim={:?} and vdim={:?}",
                self.kdim,
                self.vdim
            )
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(
                "dropout probability has to be in [0, 1), got {}",
                self.dropout
            )
        }
        if let Some(s) = self.softmax_scale {
            if !s.is_finite() || s <= 0.0 {
                bail!("softmax_scale must be finite and positive, got {s}")
            }
        }
        if let Some(c) = self.softcap {
            if !c.is_finite() || c <= 0.0 {
                bail!("softcap must be finite and positive, got {c}")
            }
        }
        if let Some(m) = &self.alibi_slopes {
            if m.len() != self.num_heads || m.iter().any(|x| !x.is_finite()) {
                bail!(
                    "alibi_slopes: expected {} finite slopes (one per query head), got {m:?}",
                    self.num_heads
                )
            }
        }
        Ok(())
    }
}
