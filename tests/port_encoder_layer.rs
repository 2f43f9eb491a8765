//! `examples/port_encoder_layer.rs`: PyTorch's `TransformerEncoderLayer` ported from its
//! `state_dict` equals PyTorch's output (float64 reference, f32 computation), padded rows
//! included; the fixture comes from the committed `scripts/gen_encoder_layer.py`.

#[path = "../examples/common/encoder_layer.rs"]
mod encoder_layer;

use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

#[test]
fn ported_encoder_layer_matches_pytorch() -> Result<()> {
    let dev = Device::Cpu;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("weights/torch_encoder_layer.safetensors");
    let tensors = candle_core::safetensors::load(&path, &dev)?;
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let layer = encoder_layer::EncoderLayer::load(64, 4, 128, vb)?;
    let out = layer.forward(&tensors["input"], Some(&tensors["key_padding_mask"]))?;
    let want = tensors["expected_f64"].to_dtype(DType::F32)?;
    let diff = (&out - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("max |candle f32 - PyTorch f64| = {diff:.2e}");
    assert!(diff <= 1e-5, "the ported layer is {diff} off PyTorch");
    // Without the padding mask the output is another one (the mask is applied).
    let unmasked = layer.forward(&tensors["input"], None)?;
    let d = (&unmasked - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d > 1e-2, "the key padding mask made no difference");
    Ok(())
}

#[test]
fn fixture_comes_from_the_committed_generator() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read(root.join("scripts/gen_encoder_layer.py")).unwrap();
    let want = format!("{:x}", Sha256::digest(&script));
    let bytes = std::fs::read(root.join("weights/torch_encoder_layer.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let got = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("generator_sha256").cloned());
    assert_eq!(
        got.as_deref(),
        Some(want.as_str()),
        "weights/torch_encoder_layer.safetensors was not written by the committed scripts/gen_encoder_layer.py: rerun it"
    );
}
