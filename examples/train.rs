//! Train a tiny decoder-only transformer built on candle-mha to reverse digit sequences.
//!
//! ```text
//! cargo run --release --example train -- [--steps N] [--save PATH] [--seed N] [--backend auto|reference]
//! ```
//!
//! Each example is `PAD… x₁ … xₙ SEP xₙ … x₁ PAD…` with n from 3 to 8, left-padded so that SEP
//! always sits at position 8: the model reads the digits and must write them back reversed,
//! which it can only do by attending back to the right position (the query at `8 + i` must
//! fetch the digit at `7 - i`). Padding is on both sides and masked out with a key padding
//! mask; the leading padding positions see no valid key at all, so they exercise candle-mha's
//! fully-masked-row policy (attend to nothing, no NaN) in every training step. Two blocks of
//! pre-LayerNorm attention (candle-mha, causal mask + key padding mask) and an MLP, learnt
//! position embeddings, AdamW from candle-nn. The loss is the cross-entropy of the reversed
//! half.
//!
//! It prints the loss with a progress bar, evaluates greedy (autoregressive) decoding on held-out
//! sequences, saves the trained weights to safetensors, reloads them into a fresh model and checks
//! the output is identical.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_mha::{
    Backend, CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention,
};
use candle_nn::{AdamW, Embedding, LayerNorm, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};

/// Digits 0–9, then the separator and the padding token.
pub const SEP: u32 = 10;
/// Padding token (never predicted, masked out of attention).
pub const PAD: u32 = 11;
const VOCAB: usize = 12;
const MIN_LEN: usize = 3;
const MAX_LEN: usize = 8;
/// Position of SEP: the input is left-padded to `MAX_LEN` digits.
const SEP_POS: usize = MAX_LEN;
/// Sequence length: `MAX_LEN` (left-padded) digits, SEP, up to `MAX_LEN` reversed digits.
pub const T: usize = 2 * MAX_LEN + 1;

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    pub seed: u64,
    pub progress: bool,
    /// Attention backend: `Auto` trains on the fused CPU kernel (fused backward),
    /// `Reference` on candle's op-by-op autograd.
    pub backend: Backend,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch: 64,
            lr: 3e-3,
            d_model: 64,
            heads: 4,
            layers: 2,
            seed: 0,
            progress: true,
            backend: Backend::Auto,
        }
    }
}

/// LayerNorm that autograd can see through.
///
/// candle-nn's `LayerNorm::forward` runs a fused kernel without backward on contiguous inputs
/// (`apply_op3_no_bwd`), so gradients silently stop there; training needs the op-by-op form.
struct Ln(LayerNorm);

impl Ln {
    fn new(d: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self(candle_nn::layer_norm(d, 1e-5, vb)?))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let x = x.broadcast_mul(self.0.weight())?;
        match self.0.bias() {
            Some(b) => x.broadcast_add(b),
            None => Ok(x),
        }
    }
}

/// One pre-LayerNorm transformer block: `x + MHA(LN(x))`, then `x + MLP(LN(x))`.
struct Block {
    ln1: Ln,
    attn: MultiHeadAttention,
    ln2: Ln,
    fc1: Linear,
    fc2: Linear,
    /// The attention kernel of the last call.
    kernel: std::cell::Cell<&'static str>,
}

impl Block {
    fn new(d: usize, heads: usize, backend: Backend, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = MhaConfig::new(d, heads)
            .with_batch_first(true)
            .with_backend(backend);
        Ok(Self {
            ln1: Ln::new(d, vb.pp("ln1"))?,
            attn: MultiHeadAttention::new(cfg, vb.pp("attn"))?,
            ln2: Ln::new(d, vb.pp("ln2"))?,
            fc1: candle_nn::linear(d, 4 * d, vb.pp("fc1"))?,
            fc2: candle_nn::linear(4 * d, d, vb.pp("fc2"))?,
            kernel: std::cell::Cell::new("none"),
        })
    }

    fn forward(&self, x: &Tensor, pad: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let a = self.attn.attend(
            &MhaInput::new(h)
                .causal(CausalAlignment::TopLeft)
                .key_padding_mask(KeyPaddingMask::new(pad.clone())),
        )?;
        self.kernel.set(a.kernel.as_str());
        let x = (x + a.output)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?.gelu()?;
        x + self.fc2.forward(&h)?
    }
}

/// The reversal model.
pub struct Model {
    tok: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    ln_f: Ln,
    head: Linear,
}

impl Model {
    /// Builds the model; with a `VarMap`-backed `vb` the parameters are fresh and trainable.
    pub fn new(cfg: &TrainConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.d_model;
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(d, cfg.heads, cfg.backend, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<_>>()?;
        // GPT-2 style small embeddings (candle-nn's default N(0, 1) trains far slower here).
        let emb = |n: usize, name: &str| -> candle_core::Result<Embedding> {
            let init = candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            };
            let w = vb.pp(name).get_with_hints((n, d), "weight", init)?;
            Ok(Embedding::new(w, d))
        };
        Ok(Self {
            tok: emb(VOCAB, "tok")?,
            pos: emb(T, "pos")?,
            blocks,
            ln_f: Ln::new(d, vb.pp("ln_f"))?,
            head: candle_nn::linear(d, VOCAB, vb.pp("head"))?,
        })
    }

