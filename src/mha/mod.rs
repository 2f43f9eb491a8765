//! [`MultiHeadAttention`]: the module, its input builder [`MhaInput`] and output [`MhaOutput`].
//!
//! Files: this one (the module, its constructors and entry points), `input.rs` (the input
//! builder and output types), `pipeline.rs` (the one path every entry point takes), `paged.rs`
//! (`attend_paged`: a batch of sequences over a paged KV pool).
//!
//! ## Inference and training
//!
//! candle tracks gradients per tensor: a module built from a `VarMap`-backed `VarBuilder` holds
//! `Var`s, so every call through it is recorded for autograd: the fused CPU kernel then saves
//! its per-row statistics and records a node whose backward is the fused backward (calls with
//! dropout or weights take the differentiable reference). Weights loaded from a checkpoint are
//! not `Var`s and record nothing. A trained module used for inference should be switched
//! explicitly: [`MultiHeadAttention::inference`] returns a view of the same weights (shared
//! storage: later optimizer steps are visible) detached from autograd, whose calls record no
//! graph and keep nothing for a backward.
//! [`MultiHeadAttention::tracks_gradients`] tells which kind a module is.

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::cache::{KvCache, StaticKv};
use crate::config::MhaConfig;
use crate::layout::{Projections, WeightLayout};
use crate::mask::MaskPlan;

mod input;
mod paged;
mod pipeline;

pub use input::{MhaInput, MhaOutput, NeedWeights};
use pipeline::{KvSource, Prepared};

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
    /// The config's ALiBi slopes as an f32 `(H,)` tensor on the module's device.
    alibi: Option<Tensor>,
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
        let alibi = match &cfg.alibi_slopes {
            Some(m) => {
                let m: Vec<f32> = m.iter().map(|&x| x as f32).collect();
                Some(Tensor::new(m, vb.device())?)
            }
            None => None,
        };
        Ok(Self {
            cfg,
            proj,
            alibi,
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
        Ok(self.run(input, KvSource::Fresh, train)?.0)
    }

    /// Self-attention over the new rows `input.query` (prefill: many, decode: one) against the
    /// keys and values in `cache` plus their own, which are appended to the cache (queries are
    /// never cached).
    ///
    /// Always causal with [`CausalAlignment::BottomRight`](crate::CausalAlignment::BottomRight)
    /// (the new rows are the last of the sequence); `input.causal` may be left unset or set to
    /// `BottomRight`, and [`MhaInput::sliding_window`] restricts it as usual. The positional hook
    /// sees positions continuing from the cache (see [`crate::rope`]); left padding is given on
    /// the first call into an empty cache and then remembered (see [`crate::cache`]).
    /// `key`/`value` and a key padding mask are not accepted; an
    /// [`AttnMask`](crate::AttnMask) must cover `(L, cache.len() + L)`.
    ///
    /// Evaluation mode (no dropout). On error the cache is left unchanged.
    pub fn attend_cached(&self, input: &MhaInput, cache: &mut KvCache) -> Result<MhaOutput> {
        let (out, next) = self.run(input, KvSource::Cached(cache), false)?;
        if let Some(next) = next {
            *cache = next;
        }
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
        Ok(StaticKv {
            k: self.proj.k.forward(&m)?.reshape((b, s, hkv, d))?,
            v: self.proj.v.forward(&m)?.reshape((b, s, hkv, d))?,
        })
    }

    /// Attention of `input.query` over a memory projected once by [`Self::static_kv`]. Masks
    /// (key padding over the memory, attention mask, causal) and `need_weights` work as in
    /// [`Self::attend`]; `key`/`value` must not be given. A positional hook applies to the
    /// queries only (positions from 0). Evaluation mode.
    pub fn attend_static(&self, input: &MhaInput, memory: &StaticKv) -> Result<MhaOutput> {
        Ok(self.run(input, KvSource::Static(memory), false)?.0)
    }

    /// The mask plan [`Self::attend`] builds for `input` (validated against its shapes). A
    /// model builds it once per forward and hands it to every layer with
    /// [`MhaInput::mask_plan`], instead of every layer converting and checking the same masks.
    /// It holds the masks only: each layer adds its own score modifiers (soft-cap, ALiBi,
    /// sinks) when it is called; modifiers set on a plan by hand are kept by layers that have
    /// none.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_mha::{KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let layers = (0..2)
    ///     .map(|i| MultiHeadAttention::new(MhaConfig::new(8, 2).with_batch_first(true), vb.pp(i)))
    ///     .collect::<candle_core::Result<Vec<_>>>()?;
    /// let mut x = Tensor::randn(0f32, 1., (2, 5, 8), &Device::Cpu)?;
    /// let masks = MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::from_lengths(&[5, 2]));
    /// let plan = layers[0].mask_plan(&masks)?; // once per forward
    /// for layer in &layers {
    ///     x = layer.attend(&MhaInput::new(x).mask_plan(plan.clone()))?.output;
    /// }
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn mask_plan(&self, input: &MhaInput) -> Result<MaskPlan> {
        let p = Prepared::new(self, input, KvSource::Fresh)?;
        self.masks_for(input, &p)
    }

    /// The mask plan [`Self::attend_cached`] builds for `input` against `cache` (keys: the cached
    /// ones plus the new rows; the left padding given or recorded by the cache). Build it once
    /// per step, before any layer appends to its cache (all layers' caches have the same length).
    pub fn mask_plan_cached(&self, input: &MhaInput, cache: &KvCache) -> Result<MaskPlan> {
        let p = Prepared::new(self, input, KvSource::Cached(cache))?;
        self.masks_for(input, &p)
    }

    /// A view of this module for inference: the same weights (sharing storage, so later
    /// optimizer steps on the `Var`s are visible) detached from autograd, so that calls record
    /// no graph. See the [module docs](self#inference-and-training). Because those weights can
    /// still change, the CPU projections of a view of `Var`s repack them on every call; weights
    /// loaded from a checkpoint are packed once and kept.
    pub fn inference(&self) -> Self {
        Self {
            proj: self.proj.detached(),
            ..self.clone()
        }
    }

    /// Whether calls through this module are recorded for autograd (its weights are `Var`s or
    /// derived from them): each call then records an autograd node. False for
    /// weights loaded from a checkpoint and after [`Self::inference`].
    pub fn tracks_gradients(&self) -> bool {
        self.proj.tracked()
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
