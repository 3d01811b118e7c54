"""qimera.quant.kernels against onnxruntime's own kernels, bit for bit, on the same integers."""

import numpy as np
import pytest
import torch

from qimera.quant.kernels import (accumulator_bias, fits_float32, qlinear_add, qlinear_conv, quantize_linear,
                                  requant_multiplier)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _run(node, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray]) -> np.ndarray:
    """One onnxruntime node on ``inputs``, its other operands as initializers, no graph
    optimisation (the kernel itself runs)."""
    types = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.float32): TensorProto.FLOAT}
    graph = helper.make_graph(
        [node], "kernel", [helper.make_tensor_value_info(k, types[v.dtype], list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.UINT8, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize("stride,zero_point,x_top", [(1, 0, 15), (2, 97, 15), (1, 0, 255)])
def test_qlinear_conv_is_onnxruntimes(stride, zero_point, x_top):
    rng = np.random.default_rng(stride + zero_point)
    x = rng.integers(0, x_top + 1, (3, 16, 10, 10)).astype(np.uint8)
    w = (rng.integers(-15, 16, (24, 16, 3, 3)) * 4).astype(np.int8)
    x_scale = np.float32(rng.uniform(0.01, 0.2))
    w_scale = rng.uniform(1e-4, 1e-2, 24).astype(np.float32)
    y_scale = np.float32(rng.uniform(0.05, 0.3))
    bias = accumulator_bias(torch.from_numpy(rng.normal(0, 1, 24).astype(np.float32)), torch.tensor(x_scale),
                            torch.from_numpy(w_scale))
    assert bias.dtype == torch.int32 and fits_float32(x_top, 60, 16 * 9)
    assert not fits_float32(255, 64, 4608) and not fits_float32(15, 127, 576, bias_max=2.0**24)
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[1, 1, 1, 1], strides=[stride, stride])
    ref = _run(node, {"x": x}, {"xs": x_scale, "xz": np.uint8(0), "w": w, "ws": w_scale, "wz": np.zeros(24, np.int8),
                                "ys": y_scale, "yz": np.uint8(zero_point), "b": bias.numpy()})
    mine = qlinear_conv(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(w.astype(np.float32)), bias,
                        requant_multiplier(torch.tensor(x_scale), torch.from_numpy(w_scale), torch.tensor(y_scale)),
                        zero_point, stride=stride, padding=1)
    assert ref.shape == tuple(mine.shape) and (mine.numpy() == ref).all()
    assert len(np.unique(ref)) > 20  # a spread of outputs, not one saturated value


@pytest.mark.parametrize("scales", ["arbitrary", "power_of_two"])
def test_qlinear_add_is_onnxruntimes(scales):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (2, 8, 16, 16)).astype(np.uint8)
    b = rng.integers(0, 16, (2, 8, 16, 16)).astype(np.uint8)
    c_scale = np.float32(0.093)
    if scales == "power_of_two":  # the int8 form's residual grid: many exact ties, rounded half to even
        a_scale, a_zero = np.float32(c_scale / 8), 97
    else:
        a_scale, a_zero = np.float32(0.0137), 101
    b_scale = np.float32(0.071)
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain="com.microsoft")
    ref = _run(node, {"a": a, "b": b}, {"sa": a_scale, "za": np.uint8(a_zero), "sb": b_scale, "zb": np.uint8(0),
                                        "sc": c_scale, "zc": np.uint8(0)})
    mine = qlinear_add(torch.from_numpy(a.astype(np.float32)), torch.tensor(a_scale), a_zero,
                       torch.from_numpy(b.astype(np.float32)), torch.tensor(b_scale), 0, torch.tensor(c_scale), 0)
    assert (mine.numpy() == ref).all() and 0 < (ref == 0).mean() < 1


def test_quantize_linear_divides_like_onnxruntime():
    # values near half a step, where x / scale and x * (1 / scale) can round apart
    scale = np.float32(0.1)
    rng = np.random.default_rng(3)
    x = ((rng.integers(0, 250, 20000) + 0.5) * scale).astype(np.float32)
    x = np.nextafter(x, rng.choice([-np.inf, np.inf], x.shape).astype(np.float32)).reshape(1, -1)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    ref = _run(node, {"x": x}, {"s": scale, "z": np.uint8(3)})
    assert (quantize_linear(torch.from_numpy(x), torch.tensor(scale), 3).numpy() == ref).all()
    by_product = torch.clamp(torch.round(torch.from_numpy(x) * (1 / torch.tensor(scale))) + 3, 0, 255)
    assert not (by_product.numpy() == ref).all()  # the test can tell the two apart


def test_accumulator_bias_rounds_to_the_accumulator_grid():
    bias = torch.tensor([0.0, 1.0, -2.5, 1e12])
    q = accumulator_bias(bias, torch.tensor(0.5), torch.tensor([1.0, 0.25, 1.0, 1.0]))
    assert q.tolist() == [0, 8, -5, 2**31 - 1]  # 1 / (0.5 * 0.25) = 8; -2.5 / 0.5 = -5; saturated


def test_wide_accumulation_keeps_partial_sums_that_float32_would_round():
    # 8-bit inputs, int8 weights, a deep fan-in: sums beyond 2**24, where float32 rounds
    x = torch.full((1, 512, 3, 3), 255.0)
    w = torch.full((1, 512, 3, 3), 127.0)
    w[0, 0, 0, 0] = 126.0  # the exact sum, 149,860,095, is odd: float32 cannot hold it
    bias = torch.tensor([1], dtype=torch.int32)
    one = torch.ones(1)
    wide = qlinear_conv(x, w, bias, one, 0, qmax=2**31, wide=True)
    exact = float(torch.tensor(255.0 * 127 * 512 * 9 - 255 + 1, dtype=torch.float64).float())
    assert not fits_float32(255, 127, 512 * 9) and wide.item() == exact  # float(acc) as the kernel rounds it
    # the test can tell the two apart: summed in float32 one product after another, this
    # input loses the exact sum. (Whether a CPU's float32 convolution, qlinear_conv's
    # narrow path, loses it depends on its order of sums: on AVX2 it does; on a Xeon with
    # AMX, oneDNN's blocked order kept it.)
    products = (x * w).flatten()
    running = torch.zeros((), dtype=torch.float32)
    for p in products:
        running = running + p
    assert float(running + 1) != exact
