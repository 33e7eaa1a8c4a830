"""Tiny models exported by both of torch's ONNX exporters (test fixtures).

Real exporter output differs from hand-built graphs: shapes computed at run time from ``Shape`` nodes,
``-1`` head counts, SDPA's ``IsNaN`` guard, the dynamo exporter's ``Reshape``/``Transpose`` chain for
Kᵀ, weights computed by ``Slice``/``Concat`` subgraphs. Each model is written as ``<name>_ts.onnx``
(TorchScript exporter, opset 17) and ``<name>_dy.onnx`` (dynamo, opset 20), dynamic batch and sequence:

- ``bert_tiny``: a randomized 2-layer HF BERT, hidden 32, 4 heads of 8, FFN 64, vocab 64; inputs
  ``input_ids``, ``attention_mask``, ``token_type_ids`` int64, output ``last_hidden_state``.
- ``gpt2_tiny``: a randomized 2-layer HF GPT-2, hidden 32, 4 heads of 8, vocab 64: Q, K and V from one
  fused ``c_attn`` (a ``Gemm`` on the rows flattened to 2-D, then ``Split``), projections as ``Gemm``;
  inputs ``input_ids``, ``attention_mask`` int64, output ``last_hidden_state``.
- ``lstm_tiny``: ``nn.LSTM(8, 48, batch_first=True)`` then ``nn.Linear(48, 4)`` on the last step; input
  ``x`` float32 (batch, seq, 8), output ``logits``. Its 48×48 gate blocks exceed the per-node folding
  limit of ``cleanup``: the dynamo export's gate-reordering Slices fold only as a region.

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


def lstm_feeds(batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, 8)).astype(np.float32)}


def build() -> None:
    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    names = ("input_ids", "attention_mask", "token_type_ids")
    _export("bert_tiny", _bert(), feeds(), names, ["last_hidden_state"])
    state = torch.random.get_rng_state()  # gpt2_tiny came later: its own seed, the other models' draws unchanged
    torch.manual_seed(0)
    _export("gpt2_tiny", _gpt2(), feeds(), names[:2], ["last_hidden_state"])
    torch.random.set_rng_state(state)

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = torch.nn.LSTM(8, 48, batch_first=True), torch.nn.Linear(48, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    _export("lstm_tiny", Recurrent().eval(), lstm_feeds(), ("x",), ["logits"])


def _randomized(model):
    """``model`` with noise on every parameter: HF's init zeroes the biases and makes LayerNorm the identity."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _bert():
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=32)
    bert = _randomized(BertModel(config, add_pooling_layer=False).eval())

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return Encoder().eval()


def _gpt2():
    import torch
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    gpt2 = _randomized(GPT2Model(config).eval())

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, input_ids, attention_mask):
            return self.gpt2(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Decoder().eval()


def _export(name: str, model, example: dict[str, np.ndarray], inputs, outputs) -> None:
    """Write ``<name>_ts.onnx`` and ``<name>_dy.onnx`` with batch and sequence (axes 0, 1) dynamic."""
    import torch

    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=32)
    with tempfile.TemporaryDirectory() as tmp:
        for tag, options in (
            ("ts", dict(dynamo=False, opset_version=17, dynamic_axes={n: {0: "batch", 1: "seq"} for n in inputs})),
            ("dy", dict(dynamo=True, dynamic_shapes={n: {0: batch, 1: seq} for n in inputs})),
        ):
            path = os.path.join(tmp, f"{tag}.onnx")
            torch.onnx.export(model, args, path, input_names=list(inputs), output_names=outputs, **options)
            proto = onnx.load(path)  # the dynamo exporter writes external data: save as one file
            for node in proto.graph.node:  # the dynamo exporter's stack traces: 70 % of the file
                del node.metadata_props[:]
            out = save_model(proto, PKG_DIR / f"{name}_{tag}.onnx", smoke_feed={n: example[n] for n in inputs})
            print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    build()
