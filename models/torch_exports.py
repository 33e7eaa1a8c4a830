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
- ``gpt2_cache_tiny``: the same architecture (its own random weights) run one step with a KV cache:
  inputs ``input_ids`` (batch, seq), ``attention_mask`` (batch, past + seq) int64 and ``past_key_<i>``,
  ``past_value_<i>`` (batch, 4 heads, past, 8) float32 for layers i = 0, 1; outputs ``last_hidden_state``
  and ``present_key_<i>``, ``present_value_<i>``, each the cache input concatenated with the step's keys
  or values along the sequence axis.
- ``llama_tiny``: a randomized 2-layer HF Llama, hidden 32, 4 heads of 8, FFN 64, vocab 64: RMSNorm,
  SwiGLU, a rotary embedding on Q and K; inputs ``input_ids``, ``attention_mask``, output ``last_hidden_state``.
- ``llama_cache_tiny``: the same architecture (its own random weights) run one step with a KV cache, inputs
  and outputs as ``gpt2_cache_tiny``.
- ``llama_gqa_cache_tiny``: as ``llama_cache_tiny`` with grouped-query attention: 2 key/value heads, each
  serving 2 of the 4 query heads (K and V repeated by Unsqueeze-Expand-Reshape); caches (batch, 2, past, 8).
- ``llama_gqa_token_tiny`` (TorchScript only): the same exported on one new token, where torch's SDPA
  regroups the 4 query heads per key/value head around the attention instead of repeating K and V (the
  one-token query is baked into that Reshape: the model takes one new token per step).
- ``lstm_tiny``: ``nn.LSTM(8, 48, batch_first=True)`` then ``nn.Linear(48, 4)`` on the last step; input
  ``x`` float32 (batch, seq, 8), output ``logits``. Its 48×48 gate blocks exceed the per-node folding
  limit of ``cleanup``: the dynamo export's gate-reordering Slices fold only as a region.

    python -m models.torch_exports [NAME...]   # needs torch and transformers (build time only)
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings

import numpy as np
import onnx

from models._onnx import PKG_DIR, save_model

VOCAB = 64
CACHE_HEADS = 4


