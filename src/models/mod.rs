//! Models built on candle-mha, written as model files a candle user can copy.
//!
//! - [`bert`]: a BERT encoder (Hugging Face `BertModel` checkpoints as they are) whose attention
//!   is [`MultiHeadAttention`](crate::MultiHeadAttention) with [`WeightLayout::bert`](crate::WeightLayout::bert),
//!   and exact GELU as one vectorised CPU pass (its feed-forward activation).
//! - [`sentence`]: sentence-transformers pooling and normalisation on top of it, configured by
//!   the model directory's own files (e.g. all-MiniLM-L6-v2; see the `embed` example).
//! - [`llama`]: a Llama-architecture decoder (SmolLM2) read from a GGUF file, attention on
//!   [`MultiHeadAttention::attend_cached`](crate::MultiHeadAttention::attend_cached) with a
//!   [`KvCache`](crate::KvCache) per layer and RoPE (see the `generate` example).
//!
//! Both models return every layer's attention weights on request
//! ([`BertModel::forward_with_attentions`](bert::BertModel::forward_with_attentions),
//! [`Llama::forward_with_attentions`](llama::Llama::forward_with_attentions)), like Hugging
//! Face's `output_attentions=True`; the `attention_map` example draws them.
//!
//! They are examples of use as much as library code: the attention module knows nothing of them.

pub mod bert;
internal! { mod gelu; }
pub mod llama;
mod norm;
pub mod sentence;
