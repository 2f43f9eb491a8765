//! Training speed of the attention core: forward + backward of causal attention on the fused
//! CPU kernel (fused backward) against PyTorch's `F.scaled_dot_product_attention` forward +
//! backward, in one run on this machine, alternating, plus peak memory.
//!
//! ```text
//! cargo run --release --example bench_backward -- --python /path/to/python-with-torch
//! cargo run --release --example bench_backward -- --no-torch --rounds 2
//! ```
//!
//! Configs: B = 1, causal (top-left), H = 12, D = 64, L ∈ {2048, 8192}, f32 and bf16 (`--only
//! L` keeps one length). Each round times one candle training step (the loss `sum(out · g)`,
//! `backward()`, candle's gradient bookkeeping included) and the two fused kernels alone (the
//! forward, then the backward given `g`, called directly: what PyTorch's `out.backward(g)` runs),
//! then asks the PyTorch child
//! (`scripts/bench_backward_torch.py`, `torch.set_num_threads` = candle's threads) for one, so
//! that both see the same machine; medians over `--rounds` (default 3). At L = 2048 the
//! reference path (candle op-by-op autograd, `(B, H, L, S)` tensors) is timed too. Peak memory:
//! each side runs one fwd+bwd in a fresh process (`--peak-worker`) and reports its RSS
//! high-water mark above its RSS before the call (inputs and their gradients included).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{CausalAlignment, MaskDims, MaskPlan};
use candle_mha::Backend;
use serde_json::{json, Value};

const USAGE: &str =
    "usage: bench_backward [--python PY] [--no-torch] [--no-reference] [--rounds N] [--only L]";
const H: usize = 12;
const D: usize = 64;

fn status_bytes(key: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key}"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context(key.to_string())?
        .parse()?;
    Ok(kb * 1024)
}

struct Inputs {
    q: Var,
    k: Var,
    v: Var,
    g: Tensor,
    plan: MaskPlan,
}

fn inputs(l: usize, dtype: DType) -> Result<Inputs> {
    let dev = Device::Cpu;
    let mk = || -> Result<Var> {
        Ok(Var::from_tensor(
            &Tensor::randn(0f32, 1., (1, l, H, D), &dev)?.to_dtype(dtype)?,
        )?)
    };
    Ok(Inputs {
        q: mk()?,
        k: mk()?,
        v: mk()?,
        g: Tensor::randn(0f32, 1., (1, l, H, D), &dev)?.to_dtype(dtype)?,
        plan: MaskPlan::new(MaskDims::new(1, H, l, l)).with_causal(CausalAlignment::TopLeft)?,
    })
}

/// One forward + backward; returns the kernel that ran.
fn step(x: &Inputs, backend: Backend) -> Result<&'static str> {
    let mut p = AttnParams::new(D);
    p.backend = backend;
    let out = attention(
        x.q.as_tensor(),
        x.k.as_tensor(),
        x.v.as_tensor(),
        &x.plan,
        &p,
    )?;
    let loss = (out.output * &x.g)?.sum_all()?;
    let grads = loss.backward()?;
    if grads.get(x.q.as_tensor()).is_none() {
        bail!("no gradient for q")
    }
    Ok(out.kernel.as_str())
}

/// The two kernels alone: the fused forward and the fused backward against `g`, called
/// directly (no loss, none of candle's gradient bookkeeping), as PyTorch's side runs
/// `out.backward(g)`.
fn kernels(x: &Inputs) -> Result<()> {
    let mut p = AttnParams::new(D);
    p.backend = Backend::CpuFused;
    let [_, dq, ..] = candle_mha::kernels::test_support::fused_forward_backward(
        x.q.as_tensor(),
        x.k.as_tensor(),
        x.v.as_tensor(),
        &x.plan,
        &p,
        &x.g,
    )?;
    if dq.dims() != x.q.dims() {
        bail!("dq has the wrong shape {:?}", dq.dims())
    }
    Ok(())
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    fn spawn(python: &str, threads: usize) -> Result<(Self, Value)> {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_backward_torch.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {python} {}", script.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut t = Self {
            child,
            stdin,
            stdout,
        };
        let ready = t.read()?;
        Ok((t, ready))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the torch script exited ({})", self.child.wait()?)
        }
        Ok(serde_json::from_str(&line)?)
    }

    fn run(&mut self, req: &Value) -> Result<f64> {
        writeln!(self.stdin, "{req}")?;
        self.stdin.flush()?;
        let r = self.read()?;
        if let Some(e) = r.get("error") {
            bail!("torch: {e}")
        }
        r["times"][0].as_f64().context("times")
    }
}

fn dtype_of(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("dtype {other}"),
    })
}

