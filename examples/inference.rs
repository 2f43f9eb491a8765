//! Inference demo: load an attention checkpoint, run padded and causal self-attention, check the
//! result against PyTorch's, and draw every head's attention in the terminal (and as a PNG).
//!
//! ```text
//! cargo run --release --example inference
//! cargo run --release --example inference -- --weights weights/bert_base_attention.safetensors
//! cargo run --release --example inference -- --heatmap attention.png --batch 1
//! cargo run --release --features cuda --example inference -- --device cuda
//! ```
//!
//! What it does:
//!
//! 1. **Inspects the checkpoint** (`--weights`, default `weights/toy_e8_h2.safetensors`) by its
//!    tensor names and shapes: `in_proj_weight` means PyTorch `nn.MultiheadAttention`
//!    ([`WeightLayout::torch`]), `attention.self.query.weight` means Hugging Face BERT
//!    ([`WeightLayout::bert`]); either may sit under a prefix such as `bert.encoder.layer.0`
//!    (`--prefix` picks one when there are several). The model width E comes from the shapes;
//!    the head count from `--heads`, else the file's `num_heads` metadata, else `E / 64` when 64
//!    divides E (BERT-style 64-wide heads), else 2. Biases and `bias_k`/`bias_v` are used when
//!    present. The weights are memory-mapped and loaded as f32 whatever their stored dtype.
//! 2. **Reads the expectation** `<stem>.expected.safetensors` beside the checkpoint (written by
//!    `scripts/gen_fixtures.py` from a float64 PyTorch run): the input `(B, L, E)`, the valid
//!    `lengths`, and `expected.{padded,causal}.{output,weights}`. Without that file (your own
//!    weights) it says so, runs on random input of shape `(2, 8, E)` with lengths `[8, 5]`, and
//!    skips the check.
//! 3. **Runs self-attention twice** with per-head weights: with a key padding mask built from the
//!    lengths, and with a top-left causal mask. It prints the shapes and, when there is an
//!    expectation, the max abs error of outputs and weights with PASS/FAIL at an absolute
//!    tolerance of 1e-4 (f32 compute against a float64 reference).
//! 4. **Draws the attention** of one batch element (`--batch`, default 0) as heatmaps, one block
//!    per head, rows = query i, columns = key j, with a viridis colour ramp scaled from 0 to the
//!    largest weight shown in that run (24-bit ANSI colours; shade characters ` .:-=+*#%@` when
//!    `NO_COLOR` is set). At most 48 × 48 cells are drawn. `--heatmap PATH` writes the same
//!    heatmaps as a PNG: padded run on the top row, causal run below, heads left to right, a
//!    colour bar on the right of each row.
//!
//! Exit status: 0 when every check passes (or there is nothing to check), 1 when a check fails,
//! 2 on any error (bad arguments, unreadable files, unsupported checkpoints).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
#[path = "common/device.rs"]
mod device;
use device::parse_device;

use candle_mha::{
    CausalAlignment, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention, NeedWeights,
    WeightLayout,
};
use candle_nn::VarBuilder;

/// Checkpoint used when `--weights` is not given.
const DEFAULT_WEIGHTS: &str = "weights/toy_e8_h2.safetensors";
/// Absolute tolerance of the checks (f32 compute against a float64 PyTorch reference).
const ATOL: f64 = 1e-4;
/// Largest number of query rows / key columns drawn per head.
const MAX_CELLS: usize = 48;
/// Sequence length and per-element valid lengths (hence batch size) of the random input used
/// when there is no expectation.
const RANDOM_LEN: usize = 8;
const RANDOM_LENGTHS: [usize; 2] = [8, 5];
/// Terminal width assumed when `$COLUMNS` is not set.
const DEFAULT_COLUMNS: usize = 120;
/// Shade characters for `NO_COLOR`, from 0 to the largest weight.
const SHADES: &[u8] = b" .:-=+*#%@";

const HELP: &str = "\
inference: run candle-mha on an attention checkpoint, check it against PyTorch, draw the attention

USAGE:
    cargo run --release --example inference -- [OPTIONS]

