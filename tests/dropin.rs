//! Drop-in proof: BERT written the way candle-transformers writes it (`models/bert.rs`: its own
//! q/k/v `Linear`s, `transpose_for_scores`, its extended additive mask `(1 - mask) · f32::MIN`
//! of shape `(B, 1, 1, S)`), run on the real all-MiniLM-L6-v2 checkpoint twice: once with its
//! eager attention core (matmul, scale, mask, softmax, matmul) and once with only that core
//! replaced by `candle_mha::sdpa`. Same hidden states, and both equal sentence-transformers.

#[path = "../examples/common/model_files.rs"]
mod model_files;

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_mha::sdpa::sdpa_with_kernel;
use candle_mha::{SdpaMask, SdpaOptions};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Core {
    /// candle-transformers' own code.
    Eager,
    /// The one line that changes.
    Sdpa,
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    num_heads: usize,
    head_size: usize,
}

impl SelfAttention {
    fn transpose_for_scores(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        xs.reshape((b, l, self.num_heads, self.head_size))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(
        &self,
        hidden: &Tensor,
        mask: &Tensor,
        core: Core,
    ) -> Result<(Tensor, &'static str)> {
        let q = self.transpose_for_scores(&self.query.forward(hidden)?)?;
        let k = self.transpose_for_scores(&self.key.forward(hidden)?)?;
        let v = self.transpose_for_scores(&self.value.forward(hidden)?)?;
        let (ctx, kernel) = match core {
            Core::Eager => {
                let scores = q.matmul(&k.t()?)?;
                let scores = (scores / (self.head_size as f64).sqrt())?;
                let scores = scores.broadcast_add(mask)?;
                let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
                (probs.matmul(&v)?, "eager")
            }
            Core::Sdpa => {
                let o = SdpaOptions::new().attn_mask(SdpaMask::Additive(mask.clone()));
                let out = sdpa_with_kernel(&q, &k, &v, &o)?;
                (out.output, out.kernel.as_str())
            }
        };
        Ok((
            ctx.transpose(1, 2)?.contiguous()?.flatten_from(D::Minus2)?,
            kernel,
        ))
    }
}

struct Layer {
    attn: SelfAttention,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

struct Bert {
    word: Embedding,
    pos: Embedding,
    types: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    fn load(vb: VarBuilder) -> Result<Self> {
        let (h, i, heads, eps) = (384, 1536, 12, 1e-12);
        let e = vb.pp("embeddings");
        let layers = (0..6)
            .map(|n| {
                let l = vb.pp(format!("encoder.layer.{n}"));
                Ok(Layer {
                    attn: SelfAttention {
                        query: linear(h, h, l.pp("attention.self.query"))?,
                        key: linear(h, h, l.pp("attention.self.key"))?,
                        value: linear(h, h, l.pp("attention.self.value"))?,
                        num_heads: heads,
                        head_size: h / heads,
                    },
                    attn_out: linear(h, h, l.pp("attention.output.dense"))?,
                    attn_norm: layer_norm(h, eps, l.pp("attention.output.LayerNorm"))?,
                    inter: linear(h, i, l.pp("intermediate.dense"))?,
                    out: linear(i, h, l.pp("output.dense"))?,
                    out_norm: layer_norm(h, eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: embedding(30522, h, e.pp("word_embeddings"))?,
            pos: embedding(512, h, e.pp("position_embeddings"))?,
            types: embedding(2, h, e.pp("token_type_embeddings"))?,
            emb_norm: layer_norm(h, eps, e.pp("LayerNorm"))?,
            layers,
        })
    }

    /// candle-transformers' `BertModel::forward(input_ids, token_type_ids, Some(mask))`.
    fn forward(
        &self,
        ids: &Tensor,
        keep: &Tensor,
        core: Core,
    ) -> Result<(Tensor, Vec<&'static str>)> {
        let (_, l) = ids.dims2()?;
        let pos = Tensor::arange(0u32, l as u32, ids.device())?;
        let xs = (self.word.forward(ids)? + self.types.forward(&ids.zeros_like()?)?)?
            .broadcast_add(&self.pos.forward(&pos)?)?;
        let mut xs = self.emb_norm.forward(&xs)?;
        // get_extended_attention_mask: (1 - mask) * f32::MIN, (B, 1, 1, S).
        let m = keep.unsqueeze(1)?.unsqueeze(1)?.to_dtype(DType::F32)?;
        let mask = (m.ones_like()? - &m)?.broadcast_mul(&Tensor::new(f32::MIN, ids.device())?)?;
        let mut kernels = vec![];
        for layer in &self.layers {
            let (a, k) = layer.attn.forward(&xs, &mask, core)?;
            kernels.push(k);
            let a = layer
                .attn_norm
                .forward(&(layer.attn_out.forward(&a)? + &xs)?)?;
            let i = layer.inter.forward(&a)?.gelu_erf()?;
            xs = layer.out_norm.forward(&(layer.out.forward(&i)? + a)?)?;
        }
        Ok((xs, kernels))
    }
}

#[test]
fn sdpa_replaces_candle_transformers_bert_attention_core() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = model_files::minilm_dir_or_fetch();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)?
    };
    let bert = Bert::load(vb)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let r = candle_core::safetensors::load(root.join("tests/minilm_reference.safetensors"), &dev)?;
    let lens: Vec<usize> = r["token_lengths"]
        .to_vec1::<i32>()?
        .iter()
        .map(|&n| n as usize)
        .collect();
    let t = lens.iter().copied().max().unwrap();
    // One padded batch of all 21 sentences (B > 1 with padding: what candle-nn's CPU flash
    // kernel rejects).
    let ids = r["token_ids"].narrow(1, 0, t)?.to_dtype(DType::U32)?;
    let keep: Vec<u32> = lens
        .iter()
        .flat_map(|&n| (0..t).map(move |j| u32::from(j < n)))
        .collect();
    let keep = Tensor::from_vec(keep, (lens.len(), t), &dev)?;
    let (eager, _) = bert.forward(&ids, &keep, Core::Eager)?;
    let (ours, kernels) = bert.forward(&ids, &keep, Core::Sdpa)?;
    assert!(
        kernels.iter().all(|&k| k == "cpu"),
        "the fused kernel served every layer: {kernels:?}"
    );
    // Same hidden states on every real token.
    let keep3 = keep.to_dtype(DType::F32)?.unsqueeze(2)?;
    let diff = ((&eager - &ours)?.broadcast_mul(&keep3)?)
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("last hidden state, eager core vs candle_mha::sdpa: max |diff| {diff:.3e}");
    assert!(diff <= 1e-5, "hidden states differ by {diff}");
    // Both give sentence-transformers' embeddings (mean pooling + L2 normalisation).
    let want = &r["embeddings"];
    for (name, h) in [("eager", &eager), ("sdpa", &ours)] {
        let sum = h.broadcast_mul(&keep3)?.sum(1)?;
        let mean = sum.broadcast_div(&keep3.sum(1)?)?;
        let emb = mean.broadcast_div(&mean.sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let d = (emb - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        println!("{name}: embeddings vs sentence-transformers max |diff| {d:.3e}");
        assert!(d <= 1e-4, "{name}: {d}");
    }
    Ok(())
}
