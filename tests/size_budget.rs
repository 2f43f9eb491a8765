//! The reference kernel's size budget: a call whose `(B, H, L, S)` scores would exceed it goes
//! to the fused CPU kernel when that can serve it, and is refused with an error naming the size
//! otherwise, before anything is allocated. One test: the budget is process-wide.

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::kernels::{
    attention, reference_budget_bytes, set_reference_budget_bytes, AttnParams,
};
use candle_mha::mask::{MaskDims, MaskPlan};
use candle_mha::{sdpa, Backend, MaskedRowPolicy, SdpaOptions};

#[test]
fn reference_budget_routes_or_refuses() -> Result<()> {
    let default = reference_budget_bytes();
    assert!(default > 0);
    let dev = Device::Cpu;
    // (1, 2, 256, 256) f32 scores: 3 × 131072 × 4 = 1.5 MiB.
    let x = Tensor::ones((1, 256, 2, 8), DType::F32, &dev)?;
    let plan = MaskPlan::new(MaskDims::new(1, 2, 256, 256));
    set_reference_budget_bytes(Some(1 << 20));
    assert_eq!(reference_budget_bytes(), 1 << 20);
    let p = |backend, need_weights| {
        let mut p = AttnParams::new(8);
        p.backend = backend;
        p.need_weights = need_weights;
        p
    };
    // Auto: the fused kernel serves it.
    assert_eq!(
        attention(&x, &x, &x, &plan, &p(Backend::Auto, false))?.kernel,
        "cpu"
    );
    // Forced reference, weights, f64: refused, with the size.
    for (backend, weights, dtype, why) in [
        (Backend::Reference, false, DType::F32, "Backend::Reference"),
        (Backend::Auto, true, DType::F32, "no attention weights"),
        (Backend::CpuFused, true, DType::F32, "no attention weights"),
        (Backend::Auto, false, DType::F64, "F64"),
    ] {
        let x = x.to_dtype(dtype)?;
        let e = attention(&x, &x, &x, &plan, &p(backend, weights))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("would materialise") && e.contains("(1, 2, 256, 256)"),
            "{e}"
        );
        assert!(e.contains("over the budget of 0.001 GiB"), "{e}");
        assert!(e.contains(why), "{backend:?}: {e}");
    }
    // Through sdpa and the fully-masked-row policy: same routing.
    let opts = SdpaOptions::new().masked_rows(MaskedRowPolicy::Nan);
    let q = Tensor::ones((1, 2, 256, 8), DType::F32, &dev)?;
    assert_eq!(sdpa(&q, &q, &q, &opts)?.dims(), &[1, 2, 256, 8]);
    assert!(sdpa(&q, &q, &q, &opts.clone().backend(Backend::Reference)).is_err());
    // Shapes whose scores would not fit any machine: refused at the default budget, instantly.
    set_reference_budget_bytes(None);
    assert_eq!(reference_budget_bytes(), default);
    let huge = Tensor::zeros((1, 1 << 20, 1, 1), DType::F32, &dev)?;
    let plan = MaskPlan::new(MaskDims::new(1, 1, 1 << 20, 1 << 20));
    let e = attention(&huge, &huge, &huge, &plan, &p(Backend::Auto, true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("12288.000 GiB"), "{e}");
    Ok(())
}
