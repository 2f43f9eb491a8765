//! The projection GEMM (`y = x · wᵀ + b`) against the machine's limit, candle's matmul and
//! PyTorch's `F.linear`, in one session.
//!
//! ```text
//! cargo run --release --example bench_gemm -- --python /root/.venv-torch/bin/python
//! ```
//!
//! First the peak probe: a register-only loop of each product instruction this CPU has
//! (AVX-512 f32 FMA, AVX512-BF16 `vdpbf16ps`, AVX2 f32 FMA), on one thread and on rayon's
//! threads at once, measured at the start and again at the end of the run (turbo moves it); the
//! higher of the two is the limit. Then, per dtype and shape, rounds that alternate: ours with
//! the weight packed once (as the module's projections keep it), ours packing the weight per
//! call, candle's `Linear::forward`, and PyTorch (`scripts/bench_attention_torch.py`, kind
//! `linear`, the same thread count). Every rate is the median over all rounds, also printed as a
//! share of the limit of the instruction the kernel uses (bf16: the better of `vdpbf16ps` and
//! the f32 FMA, which is what the kernel is chosen by).
//!
//! Options: `--python PY` (default `$CANDLE_MHA_BENCH_PYTHON` or `python3`), `--no-torch`,
//! `--rounds N` (default 3), `--dtype f32,bf16,f16` (a comma list), `--only SUBSTR` (shapes whose
//! name contains it), `--isa avx512bf16|avx512|avx2` (the projections' GEMM kernels of that instruction set; with
//! `avx2` PyTorch is held to AVX2 too), `--no-candle`.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_mha::kernels::test_support::{self as ts, peak_gflops, PackedLinear, PeakKind};
use candle_nn::Linear;
use serde_json::json;

#[path = "common/timing.rs"]
mod timing;
use timing::{median, time_it};

#[path = "common/torch.rs"]
mod torch;
use torch::Torch;

/// One GEMM shape: `x` is `m × k`, `w` is `n × k`.
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
}

const SHAPES: [Shape; 6] = [
    Shape {
        name: "4096^3",
        m: 4096,
        n: 4096,
        k: 4096,
    },
    Shape {
        name: "BERT-base 1024x768x768",
        m: 1024,
        n: 768,
        k: 768,
    },
    Shape {
        name: "MiniLM 1700x384x384",
        m: 1700,
        n: 384,
        k: 384,
    },
    Shape {
        name: "MiniLM FFN-in 1700x1536x384",
        m: 1700,
        n: 1536,
        k: 384,
    },
    Shape {
        name: "MiniLM FFN-out 1700x384x1536",
        m: 1700,
        n: 384,
        k: 1536,
    },
    Shape {
        name: "decode 8x4096x4096",
        m: 8,
        n: 4096,
        k: 4096,
    },
];

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// The CPU's model name (`/proc/cpuinfo`).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `(family, model)` from `/proc/cpuinfo`.
fn cpu_family_model() -> String {
    let s = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    format!("family {} model {}", field("cpu family"), field("model"))
}

