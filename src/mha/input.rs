//! [`MhaInput`] (the inputs of one call, built fluently), [`MhaOutput`] and [`NeedWeights`].

use candle_core::{bail, Result, Tensor};

use crate::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskPlan};
use crate::rope::{PositionalHook, Rope};
use crate::sdpa::SeqOffsets;

/// Whether (and how) to return attention weights: PyTorch's `need_weights` and
/// `average_attn_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
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
    pub(crate) query: Tensor,
    /// Keys (`None`: the query).
    pub(crate) key: Option<Tensor>,
    /// Values (`None`: the query).
    pub(crate) value: Option<Tensor>,
    /// Keys to ignore per batch element.
    pub(crate) key_padding_mask: Option<KeyPaddingMask>,
    /// Explicit attention mask.
    pub(crate) attn_mask: Option<AttnMask>,
    /// The crate's causal mask, with its alignment.
    pub(crate) causal: Option<CausalAlignment>,
    /// Sliding window of the causal mask (requires `causal`).
    pub(crate) sliding_window: Option<usize>,
    /// Whether to return the attention weights.
    pub(crate) need_weights: NeedWeights,
    /// Applied to the projected queries and keys (e.g. RoPE); see [`crate::rope`].
    pub(crate) positional: Option<PositionalHook>,
    /// Left padding per batch element (self-attention): see [`Self::left_padding`].
    pub(crate) left_padding: Option<Vec<usize>>,
    /// A prebuilt mask plan replacing the masks above: see [`Self::mask_plan`].
    pub(crate) plan: Option<MaskPlan>,
    /// Packed sequences: query offsets and key offsets (see [`Self::packed`]).
    pub(crate) packed: Option<(SeqOffsets, SeqOffsets)>,
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
            positional: None,
            left_padding: None,
            plan: None,
            packed: None,
        }
    }

    /// Self-attention over sequences packed without padding: `tokens` is `(total, E)`, the
    /// sequences one after the other, `offsets` says where each starts (see [`SeqOffsets`]).
    /// Each token attends only to its own sequence's tokens; [`Self::causal`] and
    /// [`Self::sliding_window`] apply within each sequence, and a positional hook (RoPE) counts
    /// positions from 0 at each sequence's start. The output is `(total, E)`, whatever
    /// `batch_first` says. Key padding, attention masks and left padding do not apply (there is
    /// no padding); a KV cache neither.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_mha::{MhaInput, SeqOffsets};
    /// let tokens = Tensor::zeros((7, 8), candle_core::DType::F32, &Device::Cpu)?; // 3 + 4 tokens
    /// let input = MhaInput::packed(tokens, SeqOffsets::from_lengths(&[3, 4]));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn packed(tokens: Tensor, offsets: SeqOffsets) -> Self {
        let mut input = Self::new(tokens);
        input.packed = Some((offsets.clone(), offsets));
        input
    }

    /// Cross-attention between packed sequences: `query` `(total_q, E)` with `q_offsets`,
    /// `key` / `value` `(total_k, kdim / vdim)` with `kv_offsets` (the same number of
    /// sequences); sequence `b`'s queries attend only to sequence `b`'s keys. See
    /// [`Self::packed`].
    pub fn packed_cross(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        q_offsets: SeqOffsets,
        kv_offsets: SeqOffsets,
    ) -> Self {
        let mut input = Self::cross(query, key, value);
        input.packed = Some((q_offsets, kv_offsets));
        input
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

    /// Uses `plan` (built once per forward with [`MultiHeadAttention::mask_plan`] or
    /// [`MultiHeadAttention::mask_plan_cached`], and shared by every layer) instead of building
    /// one from this input's masks. The input must then carry no key padding mask, attention
    /// mask, causal mask or window: they are in the plan. Left padding still sets the positions
    /// the positional hook sees (and is recorded by a cache); its keys must be masked by the
    /// plan, as the plan methods do when the input they are given has it.
    ///
    /// [`MultiHeadAttention::mask_plan`]: crate::MultiHeadAttention::mask_plan
    /// [`MultiHeadAttention::mask_plan_cached`]: crate::MultiHeadAttention::mask_plan_cached
    pub fn mask_plan(mut self, plan: MaskPlan) -> Self {
        self.plan = Some(plan);
        self
    }

    /// The query tensor.
    pub fn query(&self) -> &Tensor {
        &self.query
    }

    /// The causal mask this input asks for: alignment plus sliding window.
    pub(crate) fn causal_mask(&self) -> Result<Option<Causal>> {
        match (self.causal, self.sliding_window) {
            (Some(alignment), window) => Ok(Some(Causal { alignment, window })),
            (None, Some(w)) => {
                bail!("sliding_window({w}) needs a causal mask: add .causal(CausalAlignment::...)")
            }
            (None, None) => Ok(None),
        }
    }

    /// Asks for the attention weights.
    pub fn need_weights(mut self, w: NeedWeights) -> Self {
        self.need_weights = w;
        self
    }

    /// Applies the rotary embedding `rope` to the projected queries and keys, after the split
    /// into heads and before caching (see [`crate::rope`] for the positions it sees).
    pub fn rope(mut self, rope: Rope) -> Self {
        self.positional = Some(PositionalHook::from(rope));
        self
    }

    /// Self-attention over left-padded (right-aligned) sequences: the first `pad[b]` rows of
    /// batch element `b` are padding. Their keys are masked for every query, and positions are
    /// counted per sequence from its first real row (row `t` is position `t - pad[b]`). With
    /// [`MultiHeadAttention::attend_cached`](crate::MultiHeadAttention::attend_cached) it is given on the first call into an empty cache,
    /// which records it (see [`crate::cache`]). Cannot be combined with a key padding mask.
    pub fn left_padding(mut self, pad: &[usize]) -> Self {
        self.left_padding = Some(pad.to_vec());
        self
    }
}

/// What [`MultiHeadAttention::attend`](crate::MultiHeadAttention::attend) returns.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MhaOutput {
    /// Same layout as the query, with `embed_dim` features, in the input dtype.
    pub output: Tensor,
    /// Attention probabilities when asked for (see [`NeedWeights`]), in the input dtype.
    /// In training mode with dropout they are the dropped-out weights, as in PyTorch.
    pub weights: Option<Tensor>,
    /// The attention kernel that served the call (see [`crate::kernels`]); compares with its
    /// name (`out.kernel == "cpu"`).
    pub kernel: crate::KernelId,
}
