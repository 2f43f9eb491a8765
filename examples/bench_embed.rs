//! Times all-MiniLM-L6-v2 sentence embeddings on candle-mha against the same model run by
//! PyTorch (sentence-transformers), in one run on this machine.
//!
//! ```text
//! scripts/fetch-minilm.sh
//! cargo run --release --example bench_embed -- --python /root/.venv-torch/bin/python
//! ```
//!
//! 256 generated sentences (6 to ~70 tokens), batches of 32, tokenisation included on both
//! sides, both sorted by length before batching. PyTorch runs in `scripts/bench_embed_torch.py`
//! (spawned with `--python`, or `$CANDLE_MHA_BENCH_PYTHON`, default `python3`; it needs torch and
//! sentence-transformers) with `torch.set_num_threads` = candle's thread count. One warm-up pass
//! each, then `--repeat` timed passes of each, interleaved (candle, torch, candle, ...) so that
//! both see the same machine load. candle-mha runs twice per round: padded batches (sorted by
//! length first, as sentence-transformers does) and packed batches (the sentences in their own
//! order, packed without padding: `SentenceEmbedder::embed_token_ids_packed`). Prints the median
//! times, their ratios, and the largest differences between the embeddings.
//!
//! ONNX Runtime runs in the same Python process and rounds (unless `--no-ort`; needs the
//! `onnxruntime`, `onnx` and `onnxscript` packages): the encoder exported once by
//! `torch.onnx.export`, plain and rewritten by `onnxruntime.transformers.optimizer`
//! (`model_type="bert"`), `--threads` intra-op threads, tokenisation and pooling as
//! sentence-transformers does them; the faster of the two is the one compared.

#[path = "common/device.rs"]
mod device;
#[path = "common/minilm.rs"]
mod minilm;
#[path = "common/model_files.rs"]
mod model_files;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use minilm::MiniLm;
use model_files::find_minilm_dir;
use serde_json::Value;

const USAGE: &str = "usage: bench_embed [--model-dir DIR] [--device cpu|cuda] [--python PY] \
[--sentences N] [--batch-size N] [--repeat N] [--no-torch] [--no-ort]";

/// `n` deterministic English sentences of varied length.
fn sentences(n: usize) -> Vec<String> {
    const SUBJECTS: &[&str] = &[
        "The old fisherman",
        "A young engineer from the northern city",
        "My neighbour's cat",
        "The committee",
        "Every student in the advanced physics class",
        "A small startup",
        "The orchestra",
        "Our new kitchen robot",
        "The museum's curator",
        "A group of hikers",
    ];
    const VERBS: &[&str] = &[
        "repaired",
        "carefully examined",
        "quietly ignored",
        "wrote a long report about",
        "argued for hours over",
        "painted",
        "measured",
        "photographed",
        "sold",
        "rediscovered",
    ];
    const OBJECTS: &[&str] = &[
        "the broken bridge",
        "a forgotten manuscript",
        "the quarterly budget",
        "an unusual mushroom",
        "the tallest tree in the valley",
        "a box of vintage postcards",
        "the recipe for grandmother's plum cake",
        "a faulty temperature sensor",
    ];
    const TAILS: &[&str] = &[
        "before sunrise",
        "while it was raining heavily outside",
        "because nobody else had the time or the patience to do it properly",
        "during the annual festival, which attracted visitors from all over the country",
        "and then, to everyone's surprise, decided to start all over again from the very beginning",
        "with a level of attention to detail that impressed even the most sceptical observers in the room",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |k: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % k as u64) as usize
    };
    (0..n)
        .map(|_| {
            let mut s = format!(
                "{} {} {}",
                SUBJECTS[next(SUBJECTS.len())],
                VERBS[next(VERBS.len())],
                OBJECTS[next(OBJECTS.len())]
            );
            for _ in 0..next(3) {
                s.push(' ');
                s.push_str(TAILS[next(TAILS.len())]);
            }
            s.push('.');
            s
        })
        .collect()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// The largest absolute difference between two sets of embeddings.
fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

fn fmt_times(xs: &[f64]) -> String {
    let v: Vec<String> = xs.iter().map(|t| format!("{t:.3}")).collect();
    v.join(" ")
}

