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
//!    [`MaskedRowPolicy::Nan`] is compared with them too (NaN must match NaN).
//!
//! Cases with `layout=llama` metadata (this crate's extension for grouped-query attention, which
//! `nn.MultiheadAttention` lacks) carry `num_kv_heads`, `head_dim` and optionally
//! `softmax_scale`, and only `weights_llama.*`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{MaskedRowPolicy, MhaConfig};
use crate::layout::WeightLayout;
use crate::mask::{AttnMask, CausalAlignment, KeyPaddingMask};
use crate::mha::{MhaInput, MultiHeadAttention, NeedWeights};

/// A parsed case file.
#[derive(Debug, Clone)]
pub struct Case {
    /// File stem.
    pub name: String,
    /// Every tensor of the file, on the CPU.
    pub tensors: HashMap<String, Tensor>,
    /// The string metadata.
    pub meta: HashMap<String, String>,
}

/// Comparison tolerance: `|got - exp| <= atol + rtol * |exp|`, element-wise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance for the output.
    pub atol_output: f64,
    /// Absolute tolerance for the attention weights.
    pub atol_weights: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

impl Tolerance {
    /// The specification's defaults for a dtype.
    pub fn default_for(dtype: DType) -> Self {
        let (a, r) = match dtype {
            DType::F64 => (1e-10, 1e-10),
            DType::F16 => (1e-2, 1e-2),
            DType::BF16 => (5e-2, 2e-2),
            _ => (1e-5, 1e-4),
        };
        Self {
            atol_output: a,
            atol_weights: a,
            rtol: r,
        }
    }
}

impl Case {
    /// Reads a case file.
    pub fn load(path: &Path) -> Result<Self> {
        let buf = std::fs::read(path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&buf).map_err(|e| {
            candle_core::Error::Msg(format!("{}: not a safetensors file: {e}", path.display()))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&buf, &Device::Cpu)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            name,
            tensors,
            meta,
        })
    }

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

    /// The case dtype (`dtype` metadata, else the query's dtype).
    pub fn dtype(&self) -> Result<DType> {
        match self.meta_str("dtype") {
            Some("float32") => Ok(DType::F32),
            Some("float64") => Ok(DType::F64),
            Some("float16") => Ok(DType::F16),
            Some("bfloat16") => Ok(DType::BF16),
            Some(other) => bail!("metadata `dtype`: unsupported {other:?}"),
            None => Ok(self.tensor("query")?.dtype()),
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

/// One comparison inside a case.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was compared (layout, run, tensor).
    pub label: String,
    /// Largest absolute difference (NaN-aware: NaN vs NaN counts as 0).
    pub max_abs_err: f64,
    /// Whether every element was within tolerance.
    pub passed: bool,
    /// Why it failed, when it did.
    pub detail: Option<String>,
}

/// The result of running one case file.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// Case name (file stem).
    pub name: String,
    /// Every comparison made.
    pub checks: Vec<Check>,
    /// Set when the case could not be run at all.
    pub error: Option<String>,
}

impl CaseReport {
    /// Whether the case ran and every check passed.
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// Largest error over the checks of one expected tensor kind (`output`, `weights`,
    /// `weights_avg`).
    pub fn max_err(&self, what: &str) -> Option<f64> {
        let suffix = format!(".{what}");
        self.checks
            .iter()
            .filter(|c| c.label.ends_with(&suffix))
            .map(|c| c.max_abs_err)
            .fold(None, |a, e| Some(a.map_or(e, |a: f64| a.max(e))))
    }
}

impl fmt::Display for CaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.passed() { "PASS" } else { "FAIL" };
        write!(f, "{} {status}", self.name)?;
        if let Some(e) = &self.error {
            return write!(f, " error: {e}");
        }
        if self.checks.is_empty() {
            return write!(f, " (no expectation was checked)");
        }
        for what in ["output", "weights", "weights_avg"] {
            if let Some(e) = self.max_err(what) {
                write!(f, " max_abs_err_{what}={e:.3e}")?;
            }
        }
        write!(f, " ({} checks)", self.checks.len())?;
        for c in self.checks.iter().filter(|c| !c.passed) {
            write!(
                f,
                "\n    {}: {}",
                c.label,
                c.detail.as_deref().unwrap_or("failed")
            )?;
        }
        Ok(())
    }
}

