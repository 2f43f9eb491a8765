//! Bad input gets a clear error naming the tensor and the shapes, never a panic.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::{AttnMask, KeyPaddingMask, MhaConfig, MhaInput, MultiHeadAttention, WeightLayout};
use candle_nn::{VarBuilder, VarMap};

const E: usize = 8;
const H: usize = 2;

fn module(cfg: MhaConfig) -> Result<MultiHeadAttention> {
    let vm = VarMap::new();
    MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
}

fn mha() -> MultiHeadAttention {
    module(MhaConfig::new(E, H).with_batch_first(true)).unwrap()
}

fn t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

fn u8t(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::U8, &Device::Cpu).unwrap()
}

fn torch_weights(e: usize) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    m.insert("in_proj_weight".into(), t(&[3 * e, e]));
    m.insert("in_proj_bias".into(), t(&[3 * e]));
    m.insert("out_proj.weight".into(), t(&[e, e]));
    m.insert("out_proj.bias".into(), t(&[e]));
    m
}

fn load(
    ts: HashMap<String, Tensor>,
    layout: WeightLayout,
    cfg: MhaConfig,
) -> Result<MultiHeadAttention> {
    MultiHeadAttention::load(
        cfg,
        &layout,
        VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu),
    )
}

/// (what, result, fragments the message must contain)
type Row = (&'static str, Result<()>, Vec<&'static str>);

