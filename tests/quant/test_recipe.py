"""The quantization recipe and the two extension registries (weight layers, activation sites)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qimera.config import load_config
from qimera.quant import (
    ACTIVATION_SITES,
    WEIGHT_QUANT_REGISTRY,
    ActQuantizer,
    QuantRecipe,
    WeightQuantMixin,
    quantize_model,
    recipe_of,
    register_activation_site,
    register_weight_module,
)
from qimera.quant.functional import fake_quant_weight


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_config_section_becomes_the_recipe():
    cfg = load_config({"quant": {"w_bits": 5, "a_bits": 4, "first_last_8bit": True, "exclude": ["fc"],
                                 "ema_momentum": 0.8}})
    recipe = cfg.quant.recipe()
    assert recipe == QuantRecipe(5, 4, first_last_bits=8, exclude=("fc",), act_momentum=0.8)
    assert load_config({"quant": {"w_bits": 4, "a_bits": 4}}).quant.recipe().first_last_bits is None
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe and not recipe.integer_exact
    exact = load_config({"quant": {"w_bits": 4, "a_bits": 4, "integer_exact": True}}).quant.recipe()
    assert exact.integer_exact and QuantRecipe.from_dict(exact.to_dict()) == exact
    old = {k: v for k, v in exact.to_dict().items() if k != "integer_exact"}  # written before the key existed
    assert not QuantRecipe.from_dict(old).integer_exact
    with pytest.raises(ValueError, match="unknown key 'bits'"):
        QuantRecipe.from_dict({"bits": 4})


def test_recipe_checks_its_values():
    with pytest.raises(ValueError, match=r"quant.first_last_bits=1: must be an integer in 2..8"):
        QuantRecipe(4, 4, first_last_bits=1)
    with pytest.raises(ValueError, match="ema_momentum"):
        QuantRecipe(4, 4, act_momentum=1.0)
    with pytest.raises(ValueError, match="activation site 'gelu' is not registered"):
        QuantRecipe(4, 4, activations=("relu", "gelu"))
    with pytest.raises(TypeError, match="QuantRecipe"):
        quantize_model(nn.Sequential(nn.Conv2d(1, 1, 1)), 4)
    with pytest.raises(ValueError, match="quant.integer_exact=1: must be true or false"):
        QuantRecipe(4, 4, integer_exact=1)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.conv(x) if float(x.sum()) > 0 else x  # data-dependent: torch.fx cannot trace it


def test_integer_exact_needs_a_traced_student():
    with pytest.warns(UserWarning, match="could not trace"):
        with pytest.raises(ValueError, match="quant.integer_exact=true: torch.fx cannot trace _Untraceable"):
            quantize_model(_Untraceable(), QuantRecipe(4, 4, integer_exact=True))


def test_student_carries_its_recipe_through_copies():
    recipe = QuantRecipe(4, 3, first_last_bits=8)
    student, _ = quantize_model(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)), recipe)
    assert recipe_of(student) is recipe
    assert recipe_of(copy.deepcopy(student)) == recipe
    with pytest.raises(ValueError, match="no quantization recipe"):
        recipe_of(nn.Conv2d(1, 1, 1))


@pytest.fixture
def hardswish_site():
    """A user's extra activation site, registered for one test and removed afterwards."""
    register_activation_site("hardswish", modules=[nn.Hardswish], functions=[F.hardswish])
    yield "hardswish"
    del ACTIVATION_SITES["hardswish"]


class _HardswishNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = F.hardswish(self.conv2(x))
        return self.fc(F.relu(x).mean((2, 3)))


def test_registered_activation_site_gets_quantizers(hardswish_site):
    plain, report = quantize_model(_HardswishNet(), QuantRecipe(4, 4))
    assert _count(plain, ActQuantizer) == 1 and len(report.act_sites) == 1  # only F.relu
    student, report = quantize_model(_HardswishNet(), QuantRecipe(4, 4, activations=("relu", "relu6", hardswish_site)))
    assert _count(student, ActQuantizer) == 3
    assert report.act_sites[0] == "act" and "hardswish" in report.act_sites[1]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        student(x)  # calibrate once
        q = student.get_submodule("act_quant_0")
        # the quantizer after the module saw exactly Hardswish's output range
        expected = F.hardswish(student.get_submodule("conv1")(x))
        lo, hi = q.range
        assert float(lo) == pytest.approx(float(expected.min()), rel=1e-5)
        assert float(hi) == pytest.approx(float(expected.max()), rel=1e-5)


@pytest.fixture
def conv1d_registered():
    @register_weight_module(nn.Conv1d)
    class QuantConv1d(WeightQuantMixin, nn.Conv1d):
        @classmethod
        def from_float(cls, conv: nn.Conv1d, w_bits: int) -> "QuantConv1d":
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      bias=conv.bias is not None)
            return new._copy_from(conv, w_bits)

        def forward(self, x):
            return self._conv_forward(x, self.quantized_weight(), self.bias)

    yield QuantConv1d
    del WEIGHT_QUANT_REGISTRY[nn.Conv1d]


def test_registered_weight_module_is_swapped_in(conv1d_registered):
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1))
    student, report = quantize_model(model, QuantRecipe(3, 8))
    assert report.weight_layers == ["0", "2"] and _count(student, conv1d_registered) == 2
    layer = student.get_submodule("0")
    x = torch.randn(1, 2, 9)
    with torch.no_grad():
        assert torch.equal(layer(x), F.conv1d(x, fake_quant_weight(model[0].weight, 3), model[0].bias))
    with pytest.raises(TypeError, match="from_float"):
        register_weight_module(nn.Conv3d)(type("NoFromFloat", (nn.Conv3d,), {}))
