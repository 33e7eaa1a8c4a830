"""Per-layer budget for MiniLM's low-rank FFN: each layer's sensitivity, and a greedy allocation of the ratio.

For each encoder layer, only that layer's FFN pair (384x1536 and 1536x384) is factored (activation-aware
SVD on ``--snippets`` news snippets of ``lee_background.cor``, as ``bench/compress.py`` calibrates) at each
of ``--ratios``, and the model's mean-pooled embeddings of held-out snippets are compared with fp32's
(mean cosine distance). The held-out snippets come from gensim's ``lee.cor``, a different corpus with no
sentence in common with the calibration's; no word list of the metric is used. Every FFN pair has the
same shapes, so raising one layer by a step of the ratio grid and lowering another by the same step keeps
the parameter count; starting from the middle ratio everywhere, the greedy allocation makes the trade with
the largest gain while the distance removed exceeds the distance added, and prints the recipe lines.

    python bench/minilm_allocation.py [--ratios 0.1,0.25,0.4] [--snippets 256] [--held-out 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress  # noqa: E402
from models import evaluate  # noqa: E402

from onnxopt import io, pipeline  # noqa: E402
from onnxopt.filters import NodeFilter  # noqa: E402

PATH = compress.ROOT / "models/out/minilm.onnx"


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(1.0 - cos))


def ffn_pairs() -> list[list[str]]:
    """The FFN MatMuls by encoder layer, in graph order: [[up, down], ...]."""
    _, names = compress.ffn_filter(PATH)
    order = {node.name: i for i, node in enumerate(io.load(PATH).graph)}
    names = sorted(names, key=order.__getitem__)
    return [names[i : i + 2] for i in range(0, len(names), 2)]


def allocations(distance: np.ndarray, tie: float = 0.05) -> list[tuple[int, ...]]:
    """Greedy trades on a [layer, ratio] table of distances, from the middle ratio everywhere: raise the
    layer whose distance falls most, lower the one whose distance rises least, while the fall exceeds the
    rise. Where other layers come within ``tie`` (relative) of the best raise or lower, every such choice
    is followed: the allocations reached (indices into the ratio grid), for a joint comparison."""
    found = set()

    def walk(level: tuple[int, ...], moved: frozenset) -> None:
        ups = {l: distance[l, v] - distance[l, v + 1] for l, v in enumerate(level)
               if v + 1 < distance.shape[1] and (l, -1) not in moved}
        downs = {l: distance[l, v - 1] - distance[l, v] for l, v in enumerate(level) if v > 0 and (l, +1) not in moved}
        trades = []
        if ups and downs:
            best_gain, best_loss = max(ups.values()), min(downs.values())
            trades = [(u, d) for u, gain in ups.items() for d, loss in downs.items()
                      if u != d and gain > loss and gain >= best_gain * (1 - tie) and loss <= best_loss * (1 + tie)]
        if not trades:
            found.add(level)
        for up, down in trades:
            nxt = list(level)
            nxt[up] += 1
            nxt[down] -= 1
            walk(tuple(nxt), moved | {(up, +1), (down, -1)})

    walk(tuple([distance.shape[1] // 2] * distance.shape[0]), frozenset())
    return sorted(found)


def pooled_distance(specs: list[pipeline.PassSpec], data, texts: list[str], reference: np.ndarray, name: str) -> float:
    model, _ = pipeline.run_pipeline(io.load(PATH), specs, data, check=False, numeric_check=False)
    path = io.save(model, compress.TMP / name)
    distance = cosine_distance(evaluate.embed(path, texts), reference)
    path.unlink()
    return distance


def low_rank_specs(pairs: list[list[str]], ratios: list[float], samples: int) -> list[pipeline.PassSpec]:
    """One activation-aware low-rank pass per distinct ratio, over the layers given it."""
    specs = []
    for ratio in sorted(set(ratios)):
        names = [n for pair, r in zip(pairs, ratios) if r == ratio for n in pair]
        specs.append(pipeline.PassSpec("low-rank", {"ratio": ratio, "activation_aware": True, "samples": samples},
                                       NodeFilter(name_regex="^(" + "|".join(names) + ")$")))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.25,0.4")
    parser.add_argument("--snippets", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=48)
    args = parser.parse_args()
    if not PATH.exists():
        sys.exit("run `python -m models.minilm` first")
    ratios = [float(r) for r in args.ratios.split(",")]
    data = compress.minilm_calibration_dir(args.snippets, 0)
    texts = evaluate.news_snippets("lee.cor", args.held_out)  # the calibration reads lee_background.cor
    reference = evaluate.embed(PATH, texts)
    pairs = ffn_pairs()
    distance = np.zeros((len(pairs), len(ratios)))
    for l, pair in enumerate(pairs):
        for r, ratio in enumerate(ratios):
            specs = low_rank_specs([pair], [ratio], args.snippets)
            distance[l, r] = pooled_distance(specs, data, texts, reference, f"layer{l}_{ratio}.onnx")
            print(f"  layer {l} ratio {ratio}: {distance[l, r]:.4f}", file=sys.stderr, flush=True)
    print(f"\n### Cosine distance of pooled embeddings to fp32 ({args.held_out} held-out lee.cor snippets), "
          f"one layer's FFN pair factored ({args.snippets} calibration snippets)\n")
    print("| layer | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for l, row in enumerate(distance):
        print(f"| {l} | " + " | ".join(f"{d:.4f}" for d in row) + " |")
    candidates = [[ratios[i] for i in level] for level in allocations(distance)]
    if len(candidates) > 1:  # near-ties in the table: compare the whole allocations on the held-out snippets
        joint = [pooled_distance(low_rank_specs(pairs, c, args.snippets), data, texts, reference, "joint.onnx") for c in candidates]
        print("\n| allocation (layers 0-5) | joint distance |\n|---|---|")
        for c, d in zip(candidates, joint):
            print(f"| {', '.join(map(str, c))} | {d:.4f} |")
        chosen = candidates[int(np.argmin(joint))]
    else:
        chosen = candidates[0]
    print(f"\nallocation, same parameters as ratio {ratios[len(ratios) // 2]} everywhere: {chosen}\n")
    for spec in low_rank_specs(pairs, chosen, args.snippets):
        print(f'[[passes]]\nname = "low-rank"\noptions = {{ ratio = {spec.options["ratio"]}, activation_aware = true, '
              f'samples = {args.snippets} }}\nname_regex = "{spec.node_filter.name_regex}"\n')


if __name__ == "__main__":
    main()
