//! See what each head does: labelled attention maps of a real model on your own text.
//!
//! ```text
//! cargo run --release --example attention_map -- "The cat sat on the mat because it was tired."
//! cargo run --release --example attention_map -- --layer 2 --heads 0,3,5 "Les élèves du café"
//! cargo run --release --example attention_map -- --model smollm2 --html maps.html "Once upon a time"
//! echo "some text" | cargo run --release --example attention_map -- --json > maps.json
//! ```
//!
//! The model runs once on the text (all-MiniLM-L6-v2 by default, the BERT encoder of
//! `candle_mha::models::bert`; `--model smollm2` for SmolLM2-135M-Instruct, the causal Llama
//! decoder of `candle_mha::models::llama`). The weights drawn are the ones the attention modules
//! return themselves: `forward_with_attentions` asks each layer's `MultiHeadAttention` for
//! `NeedWeights::PerHead`, as Hugging Face's `output_attentions=True` does; nothing is
//! recomputed here (`tests/attentions.rs` checks them against transformers' eager attention).
//!
//! Outputs:
//! - a head summary table per layer on the terminal (stderr with `--json`): entropy in nats,
//!   mean query–key distance, shares on the first token, on `[SEP]`, on the previous token and
//!   on the token itself (`examples/common/head_stats.rs` says how each is measured);
//! - one PNG per layer (`--out DIR`, default `attention-maps/`): a grid of heatmaps, one per head,
//!   query tokens down the side, key tokens along the bottom (rotated), head and layer titles,
//!   and a colour bar with the weights it stands for;
//! - `--html FILE`: one self-contained page (inline SVG and a few lines of inline JS, nothing
//!   fetched) with every selected head; hovering a cell shows query token, key token and weight;
//!   `FILE#cell=LAYER,HEAD,QUERY,KEY` opens with that cell's tooltip shown;
//! - `--json`: stdout carries one JSON document, for each layer the tokens and each head's
//!   `L × L` weights and statistics.
//!
//! Drawing: `plotters` (well kept, pure Rust) on its bitmap backend for the surface, the cells
//! and the viridis colour map; text is laid out (kerning, side bearings, per-character font
//! fallback) and rasterised with `ab_glyph` (also pure Rust: no system fontconfig or FreeType) and
//! blended onto the same surface. plotters' own `ab_glyph` text path was tried first: it places
//! each glyph without its side bearing, which spaces letters unevenly and shifts accents. The
//! font is Ubuntu Light as `epaint_default_fonts` (egui's fonts; Ubuntu Font Licence 1.0)
//! embeds it: Latin with accents, Greek, Cyrillic, nothing to bundle here. For other scripts
//! (CJK...) the example also loads the first font it finds among `--font PATH`,
//! `$CANDLE_MHA_FONT` and a few common system paths (Debian's `fonts-droid-fallback`,
//! `fonts-noto-cjk`, `fonts-wqy-microhei`), and warns when a label has characters no loaded font
//! covers. PNG encoding is the `png` crate's.

#[path = "../common/device.rs"]
mod device;
#[path = "../common/head_stats.rs"]
mod head_stats;
mod html;
#[path = "../common/minilm.rs"]
mod minilm;
#[path = "../common/model_files.rs"]
mod model_files;
mod png_grid;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_mha::models::llama::{Llama, LlamaCache};
use head_stats::{head_stats, HeadStats};
use serde::Serialize;

const USAGE: &str = "\
usage: attention_map [OPTIONS] [TEXT...]

Runs a real model once on TEXT (the arguments joined by spaces, or standard input) and draws
every head's attention weights, as the attention modules return them.

options:
  --model NAME       minilm (all-MiniLM-L6-v2, default) or smollm2 (SmolLM2-135M-Instruct)
  --layer N[,M...]   layers to show (default: all; one PNG page each)
  --heads A,B,...    heads to show (default: all)
  --out DIR          where the PNGs go (default: attention-maps); file names layerNN.png
  --no-png           write no PNG
  --html FILE        also write one self-contained HTML page (hover: query, key, weight)
  --json             print only JSON on stdout: per layer, the tokens and each head's weights
                     and statistics (the summary table goes to stderr)
  --gamma G          colour = weight^G (default 0.5: small weights stay visible; 1 = linear)
  --font PATH        a TrueType/OpenType font for labels the built-in font cannot draw (CJK...)
  --model-dir DIR    all-MiniLM-L6-v2 files (default: $CANDLE_MHA_MINILM_DIR, then the cache)
  --gguf PATH        SmolLM2 GGUF (default: $CANDLE_MHA_SMOLLM2_GGUF, then the cache)
  --tokenizer PATH   SmolLM2 tokenizer.json (default: weights/smollm2-tokenizer.json)
  --device DEV       cpu (default), cuda or cuda:N
  -h, --help         this help

