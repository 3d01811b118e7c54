"""Fake quantization: pure functions, thin modules, and model conversion."""

from .convert import QuantReport, act_quantizers, quantize_model, set_calibrating
from .functional import (
    affine_params,
    fake_quant,
    fake_quant_reference,
    fake_quant_weight,
    per_channel_minmax,
    qrange,
    to_torch_qparams,
)
from .modules import ActQuantizer, QuantConv2d, QuantLinear

__all__ = [
    "ActQuantizer", "QuantConv2d", "QuantLinear", "QuantReport", "act_quantizers",
    "affine_params", "fake_quant", "fake_quant_reference", "fake_quant_weight",
    "per_channel_minmax", "qrange", "quantize_model", "set_calibrating", "to_torch_qparams",
]
