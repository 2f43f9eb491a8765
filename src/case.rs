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
//!    [`MaskedRowPolicy::Nan`] is compared with them too (NaN must match NaN);
//! 5. with [`RunOptions::grad`], for cases carrying `grad_output`, builds the module from a
//!    trainable `VarBuilder`, runs backward of `sum(output * grad_output)` and compares every
//!    `expected_grad.*` (inputs and `weights.*` / `weights_llama.*` parameters).
//!
//! Cases with `layout=llama` metadata (this crate's extension for grouped-query attention, which
//! `nn.MultiheadAttention` lacks) carry `num_kv_heads`, `head_dim` and optionally
//! `softmax_scale`, and only `weights_llama.*`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::Var;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{Backend, MaskedRowPolicy, MhaConfig};
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
        let tensors = load_tensors(&buf).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot read tensors: {e}", path.display()))
        })?;
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
        let Some(name) = self.meta_str("dtype") else {
            return Ok(self.tensor("query")?.dtype());
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
    /// `weights_avg`, `grad`).
    /// `grad` selects the gradient checks.
    pub fn max_err(&self, what: &str) -> Option<f64> {
        let suffix = format!(".{what}");
        self.checks
            .iter()
            .filter(|c| match what {
                "grad" => c.label.starts_with("grad/"),
                _ => c.label.ends_with(&suffix),
            })
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
        for what in ["output", "weights", "weights_avg", "grad"] {
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
    /// Also check `expected_grad.*` (gradient cases) through backward.
    pub grad: bool,
    /// Attention backend of the forward checks (calls that need weights still use the
    /// reference; see [`crate::kernels`]).
    pub backend: Backend,
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

/// The inputs and masks of a case, on the run's device in the case dtype.
struct CaseInputs {
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kpm: Option<KeyPaddingMask>,
    attn_mask: Option<AttnMask>,
    /// A causal case without an explicit mask: `expected.*` is then PyTorch's causal convention
    /// (top-left, as SDPA's `is_causal`), which the crate's causal option reproduces; the
    /// alignment pair, when present, is checked separately.
    implicit_causal: bool,
}

impl CaseInputs {
    fn new(case: &Case, dtype: DType, dev: &Device) -> Result<Self> {
        let input_t =
            |n: &str| -> Result<Tensor> { case.tensor(n)?.to_dtype(dtype)?.to_device(dev) };
        let query = input_t("query")?;
        let same = case.meta_bool("self_attention_same_tensor")?;
        let (key, value) = match (
            case.tensors.contains_key("key"),
            case.tensors.contains_key("value"),
        ) {
            (true, true) if !same => (input_t("key")?, input_t("value")?),
            (false, false) | (true, true) => (query.clone(), query.clone()),
            _ => bail!("case has only one of `key` and `value`"),
        };
        let (kpm, attn_mask) = case.masks(dev)?;
        let implicit_causal = case.meta_bool("causal")? && attn_mask.is_none();
        Ok(Self {
            query,
            key,
            value,
            kpm,
            attn_mask,
            implicit_causal,
        })
    }

    fn input(&self, masks: Masks) -> MhaInput {
        let mut input = MhaInput::cross(self.query.clone(), self.key.clone(), self.value.clone());
        if let Some(k) = &self.kpm {
            input = input.key_padding_mask(k.clone());
        }
        match masks {
            Masks::Case => {
                if let Some(m) = &self.attn_mask {
                    input = input.attn_mask(m.clone());
                }
                if self.implicit_causal {
                    input = input.causal(CausalAlignment::TopLeft);
                }
            }
            Masks::Causal(a) => input = input.causal(a),
        }
        input
    }
}

/// Gradient check (`--grad`): builds the module from a trainable `VarBuilder` holding the case
/// weights, runs forward and backward of `sum(output * grad_output)` and compares every
/// `expected_grad.*` tensor. Cases without `grad_output` add no check.
fn run_grad(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    let Some(grad_output) = case.tensors.get("grad_output") else {
        return Ok(());
    };
    let dev = &opts.device;
    let dtype = case.dtype()?;
    let atol = case.meta_num("suggested_atol_grad")?.unwrap_or(1e-5);
    let rtol = case.meta_num("suggested_rtol_grad")?.unwrap_or(1e-4);
    // Gradients refer to the PyTorch layout's names, or to the Llama layout's for GQA cases.
    let Some((prefix, layout)) = case.layouts().into_iter().next() else {
        bail!("case has no weights")
    };
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("VarMap lock poisoned");
        let p = format!("{prefix}.");
        for (name, t) in &case.tensors {
            if let Some(rest) = name.strip_prefix(&p) {
                let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?;
                data.insert(rest.to_string(), var);
            }
        }
    }
    let mha = MultiHeadAttention::load(
        case.config()?,
        &layout,
        VarBuilder::from_varmap(&varmap, dtype, dev),
    )?;
    let mut inputs = CaseInputs::new(case, dtype, dev)?;
    let q = Var::from_tensor(&inputs.query)?;
    let same = inputs.key.id() == inputs.query.id();
    let (k, v) = if same {
        (q.clone(), q.clone())
    } else {
        (
            Var::from_tensor(&inputs.key)?,
            Var::from_tensor(&inputs.value)?,
        )
    };
    inputs.query = q.as_tensor().clone();
    inputs.key = k.as_tensor().clone();
    inputs.value = v.as_tensor().clone();
    let out = mha.attend(&inputs.input(Masks::Case))?.output;
    let g = grad_output.to_dtype(dtype)?.to_device(dev)?;
    let grads = (out * g)?.sum_all()?.backward()?;
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let wprefix = format!("{prefix}.");
    let mut names: Vec<&String> = case
        .tensors
        .keys()
        .filter(|n| n.starts_with("expected_grad."))
        .collect();
    names.sort();
    for name in names {
        let what = &name["expected_grad.".len()..];
        let target = match what {
            "query" => Some(q.as_tensor()),
            "key" if !same => Some(k.as_tensor()),
            "value" if !same => Some(v.as_tensor()),
            w => w
                .strip_prefix(&wprefix)
                .and_then(|n| data.get(n))
                .map(|var| var.as_tensor()),
        };
        let label = format!("grad/{what}");
        let Some(target) = target else {
            checks.push(Check {
                label,
                max_abs_err: f64::INFINITY,
                passed: false,
                detail: Some(format!("no parameter or input named `{what}`")),
            });
            continue;
        };
        match grads.get(target) {
            Some(got) => checks.push(compare(&label, got, &case.tensors[name], atol, rtol)?),
            None => checks.push(Check {
                label,
                max_abs_err: f64::INFINITY,
                passed: false,
                detail: Some("no gradient reached this tensor".into()),
            }),
        }
    }
    Ok(())
}

fn run_loaded(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    let dev = &opts.device;
    let dtype = case.dtype()?;
    let tol = case.tolerance()?;
    let cfg = case.config()?.with_backend(opts.backend);
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
    let inputs = CaseInputs::new(case, dtype, dev)?;
    for (prefix, layout) in &layouts {
        let run = |policy: MaskedRowPolicy, masks: Masks, need: NeedWeights| -> Result<_> {
            let cfg = cfg.clone().with_masked_rows(policy);
            let mha = MultiHeadAttention::load(cfg, layout, vb_all.pp(*prefix))?;
            mha.attend(&inputs.input(masks).need_weights(need))
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
    if opts.grad {
        run_grad(case, opts, checks)?;
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
