//! A BERT encoder (Hugging Face `BertModel`, without the pooler) whose attention is
//! [`MultiHeadAttention`] loaded with [`WeightLayout::bert`].
//!
//! Everything else is plain candle-nn: [`Embedding`]s, [`LayerNorm`]s and
//! [`Linear`](candle_nn::Linear)s (run on the crate's packed GEMM; in f32 the feed-forward
//! block's two projections, GELU and residual + layer norm in one fused pass), under the
//! checkpoint's own tensor names, so any `BertModel` checkpoint (`model.safetensors` with
//! `embeddings.*` and `encoder.layer.N.*`) loads as it is. The hyper-parameters come from the
//! checkpoint's `config.json` ([`BertConfig`]).
//!
//! ```text
//! embeddings:  LayerNorm(word[ids] + position[0..L] + token_type[tt])
//! layer i:     a = LayerNorm(x + MHA(x))                        (HF BertAttention)
//!              y = LayerNorm(a + output(act(intermediate(a))))  (HF BertIntermediate/BertOutput)
//! ```
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_mha::models::bert::{BertConfig, BertModel};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let cfg = BertConfig::from_file("all-MiniLM-L6-v2/config.json")?;
//! let data = std::fs::read("all-MiniLM-L6-v2/model.safetensors")?;
//! let vb = candle_nn::VarBuilder::from_buffered_safetensors(data, DType::F32, &dev)?;
//! let bert = BertModel::load(&cfg, vb)?;
//! let ids = Tensor::new(&[[101u32, 7592, 2088, 102], [101, 7592, 102, 0]], &dev)?;
//! let keep = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &dev)?; // HF attention_mask
//! let hidden = bert.forward(&ids, None, Some(&keep))?; // (2, 4, hidden_size)
//! # Ok(()) }
//! ```

use std::path::Path;

use candle_core::{bail, DType, Error, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::norm::{add_layer_norm, LnRows};
use crate::proj::Proj;
use crate::{
    KeyPaddingMask, MaskPlan, MhaConfig, MhaInput, MultiHeadAttention, NeedWeights, SeqOffsets,
    WeightLayout,
};

internal! {
    /// The feed-forward activation (`hidden_act` in `config.json`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
    #[serde(rename_all = "snake_case")]
    #[non_exhaustive]
    enum HiddenAct {
        /// Exact GELU, `x·Φ(x)` with the error function (HF `"gelu"`).
        #[default]
        Gelu,
        /// The tanh approximation of GELU (HF `"gelu_new"`, `"gelu_pytorch_tanh"`).
        #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
        GeluNew,
        /// `max(x, 0)`.
        Relu,
    }
}

impl HiddenAct {
    /// Applies the activation.
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            HiddenAct::Gelu => super::gelu::gelu_erf(xs),
            HiddenAct::GeluNew => xs.gelu(),
            HiddenAct::Relu => xs.relu(),
        }
    }
}

internal! {
    /// How positions are encoded (`position_embedding_type`); only learnt absolute positions are
    /// supported.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
    #[serde(rename_all = "snake_case")]
    #[non_exhaustive]
    enum PositionEmbeddingType {
        /// A learnt embedding per position `0..max_position_embeddings`.
        #[default]
        Absolute,
        /// Shaw et al. relative keys (not supported: [`BertModel::load`] rejects it).
        RelativeKey,
        /// Huang et al. relative keys and queries (not supported).
        RelativeKeyQuery,
    }
}

/// The fields of a Hugging Face BERT `config.json` that the encoder uses (unknown fields are
/// ignored, missing optional ones take HF's defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct BertConfig {
    /// Size of the WordPiece vocabulary.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`hidden_size / num_attention_heads` per head).
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation (`"gelu"`, `"gelu_new"` / `"gelu_pytorch_tanh"`, `"relu"`).
    #[serde(default)]
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub hidden_act: HiddenAct,
    #[serde(default)]
    #[cfg(not(feature = "internals"))]
    pub(crate) hidden_act: HiddenAct,
    /// Number of learnt positions: the longest input the model accepts.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Token id used for padding.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Position encoding (only `"absolute"` is supported).
    #[serde(default)]
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub position_embedding_type: PositionEmbeddingType,
    #[serde(default)]
    #[cfg(not(feature = "internals"))]
    pub(crate) position_embedding_type: PositionEmbeddingType,
}

fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Parses a `config.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::Msg(format!("invalid BERT config: {e}")))
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&json).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The attention configuration of every layer: BERT attention is PyTorch's with biases,
    /// batch-first.
    pub fn mha_config(&self) -> MhaConfig {
        MhaConfig::new(self.hidden_size, self.num_attention_heads).with_batch_first(true)
    }
}

internal! {
    /// Word + position + token-type embeddings, then LayerNorm (HF `BertEmbeddings`).
    #[derive(Debug, Clone)]
    struct BertEmbeddings {
        word_embeddings: Embedding,
        position_embeddings: Embedding,
        token_type_embeddings: Embedding,
        layer_norm: LayerNorm,
        max_positions: usize,
    }
}

impl BertEmbeddings {
    /// Loads `word_embeddings`, `position_embeddings`, `token_type_embeddings` and `LayerNorm`
    /// from `vb` (the `embeddings` prefix).
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// `input_ids` (B, L) integer; `token_type_ids` (B, L), all 0 when `None`. Returns
    /// (B, L, hidden_size).
    pub fn forward(&self, input_ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let (_b, l) = input_ids.dims2()?;
        if l > self.max_positions {
            bail!(
                "input has {l} tokens but the model has only {} positions (truncate it)",
                self.max_positions
            )
        }
        let positions = Tensor::arange(0u32, l as u32, input_ids.device())?;
        self.embed(input_ids, token_type_ids, &positions)
    }

    /// Packed sequences: `input_ids` (total,) holds the sequences one after the other,
    /// `offsets` where each starts; positions restart at 0 for every sequence. Returns
    /// (total, hidden_size).
    pub fn forward_packed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        offsets: &SeqOffsets,
    ) -> Result<Tensor> {
        let total = input_ids.dims1()?;
        if total != offsets.total() {
            bail!(
                "input_ids: expected ({},) packed tokens (the offsets' total), got shape {:?}",
                offsets.total(),
                input_ids.dims()
            )
        }
        if offsets.max_len() > self.max_positions {
            bail!(
                "a packed sequence has {} tokens but the model has only {} positions (truncate it)",
                offsets.max_len(),
                self.max_positions
            )
        }
        let pos: Vec<u32> = offsets.positions().into_iter().map(|p| p as u32).collect();
        let positions = Tensor::from_vec(pos, total, input_ids.device())?;
        self.embed(input_ids, token_type_ids, &positions)
    }

    fn embed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        positions: &Tensor,
    ) -> Result<Tensor> {
        let token_types = match token_type_ids {
            Some(t) => t.clone(),
            None => input_ids.zeros_like()?,
        };
        let xs = self
            .word_embeddings
            .forward(input_ids)?
            .add(&self.token_type_embeddings.forward(&token_types)?)?
            .broadcast_add(&self.position_embeddings.forward(positions)?)?;
        self.layer_norm.forward(&xs)
    }
}

internal! {
    /// One encoder layer (HF `BertLayer`): attention block, then feed-forward block.
    #[derive(Debug, Clone)]
    struct BertLayer {
        attention: MultiHeadAttention,
        attention_norm: LayerNorm,
        intermediate: Proj,
        output: Proj,
        output_norm: LayerNorm,
        act: HiddenAct,
        /// `attention_norm` / `output_norm` as f32 rows for the fused residual + layer norm (f32
        /// CPU weights only).
        attention_rows: Option<LnRows>,
        output_rows: Option<LnRows>,
    }
}

impl BertLayer {
    /// Loads one layer from `vb` (the `encoder.layer.N` prefix): the attention with
    /// [`WeightLayout::bert`] (`attention.self.{query,key,value}`, `attention.output.dense`),
    /// then `attention.output.LayerNorm`, `intermediate.dense`, `output.dense`,
    /// `output.LayerNorm`.
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attention_norm =
            layer_norm(h, cfg.layer_norm_eps, vb.pp("attention.output.LayerNorm"))?;
        let output_norm = layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?;
        Ok(Self {
            attention: MultiHeadAttention::load(
                cfg.mha_config(),
                &WeightLayout::bert(),
                vb.clone(),
            )?,
            attention_rows: LnRows::of(&attention_norm)?,
            output_rows: LnRows::of(&output_norm)?,
            attention_norm,
            intermediate: linear(h, i, vb.pp("intermediate.dense"))?.into(),
            output: linear(i, h, vb.pp("output.dense"))?.into(),
            output_norm,
            act: cfg.hidden_act,
        })
    }

    /// The layer's multi-head attention: self-attention plus output projection, *without* the
    /// residual and `attention.output.LayerNorm`.
    pub fn attention(&self) -> &MultiHeadAttention {
        &self.attention
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
    /// The attention block, HF `BertAttention`: `LayerNorm(x + MHA(x))`. `plan` holds the
    /// padding (built once per forward: see [`BertModel::forward_with_padding`]).
    pub fn attention_block(&self, xs: &Tensor, plan: Option<&MaskPlan>) -> Result<Tensor> {
        Ok(self.attend(xs, plan, NeedWeights::No)?.0)
    }

    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
    /// The whole layer on `xs` (B, L, hidden_size); `plan` says which keys are padding.
    pub fn forward(&self, xs: &Tensor, plan: Option<&MaskPlan>) -> Result<Tensor> {
        Ok(self.run(xs, plan, NeedWeights::No)?.0)
    }

    /// The attention block and, when `need` asks for them, the attention weights.
    fn attend(
        &self,
        xs: &Tensor,
        plan: Option<&MaskPlan>,
        need: NeedWeights,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut input = MhaInput::new(xs.clone()).need_weights(need);
        if let Some(p) = plan {
            input = input.mask_plan(p.clone());
        }
        let out = self.attention.attend(&input)?;
        Ok((
            add_layer_norm(
                &out.output,
                xs,
                &self.attention_norm,
                self.attention_rows.as_ref(),
            )?,
            out.weights,
        ))
    }

    /// The whole layer and, when `need` asks for them, the attention weights.
    fn run(
        &self,
        xs: &Tensor,
        plan: Option<&MaskPlan>,
        need: NeedWeights,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (a, weights) = self.attend(xs, plan, need)?;
        Ok((self.feed_forward(&a)?, weights))
    }

    /// The feed-forward block, HF `BertIntermediate` + `BertOutput`:
    /// `LayerNorm(a + output(act(intermediate(a))))`. In f32 on the CPU the activation and the
    /// residual + layer norm run inside the two GEMMs, on each row as it is finished.
    fn feed_forward(&self, a: &Tensor) -> Result<Tensor> {
        let f32_cpu = a.dtype() == DType::F32 && a.device().is_cpu() && !a.track_op();
        let gelu = |_: usize, row: &mut [f32]| super::gelu::gelu_in_place(row);
        if let (HiddenAct::Gelu, Some(rows), true) = (self.act, &self.output_rows, f32_cpu) {
            // Both products in one pass over blocks of rows, the GELU and the residual + layer
            // norm applied to each row as it is finished (the input row is the residual).
            let add_norm = |row: &mut [f32], input: &[f32]| rows.add_norm(row, input);
            let fused = crate::proj::mlp(
                a,
                (&self.intermediate, &gelu),
                (&self.output, Some(&add_norm)),
            )?;
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        let inner = self.act.apply(&self.intermediate.forward(a)?)?;
        let ff = self.output.forward(&inner)?;
        add_layer_norm(&ff, a, &self.output_norm, self.output_rows.as_ref())
    }
}

/// The BERT encoder: embeddings and `num_hidden_layers` encoder layers. Returns the last
/// hidden state (HF `BertModel(...).last_hidden_state`); the pooler is not loaded.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
}

impl BertModel {
    /// Loads the encoder from `vb` pointed at the checkpoint root (`embeddings.*`,
    /// `encoder.layer.N.*`). Checkpoints saved from `BertFor*` heads prefix these with `bert.`:
    /// pass `vb.pp("bert")` for them.
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.position_embedding_type != PositionEmbeddingType::Absolute {
            bail!(
                "position_embedding_type {:?} is not supported (only absolute)",
                cfg.position_embedding_type
            )
        }
        let embeddings = BertEmbeddings::load(cfg, vb.pp("embeddings"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { embeddings, layers })
    }

    internal! {
        /// The embedding layer.
        fn embeddings(&self) -> &BertEmbeddings {
            &self.embeddings
        }
    }

    internal! {
        /// The encoder layers.
        fn layers(&self) -> &[BertLayer] {
            &self.layers
        }
    }

    /// Runs the encoder. `input_ids` (B, L) integer; `token_type_ids` (B, L), all 0 when `None`;
    /// `attention_mask` (B, L) integer in Hugging Face's polarity (1 = token, 0 = padding), no
    /// padding when `None`. Returns (B, L, hidden_size) in the weights' dtype.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let padding = attention_mask
            .map(KeyPaddingMask::from_keep_mask)
            .transpose()?;
        self.forward_with_padding(input_ids, token_type_ids, padding.as_ref())
    }

    /// [`BertModel::forward`] with the padding given as a [`KeyPaddingMask`] (e.g.
    /// [`KeyPaddingMask::from_lengths`] for right-padded batches). The padding is validated and
    /// turned into a [`MaskPlan`] once, shared by every layer.
    pub fn forward_with_padding(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        padding: Option<&KeyPaddingMask>,
    ) -> Result<Tensor> {
        let xs = self.embeddings.forward(input_ids, token_type_ids)?;
        let plan = self.padding_plan(&xs, padding)?;
        Ok(self.run_layers(xs, plan.as_ref(), NeedWeights::No)?.0)
    }

    /// The mask plan of `padding` over the embedded `xs`, built once for every layer.
    fn padding_plan(
        &self,
        xs: &Tensor,
        padding: Option<&KeyPaddingMask>,
    ) -> Result<Option<MaskPlan>> {
        match (padding, self.layers.first()) {
            (Some(p), Some(first)) => {
                Ok(Some(first.attention().mask_plan(
                    &MhaInput::new(xs.clone()).key_padding_mask(p.clone()),
                )?))
            }
            _ => Ok(None),
        }
    }

    /// Every layer on `xs` with one mask plan; the per-layer weights when `need` asks for them.
    fn run_layers(
        &self,
        xs: Tensor,
        plan: Option<&MaskPlan>,
        need: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        crate::pool::on_pool(crate::pool::rows(&xs), move || {
            self.run_layers_here(xs, plan, need)
        })
    }

    /// [`Self::run_layers`] on the calling thread.
    fn run_layers_here(
        &self,
        mut xs: Tensor,
        plan: Option<&MaskPlan>,
        need: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut attentions = Vec::new();
        for layer in &self.layers {
            let (next, weights) = layer.run(&xs, plan, need)?;
            xs = next;
            if need != NeedWeights::No {
                let Some(w) = weights else {
                    bail!("the attention module returned no weights for {need:?}")
                };
                attentions.push(w);
            }
        }
        Ok((xs, attentions))
    }

    /// Runs the encoder on sequences packed without padding: `input_ids` (total,) the
    /// sequences one after the other, `token_type_ids` likewise (all 0 when `None`), `offsets`
    /// where each starts. Every token attends only to its own sequence, so no compute is spent
    /// on padding. Returns (total, hidden_size); the rows of sequence `b` equal those of a padded
    /// batch run.
    pub fn forward_packed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        offsets: &SeqOffsets,
    ) -> Result<Tensor> {
        let xs = self
            .embeddings
            .forward_packed(input_ids, token_type_ids, offsets)?;
        let plan = match self.layers.first() {
            Some(first) => Some(
                first
                    .attention()
                    .mask_plan(&MhaInput::packed(xs.clone(), offsets.clone()))?,
            ),
            None => None,
        };
        Ok(self.run_layers(xs, plan.as_ref(), NeedWeights::No)?.0)
    }
}

// Attention weights per layer (Hugging Face `output_attentions=True`): the same layer code as
// the plain forward, asking the attention modules for their weights.
impl BertLayer {
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // used by the test hooks only
    /// [`BertLayer::forward`] that also returns the layer's attention probabilities per head,
    /// `(B, H, L, L)`, as the attention module itself returns them
    /// ([`NeedWeights::PerHead`] through
    /// [`MultiHeadAttention::attend`]; the call then runs the reference kernel, the one that
    /// materialises the weights). Padded keys get weight 0.
    pub fn forward_with_attention(
        &self,
        xs: &Tensor,
        plan: Option<&MaskPlan>,
    ) -> Result<(Tensor, Tensor)> {
        let (out, weights) = self.run(xs, plan, NeedWeights::PerHead)?;
        let Some(weights) = weights else {
            bail!("the attention module returned no weights for NeedWeights::PerHead")
        };
        Ok((out, weights))
    }
}

impl BertModel {
    /// [`BertModel::forward_with_padding`] that also returns every layer's attention
    /// probabilities, like Hugging Face's `BertModel(..., output_attentions=True)`: the last hidden
    /// state `(B, L, hidden_size)` and one `(B, H, L, L)` tensor per layer, first layer first
    /// (row `i` of head `h`: how query token `i` distributes its attention over the keys). Each
    /// layer's weights come from its own attention call.
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_mha::models::bert::{BertConfig, BertModel};
    /// # fn main() -> candle_core::Result<()> {
    /// # let dev = Device::Cpu;
    /// # let cfg = BertConfig::from_file("all-MiniLM-L6-v2/config.json")?;
    /// # let data = std::fs::read("all-MiniLM-L6-v2/model.safetensors")?;
    /// # let vb = candle_nn::VarBuilder::from_buffered_safetensors(data, DType::F32, &dev)?;
    /// # let bert = BertModel::load(&cfg, vb)?;
    /// let ids = Tensor::new(&[[101u32, 7592, 2088, 102]], &dev)?;
    /// let (hidden, attentions) = bert.forward_with_attentions(&ids, None, None)?;
    /// assert_eq!(attentions.len(), cfg.num_hidden_layers);
    /// assert_eq!(attentions[0].dims(), &[1, cfg.num_attention_heads, 4, 4]);
    /// # Ok(()) }
    /// ```
    pub fn forward_with_attentions(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        padding: Option<&KeyPaddingMask>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let xs = self.embeddings.forward(input_ids, token_type_ids)?;
        let plan = self.padding_plan(&xs, padding)?;
        self.run_layers(xs, plan.as_ref(), NeedWeights::PerHead)
    }
}