OPTIONS:
    --weights PATH   safetensors checkpoint [default: weights/toy_e8_h2.safetensors]
    --heads N        number of attention heads [default: the file's `num_heads` metadata,
                     else E/64 when 64 divides E, else 2]
    --prefix P       tensor-name prefix of the attention layer, e.g. `bert.encoder.layer.0`
                     [default: detected; the first layer found when there are several]
    --batch N        batch element whose attention is drawn [default: 0]
    --device D       cpu, cuda or cuda:N [default: cpu] (cuda needs `--features cuda`)
    --heatmap PATH   also write the heatmaps as a PNG picture
    -h, --help       print this help

The layout is chosen from the tensor names: `in_proj_weight` -> PyTorch nn.MultiheadAttention,
`attention.self.query.weight` -> Hugging Face BERT; E comes from the shapes. Weights are
memory-mapped and loaded as f32 whatever their stored dtype.

When `<stem>.expected.safetensors` sits beside the checkpoint, its input and lengths are used and
the outputs and per-head weights of the padded and the causal run are checked against it (max abs
error <= 1e-4). Otherwise the module runs on random input (2, 8, E), lengths [8, 5], unchecked.

ENVIRONMENT:
    NO_COLOR    when set (non-empty), draw with shade characters instead of 24-bit colours
    COLUMNS     terminal width used to lay heads out side by side [default: 120]

EXIT STATUS: 0 pass (or nothing to check), 1 a check failed, 2 error.";

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Cli::Help) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Cli::Run(args)) => args,
        Err(err) => {
            eprintln!("error: {err:#}\n(run with --help for usage)");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(Verdict::Pass | Verdict::Unchecked) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Parsed command-line options.
#[derive(Debug)]
struct Args {
    weights: PathBuf,
    heads: Option<usize>,
    prefix: Option<String>,
    batch: usize,
    device: String,
    heatmap: Option<PathBuf>,
}

enum Cli {
    Run(Args),
    Help,
}

/// Hand-rolled parser: `--flag VALUE` or `--flag=VALUE`.
fn parse_args(raw: impl Iterator<Item = OsString>) -> Result<Cli> {
    let mut it = raw
        .map(|a| {
            a.into_string()
                .map_err(|a| anyhow!("argument {a:?} is not valid UTF-8"))
        })
        .collect::<Result<Vec<String>>>()?
        .into_iter();
    let mut args = Args {
        weights: PathBuf::from(DEFAULT_WEIGHTS),
        heads: None,
        prefix: None,
        batch: 0,
        device: "cpu".to_string(),
        heatmap: None,
    };
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Cli::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => bail!("{flag} needs a value"),
            }
        };
        match flag.as_str() {
            "--weights" => args.weights = PathBuf::from(value()?),
            "--heads" => {
                let n = parse_count("--heads", &value()?)?;
                ensure!(n > 0, "--heads must be at least 1");
                args.heads = Some(n);
            }
            "--prefix" => args.prefix = Some(value()?.trim_end_matches('.').to_string()),
            "--batch" => args.batch = parse_count("--batch", &value()?)?,
            "--device" => args.device = value()?,
            "--heatmap" => args.heatmap = Some(PathBuf::from(value()?)),
            f if f.starts_with('-') => bail!("unknown option {f:?}"),
            _ => bail!("unexpected argument {arg:?} (the checkpoint is given with --weights PATH)"),
        }
    }
    Ok(Cli::Run(args))
}

fn parse_count(flag: &str, v: &str) -> Result<usize> {
    v.parse()
        .with_context(|| format!("{flag}: expected a non-negative integer, got {v:?}"))
}

// ---------------------------------------------------------------------------------------------
// Checkpoint inspection
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayoutKind {
    Torch,
    Bert,
}

impl LayoutKind {
    /// The tensor whose name identifies the layout (and whose shape gives E).
    fn marker(self) -> &'static str {
        match self {
            LayoutKind::Torch => "in_proj_weight",
            LayoutKind::Bert => "attention.self.query.weight",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LayoutKind::Torch => "PyTorch nn.MultiheadAttention, WeightLayout::torch()",
            LayoutKind::Bert => "Hugging Face BERT, WeightLayout::bert()",
        }
    }

    fn layout(self) -> WeightLayout {
        match self {
            LayoutKind::Torch => WeightLayout::torch(),
            LayoutKind::Bert => WeightLayout::bert(),
        }
    }
}

