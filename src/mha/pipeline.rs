//! The one attention path every entry point takes:
//! validate → project → positional hook → key/value source (fresh, cache, static) → mask plan →
//! kernel → merge heads → output projection.
//!
//! Heads are split in one place ([`MultiHeadAttention::project`]) as views in the `(B, T, heads,
//! D)` layout the projections produce (a reshape, or narrowed slices of the packed projection:
//! no copy), which is the layout the kernels read and write.

use candle_core::{bail, Result, Tensor};

use super::{MhaInput, MhaOutput, MultiHeadAttention, NeedWeights};
use crate::cache::{CachedKv, KvCache, StaticKv};
use crate::kernels::{self, compute_dtype, AttnOutput, AttnParams};
use crate::mask::{Causal, CausalAlignment, MaskDims, MaskPlan};

/// Where a call's keys and values come from.
#[derive(Clone, Copy)]
pub(super) enum KvSource<'a> {
    /// Projected from this call's input (self- or cross-attention).
    Fresh,
    /// This call's keys and values appended to a cache, attended together with it.
    Cached(&'a KvCache),
    /// A memory projected once ([`MultiHeadAttention::static_kv`]).
    Static(&'a StaticKv),
}

/// An attention call's inputs after validation, batch-first.
pub(super) struct Prepared {
    /// `(B, L, E)`.
    q: Tensor,
    /// `(B, S, kdim)`, `(B, S, vdim)` of a cross-attention call (`None`: from `q`, or not
    /// projected here).
    kv: Option<(Tensor, Tensor)>,
    b: usize,
    l: usize,
    /// Number of maskable keys (cached + new with a cache, the memory length with a memory).
    s: usize,
    unbatched: bool,
    self_attn: bool,
    /// Left padding per batch element in effect for this call.
    pad: Option<Vec<usize>>,
    /// Positions cached before this call.
    past: usize,
    causal: Option<Causal>,
}

impl Prepared {
    /// Validates `input` for a call taking its keys and values from `src`.
    pub(super) fn new(m: &MultiHeadAttention, input: &MhaInput, src: KvSource) -> Result<Self> {
        let cfg = &m.cfg;
        if input.packed.is_some() {
            check_packed(input, src)?;
        }
        match src {
            KvSource::Fresh => {}
            KvSource::Cached(_) => {
                if input.key.is_some() || input.value.is_some() {
                    bail!("attend_cached is self-attention: give no key/value (use attend_static for a fixed memory)")
                }
                if input.key_padding_mask.is_some() {
                    bail!("attend_cached: key padding is tracked by the cache: give .left_padding(..) on the first call instead of a key_padding_mask")
                }
                let alignment = input.causal.unwrap_or(CausalAlignment::BottomRight);
                if alignment != CausalAlignment::BottomRight {
                    bail!("attend_cached attends with CausalAlignment::BottomRight (the new rows are the last of the sequence), got {alignment:?}")
                }
            }
            KvSource::Static(_) => {
                if input.key.is_some() || input.value.is_some() {
                    bail!("attend_static: the keys and values come from the StaticKv; give no key/value")
                }
                if input.left_padding.is_some() {
                    bail!("attend_static: left_padding is for self-attention; use a key padding mask over the memory")
                }
            }
        }
        let q_in = &input.query;
        let (k_in, v_in) = match (&input.key, &input.value) {
            (Some(k), Some(v)) => (k, v),
            (None, None) => (q_in, q_in),
            _ => bail!("key and value must be given together (or neither, for self-attention)"),
        };
        let layout = if cfg.batch_first {
            "(B, L, E)"
        } else {
            "(L, B, E)"
        };
        let unbatched = match q_in.rank() {
            2 => true,
            3 => false,
            _ => bail!(
                "query must be 2-D (L, E) for unbatched input or 3-D {layout}, got shape {:?}",
                q_in.dims()
            ),
        };
        m.check_tensor("query", q_in)?;
        let cross = input.key.is_some();
        if cross {
            for (name, t) in [("key", k_in), ("value", v_in)] {
                if t.rank() != q_in.rank() {
                    bail!(
                        "{name}: for a {}-D query expected a {}-D {name}, got shape {:?}",
                        q_in.rank(),
                        q_in.rank(),
                        t.dims()
                    )
                }
                m.check_tensor(name, t)?;
            }
        }
        let to_bf = |t: &Tensor| -> Result<Tensor> {
            if unbatched {
                t.unsqueeze(0)
            } else if cfg.batch_first {
                Ok(t.clone())
            } else {
                t.transpose(0, 1)
            }
        };
        let q = to_bf(q_in)?;
        let (b, l, e) = q.dims3()?;
        if e != cfg.embed_dim {
            bail!(
                "query: expected embed_dim={} features, got shape {:?}",
                cfg.embed_dim,
                q_in.dims()
            )
        }
        let (kv, s) = match src {
            KvSource::Fresh if cross => {
                let (k, v) = (to_bf(k_in)?, to_bf(v_in)?);
                let (bk, s, ke) = k.dims3()?;
                let (bv, sv, ve) = v.dims3()?;
                if ke != cfg.kdim() {
                    bail!(
                        "key: expected kdim={} features, got shape {:?}",
                        cfg.kdim(),
                        k_in.dims()
                    )
                }
                if ve != cfg.vdim() {
                    bail!(
                        "value: expected vdim={} features, got shape {:?}",
                        cfg.vdim(),
                        v_in.dims()
                    )
                }
                if bk != b || bv != b {
                    bail!(
                        "key and value batch size must match the query's ({b}), got key {:?} and value {:?}",
                        k_in.dims(),
                        v_in.dims()
                    )
                }
                if sv != s {
                    bail!(
                        "key and value must have the same sequence length, got key {:?} and value {:?}",
                        k_in.dims(),
                        v_in.dims()
                    )
                }
                (Some((k, v)), s)
            }
            KvSource::Fresh => (None, l),
            KvSource::Cached(cache) => {
                if let Some(cb) = cache.batch_size() {
                    if !cache.is_empty() && cb != b {
                        bail!("attend_cached: the cache holds batch size {cb}, the input has {b} (reset the cache first)")
                    }
                }
                (None, cache.len() + l)
            }
            KvSource::Static(memory) => {
                if memory.batch_size() != b {
                    bail!(
                        "attend_static: the memory has batch size {}, the query {b}",
                        memory.batch_size()
                    )
                }
                if memory.k.dtype() != m.dtype {
                    bail!(
                        "attend_static: the memory is {:?}, the module {:?}",
                        memory.k.dtype(),
                        m.dtype
                    )
                }
                (None, memory.len())
            }
        };
        if b == 0 || l == 0 || s == 0 {
            bail!("empty input: batch {b}, query length {l}, key length {s} (all must be > 0)")
        }
        let self_attn = !cross || (k_in.id() == q_in.id() && v_in.id() == q_in.id());
        let pad = match (src, &input.left_padding) {
            (KvSource::Fresh, None) | (KvSource::Static(_), _) => None,
            (KvSource::Fresh, Some(pad)) => {
                if s != l {
                    bail!("left_padding is for self-attention: query length {l} differs from key length {s}")
                }
                Some(check_padding(pad, b, l)?)
            }
            (KvSource::Cached(cache), pad) => match (pad, cache.is_empty()) {
                // The padding may extend beyond this first call (e.g. decoding from the first
                // slot).
                (Some(pad), true) => Some(check_padding(pad, b, usize::MAX)?),
                (Some(pad), false) => {
                    if cache.left_padding() != Some(&pad[..]) {
                        bail!("attend_cached: left_padding {pad:?} differs from the one the cache recorded at prefill ({:?})", cache.left_padding())
                    }
                    Some(pad.clone())
                }
                (None, true) => None,
                (None, false) => cache.left_padding().map(|p| p.to_vec()),
            },
        };
        if pad.is_some() && input.key_padding_mask.is_some() {
            bail!("give either left_padding or a key_padding_mask, not both")
        }
        let causal = match src {
            KvSource::Cached(_) => Some(Causal {
                alignment: CausalAlignment::BottomRight,
                window: input.sliding_window,
            }),
            _ => input.causal_mask()?,
        };
        let past = match src {
            KvSource::Cached(cache) => cache.len(),
            _ => 0,
        };
        Ok(Self {
            q,
            kv,
            b,
            l,
            s,
            unbatched,
            self_attn,
            pad,
            past,
            causal,
        })
    }
}

impl MultiHeadAttention {
    /// The whole path; returns the output and, for a cached call, the cache with this call's
    /// keys and values appended (the caller commits it: on error the cache is unchanged).
    /// Decode-sized calls (at most 64 rows of queries, keys and values to project) run on
    /// rayon's pool (see [`crate::pool::on_pool`]).
    pub(super) fn run(
        &self,
        input: &MhaInput,
        src: KvSource,
        train: bool,
    ) -> Result<(MhaOutput, Option<KvCache>)> {
        // The most rows the call projects: the queries', or a key or value input's.
        let rows = [Some(&input.query), input.key.as_ref(), input.value.as_ref()]
            .into_iter()
            .flatten()
            .map(crate::pool::rows)
            .max()
            .unwrap_or(0);
        crate::pool::on_pool(rows, || self.run_here(input, src, train))
    }

    /// [`Self::run`] on the calling thread.
    fn run_here(
        &self,
        input: &MhaInput,
        src: KvSource,
        train: bool,
    ) -> Result<(MhaOutput, Option<KvCache>)> {
        let cfg = &self.cfg;
        let p = Prepared::new(self, input, src)?;
        let plan = self.plan_for(input, &p)?;
        let (mut q, mut new_kv) = self.project(&p, !matches!(src, KvSource::Static(_)))?;
        // Positional hook on the new rows: row t of sequence b sits at past + t - pad[b]; the
        // keys of a cross-attention memory start at 0.
        if let (Some(hook), Some((cq, ck))) = (&input.positional, &input.packed) {
            // Packed: positions restart at every sequence.
            q = hook.apply_positions(&q, &cq.positions())?;
            if let Some((k, v)) = new_kv {
                new_kv = Some((hook.apply_positions(&k, &ck.positions())?, v));
            }
        } else if let Some(hook) = &input.positional {
            let starts = starts_from(p.pad.as_deref(), p.b, p.past);
            q = hook.apply(&q, &starts)?;
            if let Some((k, v)) = new_kv {
                let k_starts = if p.self_attn { starts } else { vec![0] };
                new_kv = Some((hook.apply(&k, &k_starts)?, v));
            }
        }
        let extra_keys = self.proj.bias_k.is_some() || cfg.add_zero_attn;
        let (stored, next_cache) = match (src, new_kv) {
            (KvSource::Static(memory), _) => {
                (CachedKv::Dense(memory.k.clone(), memory.v.clone()), None)
            }
            (KvSource::Cached(cache), Some((k, v))) => {
                // The caller's cache itself (not a clone: no copy on write), committed by the
                // caller once the call succeeds.
                let mut next = cache.same_instance();
                let stored = next.append_stored(&k, &v)?;
                if p.past == 0 {
                    next.set_left_padding(p.pad.clone());
                }
                (stored, Some(next))
            }
            (_, Some((k, v))) => (CachedKv::Dense(k, v), None),
            (_, None) => bail!("attention: no keys and values were projected for this call"),
        };
        let params = AttnParams {
            scale: cfg.scale(),
            masked_rows: cfg.masked_rows,
            dropout: if train { cfg.dropout } else { 0.0 },
            need_weights: input.need_weights != NeedWeights::No,
            backend: cfg.backend,
        };
        let (mut k, mut v) = match stored {
            CachedKv::Dense(k, v) => (k, v),
            // An int8 cache: read as stored unless keys are appended after it.
            CachedKv::Quant(q8) if !extra_keys => {
                let att = kernels::attention_quantized(&q, &q8, &plan, &params)?;
                return Ok((self.merge(att, &p, input.need_weights)?, next_cache));
            }
            CachedKv::Quant(q8) => q8.dequantize(q.dtype())?,
        };
        // Keys appended after the maskable ones: bias_k / bias_v, then a zero key.
        let (b, hkv, d) = (p.b, cfg.kv_heads(), cfg.head_dim());
        if let (Some(bk), Some(bv)) = (&self.proj.bias_k, &self.proj.bias_v) {
            let row = |t: &Tensor| t.reshape((1, 1, hkv, d))?.broadcast_as((b, 1, hkv, d));
            k = Tensor::cat(&[&k, &row(bk)?], 1)?;
            v = Tensor::cat(&[&v, &row(bv)?], 1)?;
        }
        if cfg.add_zero_attn {
            let z = Tensor::zeros((b, 1, hkv, d), k.dtype(), k.device())?;
            k = Tensor::cat(&[&k, &z], 1)?;
            v = Tensor::cat(&[&v, &z], 1)?;
        }
        let att = kernels::attention(&q, &k, &v, &plan, &params)?;
        Ok((self.merge(att, &p, input.need_weights)?, next_cache))
    }

    /// The mask plan of a call: the input's own, checked against the call's shapes, or one
    /// built from its masks; with the layer's score modifiers (soft-cap, ALiBi, sinks).
    pub(super) fn plan_for(&self, input: &MhaInput, p: &Prepared) -> Result<MaskPlan> {
        let plan = self.masks_for(input, p)?;
        self.with_modifiers(plan)
    }

    /// The layer's score modifiers set on `plan` (replacing any the plan has).
    pub(super) fn with_modifiers(&self, mut plan: MaskPlan) -> Result<MaskPlan> {
        if let Some(c) = self.cfg.softcap {
            plan = plan.with_softcap(c)?;
        }
        if let Some(m) = &self.alibi {
            plan = plan.with_alibi_slopes(m)?;
        }
        if let Some(s) = &self.proj.sinks {
            plan = plan.with_sinks(s)?;
        }
        Ok(plan)
    }

    /// The masks of a call as a plan (see [`Self::plan_for`]).
    pub(super) fn masks_for(&self, input: &MhaInput, p: &Prepared) -> Result<MaskPlan> {
        let h = self.cfg.num_heads;
        if let Some(plan) = &input.plan {
            let own = [
                ("key_padding_mask", input.key_padding_mask.is_some()),
                ("attn_mask", input.attn_mask.is_some()),
                ("causal", input.causal.is_some()),
                ("sliding_window", input.sliding_window.is_some()),
            ];
            if let Some((name, _)) = own.iter().find(|(_, set)| *set) {
                bail!("mask_plan: the input also carries a {name}; put every mask in the plan")
            }
            plan.check_dims("mask_plan", p.b, h, p.l, p.s)?;
            if input.packed.is_some() && !plan.is_packed() {
                bail!("mask_plan: the input is packed but the plan has no packed sequences (build it with MultiHeadAttention::mask_plan from the packed input)")
            }
            return Ok(plan.clone());
        }
        let dims = MaskDims {
            batch: p.b,
            heads: h,
            q_len: p.l,
            kv_len: p.s,
            unbatched: p.unbatched,
        };
        let mut plan = MaskPlan::new(dims);
        if let Some(c) = p.causal {
            plan = plan.with_causal(c)?;
        }
        if let Some(pad) = &p.pad {
            plan = plan.with_left_padding(pad)?;
        }
        if let Some((cq, ck)) = &input.packed {
            plan = plan.with_packed_sequences(cq.as_slice(), ck.as_slice())?;
        }
        let (cd, dev) = (compute_dtype(self.dtype), &self.device);
        if let Some(kpm) = &input.key_padding_mask {
            plan = plan.with_key_padding(kpm, cd, dev)?;
        }
        if let Some(m) = &input.attn_mask {
            plan = plan.with_attn_mask(m, cd, dev)?;
        }
        Ok(plan)
    }

    /// The projections split into heads, as views in the `(B, T, heads, D)` layout: q
    /// `(B, L, H, D)` and, with `with_kv`, k and v `(B, S, Hkv, D)`. The one place heads are
    /// split.
    fn project(&self, p: &Prepared, with_kv: bool) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let cfg = &self.cfg;
        let b = p.b;
        let (h, hkv, d) = (cfg.num_heads, cfg.kv_heads(), cfg.head_dim());
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            let len = t.dim(1)?;
            t.reshape((b, len, n, d))
        };
        if !with_kv {
            return Ok((heads(self.proj.q.forward(&p.q)?, h)?, None));
        }
        if let (Some(qkv), true) = (&self.proj.qkv, p.self_attn) {
            // One GEMM; q, k and v are narrowed views of its (B, L, H + 2·Hkv, D) output.
            let all = heads(qkv.forward(&p.q)?, h + 2 * hkv)?;
            return Ok((
                all.narrow(2, 0, h)?,
                Some((all.narrow(2, h, hkv)?, all.narrow(2, h + hkv, hkv)?)),
            ));
        }
        let (k_in, v_in) = match &p.kv {
            Some((k, v)) => (k, v),
            None => (&p.q, &p.q),
        };
        Ok((
            heads(self.proj.q.forward(&p.q)?, h)?,
            Some((
                heads(self.proj.k.forward(k_in)?, hkv)?,
                heads(self.proj.v.forward(v_in)?, hkv)?,
            )),
        ))
    }

    /// Kernel output `(B, L, H, D)` → merged heads → output projection → the caller's layout;
    /// the weights as asked.
    fn merge(&self, att: AttnOutput, p: &Prepared, need: NeedWeights) -> Result<MhaOutput> {
        let o = att.output.reshape((p.b, p.l, self.cfg.q_dim()))?;
        let o = self.proj.o.forward(&o)?;
        let output = if p.unbatched {
            o.squeeze(0)?
        } else if self.cfg.batch_first {
            o
        } else {
            o.transpose(0, 1)?
        };
        let weights = match (att.weights, need) {
            (Some(w), NeedWeights::PerHead) => Some(w),
            (Some(w), NeedWeights::Averaged) => Some(w.mean(1)?),
            _ => None,
        };
        let weights = match weights {
            Some(w) if p.unbatched => Some(w.squeeze(0)?.to_dtype(self.dtype)?),
            Some(w) => Some(w.to_dtype(self.dtype)?),
            None => None,
        };
        Ok(MhaOutput {
            output,
            weights,
            kernel: att.kernel,
        })
    }
}

