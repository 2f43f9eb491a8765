//! Weight layouts: where the q/k/v/o projections of an attention layer live in a checkpoint.
//!
//! Every layout is read through a [`VarBuilder`], so anything a `VarBuilder` can do works here:
//! memory-mapped safetensors, `pp` prefixes, dtype conversion on load, or a `VarMap` that creates
//! fresh trainable parameters (initialised the way `torch.nn.MultiheadAttention` initialises
//! its own; see [`WeightLayout`]). All shapes are checked up front and every error names the full
//! tensor path, the expected and the actual shape.
//!
//! | layout | tensors (relative to the `VarBuilder` prefix) |
//! |---|---|
//! | [`WeightLayout::torch`] | `in_proj_weight` (q+2kv, E), `in_proj_bias`, `out_proj.{weight,bias}`; when kdim/vdim ≠ E: `q_proj_weight`, `k_proj_weight`, `v_proj_weight`; `bias_k`, `bias_v` (1,1,kv) with `add_bias_kv` |
//! | [`WeightLayout::bert`] | `attention.self.{query,key,value}.{weight,bias}`, `attention.output.dense.{weight,bias}` |
//! | [`WeightLayout::llama`] | `q_proj`, `k_proj`, `v_proj`, `o_proj` (`.weight`, `.bias` when the config has biases) |
//! | [`WeightLayout::separate`] | `q_proj`, `k_proj`, `v_proj`, `out_proj` |
//! | [`WeightLayout::gpt2`] | `c_attn.weight` (E, q+2kv) — GPT-2's `Conv1D`, transposed against `nn.Linear` — `c_attn.bias`, `c_proj.{weight,bias}` |
//!
//! Every layout: `sinks` `(num_heads,)` with [`MhaConfig::sinks`](crate::MhaConfig::sinks)
//! (gpt-oss's name under `self_attn`).
//!
//! Any other naming: [`WeightLayout::custom`] with four projection prefixes, and/or
//! [`WeightLayout::with_rename`] to map every tensor name the layout asks for.

use std::fmt;
use std::sync::Arc;

use candle_core::{Error, Result, Shape, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use crate::proj::Proj;

use crate::config::MhaConfig;

type RenameFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    TorchPacked,
    Separate {
        q: String,
        k: String,
        v: String,
        o: String,
    },
    Gpt2Conv1D,
}

/// Where the attention weights live in a checkpoint. See the [module docs](self) for the table.
///
/// ```
/// use candle_mha::WeightLayout;
/// let l = WeightLayout::llama().with_rename(|n| format!("attn_{n}"));
/// assert_eq!(l.tensor_name("q_proj.weight"), "attn_q_proj.weight");
/// ```
#[derive(Clone)]
pub struct WeightLayout {
    kind: Kind,
    rename: Option<RenameFn>,
}

impl fmt::Debug for WeightLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightLayout")
            .field("kind", &self.kind)
            .field("rename", &self.rename.is_some())
            .finish()
    }
}

impl fmt::Display for WeightLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::TorchPacked => write!(f, "PyTorch nn.MultiheadAttention layout"),
            Kind::Separate { q, k, v, o } => {
                write!(f, "separate projections layout ({q}, {k}, {v}, {o})")
            }
            Kind::Gpt2Conv1D => write!(f, "GPT-2 Conv1D layout (c_attn, c_proj)"),
        }
    }
}

impl WeightLayout {
    /// `torch.nn.MultiheadAttention`'s `state_dict` names.
    pub fn torch() -> Self {
        Self::from_kind(Kind::TorchPacked)
    }

    /// Hugging Face BERT (`BertAttention`): `attention.self.{query,key,value}` and
    /// `attention.output.dense`. Point the `VarBuilder` at the layer (e.g.
    /// `vb.pp("encoder.layer.0")`).
    pub fn bert() -> Self {
        Self::custom(
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        )
    }

    /// Llama / Mistral / Qwen (`self_attn.{q,k,v,o}_proj`): point the `VarBuilder` at `self_attn`.
    pub fn llama() -> Self {
        Self::custom("q_proj", "k_proj", "v_proj", "o_proj")
    }

    /// Generic separate projections `q_proj`, `k_proj`, `v_proj`, `out_proj` (fairseq, BART,
    /// Whisper, CLIP).
    pub fn separate() -> Self {
        Self::custom("q_proj", "k_proj", "v_proj", "out_proj")
    }

    /// GPT-2's fused `Conv1D`: `c_attn` (weight stored (in, out)) and `c_proj`.
    pub fn gpt2() -> Self {
        Self::from_kind(Kind::Gpt2Conv1D)
    }

