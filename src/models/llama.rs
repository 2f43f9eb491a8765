//! A Llama-architecture decoder (SmolLM2, Llama 2/3, TinyLlama...) loaded from a GGUF file,
//! with [`MultiHeadAttention`] as its attention and a [`KvCache`] per layer.
//!
//! The GGUF's tensors are dequantized once (to f32, then the requested dtype) and read through a
//! [`VarBuilder`] under their GGUF names: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v,
//! attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, `output` (absent when the
//! embeddings are tied, as in SmolLM2). Attention is
//! `MultiHeadAttention::load(cfg, &WeightLayout::custom("attn_q", "attn_k", "attn_v", "attn_output"), vb.pp("blk.N"))`
//! with grouped KV heads and no biases; RMSNorm, the SwiGLU MLP and the embeddings are candle-nn's.
//!
//! RoPE: llama.cpp's converter permutes the rows of `attn_q` / `attn_k` so that its interleaved
//! rotation (pairs `2i, 2i+1`) reproduces Hugging Face's half-split one; GGUF weights therefore
//! take [`RopeStyle::Interleaved`] (candle-nn's `rope_i`, as candle-transformers'
//! `quantized_llama`). Hugging Face transformers un-permutes the same weights when it loads a
//! GGUF and rotates half-split; both give the same logits (tests/smollm2.rs).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_mha::models::llama::{Llama, LlamaCache};
//! let dev = Device::Cpu;
//! let model = Llama::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", DType::F32, &dev)?;
//! let mut cache = LlamaCache::new(&model);
//! let prompt = Tensor::new(&[[1u32, 9690, 198]], &dev)?;
//! let logits = model.forward(&prompt, &mut cache)?; // (1, vocab): last position
//! let next = logits.argmax(1)?; // greedy; feed it back for the next step
//! let logits = model.forward(&next.unsqueeze(1)?, &mut cache)?;
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use crate::cache::{KvCache, PagedKvPool, PagedPoolConfig, PagedStep, SeqId};
use crate::mha::{MhaInput, MultiHeadAttention, NeedWeights};
use crate::proj::Proj;
use crate::rope::{Rope, RopeStyle};
use crate::{MhaConfig, WeightLayout};

/// Hyper-parameters read from the GGUF metadata (`llama.*`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width (`llama.embedding_length`).
    pub hidden_size: usize,
    /// MLP width (`llama.feed_forward_length`).
    pub intermediate_size: usize,
    /// Number of decoder blocks (`llama.block_count`).
    pub num_layers: usize,
    /// Query heads (`llama.attention.head_count`).
    pub num_heads: usize,
    /// Key/value heads (`llama.attention.head_count_kv`).
    pub num_kv_heads: usize,
    /// Head size (`llama.rope.dimension_count`, else hidden / heads).
    pub head_dim: usize,
    /// RoPE base (`llama.rope.freq_base`).
    pub rope_theta: f64,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f64,
    /// Maximum positions (`llama.context_length`): the RoPE table size.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the embedding matrix (no `output.weight`).
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// From a parsed GGUF header.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = match md.get("general.architecture") {
            Some(v) => v.to_string()?.clone(),
            None => "llama".to_string(),
        };
        if arch != "llama" {
            bail!("expected a llama-architecture GGUF, got general.architecture = {arch}")
        }
        let get = |k: &str| -> Result<&gguf_file::Value> {
            md.get(k)
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata lacks {k}")))
        };
        let u = |k: &str| -> Result<usize> { Ok(get(k)?.to_u32()? as usize) };
        let hidden_size = u("llama.embedding_length")?;
        let num_heads = u("llama.attention.head_count")?;
        let head_dim = match md.get("llama.rope.dimension_count") {
            Some(v) => v.to_u32()? as usize,
            None => hidden_size / num_heads,
        };
        let vocab_size = match md.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| candle_core::Error::Msg("GGUF lacks token_embd.weight".into()))?,
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: u("llama.feed_forward_length")?,
            num_layers: u("llama.block_count")?,
            num_heads,
            num_kv_heads: match md.get("llama.attention.head_count_kv") {
                Some(v) => v.to_u32()? as usize,
                None => num_heads,
            },
            head_dim,
            rope_theta: match md.get("llama.rope.freq_base") {
                Some(v) => v.to_f32()? as f64,
                None => 10_000.0,
            },
            rms_norm_eps: get("llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            max_position_embeddings: u("llama.context_length")?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        })
    }

    /// The attention configuration of every block.
    pub fn attention(&self) -> MhaConfig {
        MhaConfig::new(self.hidden_size, self.num_heads)
            .with_num_kv_heads(self.num_kv_heads)
            .with_head_dim(self.head_dim)
            .with_bias(false)
            .with_batch_first(true)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(xs)?)?;
        self.down.forward(&(g * self.up.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: MultiHeadAttention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

fn linear(vb: &VarBuilder, name: &str, out: usize, inp: usize) -> Result<Proj> {
    Ok(Proj::new(Linear::new(
        vb.get((out, inp), &format!("{name}.weight"))?,
        None,
    )))
}

/// Per-layer KV caches of one [`Llama`] generation (batch of sequences).
#[derive(Debug, Clone)]
pub struct LlamaCache {
    layers: Vec<KvCache>,
}

impl LlamaCache {
    /// Empty caches for every layer of `model`.
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: vec![KvCache::new(); model.cfg.num_layers],
        }
    }

    /// Empty caches for every layer of `model`, storing keys and values in `format` (e.g.
    /// [`KvFormat::Int8`](crate::KvFormat::Int8): half the memory of bf16).
    pub fn with_format(model: &Llama, format: crate::KvFormat) -> Self {
        Self {
            layers: vec![KvCache::new().with_format(format); model.cfg.num_layers],
        }
    }

    /// Bytes allocated for every layer's keys and values (and scales).
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::memory_bytes).sum()
    }

    /// Cached positions (slots, left padding included).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, KvCache::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (keeps the allocations).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvCache::reset);
    }

    /// Keeps the first `n` positions.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.truncate(n))
    }

    /// The cache of layer `i`.
    pub fn layer(&self, i: usize) -> Option<&KvCache> {
        self.layers.get(i)
    }
}

