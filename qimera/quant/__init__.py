"""Fake quantization: a recipe object, pure functions, thin modules, and model conversion.

``quantize_model(model, QuantRecipe(w_bits=4, a_bits=4))`` returns the fake-quantized
copy. Extension points: :func:`register_weight_module` (a weight-quantized layer for a
float module type) and :func:`register_activation_site` (an activation whose outputs get
a quantizer).
"""

from .convert import (
    ACTIVATION_SITES,
    ActivationSite,
    QuantReport,
    act_quantizers,
    build_student,
    quantize_model,
    register_activation_site,
    set_calibrating,
    set_module,
)
from .functional import (
    affine_params,
    fake_quant,
    fake_quant_reference,
    fake_quant_weight,
    per_channel_minmax,
    qrange,
    to_torch_qparams,
)
from .modules import (
    WEIGHT_QUANT_REGISTRY,
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantMixin,
    register_weight_module,
    weight_quant_types,
)
from .recipe import QuantRecipe, recipe_of

__all__ = [
    "ACTIVATION_SITES", "ActQuantizer", "ActivationSite", "QuantConv2d", "QuantLinear", "QuantRecipe",
    "QuantReport", "WEIGHT_QUANT_REGISTRY", "WeightQuantMixin", "act_quantizers", "affine_params",
    "build_student", "fake_quant", "fake_quant_reference", "fake_quant_weight", "per_channel_minmax",
    "qrange", "quantize_model", "recipe_of", "register_activation_site", "register_weight_module",
    "set_calibrating", "set_module", "to_torch_qparams", "weight_quant_types",
]
