"""Activation sites found by tracing, including functional and shared-module ReLUs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from qimera.quant import ActQuantizer, QuantConv2d, QuantLinear, QuantRecipe, act_quantizers, quantize_model, set_calibrating
from qimera.models.cifar_resnet import resnet20


def _count(model):
    return sum(1 for _ in act_quantizers(model))


@pytest.mark.parametrize(
    "factory, sites, weights",
    [
        # stem ReLU + 8 BasicBlocks x 2 calls of their one shared nn.ReLU
        (lambda: torchvision.models.resnet18(), 17, 21),
        # stem + 16 expanding blocks x 2 + first block 1 + last 1x1 conv: ReLU6 modules
        (lambda: torchvision.models.mobilenet_v2(), 35, 53),
        # 94 BasicConv2d, each F.relu(x, inplace=True); the aux head does not run in eval
        (lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=True), 94, 95),
        # option-A ResNet-20 written with F.relu: stem + 9 blocks x 2
        (lambda: resnet20(), 19, 20),
    ],
    ids=["resnet18", "mobilenet_v2", "inception_v3", "resnet20_F_relu"],
)
def test_activation_site_counts(factory, sites, weights):
    q, report = quantize_model(factory(), QuantRecipe(4, 4))
    assert report.traced
    assert _count(q) == sites == len(report.act_sites)
    assert len(report.weight_layers) == weights
    assert sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in q.modules()) == weights


class _Funky(nn.Module):
    """Every way of writing a ReLU, including in-place ones whose input is reused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.shared = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        a = F.relu(x)
        b = torch.relu(x - 1)
        c = x - 2
        F.relu_(c)  # in place: c is used afterwards, not the call's return value
        d = self.shared(x - 3)
        e = self.shared(x - 4)
        f = (x - 5).relu()
        g = F.relu6(x)
        out = a + b + c + d + e + f + g
        return self.fc(out.mean((2, 3)))


def test_every_functional_form_and_shared_module_gets_its_own_quantizer():
    model = _Funky().eval()
    q, report = quantize_model(model, QuantRecipe(4, 2))
    assert _count(q) == 7
    x = torch.randn(8, 1, 6, 6) * 10
    with torch.no_grad():
        q(x)  # calibrate
    set_calibrating(q, False)
    # every site observed data, including the in-place one
    assert all(m.steps.item() == 1 for m in act_quantizers(q))
    # with a 2-bit activation grid the output differs from the float model
    with torch.no_grad():
        assert not torch.allclose(q(x), model(x))


def test_in_place_site_is_quantized_on_its_later_use():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1.0
            F.relu_(y)
            return y + 0.0

    q, _ = quantize_model(M(), QuantRecipe(4, 2))
    x = torch.linspace(-1, 3, 100).reshape(1, 1, 10, 10)
    with torch.no_grad():
        out = q(x)
    # 2 bits: at most 4 distinct values reach the output
    assert out.unique().numel() <= 4


def test_original_model_untouched_and_student_eval():
    m = resnet20()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q, _ = quantize_model(m, QuantRecipe(4, 4))
    assert not any(isinstance(x, ActQuantizer) for x in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not q.training


def test_first_last_8bit_and_exclude():
    q, report = quantize_model(resnet20(), QuantRecipe(4, 4, first_last_bits=8))
    bits = report.weight_bits
    order = report.weight_layers
    assert bits[order[0]] == 8 and bits[order[-1]] == 8
    assert all(bits[n] == 4 for n in order[1:-1])
    q2, report2 = quantize_model(resnet20(), QuantRecipe(4, 4, exclude=("linear", "layer3.*")))
    assert "linear" not in report2.weight_layers
    assert not any(n.startswith("layer3.") for n in report2.weight_layers)
    assert isinstance(q2.get_submodule("linear"), nn.Linear) and not isinstance(q2.get_submodule("linear"), QuantLinear)


def test_exclude_patterns_that_match_nothing_or_everything_are_refused():
    """Issue 21: ``quant.exclude: ["*"]`` quantized no layer while the summary said w_bits 4."""
    for exclude, needle in ((("lienar",), "pattern 'lienar' matches no layer with weights (fnmatch on module names: "
                                          "conv1, layer1.0.conv1, layer1.0.conv2, layer1.1.conv1, … (20 in all))"),
                            (("*",), "quant.exclude=['*'] matches every layer with weights"),
                            (("conv1", "layer*", "linear"), "matches every layer with weights")):
        with pytest.raises(ValueError) as info:
            quantize_model(resnet20(), QuantRecipe(4, 4, exclude=exclude))
        assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [1, 9, 0, "4", 4.0])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="2..8"):
        quantize_model(resnet20(), QuantRecipe(bad, 4))


def test_untraceable_model_falls_back_with_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                x = -x
            return self.act(self.conv(x))

    with pytest.warns(UserWarning, match="could not trace"):
        q, report = quantize_model(Dynamic(), QuantRecipe(4, 4))
    assert not report.traced and _count(q) == 1
