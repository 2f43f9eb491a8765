//! A call's inputs as the fused kernel reads them: tensors with a contiguous last dimension in
//! their own dtype (or f32 for the backward), views of their storage read in place (quantized KV
//! caches with their scales), and the per-call context ([`Ctx`]) built over them: which product
//! forms and copies the call uses.

use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};

use super::kt::{transpose_blocks, transpose_heads, KeyTiles, KtBuf, Packed};
use super::modifiers;
use super::panels::Panels;
use super::plan::{ProductPlan, PvPath, QkPath};
use super::products::{self, Isa};
use super::tile::{Bias, Ctx, Data, OutBuf, OutPtr, View};
use super::{AttnCall, BLOCK_K, BLOCK_Q, MIN_ROWS_FOR_KT};

/// `t` as f32 with a contiguous last dimension: the tensor itself when it already is one (no
/// copy), else a converted / compacted copy.
pub(super) fn f32_rows(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    if t.layout().stride().last() == Some(&1) || t.dims().last() == Some(&1) {
        Ok(t)
    } else {
        t.contiguous()
    }
}

/// `t` with a contiguous last dimension in its own dtype (f32, f16, bf16: the kernel converts
/// half rows as it reads them): the tensor itself when it already is one, else a compacted copy.
pub(super) fn native_rows(t: &Tensor) -> Result<Tensor> {
    let t = match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => t.clone(),
        _ => t.to_dtype(DType::F32)?,
    };
    if t.layout().stride().last() == Some(&1) || t.dims().last() == Some(&1) {
        Ok(t)
    } else {
        t.contiguous()
    }
}

/// The elements of a CPU tensor (f32, f16 or bf16) from its start offset on.
fn cpu_data<'a>(storage: &'a Storage, t: &Tensor) -> Result<Data<'a>> {
    let Storage::Cpu(cpu) = storage else {
        bail!("fused CPU attention: tensor is not on the CPU")
    };
    let at = t.layout().start_offset();
    Ok(match t.dtype() {
        DType::BF16 => Data::Bf16(&cpu.as_slice::<half::bf16>()?[at..]),
        DType::F16 => Data::F16(&cpu.as_slice::<half::f16>()?[at..]),
        _ => Data::F32(&cpu.as_slice::<f32>()?[at..]),
    })
}

/// The f32 elements of a CPU tensor from its start offset on.
fn cpu_f32<'a>(storage: &'a Storage, t: &Tensor) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        bail!("fused CPU attention: tensor is not on the CPU")
    };
    Ok(&cpu.as_slice::<f32>()?[t.layout().start_offset()..])
}

/// The `(B, T, heads, D)` tensor `t`, whose storage is `g`, as a view read in place.
pub(super) fn view<'a>(g: &'a Storage, t: &Tensor) -> Result<View<'a>> {
    Ok(View {
        data: cpu_data(g, t)?,
        strides: strides3(t),
        rows: None,
    })
}

/// Whether `rows` (`U8`: int8 + 128, or `F8E4M3`; `(B, S, H, D)`) and `scales` (f32,
/// `(B, S, H)`) are a quantized cache's views that the kernel reads in place: CPU tensors from
/// the start of contiguous `(B, capacity, H, D)` and `(B, capacity, H)` buffers, so that row `r`
/// (`at / D`) has scale `r` of the same numbering.
pub(crate) fn quant_rows(rows: &Tensor, scales: &Tensor) -> bool {
    let (Ok((_, _, h, d)), Ok((_, _, hs))) = (rows.dims4(), scales.dims3()) else {
        return false;
    };
    let (r, sc) = (rows.layout(), scales.layout());
    let cap = r.stride()[0] / (h * d).max(1);
    rows.device().is_cpu()
        && scales.device().is_cpu()
        && matches!(rows.dtype(), DType::U8 | DType::F8E4M3)
        && scales.dtype() == DType::F32
        && hs == h
        && r.start_offset() == 0
        && sc.start_offset() == 0
        && r.stride() == [cap * h * d, h * d, d, 1]
        && sc.stride() == [cap * h, h, 1]
}

/// The view of quantized rows `t` (storage `g`) with their scales (storage `sg`), checked by
/// [`quant_rows`].
fn quant_view<'a>(g: &'a Storage, t: &Tensor, sg: &'a Storage) -> Result<View<'a>> {
    let (Storage::Cpu(rows), Storage::Cpu(scales)) = (g, sg) else {
        bail!("fused CPU attention: quantized rows are not on the CPU")
    };
    let (vals, fp8): (&[u8], bool) = match rows {
        CpuStorage::U8(v) => (v, false),
        CpuStorage::F8E4M3(v) => {
            assert_eq!(std::mem::size_of_val(v.as_slice()), v.len());
            // SAFETY: `F8E4M3` is a `repr(transparent)` byte (size asserted): the same memory
            // read as its bits.
            let bits = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) };
            (bits, true)
        }
        _ => bail!("fused CPU attention: quantized rows must be U8 or F8E4M3"),
    };
    Ok(View {
        data: Data::Bytes {
            vals,
            scales: scales.as_slice::<f32>()?,
            row: t.dim(3)?,
            fp8,
        },
        strides: strides3(t),
        rows: None,
    })
}