/// Compares `got` with `exp` element-wise (`|got - exp| <= atol + rtol·|exp|`; NaN must meet NaN).
pub fn compare(label: &str, got: &Tensor, exp: &Tensor, atol: f64, rtol: f64) -> Result<Check> {
    if got.dims() != exp.dims() {
        return Ok(Check {
            label: label.to_string(),
            max_abs_err: f64::INFINITY,
            passed: false,
            detail: Some(format!(
                "shape mismatch: expected {:?}, got {:?}",
                exp.dims(),
                got.dims()
            )),
        });
    }
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let e = exp.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut max_err = 0f64;
    let mut bad = 0usize;
    let mut first_bad = None;
    for (i, (&g, &e)) in g.iter().zip(e.iter()).enumerate() {
        let (err, ok) = if e.is_nan() || g.is_nan() {
            let ok = e.is_nan() && g.is_nan();
            (if ok { 0.0 } else { f64::INFINITY }, ok)
        } else if e.is_infinite() || g.is_infinite() {
            let ok = e == g;
            (if ok { 0.0 } else { f64::INFINITY }, ok)
        } else {
            let err = (g - e).abs();
            (err, err <= atol + rtol * e.abs())
        };
        max_err = max_err.max(err);
        if !ok {
            bad += 1;
            first_bad.get_or_insert((i, g, e));
        }
    }
    Ok(Check {
        label: label.to_string(),
        max_abs_err: max_err,
        passed: bad == 0,
        detail: first_bad.map(|(i, gv, ev)| {
            format!(
                "{bad} of {} elements out of tolerance (atol {atol:e}, rtol {rtol:e}); first at flat index {i}: got {gv}, expected {ev}",
                e.len()
            )
        }),
    })
}

/// Options of [`run_case`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Device to run on.
    pub device: Device,
}

/// Runs one case file; never panics: a case that can't be read or expressed is a failed report
/// carrying the reason.
pub fn run_case(path: &Path, opts: &RunOptions) -> CaseReport {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let mut report = CaseReport {
        name,
        checks: vec![],
        error: None,
    };
    let result = Case::load(path).and_then(|case| {
        report.name = case.name.clone();
        run_loaded(&case, opts, &mut report.checks)
    });
    if let Err(e) = result {
        report.error = Some(e.to_string().lines().next().unwrap_or("").to_string());
    }
    report
}

struct Expect<'a> {
    prefix: &'a str,
    output: Option<&'a Tensor>,
    weights: Option<&'a Tensor>,
    weights_avg: Option<&'a Tensor>,
}

impl<'a> Expect<'a> {
    fn of(case: &'a Case, prefix: &'a str) -> Option<Self> {
        let get = |n: &str| case.tensors.get(&format!("{prefix}.{n}"));
        let e = Expect {
            prefix,
            output: get("output"),
            weights: get("weights"),
            weights_avg: get("weights_avg"),
        };
        (e.output.is_some() || e.weights.is_some() || e.weights_avg.is_some()).then_some(e)
    }
}

fn has_nan(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F64)?;
    Ok(t.ne(&t)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        > 0.0)
}

/// Which masks a run uses.
#[derive(Clone, Copy)]
enum Masks {
    /// The case's own masks.
    Case,
    /// The case's key padding mask plus the crate's causal option (no explicit mask).
    Causal(CausalAlignment),
}