/// `--peak-worker L DTYPE`: one fwd+bwd in this fresh process; prints the peak above baseline.
fn peak_worker(l: usize, dtype: &str) -> Result<()> {
    let x = inputs(l, dtype_of(dtype)?)?;
    let base = status_bytes("VmRSS:")?;
    step(&x, Backend::Auto)?;
    let peak = status_bytes("VmHWM:")?;
    println!(
        "{}",
        json!({"peak_rss_bytes": peak, "baseline_rss_bytes": base})
    );
    Ok(())
}

fn peak_ours(l: usize, dtype: &str) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["--peak-worker", &l.to_string(), dtype])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    Ok((v["peak_rss_bytes"].as_f64().unwrap_or(0.0)
        - v["baseline_rss_bytes"].as_f64().unwrap_or(0.0))
        / 1048576.0)
}

fn peak_torch(python: &str, threads: usize, req: &Value) -> Result<f64> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_backward_torch.py");
    let out = Command::new(python)
        .arg(&script)
        .args([
            "--threads",
            &threads.to_string(),
            "--peak",
            &req.to_string(),
        ])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    Ok((v["peak_rss_bytes"].as_f64().unwrap_or(0.0)
        - v["baseline_rss_bytes"].as_f64().unwrap_or(0.0))
        / 1048576.0)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut python = std::env::var("CANDLE_MHA_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let (mut torch, mut rounds, mut only) = (true, 3usize, None::<usize>);
    let mut with_reference = true;
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--peak-worker" => {
                let l: usize = value()?.parse()?;
                return peak_worker(l, &value()?);
            }
            "--python" => python = value()?,
            "--no-torch" => torch = false,
            "--no-reference" => with_reference = false,
            "--rounds" => rounds = value()?.parse()?,
            "--only" => only = Some(value()?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let threads = candle_core::utils::get_num_threads();
    let mut side = if torch {
        let (t, info) = Torch::spawn(&python, threads)?;
        println!(
            "PyTorch {} ({} threads)",
            info["torch"].as_str().unwrap_or("?"),
            info["threads"]
        );
        Some(t)
    } else {
        None
    };
    println!("candle-mha: {threads} threads; causal B1 H{H} D{D}; forward + backward; medians of {rounds} rounds");
    println!(
        "(fused: one candle training step, the loss sum(out · g) and candle's gradient bookkeeping \
         included; kernels: the fused forward and backward alone, given g, as torch runs out.backward(g))"
    );
    println!(
        "{:<6} {:<5} {:>11} {:>11} {:>8} {:>11} {:>8} {:>11} {:>10} {:>10}",
        "L",
        "dtype",
        "fused",
        "torch",
        "speedup",
        "kernels",
        "speedup",
        "reference",
        "peak MiB",
        "torch MiB"
    );
    for l in [2048usize, 8192] {
        if only.is_some_and(|o| o != l) {
            continue;
        }
        for dt in ["f32", "bf16"] {
            let x = inputs(l, dtype_of(dt)?)?;
            let kernel = step(&x, Backend::Auto)?; // warm-up
            if kernel != "cpu" {
                bail!("the fused kernel did not serve the call ({kernel})")
            }
            let req = json!({"l": l, "h": H, "d": D, "dtype": dt, "reps": 1});
            if let Some(t) = side.as_mut() {
                t.run(&req)?; // warm-up
            }
            kernels(&x)?; // warm-up
            let (mut ours, mut theirs, mut reference) = (vec![], vec![], vec![]);
            let mut bare = vec![];
            for _ in 0..rounds {
                let t0 = Instant::now();
                step(&x, Backend::Auto)?;
                ours.push(t0.elapsed().as_secs_f64());
                let t0 = Instant::now();
                kernels(&x)?;
                bare.push(t0.elapsed().as_secs_f64());
                if let Some(t) = side.as_mut() {
                    theirs.push(t.run(&req)?);
                }
                if with_reference && l <= 2048 {
                    let t0 = Instant::now();
                    step(&x, Backend::Reference)?;
                    reference.push(t0.elapsed().as_secs_f64());
                }
            }
            drop(x);
            let fmt = |v: &[f64]| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1} ms", 1e3 * median(v))
                }
            };
            let ratio = |ours: &[f64]| {
                if theirs.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.2}x", median(&theirs) / median(ours))
                }
            };
            let (speedup, speedup_bare) = (ratio(&ours), ratio(&bare));
            let peak = peak_ours(l, dt)?;
            let tpeak = if torch {
                format!("{:.0}", peak_torch(&python, threads, &req)?)
            } else {
                "-".into()
            };
            println!(
                "{l:<6} {dt:<5} {:>11} {:>11} {speedup:>8} {:>11} {speedup_bare:>8} {:>11} {peak:>10.0} {tpeak:>10}",
                fmt(&ours),
                fmt(&theirs),
                fmt(&bare),
                fmt(&reference)
            );
        }
    }
    Ok(())
}
