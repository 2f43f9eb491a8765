//! Per-layer attention weights (`forward_with_attentions`, what `examples/attention_map` draws)
//! against Hugging Face transformers' `output_attentions=True` with eager attention, and the
//! head statistics of `examples/common/head_stats.rs`.
//!
//! `tests/attentions_reference.safetensors` comes from `scripts/gen_attentions_ref.py` (torch,
//! transformers; not needed here): every layer and head of all-MiniLM-L6-v2 on two texts and of
//! SmolLM2-135M-Instruct on one. Its metadata records the sha256 of the script that wrote it,
//! which the first test compares with the committed script. The models come from the fetch
//! scripts, run once when missing (see `tests/minilm.rs`).

#[path = "../examples/common/head_stats.rs"]
mod head_stats;
#[path = "../examples/common/minilm.rs"]
mod minilm;
#[path = "../examples/common/model_files.rs"]
mod model_files;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use candle_mha::models::llama::{Llama, LlamaCache};
use candle_mha::KeyPaddingMask;
use head_stats::head_stats;
use sha2::{Digest, Sha256};

/// The bound the issue asks for: every weight within 1e-5 of transformers'.
const ATOL: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Reference {
    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the reference file"))
    }

    fn texts(&self, key: &str) -> Vec<String> {
        serde_json::from_str(&self.meta[key]).expect("texts metadata is a JSON list")
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.get(name)
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let path = root().join("tests/attentions_reference.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
        let meta = header.metadata().clone().expect("metadata");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
        Reference { tensors, meta }
    })
}

/// `(1, H, L, S)` per layer, stacked to `(layers, H, L, S)` on the CPU in f32.
fn stack(attentions: &[Tensor]) -> Tensor {
    let t = Tensor::cat(attentions, 0).unwrap();
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Compares every layer and head; returns the largest difference. Panics naming the first
/// (layer, head) over `ATOL`.
fn assert_close(model: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{model}: (layers, heads, L, L)");
    let (layers, heads) = (got.dim(0).unwrap(), got.dim(1).unwrap());
    let mut worst = 0f32;
    for layer in 0..layers {
        for head in 0..heads {
            let g = got.get(layer).unwrap().get(head).unwrap();
            let w = want.get(layer).unwrap().get(head).unwrap();
            let d = (g - w)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d <= ATOL,
                "{model}: layer {layer} head {head} differs from transformers by {d:e} (> {ATOL:e})"
            );
            worst = worst.max(d);
        }
    }
    worst
}