/// Peak rates of every kind (1 thread, all threads), in GFLOP/s.
fn probe(threads: usize) -> Vec<(PeakKind, f64, f64)> {
    PeakKind::ALL
        .iter()
        .filter_map(|&k| {
            let one = peak_gflops(k, 1, 150)?;
            let all = peak_gflops(k, threads, 150)?;
            Some((k, one, all))
        })
        .collect()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut python =
        std::env::var("CANDLE_MHA_BENCH_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let (mut no_torch, mut no_candle, mut rounds, mut only, mut isa) =
        (false, false, 3usize, None::<String>, None::<String>);
    let mut dtypes = vec![DType::F32, DType::BF16, DType::F16];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--python" => python = args.next().unwrap_or_default(),
            "--no-torch" => no_torch = true,
            "--no-candle" => no_candle = true,
            "--rounds" => rounds = args.next().unwrap_or_default().parse()?,
            "--only" => only = args.next(),
            "--isa" => isa = args.next(),
            "--dtype" => {
                dtypes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|d| match d {
                        "f32" => Ok(DType::F32),
                        "bf16" => Ok(DType::BF16),
                        "f16" => Ok(DType::F16),
                        other => bail!("unknown dtype {other:?} (f32, bf16, f16)"),
                    })
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                println!(
                    "usage: bench_gemm [--python PY] [--no-torch] [--no-candle] [--rounds N] \
                     [--dtype f32,bf16,f16] [--only SUBSTR] [--isa avx512bf16|avx512|avx2]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if let Some(name) = &isa {
        ts::force_gemm_isa(Some(name)).map_err(anyhow::Error::msg)?;
    }
    let threads = rayon::current_num_threads();
    let (l1, l2) = ts::cache_sizes();
    println!(
        "CPU: {} ({}), {threads} threads; L1d {} KiB, L2 {} KiB; instruction set {}",
        cpu_model(),
        cpu_family_model(),
        l1 >> 10,
        l2 >> 10,
        ts::gemm_isa()
    );
    let peaks_start = probe(threads);

    let torch_env: &[(&str, &str)] = if isa.as_deref() == Some("avx2") {
        &[
            ("ATEN_CPU_CAPABILITY", "avx2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ]
    } else {
        &[]
    };
    let mut torch = if no_torch {
        None
    } else {
        let (t, hello) = Torch::spawn(&python, threads, torch_env)?;
        println!("PyTorch: {hello}");
        Some(t)
    };

    let dev = Device::Cpu;
    let mut rows = vec![];
    for &dtype in &dtypes {
        println!(
            "{}: packed kernel {:?} (from {} rows), few-row kernel {:?}",
            dtype_name(dtype),
            ts::packed_gemm_kernel(dtype),
            ts::packed_min_rows(),
            ts::proj_gemm_kernel(dtype)
        );
        for s in SHAPES
            .iter()
            .filter(|s| only.as_ref().is_none_or(|o| s.name.contains(o.as_str())))
        {
            let flops = 2.0 * (s.m * s.n * s.k) as f64;
            // About 0.15 s per measurement at 150 GFLOP/s.
            let reps = ((0.15 * 150e9 / flops) as usize).clamp(1, 200);
            let x = Tensor::randn(0f32, 1., (s.m, s.k), &dev)?.to_dtype(dtype)?;
            let w = (Tensor::randn(0f32, 1., (s.n, s.k), &dev)? * 0.05)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1., s.n, &dev)?.to_dtype(dtype)?;
            let lin = Linear::new(w, Some(b));
            let packed = PackedLinear::new(lin.clone());
            // candle's bf16/f16 matmul is single-threaded: one rep at the big shapes.
            let candle_reps = if dtype == DType::F32 {
                reps
            } else {
                reps.div_ceil(8)
            };
            let (mut ours, mut per_call, mut cand, mut pt) = (vec![], vec![], vec![], vec![]);
            for _ in 0..rounds {
                ours.extend(time_it(reps, || {
                    packed.forward(&x).map(drop).map_err(Into::into)
                })?);
                per_call.extend(time_it(reps, || {
                    ts::linear(&lin, &x).map(drop).map_err(Into::into)
                })?);
                if !no_candle {
                    cand.extend(time_it(candle_reps, || {
                        lin.forward(&x).map(drop).map_err(Into::into)
                    })?);
                }
                if let Some(t) = torch.as_mut() {
                    let req = json!({"kind": "linear", "m": s.m, "n": s.n, "k": s.k,
                                     "dtype": dtype_name(dtype), "reps": reps});
                    pt.extend(t.times(&req)?);
                }
            }
            let rate = |v: Vec<f64>| flops / median(v) / 1e9;
            rows.push((
                dtype,
                s.name,
                rate(ours),
                rate(per_call),
                rate(cand),
                rate(pt),
            ));
        }
    }
    let peaks_end = probe(threads);

    println!("\n## Peak probe (GFLOP/s; start / end of the run)\n");
    println!("| instruction | 1 thread | {threads} threads |");
    println!("|---|---|---|");
    let best = |k: PeakKind| -> Option<f64> {
        let f = |v: &Vec<(PeakKind, f64, f64)>| v.iter().find(|p| p.0 == k).map(|p| p.2);
        Some(f(&peaks_start)?.max(f(&peaks_end)?))
    };
    for (i, &(k, one, all)) in peaks_start.iter().enumerate() {
        let (_, one2, all2) = peaks_end[i];
        println!(
            "| {} | {one:.0} / {one2:.0} | {all:.0} / {all2:.0} |",
            k.name()
        );
    }
    let avx512 = matches!(ts::gemm_isa(), "avx512bf16" | "avx512");
    let fma = if avx512 {
        best(PeakKind::Avx512Fma)
    } else {
        best(PeakKind::Avx2Fma)
    };
    let dot = if ts::gemm_isa() == "avx512bf16" {
        best(PeakKind::Avx512Bf16Dot)
    } else {
        None
    };

    println!("\n## GEMM y = x·wᵀ + b (GFLOP/s, share of the limit; medians of {rounds} alternating rounds)\n");
    println!("| dtype | shape | ours, packed once | ours, packed per call | candle Linear | PyTorch F.linear | ours / PyTorch |");
    println!("|---|---|---|---|---|---|---|");
    for (dtype, name, ours, per_call, cand, pt) in rows {
        let limit = match dtype {
            DType::BF16 => match (fma, dot) {
                (Some(f), Some(d)) => Some(f.max(d)),
                (f, d) => f.or(d),
            },
            _ => fma,
        };
        let share = |r: f64| match limit {
            Some(l) if r.is_finite() => format!("{r:.0} ({:.0}%)", 100.0 * r / l),
            _ => format!("{r:.0}"),
        };
        println!(
            "| {} | {name} | {} | {} | {} | {} | {:.2}× |",
            dtype_name(dtype),
            share(ours),
            share(per_call),
            share(cand),
            share(pt),
            ours / pt
        );
    }
    Ok(())
}
