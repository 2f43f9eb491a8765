//! Decode speed of SmolLM2-135M-Instruct on candle-mha: KV cache vs recomputing the full prefix,
//! vs PyTorch / transformers on the same machine, in one run.
//!
//! ```text
//! scripts/fetch-smollm2.sh
//! cargo run --release --example bench_decode -- [--tokens 64] [--threads 2] [--python PY] [--no-torch]
//! cargo run --release --example bench_decode -- --kv-formats [--tokens 64]   # bf16 / int8 / fp8 caches at S ≥ 2048
//! ```
//!
//! Greedy generation of `--tokens` tokens after a fixed chat prompt, f32 on CPU:
//! - candle-mha + `KvCache`: one prefill, then one token per step;
//! - candle-mha, no cache: every step runs the whole prefix (prompt + generated so far) again;
//! - transformers (`scripts/bench_decode_torch.py`, spawned with `--python`, default
//!   `$PYTHON`, then `python3`): with its KV cache, `sdpa` and `eager` attention, with
//!   `torch.set_num_threads(--threads)` and with 1 thread; and (`sdpa`, `--threads`) recomputing
//!   the full prefix every step. The candle runs use candle's default thread pool (all cores).
//!
//! All runs must generate the same tokens. Also measures the cache's append cost alone: the
//! chunked `KvCache` against reallocating every step (`Tensor::cat`, like candle-nn's
//! `ConcatKvCache`) and candle-nn's `kv_cache::KvCache`.

#[path = "common/model_files.rs"]
mod model_files;
#[path = "common/timing.rs"]
mod timing;

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_mha::models::llama::{Llama, LlamaCache};
use candle_mha::KvCache;
use model_files::find_smollm2_gguf;
use timing::loadavg;

const MESSAGE: &str = "What is the capital of France? Answer in one sentence.";

struct Args {
    tokens: usize,
    threads: usize,
    python: String,
    torch: bool,
    kv_formats: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        tokens: 64,
        threads: 2,
        python: std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()),
        torch: true,
        kv_formats: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--tokens" => a.tokens = value("--tokens")?.parse()?,
            "--threads" => a.threads = value("--threads")?.parse()?,
            "--python" => a.python = value("--python")?,
            "--no-torch" => a.torch = false,
            "--kv-formats" => a.kv_formats = true,
            "-h" | "--help" => {
                println!(
                    "usage: bench_decode [--tokens N] [--threads N] [--python PY] [--no-torch] [--kv-formats]"
                );
                std::process::exit(0);
            }
            "--bench" => {} // cargo bench passes this
            other => bail!(
                "unknown option {other}: --tokens N --threads N --python PY --no-torch --kv-formats"
            ),
        }
    }
    if a.tokens < 2 {
        bail!("--tokens must be at least 2")
    }
    Ok(a)
}

struct Run {
    prefill_tps: f64,
    decode_tps: f64,
    ids: Vec<u32>,
}

fn cached(model: &Llama, prompt: &[u32], n: usize, dev: &Device) -> Result<Run> {
    let mut cache = LlamaCache::new(model);
    let t0 = Instant::now();
    let ids = Tensor::new(prompt, dev)?.unsqueeze(0)?;
    let mut next = Llama::argmax(&model.forward(&ids, &mut cache)?)?[0];
    let prefill = t0.elapsed().as_secs_f64();
    let mut out = vec![next];
    let t1 = Instant::now();
    while out.len() < n {
        let step = Tensor::new(&[[next]], dev)?;
        next = Llama::argmax(&model.forward(&step, &mut cache)?)?[0];
        out.push(next);
    }
    Ok(Run {
        prefill_tps: prompt.len() as f64 / prefill,
        decode_tps: (n - 1) as f64 / t1.elapsed().as_secs_f64(),
        ids: out,
    })
}

fn full_prefix(model: &Llama, prompt: &[u32], n: usize, dev: &Device) -> Result<Run> {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    let mut t1 = Instant::now();
    for i in 0..n {
        let mut cache = LlamaCache::new(model); // no reuse: the whole prefix every step
        let ids = Tensor::new(&seq[..], dev)?.unsqueeze(0)?;
        let next = Llama::argmax(&model.forward(&ids, &mut cache)?)?[0];
        out.push(next);
        seq.push(next);
        if i == 0 {
            t1 = Instant::now();
        }
    }
    Ok(Run {
        prefill_tps: f64::NAN,
        decode_tps: (n - 1) as f64 / t1.elapsed().as_secs_f64(),
        ids: out,
    })
}

