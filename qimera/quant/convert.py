"""Turn a float teacher into a fake-quantized student.

Weights: modules are swapped by a type registry (``WEIGHT_QUANT_REGISTRY``), filtered by
fnmatch name patterns (``exclude``).

Activations: the model is traced with ``torch.fx`` and an :class:`ActQuantizer` is
inserted after **every call site** of a ReLU/ReLU6, whether it is an ``nn.ReLU`` module
(one quantizer per call, so a module that a network calls at several places - as
torchvision's BasicBlock does - gets several), a functional call (``F.relu``,
``torch.relu``, ``F.relu6``, in-place variants, ``F.hardtanh(0, 6)``) or a tensor method
(``x.relu()``, ``x.relu_()``). Replacing modules by type alone would miss the functional
ones (SPEC §2, §5.6). Models that ``torch.fx`` cannot trace fall back to wrapping
ReLU modules, with a warning that functional activations are not covered.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modules import EMA_MOMENTUM, ActQuantizer, QuantConv2d, QuantLinear

#: float module type -> callable(module, bits) returning its fake-quantized replacement
WEIGHT_QUANT_REGISTRY: dict[type[nn.Module], Callable[[nn.Module, int], nn.Module]] = {
    nn.Conv2d: QuantConv2d.from_float,
    nn.Linear: QuantLinear.from_float,
}

ACT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
ACT_FUNCTIONS: set = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, torch.nn.functional.hardtanh}
ACT_METHODS = {"relu", "relu_"}


@dataclass
class QuantReport:
    """What :func:`quantize_model` did, for logs and tests."""

    weight_layers: list[str] = field(default_factory=list)
    weight_bits: dict[str, int] = field(default_factory=dict)
    act_sites: list[str] = field(default_factory=list)
    traced: bool = True


def _is_act_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ACT_MODULE_TYPES)
    if node.op == "call_function":
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return lo == 0.0 and hi == 6.0
        return node.target in ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACT_METHODS
    return False


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_function":
        return node.target in (F.relu_, torch.relu_) or bool(node.kwargs.get("inplace", False)) or (
            node.target in (F.relu, F.relu6) and len(node.args) > 1 and bool(node.args[1])
        )
    return node.target == "relu_"


def _insert_act_quantizers(gm: fx.GraphModule, a_bits: int, momentum: float) -> list[str]:
    modules = dict(gm.named_modules())
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = [n for n in graph.nodes if _is_act_node(n, modules)]
    names = []
    for i, node in enumerate(sites):
        qname = f"act_quant_{i}"
        gm.add_submodule(qname, ActQuantizer(a_bits, momentum))
        with graph.inserting_after(node):
            qnode = graph.call_module(qname, (node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        if _is_inplace(node, modules) and node.args and isinstance(node.args[0], fx.Node):
            # In-place activation: later code may keep using the *input* variable,
            # which now holds the activation's output. Route those uses through the
            # quantizer as well.
            src = node.args[0]
            for user in list(src.users):
                if user is node or user is qnode or order.get(user, -1) <= order[node]:
                    continue
                user.replace_input_with(src, qnode)
        site = node.target if node.op == "call_module" else f"{node.op}:{getattr(node.target, '__name__', node.target)}@{node.name}"
        names.append(str(site))
    graph.lint()
    gm.recompile()
    return names


def _wrap_act_modules(model: nn.Module, a_bits: int, momentum: float) -> list[str]:
    names = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, ACT_MODULE_TYPES):
                full = f"{name}.{child_name}" if name else child_name
                setattr(mod, child_name, nn.Sequential(child, ActQuantizer(a_bits, momentum)))
                names.append(full)
    return names


def _weight_modules_in_call_order(model: nn.Module, gm: fx.GraphModule | None) -> list[str]:
    if gm is not None:
        mods = dict(gm.named_modules())
        order = []
        for n in gm.graph.nodes:
            if n.op == "call_module" and type(mods[n.target]) in WEIGHT_QUANT_REGISTRY and n.target not in order:
                order.append(n.target)
        return order
    return [n for n, m in model.named_modules() if type(m) in WEIGHT_QUANT_REGISTRY]


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_model(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    *,
    first_last_bits: int | None = None,
    exclude: Iterable[str] = (),
    trace: bool = True,
    act_momentum: float = EMA_MOMENTUM,
) -> tuple[nn.Module, QuantReport]:
    """Return a fake-quantized copy of ``model`` (the original is left untouched).

    ``first_last_bits``: weight bits of the first and last weight layers (``None``:
    ``w_bits`` like every other layer, as in the paper). ``exclude``: fnmatch patterns of
    module names whose weights stay in float. The copy is returned in ``eval()`` mode with
    every activation quantizer calibrating.
    """
    for key, val in (("w_bits", w_bits), ("a_bits", a_bits)):
        if not isinstance(val, int) or not 2 <= val <= 8:
            raise ValueError(f"quant.{key}={val!r}: must be an integer in 2..8")
    src = copy.deepcopy(model).eval()
    for p in src.parameters():
        p.requires_grad_(True)
    report = QuantReport()
    gm: fx.GraphModule | None = None
    if trace:
        try:
            gm = fx.symbolic_trace(src)
        except Exception as exc:  # untraceable model: fall back to module wrapping
            warnings.warn(
                f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                "falling back to wrapping nn.ReLU/nn.ReLU6 modules: functional activations "
                "(F.relu, torch.relu) will NOT be quantized and a module called at several "
                "places shares one quantizer",
                stacklevel=2,
            )
    patterns = list(exclude)
    order = _weight_modules_in_call_order(src, gm)
    root: nn.Module = gm if gm is not None else src
    for idx, name in enumerate(order):
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            continue
        bits = w_bits
        if first_last_bits is not None and (idx == 0 or idx == len(order) - 1):
            bits = first_last_bits
        mod = root.get_submodule(name)
        _set_module(root, name, WEIGHT_QUANT_REGISTRY[type(mod)](mod, bits))
        report.weight_layers.append(name)
        report.weight_bits[name] = bits
    if gm is not None:
        report.act_sites = _insert_act_quantizers(gm, a_bits, act_momentum)
    else:
        report.traced = False
        report.act_sites = _wrap_act_modules(src, a_bits, act_momentum)
    root.eval()
    return root, report


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            yield m


def set_calibrating(model: nn.Module, flag: bool) -> None:
    """Switch every activation quantizer between calibrating (EMA updates) and frozen."""
    for q in act_quantizers(model):
        q.set_calibrating(flag)
