"""How far end-to-end distillation gets MiniLM's low-rank FFN: a bound for what layer-wise `recover` can reach.

    python bench/minilm_distill.py [--ratio 0.25] [--loss pooled|cosine|relational] [--epochs 6] [--lr 2e-4]

Factorizes the FFN layers with the library (`low-rank ratio=R activation_aware=true`, the calibration of
`bench/compress.py`), then fine-tunes only the factors U, V (and the FFN biases) with Adam through the whole
model (torch + transformers, bench only) so the pooled embedding matches fp32's on the same calibration
snippets plus single words (none from WordSim-353 or SimLex-999). After each epoch the factors are written
back into the ONNX model and the metric is measured with onnxruntime, as everywhere else.

Losses: ``pooled`` ‖p − p_fp32‖² / ‖p_fp32‖², ``cosine`` 1 − cos(p, p_fp32), ``relational`` the squared
difference of the cosine-similarity matrices of a batch (the quantity the metric ranks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/kernels.py would shadow the `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import torch  # noqa: E402
from transformers import BertModel  # noqa: E402

sys.path.insert(0, str(HERE))
import compress  # noqa: E402
import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
from models import evaluate  # noqa: E402
from models.tokenizer import minilm_package_dir  # noqa: E402

from onnxopt import io, runtime  # noqa: E402
from onnxopt.passes.low_rank import LowRankPass  # noqa: E402

PATH = compress.ROOT / "models/out/minilm.onnx"
FFN = ("intermediate", "output")  # BertLayer.intermediate.dense (384x1536), BertLayer.output.dense (1536x384)


def factorized_onnx(ratio: float, data) -> ir.Model:
    ffn, _ = compress.ffn_filter(PATH)
    model = io.load(PATH)
    LowRankPass(ratio=ratio, activation_aware=True, data=data, node_filter=ffn, samples=data.num_samples())(model)
    return model


def factor_name(layer: int, part: str, which: str) -> str:
    return f"encoder.layer.{layer}.{part}.dense.weight_lowrank_{which}"


def student_from(model: ir.Model) -> tuple[BertModel, list[torch.nn.Parameter]]:
    """HF BertModel whose FFN Linear layers are replaced by Linear(U) → Linear(V, original bias)."""
    student = BertModel.from_pretrained(str(minilm_package_dir())).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    trained = []
    for i, layer in enumerate(student.encoder.layer):
        for part in FFN:
            parent = getattr(layer, part)
            u = model.graph.initializers[factor_name(i, part, "u")].const_value.numpy()
            v = model.graph.initializers[factor_name(i, part, "v")].const_value.numpy()
            first = torch.nn.Linear(*u.shape, bias=False)
            second = torch.nn.Linear(*v.shape)
            first.weight.data, second.weight.data = torch.tensor(u.T.copy()), torch.tensor(v.T.copy())
            second.bias.data = parent.dense.bias.data.clone()
            parent.dense = torch.nn.Sequential(first, second)
            trained += [first.weight, second.weight, second.bias]
    for p in trained:
        p.requires_grad_(True)
    return student, trained


def write_back(student: BertModel, model: ir.Model) -> None:
    """Copy the trained U, V and FFN biases into the ONNX model (the bias is the Add after V)."""
    for i, layer in enumerate(student.encoder.layer):
        for part in FFN:
            first, second = getattr(layer, part).dense
            model.graph.initializers[factor_name(i, part, "u")].const_value = ir.tensor(first.weight.detach().numpy().T.copy())
            model.graph.initializers[factor_name(i, part, "v")].const_value = ir.tensor(second.weight.detach().numpy().T.copy())
            model.graph.initializers[f"encoder.layer.{i}.{part}.dense.bias"].const_value = ir.tensor(second.bias.detach().numpy().copy())


def pooled(model: BertModel, feed: dict[str, np.ndarray]) -> torch.Tensor:
    inputs = {k: torch.tensor(np.asarray(v, dtype=np.int64)) for k, v in feed.items()}
    mask = inputs["attention_mask"][..., None].float()
    return (model(**inputs).last_hidden_state * mask).sum(1) / mask.sum(1)


def loss_fn(kind: str, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "pooled":
        return ((p - target) ** 2).sum(1).mean() / (target**2).sum(1).mean()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(p, target)).mean()
    pn, tn = torch.nn.functional.normalize(p, dim=1), torch.nn.functional.normalize(target, dim=1)
    return ((pn @ pn.T - tn @ tn.T) ** 2).mean()


def metrics(model: ir.Model, wordsim) -> tuple[str, float]:
    """The WordSim cell (``compress.wordsim_with_interval``) and SimLex-999."""
    sess = runtime.session(io.to_bytes(model))
    return wordsim(sess), evaluate.word_similarity(sess, "simlex999")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--loss", choices=("pooled", "cosine", "relational"), default="pooled")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--words", type=int, default=4000)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = compress.minilm_calibration_dir(args.sentences, args.words)
    feeds = [dict(np.load(f)) for f in data.sources]
    teacher = BertModel.from_pretrained(str(minilm_package_dir())).eval()
    with torch.no_grad():
        targets = [pooled(teacher, f) for f in feeds]
    model = factorized_onnx(args.ratio, data)
    student, trained = student_from(model)
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    wordsim = compress.wordsim_with_interval(PATH)
    rows = [("fp32", "", *metrics(io.load(PATH), wordsim)), ("AA-SVD", "", *metrics(model, wordsim))]
    order = np.random.default_rng(0)
    for epoch in range(args.epochs):
        total = 0.0
        for j in order.permutation(len(feeds)):
            loss = loss_fn(args.loss, pooled(student, feeds[j]), targets[j])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        write_back(student, model)
        rows.append((f"epoch {epoch + 1}", f"{total / len(feeds):.4f}", *metrics(model, wordsim)))
        print(f"  epoch {epoch + 1} done", file=sys.stderr, flush=True)
    print(f"\n### MiniLM FFN low-rank ratio {args.ratio}, end-to-end distillation ({args.loss} loss, Adam lr {args.lr}, "
          f"{args.sentences} snippets + {args.words} words, {len(feeds)} batches of 8)\n")
    print("| model | train loss | WordSim-353 [95 % interval of the drop from fp32] | SimLex-999 |\n|---|---|---|---|")
    for name, loss, wordsim_cell, simlex in rows:
        print(f"| {name} | {loss or '-'} | {wordsim_cell} | {simlex:.4f} |")


if __name__ == "__main__":
    main()
