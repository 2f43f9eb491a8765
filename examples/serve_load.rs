//! Load test: K worker threads embed sentences with ONE shared all-MiniLM-L6-v2
//! (`Arc<MiniLm>`: a `SentenceEmbedder` and its tokenizer) for a fixed duration, one sentence per
//! request, and every output is checked against the serial output for that sentence.
//!
//! ```bash
//! bash scripts/fetch-minilm.sh   # one-time
//! cargo run --release --example serve_load -- --threads 4 --seconds 20
//! ```
//!
//! Reports requests (sentences) per second, p50/p99/max latency per request, and how many
//! outputs were checked: bit-equal to the serial output, or the largest difference.

#[path = "common/minilm.rs"]
mod minilm;
#[path = "common/model_files.rs"]
mod model_files;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::Device;
use minilm::MiniLm;
use model_files::find_minilm_dir;

const USAGE: &str =
    "usage: serve_load [--threads K] [--seconds T] [--model-dir DIR] [--json]\n\
     K worker threads (default 2) embed sentences with one shared MiniLM for T seconds (default 20)";

/// Sentences of varied length (2 to ~60 tokens).
const SENTENCES: &[&str] = &[
    "Hi.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Rust's ownership rules make data races a compile-time error, not a runtime surprise.",
    "The quick brown fox jumps over the lazy dog while the cat watches from the windowsill.",
    "Attention is all you need, they said; then came the padding masks, the KV caches, \
     the rotary embeddings, and a decade of papers about making softmax cheaper.",
    "Les élèves du café parlent de la météo.",
    "In the beginning the Universe was created. This has made a lot of people very angry and \
     been widely regarded as a bad move, according to a guide that is mostly harmless and \
     famously recommends always knowing where your towel is.",
    "ok",
];

struct Args {
    threads: usize,
    seconds: f64,
    model_dir: Option<PathBuf>,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        threads: 2,
        seconds: 20.0,
        model_dir: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--threads" => a.threads = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--model-dir" => a.model_dir = Some(val()?.into()),
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if a.threads == 0 {
        bail!("--threads must be at least 1")
    }
    Ok(a)
}

/// What one worker did.
#[derive(Default)]
struct WorkerStats {
    latencies: Vec<Duration>,
    checked: usize,
    bit_equal: usize,
    max_diff: f32,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = find_minilm_dir(args.model_dir.as_deref())?;
    let model = Arc::new(MiniLm::load(&dir, &Device::Cpu)?);
    let ids = model.tokenize(SENTENCES)?;
    // The serial outputs: one sentence per call, on this thread, before any worker starts.
    let serial: Vec<Vec<f32>> = ids
        .iter()
        .map(|t| {
            Ok(model
                .embedder
                .embed_token_ids(std::slice::from_ref(t))?
                .to_vec2::<f32>()?
                .remove(0))
        })
        .collect::<Result<_>>()?;
    let ids = Arc::new(ids);
    let serial = Arc::new(serial);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..args.threads)
        .map(|w| {
            let (model, ids, serial, stop) =
                (model.clone(), ids.clone(), serial.clone(), stop.clone());
            std::thread::spawn(move || -> Result<WorkerStats> {
                let mut st = WorkerStats::default();
                let mut i = w * 7;
                while !stop.load(Ordering::Relaxed) {
                    let s = i % ids.len();
                    i += 1;
                    let start = Instant::now();
                    let emb = model
                        .embedder
                        .embed_token_ids(std::slice::from_ref(&ids[s]))?
                        .to_vec2::<f32>()?
                        .remove(0);
                    st.latencies.push(start.elapsed());
                    st.checked += 1;
                    if emb
                        .iter()
                        .zip(&serial[s])
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                    {
                        st.bit_equal += 1;
                    } else {
                        let d = emb
                            .iter()
                            .zip(&serial[s])
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        st.max_diff = st.max_diff.max(d);
                    }
                }
                Ok(st)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut lat = vec![];
    let (mut checked, mut bit_equal, mut max_diff) = (0, 0, 0f32);
    for w in workers {
        let st = w
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        lat.extend(st.latencies);
        checked += st.checked;
        bit_equal += st.bit_equal;
        max_diff = max_diff.max(st.max_diff);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let throughput = checked as f64 / elapsed;
    let (p50, p99, max) = (
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    if args.json {
        println!(
            "{{\"threads\":{},\"cores\":{cores},\"seconds\":{elapsed:.2},\"requests\":{checked},\"sentences_per_s\":{throughput:.1},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"max_ms\":{max:.3},\"bit_equal\":{bit_equal},\"max_diff\":{max_diff:e}}}",
            args.threads
        );
    } else {
        println!(
            "{} threads ({cores} cores), {elapsed:.1} s: {checked} requests (one sentence each), {throughput:.1} sentences/s",
            args.threads
        );
        println!("latency per request: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
        println!(
            "outputs checked: {checked}, bit-equal to the serial output: {bit_equal}{}",
            if bit_equal == checked {
                String::new()
            } else {
                format!(", max abs difference {max_diff:e}")
            }
        );
    }
    if bit_equal != checked {
        bail!(
            "{} outputs differ from the serial output",
            checked - bit_equal
        )
    }
    Ok(())
}
