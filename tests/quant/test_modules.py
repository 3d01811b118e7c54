"""Activation quantizer EMA/freeze behaviour and weight-quantized layers."""

import pytest
import torch
import torch.nn as nn

from qimera.quant import ActQuantizer, QuantConv2d, QuantLinear, fake_quant_weight


def test_ema_bias_corrected_then_frozen():
    q = ActQuantizer(4)
    b1 = torch.tensor([0.0, 2.0])
    b2 = torch.tensor([-1.0, 4.0])
    q(b1)
    lo, hi = q.range
    # one step: bias correction gives the batch range itself
    assert lo.item() == pytest.approx(0.0)
    assert hi.item() == pytest.approx(2.0)
    q(b2)
    lo, hi = q.range
    # m2 = 0.9*0.1*2 + 0.1*4 = 0.58; corrected by 1 - 0.81 = 0.19
    assert hi.item() == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / 0.19)
    assert lo.item() == pytest.approx((0.1 * -1.0) / 0.19)
    q.set_calibrating(False)
    before = [t.clone() for t in q.range]
    out = q(torch.tensor([100.0, -100.0]))
    after = q.range
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    step = ((before[1] - before[0]) / 15).item()
    # clipped to the frozen range's grid (within one step: the zero point is rounded)
    assert abs(out.max().item() - before[1].item()) <= step
    assert abs(out.min().item() - before[0].item()) <= step


def test_frozen_before_calibration_raises():
    q = ActQuantizer(4)
    q.set_calibrating(False)
    with pytest.raises(RuntimeError, match="frozen before"):
        q(torch.ones(3))


def test_quantizer_state_in_state_dict():
    q = ActQuantizer(4)
    q(torch.tensor([0.0, 1.0]))
    sd = q.state_dict()
    assert set(sd) == {"min_avg", "max_avg", "steps"}
    q2 = ActQuantizer(4)
    q2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(q.range, q2.range))


def test_quant_conv_and_linear_match_manual():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    qc = QuantConv2d.from_float(conv, 4)
    x = torch.randn(2, 3, 5, 5)
    ref = nn.functional.conv2d(x, fake_quant_weight(conv.weight, 4), conv.bias, padding=1)
    torch.testing.assert_close(qc(x), ref)
    lin = nn.Linear(6, 4)
    ql = QuantLinear.from_float(lin, 3)
    z = torch.randn(5, 6)
    torch.testing.assert_close(ql(z), nn.functional.linear(z, fake_quant_weight(lin.weight, 3), lin.bias))
    # the float weight is kept (the student trains it) and gets gradients
    ql(z).sum().backward()
    assert ql.weight.grad is not None