/// Appending one token per step for `steps` steps to f32 caches of 3 KV heads of size 64, each
/// in its own layout: ours `(1, S, 3, 64)`, candle-nn's and `Tensor::cat` `(1, 3, S, 64)`.
fn append_micro(steps: usize, dev: &Device) -> Result<Vec<(String, f64)>> {
    let kv = Tensor::randn(0f32, 1., (1, 3, 1, 64), dev)?;
    let kv_ours = kv.reshape((1, 1, 3, 64))?;
    let mut rows = vec![];
    for chunk in [256usize, 1] {
        let mut c = KvCache::with_chunk(chunk);
        let t = Instant::now();
        for _ in 0..steps {
            c.append(&kv_ours, &kv_ours)?;
        }
        let name = if chunk == 1 {
            "candle-mha KvCache, chunk 1 (realloc every step)".to_string()
        } else {
            format!("candle-mha KvCache, chunk {chunk}")
        };
        rows.push((name, t.elapsed().as_secs_f64() * 1e6 / steps as f64));
    }
    let mut c = candle_nn::kv_cache::KvCache::new(2, 256);
    let t = Instant::now();
    for _ in 0..steps {
        c.append(&kv, &kv)?;
    }
    rows.push((
        "candle-nn kv_cache::KvCache (grow by 256)".into(),
        t.elapsed().as_secs_f64() * 1e6 / steps as f64,
    ));
    let (mut k, mut v) = (kv.clone(), kv.clone());
    let t = Instant::now();
    for _ in 1..steps {
        k = Tensor::cat(&[&k, &kv], 2)?;
        v = Tensor::cat(&[&v, &kv], 2)?;
    }
    rows.push((
        "Tensor::cat every step (ConcatKvCache)".into(),
        t.elapsed().as_secs_f64() * 1e6 / steps as f64,
    ));
    Ok(rows)
}

#[derive(serde::Deserialize)]
struct TorchRun {
    torch: String,
    attn_implementation: String,
    threads: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    full_prefix_tokens_per_s: Option<f64>,
    generated_ids: Vec<u32>,
}