/// What the checkpoint holds, read from its safetensors header only.
#[derive(Debug)]
struct Checkpoint {
    kind: LayoutKind,
    /// Prefix of the attention layer's tensor names ("" at the top level).
    prefix: String,
    /// How many attention layers were found (the first, or `--prefix`'s, is used).
    layers_found: usize,
    embed_dim: usize,
    stored_dtype: String,
    qkv_bias: bool,
    out_bias: bool,
    bias_kv: bool,
    /// `num_heads` from the file's `__metadata__`, when present.
    meta_heads: Option<usize>,
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn inspect_checkpoint(path: &Path, want_prefix: Option<&str>) -> Result<Checkpoint> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is only read while `mmap` is alive, within this function; like every
    // memory-mapped reader we rely on nobody truncating or rewriting the file meanwhile.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot memory-map {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let tensors = header.tensors();

    let mut layers: Vec<(String, LayoutKind)> = tensors
        .keys()
        .filter_map(|name| {
            [LayoutKind::Torch, LayoutKind::Bert]
                .into_iter()
                .find_map(|kind| {
                    let rest = name.strip_suffix(kind.marker())?;
                    match rest.strip_suffix('.') {
                        Some(prefix) => Some((prefix.to_string(), kind)),
                        None if rest.is_empty() => Some((String::new(), kind)),
                        None => None,
                    }
                })
        })
        .collect();
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    if layers.is_empty() {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        names.truncate(8);
        bail!(
            "{}: no attention layer found: expected a tensor named `in_proj_weight` (PyTorch \
             nn.MultiheadAttention) or `attention.self.query.weight` (Hugging Face BERT), \
             possibly under a prefix; the file has {} tensor(s), e.g. {names:?}",
            path.display(),
            tensors.len()
        );
    }
    let layers_found = layers.len();
    let (prefix, kind) = match want_prefix {
        None => layers.swap_remove(0),
        Some(p) => match layers.iter().position(|(q, _)| q == p) {
            Some(i) => layers.swap_remove(i),
            None => bail!(
                "{}: no attention layer under prefix {p:?}; found: {:?}",
                path.display(),
                layers.iter().map(|(q, _)| q.as_str()).collect::<Vec<_>>()
            ),
        },
    };

    let marker = join(&prefix, kind.marker());
    let info = tensors[&marker];
    let embed_dim = match (kind, info.shape.as_slice()) {
        (LayoutKind::Torch, &[rows, e]) if rows == 3 * e && e > 0 => e,
        (LayoutKind::Torch, dims) => bail!(
            "{}: `{marker}` has shape {}, expected (3E, E) (checkpoints with kdim/vdim != E \
             cannot run self-attention)",
            path.display(),
            shape(dims)
        ),
        (LayoutKind::Bert, &[out, e]) if out == e && e > 0 => e,
        (LayoutKind::Bert, dims) => bail!(
            "{}: `{marker}` has shape {}, expected (E, E)",
            path.display(),
            shape(dims)
        ),
    };
    let has = |name: &str| tensors.contains_key(&join(&prefix, name));
    let (qkv_bias, out_bias) = match kind {
        LayoutKind::Torch => (has("in_proj_bias"), has("out_proj.bias")),
        LayoutKind::Bert => (
            has("attention.self.query.bias"),
            has("attention.output.dense.bias"),
        ),
    };
    let meta_heads = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("num_heads"))
        .and_then(|v| v.parse().ok());
    Ok(Checkpoint {
        kind,
        layers_found,
        embed_dim,
        stored_dtype: format!("{:?}", info.dtype),
        qkv_bias,
        out_bias,
        bias_kv: has("bias_k") && has("bias_v"),
        meta_heads,
        prefix,
    })
}

/// The head count and where it came from.
fn choose_heads(flag: Option<usize>, ckpt: &Checkpoint) -> (usize, &'static str) {
    let e = ckpt.embed_dim;
    match (flag, ckpt.meta_heads) {
        (Some(h), _) => (h, "--heads"),
        (None, Some(h)) => (h, "file metadata `num_heads`"),
        (None, None) if e.is_multiple_of(64) => (e / 64, "default E/64"),
        (None, None) => (2, "default 2, E not a multiple of 64"),
    }
}

// ---------------------------------------------------------------------------------------------
// Expectation file
// ---------------------------------------------------------------------------------------------