Fill the model cache with scripts/fetch-minilm.sh / scripts/fetch-smollm2.sh.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelKind {
    MiniLm,
    SmolLm2,
}

struct Args {
    model: ModelKind,
    layers: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
    out: PathBuf,
    png: bool,
    html: Option<PathBuf>,
    json: bool,
    gamma: f64,
    font: Option<PathBuf>,
    model_dir: Option<PathBuf>,
    gguf: Option<PathBuf>,
    tokenizer: PathBuf,
    device: String,
    text: Vec<String>,
}

fn parse_list(name: &str, v: &str) -> Result<Vec<usize>> {
    v.split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{name} needs comma-separated integers, got {v:?}"))
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        model: ModelKind::MiniLm,
        layers: None,
        heads: None,
        out: PathBuf::from("attention-maps"),
        png: true,
        html: None,
        json: false,
        gamma: 0.5,
        font: std::env::var_os("CANDLE_MHA_FONT").map(PathBuf::from),
        model_dir: None,
        gguf: None,
        tokenizer: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/smollm2-tokenizer.json"),
        device: "cpu".into(),
        text: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let mut only_text = false;
    while let Some(arg) = it.next() {
        if only_text || !arg.starts_with("--") && arg != "-h" {
            a.text.push(arg);
            continue;
        }
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--" => only_text = true,
            "-h" | "--help" => return Ok(None),
            "--model" => {
                a.model = match value("--model")?.as_str() {
                    "minilm" | "all-MiniLM-L6-v2" => ModelKind::MiniLm,
                    "smollm2" | "SmolLM2" => ModelKind::SmolLm2,
                    other => bail!("--model: expected minilm or smollm2, got {other}"),
                }
            }
            "--layer" | "--layers" => a.layers = Some(parse_list("--layer", &value("--layer")?)?),
            "--heads" | "--head" => a.heads = Some(parse_list("--heads", &value("--heads")?)?),
            "--out" => a.out = value("--out")?.into(),
            "--no-png" => a.png = false,
            "--html" => a.html = Some(value("--html")?.into()),
            "--json" => a.json = true,
            "--gamma" => {
                a.gamma = value("--gamma")?
                    .parse()
                    .ok()
                    .filter(|g: &f64| *g > 0.0 && g.is_finite())
                    .context("--gamma needs a positive number")?
            }
            "--font" => a.font = Some(value("--font")?.into()),
            "--model-dir" => a.model_dir = Some(value("--model-dir")?.into()),
            "--gguf" => a.gguf = Some(value("--gguf")?.into()),
            "--tokenizer" => a.tokenizer = value("--tokenizer")?.into(),
            "--device" => a.device = value("--device")?,
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(Some(a))
}

/// The shown heads of one layer: (head index, row-major L × L weights).
pub type Heads = Vec<(usize, Vec<f32>)>;

/// The attention weights of one run, on the CPU, with what is needed to label them.
#[derive(Debug, Clone)]
pub struct Maps {
    /// Model name for titles.
    pub model: String,
    /// The input text.
    pub text: String,
    /// One label per token: the piece of the input text it covers (so accents show even where
    /// the tokenizer strips them), `##` for WordPiece continuations, the token itself for
    /// special tokens and `[UNK]`.
    pub labels: Vec<String>,
    /// The tokenizer's own token strings.
    pub tokens: Vec<String>,
    /// Token ids.
    pub ids: Vec<u32>,
    /// Positions of separator tokens (`[SEP]`).
    pub sep: Vec<usize>,
    /// What the first token is, for the table header (`[CLS]` or the first token's label).
    pub first_name: String,
    /// The layers shown: (layer index, per shown head: (head index, row-major L × L weights)).
    pub layers: Vec<(usize, Heads)>,
    /// Heads per layer in the model.
    pub num_heads: usize,
    /// Layers in the model.
    pub num_layers: usize,
}

impl Maps {
    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.labels.len()
    }

    /// The statistics of one head's weights.
    pub fn stats(&self, w: &[f32]) -> HeadStats {
        head_stats(w, self.n_tokens(), self.n_tokens(), &self.sep)
    }
}