fn run(input: MhaInput) -> Result<()> {
    mha().attend(&input).map(|_| ())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let x = || t(&[2, 5, E]);
    let rows: Vec<Row> = vec![
        (
            "num_heads not dividing",
            module(MhaConfig::new(10, 3)).map(|_| ()),
            vec!["embed_dim must be divisible by num_heads", "10", "3"],
        ),
        (
            "zero heads",
            module(MhaConfig::new(8, 0)).map(|_| ()),
            vec!["must be greater than 0"],
        ),
        (
            "GQA not dividing",
            module(MhaConfig::new(16, 4).with_num_kv_heads(3)).map(|_| ()),
            vec!["num_heads must be divisible by num_kv_heads", "4", "3"],
        ),
        (
            "dropout 1",
            module(MhaConfig::new(8, 2).with_dropout(1.0)).map(|_| ()),
            vec!["dropout", "[0, 1)"],
        ),
        (
            "bad scale",
            module(MhaConfig::new(8, 2).with_softmax_scale(-1.0)).map(|_| ()),
            vec!["softmax_scale"],
        ),
        (
            "query rank 4",
            run(MhaInput::new(t(&[1, 2, 5, E]))),
            vec!["query must be 2-D", "[1, 2, 5, 8]"],
        ),
        (
            "query rank 1",
            run(MhaInput::new(t(&[E]))),
            vec!["query must be 2-D", "[8]"],
        ),
        (
            "key rank",
            run(MhaInput::cross(x(), t(&[5, E]), t(&[5, E]))),
            vec!["key", "3-D", "[5, 8]"],
        ),
        (
            "E mismatch",
            run(MhaInput::new(t(&[2, 5, 6]))),
            vec!["query", "embed_dim=8", "[2, 5, 6]"],
        ),
        (
            "key E mismatch",
            run(MhaInput::cross(x(), t(&[2, 5, 6]), t(&[2, 5, E]))),
            vec!["key", "kdim=8", "[2, 5, 6]"],
        ),
        (
            "value E mismatch",
            run(MhaInput::cross(x(), t(&[2, 5, E]), t(&[2, 5, 4]))),
            vec!["value", "vdim=8", "[2, 5, 4]"],
        ),
        (
            "key/value length",
            run(MhaInput::cross(x(), t(&[2, 5, E]), t(&[2, 4, E]))),
            vec!["same sequence length", "[2, 5, 8]", "[2, 4, 8]"],
        ),
        (
            "batch mismatch",
            run(MhaInput::cross(x(), t(&[3, 5, E]), t(&[3, 5, E]))),
            vec!["batch size", "(2)", "[3, 5, 8]"],
        ),
        (
            "dtype",
            run(MhaInput::new(x().to_dtype(DType::F16).unwrap())),
            vec!["query", "F16", "F32"],
        ),
        (
            "empty",
            run(MhaInput::new(t(&[2, 0, E]))),
            vec!["empty input"],
        ),
        (
            "kpm shape",
            run(MhaInput::new(x()).key_padding_mask(KeyPaddingMask::new(u8t(&[2, 4])))),
            vec!["key_padding_mask", "[2, 5]", "[2, 4]"],
        ),
        (
            "kpm rank",
            run(MhaInput::new(x()).key_padding_mask(KeyPaddingMask::new(u8t(&[5])))),
            vec!["key_padding_mask", "[2, 5]", "[5]"],
        ),
        (
            "lengths count",
            run(MhaInput::new(x()).key_padding_mask(KeyPaddingMask::from_lengths(&[5]))),
            vec!["lengths", "(2)", "1"],
        ),
        (
            "length too long",
            run(MhaInput::new(x()).key_padding_mask(KeyPaddingMask::from_lengths(&[5, 6]))),
            vec!["length 6", "5"],
        ),
        (
            "2-D mask shape",
            run(MhaInput::new(x()).attn_mask(AttnMask::new(u8t(&[4, 5])))),
            vec!["2D attn_mask", "[4, 5]", "[5, 5]"],
        ),
        (
            "3-D mask shape",
            run(MhaInput::new(x()).attn_mask(AttnMask::new(u8t(&[2, 5, 5])))),
            vec!["3D attn_mask", "[2, 5, 5]", "[4, 5, 5]"],
        ),
        (
            "4-D mask shape",
            run(MhaInput::new(x()).attn_mask(AttnMask::new(t(&[2, 3, 5, 5])))),
            vec!["4D attn_mask", "[2, 3, 5, 5]", "[2, 2, 5, 5]"],
        ),
        (
            "5-D mask",
            run(MhaInput::new(x()).attn_mask(AttnMask::new(t(&[1, 2, 2, 5, 5])))),
            vec!["attn_mask", "[1, 2, 2, 5, 5]"],
        ),
        (
            "additive int mask",
            run(MhaInput::new(x()).attn_mask(AttnMask::Additive(u8t(&[5, 5])))),
            vec!["attn_mask", "float", "U8"],
        ),
        (
            "keep mask float",
            KeyPaddingMask::from_keep_mask(&t(&[2, 5])).map(|_| ()),
            vec!["integer dtype", "F32"],
        ),
        (
            "missing weight",
            {
                let mut w = torch_weights(E);
                w.remove("out_proj.weight");
                load(w, WeightLayout::torch(), MhaConfig::new(E, H)).map(|_| ())
            },
            vec!["out_proj.weight", "cannot"],
        ),
        (
            "mis-shaped weight",
            {
                let mut w = torch_weights(E);
                w.insert("in_proj_weight".into(), t(&[3 * E, E - 1]));
                load(w, WeightLayout::torch(), MhaConfig::new(E, H)).map(|_| ())
            },
            vec!["in_proj_weight", "[24, 8]", "[24, 7]"],
        ),
        (
            "missing bias",
            {
                let mut w = torch_weights(E);
                w.remove("in_proj_bias");
                load(w, WeightLayout::torch(), MhaConfig::new(E, H)).map(|_| ())
            },
            vec!["in_proj_bias"],
        ),
        (
            "missing bias_k",
            load(
                torch_weights(E),
                WeightLayout::torch(),
                MhaConfig::new(E, H).with_add_bias_kv(true),
            )
            .map(|_| ()),
            vec!["bias_k"],
        ),
        (
            "bert names absent",
            load(torch_weights(E), WeightLayout::bert(), MhaConfig::new(E, H)).map(|_| ()),
            vec!["attention.self.query.weight"],
        ),
        (
            "gpt2 with kdim",
            load(
                torch_weights(E),
                WeightLayout::gpt2(),
                MhaConfig::new(E, H).with_kdim(4),
            )
            .map(|_| ()),
            vec!["kdim", "4"],
        ),
        (
            "renamed names absent",
            load(
                torch_weights(E),
                WeightLayout::torch().with_rename(|n| format!("attn.{n}")),
                MhaConfig::new(E, H),
            )
            .map(|_| ()),
            vec!["attn.in_proj"],
        ),
        (
            "a layer's weights without the VarBuilder prefix",
            load(
                torch_weights(E)
                    .into_iter()
                    .map(|(k, v)| (format!("encoder.layer.0.{k}"), v))
                    .collect(),
                WeightLayout::torch(),
                MhaConfig::new(E, H),
            )
            .map(|_| ()),
            vec!["in_proj", "no prefix", "vb.pp("],
        ),
        (
            "(B, L, E) inputs without batch_first",
            module(MhaConfig::new(E, H))
                .and_then(|m| {
                    m.attend(
                        &MhaInput::new(t(&[2, 5, E]))
                            .key_padding_mask(KeyPaddingMask::new(u8t(&[2, 5]))),
                    )
                })
                .map(|_| ()),
            vec!["key_padding_mask", "[5, 2]", "[2, 5]", "batch_first"],
        ),
        (
            "sdpa with (B, L, H, D) tensors in the default layout",
            candle_mha::sdpa(
                &t(&[1, 9, 4, 8]),
                &t(&[1, 13, 2, 8]),
                &t(&[1, 13, 2, 8]),
                &candle_mha::SdpaOptions::new(),
            )
            .map(|_| ()),
            vec!["KV heads", "Bhld", "SdpaLayout::Blhd"],
        ),
    ];
    let mut problems = vec![];
    for (what, res, frags) in rows {
        match res {
            Ok(()) => problems.push(format!("{what}: expected an error, got Ok")),
            Err(e) => {
                let msg = e.to_string().lines().next().unwrap_or_default().to_string();
                for f in frags {
                    if !msg.contains(f) {
                        problems.push(format!("{what}: message {msg:?} lacks {f:?}"));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn integer_masks_of_any_width_are_boolean() {
    let x = Tensor::randn(0f32, 1., (2, 5, E), &Device::Cpu).unwrap();
    let m = mha();
    let out = |kpm: Tensor| {
        m.attend(&MhaInput::new(x.clone()).key_padding_mask(KeyPaddingMask::new(kpm)))
            .unwrap()
            .output
    };
    let rows = [[0u32, 0, 0, 0, 1], [0, 0, 0, 1, 1]];
    let a = out(Tensor::new(&rows, &Device::Cpu).unwrap());
    let b = out(Tensor::new(&rows, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::U8)
        .unwrap());
    let diff = (a - b).unwrap().abs().unwrap().sum_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}
