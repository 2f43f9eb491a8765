//! The attention-core (`case_kind=sdpa`) and packed (`case_kind=varlen`) PyTorch cases of
//! `tests/cases/`, written by `scripts/gen_core_cases.py`, through the conformance runner with
//! every backend; the case set's coverage; and that the committed files come from the committed
//! script.

use std::path::{Path, PathBuf};

use candle_mha::case::{run_case, test_device, Case, CaseKind, RunOptions};
use candle_mha::Backend;
use sha2::{Digest, Sha256};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn core_files() -> Vec<PathBuf> {
    let dir = root().join("tests/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            (name.starts_with("sdpa_") || name.starts_with("varlen_"))
                && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files
}

fn load_all() -> Vec<Case> {
    core_files()
        .iter()
        .map(|f| Case::load(f).unwrap())
        .collect()
}

#[test]
fn every_core_case_passes_with_every_backend() {
    let files = core_files();
    assert!(
        files.len() >= 50,
        "expected the full core case set, found {}",
        files.len()
    );
    let mut failed = vec![];
    for backend in [Backend::Auto, Backend::Reference, Backend::CpuFused] {
        let opts = RunOptions::new(test_device().unwrap())
            .with_grad(false)
            .with_backend(backend);
        for f in &files {
            let r = run_case(f, &opts);
            let case = Case::load(f).unwrap();
            let is_f64 = case.meta.get("dtype").map(String::as_str) == Some("float64");
            if backend == Backend::CpuFused && is_f64 && opts.device.is_cpu() {
                // The fused kernel has no f64 path: forcing it is an error naming the reason.
                let e = r.error.clone().unwrap_or_default();
                assert!(
                    e.contains("F64"),
                    "{}: expected the f64 refusal, got {r}",
                    r.name
                );
                continue;
            }
            println!("{backend:?} {r}");
            if !r.passed() {
                failed.push(format!("{backend:?} {r}"));
            }
        }
    }
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}

#[test]
fn core_case_set_covers_every_option() {
    let cases = load_all();
    let meta = |c: &Case, k: &str, v: &str| c.meta.get(k).map(|s| s.as_str()) == Some(v);
    let has_meta = |c: &Case, k: &str| c.meta.contains_key(k);
    let rank = |c: &Case, t: &str| c.tensors.get(t).map(|t| t.rank());
    let sdpa = |c: &Case| c.kind().unwrap() == CaseKind::Sdpa;
    let varlen = |c: &Case| c.kind().unwrap() == CaseKind::Varlen;
    let count = |pred: &dyn Fn(&Case) -> bool| cases.iter().filter(|c| pred(c)).count();
    let lens = |c: &Case, t: &str| -> Vec<i32> {
        let cu = c.tensors[t].to_vec1::<i32>().unwrap();
        cu.windows(2).map(|w| w[1] - w[0]).collect()
    };
    let modifier = |c: &Case, m: &str| {
        c.meta
            .get("score_modifiers")
            .is_some_and(|l| l.split(',').any(|x| x == m))
    };
    let half = |c: &Case| meta(c, "dtype", "float16") || meta(c, "dtype", "bfloat16");
    let checks: Vec<(&str, usize)> = vec![
        ("sdpa", count(&sdpa)),
        ("varlen", count(&varlen)),
        (
            "sdpa softcap",
            count(&|c| sdpa(c) && modifier(c, "softcap")),
        ),
        (
            "varlen softcap",
            count(&|c| varlen(c) && modifier(c, "softcap")),
        ),
        (
            "sdpa alibi (H,)",
            count(&|c| sdpa(c) && rank(c, "alibi_slopes") == Some(1)),
        ),
        (
            "sdpa alibi (B, H)",
            count(&|c| sdpa(c) && rank(c, "alibi_slopes") == Some(2)),
        ),
        (
            "varlen alibi per sequence",
            count(&|c| varlen(c) && rank(c, "alibi_slopes") == Some(2)),
        ),
        ("sdpa sinks", count(&|c| sdpa(c) && modifier(c, "sinks"))),
        (
            "sinks with fully masked rows",
            count(&|c| modifier(c, "sinks") && meta(c, "has_fully_masked_rows", "true")),
        ),
        (
            "varlen sinks",
            count(&|c| varlen(c) && modifier(c, "sinks")),
        ),
        (
            "all three modifiers",
            count(&|c| modifier(c, "softcap") && modifier(c, "alibi") && modifier(c, "sinks")),
        ),
        (
            "half-precision modifiers",
            count(&|c| half(c) && c.meta.contains_key("score_modifiers")),
        ),
        (
            "sdpa bool mask",
            count(&|c| meta(c, "attn_mask_kind", "bool_u8_1_means_attend")),
        ),
        (
            "sdpa float mask",
            count(&|c| meta(c, "attn_mask_kind", "float_additive")),
        ),
        ("mask 1-D", count(&|c| rank(c, "attn_mask") == Some(1))),
        ("mask 2-D", count(&|c| rank(c, "attn_mask") == Some(2))),
        ("mask 3-D", count(&|c| rank(c, "attn_mask") == Some(3))),
        ("mask 4-D", count(&|c| rank(c, "attn_mask") == Some(4))),
        (
            "is_causal",
            count(&|c| sdpa(c) && meta(c, "is_causal", "true")),
        ),
        (
            "sdpa top_left",
            count(&|c| sdpa(c) && meta(c, "causal_alignment", "top_left")),
        ),
        (
            "sdpa bottom_right",
            count(&|c| sdpa(c) && meta(c, "causal_alignment", "bottom_right")),
        ),
        ("sdpa window", count(&|c| sdpa(c) && has_meta(c, "window"))),
        ("sdpa scale", count(&|c| sdpa(c) && has_meta(c, "scale"))),
        (
            "sdpa GQA",
            count(&|c| sdpa(c) && c.tensors["q"].dim(1).unwrap() != c.tensors["k"].dim(1).unwrap()),
        ),
        (
            "sdpa Dv != D",
            count(&|c| sdpa(c) && c.tensors["v"].dim(3).unwrap() != c.tensors["q"].dim(3).unwrap()),
        ),
        (
            "sdpa fully masked rows",
            count(&|c| sdpa(c) && meta(c, "has_fully_masked_rows", "true")),
        ),
        (
            "varlen top_left",
            count(&|c| varlen(c) && meta(c, "causal_alignment", "top_left")),
        ),
        (
            "varlen bottom_right",
            count(&|c| varlen(c) && meta(c, "causal_alignment", "bottom_right")),
        ),
        (
            "varlen none",
            count(&|c| varlen(c) && meta(c, "causal_alignment", "none")),
        ),
        (
            "varlen window",
            count(&|c| varlen(c) && has_meta(c, "window")),
        ),
        (
            "varlen scale",
            count(&|c| varlen(c) && has_meta(c, "scale")),
        ),
        (
            "varlen GQA",
            count(&|c| {
                varlen(c) && c.tensors["q"].dim(1).unwrap() != c.tensors["k"].dim(1).unwrap()
            }),
        ),
        (
            "varlen empty query sequence",
            count(&|c| varlen(c) && lens(c, "cu_seqlens_q").contains(&0)),
        ),
        (
            "varlen sequence without keys",
            count(&|c| varlen(c) && lens(c, "cu_seqlens_k").contains(&0)),
        ),
        (
            "varlen q/k lengths differ",
            count(&|c| varlen(c) && lens(c, "cu_seqlens_q") != lens(c, "cu_seqlens_k")),
        ),
        ("float32", count(&|c| meta(c, "dtype", "float32"))),
        ("float64", count(&|c| meta(c, "dtype", "float64"))),
        (
            "float16 sdpa",
            count(&|c| sdpa(c) && meta(c, "dtype", "float16")),
        ),
        (
            "bfloat16 sdpa",
            count(&|c| sdpa(c) && meta(c, "dtype", "bfloat16")),
        ),
        (
            "float16 varlen",
            count(&|c| varlen(c) && meta(c, "dtype", "float16")),
        ),
        (
            "bfloat16 varlen",
            count(&|c| varlen(c) && meta(c, "dtype", "bfloat16")),
        ),
        (
            "more than one kernel tile",
            count(&|c| c.tensors["q"].dims().iter().any(|&d| d > 256)),
        ),
    ];
    let missing: Vec<_> = checks
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(k, _)| *k)
        .collect();
    assert!(missing.is_empty(), "no core case covers: {missing:?}");
}

/// Generated artifacts match their source: every committed core case says it was written by
/// the committed `scripts/gen_core_cases.py` (its sha256). Edit the script, rerun it.
#[test]
fn core_cases_come_from_the_committed_generator() {
    let script = std::fs::read(root().join("scripts/gen_core_cases.py")).unwrap();
    let want = format!("{:x}", Sha256::digest(&script));
    let stale: Vec<_> = load_all()
        .into_iter()
        .filter(|c| c.meta.get("generator_sha256") != Some(&want))
        .map(|c| c.name)
        .collect();
    assert!(
        stale.is_empty(),
        "these cases were not written by the committed scripts/gen_core_cases.py (sha256 {want}); rerun `python scripts/gen_core_cases.py`: {stale:?}"
    );
}
