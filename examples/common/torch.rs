//! The PyTorch side of the benchmarks: `scripts/bench_attention_torch.py` as a child process
//! kept alive for a whole session, one JSON request per line, so that the Rust side can
//! interleave its own runs with PyTorch's round by round.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A running `bench_attention_torch.py` server.
pub struct Torch {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    /// Starts the server under `python` with `threads` intra-op threads and extra environment
    /// `env`; returns it with its greeting (`{"ready", "threads", "torch", "cpu_capability"}`).
    pub fn spawn(python: &str, threads: usize, env: &[(&str, &str)]) -> Result<(Self, Value)> {
        let mut child = Command::new(python)
            .envs(env.iter().copied())
            .arg(script())
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {python}"))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut t = Self { stdin, stdout };
        let hello = t.read()?;
        Ok((t, hello))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the torch script exited")
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// The timed repetitions of one request, in seconds.
    pub fn times(&mut self, req: &Value) -> Result<Vec<f64>> {
        writeln!(self.stdin, "{req}")?;
        self.stdin.flush()?;
        let v = self.read()?;
        if let Some(e) = v.get("error") {
            bail!("torch: {e}")
        }
        Ok(serde_json::from_value(v["times"].clone())?)
    }
}

/// The server script's path.
pub fn script() -> String {
    format!(
        "{}/scripts/bench_attention_torch.py",
        env!("CARGO_MANIFEST_DIR")
    )
}
