"""Turn a float teacher into a fake-quantized student, as a :class:`QuantRecipe` says.

Weights: modules are swapped through ``WEIGHT_QUANT_REGISTRY``
(:func:`qimera.quant.register_weight_module`), filtered by fnmatch name patterns
(``recipe.exclude``).

Activations: the model is traced with ``torch.fx`` and an :class:`ActQuantizer` is
inserted after **every call site** of a registered activation (:data:`ACTIVATION_SITES`;
``relu`` and ``relu6`` are built in, :func:`register_activation_site` adds others such as
Hardswish), whether it is a module (one quantizer per call, so a module that a network
calls at several places - as torchvision's BasicBlock does - gets several), a functional
call (``F.relu``, ``torch.relu``, ``F.relu6``, in-place variants, ``F.hardtanh(0, 6)``)
or a tensor method (``x.relu()``, ``x.relu_()``). Replacing modules by type alone would
miss the functional ones (SPEC §2, §5.6). Models that ``torch.fx`` cannot trace fall back
to wrapping the activation modules, with a warning that functional activations are not
covered.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modules import WEIGHT_QUANT_REGISTRY, ActQuantizer
from .recipe import QuantRecipe, attach_recipe

#: a condition on a function call's arguments (bound by name, defaults filled in)
ArgumentCheck = Callable[[Mapping[str, Any]], bool]


@dataclass(frozen=True)
class ActivationSite:
    """The calls after which an activation quantizer is inserted: module types, functions
    (each with an optional condition on its arguments) and tensor method names."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: Mapping[Callable, ArgumentCheck | None] = field(default_factory=dict)
    methods: tuple[str, ...] = ()


#: registered activation sites by name; a recipe's ``activations`` picks among them
ACTIVATION_SITES: dict[str, ActivationSite] = {}


def register_activation_site(
    name: str,
    *,
    modules: Iterable[type[nn.Module]] = (),
    functions: Iterable[Callable] | Mapping[Callable, ArgumentCheck | None] = (),
    methods: Iterable[str] = (),
) -> ActivationSite:
    """Declare an activation whose outputs get a quantizer when a recipe names it, e.g.
    ``register_activation_site("hardswish", modules=[nn.Hardswish], functions=[F.hardswish])``
    and then ``QuantRecipe(4, 4, activations=("relu", "relu6", "hardswish"))``."""
    funcs = dict(functions) if isinstance(functions, Mapping) else {fn: None for fn in functions}
    site = ActivationSite(tuple(modules), funcs, tuple(methods))
    ACTIVATION_SITES[name] = site
    return site


def _is_relu6_hardtanh(args: Mapping[str, Any]) -> bool:
    return args.get("min_val") == 0.0 and args.get("max_val") == 6.0


register_activation_site("relu", modules=[nn.ReLU], functions=[F.relu, F.relu_, torch.relu, torch.relu_],
                         methods=["relu", "relu_"])
register_activation_site("relu6", modules=[nn.ReLU6], functions={F.relu6: None, F.hardtanh: _is_relu6_hardtanh})


@dataclass
class QuantReport:
    """What :func:`quantize_model` did, for logs and tests."""

    weight_layers: list[str] = field(default_factory=list)
    weight_bits: dict[str, int] = field(default_factory=dict)
    act_sites: list[str] = field(default_factory=list)
    traced: bool = True


def _call_arguments(node: fx.Node) -> dict[str, Any]:
    """A function call's arguments by parameter name, defaults filled in (positional
    names only as far as Python can tell: builtins have no signature)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return dict(node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class _SiteMatcher:
    """Answers "is this graph node one of the recipe's activations?" and "in place?"."""

    def __init__(self, names: Iterable[str]):
        sites = [ACTIVATION_SITES[n] for n in names]
        self.module_types = tuple(t for s in sites for t in s.modules)
        self.functions: dict[Callable, list[ArgumentCheck | None]] = {}
        for s in sites:
            for fn, check in s.functions.items():
                self.functions.setdefault(fn, []).append(check)
        self.methods = {m for s in sites for m in s.methods}

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), self.module_types)
        if node.op == "call_function" and node.target in self.functions:
            checks = self.functions[node.target]
            return any(c is None for c in checks) or any(c(_call_arguments(node)) for c in checks if c)
        if node.op == "call_method":
            return node.target in self.methods
        return False

    @staticmethod
    def inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        if node.op == "call_module":
            return bool(getattr(modules[node.target], "inplace", False))
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            return name.endswith("_") or bool(_call_arguments(node).get("inplace", False))
        return str(node.target).endswith("_")


def _insert_act_quantizers(gm: fx.GraphModule, recipe: QuantRecipe) -> list[str]:
    modules = dict(gm.named_modules())
    matcher = _SiteMatcher(recipe.activations)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = [n for n in graph.nodes if matcher.matches(n, modules)]
    names = []
    for i, node in enumerate(sites):
        qname = f"act_quant_{i}"
        gm.add_submodule(qname, ActQuantizer(recipe.a_bits, recipe.act_momentum))
        with graph.inserting_after(node):
            qnode = graph.call_module(qname, (node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        if matcher.inplace(node, modules) and node.args and isinstance(node.args[0], fx.Node):
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


def _wrap_act_modules(model: nn.Module, recipe: QuantRecipe) -> list[str]:
    types = _SiteMatcher(recipe.activations).module_types
    names = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, types):
                full = f"{name}.{child_name}" if name else child_name
                setattr(mod, child_name, nn.Sequential(child, ActQuantizer(recipe.a_bits, recipe.act_momentum)))
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


def weight_layer_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules whose weights a recipe quantizes (those of a
    registered weight type), in module order: what ``recipe.exclude`` patterns match."""
    return [n for n, m in model.named_modules() if type(m) in WEIGHT_QUANT_REGISTRY]


