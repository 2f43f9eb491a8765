//! The forward checks: every layout, the case's masks and the crate's own causal option, each
//! expectation compared with the run whose fully-masked-row policy it shows.

use std::path::Path;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::check::{compare, CaseReport, Check};
use super::core_case::{run_sdpa, run_varlen, CaseKind};
use super::grad::run_grad;
use super::Case;
use crate::config::{Backend, MaskedRowPolicy};
use crate::mask::{AttnMask, CausalAlignment, KeyPaddingMask};
use crate::mha::{MhaInput, MultiHeadAttention, NeedWeights};

/// Options of [`run_case`]: [`RunOptions::new`] and the `with_*` setters.
///
/// ```
/// use candle_core::Device;
/// use candle_mha::case::RunOptions;
/// use candle_mha::Backend;
/// let opts = RunOptions::new(Device::Cpu).with_grad(true).with_backend(Backend::CpuFused);
/// assert!(opts.grad);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// Device to run on.
    pub device: Device,
    /// Also check `expected_grad.*` (gradient cases) through backward.
    pub grad: bool,
    /// Attention backend of the forward checks (calls that need weights still use the
    /// reference; see [`crate::kernels`]).
    pub backend: Backend,
}

impl RunOptions {
    /// Forward checks on `device` with [`Backend::Auto`], no gradient checks.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            grad: false,
            backend: Backend::Auto,
        }
    }

    /// Also check the gradient cases (`expected_grad.*`) through backward.
    pub fn with_grad(mut self, grad: bool) -> Self {
        self.grad = grad;
        self
    }

    /// The attention backend of the forward checks.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
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

/// [`run_case`] on the bytes of a case file (named `name` in the report): same checks, same
/// guarantee (a failed report, never a panic).
pub fn run_case_bytes(name: &str, bytes: &[u8], opts: &RunOptions) -> CaseReport {
    let mut report = CaseReport {
        name: name.to_string(),
        checks: vec![],
        error: None,
    };
    let result =
        Case::from_bytes(name, bytes).and_then(|case| run_loaded(&case, opts, &mut report.checks));
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

pub(super) fn has_nan(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F64)?;
    Ok(t.ne(&t)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        > 0.0)
}

/// Which masks a run uses.
#[derive(Clone, Copy)]
pub(super) enum Masks {
    /// The case's own masks.
    Case,
    /// The case's key padding mask plus the crate's causal option (no explicit mask).
    Causal(CausalAlignment),
}

/// The inputs and masks of a case, on the run's device in the case dtype.
pub(super) struct CaseInputs {
    pub(super) query: Tensor,
    pub(super) key: Tensor,
    pub(super) value: Tensor,
    kpm: Option<KeyPaddingMask>,
    attn_mask: Option<AttnMask>,
    /// A causal case without an explicit mask: `expected.*` is then PyTorch's causal convention
    /// (top-left, as SDPA's `is_causal`), which the crate's causal option reproduces; the
    /// alignment pair, when present, is checked separately.
    implicit_causal: bool,
}

impl CaseInputs {
    pub(super) fn new(case: &Case, dtype: DType, dev: &Device) -> Result<Self> {
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

    pub(super) fn input(&self, masks: Masks) -> MhaInput {
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

fn run_loaded(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    match case.kind()? {
        CaseKind::Sdpa => return run_sdpa(case, opts, checks),
        CaseKind::Varlen => return run_varlen(case, opts, checks),
        CaseKind::Mha => {}
    }
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
