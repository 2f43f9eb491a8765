//! [`MultiHeadAttention::attend_paged`]: self-attention of a batch of sequences over a paged
//! KV pool (continuous batching).

use candle_core::{bail, Result, Tensor};

use super::{MhaInput, MhaOutput, MultiHeadAttention, NeedWeights};
use crate::cache::{PagedKvPool, PagedStep};
use crate::kernels::paged::{paged_attention_planned, paged_attention_quantized_planned};
use crate::kernels::AttnParams;
use crate::mask::{Causal, CausalAlignment, MaskDims, MaskPlan};

impl MultiHeadAttention {
    /// Self-attention of the new tokens of a batch of sequences against their keys in a paged
    /// pool: `input.query` is `(total_q, E)`, the new tokens of `step`'s sequences packed in
    /// the step's order ([`PagedStep::cu_q`]); their keys and values are written into layer
    /// `layer` of `pool` (the step's blocks, in place), then every query attends to its own
    /// sequence's keys, bottom-right causal (the new tokens are the last of their sequence:
    /// prefill and decode share one call). The positional hook (RoPE) sees each token at its
    /// own sequence's position ([`PagedStep::positions`]). Returns `(total_q, E)`.
    ///
    /// `input` may carry a positional hook, a sliding window (which must not exceed the pool's,
    /// whose blocks outside it are gone) and a mask plan from [`Self::mask_plan_paged`] (build
    /// it once per step for every layer); not keys/values, padding masks, an attention mask,
    /// packing (the step packs), attention weights, `bias_k` or `add_zero_attn`. Evaluation
    /// mode.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_mha::cache::{PagedKvPool, PagedPoolConfig};
    /// use candle_mha::{MhaConfig, MhaInput, MultiHeadAttention};
    /// let (dev, vm) = (Device::Cpu, VarMap::new());
    /// let cfg = MhaConfig::new(16, 4).with_num_kv_heads(2);
    /// let mha = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?.inference();
    /// let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, 2, 4, 16, 8, DType::F32), &dev)?;
    /// let (a, b) = (pool.add_sequence(), pool.add_sequence());
    /// // Prefill: a has a 5-token prompt, b a 3-token one; one call.
    /// let step = pool.begin_step(&[(a, 5), (b, 3)])?;
    /// let plan = mha.mask_plan_paged(&step)?; // once per step, shared by every layer
    /// let x = Tensor::randn(0f32, 1., (8, 16), &dev)?;
    /// let out = mha.attend_paged(&MhaInput::new(x).mask_plan(plan), &mut pool, 0, &step)?;
    /// pool.commit(&step)?;
    /// assert_eq!(out.output.dims(), &[8, 16]);
    /// // Decode a while b prefills 2 more tokens.
    /// let step = pool.begin_step(&[(a, 1), (b, 2)])?;
    /// let x = Tensor::randn(0f32, 1., (3, 16), &dev)?;
    /// let out = mha.attend_paged(&MhaInput::new(x), &mut pool, 0, &step)?;
    /// pool.commit(&step)?;
    /// assert_eq!((pool.seq_len(a)?, pool.seq_len(b)?), (6, 5));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn attend_paged(
        &self,
        input: &MhaInput,
        pool: &mut PagedKvPool,
        layer: usize,
        step: &PagedStep,
    ) -> Result<MhaOutput> {
        let cfg = &self.cfg;
        self.check_paged_input(input)?;
        let x = &input.query;
        self.check_tensor("query", x)?;
        let t = step.total_q();
        if x.dims() != [t, cfg.embed_dim] {
            bail!(
                "attend_paged: query must be (total_q, embed_dim) = ({t}, {}) (the step's new tokens, packed), got {:?}",
                cfg.embed_dim,
                x.dims()
            )
        }
        if t == 0 {
            bail!("attend_paged: the step has no new tokens")
        }
        let pcfg = pool.config();
        let (hkv, d) = (cfg.kv_heads(), cfg.head_dim());
        if (
            pcfg.num_kv_heads,
            pcfg.head_dim,
            pcfg.v_head_dim,
            pcfg.dtype,
        ) != (hkv, d, d, self.dtype)
        {
            bail!(
                "attend_paged: the pool stores (Hkv, D, Dv) = ({}, {}, {}) {:?}, the module has ({hkv}, {d}, {d}) {:?}",
                pcfg.num_kv_heads,
                pcfg.head_dim,
                pcfg.v_head_dim,
                pcfg.dtype,
                self.dtype
            )
        }
        let plan = match &input.plan {
            Some(plan) => {
                plan.check_dims("mask_plan", 1, cfg.num_heads, t, step.cu_k().total())?;
                if plan.packed_offsets() != Some((step.cu_q().as_slice(), step.cu_k().as_slice())) {
                    bail!("attend_paged: the mask plan was not built for this step (build it with mask_plan_paged(step))")
                }
                self.check_window(plan.causal().and_then(|c| c.window), pool)?;
                plan.clone()
            }
            None => self.paged_plan(step, input.sliding_window, pool)?,
        };
        let plan = self.with_modifiers(plan)?;
        let (mut q, mut k, v) = self.project_packed(x)?;
        if let Some(hook) = &input.positional {
            let pos = step.positions();
            q = hook.apply_positions(&q.unsqueeze(0)?, pos)?.squeeze(0)?;
            k = hook.apply_positions(&k.unsqueeze(0)?, pos)?.squeeze(0)?;
        }
        pool.write(layer, step, &k, &v)?;
        let params = AttnParams {
            scale: cfg.scale(),
            masked_rows: cfg.masked_rows,
            dropout: 0.0,
            need_weights: false,
            backend: cfg.backend,
        };
        let att = match pool.paged_stored(layer, step)? {
            (kv, None) => paged_attention_planned(&q, step.cu_q(), &kv, &plan, &params)?,
            (kv, Some(scales)) => {
                paged_attention_quantized_planned(&q, step.cu_q(), &kv, scales, &plan, &params)?
            }
        };
        let o = att.output.reshape((1, t, cfg.q_dim()))?;
        let output = self.proj.o.forward(&o)?.squeeze(0)?;
        Ok(MhaOutput {
            output,
            weights: None,
            kernel: att.kernel,
        })
    }

    /// The mask plan of [`Self::attend_paged`] for `step`: the step's packed sequences,
    /// bottom-right causal per sequence. Build it once per step and hand it to every layer
    /// ([`MhaInput::mask_plan`]); each layer adds its own score modifiers. For a sliding
    /// window, set it on the plan by hand or pass it per layer in the input instead.
    pub fn mask_plan_paged(&self, step: &PagedStep) -> Result<MaskPlan> {
        self.packed_plan(step, None)
    }

    /// The step's packed sequences, bottom-right causal with `window`.
    fn packed_plan(&self, step: &PagedStep, window: Option<usize>) -> Result<MaskPlan> {
        let (cu_q, cu_k) = (step.cu_q(), step.cu_k());
        MaskPlan::new(MaskDims::new(
            1,
            self.cfg.num_heads,
            cu_q.total(),
            cu_k.total(),
        ))
        .with_packed_sequences(cu_q.as_slice(), cu_k.as_slice())?
        .with_causal(Causal {
            alignment: CausalAlignment::BottomRight,
            window,
        })
    }

    fn paged_plan(
        &self,
        step: &PagedStep,
        window: Option<usize>,
        pool: &PagedKvPool,
    ) -> Result<MaskPlan> {
        self.check_window(window, pool)?;
        self.packed_plan(step, window)
    }

    /// A layer's window must fit inside the pool's: the pool released the blocks outside its own.
    fn check_window(&self, window: Option<usize>, pool: &PagedKvPool) -> Result<()> {
        if let Some(pw) = pool.config().sliding_window {
            if window.is_none_or(|w| w > pw) {
                bail!("attend_paged: the pool keeps a sliding window of {pw} positions (older blocks are released) but this layer attends to {} (give .sliding_window(w) with w <= {pw})",
                    window.map_or("every key".to_string(), |w| format!("a window of {w}")))
            }
        }
        Ok(())
    }

    fn check_paged_input(&self, input: &MhaInput) -> Result<()> {
        let refused = [
            ("key/value", input.key.is_some() || input.value.is_some()),
            ("key_padding_mask", input.key_padding_mask.is_some()),
            ("attn_mask", input.attn_mask.is_some()),
            ("left_padding", input.left_padding.is_some()),
            ("packed offsets (the step packs)", input.packed.is_some()),
            ("need_weights", input.need_weights != NeedWeights::No),
            ("bias_k / bias_v", self.proj.bias_k.is_some()),
            ("add_zero_attn", self.cfg.add_zero_attn),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, set)| *set) {
            bail!("attend_paged: {name} is not supported (self-attention over the pool, bottom-right causal)")
        }
        if let Some(a) = input.causal {
            if a != CausalAlignment::BottomRight {
                bail!("attend_paged attends with CausalAlignment::BottomRight (the new tokens are the last of their sequence), got {a:?}")
            }
        }
        if input.plan.is_some() && input.sliding_window.is_some() {
            bail!("mask_plan: the input also carries a sliding_window; put every mask in the plan")
        }
        Ok(())
    }

    /// q `(T, H, D)`, k `(T, Hkv, D)` and v `(T, Hkv, D)` of packed tokens `(T, E)`.
    fn project_packed(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (h, hkv, d) = (cfg.num_heads, cfg.kv_heads(), cfg.head_dim());
        let x = x.unsqueeze(0)?;
        let t = x.dim(1)?;
        if let Some(qkv) = &self.proj.qkv {
            let all = qkv.forward(&x)?.reshape((t, h + 2 * hkv, d))?;
            return Ok((
                all.narrow(1, 0, h)?,
                all.narrow(1, h, hkv)?,
                all.narrow(1, h + hkv, hkv)?,
            ));
        }
        Ok((
            self.proj.q.forward(&x)?.reshape((t, h, d))?,
            self.proj.k.forward(&x)?.reshape((t, hkv, d))?,
            self.proj.v.forward(&x)?.reshape((t, hkv, d))?,
        ))
    }
}
