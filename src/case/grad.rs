//! The gradient checks (`RunOptions::grad`): backward through the module against PyTorch
//! autograd's `expected_grad.*`.

use candle_core::{bail, Result, Var};
use candle_nn::{VarBuilder, VarMap};

use super::check::{compare, Check};
use super::run::{CaseInputs, Masks, RunOptions};
use super::Case;
use crate::config::Backend;
use crate::mha::MultiHeadAttention;

/// Gradient check (`--grad`): builds the module from a trainable `VarBuilder` holding the case
/// weights, runs forward and backward of `sum(output * grad_output)` and compares every
/// `expected_grad.*` tensor. Cases without `grad_output` add no check.
pub(super) fn run_grad(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
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
        case.config()?.with_backend(opts.backend),
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
    let run = mha.attend(&inputs.input(Masks::Case))?;
    // The fused kernel's output is an autograd node whose backward is the fused backward; the
    // reference's backward is candle's autograd through its ops.
    let (fwd, bwd) = match run.kernel.as_str() {
        "cpu" => ("cpu", "cpu"),
        other => (other, "reference"),
    };
    if opts.backend == Backend::CpuFused && fwd != "cpu" {
        bail!("--backend cpu-fused --grad: the forward ran on the {fwd} kernel, not the fused one")
    }
    let out = run.output;
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
        let label = format!("grad[fwd={fwd} bwd={bwd}]/{what}");
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