/// A Llama decoder on candle-mha attention. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Proj,
    rope: Rope,
}

impl Llama {
    /// Reads a llama-architecture GGUF, dequantizing every tensor to `dtype` on `device`.
    pub fn from_gguf(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        let cfg = LlamaConfig::from_gguf(&content)?;
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let qt = content.tensor(&mut file, name, device)?;
            tensors.insert(name.clone(), qt.dequantize(device)?);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::load(cfg, vb)
    }

    /// Builds the model from tensors under their GGUF names (see the [module docs](self)).
    pub fn load(cfg: LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let emb = vb.get((v, h), "token_embd.weight")?;
        let layout = WeightLayout::custom("attn_q", "attn_k", "attn_v", "attn_output");
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let vb = vb.pp(format!("blk.{i}"));
                Ok(Block {
                    attn_norm: RmsNorm::new(vb.get(h, "attn_norm.weight")?, cfg.rms_norm_eps),
                    attn: MultiHeadAttention::load(cfg.attention(), &layout, vb.clone())?,
                    ffn_norm: RmsNorm::new(vb.get(h, "ffn_norm.weight")?, cfg.rms_norm_eps),
                    mlp: Mlp {
                        gate: linear(&vb, "ffn_gate", cfg.intermediate_size, h)?,
                        up: linear(&vb, "ffn_up", cfg.intermediate_size, h)?,
                        down: linear(&vb, "ffn_down", h, cfg.intermediate_size)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Proj::new(Linear::new(emb.clone(), None))
        } else {
            linear(&vb, "output", v, h)?
        };
        let rope = Rope::from_theta(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.max_position_embeddings,
            RopeStyle::Interleaved,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed: Embedding::new(emb, h),
            blocks,
            norm: RmsNorm::new(vb.get(h, "output_norm.weight")?, cfg.rms_norm_eps),
            lm_head,
            rope,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The final hidden states `(B, L, hidden)` of the new tokens `ids` `(B, L)` (u32), appending
    /// their keys/values to `cache`. `left_padding` (first call only): the first `pad[b]` tokens
    /// of sequence `b` are padding (see [`crate::cache`]).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        left_padding: Option<&[usize]>,
        cache: &mut LlamaCache,
    ) -> Result<Tensor> {
        Ok(self
            .run_layers(ids, left_padding, cache, NeedWeights::No)?
            .0)
    }

    /// Every block on the new tokens (see [`Self::hidden_states`]), one mask plan for all; the
    /// per-layer attention weights when `need` asks for them.
    fn run_layers(
        &self,
        ids: &Tensor,
        left_padding: Option<&[usize]>,
        cache: &mut LlamaCache,
        need: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        crate::pool::on_pool(ids.elem_count(), || {
            self.run_layers_here(ids, left_padding, cache, need)
        })
    }

    /// [`Self::run_layers`] on the calling thread.
    fn run_layers_here(
        &self,
        ids: &Tensor,
        left_padding: Option<&[usize]>,
        cache: &mut LlamaCache,
        need: NeedWeights,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if cache.layers.len() != self.blocks.len() {
            bail!(
                "LlamaCache has {} layers, the model {}",
                cache.layers.len(),
                self.blocks.len()
            )
        }
        let mut x = self.embed.forward(ids)?;
        let with_padding = |input: MhaInput| match left_padding {
            Some(pad) => input.left_padding(pad),
            None => input,
        };
        // One mask plan for every layer (bottom-right causal over cache + new rows, padding):
        // all layers' caches hold the same positions.
        let plan = match (self.blocks.first(), cache.layers.first()) {
            (Some(first), Some(kv)) => Some(
                first
                    .attn
                    .mask_plan_cached(&with_padding(MhaInput::new(x.clone())), kv)?,
            ),
            _ => None,
        };
        let mut attentions = Vec::new();
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let mut input = with_padding(MhaInput::new(block.attn_norm.forward(&x)?))
                .rope(self.rope.clone())
                .need_weights(need);
            if let Some(plan) = &plan {
                input = input.mask_plan(plan.clone());
            }
            let out = block.attn.attend_cached(&input, kv)?;
            if need != NeedWeights::No {
                let Some(weights) = out.weights else {
                    bail!("the attention module returned no weights for {need:?}")
                };
                attentions.push(weights);
            }
            x = (x + out.output)?;
            let m = block.mlp.forward(&block.ffn_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        Ok((self.norm.forward(&x)?, attentions))
    }

    /// Logits `(B, vocab)` of the last new position (what generation needs).
    pub fn forward(&self, ids: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        self.forward_padded(ids, None, cache)
    }

    /// [`Self::forward`] for a left-padded batch (see [`Self::hidden_states`]).
    pub fn forward_padded(
        &self,
        ids: &Tensor,
        left_padding: Option<&[usize]>,
        cache: &mut LlamaCache,
    ) -> Result<Tensor> {
        crate::pool::on_pool(ids.elem_count(), || {
            let h = self.hidden_states(ids, left_padding, cache)?;
            let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
            self.lm_head.forward(&last)
        })
    }

    /// Logits `(B, L, vocab)` of every new position.
    pub fn forward_all(&self, ids: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        crate::pool::on_pool(ids.elem_count(), || {
            let h = self.hidden_states(ids, None, cache)?;
            self.lm_head.forward(&h)
        })
    }

    /// Greedy next tokens `(B,)` from logits `(B, vocab)`.
    pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
        logits.argmax(D::Minus1)?.to_vec1::<u32>()
    }
}

// Continuous batching: a batch of sequences of different lengths in one forward over a paged
// KV pool.
impl Llama {
    /// The [`PagedPoolConfig`] of this model (every layer, its KV heads and head size, the
    /// weights' dtype): `num_blocks` blocks of `block_size` positions.
    pub fn paged_pool_config(&self, block_size: usize, num_blocks: usize) -> PagedPoolConfig {
        let c = &self.cfg;
        PagedPoolConfig::new(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            block_size,
            num_blocks,
            self.embed.embeddings().dtype(),
        )
    }

    /// A [`PagedKvPool`] for this model on its device (see [`Self::paged_pool_config`]).
    pub fn paged_pool(&self, block_size: usize, num_blocks: usize) -> Result<PagedKvPool> {
        PagedKvPool::new(
            self.paged_pool_config(block_size, num_blocks),
            self.embed.embeddings().device(),
        )
    }

    /// One batched forward of `step`'s sequences over `pool`: `ids` `(total_q,)` (u32) holds
    /// each sequence's new tokens packed in the step's order (a prompt being prefilled, or the
    /// last sampled token of a running sequence). Every layer writes its keys and values into
    /// the pool and attends with one mask plan built for the step; RoPE at each sequence's own
    /// positions. Returns the logits `(sequences, vocab)` of each sequence's last new token.
    /// Does not commit the step ([`PagedKvPool::commit`]; [`Self::step_paged`] does it all).
    pub fn forward_paged(
        &self,
        ids: &Tensor,
        step: &PagedStep,
        pool: &mut PagedKvPool,
    ) -> Result<Tensor> {
        crate::pool::on_pool(ids.elem_count(), || {
            self.forward_paged_here(ids, step, pool)
        })
    }

    /// [`Self::forward_paged`] on the calling thread.
    fn forward_paged_here(
        &self,
        ids: &Tensor,
        step: &PagedStep,
        pool: &mut PagedKvPool,
    ) -> Result<Tensor> {
        if pool.config().num_layers != self.blocks.len() {
            bail!(
                "forward_paged: the pool has {} layers, the model {}",
                pool.config().num_layers,
                self.blocks.len()
            )
        }
        if ids.dims() != [step.total_q()] {
            bail!(
                "forward_paged: ids must be ({},) (the step's new tokens, packed), got {:?}",
                step.total_q(),
                ids.dims()
            )
        }
        let last: Vec<u32> = step
            .last_rows()
            .into_iter()
            .enumerate()
            .map(|(b, r)| match r {
                Some(r) => Ok(r as u32),
                None => bail!("forward_paged: sequence {b} of the step has no new token"),
            })
            .collect::<Result<_>>()?;
        let mut x = self.embed.forward(ids)?;
        let Some(first) = self.blocks.first() else {
            bail!("forward_paged: the model has no layers")
        };
        // One mask plan for every layer: the step's packed sequences, bottom-right causal.
        let plan = first.attn.mask_plan_paged(step)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let input = MhaInput::new(block.attn_norm.forward(&x)?)
                .rope(self.rope.clone())
                .mask_plan(plan.clone());
            let out = block.attn.attend_paged(&input, pool, i, step)?;
            x = (x + out.output)?;
            let m = block.mlp.forward(&block.ffn_norm.forward(&x)?)?;
            x = (x + m)?;
        }
        let idx = Tensor::from_vec(last, step.num_seqs(), x.device())?;
        let h = self.norm.forward(&x.index_select(&idx, 0)?)?;
        self.lm_head.forward(&h)
    }

    /// [`Self::forward_paged`] from the start of the step to its commit: `batch` lists
    /// sequences and their new tokens (at least one each). Returns the logits
    /// `(sequences, vocab)` of each sequence's last new token, in `batch`'s order.
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device};
    /// # use candle_mha::models::llama::Llama;
    /// let model = Llama::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", DType::F32, &Device::Cpu)?;
    /// let mut pool = model.paged_pool(16, 512)?; // 512 blocks of 16 positions
    /// let (a, b) = (pool.add_sequence(), pool.add_sequence());
    /// let logits = model.step_paged(&[(a, &[1, 9690, 198][..]), (b, &[1, 28120][..])], &mut pool)?;
    /// let next = Llama::argmax(&logits)?; // one token per sequence
    /// // Next step: both decode (more requests may join with their prompts).
    /// let logits = model.step_paged(&[(a, &next[..1]), (b, &next[1..])], &mut pool)?;
    /// pool.release(a)?; // finished: its blocks go back to the pool
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn step_paged(&self, batch: &[(SeqId, &[u32])], pool: &mut PagedKvPool) -> Result<Tensor> {
        let lens: Vec<(SeqId, usize)> = batch.iter().map(|&(id, t)| (id, t.len())).collect();
        let step = pool.begin_step(&lens)?;
        let ids: Vec<u32> = batch.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, step.total_q(), self.embed.embeddings().device())?;
        let logits = self.forward_paged(&ids, &step, pool)?;
        pool.commit(&step)?;
        Ok(logits)
    }
}

