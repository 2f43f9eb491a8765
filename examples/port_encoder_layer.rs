//! Porting a PyTorch layer: `torch.nn.TransformerEncoderLayer` from its `state_dict`, run on
//! candle with candle-mha's attention, checked against PyTorch's own output.
//!
//! ```text
//! cargo run --release --example port_encoder_layer
//! ```
//!
//! `weights/torch_encoder_layer.safetensors` comes from `scripts/gen_encoder_layer.py`: the
//! layer's `state_dict` (d_model 64, 4 heads, feed-forward 128), an input batch with a key padding
//! mask (`pad.to(torch.uint8)`: candle does not load bool tensors), and PyTorch's output. The
//! layer itself is `examples/common/encoder_layer.rs`: `MultiHeadAttention::load` with
//! `WeightLayout::torch()` at `vb.pp("self_attn")`, candle-nn for the rest.

#[path = "common/encoder_layer.rs"]
mod encoder_layer;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("usage: port_encoder_layer   (no options; see the source for what it shows)");
        return Ok(());
    }
    let dev = Device::Cpu;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights/torch_encoder_layer.safetensors");
    let tensors = candle_core::safetensors::load(&path, &dev)?;
    // The same file holds the state_dict (at the top level, as `layer.state_dict()` names it).
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let layer = encoder_layer::EncoderLayer::load(64, 4, 128, vb)?;
    let out = layer.forward(&tensors["input"], Some(&tensors["key_padding_mask"]))?;
    for (name, want) in [
        ("PyTorch float32", &tensors["expected_f32"]),
        ("PyTorch float64", &tensors["expected_f64"]),
    ] {
        let diff = (&out - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        println!("max |candle - {name}| = {diff:.2e}");
    }
    Ok(())
}