fn run_loaded(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    let dev = &opts.device;
    let dtype = case.dtype()?;
    let tol = case.tolerance()?;
    let cfg = case.config()?;
    let layouts = case.layouts();
    if layouts.is_empty() {
        bail!("case has no weights (no `weights.*` nor another layout's tensors)")
    }
    if case.meta_bool("unbatched")? && case.tensor("query")?.rank() != 2 {
        bail!(
            "metadata says unbatched but query has shape {:?}",
            case.tensor("query")?.dims()
        )
    }
    let vb_all = VarBuilder::from_tensors(case.tensors.clone(), dtype, dev);
    let input_t = |n: &str| -> Result<Tensor> { case.tensor(n)?.to_dtype(dtype)?.to_device(dev) };
    let query = input_t("query")?;
    let (key, value) = match (
        case.tensors.contains_key("key"),
        case.tensors.contains_key("value"),
    ) {
        (true, true) => (input_t("key")?, input_t("value")?),
        (false, false) => (query.clone(), query.clone()),
        _ => bail!("case has only one of `key` and `value`"),
    };
    let (kpm, am) = case.masks(dev)?;
    let causal = case.meta_bool("causal")?;
    let pair = (
        Expect::of(case, "expected_top_left"),
        Expect::of(case, "expected_bottom_right"),
    );
    // A causal case with neither mask nor alignment pair (L == S): the crate's causal option is
    // the causal structure.
    let implicit_causal = causal && am.is_none() && pair.0.is_none() && pair.1.is_none();

    for (prefix, layout) in &layouts {
        let run = |policy: MaskedRowPolicy, masks: Masks, need: NeedWeights| -> Result<_> {
            let cfg = cfg.clone().with_masked_rows(policy);
            let mha = MultiHeadAttention::load(cfg, layout, vb_all.pp(*prefix))?;
            let mut input = MhaInput::cross(query.clone(), key.clone(), value.clone());
            if let Some(k) = &kpm {
                input = input.key_padding_mask(k.clone());
            }
            match masks {
                Masks::Case => {
                    if let Some(m) = &am {
                        input = input.attn_mask(m.clone());
                    }
                    if implicit_causal {
                        input = input.causal(CausalAlignment::TopLeft);
                    }
                }
                Masks::Causal(a) => input = input.causal(a),
            }
            mha.attend(&input.need_weights(need))
        };
        // Each expected tensor is compared with the run whose fully-masked-row policy it shows:
        // PyTorch's NaN rows with `MaskedRowPolicy::Nan`, anything else with the default.
        let check = |checks: &mut Vec<Check>, exp: &Expect, masks: Masks| -> Result<()> {
            let tag = |what: &str| format!("{prefix}/{}.{what}", exp.prefix);
            let items = [
                (NeedWeights::No, exp.output, "output"),
                (NeedWeights::PerHead, exp.weights, "weights"),
                (NeedWeights::Averaged, exp.weights_avg, "weights_avg"),
            ];
            for (need, want, what) in items {
                let Some(want) = want else { continue };
                let policy = if has_nan(want)? {
                    MaskedRowPolicy::Nan
                } else {
                    MaskedRowPolicy::Zero
                };
                let out = run(policy, masks, need)?;
                let (got, atol) = match need {
                    NeedWeights::No => (out.output, tol.atol_output),
                    _ => (
                        out.weights.ok_or_else(|| {
                            candle_core::Error::Msg("no attention weights returned".into())
                        })?,
                        tol.atol_weights,
                    ),
                };
                checks.push(compare(&tag(what), &got, want, atol, tol.rtol)?);
            }
            Ok(())
        };

        // Steps 2 and 4: the case's masks; the sanitized expectation when present, and PyTorch's
        // own (NaN rows) through the NaN policy.
        for exp in ["expected_sanitized", "expected"] {
            if let Some(e) = Expect::of(case, exp) {
                check(checks, &e, Masks::Case)?;
            }
        }
        // Step 3: the crate's own causal option in each alignment.
        for (align, exp) in [
            (CausalAlignment::TopLeft, "expected_top_left"),
            (CausalAlignment::BottomRight, "expected_bottom_right"),
        ] {
            for name in [format!("{exp}_sanitized"), exp.to_string()] {
                if let Some(e) = Expect::of(case, &name) {
                    check(checks, &e, Masks::Causal(align))?;
                }
            }
        }
    }
    if checks.is_empty() {
        bail!("case has no expectation (`expected.*`) to compare with")
    }
    Ok(())
}

/// Parses a device name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
///
/// ```
/// assert!(candle_mha::case::parse_device("cpu").unwrap().is_cpu());
/// assert!(candle_mha::case::parse_device("tpu").is_err());
/// ```
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::new_cuda(i),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// The device the tests run on: `$CANDLE_MHA_DEVICE` (`cpu`, `cuda`, `cuda:N`), default CPU.
pub fn test_device() -> Result<Device> {
    match std::env::var("CANDLE_MHA_DEVICE") {
        Ok(name) if !name.is_empty() => parse_device(&name),
        _ => Ok(Device::Cpu),
    }
}
