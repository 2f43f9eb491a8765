//! Reading a case file: its string metadata and every tensor, boolean ones included.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Result, Tensor};

use super::Case;

/// Reads every tensor of a safetensors buffer onto the CPU. Boolean tensors (which candle does
/// not load) become `u8`, so masks saved as `torch.bool` work too.
fn load_tensors(buf: &[u8]) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    let st = safetensors::SafeTensors::deserialize(buf)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = match view.dtype() {
            safetensors::Dtype::BOOL => {
                Tensor::from_vec(view.data().to_vec(), view.shape(), &Device::Cpu)?
            }
            _ => view.load(&Device::Cpu)?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

impl Case {
    /// Reads a case file.
    pub fn load(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes(&name, &buf)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Parses a case from the bytes of a case file (named `name` in reports). Any input gives a
    /// case or an error, never a panic (fuzzed: `fuzz/`).
    pub fn from_bytes(name: &str, buf: &[u8]) -> Result<Self> {
        let (_, header) = safetensors::SafeTensors::read_metadata(buf)
            .map_err(|e| candle_core::Error::Msg(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = load_tensors(buf)
            .map_err(|e| candle_core::Error::Msg(format!("cannot read tensors: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            tensors,
            meta,
        })
    }
}
