"""Small numerical building blocks shared by the models.

:func:`upsample2x_conv3x3` computes ``conv3x3(nearest_upsample_2x(x))`` (padding 1)
without materialising the upsampled tensor and with 2.25x fewer multiply-adds.

Why it is exact: after a nearest ×2 upsampling, output row ``2i + a`` of a 3×3
convolution reads input rows ``2i+a-1, 2i+a, 2i+a+1`` of the upsampled map, i.e. only two
distinct rows of ``x``: for ``a = 0`` row ``i-1`` with kernel row 0 and row ``i`` with
kernel rows 1 + 2; for ``a = 1`` row ``i`` with kernel rows 0 + 1 and row ``i+1`` with
kernel row 2. The same holds for columns. So each of the four output phases ``(a, b)``
is a 2×2 convolution of ``x`` with summed taps; zero padding of the upsampled map is zero
padding of ``x``. The four phase kernels run as one convolution with ``4·C_out``
outputs, whose results are interleaved back. Only the floating-point summation order
differs from the two-step computation; gradients reach the original 3×3 weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _phase_pairs(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 3 taps along ``dim`` into the two 2-tap phase kernels."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def upsample2x_phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4·C_out, C_in, 2, 2), phases ordered (0,0), (0,1), (1,0), (1,1)."""
    r0, r1 = _phase_pairs(weight, 2)
    k00, k01 = _phase_pairs(r0, 3)
    k10, k11 = _phase_pairs(r1, 3)
    return torch.cat([k00, k01, k10, k11], 0)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3 needs a 3x3 kernel, got {tuple(weight.shape[-2:])}")
    n, _, h, w = x.shape
    c = weight.shape[0]
    kernels = upsample2x_phase_kernels(weight)
    # the bias is the same for every phase: add it inside the convolution (also keeps
    # the output in the convolution's dtype under autocast)
    out = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)  # (n, 4c, h+1, w+1)
    # view as (n, h+1, w+1, 4, c): free for channels_last outputs, one copy otherwise
    o = out.permute(0, 2, 3, 1).reshape(n, h + 1, w + 1, 4, c)
    row0 = torch.stack([o[:, :h, :w, 0], o[:, :h, 1:, 1]], dim=3)  # (n, h, w, 2, c)
    row1 = torch.stack([o[:, 1:, :w, 2], o[:, 1:, 1:, 3]], dim=3)
    y = torch.stack([row0, row1], dim=2)  # (n, h, 2, w, 2, c)
    y = y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)  # channels_last memory layout
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()
