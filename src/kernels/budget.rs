//! The reference kernel's size budget: the largest `(B, H, L, S)` score buffer it may
//! materialise before a call goes to the fused CPU kernel or fails with the size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::{bail, Result};

use super::{compute_dtype, AttnCall};

/// The process-wide reference budget in bytes; 0 = the default ([`default_reference_budget`]).
static REFERENCE_BUDGET: AtomicU64 = AtomicU64::new(0);

/// The default reference budget when `/proc/meminfo` cannot be read: 4 GiB.
pub const FALLBACK_REFERENCE_BUDGET: u64 = 4 << 30;

/// The default budget of the reference kernel: a quarter of the memory available when first
/// asked (`MemAvailable` in `/proc/meminfo`), or [`FALLBACK_REFERENCE_BUDGET`] where that file
/// cannot be read (non-Linux systems). Read once per process.
pub fn default_reference_budget() -> u64 {
    static DEFAULT: OnceLock<u64> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| (kib.saturating_mul(1024) / 4).max(1))
            .unwrap_or(FALLBACK_REFERENCE_BUDGET)
    })
}

/// The largest score buffer the reference kernel may materialise, in bytes (see the
/// [module docs](crate::kernels)): the value set by [`set_reference_budget_bytes`], else
/// [`default_reference_budget`].
pub fn reference_budget_bytes() -> u64 {
    match REFERENCE_BUDGET.load(Ordering::Relaxed) {
        0 => default_reference_budget(),
        b => b,
    }
}

/// Sets the reference kernel's budget for the whole process (`None`: back to the default).
/// Calls whose `(B, H, L, S)` scores would exceed it go to the fused CPU kernel when it can
/// serve them, and fail with an error naming the size otherwise.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::kernels::{attention, set_reference_budget_bytes, AttnParams};
/// use candle_mha::mask::{MaskDims, MaskPlan};
/// use candle_mha::Backend;
/// let x = Tensor::zeros((1, 64, 2, 8), DType::F32, &Device::Cpu)?;
/// let plan = MaskPlan::new(MaskDims::new(1, 2, 64, 64));
/// let mut p = AttnParams::new(8);
/// p.backend = Backend::Reference;
/// set_reference_budget_bytes(Some(1024));
/// let err = attention(&x, &x, &x, &plan, &p).unwrap_err().to_string();
/// assert!(err.contains("over the budget"), "{err}");
/// p.backend = Backend::Auto; // the fused CPU kernel does not materialise the scores
/// assert_eq!(attention(&x, &x, &x, &plan, &p)?.kernel, "cpu");
/// set_reference_budget_bytes(None);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn set_reference_budget_bytes(bytes: Option<u64>) {
    let stored = match bytes {
        None => 0,
        Some(b) => b.max(1),
    };
    REFERENCE_BUDGET.store(stored, Ordering::Relaxed);
}

/// Bytes the reference kernel would materialise for `call`: three `(B, H, L, S)` buffers of the
/// compute dtype (scores, exponentials, probabilities), saturating.
fn reference_bytes(call: &AttnCall) -> u64 {
    let elems = [call.b, call.h, call.l, call.s]
        .iter()
        .fold(3u64, |acc, &x| acc.saturating_mul(x as u64));
    elems.saturating_mul(compute_dtype(call.q.dtype()).size_in_bytes() as u64)
}

/// `Err` when the reference would materialise more than the budget.
pub(super) fn check_reference_budget(call: &AttnCall, why: impl FnOnce() -> String) -> Result<()> {
    let bytes = reference_bytes(call);
    let budget = reference_budget_bytes();
    if bytes > budget {
        let why = why();
        let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
        bail!(
            "reference attention would materialise 3 × (B, H, L, S) = 3 × ({}, {}, {}, {}) {:?} scores = {:.3} GiB, over the budget of {:.3} GiB ({why}); use a kernel that does not materialise the scores (the fused CPU kernel: no attention weights, no dropout), smaller chunks, or raise the budget with candle_mha::kernels::set_reference_budget_bytes",
            call.b,
            call.h,
            call.l,
            call.s,
            compute_dtype(call.q.dtype()),
            gib(bytes),
            gib(budget),
        )
    }
    Ok(())
}