def feeds(batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with a padded tail on the first row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def cache_feeds(batch: int = 2, seq: int = 3, past: int = 5, seed: int = 0, layers: int = 2, heads: int = CACHE_HEADS,
                head_dim: int = 8, vocab: int = VOCAB, left_pad: int = 2) -> dict[str, np.ndarray]:
    """One decoding step of a :func:`gpt2_step` export (``gpt2_cache_tiny`` by default): new tokens, a mask
    over past and new (the first row left-padded by ``left_pad``), random caches."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), np.int64)
    mask[0, :left_pad] = 0
    caches = {name: rng.standard_normal((batch, heads, past, head_dim)).astype(np.float32)
              for name in cache_axes(layers)[0][2:]}
    return {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64), "attention_mask": mask, **caches}


def lstm_feeds(batch: int = 2, seq: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, 8)).astype(np.float32)}


def build(only: tuple[str, ...] = ()) -> None:
    """Export every model, or those named in ``only`` (models added later seed their own generator, so
    the earlier ones keep their weights)."""
    import torch

    warnings.filterwarnings("ignore")
    wanted = lambda name: not only or name in only  # noqa: E731
    torch.manual_seed(0)
    names = ("input_ids", "attention_mask", "token_type_ids")
    bert = _bert()
    if wanted("bert_tiny"):
        _export("bert_tiny", bert, feeds(), names, ["last_hidden_state"])
    state = torch.random.get_rng_state()
    if wanted("gpt2_tiny"):
        torch.manual_seed(0)
        _export("gpt2_tiny", _gpt2(), feeds(), names[:2], ["last_hidden_state"])
    if wanted("gpt2_cache_tiny"):
        torch.manual_seed(1)
        _export("gpt2_cache_tiny", gpt2_step(), cache_feeds(), *cache_axes(2))
    if wanted("llama_tiny"):
        torch.manual_seed(2)
        _export("llama_tiny", _last_hidden_state(_llama(), "llama"), feeds(), names[:2], ["last_hidden_state"])
    if wanted("llama_cache_tiny"):
        torch.manual_seed(3)
        _export("llama_cache_tiny", decoder_step(_llama(), "llama"), cache_feeds(), *cache_axes(2))
    if wanted("llama_gqa_cache_tiny"):
        torch.manual_seed(4)
        _export("llama_gqa_cache_tiny", decoder_step(_llama(kv_heads=2), "llama"), cache_feeds(heads=2), *cache_axes(2))
    if wanted("llama_gqa_token_tiny"):
        torch.manual_seed(5)
        _export("llama_gqa_token_tiny", decoder_step(_llama(kv_heads=2), "llama"), cache_feeds(seq=1, heads=2),
                *cache_axes(2), tags=("ts",))
    torch.random.set_rng_state(state)

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = torch.nn.LSTM(8, 48, batch_first=True), torch.nn.Linear(48, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    recurrent = Recurrent().eval()
    if wanted("lstm_tiny"):
        _export("lstm_tiny", recurrent, lstm_feeds(), ("x",), ["logits"])


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


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=2, n_head=CACHE_HEADS, n_positions=32, vocab_size=VOCAB, bos_token_id=0,
                      eos_token_id=0)


def _gpt2():
    from transformers import GPT2Model

    return _last_hidden_state(_randomized(GPT2Model(_gpt2_config()).eval()), "gpt2")


def _last_hidden_state(decoder, name: str):
    """``decoder`` (a submodule called ``name``) called on ``input_ids`` and ``attention_mask``."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(name, decoder)

        def forward(self, input_ids, attention_mask):
            return getattr(self, name)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Decoder().eval()


def gpt2_step(config=None):
    """GPT-2 (``_gpt2_config()`` unless ``config``) run one step: see :func:`decoder_step`."""
    from transformers import GPT2Model

    return decoder_step(_randomized(GPT2Model(config or _gpt2_config()).eval()), "gpt2")


def decoder_step(decoder, name: str):
    """The HF decoder ``decoder`` (a submodule called ``name``: the exported node names) run one step: inputs
    ``input_ids``, ``attention_mask``, then each layer's past keys and values as tensors; outputs the last
    hidden state and the updated caches."""
    import torch
    from transformers.cache_utils import DynamicCache

    config = decoder.config

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(name, decoder)

        def forward(self, *inputs):
            input_ids, attention_mask, *past = inputs
            cache = DynamicCache(config=config)
            for layer in range(config.num_hidden_layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = getattr(self, name)(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                      use_cache=True)
            return (out.last_hidden_state, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))

    return Step().eval()


def _llama(kv_heads: int = CACHE_HEADS):
    """A randomized 2-layer HF Llama, hidden 32, 4 query heads of 8 (``kv_heads`` key/value heads), FFN 64."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=CACHE_HEADS,
                         num_key_value_heads=kv_heads, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64)
    return _randomized(LlamaModel(config).eval())


def cache_axes(layers: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of a :func:`gpt2_step` export."""
    caches = [f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            **{name: {0: "batch", 2: "past"} for name in caches}}
    return ["input_ids", "attention_mask", *caches], ["last_hidden_state", *(c.replace("past", "present") for c in caches)], axes


def _export(name: str, model, example: dict[str, np.ndarray], inputs, outputs,
            axes: dict[str, dict[int, str]] | None = None, tags: tuple[str, ...] = ("ts", "dy")) -> None:
    """Write ``<name>_ts.onnx`` and ``<name>_dy.onnx`` (those of ``tags``) with the named ``axes`` of each
    input dynamic (by default batch and sequence, axes 0 and 1)."""
    import torch

    axes = axes or {n: {0: "batch", 1: "seq"} for n in inputs}
    dims = {d: torch.export.Dim(d, **({} if d == "batch" else {"max": 32})) for a in axes.values() for d in a.values()}
    shapes = tuple({i: dims[d] for i, d in axes[n].items()} for n in inputs)
    variadic = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    with tempfile.TemporaryDirectory() as tmp:
        for tag, options in (
            ("ts", dict(dynamo=False, opset_version=17, dynamic_axes=axes)),
            ("dy", dict(dynamo=True, dynamic_shapes=(shapes,) if variadic else shapes)),
        ):
            if tag not in tags:
                continue
            path = os.path.join(tmp, f"{tag}.onnx")
            export(model, example, inputs, outputs, path, **options)
            out = save_model(onnx.load(path), PKG_DIR / f"{name}_{tag}.onnx", smoke_feed={n: example[n] for n in inputs})
            print(f"wrote {out} ({out.stat().st_size} bytes)")


def export(model, example: dict[str, np.ndarray], inputs, outputs, path, **options) -> None:
    """``torch.onnx.export`` of ``model`` on the arrays ``example[name]`` of ``inputs``, written as one file
    without the dynamo exporter's per-node stack traces (70 % of the file)."""
    import torch

    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    torch.onnx.export(model, args, path, input_names=list(inputs), output_names=outputs, **options)
    proto = onnx.load(path)  # the dynamo exporter writes external data
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, path)


if __name__ == "__main__":
    import sys

    build(tuple(sys.argv[1:]))
