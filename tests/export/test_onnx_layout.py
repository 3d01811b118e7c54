"""The integer-exact int8 form's channels-last pass: the same logits to the bit as the
fused NCHW graph, without onnxruntime's Transpose pair around every residual block."""

import collections

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import qimera.export.onnx_int8 as onnx_int8  # noqa: E402
from qimera.export import export_onnx  # noqa: E402
from qimera.export.onnx_layout import MS_DOMAIN, channels_last_convs  # noqa: E402
from qimera.models.cifar_resnet import resnet20  # noqa: E402
from qimera.quant import QuantRecipe, quantize_model, set_calibrating  # noqa: E402


def _optimized(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return session, ops


def test_residual_chain_runs_channels_last_with_the_same_logits(tmp_path, monkeypatch):
    """Option-A ResNet-20 (identity and sliced, zero-padded shortcuts), random weights,
    integer-exact 4w4a: every block convolution is written as a channels-last QLinearConv,
    the shortcut slices and pads run on the uint8 tensor, onnxruntime's graph keeps two
    Transposes (after the stem's quantizer, before the pooling) instead of one pair per
    block, and the logits equal those of the form without the pass, to the bit."""
    torch.manual_seed(0)
    student, _ = quantize_model(resnet20().eval(), QuantRecipe(4, 4, integer_exact=True))
    student.eval()
    set_calibrating(student, True)
    with torch.no_grad():
        student(torch.randn(16, 3, 32, 32))
    set_calibrating(student, False)
    fast, plain = tmp_path / "fast.onnx", tmp_path / "plain.onnx"
    report = export_onnx(student, fast, input_size=(3, 32, 32), form="int8")
    monkeypatch.setattr(onnx_int8, "channels_last_convs", lambda proto: 0)
    export_onnx(student, plain, input_size=(3, 32, 32), form="int8")
    monkeypatch.undo()
    assert report.channels_last_convs == 18
    graph = onnx.load(str(fast)).graph
    lowered = [n for n in graph.node if n.op_type == "QLinearConv"]
    assert len(lowered) == 18 and {n.domain for n in lowered} == {MS_DOMAIN}
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in lowered for a in n.attribute
               if a.name == "channels_last")
    assert not [n for n in graph.node if n.op_type == "Conv" and n.input[0] != "images"]  # only the float stem
    fast_run, fast_ops = _optimized(fast, tmp_path)
    plain_run, plain_ops = _optimized(plain, tmp_path)
    assert plain_ops["Transpose"] == 18 and fast_ops["Transpose"] == 2, (plain_ops, fast_ops)
    assert fast_ops["QLinearConv"] == plain_ops["QLinearConv"] == 18 and fast_ops["QLinearAdd"] == 9
    assert fast_ops["Pad"] == 2 and fast_ops.get("DequantizeLinear", 0) == 1  # the shortcut pads uint8
    x = torch.randn(8, 3, 32, 32).numpy() * 2
    assert (fast_run.run(None, {"images": x})[0] == plain_run.run(None, {"images": x})[0]).all()


def test_a_graph_without_the_pattern_is_left_as_it_is():
    """No fusable convolution (a float Conv between float tensors): nothing changes."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(torch.randn(4, 3, 3, 3).numpy(), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = proto.SerializeToString()
    assert channels_last_convs(proto) == 0 and proto.SerializeToString() == before
