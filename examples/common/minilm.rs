//! all-MiniLM-L6-v2 = the HF `tokenizers` crate on the model's `tokenizer.json` + candle-mha's
//! [`SentenceEmbedder`]. Shared by `examples/embed.rs`, `examples/bench_embed.rs` and
//! `tests/minilm.rs` (each includes this file with `#[path]`).
#![allow(dead_code)]

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use candle_mha::models::sentence::SentenceEmbedder;
use tokenizers::{Tokenizer, TruncationParams};

/// The model and its tokenizer.
pub struct MiniLm {
    /// Encoder + pooling + normalisation.
    pub embedder: SentenceEmbedder,
    /// Truncates to the model's `max_seq_length`; no padding (the embedder pads).
    pub tokenizer: Tokenizer,
}

impl MiniLm {
    /// Loads the model directory (`config.json`, `model.safetensors`, `tokenizer.json`, ...).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let embedder = SentenceEmbedder::load(dir, DType::F32, device)
            .with_context(|| format!("loading the model from {}", dir.display()))?;
        let path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        // tokenizer.json pads every input to 128 and truncates at 128; sentence-transformers
        // overrides both: pad to the longest of the batch, truncate at max_seq_length (256).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: embedder.max_seq_length(),
                ..Default::default()
            }))
            .map_err(|e| anyhow!("configuring truncation: {e}"))?;
        Ok(Self {
            embedder,
            tokenizer,
        })
    }

    /// Token ids (with `[CLS]` and `[SEP]`) of each text.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Embeds `texts` in batches of `batch_size`, grouping texts of similar token length
    /// (longest first, like sentence-transformers) to pad little; returns the embeddings in
    /// the order of `texts`. `progress` is called with the size of each batch done.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let emb = self.embedder.embed_token_ids(&batch)?.to_vec2::<f32>()?;
            for (&i, e) in chunk.iter().zip(emb) {
                out[i] = e;
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// Embeds `texts` `batch_size` at a time in their own order, each batch packed without
    /// padding ([`SentenceEmbedder::embed_token_ids_packed`]): nothing to sort, no compute on
    /// padding.
    pub fn embed_packed<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(batch_size.max(1)) {
            out.extend(
                self.embedder
                    .embed_token_ids_packed(chunk)?
                    .to_vec2::<f32>()?,
            );
        }
        Ok(out)
    }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}