/// The PyTorch side: `scripts/bench_embed_torch.py` as a child process that embeds the
/// sentences once per `run` command.
struct TorchSide {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_path: PathBuf,
}

impl TorchSide {
    fn spawn(python: &str, args: &[&OsStr], stderr_path: PathBuf) -> Result<(Self, Value)> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_embed_torch.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("running {python} {}", script.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut side = Self {
            child,
            stdin,
            stdout,
            stderr_path,
        };
        let ready = side.read_reply().with_context(|| {
            format!(
                "{python} {} did not start (pass --python with torch + sentence-transformers, or --no-torch)",
                script.display()
            )
        })?;
        Ok((side, ready))
    }

    fn read_reply(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            bail!("the torch script exited ({status}):\n{err}")
        }
        Ok(serde_json::from_str(&line)?)
    }

    fn command(&mut self, cmd: &str) -> Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.read_reply()
    }
}

fn main() -> Result<()> {
    let mut model_dir: Option<PathBuf> = None;
    let mut device = "cpu".to_string();
    let mut python = std::env::var("CANDLE_MHA_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let (mut n, mut batch_size, mut repeat, mut torch) = (256usize, 32usize, 5usize, true);
    let mut ort = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--model-dir" => model_dir = Some(value()?.into()),
            "--device" => device = value()?,
            "--python" => python = value()?,
            "--sentences" => n = value()?.parse()?,
            "--batch-size" => batch_size = value()?.parse()?,
            "--repeat" => repeat = value()?.parse()?,
            "--no-torch" => torch = false,
            "--no-ort" => ort = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if n == 0 || batch_size == 0 || repeat == 0 {
        bail!("--sentences, --batch-size and --repeat must be positive")
    }
    let dir = find_minilm_dir(model_dir.as_deref())?;
    let dev = device::parse_device(&device)?;
    let texts = sentences(n);
    let threads = candle_core::utils::get_num_threads();

    let model = MiniLm::load(&dir, &dev)?;
    let lens: Vec<usize> = model.tokenize(&texts)?.iter().map(Vec::len).collect();
    println!(
        "all-MiniLM-L6-v2, {n} sentences ({}..{} tokens, {} in all), batch {batch_size}, {device}, {threads} threads",
        lens.iter().min().unwrap(),
        lens.iter().max().unwrap(),
        lens.iter().sum::<usize>()
    );
    let mut emb = model.embed(&texts, batch_size, |_| {})?; // warm-up
    let mut emb_packed = model.embed_packed(&texts, batch_size)?;

    let tmp = std::env::temp_dir().join(format!("candle-mha-bench-{}", std::process::id()));
    let mut torch_side = None;
    if torch {
        std::fs::create_dir_all(&tmp)?;
        let sentences_path = tmp.join("sentences.txt");
        std::fs::write(&sentences_path, texts.join("\n") + "\n")?;
        let (bs, th) = (batch_size.to_string(), threads.to_string());
        let py_device = if dev.is_cpu() { "cpu" } else { "cuda" };
        let ort_dir = tmp.join("onnx");
        let mut args: Vec<&OsStr> = vec![
            "--model-dir".as_ref(),
            dir.as_os_str(),
            "--sentences".as_ref(),
            sentences_path.as_os_str(),
            "--batch-size".as_ref(),
            bs.as_ref(),
            "--threads".as_ref(),
            th.as_ref(),
            "--device".as_ref(),
            py_device.as_ref(),
        ];
        if ort && dev.is_cpu() {
            args.extend(["--ort".as_ref(), ort_dir.as_os_str()]);
        }
        torch_side = Some(TorchSide::spawn(&python, &args, tmp.join("stderr.txt"))?);
    }

    // Interleave the timed passes so that both sides see the same machine load.
    let (mut candle_times, mut packed_times, mut torch_times) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut ort_plain, mut ort_opt) = (Vec::new(), Vec::new());
    let with_ort = torch_side
        .as_ref()
        .is_some_and(|(_, info)| info.get("onnxruntime").is_some());
    for _ in 0..repeat {
        let t0 = Instant::now();
        emb = model.embed(&texts, batch_size, |_| {})?;
        dev.synchronize()?;
        candle_times.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        emb_packed = model.embed_packed(&texts, batch_size)?;
        dev.synchronize()?;
        packed_times.push(t0.elapsed().as_secs_f64());
        if let Some((side, _)) = torch_side.as_mut() {
            let r = side.command("run")?;
            torch_times.push(r["time_s"].as_f64().context("time_s")?);
            if with_ort {
                let r = side.command("run_ort")?;
                ort_plain.push(r["plain_s"].as_f64().context("plain_s")?);
                ort_opt.push(r["optimized_s"].as_f64().context("optimized_s")?);
            }
        }
    }
    let (candle_s, candle_best) = (median(&candle_times), min(&candle_times));
    let (packed_s, packed_best) = (median(&packed_times), min(&packed_times));
    println!(
        "candle-mha padded: median {candle_s:.3} s, best {candle_best:.3} s ({:.2} ms/sentence)  runs: {}",
        1e3 * candle_best / n as f64,
        fmt_times(&candle_times)
    );
    println!(
        "candle-mha packed: median {packed_s:.3} s, best {packed_best:.3} s ({:.2} ms/sentence)  runs: {}",
        1e3 * packed_best / n as f64,
        fmt_times(&packed_times)
    );
    let verdict = |c: f64, t: f64| {
        if c <= t {
            format!("{:.2}x faster", t / c)
        } else {
            format!("{:.2}x slower", c / t)
        }
    };
    println!(
        "ratio packed / padded: median {:.2} (packed {})",
        packed_s / candle_s,
        verdict(packed_s, candle_s)
    );
    let packed_diff = max_abs_diff(&emb, &emb_packed);
    println!("max |packed - padded| over all embeddings: {packed_diff:.2e}");
    let Some((mut side, info)) = torch_side else {
        return Ok(());
    };
    let (torch_s, torch_best) = (median(&torch_times), min(&torch_times));
    println!(
        "PyTorch:     median {torch_s:.3} s, best {torch_best:.3} s ({:.2} ms/sentence)  runs: {}  (torch {}, sentence-transformers {}, attention {}, {} threads)",
        1e3 * torch_best / n as f64,
        fmt_times(&torch_times),
        info["torch"].as_str().unwrap_or("?"),
        info["sentence_transformers"].as_str().unwrap_or("?"),
        info["attn_implementation"].as_str().unwrap_or("?"),
        info["threads"]
    );
    for (what, best, med) in [
        ("padded", candle_best, candle_s),
        ("packed", packed_best, packed_s),
    ] {
        println!(
            "ratio candle-mha {what} / PyTorch: best-of-{repeat} {:.2} ({}), median {:.2} ({})",
            best / torch_best,
            verdict(best, torch_best),
            med / torch_s,
            verdict(med, torch_s)
        );
    }
    if with_ort {
        let (plain, opt) = (median(&ort_plain), median(&ort_opt));
        println!(
            "ONNX Runtime {}: plain median {plain:.3} s (runs {}), optimized median {opt:.3} s (runs {})",
            info["onnxruntime"].as_str().unwrap_or("?"),
            fmt_times(&ort_plain),
            fmt_times(&ort_opt)
        );
        let best = plain.min(opt);
        for (what, med) in [("padded", candle_s), ("packed", packed_s)] {
            println!(
                "ratio candle-mha {what} / ONNX Runtime (faster of the two): median {:.2} ({})",
                med / best,
                verdict(med, best)
            );
        }
        let npy = tmp.join("ort.npy");
        side.command(&format!("save_ort {}", npy.display()))?;
        let theirs = Tensor::read_npy(&npy)?.to_vec2::<f32>()?;
        let diff = max_abs_diff(&emb, &theirs);
        println!("max |candle-mha - ONNX Runtime optimized| over all embeddings: {diff:.2e}");
    }
    let npy = tmp.join("torch.npy");
    side.command(&format!("save {}", npy.display()))?;
    drop(side.stdin);
    side.child.wait()?;
    let theirs = Tensor::read_npy(&npy)?.to_vec2::<f32>()?;
    let diff = max_abs_diff(&emb, &theirs);
    println!("max |candle-mha - PyTorch| over all embeddings: {diff:.2e}");
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}
