//! Harnesses shared by the cargo-fuzz targets in `fuzz/` (nightly) and the stable corpus replay
//! test `tests/fuzz_corpus.rs`: the same function runs in both, so that every input the fuzzer
//! found interesting (the committed corpus) is re-checked by `cargo test` on stable.
//!
//! Every harness takes arbitrary bytes, must not panic, and panics only where it finds a real
//! bug (a kernel disagreeing with the reference). Tensor sizes are bounded inside the harnesses,
//! and `bound_memory` caps the reference kernel's budget, so runs do not exhaust memory.
//! Not part of the API.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Backend, MaskedRowPolicy, MhaConfig};
use crate::kernels::{attention, AttnParams};
use crate::layout::WeightLayout;
use crate::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};
use crate::mha::{MhaInput, MultiHeadAttention};
use crate::sdpa::{sdpa, SdpaLayout, SdpaMask, SdpaOptions};

/// Caps the reference kernel's budget at 64 MiB for the process (the fuzzed inputs may claim
/// large shapes through zero-sized dimensions).
pub fn bound_memory() {
    crate::kernels::set_reference_budget_bytes(Some(64 << 20));
}

/// Reads fuzz bytes as parameters; past the end every read gives 0.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Whether a mask value was NaN or `+inf` (then only finite outputs are compared).
    wild_mask: bool,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            wild_mask: false,
        }
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// A value in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        self.u8() as usize % n.max(1)
    }

    fn flag(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A small finite value, or (rarely) a special one.
    fn value(&mut self, specials: bool) -> f32 {
        let b = self.u8();
        if specials && b >= 250 {
            return [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, 1e-40]
                [(b - 250) as usize % 5];
        }
        (b as f32 - 128.0) / 32.0
    }

    /// A mask value: 0, -inf, -1e9, a small finite value, or (rarely) +inf / NaN.
    fn mask_value(&mut self) -> f32 {
        match self.u8() % 16 {
            0..=6 => 0.0,
            7..=9 => f32::NEG_INFINITY,
            10 => -1e9,
            11 => {
                self.wild_mask = true;
                f32::INFINITY
            }
            12 => {
                self.wild_mask = true;
                f32::NAN
            }
            n => (n as f32 - 13.0) * 0.5,
        }
    }

    fn tensor(&mut self, dims: &[usize], dtype: DType, specials: bool) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.value(specials)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
    }

    fn mask_tensor(&mut self, dims: &[usize], float: bool) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        if float {
            let v: Vec<f32> = (0..n).map(|_| self.mask_value()).collect();
            Tensor::from_vec(v, dims, &Device::Cpu)
        } else {
            let v: Vec<u8> = (0..n).map(|_| self.u8() & 1).collect();
            Tensor::from_vec(v, dims, &Device::Cpu)
        }
    }
}

/// Harness (a): the `mha-case` loader and runner on arbitrary bytes. The runner must return a
/// report (a failed one for bad input), never panic.
#[cfg(feature = "runner")]
pub fn case_bytes(data: &[u8]) -> crate::case::CaseReport {
    use crate::case::{run_case_bytes, RunOptions};
    bound_memory();
    let opts = RunOptions {
        device: Device::Cpu,
        grad: true,
        backend: Backend::Auto,
    };
    run_case_bytes("fuzz", data, &opts)
}

/// Whether two outputs agree: same NaN positions, same infinities, finite values within
/// `atol + rtol·|b|`. With `strict` false (NaN or infinite inputs or mask values: where the
/// kernels may differ, see the README's numerics policy), only elements finite in both.
fn agree(
    a: &Tensor,
    b: &Tensor,
    dtype: DType,
    strict: bool,
) -> Result<std::result::Result<(), String>> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() {
        return Ok(Err(format!("lengths {} and {}", a.len(), b.len())));
    }
    let (atol, rtol) = match dtype {
        DType::F32 => (1e-4, 1e-4),
        DType::F64 => (1e-9, 1e-9),
        _ => (3e-2, 2e-2),
    };
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = if !strict && (!x.is_finite() || !y.is_finite()) {
            true
        } else if x.is_nan() || y.is_nan() {
            x.is_nan() && y.is_nan()
        } else if x.is_infinite() || y.is_infinite() {
            x == y
        } else {
            (x - y).abs() <= atol + rtol * y.abs()
        };
        if !ok {
            return Ok(Err(format!("element {i}: {x} vs reference {y}")));
        }
    }
    Ok(Ok(()))
}

