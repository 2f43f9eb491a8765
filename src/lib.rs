//! # candle-mha
//!
//! Multi-head attention for [Candle](https://github.com/huggingface/candle) that gives
//! `torch.nn.MultiheadAttention`'s numbers, loads the weight layouts real checkpoints use, and
//! runs on CPU and CUDA in f32, f16, bf16 (and f64).
//!
//! - [`MultiHeadAttention`]: the module (candle [`Module`](candle_core::Module) for plain
//!   self-attention, [`MultiHeadAttention::attend`] for everything else).
//! - [`MhaConfig`]: validated hyper-parameters (PyTorch's arguments plus GQA, head size and scale
//!   overrides).
//! - [`WeightLayout`]: PyTorch packed, BERT, Llama, GPT-2 `Conv1D`, custom names.
//! - [`MhaInput`] / [`MhaOutput`]: one call's inputs, built fluently, and its results.
//! - [`mask`]: key padding, attention masks, causal alignment, and how they merge.
//! - [`kernels`]: the kernels behind one dispatcher: which one served a call ([`KernelId`],
//!   chosen by [`Backend`]) and the process-wide settings (the reference kernel's memory budget,
//!   releasing the fused CPU kernel's buffers).
//! - [`cache`]: KV caches for incremental decoding ([`KvCache`], bottom-right causal, sliding
//!   window, left padding) and cross-attention ([`StaticKv`]).
//! - [`rope`]: rotary embeddings of q and k ([`Rope`], half-split and interleaved).
//! - [`sdpa()`](fn@sdpa) and [`sdpa_varlen`]: the attention core alone with PyTorch
//!   `F.scaled_dot_product_attention` semantics (for models that project their own q, k, v), and
//!   packed variable-length sequences ([`mod@sdpa`]).
//! - [`case`] (feature `runner`): the PyTorch parity-case runner (the `mha_case` example and the
//!   tests use it).
//! - [`models`] (feature `models`): BERT + sentence embeddings, Llama from GGUF, built on the
//!   module.
//!
//! Both features are on by default; with `default-features = false` the crate is the attention
//! library alone (candle-core, candle-nn, safetensors, gemm and rayon as dependencies). The
//! non-default feature `internals` is not part of the API: it exposes, `#[doc(hidden)]`, the hooks
//! of the crate's own tests, benchmarks and fuzz targets.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_mha::{CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let mha = MultiHeadAttention::new(MhaConfig::new(16, 4).with_batch_first(true), vb)?;
//! // Fresh `Var` weights are tracked by autograd; for inference, take the detached view (same
//! // weights) so that calls record no graph (see `MultiHeadAttention::inference`).
//! let mha = mha.inference();
//! let x = Tensor::randn(0f32, 1., (2, 6, 16), &dev)?;
//! let out = mha.attend(
//!     &MhaInput::new(x)
//!         .key_padding_mask(KeyPaddingMask::from_lengths(&[6, 4]))
//!         .causal(CausalAlignment::TopLeft),
//! )?;
//! assert_eq!(out.output.dims(), &[2, 6, 16]);
//! assert_eq!(out.kernel, "cpu"); // the fused CPU kernel served it
//! # Ok::<(), candle_core::Error>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// The module list above links the feature-gated modules.
#![cfg_attr(
    not(all(feature = "models", feature = "runner")),
    allow(rustdoc::broken_intra_doc_links)
)]

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Declares an item `pub` and `#[doc(hidden)]` with the non-default feature `internals` (the
/// hooks of the crate's own tests, examples and fuzz targets, which turn the feature on through
/// the self dev-dependency in Cargo.toml), and `pub(crate)` without it: not part of the API.
/// Without the feature, an item only the hooks use is allowed to be unused.
///
/// `internal! { /// docs \n fn f() {} }` (one item: `fn`, `struct`, `enum`, `const`, `mod`,
/// `use`, …; in a module or an `impl` block).
macro_rules! internal {
    ($(#[$meta:meta])* $kw:ident $($rest:tt)*) => {
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        $(#[$meta])*
        pub $kw $($rest)*

        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        $(#[$meta])*
        pub(crate) $kw $($rest)*
    };
}

pub mod cache;
#[cfg(feature = "runner")]
#[cfg_attr(docsrs, doc(cfg(feature = "runner")))]
pub mod case;
pub mod config;
/// The fuzz harnesses (`fuzz/`, and `tests/fuzz_corpus.rs` on stable): feature `internals`.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod fuzz_support;
mod gemm;
mod isa_select;
pub mod kernels;
pub mod layout;
pub mod mask;
pub mod mha;
#[cfg(feature = "models")]
#[cfg_attr(docsrs, doc(cfg(feature = "models")))]
pub mod models;
mod pages;
mod pool;
mod proj;
pub mod rope;
pub mod sdpa;

pub use cache::{KvCache, KvFormat, StaticKv};
pub use config::{Backend, MaskedRowPolicy, MhaConfig};
pub use kernels::KernelId;
pub use layout::WeightLayout;
pub use mask::{AttnMask, CausalAlignment, KeyPaddingMask, MaskPlan};
pub use mha::{MhaInput, MhaOutput, MultiHeadAttention, NeedWeights};
pub use rope::{Rope, RopeStyle};
pub use sdpa::{sdpa, sdpa_varlen, Packing, SdpaLayout, SdpaMask, SdpaOptions, SeqOffsets};
