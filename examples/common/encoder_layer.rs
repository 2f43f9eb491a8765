//! `torch.nn.TransformerEncoderLayer` (post-norm, ReLU, batch_first) ported to candle with
//! candle-mha's attention: what `examples/port_encoder_layer.rs` shows and
//! `tests/port_encoder_layer.rs` checks against PyTorch.
#![allow(dead_code)]

use candle_core::{Module, Result, Tensor};
use candle_mha::{KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention, WeightLayout};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};

/// One encoder layer, loaded from the `state_dict` names of PyTorch's
/// `TransformerEncoderLayer(d_model, nhead, dim_feedforward, batch_first=True)`.
pub struct EncoderLayer {
    self_attn: MultiHeadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
}

impl EncoderLayer {
    /// `vb` points at the layer (its tensors are `self_attn.in_proj_weight`, `linear1.weight`,
    /// `norm1.weight`, ...; for a layer inside a model, `vb.pp("encoder.layers.0")`).
    pub fn load(d_model: usize, nhead: usize, dim_ff: usize, vb: VarBuilder) -> Result<Self> {
        // PyTorch's nn.MultiheadAttention inside the layer: its own state_dict names
        // (WeightLayout::torch) under `self_attn`; batch_first as the layer's.
        let cfg = MhaConfig::new(d_model, nhead).with_batch_first(true);
        let self_attn = MultiHeadAttention::load(cfg, &WeightLayout::torch(), vb.pp("self_attn"))?;
        // PyTorch's LayerNorm eps is 1e-5 (candle-nn's default config too).
        let ln = LayerNormConfig::from(1e-5);
        Ok(Self {
            self_attn,
            linear1: linear(d_model, dim_ff, vb.pp("linear1"))?,
            linear2: linear(dim_ff, d_model, vb.pp("linear2"))?,
            norm1: layer_norm(d_model, ln, vb.pp("norm1"))?,
            norm2: layer_norm(d_model, ln, vb.pp("norm2"))?,
        })
    }

    /// `x` `(B, L, d_model)`; `pad` `(B, L)`, nonzero = padding (PyTorch's
    /// `src_key_padding_mask`, saved as uint8). Eval mode: no dropout.
    pub fn forward(&self, x: &Tensor, pad: Option<&Tensor>) -> Result<Tensor> {
        let mut input = MhaInput::new(x.clone());
        if let Some(pad) = pad {
            input = input.key_padding_mask(KeyPaddingMask::new(pad.clone()));
        }
        let sa = self.self_attn.attend(&input)?.output;
        let x = self.norm1.forward(&(x + sa)?)?;
        let ff = self.linear2.forward(&self.linear1.forward(&x)?.relu()?)?;
        self.norm2.forward(&(x + ff)?)
    }
}