def check_exclude(layers: Iterable[str], patterns: Iterable[str]) -> None:
    """Raise ``ValueError`` (one line, naming the pattern and a few layer names) unless
    every ``quant.exclude`` pattern matches one of ``layers`` and some layer is left to
    quantize: a pattern that matches nothing is a typo, and one that matches everything
    leaves a "quantized" student with float weights."""
    from ..config import quoted

    layers, patterns = list(layers), list(patterns)
    if not patterns:
        return
    names = ", ".join(layers[:4]) + (f", … ({len(layers)} in all)" if len(layers) > 4 else "")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise ValueError(f"quant.exclude: pattern {quoted(pattern)} matches no layer with weights (fnmatch on "
                             f"module names: {names}); fix or remove it")
    if layers and all(any(fnmatch.fnmatchcase(name, p) for p in patterns) for name in layers):
        raise ValueError(f"quant.exclude={quoted(patterns)} matches every layer with weights ({names}): no weight "
                         "would be quantized; exclude fewer layers")


def set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule ``qualname`` of ``root`` by ``new``."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_model(model: nn.Module, recipe: QuantRecipe, *, trace: bool = True) -> tuple[nn.Module, QuantReport]:
    """Return a fake-quantized copy of ``model`` made as ``recipe`` says (the original is
    left untouched), and a report of what was quantized.

    The copy carries the recipe (read back by :func:`qimera.quant.recipe_of` and the
    exporters). It is returned in ``eval()`` mode
    with every activation quantizer calibrating.
    """
    if not isinstance(recipe, QuantRecipe):
        raise TypeError(f"quantize_model takes a QuantRecipe, got {type(recipe).__name__} "
                        "(e.g. QuantRecipe(w_bits=4, a_bits=4), or cfg.quant.recipe())")
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
                "falling back to wrapping activation modules (nn.ReLU, nn.ReLU6, ...): functional "
                "activations (F.relu, torch.relu) will NOT be quantized and a module called at several "
                "places shares one quantizer",
                stacklevel=2,
            )
    if gm is None and recipe.integer_exact:
        raise ValueError(f"quant.integer_exact=true: torch.fx cannot trace {type(model).__name__}, and the "
                         "integer-exact student is evaluated through its traced graph; use the paper's recipe "
                         "(quant.integer_exact=false) for this model")
    order = _weight_modules_in_call_order(src, gm)
    check_exclude(order, recipe.exclude)
    root: nn.Module = gm if gm is not None else src
    for idx, name in enumerate(order):
        if any(fnmatch.fnmatchcase(name, pat) for pat in recipe.exclude):
            continue
        bits = recipe.bits_for(idx, len(order))
        mod = root.get_submodule(name)
        set_module(root, name, WEIGHT_QUANT_REGISTRY[type(mod)].from_float(mod, bits))
        report.weight_layers.append(name)
        report.weight_bits[name] = bits
    if gm is not None:
        report.act_sites = _insert_act_quantizers(gm, recipe)
    else:
        report.traced = False
        report.act_sites = _wrap_act_modules(src, recipe)
    attach_recipe(root, recipe)
    root.eval()
    return root, report


def build_student(cfg, teacher) -> nn.Module:
    """The student of a run: ``teacher.model`` (a :class:`qimera.teachers.LoadedTeacher`)
    quantized with ``cfg.quant.recipe()`` (a :class:`qimera.config.Config`)."""
    return quantize_model(teacher.model, cfg.quant.recipe())[0]


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            yield m


def set_calibrating(model: nn.Module, flag: bool) -> None:
    """Switch every activation quantizer between calibrating (EMA updates) and frozen."""
    for q in act_quantizers(model):
        q.set_calibrating(flag)