/// One label per token (see [`Maps::labels`]). Byte-level BPE can split one character over
/// several tokens, whose pieces of text then overlap: the second and later get `#2`,
/// `#3`... (`東 東#2 東#3`).
fn labels(text: &str, enc: &tokenizers::Encoding) -> Vec<String> {
    let special = enc.get_special_tokens_mask();
    let offsets = enc.get_offsets();
    let mut repeat = 1;
    enc.get_tokens()
        .iter()
        .enumerate()
        .map(|(k, tok)| {
            let (start, end) = offsets[k];
            if special[k] == 1 || tok == "[UNK]" {
                return tok.clone();
            }
            let piece = text.get(start..end).unwrap_or(tok);
            let trimmed = piece.trim();
            let mut shown = if !trimmed.is_empty() {
                trimmed.to_string()
            } else if piece.contains('\n') {
                "\\n".to_string()
            } else {
                "_".to_string() // whitespace-only token
            };
            if tok.starts_with("##") {
                shown = format!("##{shown}");
            }
            repeat = if k > 0 && start < offsets[k - 1].1 && end > start {
                repeat + 1
            } else {
                1
            };
            if repeat > 1 {
                shown = format!("{shown}#{repeat}");
            }
            shown
        })
        .collect()
}

/// The selected layers (see [`Maps::layers`]), the model's heads per layer and layers.
type Selected = (Vec<(usize, Heads)>, usize, usize);