/// Every row of `(…, L, S)` weights sums to 1.
fn assert_rows_sum_to_one(model: &str, w: &Tensor) {
    let sums = w.sum(D::Minus1).unwrap().flatten_all().unwrap();
    let sums: Vec<f32> = sums.to_vec1().unwrap();
    let worst = sums.iter().map(|s| (s - 1.0).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{model}: a row sums to 1 ± {worst:e}");
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn reference_was_written_by_the_committed_script() {
    let script = std::fs::read(root().join("scripts/gen_attentions_ref.py")).unwrap();
    let hash: String = Sha256::digest(&script)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = reference();
    assert_eq!(
        r.meta["script_sha256"], hash,
        "scripts/gen_attentions_ref.py changed since it wrote tests/attentions_reference.safetensors: rerun it"
    );
    assert_eq!(
        r.meta["attn_implementation"],
        r#"{"minilm": "eager", "smollm2": "eager"}"#
    );
}

fn minilm() -> &'static minilm::MiniLm {
    static MODEL: OnceLock<minilm::MiniLm> = OnceLock::new();
    MODEL.get_or_init(|| {
        minilm::MiniLm::load(&model_files::minilm_dir_or_fetch(), &Device::Cpu)
            .expect("loading all-MiniLM-L6-v2")
    })
}

#[test]
fn minilm_attentions_equal_transformers_output_attentions() {
    let r = reference();
    let m = minilm();
    let bert = m.embedder.bert();
    let texts = r.texts("minilm_texts");
    assert_eq!(texts.len(), 2);
    for (n, text) in texts.iter().enumerate() {
        // The tokens are the reference's: the same text read the same way.
        let ids = &m.tokenize(&[text]).or_panic()[0];
        assert_eq!(
            ids,
            &r.ids(&format!("minilm.{n}.input_ids")),
            "tokens of {text:?}"
        );
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (hidden, attentions) = bert.forward_with_attentions(&input, None, None).unwrap();
        assert_eq!(attentions.len(), 6);
        let got = stack(&attentions);
        assert_eq!(got.dims(), &[6, 12, ids.len(), ids.len()]);
        assert_rows_sum_to_one("all-MiniLM-L6-v2", &got);
        let worst = assert_close(
            "all-MiniLM-L6-v2",
            &got,
            r.get(&format!("minilm.{n}.attentions")),
        );
        // The hidden states are the plain forward's: asking for the weights changes nothing.
        let plain = bert.forward(&input, None, None).unwrap();
        let dh = max_abs(&hidden, &plain);
        println!("minilm text {n} ({} tokens): max |candle - transformers| = {worst:.2e}; hidden vs plain forward {dh:.2e}", ids.len());
        assert!(
            dh <= 1e-4,
            "hidden states differ from the plain forward by {dh}"
        );
    }
}

/// Panics with the whole error chain.
trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T> OrPanic<T> for anyhow::Result<T> {
    fn or_panic(self) -> T {
        self.unwrap_or_else(|e| panic!("{e:#}"))
    }
}

#[test]
fn minilm_padded_batch_gives_each_text_its_own_weights() {
    let r = reference();
    let m = minilm();
    let texts = r.texts("minilm_texts");
    let ids = m.tokenize(&texts).or_panic();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let l = *lengths.iter().max().unwrap();
    assert_ne!(
        lengths[0], lengths[1],
        "the two texts should differ in length"
    );
    let mut flat = Vec::new();
    for seq in &ids {
        flat.extend(seq.iter().copied().chain(std::iter::repeat(0)).take(l));
    }
    let batch = Tensor::from_vec(flat, (2, l), &Device::Cpu).unwrap();
    let padding = KeyPaddingMask::from_lengths(&lengths);
    let (_, attentions) = m
        .embedder
        .bert()
        .forward_with_attentions(&batch, None, Some(&padding))
        .unwrap();
    for (b, &len) in lengths.iter().enumerate() {
        let mine: Vec<Tensor> = attentions
            .iter()
            .map(|a| a.narrow(0, b, 1).unwrap())
            .collect();
        let mine = stack(&mine); // (layers, H, l, l)
        let real = mine.narrow(2, 0, len).unwrap().narrow(3, 0, len).unwrap();
        assert_close(
            "padded batch",
            &real,
            r.get(&format!("minilm.{b}.attentions")),
        );
        if len < l {
            let pad_keys = mine.narrow(3, len, l - len).unwrap();
            let most = pad_keys
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert_eq!(
                most.to_scalar::<f32>().unwrap(),
                0.0,
                "padded keys get weight"
            );
        }
    }
}

#[test]
fn smollm2_attentions_equal_transformers_output_attentions() {
    let r = reference();
    let gguf = model_files::smollm2_gguf_or_fetch();
    let tok = tokenizers::Tokenizer::from_file(root().join("weights/smollm2-tokenizer.json"))
        .expect("tokenizer");
    let model = Llama::from_gguf(&gguf, DType::F32, &Device::Cpu).unwrap();
    let (layers, heads) = (model.config().num_layers, model.config().num_heads);
    for (n, text) in r.texts("smollm2_texts").iter().enumerate() {
        let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(
            ids,
            r.ids(&format!("smollm2.{n}.input_ids")),
            "tokens of {text:?}"
        );
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (hidden, attentions) = model
            .forward_with_attentions(&input, None, &mut LlamaCache::new(&model))
            .unwrap();
        let got = stack(&attentions);
        let l = ids.len();
        assert_eq!(got.dims(), &[layers, heads, l, l]);
        assert_rows_sum_to_one("SmolLM2", &got);
        // Causal: nothing above the diagonal.
        let w: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for (k, chunk) in w.chunks(l * l).enumerate() {
            for i in 0..l {
                assert!(
                    chunk[i * l + i + 1..(i + 1) * l].iter().all(|&x| x == 0.0),
                    "layer/head {k}: query {i} sees a later key"
                );
            }
        }
        let worst = assert_close("SmolLM2", &got, r.get(&format!("smollm2.{n}.attentions")));
        let plain = model
            .hidden_states(&input, None, &mut LlamaCache::new(&model))
            .unwrap();
        let dh = max_abs(&hidden, &plain);
        println!("smollm2 text {n} ({l} tokens): max |candle - transformers| = {worst:.2e}; hidden vs plain forward {dh:.2e}");
        assert!(
            dh <= 1e-3,
            "hidden states differ from the plain forward by {dh}"
        );
    }
}

// Head statistics: properties that fix what each number means.

fn uniform(l: usize) -> Vec<f32> {
    vec![1.0 / l as f32; l * l]
}

fn one_hot_rows(l: usize, col: impl Fn(usize) -> usize) -> Vec<f32> {
    let mut w = vec![0f32; l * l];
    for i in 0..l {
        w[i * l + col(i)] = 1.0;
    }
    w
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[test]
fn entropy_is_zero_for_one_hot_rows_and_ln_l_for_uniform_rows() {
    for l in [1, 2, 7, 60] {
        let st = head_stats(&one_hot_rows(l, |i| i), l, l, &[]);
        assert!(close(st.entropy, 0.0), "one-hot entropy {}", st.entropy);
        let st = head_stats(&uniform(l), l, l, &[]);
        assert!(
            close(st.entropy, (l as f64).ln()),
            "uniform entropy {} vs ln {l}",
            st.entropy
        );
        assert!(close(st.first, 1.0 / l as f64));
    }
    // Causal uniform: row i spreads over i + 1 keys.
    let l = 5;
    let mut w = vec![0f32; l * l];
    for i in 0..l {
        for j in 0..=i {
            w[i * l + j] = 1.0 / (i + 1) as f32;
        }
    }
    let want = (1..=l).map(|n| (n as f64).ln()).sum::<f64>() / l as f64;
    assert!(close(head_stats(&w, l, l, &[]).entropy, want));
}

#[test]
fn previous_token_head_is_measured_as_one() {
    let l = 9;
    // Row 0 has no previous token: it looks at itself; every other row at i - 1.
    let w = one_hot_rows(l, |i| i.saturating_sub(1));
    let st = head_stats(&w, l, l, &[l - 1]);
    assert!(close(st.previous, 1.0), "previous {}", st.previous);
    assert!(close(st.itself, 1.0 / l as f64), "self {}", st.itself);
    assert!(
        close(st.distance, (l - 1) as f64 / l as f64),
        "distance {}",
        st.distance
    );
    assert_eq!(st.pattern(l), "previous");
    // The identity is a self head with distance 0 and no previous-token share.
    let st = head_stats(&one_hot_rows(l, |i| i), l, l, &[]);
    assert!(close(st.itself, 1.0) && close(st.previous, 0.0) && close(st.distance, 0.0));
    assert_eq!(st.pattern(l), "self");
}

#[test]
fn first_and_separator_shares() {
    let l = 6;
    let st = head_stats(&one_hot_rows(l, |_| 0), l, l, &[l - 1]);
    assert!(close(st.first, 1.0) && close(st.sep, 0.0));
    assert_eq!(st.pattern(l), "first");
    // Half on [SEP] (the last key), half on [CLS].
    let mut w = vec![0f32; l * l];
    for i in 0..l {
        w[i * l] = 0.5;
        w[i * l + l - 1] += 0.5;
    }
    let st = head_stats(&w, l, l, &[l - 1]);
    assert!(close(st.first, 0.5) && close(st.sep, 0.5), "{st:?}");
    assert!(close(st.entropy, 2f64.ln()));
    assert!(close(
        st.distance,
        (0..l).map(|i| 0.5 * (i + (l - 1 - i)) as f64).sum::<f64>() / l as f64
    ));
}

#[test]
fn fully_masked_rows_are_left_out_and_cached_keys_shift_positions() {
    let l = 4;
    let mut w = one_hot_rows(l, |i| i.saturating_sub(1));
    w[3 * l..].fill(0.0); // query 3 attends to nothing
    let st = head_stats(&w, l, l, &[]);
    assert!(close(st.previous, 1.0), "{st:?}");
    // One query over 5 keys (4 cached): it sits at position 4; its previous token is key 3.
    let st = head_stats(&[0.0, 0.0, 0.0, 1.0, 0.0], 1, 5, &[]);
    assert!(close(st.previous, 1.0) && close(st.distance, 1.0), "{st:?}");
}

#[test]
fn stats_of_a_real_head_stay_in_range() {
    let r = reference();
    let w = r.get("minilm.0.attentions");
    let (layers, heads, l) = (w.dim(0).unwrap(), w.dim(1).unwrap(), w.dim(2).unwrap());
    // Layer 0 of all-MiniLM-L6-v2 has a previous-token head (head 2): measured, not assumed.
    let mut found = false;
    for layer in 0..layers {
        for head in 0..heads {
            let flat: Vec<f32> = w
                .get(layer)
                .unwrap()
                .get(head)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let st = head_stats(&flat, l, l, &[l - 1]);
            assert!(st.entropy >= 0.0 && st.entropy <= (l as f64).ln() + 1e-9);
            for share in [st.first, st.sep, st.previous, st.itself] {
                assert!((0.0..=1.0 + 1e-6).contains(&share), "{st:?}");
            }
            assert!(st.distance >= 0.0 && st.distance <= (l - 1) as f64);
            found |= layer == 0 && st.previous > 0.9;
        }
    }
    assert!(found, "no previous-token head in layer 0");
}
