"""Tests for qimera.models.cifar_resnet (architecture, fx traceability, real checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qimera.models.cifar_resnet import PadShortcut, resnet20, resnet32, resnet44, resnet56

SHARED_CKPT = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "teachers" / "resnet20-cifar10-optionA.th"
)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "expected"),
    [(resnet20, 269_722), (resnet32, 464_154), (resnet44, 658_586), (resnet56, 853_018)],
)
def test_parameter_counts(factory, expected) -> None:
    assert _num_params(factory()) == expected


def test_resnet20_is_about_027m_params() -> None:
    assert 0.26e6 < _num_params(resnet20()) < 0.28e6


def test_num_classes_and_output_shape() -> None:
    model = resnet20(num_classes=100).eval()
    assert model.linear.out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_fx_trace_has_19_functional_relus_and_no_relu_modules() -> None:
    model = resnet20().eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    traced = fx.symbolic_trace(model)
    relus = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is F.relu]
    assert len(relus) == 19
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_option_a_shortcut_is_parameter_free_pad() -> None:
    model = resnet20()
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert [s.pad for s in shortcuts] == [8, 16]
    assert not any(n.endswith("shortcut") or ".shortcut." in n for n in model.state_dict())
    x = torch.randn(1, 16, 8, 8)
    y = PadShortcut(8)(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_kaiming_init_is_applied() -> None:
    torch.manual_seed(0)
    conv = resnet56().layer3[0].conv1.weight  # fan_in = 32 * 9
    assert abs(conv.std().item() - (2.0 / (32 * 9)) ** 0.5) < 0.01


@pytest.mark.skipif(not SHARED_CKPT.is_file(), reason=f"shared checkpoint absent: {SHARED_CKPT}")
def test_shared_checkpoint_loads_strictly() -> None:
    blob = torch.load(SHARED_CKPT, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in blob["state_dict"].items()}
    model = resnet20()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
