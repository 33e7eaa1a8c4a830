"""Attention heads pruned through a decoder's KV cache: one decoding step of a GPT-2- or Llama-shaped model
against the unpruned model in onnxruntime, in the same rounds.

``--arch gpt2``: HF ``GPT2Model`` with hidden 768 and 12 heads of 64 (GPT-2 small's attention). ``--arch
llama``: HF ``LlamaModel`` with hidden 768, 12 query heads of 64, ``--kv-heads`` key/value heads
(grouped-query attention when fewer than 12), SwiGLU FFN 2048, rotary embedding. Both with ``--layers``
layers and a vocabulary of 1024, random weights: the numbers are latency and memory, not quality.
PyTorch's TorchScript exporter writes it as one step on past keys and values
(``models.torch_exports.decoder_step``; benchmarks may use torch and transformers). Each point removes a
fraction of every block's heads (with grouped-query attention: key/value heads, each with the query heads
it serves) with ``prune-structured:heads=true,kv_cache=true`` (l2 importance): the Q/K/V and output
projections shrink, and so does every cache tensor. Per point: parameters, cache bytes
per token (keys and values of all layers, float32), and the latency of one step (batch 1, one new token)
on a past of each ``--past`` length: the median over rounds, and the paired ratio over the unpruned model
(the median over rounds of that round's ratio). The original's caches are fed cut to the kept heads.

    python bench/decoder_heads.py [--arch gpt2|llama] [--kv-heads 4] [--layers 4] [--past 128,1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

# the repository instead of bench/, whose kernels.py would shadow the ``kernels`` package transformers imports
sys.path[0] = str(Path(__file__).resolve().parents[1])

from models.torch_exports import cache_feeds  # noqa: E402
from onnxopt import io, registry, runtime, stats, validate  # noqa: E402

HEADS, HEAD_DIM, VOCAB = 12, 64, 1024


def step_feed(layers: int, past: int, cache_heads: int) -> dict[str, np.ndarray]:
    """One new token on random caches of ``past`` tokens (batch 1, the original's ``cache_heads`` heads)."""
    return cache_feeds(batch=1, seq=1, past=past, layers=layers, heads=cache_heads, head_dim=HEAD_DIM, vocab=VOCAB,
                       left_pad=0)


def export_step(arch: str, layers: int, kv_heads: int, positions: int, path: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    from models.torch_exports import _randomized, cache_axes, decoder_step, export

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_embd=HEADS * HEAD_DIM, n_layer=layers, n_head=HEADS, n_positions=positions,
                            vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        step = decoder_step(_randomized(GPT2Model(config).eval()), "gpt2")
    else:
        config = LlamaConfig(hidden_size=HEADS * HEAD_DIM, intermediate_size=2048, num_hidden_layers=layers,
                             num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                             vocab_size=VOCAB, max_position_embeddings=positions)
        step = decoder_step(_randomized(LlamaModel(config).eval()), "llama")
    inputs, outputs, axes = cache_axes(layers)
    # exported on 3 new tokens: on one, torch's SDPA bakes the one-token query into its grouped-query
    # Reshapes, and the model would take one new token per step
    example = cache_feeds(batch=1, seq=3, past=4, layers=layers, heads=kv_heads, head_dim=HEAD_DIM, vocab=VOCAB)
    export(step, example, inputs, outputs, str(path), dynamo=False, opset_version=17, dynamic_axes=axes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--kv-heads", type=int, default=4, help="llama: key/value heads (12 query heads)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--past", default="128,1024", help="past lengths, comma-separated")
    parser.add_argument("--ratios", default="0.25,0.5", help="fractions of each block's heads removed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    pasts = [int(p) for p in args.past.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    units = HEADS if args.arch == "gpt2" else args.kv_heads  # cache heads; pruning removes whole ones
    group = HEADS // units  # query heads per cache head

    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "step.onnx"
        export_step(args.arch, args.layers, units, max(pasts) + 8, original)
        rows = [(units, original, stats.model_stats(io.load(original)).parameters)]
        for ratio in ratios:
            model = io.load(original)
            prune = registry.get("prune-structured").create(
                {"heads": "true", "kv_cache": "true", "op_types": "", "ratio": str(ratio)})
            prune(model)
            kept = units - round(ratio * units)
            path = io.save(model, Path(tmp) / f"heads{kept}.onnx")
            rows.append((kept, path, stats.model_stats(model).parameters))

        sessions = [runtime.session(path, threads=args.threads) for _, path, _ in rows]
        timings = {}
        for past in pasts:
            feed = step_feed(args.layers, past, units)
            reference = runtime.run(sessions[0], None, feed)[0]
            cosines = [validate.compare(reference, runtime.run(s, None, feed)[0]).cosine for s in sessions]
            single = validate.latency_ms(sessions[0], feed, warmup=2, repeat=5)
            repeat = int(min(400, max(10, 30 / max(single, 1e-3))))  # rounds of ~30 ms
            medians, ratios_ = validate.interleaved_speedups(sessions, feed, rounds=args.rounds, repeat=repeat)
            timings[past] = (medians, ratios_, cosines)

    shape = "GPT-2" if args.arch == "gpt2" else f"Llama ({HEADS} query heads, {units} key/value heads)"
    print(f"{shape}-shaped decoder step: hidden {HEADS * HEAD_DIM}, {args.layers} layers, batch 1, one new token, "
          f"{args.threads} thread(s); onnxruntime fp32; ratio = unpruned time / this time, paired by round")
    header = f"{'heads kept (q/kv)':<19}{'parameters':>12}{'cache KB/token':>16}"
    for past in pasts:
        header += f"{f'past {past}: ms':>16}{'ratio':>8}{'cosine':>9}"
    print(header)
    for i, (kept, _, params) in enumerate(rows):
        label = f"{kept * group}/{kept}" + (" (original)" if i == 0 else "")
        line = f"{label:<19}{params:>12}{args.layers * 2 * kept * HEAD_DIM * 4 / 1024:>16.1f}"
        for past in pasts:
            medians, speedups, cosines = timings[past]
            line += f"{medians[i]:>16.3f}{speedups[i]:>8.2f}{cosines[i]:>9.3f}"
        print(line)
    print("(random weights: the cosine of last_hidden_state against the unpruned model only shows the step ran "
          "on the cut caches; quality needs a trained model)")


if __name__ == "__main__":
    main()