/// `--kv-formats`: bf16 SmolLM2 decoding `tokens` tokens after a prompt of S ≥ 2048 tokens with a
/// bf16, an int8 and an fp8 cache (alternating, 3 rounds, medians): decode tokens/s, the cache's
/// memory, and the first greedy token where a generation differs from the bf16 cache's (the
/// prompt is synthetic, so the model is often near a tie).
fn kv_formats(model_path: &std::path::Path, tokens: usize, dev: &Device) -> Result<()> {
    use candle_mha::KvFormat;
    let model = Llama::from_gguf(model_path, DType::BF16, dev)?;
    println!(
        "SmolLM2-135M-Instruct in bf16, {} threads, load at start: {}",
        rayon::current_num_threads(),
        loadavg()
    );
    println!("\n| prompt S | cache | decode tokens/s | vs bf16 | cache memory | first greedy token that differs |");
    println!("|---:|---|---:|---:|---:|---:|");
    let formats = [
        ("bf16", KvFormat::Native),
        ("int8", KvFormat::Int8),
        ("fp8 e4m3", KvFormat::Fp8E4M3),
    ];
    for s_len in [2048usize, 4096] {
        // A long synthetic prompt: spread-out token ids.
        let prompt: Vec<u32> = (0..s_len as u32)
            .map(|i| 1000 + (i * 7919) % 20000)
            .collect();
        let run = |format: KvFormat| -> Result<(f64, usize, Vec<u32>)> {
            let mut cache = LlamaCache::with_format(&model, format);
            let ids = Tensor::new(&prompt[..], dev)?.unsqueeze(0)?;
            let mut next = Llama::argmax(&model.forward(&ids, &mut cache)?)?[0];
            let mut out = vec![next];
            let t = Instant::now();
            while out.len() < tokens {
                let step = Tensor::new(&[[next]], dev)?;
                next = Llama::argmax(&model.forward(&step, &mut cache)?)?[0];
                out.push(next);
            }
            Ok((
                (tokens - 1) as f64 / t.elapsed().as_secs_f64(),
                cache.memory_bytes(),
                out,
            ))
        };
        let mut rates = vec![vec![]; formats.len()];
        let mut last = vec![(0usize, vec![]); formats.len()];
        for _ in 0..3 {
            for (i, &(_, f)) in formats.iter().enumerate() {
                let (t, m, ids) = run(f)?;
                rates[i].push(t);
                last[i] = (m, ids);
            }
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let rates: Vec<f64> = rates.into_iter().map(med).collect();
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        for (i, (name, _)) in formats.iter().enumerate() {
            let first_diff = last[0]
                .1
                .iter()
                .zip(&last[i].1)
                .position(|(a, b)| a != b)
                .map_or("none".to_string(), |i| format!("token {}", i + 1));
            println!(
                "| {s_len} | {name} | {:.1} | {:.2} | {:.1} MiB | {} |",
                rates[i],
                rates[i] / rates[0],
                mib(last[i].0),
                if i == 0 { "" } else { &first_diff }
            );
        }
    }
    println!("load at end: {}", loadavg());
    Ok(())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let dev = Device::Cpu;
    let gguf = find_smollm2_gguf(None)?;
    if a.kv_formats {
        return kv_formats(&gguf, a.tokens, &dev);
    }
    let tok = tokenizers::Tokenizer::from_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/smollm2-tokenizer.json"),
    )
    .map_err(anyhow::Error::msg)?;
    let prompt = tok
        .encode(model_files::smollm2_chat_prompt(MESSAGE), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    let model = Llama::from_gguf(&gguf, DType::F32, &dev)?;
    println!(
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32), CPU, prompt {} tokens, {} generated tokens (greedy)",
        prompt.len(),
        a.tokens
    );
    cached(&model, &prompt, 4, &dev)?; // warm-up
    let with_cache = cached(&model, &prompt, a.tokens, &dev)?;
    let no_cache = full_prefix(&model, &prompt, a.tokens, &dev)?;
    if no_cache.ids != with_cache.ids {
        bail!("cached and full-prefix generations differ")
    }
    let torch = if a.torch {
        let ids: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_decode_torch.py");
        let out = Command::new(&a.python)
            .arg(script)
            .args(["--gguf", &gguf.to_string_lossy()])
            .args(["--ids", &ids.join(",")])
            .args(["--tokens", &a.tokens.to_string()])
            .args(["--full-tokens", &a.tokens.to_string()])
            .args(["--threads", &format!("{},1", a.threads)])
            .output()
            .with_context(|| format!("running {} (use --python or --no-torch)", a.python))?;
        if !out.status.success() {
            bail!(
                "{} scripts/bench_decode_torch.py failed (needs torch, transformers, gguf; use --python or --no-torch):\n{}",
                a.python,
                String::from_utf8_lossy(&out.stderr)
            )
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let runs = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| {
                serde_json::from_str::<TorchRun>(l)
                    .with_context(|| format!("parsing the python output {l:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        for run in &runs {
            if run.generated_ids != with_cache.ids {
                println!(
                    "note: transformers ({}) generated different tokens: {:?}",
                    run.attn_implementation, run.generated_ids
                );
            }
        }
        runs
    } else {
        vec![]
    };

    let base = with_cache.decode_tps;
    println!();
    println!("| implementation | prefill tokens/s | decode tokens/s | vs candle-mha + cache |");
    println!("|---|---:|---:|---:|");
    println!(
        "| candle-mha + KvCache | {:.1} | {:.1} | 1.00 |",
        with_cache.prefill_tps, with_cache.decode_tps
    );
    println!(
        "| candle-mha, full prefix every step | - | {:.1} | {:.2} |",
        no_cache.decode_tps,
        no_cache.decode_tps / base
    );
    for t in &torch {
        println!(
            "| transformers ({}), torch {} + DynamicCache, {} thread(s) | {:.1} | {:.1} | {:.2} |",
            t.attn_implementation,
            t.torch,
            t.threads,
            t.prefill_tokens_per_s,
            t.decode_tokens_per_s,
            t.decode_tokens_per_s / base
        );
        if let Some(full) = t.full_prefix_tokens_per_s {
            println!(
                "| transformers ({}), {} thread(s), full prefix every step | - | {:.1} | {:.2} |",
                t.attn_implementation,
                t.threads,
                full,
                full / base
            );
        }
    }
    println!();
    println!("cache append, one token per step, 3 KV heads × 64 f32 k and v, 1024 steps:");
    println!("| cache | µs per append |");
    println!("|---|---:|");
    for (name, us) in append_micro(1024, &dev)? {
        println!("| {name} | {us:.1} |");
    }
    Ok(())
}