    /// The attention kernel that served the last forward (`"cpu"`: fused forward and fused
    /// backward; `"reference"`: candle's op-by-op autograd).
    pub fn attention_kernel(&self) -> &'static str {
        self.blocks.first().map_or("none", |b| b.kernel.get())
    }

    /// Logits `(B, T', VOCAB)` for tokens `(B, T')`; `PAD` tokens are masked out as keys.
    pub fn forward(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let t = tokens.dim(1)?;
        let pad = tokens.eq(PAD)?;
        let pos = Tensor::arange(0u32, t as u32, tokens.device())?;
        let mut x = self
            .tok
            .forward(tokens)?
            .broadcast_add(&self.pos.forward(&pos)?)?;
        for b in &self.blocks {
            x = b.forward(&x, &pad)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?)
    }
}

/// A batch of reversal examples: tokens `(B, T)`, digit counts, and for the loss the flat
/// indices of positions whose next token is a reversed digit.
pub struct Batch {
    pub tokens: Tensor,
    pub digits: Vec<usize>,
    loss_pos: Vec<u32>,
    loss_tgt: Vec<u32>,
}

/// A small deterministic generator (xorshift64*), so runs are reproducible without a `rand`
/// dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() >> 33) as usize % n
    }
}

/// Random reversal examples.
pub fn make_batch(rng: &mut Rng, batch: usize, dev: &Device) -> candle_core::Result<Batch> {
    let mut tokens = vec![PAD; batch * T];
    let mut digits = vec![];
    let (mut loss_pos, mut loss_tgt) = (vec![], vec![]);
    for b in 0..batch {
        let n = MIN_LEN + rng.below(MAX_LEN - MIN_LEN + 1);
        let row = &mut tokens[b * T..(b + 1) * T];
        for t in &mut row[SEP_POS - n..SEP_POS] {
            *t = rng.below(10) as u32;
        }
        row[SEP_POS] = SEP;
        for i in 0..n {
            row[SEP_POS + 1 + i] = row[SEP_POS - 1 - i];
        }
        // Position p predicts token p+1: the reversed digits follow SEP.
        for p in SEP_POS..SEP_POS + n {
            loss_pos.push((b * T + p) as u32);
            loss_tgt.push(row[p + 1]);
        }
        digits.push(n);
    }
    Ok(Batch {
        tokens: Tensor::from_vec(tokens, (batch, T), dev)?,
        digits,
        loss_pos,
        loss_tgt,
    })
}

/// Cross-entropy over the reversed half of every sequence.
pub fn loss(model: &Model, batch: &Batch) -> candle_core::Result<Tensor> {
    let dev = batch.tokens.device();
    let logits = model.forward(&batch.tokens)?.reshape(((), VOCAB))?;
    let idx = Tensor::new(batch.loss_pos.as_slice(), dev)?;
    let tgt = Tensor::new(batch.loss_tgt.as_slice(), dev)?;
    candle_nn::loss::cross_entropy(&logits.index_select(&idx, 0)?, &tgt)
}

/// Result of greedy decoding on a batch.
pub struct Eval {
    /// Fraction of sequences reversed exactly.
    pub exact: f64,
    /// Fraction of digits right.
    pub digits: f64,
    /// Per example: (input digits, the model's reversal).
    pub samples: Vec<(Vec<u32>, Vec<u32>)>,
}

/// Greedy autoregressive decoding of the reversed half, the whole batch at once.
pub fn evaluate(model: &Model, batch: &Batch) -> candle_core::Result<Eval> {
    let want = batch.tokens.to_vec2::<u32>()?;
    let mut seq = batch.tokens.narrow(1, 0, SEP_POS + 1)?;
    for _ in 0..MAX_LEN {
        let logits = model.forward(&seq)?;
        let next = logits.i((.., seq.dim(1)? - 1))?.argmax_keepdim(D::Minus1)?;
        seq = Tensor::cat(&[&seq, &next], 1)?;
    }
    let got = seq.to_vec2::<u32>()?;
    let (mut exact, mut right, mut total) = (0usize, 0usize, 0usize);
    let mut samples = vec![];
    for (b, &n) in batch.digits.iter().enumerate() {
        let out = SEP_POS + 1..SEP_POS + 1 + n;
        let ok = out.clone().filter(|&p| got[b][p] == want[b][p]).count();
        right += ok;
        total += n;
        exact += usize::from(ok == n);
        samples.push((want[b][SEP_POS - n..SEP_POS].to_vec(), got[b][out].to_vec()));
    }
    Ok(Eval {
        exact: exact as f64 / want.len() as f64,
        digits: right as f64 / total as f64,
        samples,
    })
}