/// Harness (b): a mask plan from arbitrary shapes, dtypes and mask values (key padding of every
/// kind, attention masks of every rank and polarity, causal alignment and window, packed
/// sequences), then the call on every backend and through [`sdpa`]. Building may fail (an
/// `Err`); where it builds, every kernel must agree with the reference. Returns a description of
/// what ran (for the replay test's log); panics on a disagreement.
pub fn mask_bytes(data: &[u8]) -> String {
    bound_memory();
    match mask_case(&mut Reader::new(data)) {
        Ok(s) => s,
        Err(e) => format!("err: {e}"),
    }
}

fn mask_case(r: &mut Reader) -> Result<String> {
    let b = r.below(3);
    let hkv = 1 + r.below(2);
    let h = hkv * (1 + r.below(3));
    let l = r.below(10);
    let s = r.below(10);
    let extra = r.below(3) / 2;
    let d = [1, 3, 8, 16, 64][r.below(5)];
    let dtype = [DType::F32, DType::F32, DType::BF16, DType::F16, DType::F64][r.below(5)];
    let specials = r.u8() >= 240;
    let q = r.tensor(&[b, l, h, d], dtype, specials)?;
    let k = r.tensor(&[b, s + extra, hkv, d], dtype, specials)?;
    let v = r.tensor(&[b, s + extra, hkv, d], dtype, specials)?;
    let cd = crate::kernels::compute_dtype(dtype);
    let dev = Device::Cpu;
    let mut plan = MaskPlan::new(MaskDims::new(b, h, l, s));
    let causal = match r.below(4) {
        0 | 1 => None,
        n => Some(Causal {
            alignment: if n == 2 {
                CausalAlignment::TopLeft
            } else {
                CausalAlignment::BottomRight
            },
            window: r.flag().then(|| r.below(s + 2)),
        }),
    };
    if let Some(c) = causal {
        plan = plan.with_causal(c)?;
    }
    match r.below(7) {
        0 | 1 => {}
        2 => {
            let lens: Vec<usize> = (0..b + r.below(4) / 3).map(|_| r.below(s + 2)).collect();
            plan = plan.with_key_padding(&KeyPaddingMask::from_lengths(&lens), cd, &dev)?;
        }
        3 => {
            let float = r.flag();
            let t = r.mask_tensor(&[b, s], float)?;
            plan = plan.with_key_padding(&KeyPaddingMask::new(t), cd, &dev)?;
        }
        4 => {
            let pad: Vec<usize> = (0..b).map(|_| r.below(s + 2)).collect();
            plan = plan.with_left_padding(&pad)?;
        }
        5 => {
            let ranges: Vec<(usize, usize)> =
                (0..b).map(|_| (r.below(s + 2), r.below(s + 2))).collect();
            plan = plan.with_key_ranges(&ranges)?;
        }
        _ => {
            let nq = r.below(4);
            let mut cu_q = vec![0];
            let mut cu_k = vec![0];
            for _ in 0..nq {
                cu_q.push(cu_q.last().unwrap() + r.below(l + 1));
                cu_k.push(cu_k.last().unwrap() + r.below(s + 1));
            }
            plan = plan.with_packed_sequences(&cu_q, &cu_k)?;
        }
    }
    if r.below(3) == 0 {
        let float = r.flag();
        let dims: Vec<usize> = match r.below(4) {
            0 => vec![l, s],
            1 => vec![b * h, l, s],
            2 => vec![
                if r.flag() { 1 } else { b },
                if r.flag() { 1 } else { h },
                l,
                s,
            ],
            _ => vec![r.below(3), s],
        };
        let t = r.mask_tensor(&dims, float)?;
        let m = if float {
            AttnMask::Additive(t)
        } else {
            AttnMask::Bool(t)
        };
        plan = plan.with_attn_mask(&m, cd, &dev)?;
    }
    let mut params = AttnParams::new(d);
    if r.flag() {
        params.masked_rows = MaskedRowPolicy::Nan;
    }
    if r.u8() >= 250 {
        params.scale = 1e30;
    }
    let strict = !specials && !r.wild_mask && params.scale < 1e3;
    let what = format!(
        "B{b} H{h}/{hkv} L{l} S{s}+{extra} D{d} {dtype:?} specials={specials} causal={causal:?} {:?}",
        params.masked_rows
    );
    let reference = {
        let mut p = params;
        p.backend = Backend::Reference;
        attention(&q, &k, &v, &plan, &p)
    };
    for backend in [Backend::Auto, Backend::CpuFused] {
        let mut p = params;
        p.backend = backend;
        let got = attention(&q, &k, &v, &plan, &p);
        match (&got, &reference) {
            (Ok(got), Ok(want)) => {
                if let Err(e) = agree(&got.output, &want.output, dtype, strict)? {
                    panic!(
                        "{what}: {backend:?} ({}) disagrees with the reference: {e}",
                        got.kernel
                    )
                }
            }
            // The fused kernel refuses f64 (and the budget may refuse the reference).
            (Err(_), _) if dtype == DType::F64 && backend == Backend::CpuFused => {}
            (Err(e), Ok(_)) => panic!("{what}: {backend:?} failed where the reference ran: {e}"),
            _ => {}
        }
    }
    // The same tensors through sdpa ((B, L, H, D) layout), with an SDPA-polarity mask.
    let mut opts = SdpaOptions::new().layout(SdpaLayout::Blhd);
    if let Some(c) = causal {
        opts = opts.causal(c.alignment);
        if let Some(w) = c.window {
            opts = opts.sliding_window(w);
        }
    }
    if r.flag() {
        let float = r.flag();
        let dims = [[1, 1, 1, s], [b, 1, 1, s], [1, 1, l, s], [b, h, l, s]][r.below(4)];
        let t = r.mask_tensor(&dims, float)?;
        opts = opts.attn_mask(if float {
            SdpaMask::Additive(t)
        } else {
            SdpaMask::Allowed(t)
        });
    }
    opts = opts.masked_rows(params.masked_rows);
    let strict = strict && !r.wild_mask;
    let (k, v) = (k.narrow(1, 0, s)?, v.narrow(1, 0, s)?);
    let want = sdpa(&q, &k, &v, &opts.clone().backend(Backend::Reference));
    let got = sdpa(&q, &k, &v, &opts);
    if let (Ok(got), Ok(want)) = (&got, &want) {
        if let Err(e) = agree(got, want, dtype, strict)? {
            panic!("{what}: sdpa disagrees with its reference: {e}")
        }
    }
    Ok(what)
}

