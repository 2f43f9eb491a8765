#!/usr/bin/env python3
"""Writes the fixture of `examples/port_encoder_layer.rs` (and `tests/port_encoder_layer.rs`): a
`torch.nn.TransformerEncoderLayer` (d_model 64, 4 heads, feed-forward 128, ReLU, post-norm,
batch_first) with seeded weights, its `state_dict` as safetensors, one input batch with a key
padding mask, and PyTorch's output in eval mode (float64 and float32).

    python scripts/gen_encoder_layer.py     # writes weights/torch_encoder_layer.safetensors

Needs torch and safetensors (scripts/requirements.txt). The file's metadata holds this script's
sha256, which the test checks, so a fixture always comes from the committed script.
"""

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "weights" / "torch_encoder_layer.safetensors"


def main():
    torch.manual_seed(20261206)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, activation="relu",
        batch_first=True, norm_first=False, dtype=torch.float64,
    ).eval()
    x = torch.randn(3, 10, 64, dtype=torch.float64)
    lengths = [10, 7, 3]
    # PyTorch polarity: True = padding; saved as uint8 (candle has no bool safetensors dtype).
    pad = torch.arange(10)[None, :] >= torch.tensor(lengths)[:, None]
    # The layer's own computation, as in training: PyTorch's inference "fast path" (eval +
    # no_grad) turns padded batches into nested tensors and returns zeros at padded positions.
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        out64 = layer(x, src_key_padding_mask=pad)
        layer32 = layer.float()
        out32 = layer32(x.float(), src_key_padding_mask=pad)
    tensors = {k: v.detach().float().contiguous() for k, v in layer32.state_dict().items()}
    tensors["input"] = x.float()
    tensors["key_padding_mask"] = pad.to(torch.uint8)
    tensors["expected_f64"] = out64.contiguous()
    tensors["expected_f32"] = out32.contiguous()
    sha = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    save_file(tensors, str(OUT), metadata={
        "generator": "scripts/gen_encoder_layer.py", "generator_sha256": sha,
        "torch": torch.__version__, "lengths": ",".join(map(str, lengths)),
    })
    print(f"wrote {OUT.relative_to(ROOT)}: {sorted(tensors)}")


if __name__ == "__main__":
    main()
