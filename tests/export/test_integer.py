"""Integer export: packing, and a reloaded model whose logits equal the fake-quant student's."""

import json

import pytest
import torch

from qimera.baselines import calibrate
from qimera.data import load_eval_data
from qimera.export import ExportError, export_integer, load_integer, pack_int4, unpack_int4
from qimera.models.cifar_resnet import resnet20
from qimera.models.digits_cnn import DigitsCNN
from qimera.quant import QuantRecipe, quantize_model


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        v = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        packed = pack_int4(v)
        assert packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_int4(packed, n), v)
    assert pack_int4(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21


def _student(model, w_bits, a_bits, inputs):
    student, _ = quantize_model(model, QuantRecipe(w_bits, a_bits))
    calibrate(student, inputs)
    return student


@pytest.mark.parametrize("w_bits, a_bits", [(4, 4), (5, 5), (2, 8), (8, 3)])
def test_reloaded_logits_equal_fake_quant_student(tmp_path, w_bits, a_bits):
    torch.manual_seed(0)
    model = DigitsCNN(10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    data = load_eval_data("digits", batch_size=540)
    x, _ = next(iter(data.loader))
    student = _student(model, w_bits, a_bits, [x[:256]])
    qmap = export_integer(student, tmp_path / "int", arch="qimera.models.digits_cnn:DigitsCNN",
                          arch_kwargs={"num_classes": 10})
    rebuilt = load_integer(tmp_path / "int")
    with torch.no_grad():
        delta = (rebuilt(x) - student(x)).abs().max().item()
    assert delta <= 1e-5
    assert json.loads((tmp_path / "int" / "quant_map.json").read_text()) == qmap
    info = qmap["layers"]["features.0"]
    assert info["packed"] == (w_bits <= 4) and info["bits"] == w_bits
    assert len(qmap["activations"]) == 3


def test_resnet20_export_is_packed_and_exact(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32)
    student = _student(resnet20(), 4, 4, [x])
    export_integer(student, tmp_path / "r20", arch="qimera.models.cifar_resnet:resnet20",
                   arch_kwargs={"num_classes": 10})
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "r20" / "student.safetensors"))
    w = student.get_submodule("layer1.0.conv1").weight
    assert tensors["layer1.0.conv1.qweight"].numel() == w.numel() // 2  # two 4-bit weights per byte
    assert tensors["layer1.0.conv1.scale"].shape == (16,)
    rebuilt = load_integer(tmp_path / "r20")
    with torch.no_grad():
        assert (rebuilt(x) - student(x)).abs().max().item() <= 1e-5


def test_unfrozen_student_and_bad_dirs_refused(tmp_path):
    student, _ = quantize_model(DigitsCNN(10).eval(), QuantRecipe(4, 4))
    with pytest.raises(ExportError, match="not frozen"):
        export_integer(student, tmp_path / "x", arch="qimera.models.digits_cnn:DigitsCNN")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="not an integer export"):
        load_integer(tmp_path)


def test_format_1_maps_still_load(tmp_path):
    """Exports written before the recipe object (bit options at the map's top level)."""
    torch.manual_seed(2)
    x = torch.randn(8, 1, 8, 8)
    student = _student(DigitsCNN(10).eval(), 5, 4, [x])
    qmap = export_integer(student, tmp_path / "int", arch="qimera.models.digits_cnn:DigitsCNN",
                          arch_kwargs={"num_classes": 10})
    assert qmap["format_version"] == 2 and qmap["recipe"]["w_bits"] == 5 and qmap["recipe"]["a_bits"] == 4
    old = {k: v for k, v in qmap.items() if k != "recipe"}
    old.update(format_version=1, w_bits=5, a_bits=4, first_last_bits=None, exclude=[])
    (tmp_path / "int" / "quant_map.json").write_text(json.dumps(old))
    with torch.no_grad():
        assert (load_integer(tmp_path / "int")(x) - student(x)).abs().max().item() <= 1e-5
