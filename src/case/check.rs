//! Tolerances, the element-wise comparison and the per-case report.

use std::fmt;

use candle_core::{DType, Result, Tensor};

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

/// The result of running one case file: [`CaseReport::passed`], and its `Display` (one line:
/// name, PASS/FAIL, largest error per expected tensor kind).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaseReport {
    /// Case name (file stem).
    pub name: String,
    /// Every comparison made.
    #[cfg(feature = "internals")]
    #[doc(hidden)]
    pub checks: Vec<Check>,
    /// Every comparison made.
    #[cfg(not(feature = "internals"))]
    pub(crate) checks: Vec<Check>,
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
                "grad" => c.label.starts_with("grad"),
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
        // Which kernels ran the gradient checks: `grad[fwd=… bwd=…]/…` labels.
        if let Some(k) = self
            .checks
            .iter()
            .find_map(|c| c.label.strip_prefix("grad[")?.split(']').next())
        {
            write!(f, " {k}")?;
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