    /// Four separate `nn.Linear`-style projections under the given prefixes
    /// (each has `.weight` (out, in) and optionally `.bias`).
    pub fn custom(q: &str, k: &str, v: &str, o: &str) -> Self {
        Self::from_kind(Kind::Separate {
            q: q.to_string(),
            k: k.to_string(),
            v: v.to_string(),
            o: o.to_string(),
        })
    }

    /// Maps every tensor name this layout asks for (after its own naming) through `f`.
    pub fn with_rename(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rename = Some(Arc::new(f));
        self
    }

    /// The name under which this layout looks up `name` (after the rename hook).
    pub fn tensor_name(&self, name: &str) -> String {
        match &self.rename {
            Some(f) => f(name),
            None => name.to_string(),
        }
    }

    fn from_kind(kind: Kind) -> Self {
        Self { kind, rename: None }
    }

    /// Loads the projections for `cfg` from `vb`, checking every shape.
    pub(crate) fn load(&self, vb: &VarBuilder, cfg: &MhaConfig) -> Result<Projections> {
        let e = cfg.embed_dim;
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let (kdim, vdim) = (cfg.kdim(), cfg.vdim());
        let same_in = kdim == e && vdim == e;
        let packed_rows = qd + 2 * kvd;
        let get = |shape: Shape, name: &str, init: Init| -> Result<Tensor> {
            let name = self.tensor_name(name);
            // A VarMap hands back existing variables in their own dtype: convert (a no-op when
            // it already matches) so every weight has the VarBuilder's dtype.
            vb.get_with_hints(shape, &name, init)
                .and_then(|t| t.to_dtype(vb.dtype()))
                .map_err(|err| {
                    // A layer inside a bigger checkpoint needs the VarBuilder at its prefix.
                    let hint = if vb.prefix().is_empty() && !vb.contains_tensor(&name) {
                        " (the VarBuilder has no prefix: point it at the attention layer, e.g. vb.pp(\"encoder.layer.0\") for BERT or vb.pp(\"model.layers.0.self_attn\") for Llama)"
                    } else {
                        ""
                    };
                    Error::Msg(format!(
                        "{self}: cannot load weight `{}`{hint}: {err}",
                        full_name(vb, &name)
                    ))
                })
        };
        let xavier = |fan_out: usize, fan_in: usize| {
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        // PyTorch initialises the packed in-projection as one (q+2kv, E) matrix when the inputs
        // share E, and each matrix on its own otherwise; we draw from the same distribution
        // whatever the layout.
        let (q_init, k_init, v_init) = if same_in {
            let i = xavier(packed_rows, e);
            (i, i, i)
        } else {
            (xavier(qd, e), xavier(kvd, kdim), xavier(kvd, vdim))
        };
        let out_bound = 1.0 / (qd as f64).sqrt();
        let out_init = Init::Uniform {
            lo: -out_bound,
            up: out_bound,
        };
        let zero = Init::Const(0.0);
        let split3 = |t: &Tensor, dim: usize| -> Result<(Tensor, Tensor, Tensor)> {
            Ok((
                t.narrow(dim, 0, qd)?,
                t.narrow(dim, qd, kvd)?,
                t.narrow(dim, qd + kvd, kvd)?,
            ))
        };

        let mut p = match &self.kind {
            Kind::TorchPacked => {
                let in_bias = if cfg.qkv_bias {
                    Some(get(packed_rows.into(), "in_proj_bias", zero)?)
                } else {
                    None
                };
                let (bq, bk, bv) = match &in_bias {
                    Some(b) => {
                        let (q, k, v) = split3(b, 0)?;
                        (Some(q), Some(k), Some(v))
                    }
                    None => (None, None, None),
                };
                let (q, k, v, qkv) = if same_in {
                    let w = get((packed_rows, e).into(), "in_proj_weight", q_init)?;
                    let (wq, wk, wv) = split3(&w, 0)?;
                    (wq, wk, wv, Some(Linear::new(w, in_bias.clone())))
                } else {
                    (
                        get((qd, e).into(), "q_proj_weight", q_init)?,
                        get((kvd, kdim).into(), "k_proj_weight", k_init)?,
                        get((kvd, vdim).into(), "v_proj_weight", v_init)?,
                        None,
                    )
                };
                let o = get((e, qd).into(), "out_proj.weight", out_init)?;
                let bo = if cfg.out_bias {
                    Some(get(e.into(), "out_proj.bias", zero)?)
                } else {
                    None
                };
                Projections {
                    q: Linear::new(q, bq).into(),
                    k: Linear::new(k, bk).into(),
                    v: Linear::new(v, bv).into(),
                    o: Linear::new(o, bo).into(),
                    qkv: qkv.map(Proj::from),
                    bias_k: None,
                    bias_v: None,
                    sinks: None,
                }
            }
            Kind::Separate { q, k, v, o } => {
                let linear = |prefix: &str, out: usize, inp: usize, init: Init, bias: bool| {
                    let w = get((out, inp).into(), &format!("{prefix}.weight"), init)?;
                    let b = if bias {
                        Some(get(out.into(), &format!("{prefix}.bias"), zero)?)
                    } else {
                        None
                    };
                    Ok::<_, Error>(Proj::from(Linear::new(w, b)))
                };
                Projections {
                    q: linear(q, qd, e, q_init, cfg.qkv_bias)?,
                    k: linear(k, kvd, kdim, k_init, cfg.qkv_bias)?,
                    v: linear(v, kvd, vdim, v_init, cfg.qkv_bias)?,
                    o: linear(o, e, qd, out_init, cfg.out_bias)?,
                    qkv: None,
                    bias_k: None,
                    bias_v: None,
                    sinks: None,
                }
            }
            Kind::Gpt2Conv1D => {
                if !same_in {
                    candle_core::bail!(
                        "{self}: c_attn projects one input, so kdim ({kdim}) and vdim ({vdim}) must equal embed_dim ({e})"
                    )
                }
                // Conv1D stores (in, out); nn.Linear's (out, in) is its transpose (a view).
                let w = get((e, packed_rows).into(), "c_attn.weight", q_init)?.t()?;
                let b = if cfg.qkv_bias {
                    Some(get(packed_rows.into(), "c_attn.bias", zero)?)
                } else {
                    None
                };
                let (wq, wk, wv) = split3(&w, 0)?;
                let (bq, bk, bv) = match &b {
                    Some(b) => {
                        let (q, k, v) = split3(b, 0)?;
                        (Some(q), Some(k), Some(v))
                    }
                    None => (None, None, None),
                };
                let o = get((qd, e).into(), "c_proj.weight", out_init)?.t()?;
                let bo = if cfg.out_bias {
                    Some(get(e.into(), "c_proj.bias", zero)?)
                } else {
                    None
                };
                Projections {
                    q: Linear::new(wq, bq).into(),
                    k: Linear::new(wk, bk).into(),
                    v: Linear::new(wv, bv).into(),
                    o: Linear::new(o, bo).into(),
                    qkv: Some(Linear::new(w, b).into()),
                    bias_k: None,
                    bias_v: None,
                    sinks: None,
                }
            }
        };
        if cfg.add_bias_kv {
            let std = (2.0 / (2 * kvd) as f64).sqrt();
            let init = Init::Randn {
                mean: 0.0,
                stdev: std,
            };
            p.bias_k = Some(get((1, 1, kvd).into(), "bias_k", init)?);
            p.bias_v = Some(get((1, 1, kvd).into(), "bias_v", init)?);
        }
        if cfg.sinks {
            p.sinks = Some(get(cfg.num_heads.into(), "sinks", zero)?);
        }
        Ok(p)
    }
}

fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The loaded projections of one attention layer, in `nn.Linear` orientation.
#[derive(Clone, Debug)]
pub(crate) struct Projections {
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    /// The packed `[q; k; v]` projection when the checkpoint stores one (one GEMM for
    /// self-attention).
    pub qkv: Option<Proj>,
    pub bias_k: Option<Tensor>,
    pub bias_v: Option<Tensor>,
    /// The attention sinks `(num_heads,)`, with [`MhaConfig::sinks`].
    pub sinks: Option<Tensor>,
}

impl Projections {
    /// The same projections with every weight detached from autograd (sharing storage).
    pub fn detached(&self) -> Self {
        let lin = Proj::detached;
        Self {
            q: lin(&self.q),
            k: lin(&self.k),
            v: lin(&self.v),
            o: lin(&self.o),
            qkv: self.qkv.as_ref().map(lin),
            bias_k: self.bias_k.as_ref().map(Tensor::detach),
            bias_v: self.bias_v.as_ref().map(Tensor::detach),
            sinks: self.sinks.as_ref().map(Tensor::detach),
        }
    }

    /// Whether any weight is tracked by autograd (a `Var` or derived from one).
    pub fn tracked(&self) -> bool {
        let lin = |l: &Proj| l.weight().track_op() || l.bias().is_some_and(Tensor::track_op);
        [&self.q, &self.k, &self.v, &self.o].into_iter().any(lin)
            || self.qkv.as_ref().is_some_and(lin)
            || self.bias_k.as_ref().is_some_and(Tensor::track_op)
            || self.bias_v.as_ref().is_some_and(Tensor::track_op)
            || self.sinks.as_ref().is_some_and(Tensor::track_op)
    }
}
