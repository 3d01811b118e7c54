"""The phase-decomposed upsample + 3x3 convolution equals the two-step computation."""

import pytest
import torch
import torch.nn.functional as F

from qimera.generators import Generator, sample_superposed
from qimera.ops import upsample2x_conv3x3


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 5, 6, 7), (1, 8, 1, 1)])
def test_matches_interpolate_then_conv(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(4, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    out = upsample2x_conv3x3(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if shape[2] * shape[3] > 1:  # a 1x1 map is contiguous in both formats: nothing to keep
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gradients_match():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x2, w2 = x1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    up = torch.randn(2, 6, 10, 10, generator=g, dtype=torch.float64)
    (F.conv2d(F.interpolate(x1, scale_factor=2, mode="nearest"), w1, padding=1) * up).sum().backward()
    (upsample2x_conv3x3(x2, w2) * up).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)


def test_generator_fused_and_plain_paths_agree():
    torch.manual_seed(0)
    gen = Generator(10, 16, img_size=16)
    g = torch.Generator().manual_seed(0)
    mix = sample_superposed(4, 10, 2, generator=g, device="cpu")
    noise = torch.randn(4, 2, 16)
    gen.eval()
    fused = gen(mix, noise)
    gen.fused_upsample = False
    plain = gen(mix, noise)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3"):
        upsample2x_conv3x3(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 5, 5))
