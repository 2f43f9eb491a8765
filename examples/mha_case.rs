//! Conformance runner: checks candle-mha against PyTorch `mha-case` files.
//!
//! ```text
//! cargo run --release --example mha_case -- [--device cpu|cuda|cuda:N] [--grad] [--backend auto|reference|cpu-fused|cuda-fused] FILE_OR_DIR...
//! ```
//!
//! `--grad` also checks the gradient cases (`grad_output`, `expected_grad.*`) through backward.
//! Files with `case_kind=sdpa` or `case_kind=varlen` metadata test the attention core alone
//! through `candle_mha::sdpa` / `candle_mha::sdpa_varlen` (same `--device` and `--backend`).
//!
//! Prints one line per case (name, PASS/FAIL, max abs error per output) and ends with
//! `N passed, M failed`; exits non-zero when anything failed or could not be read.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_mha::case::{run_case, RunOptions};

#[path = "common/device.rs"]
mod device;
use device::parse_device;

fn usage() -> ExitCode {
    eprintln!("usage: mha_case [--device cpu|cuda|cuda:N] [--grad] [--backend auto|reference|cpu-fused|cuda-fused] FILE_OR_DIR...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut device = "cpu".to_string();
    let mut grad = false;
    let mut backend = candle_mha::Backend::Auto;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => match args.next() {
                Some(d) => device = d,
                None => return usage(),
            },
            "--grad" => grad = true,
            "--backend" => {
                backend = match args.next().as_deref() {
                    Some("auto") => candle_mha::Backend::Auto,
                    Some("reference") => candle_mha::Backend::Reference,
                    Some("cpu-fused") => candle_mha::Backend::CpuFused,
                    Some("cuda-fused") => candle_mha::Backend::CudaFused,
                    _ => return usage(),
                }
            }
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            s if s.starts_with("--device=") => device = s["--device=".len()..].to_string(),
            s if s.starts_with("--") => {
                eprintln!("unknown option {s}");
                return usage();
            }
            _ => paths.push(PathBuf::from(a)),
        }
    }
    if paths.is_empty() {
        return usage();
    }
    let device = match parse_device(&device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(&p)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            inner.retain(|f| f.extension().is_some_and(|x| x == "safetensors"));
            inner.sort();
            files.extend(inner);
        } else {
            files.push(p);
        }
    }
    let opts = RunOptions::new(device)
        .with_grad(grad)
        .with_backend(backend);
    let (mut passed, mut failed) = (0, 0);
    for f in &files {
        let report = run_case(f, &opts);
        println!("{report}");
        if report.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || files.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
