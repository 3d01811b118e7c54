"""Thin fake-quantized modules: weight-quantized Conv2d/Linear and activation quantizers.

Weight-quantized layers are found through :data:`WEIGHT_QUANT_REGISTRY`, filled by the
:func:`register_weight_module` decorator (the role of optimum-quanto's
``register_qmodule``): ``@register_weight_module(nn.Conv2d)`` on a class with a
``from_float(module, bits)`` classmethod makes :func:`qimera.quant.quantize_model` swap
every ``nn.Conv2d`` for it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import bias_corrected, ema_update, fake_quant, fake_quant_weight

EMA_MOMENTUM = 0.9


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with an EMA range (SPEC §2).

    While ``calibrating`` is true every forward updates the exponential moving averages
    of the batch min and max (momentum 0.9, bias-corrected like Adam's moments); when
    false (frozen) the range stays where it is. Before any calibration the quantizer is
    the identity. Everything stays on the device: no host synchronisation.
    """

    def __init__(self, bits: int, momentum: float = EMA_MOMENTUM):
        super().__init__()
        self.bits = int(bits)
        self.momentum = float(momentum)
        self.calibrating = True
        self._frozen_checked = False
        self.register_buffer("min_avg", torch.zeros(()))
        self.register_buffer("max_avg", torch.zeros(()))
        self.register_buffer("steps", torch.zeros(()))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}, calibrating={self.calibrating}"

    @property
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected ``(lo, hi)`` currently used for quantization."""
        steps = self.steps.clamp(min=1.0)
        return (
            bias_corrected(self.min_avg, steps, self.momentum),
            bias_corrected(self.max_avg, steps, self.momentum),
        )

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        self.min_avg.copy_(ema_update(self.min_avg, lo, self.momentum))
        self.max_avg.copy_(ema_update(self.max_avg, hi, self.momentum))
        self.steps.add_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x)
        elif not self._frozen_checked:
            # One-time check (a sync, outside the hot loop): a frozen quantizer that
            # never saw data would silently act as the identity.
            if float(self.steps) == 0.0:
                raise RuntimeError("activation quantizer frozen before it observed any data")
            self._frozen_checked = True
        lo, hi = self.range
        return fake_quant(x, lo, hi, self.bits)

    def set_calibrating(self, flag: bool) -> None:
        self.calibrating = bool(flag)
        self._frozen_checked = False


#: float module type (matched exactly, not by subclass) -> its weight-quantized class
WEIGHT_QUANT_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}


def register_weight_module(float_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: ``float_type`` modules are replaced by the decorated class's
    ``from_float(module, bits)`` when a model is quantized."""

    def register(cls: type) -> type:
        if not callable(getattr(cls, "from_float", None)):
            raise TypeError(f"{cls.__name__} needs a from_float(module, bits) classmethod to be registered")
        WEIGHT_QUANT_REGISTRY[float_type] = cls
        return cls

    return register


def weight_quant_types() -> tuple[type[nn.Module], ...]:
    """The registered weight-quantized classes (for ``isinstance`` checks)."""
    return tuple(WEIGHT_QUANT_REGISTRY.values())


class WeightQuantMixin:
    """Shared by the weight-quantized layers: bit width, repr and the quantized weight."""

    w_bits: int
    weight: torch.Tensor

    def _copy_from(self, float_module: nn.Module, w_bits: int):
        self.load_state_dict(float_module.state_dict())
        self.w_bits = int(w_bits)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}"

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.w_bits)


@register_weight_module(nn.Conv2d)
class QuantConv2d(WeightQuantMixin, nn.Conv2d):
    """Conv2d whose weight is fake-quantized per output channel at every forward."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int) -> "QuantConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        return new._copy_from(conv, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


@register_weight_module(nn.Linear)
class QuantLinear(WeightQuantMixin, nn.Linear):
    """Linear whose weight is fake-quantized per output row at every forward."""

    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits: int) -> "QuantLinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        return new._copy_from(lin, w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)
