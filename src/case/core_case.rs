//! Attention-core cases (`case_kind=sdpa`) through [`crate::sdpa()`](fn@crate::sdpa) and packed
//! variable-length cases (`case_kind=varlen`) through [`crate::sdpa_varlen`].

use candle_core::{bail, DType, Device, Result, Tensor};

use super::check::{compare, Check};
use super::run::RunOptions;
use super::Case;
use crate::config::MaskedRowPolicy;
use crate::mask::CausalAlignment;
use crate::sdpa::{
    sdpa_varlen_with_kernel, sdpa_with_kernel, SdpaLayout, SdpaMask, SdpaOptions, SeqOffsets,
};

/// What a case file tests, from its `case_kind` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CaseKind {
    /// `nn.MultiheadAttention` (no `case_kind`, or `mha`).
    Mha,
    /// The attention core alone, `F.scaled_dot_product_attention` semantics.
    Sdpa,
    /// Packed variable-length sequences.
    Varlen,
}

impl Case {
    /// The case kind (`case_kind` metadata; absent = [`CaseKind::Mha`]).
    pub fn kind(&self) -> Result<CaseKind> {
        match self.meta_str("case_kind") {
            None | Some("mha") | Some("") => Ok(CaseKind::Mha),
            Some("sdpa") => Ok(CaseKind::Sdpa),
            Some("varlen") => Ok(CaseKind::Varlen),
            Some(other) => {
                bail!("metadata `case_kind`: unknown kind {other:?} (mha, sdpa, varlen)")
            }
        }
    }

    /// `causal_alignment`, else `is_causal` (top-left), else none.
    fn core_causal(&self) -> Result<Option<CausalAlignment>> {
        let alignment = self
            .meta_str("causal_alignment")
            .map(|a| a.trim().to_ascii_lowercase().replace('-', "_"));
        match alignment.as_deref() {
            Some("top_left") => Ok(Some(CausalAlignment::TopLeft)),
            Some("bottom_right") => Ok(Some(CausalAlignment::BottomRight)),
            Some("none") | Some("") | Some("false") => Ok(None),
            Some(_) => bail!(
                "metadata `causal_alignment`: expected none, top_left or bottom_right, got {:?}",
                self.meta_str("causal_alignment").unwrap_or_default()
            ),
            None => Ok(self
                .meta_bool("is_causal")?
                .then_some(CausalAlignment::TopLeft)),
        }
    }

    /// The options every core case shares: causal alignment, window, scale, backend, and the
    /// fully-masked-row policy the expectation shows.
    fn core_options(&self, opts: &RunOptions, expected: &Tensor) -> Result<SdpaOptions> {
        let mut o = SdpaOptions::new().backend(opts.backend);
        if let Some(a) = self.core_causal()? {
            o = o.causal(a);
        }
        if let Some(w) = self.meta_num::<usize>("window")? {
            o = o.sliding_window(w);
        }
        if let Some(s) = self.meta_num::<f64>("scale")? {
            o = o.scale(s);
        }
        let nan_rows = match self.meta_str("fully_masked_rows") {
            Some("nan") => true,
            Some("zero") => false,
            _ => super::run::has_nan(expected)?,
        };
        if nan_rows {
            o = o.masked_rows(MaskedRowPolicy::Nan);
        }
        self.score_modifiers(o, &opts.device)
    }

    /// The score modifiers (spec section "Score modifiers"): `softcap` metadata, `alibi_slopes`
    /// and `sinks` tensors, listed in `score_modifiers`. A listed modifier this runner does not
    /// know, or one listed without its data, fails the case; data present is applied (listed or
    /// not).
    fn score_modifiers(&self, mut o: SdpaOptions, dev: &Device) -> Result<SdpaOptions> {
        let listed: Vec<String> = self
            .meta_str("score_modifiers")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_ascii_lowercase())
            .filter(|m| !m.is_empty() && m != "none")
            .collect();
        for m in &listed {
            if !matches!(m.as_str(), "softcap" | "alibi" | "sinks") {
                bail!("metadata `score_modifiers`: unknown modifier {m:?} (softcap, alibi, sinks)")
            }
        }
        let present = [
            ("softcap", self.meta_str("softcap").is_some()),
            ("alibi", self.tensors.contains_key("alibi_slopes")),
            ("sinks", self.tensors.contains_key("sinks")),
        ];
        for (name, has) in present {
            if listed.iter().any(|m| m == name) && !has {
                bail!(
                    "score modifier {name}: listed in `score_modifiers` ({:?}) but its data is missing",
                    self.meta_str("score_modifiers").unwrap_or_default()
                )
            }
        }
        if let Some(c) = self.meta_num::<f64>("softcap")? {
            o = o.softcap(c);
        }
        let f32_on = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(dev);
        if let Some(t) = self.tensors.get("alibi_slopes") {
            o = o.alibi_slopes(f32_on(t)?);
        }
        if let Some(t) = self.tensors.get("sinks") {
            o = o.sinks(f32_on(t)?);
        }
        Ok(o)
    }
}

