//! The PyTorch parity-case runner: reads an `mha-case` safetensors file, runs candle-mha on it and
//! compares with the expectations it carries.
//!
//! The file format is the project's `mha-case` specification: weights under their
//! `torch.nn.MultiheadAttention` `state_dict` names (`weights.*`), optionally the same weights
//! in other layouts (`weights_split.*`, `weights_bert.*`, and this crate's extensions
//! `weights_gpt2.*`, `weights_llama.*`), the inputs, the masks, the expected outputs and string
//! metadata. Only what the specification names is read; everything else is optional.
//!
//! What [`run_case`] does, per the specification:
//! 1. builds the module from every layout present (each must give the same result);
//! 2. runs the forward with the case's masks on the requested device in the case dtype, asking
//!    for attention weights when an expectation for them exists;
//! 3. for causal cases with an `expected_top_left` / `expected_bottom_right` pair, also runs the
//!    crate's own causal option in each alignment without the explicit mask;
//! 4. compares with `expected_sanitized.*` when present (the default fully-masked-row policy),
//!    else `expected.*`; where `expected.*` holds PyTorch's NaN rows, the run with
//!    [`MaskedRowPolicy::Nan`](crate::MaskedRowPolicy::Nan) is compared with them too (NaN must
//!    match NaN);
//! 5. with [`RunOptions::grad`], for cases carrying `grad_output`, builds the module from a
//!    trainable `VarBuilder`, runs backward of `sum(output * grad_output)` and compares every
//!    `expected_grad.*` (inputs and `weights.*` / `weights_llama.*` parameters).
//!
//! Cases with `case_kind=sdpa` test the attention core alone through
//! [`crate::sdpa()`](fn@crate::sdpa) (q, k, v, an optional mask in SDPA's polarity, causal
//! alignment, window, scale), in PyTorch's `(B, H, L, D)` layout and again in `(B, L, H, D)`;
//! cases with `case_kind=varlen` test packed sequences through [`crate::sdpa_varlen`]. Both
//! follow the specification's sections of the same names and honour [`RunOptions::backend`].
//!
//! Cases with `layout=llama` metadata (this crate's extension for grouped-query attention, which
//! `nn.MultiheadAttention` lacks) carry `num_kv_heads`, `head_dim` and optionally
//! `softmax_scale`, and only `weights_llama.*`.
//!
//! The runner's files: `load.rs` reads a case file (boolean tensors included), `check.rs` holds
//! the tolerances and the element-wise comparison, `run.rs` the forward checks and `grad.rs` the
//! gradient checks.

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::config::MhaConfig;
use crate::layout::WeightLayout;
use crate::mask::{AttnMask, KeyPaddingMask};

mod check;
mod core_case;
mod grad;
mod load;
mod run;

pub use check::CaseReport;
internal! { use check::{compare, Check, Tolerance}; }
internal! { use core_case::CaseKind; }
pub use run::{run_case, RunOptions};
internal! { use run::run_case_bytes; }

internal! {
    /// A parsed case file.
    #[derive(Debug, Clone)]
    struct Case {
        /// File stem.
        pub name: String,
        /// Every tensor of the file, on the CPU.
        pub tensors: HashMap<String, Tensor>,
        /// The string metadata.
        pub meta: HashMap<String, String>,
    }
}