/// A packed call: fresh keys only, no padding masks, `(total, features)` tensors whose row
/// counts match their offsets.
fn check_packed(input: &MhaInput, src: KvSource) -> Result<()> {
    let Some((cq, ck)) = &input.packed else {
        return Ok(());
    };
    if !matches!(src, KvSource::Fresh) {
        bail!("packed sequences: attend / attend_t only (no KV cache, no static memory)")
    }
    let masks = [
        ("key_padding_mask", input.key_padding_mask.is_some()),
        ("attn_mask", input.attn_mask.is_some()),
        ("left_padding", input.left_padding.is_some()),
    ];
    if let Some((name, _)) = masks.iter().find(|(_, set)| *set) {
        bail!("packed sequences have no padding: a {name} does not apply (the offsets say where each sequence ends)")
    }
    if cq.num_seqs() != ck.num_seqs() {
        bail!(
            "packed sequences: {} query sequences but {} key sequences",
            cq.num_seqs(),
            ck.num_seqs()
        )
    }
    let k = input.key.as_ref().unwrap_or(&input.query);
    for (name, t, cu) in [("query", &input.query, cq), ("key", k, ck)] {
        if t.rank() != 2 || t.dim(0)? != cu.total() {
            bail!(
                "packed {name}: expected ({}, features) (the offsets' total), got shape {:?}",
                cu.total(),
                t.dims()
            )
        }
    }
    if input.key.is_none() && cq != ck {
        bail!("packed self-attention: the key offsets must be the query offsets")
    }
    Ok(())
}

fn check_padding(pad: &[usize], b: usize, l: usize) -> Result<Vec<usize>> {
    if pad.len() != b {
        bail!(
            "left_padding: expected one count per batch element ({b}), got {}",
            pad.len()
        )
    }
    if let Some(bad) = pad.iter().find(|&&n| n > l) {
        bail!("left_padding: {bad} padding rows but the input has only {l}")
    }
    Ok(pad.to_vec())
}

/// Position of row 0 per batch element: `past - pad[b]`.
fn starts_from(pad: Option<&[usize]>, b: usize, past: usize) -> Vec<i64> {
    match pad {
        None => vec![past as i64],
        Some(pad) => (0..b).map(|i| past as i64 - pad[i] as i64).collect(),
    }
}
