"""Quantization maths as small pure functions.

The quantizer of SPEC §2, for bit width ``b`` and range ``[lo, hi]``::

    n = 2**b - 1
    s = n / max(hi - lo, 1e-8)
    z = round(s * lo) + 2**(b - 1)
    q = clamp(round(s * x - z), -2**(b - 1), 2**(b - 1) - 1)
    x_hat = (q + z) / s

is the usual affine quantizer with step ``1 / s``. In PyTorch's convention
(``torch.fake_quantize_per_*_affine``) that is ``scale = 1 / s`` and
``zero_point = -z`` on the signed grid ``[-2**(b-1), 2**(b-1) - 1]``.

:func:`fake_quant_reference` spells the formula out op by op and is the definition
the tests check everything else against. :func:`fake_quant` is the fast path used in
training: the same forward values (computed with one fused expression) and a
straight-through gradient (identity through the rounding *and* the clamp, as in the
authors' code), implemented as one autograd function so that no extra graph nodes are
recorded.
"""

from __future__ import annotations

import torch

RANGE_EPS = 1e-8


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer grid ``[-2**(b-1), 2**(b-1) - 1]`` used by the quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(s, z)`` of SPEC §2 for ranges ``lo``/``hi`` (any matching shapes).

    ``s`` is the inverse step (levels per unit), ``z`` the integer offset.
    Computed in float32 whatever the input dtype: scales never go through bf16.
    """
    lo = lo.float()
    hi = hi.float()
    n = 2**bits - 1
    s = n / torch.clamp(hi - lo, min=RANGE_EPS)
    z = torch.round(s * lo) + 2 ** (bits - 1)
    return s, z


def to_torch_qparams(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert ``(s, z)`` to PyTorch's ``(scale, zero_point)`` convention."""
    return 1.0 / s, (-z).to(torch.int32)


def fake_quant_reference(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The SPEC §2 quantizer, op by op, without any gradient trick.

    ``lo``/``hi`` broadcast against ``x`` (a scalar tensor for per-tensor ranges,
    shape ``(C, 1, 1, 1)`` for per-output-channel conv weights, ...).
    """
    qmin, qmax = qrange(bits)
    s, z = affine_params(lo, hi, bits)
    q = torch.clamp(torch.round(s * x.float() - z), qmin, qmax)
    return ((q + z) / s).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the SPEC quantizer. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):  # noqa: D401 - autograd signature
        # s * x - z, rounded, clamped, mapped back: one chain of in-place ops on a
        # single temporary, so the hot path allocates one tensor.
        out = torch.mul(x, s)
        out.sub_(z).round_().clamp_(qmin, qmax).add_(z).div_(s)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None, None, None


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``x`` to ``bits`` on ``[lo, hi]`` with a straight-through gradient.

    Same forward values as :func:`fake_quant_reference` (bit for bit in float32).
    In lower-precision inputs (bf16 under autocast) the arithmetic runs in float32 and
    the result is returned in the input's dtype.
    """
    qmin, qmax = qrange(bits)
    s, z = affine_params(lo.detach(), hi.detach(), bits)
    if x.dtype == torch.float32:
        return _FakeQuantSTE.apply(x, s, z, qmin, qmax)
    return _FakeQuantSTE.apply(x.float(), s, z, qmin, qmax).to(x.dtype)


def per_channel_minmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel ``(min, max)`` of a weight in one reduction.

    Returned with shape ``(C, 1, ..., 1)`` so they broadcast against ``w``.
    """
    lo, hi = torch.aminmax(w.detach().reshape(w.shape[0], -1), dim=1)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return lo.reshape(shape), hi.reshape(shape)


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel asymmetric fake quantization on ``[min W_o, max W_o]``."""
    lo, hi = per_channel_minmax(w)
    return fake_quant(w, lo, hi, bits)


def ema_update(
    avg: torch.Tensor, value: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Raw (not bias-corrected) exponential moving average: ``m·avg + (1-m)·value``."""
    return avg.mul(momentum).add_(value.detach().float(), alpha=1.0 - momentum)


def bias_corrected(avg: torch.Tensor, steps: torch.Tensor, momentum: float) -> torch.Tensor:
    """Adam-style bias correction ``avg / (1 - m**t)``; ``t`` is a tensor (no sync)."""
    return avg / (1.0 - torch.pow(torch.as_tensor(momentum, dtype=avg.dtype, device=avg.device), steps))