/// What [`train`] measured.
pub struct TrainReport {
    pub first_loss: f32,
    pub last_loss: f32,
    pub varmap: VarMap,
    pub model: Model,
}

/// Trains a fresh model for `cfg.steps` AdamW steps.
pub fn train(cfg: &TrainConfig, dev: &Device) -> Result<TrainReport> {
    let varmap = VarMap::new();
    let model = Model::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let params = ParamsAdamW {
        lr: cfg.lr,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    let mut rng = Rng::new(cfg.seed);
    let bar = if cfg.progress {
        let bar = indicatif::ProgressBar::new(cfg.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} steps  {msg}",
            )
            .context("progress template")?
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut first, mut last, mut avg) = (f32::NAN, f32::NAN, None::<f32>);
    for step in 0..cfg.steps {
        // Cosine decay to 10% of the base rate.
        let frac = step as f64 / cfg.steps.max(1) as f64;
        opt.set_learning_rate(cfg.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * frac).cos())));
        let batch = make_batch(&mut rng, cfg.batch, dev)?;
        let l = loss(&model, &batch)?;
        opt.backward_step(&l)?;
        let v = l.to_scalar::<f32>()?;
        if !v.is_finite() {
            bail!("loss became {v} at step {step}")
        }
        if step == 0 {
            first = v;
        }
        last = v;
        let a = avg.map_or(v, |a| 0.95 * a + 0.05 * v);
        avg = Some(a);
        bar.inc(1);
        if step % 10 == 0 {
            bar.set_message(format!("loss {a:.4}"));
        }
    }
    bar.finish_and_clear();
    Ok(TrainReport {
        first_loss: first,
        last_loss: last,
        varmap,
        model,
    })
}

#[allow(dead_code)] // the smoke test includes this file for `train` and does not call `main`
fn main() -> Result<()> {
    let mut cfg = TrainConfig::default();
    let mut save = std::path::PathBuf::from("reverse_model.safetensors");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--steps" => cfg.steps = val("--steps")?.parse().context("--steps")?,
            "--seed" => cfg.seed = val("--seed")?.parse().context("--seed")?,
            "--lr" => cfg.lr = val("--lr")?.parse().context("--lr")?,
            "--batch" => cfg.batch = val("--batch")?.parse().context("--batch")?,
            "--d-model" => cfg.d_model = val("--d-model")?.parse().context("--d-model")?,
            "--layers" => cfg.layers = val("--layers")?.parse().context("--layers")?,
            "--heads" => cfg.heads = val("--heads")?.parse().context("--heads")?,
            "--save" => save = val("--save")?.into(),
            "--backend" => {
                cfg.backend = match val("--backend")?.as_str() {
                    "auto" => Backend::Auto,
                    "reference" => Backend::Reference,
                    other => bail!("--backend: auto or reference, got {other:?}"),
                }
            }
            "-h" | "--help" => {
                println!("usage: train [--steps N] [--seed N] [--lr F] [--batch N] [--d-model N] [--heads N] [--layers N] [--backend auto|reference] [--save PATH]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let dev = Device::Cpu;
    println!(
        "reversing digit sequences of length {MIN_LEN}..={MAX_LEN}: d_model {}, {} heads, {} layers, batch {}, {} steps",
        cfg.d_model, cfg.heads, cfg.layers, cfg.batch, cfg.steps
    );
    let start = std::time::Instant::now();
    let report = train(&cfg, &dev)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "trained in {secs:.1}s on the {} attention kernel: loss {:.4} -> {:.4}",
        report.model.attention_kernel(),
        report.first_loss,
        report.last_loss
    );

    let mut rng = Rng::new(cfg.seed ^ 0xDEAD_BEEF);
    let held_out = make_batch(&mut rng, 200, &dev)?;
    let eval = evaluate(&report.model, &held_out)?;
    println!(
        "held-out greedy decoding ({} sequences): {:.1}% reversed exactly, {:.2}% of digits right",
        eval.samples.len(),
        100.0 * eval.exact,
        100.0 * eval.digits
    );
    for (input, output) in eval.samples.iter().take(3) {
        println!("  {input:?} -> {output:?}");
    }

    report.varmap.save(&save)?;
    // A fresh model's variables are created first, then overwritten in place from the file.
    let mut fresh = VarMap::new();
    let reloaded = Model::new(&cfg, VarBuilder::from_varmap(&fresh, DType::F32, &dev))?;
    fresh.load(&save)?;
    let a = report.model.forward(&held_out.tokens)?;
    let b = reloaded.forward(&held_out.tokens)?;
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!(
        "saved {} and reloaded it into a fresh model: max |Δlogits| = {diff:e}",
        save.display()
    );
    if diff != 0.0 {
        bail!("reloaded model differs from the trained one")
    }
    Ok(())
}
