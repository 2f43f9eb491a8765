//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same harnesses the
//! cargo-fuzz targets run (`candle_mha::fuzz_support`), on stable: every input must give a result
//! or an error, never a panic, and the kernels must agree with the reference wherever a mask
//! plan builds. `cargo +nightly fuzz run <target>` (see README, "Fuzzing") finds new inputs.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

fn replay(target: &str, harness: impl Fn(&[u8]) -> String) {
    let files = corpus(target);
    let mut ok = 0;
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let what = harness(&data);
        if !what.starts_with("err:") {
            ok += 1;
        }
    }
    println!(
        "{target}: {} inputs replayed, {ok} ran through",
        files.len()
    );
}

#[cfg(feature = "runner")]
#[test]
fn case_loader_corpus() {
    replay("case_loader", |d| {
        let r = candle_mha::fuzz_support::case_bytes(d);
        match r.error {
            Some(e) => format!("err: {e}"),
            None => format!("{} checks", r.checks.len()),
        }
    });
}

#[test]
fn mask_plan_corpus() {
    replay("mask_plan", candle_mha::fuzz_support::mask_bytes);
}

#[test]
fn layout_load_corpus() {
    replay("layout_load", candle_mha::fuzz_support::layout_bytes);
}
