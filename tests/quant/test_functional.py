"""Quantizer maths: hand-computed values, PyTorch's fake-quant ops, straight-through grads."""

import pytest
import torch

from qimera.quant import (
    affine_params,
    fake_quant,
    fake_quant_reference,
    fake_quant_weight,
    per_channel_minmax,
    qrange,
    to_torch_qparams,
)


def test_qrange():
    assert qrange(4) == (-8, 7)
    assert qrange(2) == (-2, 1)
    assert qrange(8) == (-128, 127)


def test_hand_computed_2bit():
    # b=2, [lo, hi] = [0, 3]: n=3, s=1, z=round(0)+2=2 -> levels 0,1,2,3
    x = torch.tensor([-1.0, 0.2, 0.6, 1.49, 2.51, 3.0, 7.0])
    out = fake_quant_reference(x, torch.tensor(0.0), torch.tensor(3.0), 2)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 3.0]


def test_hand_computed_4bit_negative_range():
    # b=4, [-1, 2]: n=15, s=5, z=round(-5)+8=3; grid step 0.2 from -1.0 to 2.0
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    s, z = affine_params(lo, hi, 4)
    assert s.item() == pytest.approx(5.0)
    assert z.item() == 3.0
    x = torch.tensor([-3.0, -1.0, -0.91, 0.0, 0.33, 1.99, 5.0])
    out = fake_quant_reference(x, lo, hi, 4)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.4, 2.0, 2.0]))


def test_degenerate_range_does_not_divide_by_zero():
    x = torch.full((5,), 0.5)
    out = fake_quant_reference(x, torch.tensor(0.5), torch.tensor(0.5), 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_fast_path_equals_reference(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=g) * 2
    lo, hi = torch.tensor(-1.3), torch.tensor(2.7)
    assert torch.equal(fake_quant(x, lo, hi, bits), fake_quant_reference(x, lo, hi, bits))


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_per_tensor_agrees_with_torch_fake_quantize(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, generator=g) * 6  # post-ReLU-like range, includes clipping above hi
    lo, hi = torch.tensor(0.0), torch.tensor(4.5)
    s, z = affine_params(lo, hi, bits)
    scale, zp = to_torch_qparams(s, z)
    qmin, qmax = qrange(bits)
    ours = fake_quant(x, lo, hi, bits)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    # torch multiplies by 1/scale instead of s: values may differ only at exact rounding
    # ties, by one step
    diff = (ours - ref).abs()
    assert diff.max() <= 1.0 / s + 1e-6
    assert (diff > 1e-6).float().mean() < 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_agrees_with_torch_fake_quantize(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, 3, 3, generator=g)
    lo, hi = per_channel_minmax(w)
    assert lo.shape == (32, 1, 1, 1)
    s, z = affine_params(lo, hi, bits)
    scale, zp = to_torch_qparams(s.flatten(), z.flatten())
    qmin, qmax = qrange(bits)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qmin, qmax)
    ours = fake_quant_weight(w, bits)
    diff = (ours - ref).abs()
    assert (diff <= (1.0 / s) + 1e-6).all()
    assert (diff > 1e-6).float().mean() < 1e-3


def test_weight_quant_uses_per_channel_range_and_levels():
    w = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(0, 10, 50)]).reshape(2, 50)
    q = fake_quant_weight(w, 3)
    for row, src in zip(q, w):
        step = (src.max() - src.min()).item() / 7
        # the zero point is rounded, so the grid may sit up to half a step off the
        # range ends, and the clamp may cut one level: within one step of each end
        assert abs(row.min().item() - src.min().item()) <= step + 1e-6
        assert abs(row.max().item() - src.max().item()) <= step + 1e-6
        assert row.unique().numel() <= 8
    # row 0 by hand: s = 7/2 = 3.5, z = round(-3.5) + 4 = 0 (half to even), q in [-4, 3]
    assert q[0].min().item() == pytest.approx(-4 / 3.5)
    assert q[0].max().item() == pytest.approx(3 / 3.5)  # round(3.5) = 4 is clamped to 3


def test_straight_through_gradient():
    x = torch.linspace(-5, 5, 101, requires_grad=True)
    y = fake_quant(x, torch.tensor(-1.0), torch.tensor(1.0), 4)
    (y * torch.arange(101.0)).sum().backward()
    # identity through rounding and clamping
    torch.testing.assert_close(x.grad, torch.arange(101.0))


def test_weight_gradient_straight_through():
    w = torch.randn(4, 3, requires_grad=True)
    fake_quant_weight(w, 4).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 3))


def test_bf16_input_keeps_dtype_and_fp32_scales():
    x = torch.randn(1000).abs().to(torch.bfloat16)
    out = fake_quant(x, torch.tensor(0.0), torch.tensor(3.0), 4)
    assert out.dtype == torch.bfloat16
    ref = fake_quant_reference(x.float(), torch.tensor(0.0), torch.tensor(3.0), 4)
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.01)
