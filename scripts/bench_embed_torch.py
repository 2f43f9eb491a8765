#!/usr/bin/env python3
"""PyTorch side of `cargo run --release --example bench_embed` (which runs this script itself).

Loads sentence-transformers' all-MiniLM-L6-v2 from --model-dir with
``torch.set_num_threads(--threads)``, reads the sentences of --sentences (one per line), runs
one warm-up pass and prints one JSON line ``{"ready": true, "torch": ..., ...}``. Then, for
each line ``run`` on standard input, it embeds all the sentences once with
``SentenceTransformer.encode(sentences, batch_size=--batch-size)`` (tokenisation included, as
on the candle side) and prints ``{"time_s": ...}``; ``save PATH`` writes the last embeddings
to PATH (.npy); end of input ends it. The caller interleaves these passes with its own so that
both sides see the same machine load.

With ``--ort DIR`` it also runs the model on ONNX Runtime (``--threads`` intra-op threads):
the model's encoder exported once with ``torch.onnx.export`` into DIR (``model.onnx``) and
rewritten by ``onnxruntime.transformers.optimizer`` (``model_type="bert"``: fused attention,
layer norm and GELU; ``model-opt.onnx``). ``run_ort`` embeds the sentences once with each
(tokenisation, length-sorted batches, mean pooling and normalisation as sentence-transformers
does them) and prints ``{"plain_s": ..., "optimized_s": ...}``; ``save_ort PATH`` writes the
optimized model's last embeddings.
"""

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def export_onnx(model, path: str) -> None:
    """The BERT encoder (input_ids, attention_mask, token_type_ids -> last_hidden_state) with
    dynamic batch and sequence axes."""
    auto = model[0].auto_model.eval()
    enc = model.tokenizer(["a short one", "and a slightly longer sentence"], padding=True,
                          return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    kw = dict(input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
              opset_version=17)
    try:
        torch.onnx.export(auto, inputs, path, dynamo=False, **kw)
    except Exception as e:  # the TorchScript exporter may be gone: the dynamo one
        print(f"TorchScript export failed ({e}); trying dynamo=True", file=sys.stderr)
        torch.onnx.export(auto, inputs, path, dynamo=True, **kw)


def ort_sessions(model, sentences, args):
    """Exports (once) and loads the plain and optimized ONNX models; returns the runs (name ->
    function giving the embeddings) and facts to report."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer

    os.makedirs(args.ort, exist_ok=True)
    plain = os.path.join(args.ort, "model.onnx")
    opt = os.path.join(args.ort, "model-opt.onnx")
    if not os.path.exists(plain):
        export_onnx(model, plain)
    if not os.path.exists(opt):
        cfg = model[0].auto_model.config
        m = optimizer.optimize_model(plain, model_type="bert", num_heads=cfg.num_attention_heads,
                                     hidden_size=cfg.hidden_size)
        m.save_model_to_file(opt)
    tok = model.tokenizer
    max_len = model.max_seq_length
    order = np.argsort([-len(s) for s in sentences], kind="stable")

    def session(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def runner(sess):
        input_names = {i.name for i in sess.get_inputs()}

        def run():
            out = np.zeros((len(sentences), model.get_sentence_embedding_dimension()), np.float32)
            for b0 in range(0, len(sentences), args.batch_size):
                idx = order[b0:b0 + args.batch_size]
                enc = tok([sentences[i] for i in idx], padding=True, truncation=True,
                          max_length=max_len, return_tensors="np")
                feed = {k: v.astype(np.int64) for k, v in enc.items() if k in input_names}
                h = sess.run(None, feed)[0]
                mask = enc["attention_mask"][..., None].astype(np.float32)
                e = (h * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
                e /= np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
                out[idx] = e
            return out
        return run

    runs = {"plain": runner(session(plain)), "optimized": runner(session(opt))}
    for fn in runs.values():
        fn()  # warm-up
    return runs, {"onnxruntime": ort.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ort", default=None, help="directory for the ONNX exports (enables ORT)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    with open(args.sentences, encoding="utf-8") as f:
        sentences = [line.rstrip("\n") for line in f if line.strip()]
    model = SentenceTransformer(args.model_dir, device=args.device)
    model.eval()

    def run():
        emb = model.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True,
                           show_progress_bar=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return emb

    emb = run()  # warm-up
    ort_runs, ort_info = ({}, {})
    if args.ort:
        # The exporter and the optimizer print progress: keep stdout for the JSON replies.
        with contextlib.redirect_stdout(sys.stderr):
            ort_runs, ort_info = ort_sessions(model, sentences, args)
    ort_emb = None
    reply({
        **ort_info,
        "ready": True,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "attn_implementation": str(getattr(model[0].auto_model.config, "_attn_implementation", "?")),
        "sentences": len(sentences),
    })
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            t0 = time.perf_counter()
            emb = run()
            reply({"time_s": time.perf_counter() - t0})
        elif cmd == "run_ort":
            times = {}
            for name, fn in ort_runs.items():
                t0 = time.perf_counter()
                e = fn()
                times[f"{name}_s"] = time.perf_counter() - t0
                if name == "optimized":
                    ort_emb = e
            reply(times)
        elif cmd.startswith("save_ort "):
            np.save(cmd[9:], np.ascontiguousarray(ort_emb, dtype=np.float32))
            reply({"saved": cmd[9:]})
        elif cmd.startswith("save "):
            np.save(cmd[5:], np.ascontiguousarray(emb, dtype=np.float32))
            reply({"saved": cmd[5:]})
        elif cmd:
            reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    main()