// Attention weights per layer (Hugging Face `output_attentions=True`): the same block code as
// the generation path, asking the attention modules for their weights.
impl Llama {
    /// [`Llama::hidden_states`] that also returns every layer's attention probabilities, like
    /// Hugging Face's `LlamaForCausalLM(..., output_attentions=True)` with eager attention: the
    /// final (normed) hidden states `(B, L, hidden)` of the new tokens and one `(B, H, L, S)`
    /// tensor per layer, first layer first, over all `S` = cached + new positions (causal: 0
    /// above the diagonal). `H` counts query heads (grouped KV heads are shared, not averaged).
    /// Each layer's weights are what its attention module returns for
    /// [`NeedWeights::PerHead`] through
    /// [`MultiHeadAttention::attend_cached`] (the reference kernel).
    ///
    /// ```no_run
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_mha::models::llama::{Llama, LlamaCache};
    /// # let dev = Device::Cpu;
    /// let model = Llama::from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", DType::F32, &dev)?;
    /// let ids = Tensor::new(&[[28120u32, 905, 314, 253, 1345]], &dev)?;
    /// let (_hidden, attentions) =
    ///     model.forward_with_attentions(&ids, None, &mut LlamaCache::new(&model))?;
    /// assert_eq!(attentions[0].dims(), &[1, model.config().num_heads, 5, 5]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn forward_with_attentions(
        &self,
        ids: &Tensor,
        left_padding: Option<&[usize]>,
        cache: &mut LlamaCache,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.run_layers(ids, left_padding, cache, NeedWeights::PerHead)
    }
}
