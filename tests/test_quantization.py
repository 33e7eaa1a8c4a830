"""Numerics of onnxopt.quantization: affine quantization, block-wise weights, int4 packing, calibrators, GPTQ."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import ops
from onnxopt import quantization as qz

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_matches_numpy_formula(dtype, symmetric):
    x = (RNG.standard_normal((64, 5)) * 3 + 1).astype(np.float32)
    low, high = qz.channel_ranges(x, 1)
    scale, zp = qz.scale_zero_point(low, high, dtype, symmetric)
    q = qz.quantize(x, scale, zp, dtype, axis=1)
    qmin, qmax = qz.INT_RANGES[dtype]
    expected = np.clip(np.rint(x / scale[None, :]) + zp[None, :].astype(np.float32), qmin, qmax)
    np.testing.assert_array_equal(q, expected.astype(q.dtype))
    back = qz.dequantize(q, scale, zp, axis=1)
    np.testing.assert_allclose(back, (expected - zp[None, :]) * scale[None, :], rtol=1e-6)
    # Inside the range, the error is at most half a step.
    assert np.all(np.abs(back - x) <= scale[None, :] / 2 + 1e-6)
    if symmetric:
        assert np.all(zp == (0 if dtype == "int8" else 128))


def test_scale_zero_point_edge_cases():
    scale, zp = qz.scale_zero_point(0.0, 0.0, "uint8", False)  # all-zero tensor: any scale, zero exact
    assert scale == 1.0 and zp == 0
    scale, zp = qz.scale_zero_point(2.0, 5.0, "uint8", False)  # range widened to hold 0
    assert zp == 0 and np.isclose(scale, 5.0 / 255)
    assert qz.int_range("int8", reduce_range=True) == (-64, 63)
    assert qz.int_range("uint8", reduce_range=True) == (0, 127)
    with pytest.raises(ValueError, match="unknown integer type"):
        qz.int_range("int3")


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_default_follows_the_cpu(monkeypatch, saturates):
    monkeypatch.setattr(qz, "u8s8_saturates", lambda: saturates)
    assert qz.resolve_reduce_range(None, "uint8", "int8") is saturates
    assert qz.resolve_reduce_range(None, "uint8", "uint8") is False  # u8 x u8 never saturates
    assert qz.resolve_reduce_range(None, "int8", "int8") is False
    assert qz.resolve_reduce_range(False, "uint8", "int8") is False  # an explicit choice wins
    assert qz.resolve_reduce_range(True, "uint8", "uint8") is True


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_quantization_bounds_and_format(bits, symmetric):
    w = RNG.standard_normal((100, 24)).astype(np.float32)  # K not a multiple of the block
    blocks = qz.quantize_blocks(w, bits, 32, symmetric)
    assert blocks.scales.shape == (4, 24)
    half = 1 << (bits - 1)
    if symmetric:
        assert blocks.codes.min() >= -half and blocks.codes.max() <= half - 1
    else:
        assert blocks.codes.min() >= 0 and blocks.codes.max() <= 2 * half - 1
    err = np.abs(blocks.dequantize() - w)
    step = np.abs(np.repeat(blocks.scales, 32, axis=0)[:100])
    # symmetric int4 maps the extreme to -8, so the opposite extreme may clip by up to one step
    bound = step if (symmetric and bits == 4) else step / 2
    assert np.all(err <= bound + 1e-6)
    # unsigned codes minus the (implicit) zero points give the same weights
    zp = np.repeat(blocks.unsigned_zero_points(), 32, axis=0)[:100].astype(np.float32)
    recon = (blocks.unsigned_codes().astype(np.float32) - zp) * np.repeat(blocks.scales, 32, axis=0)[:100]
    np.testing.assert_allclose(recon, blocks.dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_conventions_match_quant_matmul_packing(bits, symmetric):
    """Re-packing our dequantized weights for the QuantMatMul kernel reproduces them exactly."""
    w = RNG.standard_normal((64, 40)).astype(np.float32)
    w_hat = qz.quantize_blocks(w, bits, 32, symmetric).dequantize()
    packed = ops.pack_quant_matmul(w_hat, bits, 32, symmetric)
    np.testing.assert_allclose(ops.dense_weight(packed), w_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.dense_weight(ops.pack_quant_matmul(w, bits, 32, symmetric)), w_hat, atol=1e-6)


def test_nibble_packing_layout():
    codes = np.array([[1, 2, 3, 4, 5], [15, 0, 7, 8, 9]], np.uint8)
    packed = qz.pack_nibbles(codes)
    assert packed.shape == (2, 3)
    assert packed[0, 0] == 1 | (2 << 4) and packed[1, 0] == 15 and packed[0, 2] == 5
    np.testing.assert_array_equal(qz.unpack_nibbles(packed, 5), codes)
    big = RNG.integers(0, 16, (7, 64)).astype(np.uint8)
    np.testing.assert_array_equal(qz.unpack_nibbles(qz.pack_nibbles(big), 64), big)


def test_bad_block_options():
    with pytest.raises(ValueError, match="bits"):
        qz.quantize_blocks(np.ones((4, 4)), 3, 32)
    with pytest.raises(ValueError, match="block_size"):
        qz.quantize_blocks(np.ones((4, 4)), 4, 48)


def test_streaming_histogram_equals_one_shot():
    """Batches of growing range (histogram doublings) give the same counts as one update."""
    parts = [(RNG.standard_normal(5000) * s).astype(np.float32) for s in (0.1, 1.0, 7.0, 3.0)]
    streamed = qz.RangeCalibrator("percentile", percentile=99.0)
    for part in parts:
        streamed.update(part)
    whole = np.concatenate(parts)
    assert streamed.count == whole.size
    assert streamed.minimum == whole.min() and streamed.maximum == whole.max()
    assert streamed.hist.sum() + streamed.zeros == whole.size
    low, high = streamed.range()
    true = np.percentile(np.abs(whole), 99.0)
    assert abs(high - true) <= 2 * streamed.edge / streamed.hist.size
    assert streamed.hist.nbytes == qz.HISTOGRAM_BINS * 8  # fixed memory whatever the sample count


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile"])
def test_clipping_calibrators_cut_outliers(method):
    cal = qz.RangeCalibrator(method, percentile=99.9)
    x = RNG.standard_normal(400_000).astype(np.float32)
    x[:2] = 30.0  # rare outliers: clipping them costs less than the coarser steps of keeping them
    for batch in np.split(x, 8):
        cal.update(batch)
    low, high = cal.range()
    assert 1.0 < high < 15.0 and -15.0 < low < -1.0


def test_entropy_keeps_a_range_that_quantizes_exactly():
    """256 values k/255 with decaying counts (a ReLU output of 8-bit data): uint8 over [0, 1] gives each
    value its own level, so any clipping loses information and the optimal threshold is the maximum.
    (128 levels, the symmetric-int8 assumption, merged value pairs and clipped at 0.72.)"""
    k = np.arange(256)
    x = np.repeat((k / 255).astype(np.float32), (20000 * np.exp(-k / 40)).astype(int) + 1)
    cal = qz.RangeCalibrator("entropy")
    for batch in np.array_split(RNG.permutation(x), 4):
        cal.update(batch)
    assert cal.range(256, symmetric=False) == (0.0, 1.0)


def test_calibrator_counts_nonfinite_and_huge_values():
    cal = qz.RangeCalibrator("entropy")
    cal.update(np.array([0.0, -np.inf, 1.0, np.nan], np.float32))
    cal.update(np.array([-3.4e38, 0.5], np.float32))
    assert cal.nonfinite == 2 and cal.absmax == pytest.approx(3.4e38, rel=1e-3)
    cal.range()  # does not crash on the huge range
    with pytest.raises(ValueError, match="calibration"):
        qz.RangeCalibrator("kl")
    with pytest.raises(ValueError, match="no finite"):
        qz.RangeCalibrator().range()


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_output_error_not_worse_than_rtn(symmetric):
    """On a layer with correlated inputs GPTQ's output error is below round-to-nearest's."""
    k, n, m = 128, 48, 1024
    x = (RNG.standard_normal((m, 12)) @ RNG.standard_normal((12, k)) + 0.2 * RNG.standard_normal((m, k)))
    w = RNG.standard_normal((k, n)).astype(np.float32)
    h = x.T @ x / m
    h += np.eye(k) * 0.01 * np.mean(np.diag(h))
    rtn = qz.quantize_blocks(w, 4, 32, symmetric).dequantize()
    gptq = qz.gptq_quantize(w, qz.inverse_hessian_factor(h), 4, 32, symmetric)

    def err(w_hat):
        return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)

    assert err(gptq.dequantize()) <= err(rtn)
    assert err(gptq.dequantize()) < 0.7 * err(rtn)
    # same storage format and ranges as RTN
    assert gptq.codes.dtype == (np.int8 if symmetric else np.uint8) and gptq.scales.shape == (4, n)


def test_raise_opset_keeps_initializer_metadata():
    """onnx's converter (the fallback below opset 18) rebuilds the graph: the sparse-storage flag survives."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt import io

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7))
    model.graph.initializers["w"].meta[io.SPARSE_META_KEY] = True
    notes = []
    assert qz.raise_opset(model, 13, "a test", notes) and notes == ["default opset 11 -> 13 for a test"]
    assert model.opset_imports[""] == 13 and model.graph.initializers["w"].meta.get(io.SPARSE_META_KEY)
    assert not qz.raise_opset(model, 13, "a test", notes)