/// Element strides of dims 0..3 of a 4-D tensor.
fn strides3(t: &Tensor) -> [usize; 3] {
    let s = t.layout().stride();
    [s[0], s[1], s[2]]
}

/// A call's inputs as f32 tensors whose storage the kernel reads in place.
pub(super) struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Option<Tensor>,
    key_bias: Option<Tensor>,
    /// The scales of int8 `k` and `v` (an int8 KV cache, read in place).
    kv_scales: Option<(Tensor, Tensor)>,
}

impl Inputs {
    /// `native`: q, k, v keep their dtype (the forward converts half rows and tiles as it reads
    /// them); otherwise they are f32 (the backward).
    pub(super) fn new(c: &AttnCall, native: bool) -> Result<Self> {
        let dense =
            |t: Option<&Tensor>| t.map(|t| t.to_dtype(DType::F32)?.contiguous()).transpose();
        let rows = |t: &Tensor| if native { native_rows(t) } else { f32_rows(t) };
        let (k, v) = match c.kv_scales {
            // The cache's buffers, checked by `quant_rows`.
            Some(_) => (c.k.clone(), c.v.clone()),
            None => (rows(c.k)?, rows(c.v)?),
        };
        Ok(Self {
            q: rows(c.q)?,
            k,
            v,
            bias: dense(c.mask.bias())?,
            key_bias: dense(c.mask.key_bias())?,
            kv_scales: c.kv_scales.map(|(a, b)| (a.clone(), b.clone())),
        })
    }

