"""Tiny HuggingFace BERT encoders exported by both of torch's ONNX exporters (test fixtures).

Real exporter output differs from hand-built graphs: shapes computed at run time from ``Shape`` nodes,
``-1`` head counts, SDPA's ``IsNaN`` guard, the dynamo exporter's ``Reshape``/``Transpose`` chain for
Kᵀ. ``bert_tiny_ts.onnx`` (TorchScript exporter, opset 17) and ``bert_tiny_dy.onnx`` (dynamo, opset 20)
hold the same randomized 2-layer model: hidden 32, 4 heads of 8, FFN 64, vocab 64, dynamic batch and
sequence; inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64, output ``last_hidden_state``.

    python -m models.torch_exports       # needs torch and transformers (build time only)
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import onnx

from models._onnx import PKG_DIR, save_model

VOCAB = 64


def feeds(batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with a padded tail on the first row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def build() -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=32)
    bert = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # HF's init zeroes the biases and makes LayerNorm the identity
        for parameter in bert.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    model, example = Encoder().eval(), feeds()
    args = tuple(torch.from_numpy(example[name]) for name in ("input_ids", "attention_mask", "token_type_ids"))
    names = list(example)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=32)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        for tag, options in (
            ("ts", dict(dynamo=False, opset_version=17, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})),
            ("dy", dict(dynamo=True, dynamic_shapes={n: {0: batch, 1: seq} for n in names})),
        ):
            path = os.path.join(tmp, f"{tag}.onnx")
            torch.onnx.export(model, args, path, input_names=names, output_names=["last_hidden_state"], **options)
            proto = onnx.load(path)  # the dynamo exporter writes external data: save as one file
            for node in proto.graph.node:  # the dynamo exporter's stack traces: 70 % of the file
                del node.metadata_props[:]
            out = save_model(proto, PKG_DIR / f"bert_tiny_{tag}.onnx", smoke_feed=example)
            print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    build()