impl Case {
    fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(|s| s.as_str())
    }

    fn meta_bool(&self, key: &str) -> Result<bool> {
        match self.meta_str(key) {
            None => Ok(false),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" | "none" | "" => Ok(false),
                _ => bail!("metadata `{key}`: expected true/false, got {v:?}"),
            },
        }
    }

    fn meta_num<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.meta_str(key) {
            None | Some("") | Some("None") | Some("none") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                candle_core::Error::Msg(format!("metadata `{key}`: bad number {v:?}"))
            }),
        }
    }

    /// The case dtype (`dtype` metadata, else the query's dtype: `query`, or `q` for core
    /// cases).
    pub fn dtype(&self) -> Result<DType> {
        let Some(name) = self.meta_str("dtype") else {
            let q = self
                .tensors
                .get("q")
                .map_or_else(|| self.tensor("query"), Ok)?;
            return Ok(q.dtype());
        };
        match name.trim_start_matches("torch.") {
            "float32" | "f32" | "fp32" | "float" => Ok(DType::F32),
            "float64" | "f64" | "fp64" | "double" => Ok(DType::F64),
            "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            other => bail!("metadata `dtype`: unsupported {other:?}"),
        }
    }

    /// The tolerance: `suggested_*` metadata, else the dtype's defaults.
    pub fn tolerance(&self) -> Result<Tolerance> {
        let d = Tolerance::default_for(self.dtype()?);
        Ok(Tolerance {
            atol_output: self
                .meta_num("suggested_atol_output")?
                .unwrap_or(d.atol_output),
            atol_weights: self
                .meta_num("suggested_atol_weights")?
                .unwrap_or(d.atol_weights),
            rtol: self.meta_num("suggested_rtol")?.unwrap_or(d.rtol),
        })
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("case has no tensor `{name}`")))
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        let p = format!("{prefix}.");
        self.tensors.keys().any(|k| k.starts_with(&p))
    }

    /// The module configuration the metadata describes.
    pub fn config(&self) -> Result<MhaConfig> {
        let e: usize = match self.meta_num("embed_dim")? {
            Some(e) => e,
            None => self.tensor("query")?.dims().last().copied().unwrap_or(0),
        };
        let h: usize = self
            .meta_num("num_heads")?
            .ok_or_else(|| candle_core::Error::Msg("metadata `num_heads` missing".into()))?;
        let mut cfg = MhaConfig::new(e, h)
            .with_batch_first(self.meta_bool("batch_first")?)
            .with_add_bias_kv(self.meta_bool("add_bias_kv")?)
            .with_add_zero_attn(self.meta_bool("add_zero_attn")?);
        cfg = cfg.with_bias(match self.meta_str("bias") {
            None => true,
            Some(_) => self.meta_bool("bias")?,
        });
        cfg.kdim = self.meta_num("kdim")?;
        cfg.vdim = self.meta_num("vdim")?;
        cfg.num_kv_heads = self.meta_num("num_kv_heads")?;
        cfg.head_dim = self.meta_num("head_dim")?;
        cfg.softmax_scale = self.meta_num("softmax_scale")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The layouts present, with their tensor prefix.
    pub fn layouts(&self) -> Vec<(&'static str, WeightLayout)> {
        let all = [
            ("weights", WeightLayout::torch()),
            ("weights_split", WeightLayout::separate()),
            ("weights_bert", WeightLayout::bert()),
            ("weights_gpt2", WeightLayout::gpt2()),
            ("weights_llama", WeightLayout::llama()),
        ];
        all.into_iter()
            .filter(|(p, _)| self.has_prefix(p))
            .collect()
    }

    fn masks(&self, device: &Device) -> Result<(Option<KeyPaddingMask>, Option<AttnMask>)> {
        let kpm = match self.tensors.get("key_padding_mask") {
            None => None,
            Some(t) => Some(KeyPaddingMask::new(t.to_device(device)?)),
        };
        let am = match self.tensors.get("attn_mask") {
            None => None,
            Some(t) => {
                let t = t.to_device(device)?;
                Some(match self.meta_str("attn_mask_kind") {
                    Some("bool_u8_1_means_masked") => AttnMask::Bool(t),
                    Some("float_additive") => AttnMask::Additive(t),
                    _ => AttnMask::new(t),
                })
            }
        };
        Ok((kpm, am))
    }
}

// The crate's tests' device hooks, at their old paths.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub use crate::kernels::test_support::{parse_device, test_device};