/// `(1, H, L, L)` tensors to row-major vectors, keeping the selected layers and heads.
fn select(
    attentions: &[Tensor],
    layers: &Option<Vec<usize>>,
    heads: &Option<Vec<usize>>,
) -> Result<Selected> {
    let num_layers = attentions.len();
    let num_heads = attentions.first().map_or(Ok(0), |t| t.dim(1))?;
    let layers: Vec<usize> = layers.clone().unwrap_or_else(|| (0..num_layers).collect());
    let heads: Vec<usize> = heads.clone().unwrap_or_else(|| (0..num_heads).collect());
    if let Some(&l) = layers.iter().find(|&&l| l >= num_layers) {
        bail!("--layer {l}: the model has layers 0..{}", num_layers - 1)
    }
    if let Some(&h) = heads.iter().find(|&&h| h >= num_heads) {
        bail!("--heads {h}: the model has heads 0..{}", num_heads - 1)
    }
    let mut out = Vec::new();
    for &l in &layers {
        let t = attentions[l]
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let t = t.squeeze(0)?; // (H, L, L)
        let per_head = heads
            .iter()
            .map(|&h| Ok((h, t.get(h)?.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<Vec<_>>>()?;
        out.push((l, per_head));
    }
    Ok((out, num_heads, num_layers))
}

fn run_minilm(a: &Args, text: &str, device: &Device) -> Result<Maps> {
    let dir = model_files::find_minilm_dir(a.model_dir.as_deref())?;
    let m = minilm::MiniLm::load(&dir, device)?;
    let enc = m
        .tokenizer
        .encode(text, true)
        .map_err(|e| anyhow!("tokenizing: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let (_, attentions) = m
        .embedder
        .bert()
        .forward_with_attentions(&input, None, None)?;
    let (layers, num_heads, num_layers) = select(&attentions, &a.layers, &a.heads)?;
    let tokens = enc.get_tokens().to_vec();
    let sep = (0..tokens.len())
        .filter(|&i| tokens[i] == "[SEP]")
        .collect();
    Ok(Maps {
        model: "all-MiniLM-L6-v2".into(),
        text: text.into(),
        labels: labels(text, &enc),
        first_name: tokens.first().cloned().unwrap_or_default(),
        tokens,
        ids,
        sep,
        layers,
        num_heads,
        num_layers,
    })
}

fn run_smollm2(a: &Args, text: &str, device: &Device) -> Result<Maps> {
    let gguf = model_files::find_smollm2_gguf(a.gguf.as_deref())?;
    let tok = tokenizers::Tokenizer::from_file(&a.tokenizer)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the tokenizer {}", a.tokenizer.display()))?;
    let enc = tok.encode(text, false).map_err(anyhow::Error::msg)?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        bail!("the text has no tokens")
    }
    let model = Llama::from_gguf(&gguf, DType::F32, device)?;
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let (_, attentions) =
        model.forward_with_attentions(&input, None, &mut LlamaCache::new(&model))?;
    let (layers, num_heads, num_layers) = select(&attentions, &a.layers, &a.heads)?;
    let labels = labels(text, &enc);
    Ok(Maps {
        model: "SmolLM2-135M-Instruct".into(),
        text: text.into(),
        first_name: "first".into(),
        labels,
        tokens: enc.get_tokens().to_vec(),
        ids,
        sep: Vec::new(),
        layers,
        num_heads,
        num_layers,
    })
}

/// The head summary table of one layer.
fn summary_table(maps: &Maps, layer: usize, heads: &[(usize, Vec<f32>)]) -> String {
    let l = maps.n_tokens();
    let mut s = format!(
        "layer {layer} ({} tokens; entropy in nats, max ln {l} = {:.2}; shares are mean attention per query)\n",
        l,
        (l as f64).ln()
    );
    s += &format!(
        "{:>4}  {:>7}  {:>8}  {:>7}  {:>6}  {:>8}  {:>6}  {}\n",
        "head",
        "entropy",
        "distance",
        if maps.first_name == "[CLS]" {
            "[CLS]"
        } else {
            "first"
        },
        "[SEP]",
        "previous",
        "self",
        "pattern"
    );
    for (h, w) in heads {
        let st = maps.stats(w);
        s += &format!(
            "{:>4}  {:>7.3}  {:>8.2}  {:>7.3}  {:>6.3}  {:>8.3}  {:>6.3}  {}\n",
            h,
            st.entropy,
            st.distance,
            st.first,
            st.sep,
            st.previous,
            st.itself,
            st.pattern(l)
        );
    }
    s
}

#[derive(Serialize)]
struct JsonHead<'a> {
    head: usize,
    stats: HeadStats,
    pattern: &'static str,
    /// L rows (queries) of L weights (keys).
    weights: Vec<&'a [f32]>,
}

#[derive(Serialize)]
struct JsonLayer<'a> {
    layer: usize,
    tokens: &'a [String],
    heads: Vec<JsonHead<'a>>,
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    model: &'a str,
    text: &'a str,
    token_ids: &'a [u32],
    tokens: &'a [String],
    labels: &'a [String],
    entropy_unit: &'static str,
    num_heads: usize,
    layers: Vec<JsonLayer<'a>>,
}

fn to_json(maps: &Maps) -> Result<String> {
    let l = maps.n_tokens();
    let layers = maps
        .layers
        .iter()
        .map(|(layer, heads)| JsonLayer {
            layer: *layer,
            tokens: &maps.labels,
            heads: heads
                .iter()
                .map(|(h, w)| {
                    let stats = maps.stats(w);
                    JsonHead {
                        head: *h,
                        stats,
                        pattern: stats.pattern(l),
                        weights: w.chunks(l).collect(),
                    }
                })
                .collect(),
        })
        .collect();
    let doc = JsonDoc {
        model: &maps.model,
        text: &maps.text,
        token_ids: &maps.ids,
        tokens: &maps.tokens,
        labels: &maps.labels,
        entropy_unit: "nats",
        num_heads: maps.num_heads,
        layers,
    };
    Ok(serde_json::to_string(&doc)?)
}

fn read_text(a: &Args) -> Result<String> {
    if !a.text.is_empty() {
        return Ok(a.text.join(" "));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the text from standard input (end with Ctrl-D)");
    }
    let mut s = String::new();
    stdin
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s.trim().to_string())
}

fn run(a: Args) -> Result<()> {
    let text = read_text(&a)?;
    if text.is_empty() {
        bail!("no text: give it as arguments or on standard input")
    }
    let device = device::parse_device(&a.device)?;
    // Fonts first: a bad --font fails before the model runs.
    let fonts = a
        .png
        .then(|| png_grid::Fonts::load(a.font.as_deref()))
        .transpose()?;
    let maps = match a.model {
        ModelKind::MiniLm => run_minilm(&a, &text, &device)?,
        ModelKind::SmolLm2 => run_smollm2(&a, &text, &device)?,
    };
    let mut tables = format!(
        "{}: {} tokens: {}\n\n",
        maps.model,
        maps.n_tokens(),
        maps.labels.join(" ")
    );
    for (layer, heads) in &maps.layers {
        tables += &summary_table(&maps, *layer, heads);
        tables += "\n";
    }
    if a.json {
        eprint!("{tables}");
        println!("{}", to_json(&maps)?);
    } else {
        print!("{tables}");
    }
    if let Some(fonts) = &fonts {
        let missing = fonts.missing_chars(&maps.labels);
        if !missing.is_empty() {
            eprintln!(
                "warning: no loaded font draws {:?}: pass --font with a font that has them \
                 (e.g. Debian's fonts-noto-cjk or fonts-droid-fallback)",
                missing.iter().collect::<String>()
            );
        }
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        for (layer, heads) in &maps.layers {
            let path = a.out.join(format!("layer{layer:02}.png"));
            let (w, h) = png_grid::write_layer(&path, &maps, *layer, heads, a.gamma, fonts)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({w} x {h})", path.display());
        }
    }
    if let Some(path) = &a.html {
        std::fs::write(path, html::page(&maps, a.gamma)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(a)) => match run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e:#}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