/// Harness (c): an [`MhaConfig`] from the first bytes, a [`WeightLayout`] and the rest as a
/// safetensors file loaded through [`VarBuilder::from_buffered_safetensors`]; where the module
/// loads, one small forward. Everything may fail with an `Err`; nothing may panic.
pub fn layout_bytes(data: &[u8]) -> String {
    bound_memory();
    let split = data.len().min(16);
    let mut r = Reader::new(&data[..split]);
    match layout_case(&mut r, &data[split..]) {
        Ok(s) => s,
        Err(e) => format!("err: {e}"),
    }
}

fn layout_case(r: &mut Reader, st: &[u8]) -> Result<String> {
    let e = r.below(17);
    let heads = r.below(5);
    let mut cfg = MhaConfig::new(e, heads)
        .with_batch_first(r.flag())
        .with_bias(r.flag())
        .with_add_bias_kv(r.flag())
        .with_add_zero_attn(r.flag());
    if r.flag() {
        cfg = cfg.with_num_kv_heads(r.below(5));
    }
    if r.flag() {
        cfg = cfg.with_head_dim(r.below(9));
    }
    if r.flag() {
        cfg = cfg.with_kdim(r.below(17));
    }
    if r.flag() {
        cfg = cfg.with_vdim(r.below(17));
    }
    let layout = match r.below(6) {
        0 => WeightLayout::torch(),
        1 => WeightLayout::bert(),
        2 => WeightLayout::llama(),
        3 => WeightLayout::gpt2(),
        4 => WeightLayout::separate(),
        _ => WeightLayout::custom("a", "b", "c", "d"),
    };
    let dtype = [DType::F32, DType::BF16, DType::F16, DType::F64][r.below(4)];
    let what = format!("{cfg:?} {layout} {dtype:?}");
    let vb = VarBuilder::from_buffered_safetensors(st.to_vec(), dtype, &Device::Cpu)?;
    let mha = MultiHeadAttention::load(cfg.clone(), &layout, vb)?;
    let (q_e, k_e, v_e) = (cfg.embed_dim, cfg.kdim(), cfg.vdim());
    let shape = |f: usize| {
        if cfg.batch_first {
            (1, 3, f)
        } else {
            (3, 1, f)
        }
    };
    let q = Tensor::ones(shape(q_e), dtype, &Device::Cpu)?;
    let k = Tensor::ones(shape(k_e), dtype, &Device::Cpu)?;
    let v = Tensor::ones(shape(v_e), dtype, &Device::Cpu)?;
    let out =
        mha.attend(&MhaInput::cross(q, k, v).key_padding_mask(KeyPaddingMask::from_lengths(&[2])))?;
    Ok(format!("{what}: {:?}", out.output.dims()))
}
