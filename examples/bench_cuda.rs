//! The fused CUDA kernel against candle's matmul + softmax path (our reference kernel on CUDA),
//! on one GPU: the issue's bench table. `scripts/gpu-check.sh` runs it beside
//! `scripts/bench_cuda_torch.py` (PyTorch's flash, efficient and cuDNN SDPA backends) and merges
//! both into one table with `scripts/bench_cuda_table.py`.
//!
//! ```text
//! cargo run --release --features cuda --example bench_cuda -- [--device cuda:0] [--json OUT]
//! ```
//!
//! Configs (bf16 and f16 each): causal B=1 L=4096 H=32 D=128; causal B=1 L=16384 H=16 D=128;
//! B=4 L=512 H=12 D=64 with key padding (lengths 512, 384, 256, 128); decode B=8 L=1 S=4096
//! H=32 Hkv=8 D=128. Each timing: 3 warm-up calls, then the median of 7 runs of `reps` calls
//! (device synchronised around each run), on random inputs. Reports milliseconds, TFLOP/s
//! (causal: half the `4·B·H·L·S·D` of a full score matrix) and, for decode, GB/s of K/V read.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_mha::kernels::{attention, AttnParams};
use candle_mha::mask::{CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};
use candle_mha::Backend;

/// One bench configuration.
struct Config {
    name: &'static str,
    b: usize,
    l: usize,
    s: usize,
    h: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    lengths: Option<Vec<usize>>,
}

fn configs() -> Vec<Config> {
    vec![
        Config {
            name: "causal B1 L4096 H32 D128",
            b: 1,
            l: 4096,
            s: 4096,
            h: 32,
            hkv: 32,
            d: 128,
            causal: true,
            lengths: None,
        },
        Config {
            name: "causal B1 L16384 H16 D128",
            b: 1,
            l: 16384,
            s: 16384,
            h: 16,
            hkv: 16,
            d: 128,
            causal: true,
            lengths: None,
        },
        Config {
            name: "padded B4 L512 H12 D64",
            b: 4,
            l: 512,
            s: 512,
            h: 12,
            hkv: 12,
            d: 64,
            causal: false,
            lengths: Some(vec![512, 384, 256, 128]),
        },
        Config {
            name: "decode B8 S4096 H32/8 D128",
            b: 8,
            l: 1,
            s: 4096,
            h: 32,
            hkv: 8,
            d: 128,
            causal: true,
            lengths: None,
        },
    ]
}

fn time_ms(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut runs = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        dev.synchronize()?;
        runs.push(t.elapsed().as_secs_f64() * 1e3 / reps as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[runs.len() / 2])
}

fn main() -> Result<()> {
    let mut device = "cuda:0".to_string();
    let mut json: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => device = args.next().context("--device needs a value")?,
            "--json" => json = Some(args.next().context("--json needs a path")?),
            "--bench" => {}
            "--help" | "-h" => {
                println!("usage: bench_cuda [--device cuda:N] [--json OUT]");
                return Ok(());
            }
            other => bail!("unknown option {other}: --device cuda:N --json OUT"),
        }
    }
    let dev = candle_mha::kernels::test_support::parse_device(&device)?;
    if !dev.is_cuda() {
        bail!("bench_cuda needs a CUDA device, got {device}");
    }
    let mut out: Box<dyn Write> = match &json {
        Some(p) => Box::new(std::fs::File::create(p)?),
        None => Box::new(std::io::sink()),
    };
    println!("| config | dtype | impl | ms | TFLOP/s | GB/s |");
    println!("|---|---|---|---|---|---|");
    for c in configs() {
        for dtype in [DType::BF16, DType::F16] {
            let q = Tensor::randn(0f32, 1.0, (c.b, c.l, c.h, c.d), &dev)?.to_dtype(dtype)?;
            let k = Tensor::randn(0f32, 1.0, (c.b, c.s, c.hkv, c.d), &dev)?.to_dtype(dtype)?;
            let v = Tensor::randn(0f32, 1.0, (c.b, c.s, c.hkv, c.d), &dev)?.to_dtype(dtype)?;
            let mut plan = MaskPlan::new(MaskDims::new(c.b, c.h, c.l, c.s));
            if c.causal {
                plan = plan.with_causal(CausalAlignment::BottomRight)?;
            }
            if let Some(lens) = &c.lengths {
                plan =
                    plan.with_key_padding(&KeyPaddingMask::from_lengths(lens), DType::F32, &dev)?;
            }
            let full = 4.0 * (c.b * c.h * c.l * c.s * c.d) as f64;
            let flops = if c.causal && c.l > 1 {
                full / 2.0
            } else {
                full
            };
            let kv_bytes = 2.0 * (c.b * c.s * c.hkv * c.d * dtype.size_in_bytes()) as f64;
            for (name, backend) in [
                ("candle-mha", Backend::CudaFused),
                ("candle matmul+softmax", Backend::Reference),
            ] {
                let mut p = AttnParams::new(c.d);
                p.backend = backend;
                let reps = if c.l == 1 { 50 } else { 3 };
                let run = || -> Result<()> {
                    attention(&q, &k, &v, &plan, &p)?;
                    Ok(())
                };
                let line = match time_ms(&dev, reps, run) {
                    Ok(ms) => {
                        let tflops = flops / (ms * 1e-3) / 1e12;
                        let gbps = kv_bytes / (ms * 1e-3) / 1e9;
                        println!(
                            "| {} | {dtype:?} | {name} | {ms:.3} | {tflops:.1} | {gbps:.0} |",
                            c.name
                        );
                        serde_json::json!({"config": c.name, "dtype": format!("{dtype:?}").to_lowercase(), "impl": name, "ms": ms, "tflops": tflops, "gbps": gbps})
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        println!(
                            "| {} | {dtype:?} | {name} | failed: {} | | |",
                            c.name,
                            msg.lines().next().unwrap_or("")
                        );
                        serde_json::json!({"config": c.name, "dtype": format!("{dtype:?}").to_lowercase(), "impl": name, "error": msg})
                    }
                };
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(())
}