/// `<dir>/<stem>.expected.safetensors` for `<dir>/<stem>.safetensors`.
fn expectation_path(weights: &Path) -> PathBuf {
    let name = weights
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    weights.with_file_name(format!("{stem}.expected.safetensors"))
}

struct Expectation {
    path: PathBuf,
    input: Tensor,
    lengths: Vec<usize>,
    tensors: HashMap<String, Tensor>,
}

impl Expectation {
    fn load(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read expectation file {}", path.display()))?;
        let mut exp = Self {
            path: path.to_path_buf(),
            input: Tensor::zeros(0, DType::F32, &Device::Cpu)?,
            lengths: Vec::new(),
            tensors,
        };
        let input = exp.tensor("input")?;
        ensure!(
            input.rank() == 3,
            "{}: `input` must be (B, L, E), got shape {:?}",
            path.display(),
            input.dims()
        );
        exp.input = input.to_dtype(DType::F32)?;
        let lengths = exp.tensor("lengths")?.to_dtype(DType::I64)?;
        exp.lengths = lengths
            .to_vec1::<i64>()
            .with_context(|| format!("{}: `lengths` must be 1-D", path.display()))?
            .into_iter()
            .map(|n| {
                usize::try_from(n)
                    .with_context(|| format!("{}: negative length {n}", path.display()))
            })
            .collect::<Result<_>>()?;
        // The stored boolean mask must say the same as the lengths we run with.
        if let Ok(kpm) = exp.tensor("key_padding_mask") {
            let (b, s) = kpm.dims2().with_context(|| {
                format!("{}: `key_padding_mask` must be (B, S)", path.display())
            })?;
            let from_lengths: Vec<u8> = exp
                .lengths
                .iter()
                .flat_map(|&n| (0..s).map(move |j| u8::from(j >= n)))
                .collect();
            let stored: Vec<u8> = kpm.ne(0u32)?.flatten_all()?.to_vec1()?;
            ensure!(
                b == exp.lengths.len() && stored == from_lengths,
                "{}: `key_padding_mask` does not match `lengths` {:?}",
                path.display(),
                exp.lengths
            );
        }
        Ok(exp)
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

enum Verdict {
    Pass,
    Fail,
    Unchecked,
}

/// One attention call: its name, output and per-head weights `(B, H, L, S)`.
struct RunResult {
    name: &'static str,
    description: String,
    output: Tensor,
    weights: Tensor,
}

fn run(args: &Args) -> Result<Verdict> {
    let device = parse_device(&args.device).with_context(|| {
        let hint = if args.device.starts_with("cuda") {
            " (build with `--features cuda`)"
        } else {
            ""
        };
        format!("cannot use device {:?}{hint}", args.device)
    })?;
    let (mha, heads_from) = load_module(args, &device)?;
    let heads = mha.config().num_heads;
    let (input, lengths, expectation) = prepare_input(args, &mha, heads_from)?;

    let padded = attend(
        &mha,
        MhaInput::new(input.clone()).key_padding_mask(KeyPaddingMask::from_lengths(&lengths)),
        "padded",
        format!("key padding from lengths {lengths:?}"),
    )?;
    let causal = attend(
        &mha,
        MhaInput::new(input.clone()).causal(CausalAlignment::TopLeft),
        "causal",
        "causal mask, top-left aligned".to_string(),
    )?;
    let runs = [padded, causal];

    println!();
    if expectation.is_some() {
        println!(
            "checks: max abs error against the float64 PyTorch reference, tolerance {ATOL:e} (f32)"
        );
    }
    let mut checks = Vec::new();
    for r in &runs {
        println!(
            "{} run ({}): output {}, weights {}",
            r.name,
            r.description,
            shape(r.output.dims()),
            shape(r.weights.dims())
        );
        if let Some(exp) = &expectation {
            for (what, got) in [("output", &r.output), ("weights", &r.weights)] {
                let name = format!("expected.{}.{what}", r.name);
                let want = exp.tensor(&name)?;
                let check = compare(&name, got, want, ATOL)?;
                print_check(&check);
                checks.push(check);
            }
        }
    }

    println!();
    let maps: Vec<Heatmaps> = runs
        .iter()
        .map(|r| Heatmaps::new(r, args.batch, &lengths))
        .collect::<Result<_>>()?;
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(DEFAULT_COLUMNS);
    for m in &maps {
        print!("{}", m.render_terminal(color, columns));
    }

    if let Some(path) = &args.heatmap {
        let (w, h) = write_png(path, &maps)
            .with_context(|| format!("cannot write heatmap {}", path.display()))?;
        println!(
            "wrote {} ({w}×{h} px): top row padded run (0 .. {:.3}), bottom row causal run \
             (0 .. {:.3}), heads 0..{} left to right, colour bar on the right",
            path.display(),
            maps[0].vmax,
            maps[1].vmax,
            heads - 1
        );
    }

    Ok(if expectation.is_none() {
        println!("SKIPPED check: no expectation file");
        Verdict::Unchecked
    } else if checks.iter().all(|c| c.passed) {
        let worst = checks.iter().map(|c| c.max_abs_err).fold(0f64, f64::max);
        println!(
            "PASS: all {} checks within {ATOL:e} (worst max abs err {worst:.2e})",
            checks.len()
        );
        Verdict::Pass
    } else {
        let failed = checks.iter().filter(|c| !c.passed).count();
        println!(
            "FAIL: {failed} of {} checks exceed the tolerance {ATOL:e}",
            checks.len()
        );
        Verdict::Fail
    })
}

/// Inspects the checkpoint, builds the config, loads the module (f32) and prints what it found.
/// Returns the module and where its head count came from.
fn load_module(args: &Args, device: &Device) -> Result<(MultiHeadAttention, &'static str)> {
    let ckpt = inspect_checkpoint(&args.weights, args.prefix.as_deref())?;
    let (heads, heads_from) = choose_heads(args.heads, &ckpt);
    let cfg = MhaConfig::new(ckpt.embed_dim, heads)
        .with_batch_first(true)
        .with_biases(ckpt.qkv_bias, ckpt.out_bias)
        .with_add_bias_kv(ckpt.bias_kv);
    cfg.validate()
        .with_context(|| format!("invalid configuration (heads from {heads_from})"))?;

    // SAFETY: candle memory-maps the checkpoint for as long as the VarBuilder (and the tensors
    // it hands out) live; the file must not be modified or truncated while this program runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&args.weights], DType::F32, device) }
        .with_context(|| format!("cannot map {}", args.weights.display()))?;
    let vb = if ckpt.prefix.is_empty() {
        vb
    } else {
        vb.pp(&ckpt.prefix)
    };
    let mha = MultiHeadAttention::load(cfg, &ckpt.kind.layout(), vb)
        .with_context(|| format!("cannot load {}", args.weights.display()))?;

    let cfg = mha.config();
    println!("checkpoint  {}", args.weights.display());
    if !ckpt.prefix.is_empty() || ckpt.layers_found > 1 {
        println!(
            "  layer     `{}` (1 of {} attention layers found; choose with --prefix)",
            ckpt.prefix, ckpt.layers_found
        );
    }
    println!(
        "  layout    {} (found `{}`), stored {}, loaded as F32",
        ckpt.kind.describe(),
        ckpt.kind.marker(),
        ckpt.stored_dtype
    );
    println!(
        "  config    E={}, heads={heads} ({heads_from}), head_dim={}, biases: q/k/v {}, out {}{}",
        cfg.embed_dim,
        cfg.head_dim(),
        yes_no(cfg.qkv_bias),
        yes_no(cfg.out_bias),
        if cfg.add_bias_kv {
            ", bias_k/bias_v"
        } else {
            ""
        }
    );
    println!("  device    {}", device_name(device));
    Ok((mha, heads_from))
}

/// The input `(B, L, E)` on the module's device and the valid lengths: from the expectation
/// file when there is one (returned too), else random.
fn prepare_input(
    args: &Args,
    mha: &MultiHeadAttention,
    heads_from: &str,
) -> Result<(Tensor, Vec<usize>, Option<Expectation>)> {
    let heads = mha.config().num_heads;
    let exp_path = expectation_path(&args.weights);
    let (input, lengths, expectation) = if exp_path.exists() {
        let exp = Expectation::load(&exp_path)?;
        let stored = exp.tensor("expected.padded.weights")?.dims();
        if stored.len() == 4 && stored[1] != heads {
            bail!(
                "{}: the expectation was computed with {} heads, the module has {heads} (from \
                 {heads_from}); pass --heads {}",
                exp_path.display(),
                stored[1],
                stored[1]
            );
        }
        println!(
            "input       {} f32 from {}, lengths {:?}",
            shape(exp.input.dims()),
            exp.path.display(),
            exp.lengths
        );
        let input = exp.input.to_device(mha.device())?;
        (input, exp.lengths.clone(), Some(exp))
    } else {
        let dims = (RANDOM_LENGTHS.len(), RANDOM_LEN, mha.config().embed_dim);
        println!(
            "input       random N(0, 1) {}, lengths {RANDOM_LENGTHS:?}",
            shape(&[dims.0, dims.1, dims.2])
        );
        println!(
            "            no expectation file {}: nothing to check against (your own weights?)",
            exp_path.display()
        );
        let input = Tensor::randn(0f32, 1., dims, mha.device())?;
        (input, RANDOM_LENGTHS.to_vec(), None)
    };
    let batch_size = input.dim(0)?;
    ensure!(
        args.batch < batch_size,
        "--batch {} is out of range: the input has {batch_size} batch elements",
        args.batch
    );
    Ok((input, lengths, expectation))
}

fn attend(
    mha: &MultiHeadAttention,
    input: MhaInput,
    name: &'static str,
    description: String,
) -> Result<RunResult> {
    let out = mha
        .attend(&input.need_weights(NeedWeights::PerHead))
        .with_context(|| format!("{name} self-attention ({description}) failed"))?;
    let weights = out
        .weights
        .with_context(|| format!("{name} run: the module returned no attention weights"))?;
    Ok(RunResult {
        name,
        description,
        output: out.output,
        weights,
    })
}

/// One comparison with the PyTorch reference.
struct Check {
    label: String,
    max_abs_err: f64,
    passed: bool,
    detail: Option<String>,
}

/// `got` against `want` element-wise: `|got - want| <= atol` (NaN must meet NaN).
fn compare(label: &str, got: &Tensor, want: &Tensor, atol: f64) -> Result<Check> {
    if got.dims() != want.dims() {
        return Ok(Check {
            label: label.to_string(),
            max_abs_err: f64::INFINITY,
            passed: false,
            detail: Some(format!(
                "shape mismatch: expected {}, got {}",
                shape(want.dims()),
                shape(got.dims())
            )),
        });
    }
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let (mut max_err, mut bad) = (0f64, 0usize);
    for (&g, &w) in g.iter().zip(&w) {
        let err = match (g.is_nan(), w.is_nan()) {
            (true, true) => 0.0,
            (false, false) if g == w => 0.0,
            (false, false) => (g - w).abs(),
            _ => f64::INFINITY,
        };
        max_err = max_err.max(err);
        bad += usize::from(err > atol); // err is never NaN
    }
    Ok(Check {
        label: label.to_string(),
        max_abs_err: max_err,
        passed: bad == 0,
        detail: (bad > 0).then(|| format!("{bad} of {} elements over {atol:e}", g.len())),
    })
}

fn print_check(c: &Check) {
    println!(
        "  {:<26} max abs err {:.2e}  {}",
        c.label,
        c.max_abs_err,
        if c.passed { "PASS" } else { "FAIL" }
    );
    if let Some(detail) = &c.detail {
        println!("      {detail}");
    }
}

/// `(2, 5, 8)` rather than `[2, 5, 8]`: PyTorch's way of writing shapes.
fn shape(dims: &[usize]) -> String {
    let inner: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("({})", inner.join(", "))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        other => format!("{:?}", other.location()),
    }
}

// ---------------------------------------------------------------------------------------------
// Heatmaps
// ---------------------------------------------------------------------------------------------

/// viridis sampled at 9 evenly spaced points (viridisLite `viridis(9)`), interpolated linearly.
const VIRIDIS: [[u8; 3]; 9] = [
    [0x44, 0x01, 0x54],
    [0x47, 0x2d, 0x7b],
    [0x3b, 0x52, 0x8b],
    [0x2c, 0x72, 0x8e],
    [0x21, 0x90, 0x8c],
    [0x27, 0xad, 0x81],
    [0x5d, 0xc8, 0x63],
    [0xaa, 0xdc, 0x32],
    [0xfd, 0xe7, 0x25],
];

/// The colour of `t` in `[0, 1]` (clamped); NaN is drawn mid-grey.
fn ramp(t: f32) -> [u8; 3] {
    if t.is_nan() {
        return [128, 128, 128];
    }
    let x = t.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    std::array::from_fn(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

/// The shade character of `t` in `[0, 1]` for `NO_COLOR` output; NaN is `?`.
fn shade(t: f32) -> char {
    if t.is_nan() {
        return '?';
    }
    let i = (t.clamp(0.0, 1.0) * SHADES.len() as f32) as usize;
    SHADES[i.min(SHADES.len() - 1)] as char
}

/// The attention of one batch element in one run, cropped to [`MAX_CELLS`].
struct Heatmaps {
    title: String,
    /// `[head][query][key]`.
    heads: Vec<Vec<Vec<f32>>>,
    /// Full (uncropped) query and key lengths.
    full: (usize, usize),
    /// Top of the colour scale: the largest finite weight shown (1 if none is positive).
    vmax: f32,
}

impl Heatmaps {
    fn new(run: &RunResult, batch: usize, lengths: &[usize]) -> Result<Self> {
        let (_, _, l, s) = run.weights.dims4()?;
        let per_head: Vec<Vec<Vec<f32>>> = run
            .weights
            .get(batch)?
            .to_dtype(DType::F32)?
            .to_vec3()
            .context("cannot read the attention weights back")?;
        let heads: Vec<Vec<Vec<f32>>> = per_head
            .into_iter()
            .map(|m| {
                m.into_iter()
                    .take(MAX_CELLS)
                    .map(|row| row.into_iter().take(MAX_CELLS).collect())
                    .collect()
            })
            .collect();
        let vmax = heads
            .iter()
            .flatten()
            .flatten()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0f32, f32::max);
        let detail = match (run.name, lengths.get(batch)) {
            ("padded", Some(&n)) if n < s => format!("length {n}: keys {n}..{} padded", s - 1),
            ("padded", _) => format!("length {s}: no padding"),
            _ => "query i sees keys j <= i".to_string(),
        };
        Ok(Self {
            title: format!("{} run, batch element {batch} ({detail})", run.name),
            heads,
            full: (l, s),
            vmax: if vmax > 0.0 { vmax } else { 1.0 },
        })
    }

    fn shown(&self) -> (usize, usize) {
        (self.full.0.min(MAX_CELLS), self.full.1.min(MAX_CELLS))
    }

    /// Every head as a text block, laid out side by side to fit `columns`.
    fn render_terminal(&self, color: bool, columns: usize) -> String {
        let (l, s) = self.full;
        let mut out = format!(
            "{}: attention weights, rows = query i, columns = key j\n",
            self.title
        );
        let legend: String = (0..10)
            .map(|k| cell(k as f32 / 9.0, color))
            .chain(std::iter::once(reset(color).to_string()))
            .collect();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  scale 0 [{legend}] {:.3}", self.vmax);
        if l > MAX_CELLS || s > MAX_CELLS {
            let (ls, ss) = self.shown();
            let _ = writeln!(
                out,
                "  (showing the first {ls} of {l} queries and {ss} of {s} keys)"
            );
        }
        let blocks: Vec<Block> = self
            .heads
            .iter()
            .enumerate()
            .map(|(h, m)| self.block(h, m, color))
            .collect();
        out += &lay_out(&blocks, columns);
        out
    }

    /// One head: title, key labels (tens digit above the ones digit when S > 10), then one line
    /// per query row with its label.
    fn block(&self, head: usize, m: &[Vec<f32>], color: bool) -> Block {
        let (_, s) = self.shown();
        let width = 4 + 2 * s;
        let mut lines = vec![format!("head {head}")];
        if s > 10 {
            let tens: String = (0..s)
                .map(|j| match j / 10 {
                    0 => "  ".to_string(),
                    t => format!("{t:>2}"),
                })
                .collect();
            lines.push(format!("    {tens}"));
        }
        let ones: String = (0..s).map(|j| format!("{:>2}", j % 10)).collect();
        lines.push(format!("q\\k {ones}"));
        for (i, row) in m.iter().enumerate() {
            let cells: String = row.iter().map(|&v| cell(v / self.vmax, color)).collect();
            lines.push(format!("{i:>3} {cells}{}", reset(color)));
        }
        Block { lines, width }
    }
}

/// A two-character terminal cell for `t` in `[0, 1]`.
fn cell(t: f32, color: bool) -> String {
    if color {
        let [r, g, b] = ramp(t);
        format!("\x1b[48;2;{r};{g};{b}m  ")
    } else {
        let c = shade(t);
        format!("{c}{c}")
    }
}

fn reset(color: bool) -> &'static str {
    if color {
        "\x1b[0m"
    } else {
        ""
    }
}

/// Text lines and their visible width (escape sequences take no room).
struct Block {
    lines: Vec<String>,
    width: usize,
}

/// Puts blocks side by side, three spaces apart, wrapping at `columns`.
fn lay_out(blocks: &[Block], columns: usize) -> String {
    const SEP: usize = 3;
    let mut out = String::new();
    let mut start = 0;
    while start < blocks.len() {
        let mut end = start + 1;
        let mut used = blocks[start].width;
        while end < blocks.len() && used + SEP + blocks[end].width <= columns {
            used += SEP + blocks[end].width;
            end += 1;
        }
        let row = &blocks[start..end];
        let height = row.iter().map(|b| b.lines.len()).max().unwrap_or(0);
        for i in 0..height {
            let mut line = String::new();
            for (k, b) in row.iter().enumerate() {
                if k > 0 {
                    line.push_str(&" ".repeat(SEP));
                }
                let text = b.lines.get(i).map(String::as_str).unwrap_or("");
                line.push_str(text);
                // The title and label lines are plain text: pad them to the block width.
                let visible = if text.contains('\x1b') {
                    b.width
                } else {
                    text.chars().count()
                };
                line.push_str(&" ".repeat(b.width.saturating_sub(visible)));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push('\n');
        start = end;
    }
    out
}

/// Writes `maps` (one row each) as an RGB PNG; returns its size in pixels.
fn write_png(path: &Path, maps: &[Heatmaps]) -> Result<(u32, u32)> {
    const GAP: usize = 1;
    const MARGIN: usize = 16;
    const BACKGROUND: [u8; 3] = [255, 255, 255];
    let Some(first) = maps.first() else {
        bail!("nothing to draw")
    };
    let (l, s) = first.shown();
    let n_heads = first.heads.len();
    // Cell size: about 240 px per head, between 4 and 32 px a cell.
    let cell_px = (240 / l.max(s)).clamp(4, 32);
    let (block_w, block_h) = (s * cell_px + (s - 1) * GAP, l * cell_px + (l - 1) * GAP);
    let bar_w = cell_px;
    let width = MARGIN + n_heads * (block_w + MARGIN) + bar_w + MARGIN;
    let height = MARGIN + maps.len() * (block_h + MARGIN);
    let mut img = vec![0u8; width * height * 3];
    for px in img.chunks_exact_mut(3) {
        px.copy_from_slice(&BACKGROUND);
    }
    let mut fill = |x0: usize, y0: usize, w: usize, h: usize, rgb: [u8; 3]| {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                let o = (y * width + x) * 3;
                img[o..o + 3].copy_from_slice(&rgb);
            }
        }
    };
    for (r, map) in maps.iter().enumerate() {
        let y0 = MARGIN + r * (block_h + MARGIN);
        for (h, m) in map.heads.iter().enumerate() {
            let x0 = MARGIN + h * (block_w + MARGIN);
            for (i, row) in m.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let rgb = ramp(v / map.vmax);
                    fill(
                        x0 + j * (cell_px + GAP),
                        y0 + i * (cell_px + GAP),
                        cell_px,
                        cell_px,
                        rgb,
                    );
                }
            }
        }
        // Colour bar: the scale's top (this run's vmax) at the top.
        let xb = MARGIN + n_heads * (block_w + MARGIN);
        for y in 0..block_h {
            let t = 1.0 - y as f32 / (block_h - 1).max(1) as f32;
            fill(xb, y0 + y, bar_w, 1, ramp(t));
        }
    }
    let (w, h) = (u32::try_from(width)?, u32::try_from(height)?);
    let file = File::create(path)?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&img)?;
    writer.finish()?;
    Ok((w, h))
}
