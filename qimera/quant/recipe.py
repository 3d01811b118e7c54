"""The quantization recipe: one frozen object that says how a float model becomes a student.

It plays the role of torchao's ``AOBaseConfig``: :func:`qimera.quant.quantize_model` takes
it, the student it returns carries it (:func:`recipe_of`), checkpoints and exports
record it (:meth:`QuantRecipe.to_dict`), and everything downstream (integer and ONNX
export, the integer loader) reads it back instead of re-deriving bit widths from loose
arguments. A run config's ``quant`` section turns into one with ``cfg.quant.recipe()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from .modules import EMA_MOMENTUM

#: the activation sites quantized unless a recipe names others (see ``ACTIVATION_SITES``)
DEFAULT_ACTIVATIONS: tuple[str, ...] = ("relu", "relu6")
#: attribute of a student that holds its recipe
RECIPE_ATTR = "quant_recipe"


def _check_bits(key: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
        raise ValueError(f"quant.{key}={value!r}: must be an integer in 2..8")


@dataclass(frozen=True)
class QuantRecipe:
    """How weights and activations are fake-quantized.

    ``w_bits``/``a_bits``: bit widths of weights (per output channel) and activations
    (per tensor). ``first_last_bits``: weight bits of the first and last weight layers in
    call order (``None``: ``w_bits`` like every other layer, as in the paper).
    ``exclude``: fnmatch patterns of module names whose weights stay in float.
    ``act_momentum``: EMA momentum of the activation ranges. ``activations``: names of
    registered activation sites (:func:`qimera.quant.register_activation_site`) after
    which a quantizer is inserted.

    ``integer_exact``: the student is evaluated as its int8 ONNX form computes
    (:func:`qimera.export.onnx_int8.int8_model`, whose kernels :mod:`qimera.quant.kernels`
    spells out): BatchNorm folded into the convolutions, biases on the int32 accumulator
    grid, each convolution's output rounded by the integer kernel's multiplier, the
    residual branches requantized to 8 bits and the additions done as ``QLinearAdd``. It
    trains fake-quantized like the paper's recipe (``False``); what changes is the
    arithmetic of the top-1 it reports, which is then the deployed file's.
    """

    w_bits: int
    a_bits: int
    first_last_bits: int | None = None
    exclude: tuple[str, ...] = ()
    act_momentum: float = EMA_MOMENTUM
    activations: tuple[str, ...] = field(default=DEFAULT_ACTIVATIONS)
    integer_exact: bool = False

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        # lists from JSON/YAML become tuples: the recipe stays hashable and immutable
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "activations", tuple(self.activations))
        if not (isinstance(self.act_momentum, (int, float)) and 0.0 < self.act_momentum < 1.0):
            raise ValueError(f"quant.ema_momentum={self.act_momentum!r}: must be a number in (0, 1)")
        if not isinstance(self.integer_exact, bool):
            raise ValueError(f"quant.integer_exact={self.integer_exact!r}: must be true or false")
        from .convert import ACTIVATION_SITES

        unknown = [a for a in self.activations if a not in ACTIVATION_SITES]
        if unknown:
            raise ValueError(f"activation site {unknown[0]!r} is not registered; registered: "
                             f"{', '.join(sorted(ACTIVATION_SITES))}")

    def bits_for(self, index: int, count: int) -> int:
        """Weight bits of the ``index``-th of ``count`` weight layers (call order)."""
        if self.first_last_bits is not None and index in (0, count - 1):
            return self.first_last_bits
        return self.w_bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists for tuples), the inverse of :meth:`from_dict`."""
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["activations"] = list(self.activations)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantRecipe":
        """A recipe from :meth:`to_dict`'s output; keys it does not know are refused."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"quantization recipe: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**data)


def attach_recipe(model: nn.Module, recipe: QuantRecipe) -> None:
    """Record ``recipe`` on a student. A ``torch.fx.GraphModule`` keeps it in its ``meta``
    dict, which (unlike a plain attribute) survives ``copy.deepcopy``."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta[RECIPE_ATTR] = recipe
    else:
        setattr(model, RECIPE_ATTR, recipe)


def detach_recipe(model: nn.Module) -> None:
    """Remove the recipe from a copy of a student that is no longer one (an export's
    twin, whose layers are not fake-quantized any more)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta.pop(RECIPE_ATTR, None)
    if RECIPE_ATTR in vars(model):
        delattr(model, RECIPE_ATTR)


def recipe_of(model: nn.Module) -> QuantRecipe:
    """The recipe a student was built with; ``ValueError`` for a model that is not one."""
    meta = getattr(model, "meta", None)
    recipe = meta.get(RECIPE_ATTR) if isinstance(meta, dict) else getattr(model, RECIPE_ATTR, None)
    if not isinstance(recipe, QuantRecipe):
        raise ValueError(f"{type(model).__name__} carries no quantization recipe: build it with "
                         "qimera.quant.quantize_model(model, QuantRecipe(...))")
    return recipe


def is_integer_exact(model: nn.Module) -> bool:
    """Whether ``model`` is a student whose recipe is integer-exact (any other model: False)."""
    try:
        return recipe_of(model).integer_exact
    except ValueError:
        return False
