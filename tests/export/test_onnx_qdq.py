"""ONNX export with QuantizeLinear/DequantizeLinear, run by onnxruntime without custom ops."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import qimera  # noqa: E402
from qimera.baselines import calibrate, naive_student  # noqa: E402
from qimera.data import load_eval_data  # noqa: E402
from qimera.evaluate import evaluate  # noqa: E402
from qimera.export import (ExportError, OnnxRuntimeModel, export_integer, export_onnx, load_integer,  # noqa: E402
                           qdq_model)
from qimera.export.onnx_qdq import _integer_form  # noqa: E402
from qimera.models.digits_cnn import DigitsCNN  # noqa: E402
from qimera.quant import QuantRecipe, quantize_model  # noqa: E402

from qtest_paths import R20_ARCH, needs_shared, shared_r20_config  # noqa: E402


def _digits_student(w_bits, a_bits, seed=0, integer_exact=False):
    torch.manual_seed(seed)
    model = DigitsCNN(10).eval()
    data = load_eval_data("digits", batch_size=540)
    x, _ = next(iter(data.loader))
    student, _ = quantize_model(model, QuantRecipe(w_bits, a_bits, integer_exact=integer_exact))
    calibrate(student, [x[:256]])
    return student, data


def _agreement(a: torch.nn.Module, b: torch.nn.Module, loader) -> float:
    same = total = 0
    with torch.no_grad():
        for x, _ in loader:
            same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
            total += len(x)
    return same / total


@pytest.mark.parametrize("bits", [4, 5])
def test_digits_onnx_is_qdq_and_agrees_with_student(tmp_path, bits):
    student, data = _digits_student(bits, bits)
    path = tmp_path / "student.onnx"
    report = export_onnx(student, path, input_size=(1, 8, 8), metadata={"qimera.w_bits": bits})
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert {n.domain for n in model.graph.node} <= {""}  # standard ONNX ops only
    assert ops.count("QuantizeLinear") == ops.count("Clip") == report.qdq_activations == 3
    assert ops.count("DequantizeLinear") == report.qdq_weights + report.qdq_activations == 7
    assert not report.float_weights and not report.float_activations
    ints = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) >= 2]
    assert len(ints) == 4 and all(max(onnx.numpy_helper.to_array(i).ravel()) < 2 ** bits for i in ints)
    clip_max = [onnx.numpy_helper.to_array(i).item() for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 0 and i.name in
                {n.input[2] for n in model.graph.node if n.op_type == "Clip"}]
    assert clip_max and set(clip_max) == {2 ** bits - 1}
    assert {p.key: p.value for p in model.metadata_props}["qimera.w_bits"] == str(bits)

    ort_model = OnnxRuntimeModel(path)
    torch_top1 = evaluate(student, data.loader, num_classes=10).top1
    onnx_top1 = evaluate(ort_model, data.loader, num_classes=10).top1
    assert abs(onnx_top1 - torch_top1) <= 0.1
    assert _agreement(student, ort_model, data.loader) >= 0.995
    x, _ = next(iter(data.loader))
    with torch.no_grad():
        twin, _ = qdq_model(student)
        assert (ort_model(x[:1]) - twin(x[:1])).abs().max() < 1e-3  # dynamic batch: 1 and 7 too
        assert ort_model(x[:7]).shape == (7, 10)


def test_qdq_twin_matches_fake_quant_student():
    student, data = _digits_student(4, 4, seed=3)
    twin, report = qdq_model(student)
    assert report.qdq_weights == 4 and report.qdq_activations == 3
    x, _ = next(iter(data.loader))
    with torch.no_grad():
        delta = (twin(x) - student(x)).abs()
    # x / (1/s) and x * s differ in the last float bit: a value on a rounding boundary may
    # land on the next level, so a few logits move a little; nearly all are identical
    assert delta.mean() < 1e-5 and (delta > 1e-6).float().mean() < 0.01
    assert _agreement(student, twin, data.loader) >= 0.995


def test_zero_points_pick_the_8bit_type_that_holds_them():
    q = torch.tensor([-8.0, 7.0])
    ints, zp, offset = _integer_form(q, torch.tensor([8.0, 3.0]), -8)  # range contains 0: unsigned
    assert ints.dtype == zp.dtype == torch.uint8 and offset == 8
    assert torch.equal(ints.float() - zp.float(), q + torch.tensor([8.0, 3.0]))
    ints, zp, _ = _integer_form(q, torch.tensor([20.0, 30.0]), -8)  # range above 0: signed
    assert ints.dtype == zp.dtype == torch.int8
    assert torch.equal(ints.float() - zp.float(), q + torch.tensor([20.0, 30.0]))
    assert _integer_form(q, torch.tensor([500.0, 8.0]), -8) is None  # neither: stays float


def test_ranges_no_8bit_zero_point_holds_stay_exact_float(tmp_path):
    student, data = _digits_student(4, 4, seed=1)
    with torch.no_grad():
        conv = student.get_submodule("features.0")
        conv.weight[0].uniform_(40.0, 40.01)  # one channel far from 0: zero point ~ -60000
        site = next(m for n, m in student.named_modules() if n.startswith("act_quant"))
        site.min_avg.copy_(site.max_avg * 0.999)  # lo just below hi: zero point ~ -15000
    twin, report = qdq_model(student)
    assert report.float_weights == ["features.0"] and len(report.float_activations) == 1
    x, _ = next(iter(data.loader))
    with torch.no_grad():
        assert (twin(x) - student(x)).abs().max() < 1e-3
    path = tmp_path / "m.onnx"
    export_onnx(student, path, input_size=(1, 8, 8))
    assert _agreement(student, OnnxRuntimeModel(path), data.loader) >= 0.99


def test_unfrozen_student_refused_and_nothing_written(tmp_path):
    student, _ = quantize_model(DigitsCNN(10).eval(), QuantRecipe(4, 4))
    with pytest.raises(ExportError, match="not frozen"):
        export_onnx(student, tmp_path / "m.onnx", input_size=(1, 8, 8))
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_shared_resnet20_onnx_and_integer_agree_with_student(tmp_path):
    prep = qimera.prepare(shared_r20_config(tmp_path / "run"))
    student = naive_student(prep.cfg, prep.teacher)
    loader = prep.eval_data.loader
    export_integer(student, tmp_path / "int", arch=R20_ARCH, arch_kwargs={"num_classes": 10})
    report = export_onnx(student, tmp_path / "r20.onnx", input_size=(3, 32, 32))
    assert report.qdq_weights == 20 and report.qdq_activations == 19
    rebuilt = load_integer(tmp_path / "int")
    ort_model = OnnxRuntimeModel(tmp_path / "r20.onnx")
    top1 = evaluate(student, loader, num_classes=10).top1
    max_delta = 0.0
    with torch.no_grad():
        for x, _ in loader:
            max_delta = max(max_delta, float((rebuilt(x) - student(x)).abs().max()))
    assert max_delta <= 1e-5
    assert abs(evaluate(ort_model, loader, num_classes=10).top1 - top1) <= 0.1
