//! The reference kernel's size budget: the largest `(B, H, L, S)` score buffer it may
//! materialise before a call goes to the fused CPU kernel or fails with the size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::{bail, Result};

use super::{compute_dtype, AttnCall};

/// The process-wide reference budget in bytes; 0 = the default ([`default_reference_budget`]).
static REFERENCE_BUDGET: AtomicU64 = AtomicU64::new(0);

internal! {
    /// The default reference budget when `/proc/meminfo` cannot be read: 4 GiB.
    const FALLBACK_REFERENCE_BUDGET: u64 = 4 << 30;
}

internal! {
    /// The default budget of the reference kernel: a quarter of the memory available when first
    /// asked (`MemAvailable` in `/proc/meminfo`), or [`FALLBACK_REFERENCE_BUDGET`] where that file
    /// cannot be read (non-Linux systems). Read once per process.
    fn default_reference_budget() -> u64 {
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
}

internal! {
    /// The largest score buffer the reference kernel may materialise, in bytes (see the
    /// [module docs](crate::kernels)): the value set by [`set_reference_budget_bytes`], else
    /// [`default_reference_budget`].
    fn reference_budget_bytes() -> u64 {
        match REFERENCE_BUDGET.load(Ordering::Relaxed) {
            0 => default_reference_budget(),
            b => b,
        }
    }
}

/// Sets the reference kernel's budget for the whole process, in bytes (`None`: back to the
/// default, a quarter of `MemAvailable` in `/proc/meminfo` when first asked, 4 GiB where that
/// file cannot be read). Calls whose `(B, H, L, S)` scores would exceed it go to the fused CPU
/// kernel when it can serve them, and fail with an error naming the size otherwise. See the
/// [module docs](crate::kernels).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::{kernels::set_reference_budget_bytes, sdpa, Backend, SdpaOptions};
/// let x = Tensor::zeros((1, 2, 64, 8), DType::F32, &Device::Cpu)?; // (B, H, L, D)
/// set_reference_budget_bytes(Some(1024));
/// let opts = SdpaOptions::new().backend(Backend::Reference);
/// let err = sdpa(&x, &x, &x, &opts).unwrap_err().to_string();
/// assert!(err.contains("over the budget"), "{err}");
/// // The fused CPU kernel does not materialise the scores.
/// sdpa(&x, &x, &x, &SdpaOptions::new())?;
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