    /// Builds the kernels' context over these inputs and runs `f` on it. `transpose_k` allows
    /// the transposed copy of K for the AVX-512 `Q · Kᵀ` micro-kernel (forward only); `out`
    /// and `lse` are where items write (the backward writes neither).
    pub(super) fn with_ctx<R>(
        &self,
        c: &AttnCall,
        transpose_k: bool,
        out: OutBuf,
        lse: Option<OutPtr>,
        f: impl FnOnce(&Ctx) -> R,
    ) -> Result<R> {
        let (b, l, h, hkv, s, d, dv) = (c.b, c.l, c.h, c.hkv, c.s, c.d, c.dv);
        let real_s = s - c.extra_keys;
        let (qg, _) = self.q.storage_and_layout();
        let (kg, _) = self.k.storage_and_layout();
        let (vg, _) = self.v.storage_and_layout();
        let bg = self.bias.as_ref().map(|t| t.storage_and_layout().0);
        let pg = self.key_bias.as_ref().map(|t| t.storage_and_layout().0);
        let scale_g = self
            .kv_scales
            .as_ref()
            .map(|(a, b)| (a.storage_and_layout().0, b.storage_and_layout().0));
        let (qv, mut kv, mut vv) = match &scale_g {
            Some((ks, vs)) => (
                view(&qg, &self.q)?,
                quant_view(&kg, &self.k, ks)?,
                quant_view(&vg, &self.v, vs)?,
            ),
            None => (
                view(&qg, &self.q)?,
                view(&kg, &self.k)?,
                view(&vg, &self.v)?,
            ),
        };
        // Keys gathered in place (a paged cache): no transposed or repacked copies, which
        // would read them all in order.
        if let Some(rows) = c.key_rows {
            // Every row id is below k's rows: checked by the callers (`kernels/gathered.rs`).
            if rows.len() != b * s {
                candle_core::bail!(
                    "fused attention: {} gathered key rows for {b} × {s} keys",
                    rows.len()
                )
            }
            kv.rows = Some((rows, s));
            vv.rows = Some((rows, s));
        }
        let transpose_k = transpose_k && c.key_rows.is_none();
        let bias = match (&self.bias, &bg) {
            (Some(t), Some(g)) => {
                let (mb, mh, ml, ms) = t.dims4()?;
                Some(Bias {
                    data: cpu_f32(g, t)?,
                    sb: if mb == 1 { 0 } else { mh * ml * ms },
                    sh: if mh == 1 { 0 } else { ml * ms },
                    sl: if ml == 1 { 0 } else { ms },
                })
            }
            _ => None,
        };
        let key_bias = match (&self.key_bias, &pg) {
            (Some(t), Some(g)) => Some(cpu_f32(g, t)?),
            _ => None,
        };
        let n_tiles = real_s.div_ceil(BLOCK_K);
        let dead_tiles = key_bias.map(|p| {
            let mut dead = vec![false; b * n_tiles];
            for bi in 0..b {
                let row = &p[bi * real_s..(bi + 1) * real_s];
                for t in 0..n_tiles {
                    let keys = &row[t * BLOCK_K..((t + 1) * BLOCK_K).min(real_s)];
                    dead[bi * n_tiles + t] = keys.iter().all(|&x| x == f32::NEG_INFINITY);
                }
            }
            dead
        });
        let isa = products::current();
        let mods = modifiers::Mods::new(c.mask, c.q.dtype())?;
        let g = h / hkv;
        // The transposed copy of K pays off when each K tile serves many query rows;
        // decode-like calls (few rows per KV head) read K in place instead.
        let transpose_k = transpose_k && isa != Isa::Portable && g * l >= MIN_ROWS_FOR_KT;
        let mut kt = None;
        let dims = (b, hkv, s, d, dv);
        let tiles = KeyTiles::new(real_s, s);
        let paths = product_plan(isa, (&qv, &kv, &vv), dims, (transpose_k, tiles), &mut kt);
        if paths.fp8_keys() {
            super::FP8_TILE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Prefill-like calls (each V tile read by many rows): V's heads made contiguous when
        // their rows are a multiple of 2 KiB apart (they would share a few L1 sets), or when there
        // are many keys (each strided row of a tile on its own page: 5% at S = 8192). (The copy
        // keeps V's dtype, and int8 values are never packed: `P · V`'s path stays the plan's.)
        // On AVX2 the copy is V's panels instead (`panels.rs`), which `P · V` reads in place of
        // `v`.
        let int8 = matches!(vv.data, Data::Bytes { .. });
        let copy_v =
            !int8 && paths.transposed_k() && l >= BLOCK_Q && (v_rows_alias(&vv) || s >= 2048);
        let panels =
            copy_v && products::panels_for(isa) && matches!(paths.pv, PvPath::F32 | PvPath::Half);
        let v_panels = panels.then(|| Panels::new(&vv, (b, hkv, dv), tiles));
        let v_packed = (copy_v && !panels).then(|| Packed::new(&vv, (b, hkv, s, dv)));
        let vv = match &v_packed {
            Some(p) => p.view(hkv, s, dv),
            None => vv,
        };
        let ctx = Ctx {
            q: qv,
            k: kv,
            v: vv,
            h,
            hkv,
            l,
            s,
            d,
            dv,
            g,
            real_s,
            tiles,
            v_panels: v_panels.as_ref(),
            scale: c.params.scale as f32,
            policy: c.params.masked_rows,
            plan: c.mask,
            masked: !c.mask.is_empty(),
            key_bias,
            dead_tiles,
            n_tiles,
            bias,
            mods: &mods,
            paths,
            out,
            lse,
        };
        Ok(f(&ctx))
    }
}

/// The products of a call on `isa` over the views `q`, `k`, `v` (`(B, Hkv, S, D, Dv)`),
/// decided once here; with `transpose_k` (many query rows per K tile, a SIMD
/// instruction set, keys not gathered) the transposed copy of K is made into `kt` in the tiles
/// `tiles`, which the plan borrows. The rule:
///
/// * `Q · Kᵀ`, the first that applies:
///   1. with `transpose_k`, the transposed copy: in bf16 pairs ([`QkPath::KtPairs`]) when the
///      call *multiplies bf16 pairs* (AVX512-BF16 dot products chosen for bf16,
///      [`products::dots_bf16`], bf16 Q and K, even `D`), else f32 ([`QkPath::KtF32`]);
///   2. K's rows in place against the query rows as pairs ([`QkPath::RowsPairs`]) when the
///      call multiplies bf16 pairs;
///   3. bf16 / f16 K whose rows `isa` reads in place ([`products::reads_half`]`(isa, D)`):
///      [`QkPath::RowsHalf`];
///   4. quantized K whose rows `isa` reads in place (`reads_half`, rows a whole number of
///      quantized rows apart): int8 K where `isa` has exact int16 products
///      ([`products::int16`]: AVX512-VNNI, AVX2) against int16 query rows
///      ([`QkPath::RowsInt16`]); fp8 K against bf16 queries where the call multiplies bf16
///      pairs (`dots_bf16`) and the CPU has AVX512-VBMI ([`products::vbmi`]), widened to bf16
///      tiles ([`QkPath::Fp8Pairs`]); else widened ([`QkPath::RowsBytes`]);
///   5. f32 rows, in place or converted per tile ([`QkPath::RowsF32`]).
/// * `P · V`, the first that applies:
///   1. AVX512-BF16 dot products chosen for bf16, bf16 V, `Dv` a multiple of 32:
///      [`PvPath::Pairs`];
///   2. bf16 / f16 V whose rows `isa` reads in place (`reads_half(isa, Dv)`): [`PvPath::Half`];
///   3. quantized V whose rows `isa` reads in place: int8 V with `Dv` a multiple of 32 when the
///      keys' products are the int16 ones of 4. above (K int8, `products::int16`, no copy of
///      K, no pairs; [`PvPath::Int16`]), else widened ([`PvPath::Bytes`]; fp8 V too: its
///      probabilities stay f32, see [`QkPath::Fp8Pairs`]);
///   4. f32 rows, in place or converted per tile ([`PvPath::F32`]).
pub(super) fn product_plan<'a>(
    isa: Isa,
    (q, k, v): (&View, &View, &View),
    (b, hkv, _, d, dv): (usize, usize, usize, usize, usize),
    (transpose_k, tiles): (bool, KeyTiles),
    kt: &'a mut Option<KtBuf>,
) -> ProductPlan<'a> {
    let bf16 = |x: &View| matches!(x.data, Data::Bf16(_));
    let half = |x: &View, cols: usize| {
        matches!(x.data, Data::Bf16(_) | Data::F16(_)) && products::reads_half(isa, cols)
    };
    // Quantized rows that `isa` reads in place (`View::byte_mat`): the row stride a whole
    // number of quantized rows.
    let bytes = |x: &View, cols: usize| match x.data {
        Data::Bytes { row, .. } => {
            products::reads_half(isa, cols) && x.strides[1].is_multiple_of(row)
        }
        _ => false,
    };
    #[cfg(target_arch = "x86_64")]
    let int8 = |x: &View| matches!(x.data, Data::Bytes { fp8: false, .. });
    let dots = products::dots_bf16(isa);
    // fp8 keys widened to bf16 tiles for the bf16 dot products, for bf16 queries where the call
    // uses those: the same exact products as widening to f32, summed in f32.
    #[cfg(target_arch = "x86_64")]
    let fp8_pairs = |x: &View| {
        matches!(x.data, Data::Bytes { fp8: true, .. }) && dots && products::vbmi() && bf16(q)
    };
    let pairs = dots && bf16(q) && bf16(k) && d.is_multiple_of(2);
    // Int8 keys against int16 query rows (AVX512-VNNI, AVX2), when K is neither copied nor
    // read as pairs (the values' int16 products go with them).
    #[cfg(target_arch = "x86_64")]
    let int16 =
        products::int16(isa) && !transpose_k && !pairs && int8(k) && products::reads_half(isa, d);
    let qk = match () {
        () if transpose_k => {
            let copy = if pairs {
                KtBuf::Pairs(transpose_blocks(k, (b, hkv, d / 2), tiles, |at, dst| {
                    k.pairs_into(at, dst).expect("bf16 keys");
                }))
            } else {
                KtBuf::F32(transpose_heads(k, (b, hkv, d), tiles))
            };
            match kt.insert(copy) {
                KtBuf::F32(x) => QkPath::KtF32(x),
                KtBuf::Pairs(x) => QkPath::KtPairs(x),
            }
        }
        () if pairs => QkPath::RowsPairs,
        () if half(k, d) => QkPath::RowsHalf,
        #[cfg(target_arch = "x86_64")]
        () if int16 && bytes(k, d) => QkPath::RowsInt16,
        #[cfg(target_arch = "x86_64")]
        () if fp8_pairs(k) && d.is_multiple_of(2) && bytes(k, d) => QkPath::Fp8Pairs,
        () if bytes(k, d) => QkPath::RowsBytes,
        () => QkPath::RowsF32,
    };
    let pv = match () {
        () if dots && bf16(v) && dv.is_multiple_of(32) => PvPath::Pairs,
        () if half(v, dv) => PvPath::Half,
        #[cfg(target_arch = "x86_64")]
        () if int16 && int8(v) && dv.is_multiple_of(32) && bytes(v, dv) => PvPath::Int16,
        () if bytes(v, dv) => PvPath::Bytes,
        () => PvPath::F32,
    };
    ProductPlan { isa, qk, pv }
}

/// Whether the rows of one head of `v` are a multiple of 2 KiB apart: a tile's rows then start in
/// at most two of L1's 64 sets. Measured: rows 4 KiB apart cost the AVX2 `P · V` 40% (AVX-512
/// 9%), while 3 KiB apart (four sets) cost nothing, and copying then only added time.
fn v_rows_alias(v: &View) -> bool {
    let elem = match v.data {
        Data::F32(_) => 4,
        Data::Bytes { .. } => 1,
        _ => 2,
    };
    let bytes = v.strides[1] * elem;
    bytes > 0 && bytes.is_multiple_of(2048)
}
