//! Models built on candle-mha, written as model files a candle user can copy.
//!
//! - [`bert`]: a BERT encoder (Hugging Face `BertModel` checkpoints as they are) whose attention
//!   is [`MultiHeadAttention`](crate::MultiHeadAttention) with [`WeightLayout::bert`](crate::WeightLayout::bert).
//! - [`sentence`]: sentence-transformers pooling and normalisation on top of it, configured by
//!   the model directory's own files (e.g. all-MiniLM-L6-v2; see the `embed` example).
//!
//! They are examples of use as much as library code: the attention module knows nothing of them.

pub mod bert;
pub mod sentence;