/// Runs an `sdpa` case: PyTorch's `(B, H, L, D)` layout, then the same inputs in the
/// `(B, L, H, D)` layout (both compared with `expected.output`).
pub(super) fn run_sdpa(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    let dev = &opts.device;
    let dtype = case.dtype()?;
    let tol = case.tolerance()?;
    let input = |n: &str| -> Result<Tensor> { case.tensor(n)?.to_dtype(dtype)?.to_device(dev) };
    let (q, k, v) = (input("q")?, input("k")?, input("v")?);
    let expected = case.tensor("expected.output")?;
    let mut o = case.core_options(opts, expected)?;
    if let Some(m) = case.tensors.get("attn_mask") {
        let m = m.to_device(dev)?;
        o = o.attn_mask(match case.meta_str("attn_mask_kind") {
            Some("bool_u8_1_means_attend") => SdpaMask::Allowed(m),
            // MHA polarity (1 = not allowed), should a case carry it.
            Some("bool_u8_1_means_masked") => SdpaMask::Allowed(m.eq(0u32)?),
            // Read as stored: the kernels convert it to their f32 compute dtype without
            // rounding it to the case dtype first.
            Some("float_additive") => SdpaMask::Additive(m),
            None | Some("") | Some("none") => SdpaMask::new(m),
            Some(other) => bail!(
                "metadata `attn_mask_kind`: expected bool_u8_1_means_attend or float_additive for an sdpa case, got {other:?}"
            ),
        });
    }
    let out = sdpa_with_kernel(&q, &k, &v, &o)?;
    checks.push(compare(
        &format!("sdpa[{}].output", out.kernel),
        &out.output,
        expected,
        tol.atol_output,
        tol.rtol,
    )?);
    if q.rank() == 4 {
        let t = |x: &Tensor| x.transpose(1, 2);
        let out = sdpa_with_kernel(&t(&q)?, &t(&k)?, &t(&v)?, &o.layout(SdpaLayout::Blhd))?;
        checks.push(compare(
            &format!("sdpa_blhd[{}].output", out.kernel),
            &out.output.transpose(1, 2)?,
            expected,
            tol.atol_output,
            tol.rtol,
        )?);
    }
    Ok(())
}

/// Runs a `varlen` case through [`crate::sdpa_varlen`].
pub(super) fn run_varlen(case: &Case, opts: &RunOptions, checks: &mut Vec<Check>) -> Result<()> {
    let dev = &opts.device;
    let dtype = case.dtype()?;
    let tol = case.tolerance()?;
    let input = |n: &str| -> Result<Tensor> { case.tensor(n)?.to_dtype(dtype)?.to_device(dev) };
    let (q, k, v) = (input("q")?, input("k")?, input("v")?);
    let cu_q = SeqOffsets::from_cumulative_tensor(case.tensor("cu_seqlens_q")?)?;
    let cu_k = SeqOffsets::from_cumulative_tensor(case.tensor("cu_seqlens_k")?)?;
    let expected = case.tensor("expected.output")?;
    let o = case.core_options(opts, expected)?;
    let out = sdpa_varlen_with_kernel(&q, &k, &v, &cu_q, &cu_k, &o)?;
    checks.push(compare(
        &format!("varlen[{}].output", out.kernel),
        &out.output,
        expected,
        tol.atol_output,
        tol.rtol,
    )?);
    Ok(())
}
