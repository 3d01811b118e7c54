"""The arithmetic of onnxruntime's integer kernels, as small pure functions.

An integer-exact student (``QuantRecipe(integer_exact=True)``) is evaluated with these
functions, and its int8 ONNX form runs the kernels they describe, so the two compute the
same integers. Each function names the operator it stands for; the tests run that
operator in onnxruntime on the same integers and compare bit for bit.

Integers travel as float tensors holding whole numbers (PyTorch's convolutions take
float): every value, product and partial sum here is an integer, held exactly in float32
while below ``2**24``; a convolution whose bound :func:`fits_float32` refuses runs in
float64 (``wide=True``), so the order of the sums never matters.

* ``QLinearConv`` (uint8 activations, int8 weights with zero point 0, int32 bias):
  the int32 accumulator ``acc = sum(x * w) + bias``, then ``y = saturate(round(float(acc)
  * M) + y_zp)`` with ``M = x_scale * w_scale[c] / y_scale`` computed in float32, left to
  right (:func:`requant_multiplier`), and round half to even.
* ``QuantizeLinear``: ``saturate(round(x / scale) + zp)`` (a division, not a product
  with the inverse scale; :func:`quantize_linear`).
* ``QLinearAdd`` (x86, AVX2 and newer): ``c = saturate(round(fma(a, rA, fma(b, rB, F))))``
  with ``rA = a_scale / c_scale``, ``rB = b_scale / c_scale`` and ``F = c_zp - (rA * a_zp
  + rB * b_zp)`` in float32 (:func:`qlinear_add`). The fused multiply-adds are emulated
  in float64, where their products and sums are exact, rounded to float32 after each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: integers float32 holds exactly
FLOAT32_EXACT = 2**24
UINT8 = (0, 255)


def fits_float32(input_max: float, weight_max: float, fan_in: int, bias_max: float = 0.0) -> bool:
    """Whether every partial sum of a convolution of integers up to ``input_max`` with
    integer weights up to ``weight_max`` over ``fan_in`` terms, plus a bias up to
    ``bias_max``, stays exact in float32."""
    return input_max * weight_max * fan_in + bias_max < FLOAT32_EXACT


def requant_multiplier(x_scale: torch.Tensor, w_scale: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    """The per-channel float32 multiplier ``x_scale * w_scale / y_scale`` of ``QLinearConv``,
    in onnxruntime's order of operations."""
    return (x_scale.float() * w_scale.float()) / y_scale.float()


def accumulator_bias(bias: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """A float bias on the int32 accumulator grid, ``round(bias / (x_scale * w_scale))`` (an
    int32 tensor, one per output channel): the bias an integer convolution adds."""
    unit = x_scale.float() * w_scale.float()
    q = torch.round(bias.double() / unit.double())
    limit = 2.0**31 - 1
    return torch.clamp(q, -limit, limit).to(torch.int32)


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: int | torch.Tensor = 0,
                    qmin: int = UINT8[0], qmax: int = UINT8[1]) -> torch.Tensor:
    """ONNX ``QuantizeLinear``: ``clamp(round(x / scale) + zero_point, qmin, qmax)`` in
    float32 (whole numbers)."""
    zp = torch.as_tensor(zero_point, dtype=torch.float32)
    return torch.clamp(torch.round(x.float() / scale.float()) + zp, qmin, qmax)


def qlinear_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                 zero_point: int, *, stride=1, padding=0, dilation=1, groups: int = 1,
                 qmin: int = UINT8[0], qmax: int = UINT8[1], wide: bool = False) -> torch.Tensor:
    """``QLinearConv`` on integers: ``x`` (N, C, H, W) whole numbers with zero point 0 (a
    ReLU's output), ``w`` the int8 weights (zero point 0), ``bias`` int32 per output
    channel, ``multiplier`` per output channel (:func:`requant_multiplier`). Returns the
    output integers ``clamp(round(float(acc) * multiplier) + zero_point, qmin, qmax)``.
    ``wide``: accumulate in float64, for partial sums that float32 would not hold exactly."""
    dtype = torch.float64 if wide else torch.float32
    acc = F.conv2d(x.to(dtype), w.to(dtype), None, stride, padding, dilation, groups)
    if bias is not None:
        acc = acc + bias.to(dtype).reshape(1, -1, 1, 1)
    acc = acc.float()  # the kernel's float(acc): exact for any int32 the requantization can use
    y = torch.round(acc * multiplier.float().reshape(1, -1, 1, 1)) + float(zero_point)
    return torch.clamp(y, qmin, qmax)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to float32 (kept as float64 for the next exact step)."""
    return x.float().double()


def qlinear_add(a: torch.Tensor, a_scale: torch.Tensor, a_zp: int, b: torch.Tensor, b_scale: torch.Tensor,
                b_zp: int, c_scale: torch.Tensor, c_zp: int = 0, *, qmin: int = UINT8[0],
                qmax: int = UINT8[1]) -> torch.Tensor:
    """onnxruntime's ``QLinearAdd`` on uint8 integers ``a`` and ``b`` (same shape; ``a`` is
    the operator's first input): ``clamp(round(fma(a, rA, fma(b, rB, F))), qmin, qmax)``
    (module docstring). Returns whole numbers in float32."""
    ra = (a_scale.float() / c_scale.float()).double()
    rb = (b_scale.float() / c_scale.float()).double()
    fixed = _f32(torch.tensor(float(c_zp), dtype=torch.float64) - _f32(ra * a_zp + rb * b_zp))
    inner = _f32(b.double() * rb + fixed)
    outer = _f32(a.double() * ra + inner)
    return torch.clamp(torch.round(outer), qmin, qmax).float()
