"""The deployable ONNX form of a fake-quantized student: integer kernels in onnxruntime.

The reference form of :mod:`qimera.export.onnx_qdq` (QCDQ) keeps every convolution in float:
its weights are dequantized, its BatchNorm stays a separate node, and onnxruntime has
nothing to fuse, so the quantized model runs slower than the float one. This form is the
same network, rewritten so that onnxruntime's QDQ fusion turns every convolution between
two activation quantizers into ``QLinearConv`` (uint8 activations x int8 weights, int32
accumulation):

* **BatchNorm folded.** A BatchNorm2d that takes a quantized convolution's output alone
  is folded into that convolution's dequantization scale and bias
  (:func:`fold_batchnorm`): the integer weights stay as they are, the per-channel step
  ``1/s`` becomes ``gamma / sqrt(var + eps) / s`` and the bias ``(b - mean) * gamma /
  sqrt(var + eps) + beta``. A channel with a negative ``gamma`` has its integers negated
  and its step made positive, so every scale stays positive. Exact up to float rounding.
* **One weight zero point.** ``QLinearConv`` needs one zero point for all output
  channels, and the student's per-channel grids do not share one; but the integer ``q +
  z`` of SPEC §2 is the weight in steps of ``1/s``, so the weights are stored as int8 with
  zero point 0 (``2**b`` levels inside ``[-(2**b - 1), 2**b - 1]``), each channel's
  integers multiplied by the largest whole factor that keeps them within ±127
  (:func:`widen_grid`): the same weights, on a finer grid for the int32 bias.
* **Activations** are uint8 tensors holding ``0..2**b - 1``: ``QuantizeLinear`` (zero
  point 0 for a ReLU output, so that onnxruntime drops the ReLU: the saturation at 0 is
  the ReLU) then ``Clip`` to ``2**b - 1``. The top clip cannot live inside a fused kernel
  (``QLinearConv`` saturates to the uint8 range 0..255), so it stays a ``Clip`` node on
  the uint8 tensor after the kernel: exact, and cheap.
* **Residual branches.** A convolution whose output reaches the next activation
  quantizer only through other operations (the second convolution of a residual block,
  whose output is added to the shortcut before the ReLU) has no ``QuantizeLinear`` to
  fuse with: by default it runs as a float convolution on the dequantized uint8 input,
  with a float weight onnxruntime computes once from the stored integers
  (:func:`float_at_load`; it fuses the convolution with the addition and the ReLU),
  which keeps the form exact. So do the first convolution (float images in) and the
  classifier.
* **8-bit requantization** (``requantize=True``, faster, approximate). Such a convolution
  gets a ``QuantizeLinear`` of its own, uint8 over the window that can change the result:
  ``[-L, R]`` with ``R`` the downstream quantizer's range and ``L`` the largest value the
  other operand of the addition can take (the upper end of the quantizer it comes from,
  else ``R``). Below ``-L`` the sum is negative and the ReLU gives 0; above ``R`` the
  quantizer saturates; in between the step is ``(L + R) / 255``, about an eighth of a
  4-bit level. Then every convolution fed by a quantizer is a ``QLinearConv`` and the
  additions are ``QLinearAdd``. The rounding moves some activations by one level, and a
  4-bit network amplifies that: measure the agreement before deploying it
  (``benchmarks/deploy.py`` reports both variants).

Weights of at most 4 bits are stored as packed ONNX ``int4`` (opset 21 or newer,
:func:`pack_int4_weights`): ``int4`` initializers (two per byte, the integers minus a
per-channel offset, in units of the channel's grid factor) read by ``Cast -> Add -> Mul
-> Cast`` into the int8 (or float) weight. onnxruntime folds those constant nodes when the
session starts, so the running graph is the int8 one.
The ``int4`` values are not read by ``DequantizeLinear`` directly because onnxruntime's
``QLinearConv`` fusion takes 8-bit weights with one zero point, and the per-channel 4-bit
grids need one zero point each.

Needs a ``torch.fx``-traced student (what :func:`qimera.quant.quantize_model` builds
for every traceable teacher): the rewrite reads the graph to find each convolution's
BatchNorm and its downstream quantizer.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import deque
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..quant import ActQuantizer, QuantConv2d, set_module
from ..quant.recipe import detach_recipe, is_integer_exact
from ..quant.kernels import accumulator_bias, fits_float32, qlinear_add, qlinear_conv, requant_multiplier
from .integer import ExportError, exportable_parts, float_twin, integer_weight
from .onnx_layout import channels_last_convs
from .onnx_qdq import OnnxReport, QDQActivation, QDQConv2d, QDQLinear, QDQRequant, activation_twin, convert_activations

__all__ = ["INT8_DEFAULT_OPSET", "INT4_MIN_OPSET", "fold_batchnorm", "int8_model",
           "finish_proto", "pack_int4_weights", "float_at_load", "compact_names", "widen_grid", "WEIGHT_LIMIT", "check_int4_opset", "check_onnxruntime", "INTEGER_OPS"]

#: the int8 form's default opset: the first with ONNX int4 types
INT8_DEFAULT_OPSET = 21
INT4_MIN_OPSET = 21
#: what onnxruntime's optimised graph holds where convolutions run on integer kernels
INTEGER_OPS = ("QLinearConv", "QLinearAdd", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat")
#: the int8 weights stay within ±WEIGHT_LIMIT and ``2 * (2**b - 1) * limit`` within the
#: int16 pair sums of x86's AVX2 u8 x s8 kernels (vpmaddubsw saturates): ±127 for
#: activations of up to 7 bits, ±64 for 8 bits
WEIGHT_LIMIT = 127
_PAIR_SUM_LIMIT = 32767
#: the oldest onnxruntime that folds the int4 weights (Cast from int4) and fuses the form
MIN_ONNXRUNTIME = "1.20"

_RELUS = {F.relu, torch.relu}


def check_int4_opset(opset: int, pack_int4: bool | None) -> bool:
    """Whether to pack int4 weights at ``opset``: None means "where the opset has int4"; an
    explicit True below :data:`INT4_MIN_OPSET` is an error."""
    if pack_int4 is None:
        return opset >= INT4_MIN_OPSET
    if pack_int4 and opset < INT4_MIN_OPSET:
        raise ExportError(f"ONNX export: pack_int4 needs opset {INT4_MIN_OPSET} or newer (ONNX int4 types); "
                          f"got opset={opset}")
    return bool(pack_int4)


def check_onnxruntime(version: str | None = None) -> str:
    """The installed onnxruntime's version, or :class:`ExportError` when it is missing or
    older than :data:`MIN_ONNXRUNTIME` (``version`` stands in for the installed one)."""
    if version is None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ExportError("running the int8 ONNX model needs onnxruntime: pip install 'qimera[onnx]'") from exc
        version = onnxruntime.__version__
    from packaging.version import Version

    if Version(version) < Version(MIN_ONNXRUNTIME):
        raise ExportError(f"the int8 ONNX form needs onnxruntime >= {MIN_ONNXRUNTIME} (int4 weights, QDQ "
                          f"fusion into QLinearConv); installed {version}")
    return version


# --------------------------------------------------------------------------- BatchNorm folding


@torch.no_grad()
def fold_batchnorm(ints: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold an eval-mode ``bn`` into a convolution with weight ``ints * step`` (``ints``
    the integers, ``(C, ...)``; ``step`` per output channel) and ``bias``.

    Returns ``(ints, step, bias)`` with ``conv(x, ints * step) + bias == bn(conv(x, ...))``
    up to float rounding and every step positive: a channel whose scale comes out negative
    (``gamma < 0``) has its integers negated; one whose scale is 0 (``gamma == 0``) keeps
    only its bias, with zero integers and step 1.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        raise ExportError("int8 ONNX form: a BatchNorm2d without running statistics (or in training mode) "
                          "cannot be folded")
    channels = ints.shape[0]
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones(channels)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros(channels)
    g = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
    b = bias.detach().float() if bias is not None else torch.zeros(channels)
    new_bias = (b - bn.running_mean.float()) * g + beta
    new_step = step.float().reshape(-1) * g
    sign = torch.where(new_step < 0, -1.0, 1.0)
    zero = new_step == 0
    shape = (-1,) + (1,) * (ints.dim() - 1)
    new_ints = ints * sign.reshape(shape)
    new_ints = torch.where(zero.reshape(shape), torch.zeros_like(new_ints), new_ints)
    new_step = torch.where(zero, torch.ones_like(new_step), new_step.abs())
    return new_ints, new_step, new_bias


# --------------------------------------------------------------------------- the graph rewrite


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELUS
    if node.op == "call_method":
        return node.target == "relu"
    return node.op == "call_module" and type(modules.get(str(node.target))) is nn.ReLU


def _is_site(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), ActQuantizer)


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _sole_batchnorm(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    user = _sole_user(node)
    if user is not None and user.op == "call_module" and type(modules.get(str(user.target))) is nn.BatchNorm2d \
            and user.args and user.args[0] is node:
        return user
    return None


def _feeds_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output goes straight into an activation quantizer (optionally
    through a ReLU): the pattern onnxruntime fuses with the convolution."""
    user = _sole_user(node)
    if user is not None and _is_relu(user, modules):
        user = _sole_user(user)
    return user is not None and _is_site(user, modules)


def _input_site(node: fx.Node, modules: dict[str, nn.Module]) -> ActQuantizer | None:
    """The activation quantizer whose output (possibly max-pooled) is ``node``'s input."""
    arg = node.args[0] if node.args else None
    for _ in range(2):
        if not isinstance(arg, fx.Node):
            return None
        if _is_site(arg, modules):
            return modules[str(arg.target)]
        if not _is_maxpool(arg, modules):
            return None
        arg = arg.args[0] if arg.args else None
    return None


def _is_maxpool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, nn.MaxPool2d) and not module.return_indices
    return node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d) and not (
        node.kwargs.get("return_indices") or (len(node.args) > 6 and node.args[6]))


def _relu_of_float_layer(node: object, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a ReLU of a weight layer that stays in float in every int8 form
    (through a BatchNorm): a convolution whose own input is on no quantizer's grid, such
    as a first convolution that reads the images."""
    if not isinstance(node, fx.Node) or not _is_relu(node, modules):
        return False
    arg = node.args[0] if node.args else None
    for _ in range(2):
        if not isinstance(arg, fx.Node) or arg.op != "call_module":
            return False
        module = modules.get(str(arg.target))
        if isinstance(module, QuantConv2d):
            return _input_site(arg, modules) is None
        if type(module) is not nn.BatchNorm2d:
            return False
        arg = arg.args[0] if arg.args else None
    return False


def pool_before_quantizer(gm: fx.GraphModule) -> int:
    """Max-pool a float layer's ReLU output before its quantizer rather than after:
    ``pool(q(relu(x)))`` becomes ``q(relu(pool(relu(x))))``, and returns how many pools
    moved. The numbers are the same to the bit: the quantizer (scale, round, clamp) never
    reverses an order, so the window's largest input gets its largest code (the -inf
    padding too, since every window holds a real element), and the second ReLU is the
    identity on the pool of a ReLU's output. What changes is the kernels onnxruntime picks
    (1.32, measured on ResNet-18 at 224 x 224, batch 8, 2 threads, Intel Xeon with AMX):
    with the quantizer first, it pools uint8 NCHW, 18.8 of the int8 form's 55 ms. Pooled in
    float, the stem stays in its blocked float layout (1.2 ms) and a quarter of the values
    are quantized. The second ReLU keeps it so: without it onnxruntime's QDQ propagation
    moves the QuantizeLinear back above the MaxPool."""
    modules = dict(gm.named_modules())
    moved = 0
    for site in list(gm.graph.nodes):
        if not _is_site(site, modules) or not site.args or not _relu_of_float_layer(site.args[0], modules):
            continue
        pool = _sole_user(site)
        if pool is None or not _is_maxpool(pool, modules) or pool.args[0] is not site:
            continue
        relu = site.args[0]
        pool.replace_all_uses_with(site)
        pool.replace_input_with(site, relu)
        site.prepend(pool)
        with gm.graph.inserting_after(pool):
            keep = gm.graph.call_function(torch.relu, (pool,))
        site.replace_input_with(relu, keep)
        moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def weight_limit(input_bits: int | None) -> int:
    """How far :func:`widen_grid` may spread a layer's int8 weights: ±127, less where the
    input's ``2**b - 1`` times it, twice, would overflow an int16 pair sum (8-bit or
    unknown inputs: ±64)."""
    return _input_limit(2 ** (input_bits if input_bits is not None else 8) - 1)


def _downstream_site(node: fx.Node, modules: dict[str, nn.Module], depth: int = 4) -> ActQuantizer | None:
    """The first activation quantizer reached from ``node`` through at most ``depth``
    operations (breadth first), or None."""
    seen = {node}
    queue = deque([(node, 0)])
    while queue:
        current, d = queue.popleft()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if _is_site(user, modules):
                return modules[str(user.target)]
            if d + 1 < depth and user.op != "output":
                queue.append((user, d + 1))
    return None


def _upstream_site(node: fx.Node, modules: dict[str, nn.Module], depth: int = 4) -> ActQuantizer | None:
    """The first activation quantizer found from ``node`` back through its inputs, at most
    ``depth`` operations away (breadth first), or None; stops at weight layers."""
    seen = {node}
    queue = deque([(node, 0)])
    while queue:
        current, d = queue.popleft()
        if _is_site(current, modules):
            return modules[str(current.target)]
        module = modules.get(str(current.target)) if current.op == "call_module" else None
        if d >= depth or current.op == "placeholder" or isinstance(module, (QDQConv2d, QDQLinear, nn.Conv2d,
                                                                           nn.Linear)):
            continue
        for arg in current.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append((arg, d + 1))
    return None


def requant_window(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """``(L, R)`` of the requantization after ``node`` (module docstring), or None when no
    activation quantizer is downstream."""
    site = _downstream_site(node, modules)
    if site is None:
        return None
    lo, hi = site.range
    right = float(hi) - min(float(lo), 0.0)
    left = right
    for user in node.users:  # the addition: its other operand's largest value
        if user.op == "call_function" and len(user.all_input_nodes) == 2:
            other = next(a for a in user.all_input_nodes if a is not node) if node in user.all_input_nodes else None
            up = _upstream_site(other, modules) if other is not None else None
            if up is not None:
                left = max(float(up.range[1]), 0.0)
    return left, right


def widen_grid(ints: torch.Tensor, step: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weights on a finer integer grid: each channel's integers times the
    largest whole ``k`` that keeps them within ``±limit``, its step divided by ``k``.

    The product ``ints * step`` is unchanged, but the integer kernel's accumulator unit
    ``x_scale * step`` is ``k`` times finer, and that is the grid the int32 bias is
    rounded to: the bias error, which moves an output by up to ``0.5 * x_scale * step /
    y_scale`` of a level and so flips outputs that lie near a rounding tie, shrinks ``k``
    times (8x for 4-bit weights, whose integers reach ±15, with ``limit`` 127)."""
    shape = (-1,) + (1,) * (ints.dim() - 1)
    peak = ints.abs().reshape(ints.shape[0], -1).amax(dim=1).clamp(min=1)
    k = torch.floor(limit / peak).clamp(min=1)
    return ints * k.reshape(shape), step / k


def _weight_twin(name: str, mod: nn.Module, node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module],
                 report: OnnxReport, requantize: bool) -> tuple[float, float] | None:
    """Replace the quantized layer ``name`` by its int8 twin, folding its BatchNorm: int8
    weights behind ``DequantizeLinear``. Where onnxruntime cannot fuse the layer into an
    integer kernel (no quantized input, or no quantizer after it and no requantization)
    the layer is listed in ``report.float_kernel_layers``: :func:`float_at_load` turns its
    weight's ``DequantizeLinear`` into constant ops, so that it runs as a float layer.
    Returns the window of the 8-bit requantization the layer's output needs (with
    ``requantize``: :func:`requant_window`), or None."""
    q, s, z = integer_weight(mod.weight, mod.w_bits)
    ints, step = q + z, (1.0 / s).reshape(-1)
    bias = mod.bias.detach().float() if mod.bias is not None else None
    bn = _sole_batchnorm(node, modules) if isinstance(mod, QuantConv2d) else None
    if bn is not None:
        ints, step, bias = fold_batchnorm(ints, step, bias, modules[str(bn.target)])
        bn.replace_all_uses_with(node)
        gm.graph.erase_node(bn)
        report.folded_batchnorms += 1
    if float(ints.abs().max()) > 127:  # an 8-bit weight's q + z needs 9 bits
        weight = ints * step.reshape((-1,) + (1,) * (ints.dim() - 1))
        new = float_twin(mod, weight)
        if bias is not None:  # (a folded BatchNorm always leaves one)
            new.bias = nn.Parameter(bias.clone(), requires_grad=False)
        report.float_weights.append(name)
        set_module(gm, name, new)
        return None
    site = _input_site(node, modules)
    conv = isinstance(mod, QuantConv2d)
    window = None
    feeds = site is not None and _feeds_quantizer(node, modules)
    if site is not None and not feeds and requantize and conv:
        window = requant_window(node, modules)
        if window is not None and not sum(window) > 0:
            window = None
    if feeds or window is not None:
        ints, step = widen_grid(ints, step, weight_limit(site.bits))
        report.qdq_weights += 1
    else:  # exported like the others, then its DequantizeLinear becomes Cast -> Mul (float_at_load)
        report.float_kernel_layers.append(name)
    zero = torch.zeros(ints.shape[0], dtype=torch.int8)
    new = (QDQConv2d if conv else QDQLinear)(mod, ints.to(torch.int8).contiguous(), step.float().contiguous(),
                                           zero, bias)
    set_module(gm, name, new)
    return window


# --------------------------------------------------------------------------- the integer-exact form
#
# A student whose recipe says ``integer_exact`` is rewritten into modules whose PyTorch
# forward runs onnxruntime's integer kernels (qimera.quant.kernels) and whose ONNX
# translation is the Q/DQ pattern onnxruntime fuses into exactly those kernels:
#
# * a convolution between two quantizers (its BatchNorm folded, its ReLU and output
#   quantizer absorbed): Int8Conv2d, exported as DQ(w) / DQ(int32 bias) -> Conv ->
#   QuantizeLinear -> Clip -> DequantizeLinear, run as QLinearConv;
# * a convolution whose output reaches the next quantizer through an addition (the
#   residual branch): Int8Conv2d requantized to uint8 with a step of the next quantizer's
#   step / 2**k, so that QLinearAdd's scale ratio is a power of two (exact in float32);
# * the addition, its ReLU and the quantizer after it: Int8Add, run as QLinearAdd. An
#   operand that reaches it through operations that keep the integer grid (slicing, zero
#   padding, max pooling: the option-A shortcut) gets a QuantizeLinear/DequantizeLinear
#   pair of its own grid in the ONNX graph, so that onnxruntime fuses the addition too.


@torch.library.custom_op("qimera::int8_conv", mutates_args=())
def _int8_conv(x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, weight: torch.Tensor,
               w_scale: torch.Tensor, w_zero: torch.Tensor, bias: torch.Tensor, bias_scale: torch.Tensor,
               y_scale: torch.Tensor, y_zero: torch.Tensor, y_min: torch.Tensor, y_max: torch.Tensor,
               stride: list[int], padding: list[int], dilation: list[int], groups: int, clip: bool,
               requant_x: bool, wide: bool) -> torch.Tensor:
    """``QLinearConv`` (then ``Clip`` to ``[y_min, y_max]`` when ``clip``) on the dequantized
    input ``x``, returned dequantized: :func:`qimera.quant.kernels.qlinear_conv`.
    ``requant_x``: the input reaches the convolution through grid-keeping operations (max
    pooling), so the ONNX graph quantizes it again, to the same integers. ``wide``: the
    partial sums may exceed float32's exact integers (:func:`qimera.quant.kernels.fits_float32`)."""
    x_int = torch.round(x.float() / x_scale)
    multiplier = requant_multiplier(x_scale, w_scale, y_scale)
    y = qlinear_conv(x_int, weight.float(), bias, multiplier, int(y_zero), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, wide=wide)
    if clip:
        y = torch.clamp(y, float(y_min), float(y_max))
    return (y - y_zero.float()) * y_scale


@_int8_conv.register_fake
def _(x, x_scale, x_zero, weight, w_scale, w_zero, bias, bias_scale, y_scale, y_zero, y_min, y_max, stride,
      padding, dilation, groups, clip, requant_x, wide):
    return F.conv2d(x, weight.float(), None, stride, padding, dilation, groups)


@torch.library.custom_op("qimera::int8_add", mutates_args=())
def _int8_add(a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              b_zero: torch.Tensor, c_scale: torch.Tensor, c_zero: torch.Tensor, c_min: torch.Tensor,
              c_max: torch.Tensor, requant_a: bool, requant_b: bool) -> torch.Tensor:
    """``QLinearAdd`` of the dequantized ``a`` and ``b`` (then ``Clip`` to ``[c_min,
    c_max]``), returned dequantized: :func:`qimera.quant.kernels.qlinear_add`."""
    a_int = torch.round(a.float() / a_scale) + a_zero.float()
    b_int = torch.round(b.float() / b_scale) + b_zero.float()
    c = qlinear_add(a_int, a_scale, int(a_zero), b_int, b_scale, int(b_zero), c_scale, int(c_zero))
    c = torch.clamp(c, float(c_min), float(c_max))
    return (c - c_zero.float()) * c_scale


@_int8_add.register_fake
def _(a, a_scale, a_zero, b, b_scale, b_zero, c_scale, c_zero, c_min, c_max, requant_a, requant_b):
    return torch.empty_like(a)


def translation_table() -> dict:
    """The ONNX translations of the integer-exact form's custom ops (for torch's exporter)."""
    try:
        from onnxscript import opset21 as op
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'qimera[onnx]'") from exc

    def int8_conv(x, x_scale, x_zero, weight, w_scale, w_zero, bias, bias_scale, y_scale, y_zero, y_min, y_max,
                  stride, padding, dilation, groups, clip, requant_x, wide):
        if requant_x:
            x = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zero), x_scale, x_zero)
        w = op.DequantizeLinear(weight, w_scale, w_zero, axis=0)
        b = op.DequantizeLinear(bias, bias_scale, axis=0)
        y = op.Conv(x, w, b, strides=stride, pads=list(padding) * 2, dilations=dilation, group=groups)
        q = op.QuantizeLinear(y, y_scale, y_zero)
        if clip:
            q = op.Clip(q, y_min, y_max)
        return op.DequantizeLinear(q, y_scale, y_zero)

    def int8_add(a, a_scale, a_zero, b, b_scale, b_zero, c_scale, c_zero, c_min, c_max, requant_a, requant_b):
        if requant_a:
            a = op.DequantizeLinear(op.QuantizeLinear(a, a_scale, a_zero), a_scale, a_zero)
        if requant_b:
            b = op.DequantizeLinear(op.QuantizeLinear(b, b_scale, b_zero), b_scale, b_zero)
        q = op.Clip(op.QuantizeLinear(op.Add(a, b), c_scale, c_zero), c_min, c_max)
        return op.DequantizeLinear(q, c_scale, c_zero)

    return {torch.ops.qimera.int8_conv.default: int8_conv, torch.ops.qimera.int8_add.default: int8_add}


def _u8(value: int) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.uint8)


class Int8Conv2d(nn.Module):
    """A convolution as onnxruntime's ``QLinearConv`` computes it: int8 weights (zero point
    0), an int32 bias on the accumulator grid, the output rounded by the kernel's
    multiplier onto the grid ``(scale, zero_point)`` and clipped to ``[0, qmax]``."""

    def __init__(self, conv: nn.Conv2d, ints: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                 x_scale: torch.Tensor, x_top: int, y_scale: torch.Tensor, y_zero: int, y_max: int,
                 requant_x: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ExportError(f"int8 form: conv padding={conv.padding!r}, padding_mode={conv.padding_mode!r} "
                              "is not supported (numeric padding with zeros only)")
        self.register_buffer("x_scale", x_scale.reshape(()).float().clone())
        self.register_buffer("x_zero", _u8(0))
        self.register_buffer("qweight", ints.to(torch.int8).contiguous())
        self.register_buffer("scale", w_scale.reshape(-1).float().contiguous())
        self.register_buffer("zero_point", torch.zeros(ints.shape[0], dtype=torch.int8))
        self.register_buffer("qbias", accumulator_bias(bias, self.x_scale, self.scale))
        self.register_buffer("bias_scale", (self.x_scale * self.scale).contiguous())
        self.register_buffer("y_scale", y_scale.reshape(()).float().clone())
        self.register_buffer("y_zero", _u8(y_zero))
        self.register_buffer("y_min", _u8(0))
        self.register_buffer("y_max", _u8(y_max))
        self.clip, self.requant_x = int(y_max) < 255, bool(requant_x)
        self.wide = not fits_float32(int(x_top), float(ints.abs().max()), ints[0].numel(),
                                     float(self.qbias.abs().max().double()))
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qimera.int8_conv(x, self.x_scale, self.x_zero, self.qweight, self.scale, self.zero_point,
                                          self.qbias, self.bias_scale, self.y_scale, self.y_zero, self.y_min,
                                          self.y_max, self.stride, self.padding, self.dilation, self.groups,
                                          self.clip, self.requant_x, self.wide)


class Int8Add(nn.Module):
    """An addition, its ReLU and the quantizer after it, as onnxruntime's ``QLinearAdd``
    computes them; ``requant_a``/``requant_b``: that operand gets a Q/DQ pair of its grid
    in the ONNX graph (it reaches the addition through ops that keep its grid)."""

    def __init__(self, a: tuple[torch.Tensor, int], b: tuple[torch.Tensor, int], c: tuple[torch.Tensor, int],
                 c_max: int, requant_a: bool, requant_b: bool):
        super().__init__()
        for name, (scale, zero) in (("a", a), ("b", b), ("c", c)):
            self.register_buffer(f"{name}_scale", scale.reshape(()).float().clone())
            self.register_buffer(f"{name}_zero", _u8(zero))
        self.register_buffer("c_min", _u8(0))
        self.register_buffer("c_max", _u8(c_max))
        self.requant_a, self.requant_b = bool(requant_a), bool(requant_b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.qimera.int8_add(a, self.a_scale, self.a_zero, b, self.b_scale, self.b_zero, self.c_scale,
                                         self.c_zero, self.c_min, self.c_max, self.requant_a, self.requant_b)


_ADDS = (operator.add, torch.add)
#: operations whose output lies on their input's integer grid (a shortcut's slicing and
#: zero padding, max pooling)
_GRID_KEEPING = {operator.getitem, F.pad, F.max_pool2d, torch.max_pool2d}


def _site_grid(site: ActQuantizer) -> tuple[torch.Tensor, int, int] | None:
    """``(scale, zero point, top integer)`` of a frozen quantizer as the ONNX graph holds
    it, or None when its integers are not uint8 with zero point 0 (a range that does not
    start at 0: not a ReLU's output)."""
    twin = activation_twin(site)
    if not isinstance(twin, QDQActivation) or twin.zero_point.dtype != torch.uint8 or int(twin.zero_point) != 0:
        return None
    return twin.scale, 0, int(twin.qhi)


def _pow2_step(window: tuple[float, float], out_scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The uint8 grid of a residual branch: step ``out_scale / 2**k`` with the largest
    ``k`` whose 256 levels still cover ``[-L, R]``, and the zero point that puts ``-L``
    on it."""
    left, right = window
    k = math.floor(math.log2(255.0 * float(out_scale) / (left + right)))
    step = out_scale.float() * (2.0 ** -k)
    return step, min(255, max(0, round(left / float(step))))


def _input_limit(top: int) -> int:
    """:func:`weight_limit` for an input whose integers reach ``top``."""
    return min(WEIGHT_LIMIT, _PAIR_SUM_LIMIT // (2 * max(1, int(top))))


#: a node's output lies on the uint8 grid ``(scale, zero point, top integer)``
Grid = tuple[torch.Tensor, int, int]


class _ExactRewrite:
    """The integer-exact rewrite of one traced student (see the comment above), node by
    node in graph order, so that an operand is rewritten before its users."""

    def __init__(self, gm: fx.GraphModule, report: OnnxReport):
        self.gm, self.report = gm, report
        self.modules = dict(gm.named_modules())
        self.grid: dict[fx.Node, Grid] = {}
        self.erased: set[fx.Node] = set()

    def _erase(self, node: fx.Node) -> None:
        self.gm.graph.erase_node(node)
        self.erased.add(node)

    def _site(self, node: fx.Node) -> ActQuantizer | None:
        return self.modules[str(node.target)] if _is_site(node, self.modules) else None

    def _out_site(self, node: fx.Node) -> fx.Node | None:
        """The quantizer node that takes ``node``'s output alone (through a ReLU), or None."""
        if not _feeds_quantizer(node, self.modules):
            return None
        user = _sole_user(node)
        return _sole_user(user) if _is_relu(user, self.modules) else user

    def _absorb(self, node: fx.Node, new: fx.Node) -> None:
        """Route the users of the quantizer after ``node`` (through its ReLU) to ``new``,
        and drop the ReLU and the quantizer."""
        site = self._out_site(node)
        relu = _sole_user(node)
        site.replace_all_uses_with(new)
        self._erase(site)
        if relu is not site:
            self._erase(relu)

    def node_grid(self, node: object) -> Grid | None:
        if not isinstance(node, fx.Node):
            return None
        if node in self.grid:
            return self.grid[node]
        site = self._site(node)
        return _site_grid(site) if site is not None else None

    def operand(self, node: object) -> tuple[Grid, bool] | None:
        """The grid of ``node``'s output and whether it is reached through operations that
        keep the grid (slicing, zero padding, max pooling), or None."""
        hops = 0
        while isinstance(node, fx.Node) and hops <= 4:
            grid = self.node_grid(node)
            if grid is not None:
                return grid, hops > 0
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            keeps = isinstance(module, (nn.MaxPool2d, nn.Identity)) or (
                node.op == "call_function" and node.target in _GRID_KEEPING)
            if node.op == "call_function" and node.target is F.pad:
                value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
                keeps = value in (None, 0, 0.0)
            if not keeps or not node.args:
                return None
            node, hops = node.args[0], hops + (not isinstance(module, nn.Identity))
        return None

    def conv(self, node: fx.Node, mod: QuantConv2d) -> bool:
        """Rewrite one quantized convolution into :class:`Int8Conv2d`; False (the graph
        untouched) where the exact form cannot hold it: its input is not on a ReLU
        quantizer's grid (the first convolution), its weights need more than int8, or no
        quantizer takes its output (directly, or through an addition)."""
        found = self.operand(node.args[0]) if node.args else None
        if found is None or found[0][1] != 0:
            return False
        (x_scale, _, x_top), requant_x = found
        q, s, z = integer_weight(mod.weight, mod.w_bits)
        ints, step = q + z, (1.0 / s).reshape(-1)
        if float(ints.abs().max()) > 127:
            return False
        bn = _sole_batchnorm(node, self.modules)
        tail = bn if bn is not None else node
        out_site = self._out_site(tail)
        if out_site is not None:
            out = self.node_grid(out_site)
            if out is None:
                return False
            y_scale, y_zero, y_max = out
        else:
            add = _sole_user(tail)
            is_add = add is not None and add.op == "call_function" and add.target in _ADDS
            out = self.node_grid(self._out_site(add)) if is_add else None
            if out is None:
                return False
            right = out[2] * float(out[0])
            other = next((a for a in add.args if a is not tail), None)
            found_other = self.operand(other)
            left = found_other[0][2] * float(found_other[0][0]) if found_other is not None else right
            (y_scale, y_zero), y_max = _pow2_step((left, right), out[0]), 255
        bias = mod.bias.detach().float() if mod.bias is not None else torch.zeros(ints.shape[0])
        if bn is not None:
            ints, step, bias = fold_batchnorm(ints, step, bias, self.modules[str(bn.target)])
            bn.replace_all_uses_with(node)
            self._erase(bn)
            self.report.folded_batchnorms += 1
        ints, step = widen_grid(ints, step, _input_limit(x_top))
        new = Int8Conv2d(mod, ints, step, bias, x_scale, x_top, y_scale, y_zero, y_max, requant_x)
        set_module(self.gm, str(node.target), new)
        self.modules[str(node.target)] = new
        if out_site is not None:
            self._absorb(node, node)
        else:
            self.report.requantized.append(str(node.target))
        self.grid[node] = (new.y_scale, y_zero, y_max)
        self.report.qdq_weights += 1
        return True

    def add(self, node: fx.Node) -> bool:
        """Rewrite an addition followed (through a ReLU) by a quantizer into :class:`Int8Add`."""
        if not (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs):
            return False
        out_site = self._out_site(node)
        operands = [self.operand(a) for a in node.args]
        out = self.node_grid(out_site)
        if out is None or any(o is None for o in operands):
            return False
        (ga, ra), (gb, rb) = operands
        name = f"{node.name}_int8"
        module = Int8Add(ga[:2], gb[:2], out[:2], out[2], ra, rb)
        self.gm.add_submodule(name, module)
        self.modules[name] = module
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, tuple(node.args))
        self._absorb(node, new)
        self._erase(node)
        self.grid[new] = (module.c_scale, out[1], out[2])
        self.report.integer_adds += 1
        return True

    def run(self, layers: dict[str, nn.Module]) -> list[fx.Node]:
        """Rewrite every convolution and addition that the exact form holds; returns the
        weight-layer nodes left to the float path."""
        rest = []
        for node in list(self.gm.graph.nodes):
            if node.op == "output" or node in self.erased:
                continue
            name = str(node.target)
            if node.op == "call_module" and name in layers:
                if not (isinstance(layers[name], QuantConv2d) and self.conv(node, layers[name])):
                    rest.append(node)
            elif node.op == "call_function":
                self.add(node)
        return rest


@torch.no_grad()
def int8_model(student: nn.Module, *, requantize: bool = False) -> tuple[nn.Module, OnnxReport]:
    """An eval-mode CPU copy of ``student`` rewritten into the int8 form (module
    docstring; ``requantize``: the 8-bit requantization of residual branches), with the
    custom ops of :mod:`qimera.export.onnx_qdq`, so that it runs in PyTorch and exports to
    ONNX; and what the rewrite did.

    A student whose recipe is integer-exact (``QuantRecipe.integer_exact``) gets the
    integer-exact form instead (the comment above :class:`Int8Conv2d`): its PyTorch
    forward computes the integers onnxruntime's kernels compute, and it is how such a
    student is evaluated (:func:`qimera.evaluate.evaluated_form`). Its residual branches
    are requantized by construction, so ``requantize`` does not apply to it."""
    if not isinstance(student, fx.GraphModule):
        raise ExportError("int8 ONNX form: the student must be a torch.fx-traced model (quantize_model traces "
                          f"every traceable teacher); {type(student).__name__} is not")
    exact = is_integer_exact(student)
    if exact and requantize:
        raise ExportError("int8 ONNX form: requantize=True applies to the paper's recipe; an integer-exact "
                          "student's form requantizes its residual branches itself")
    gm = copy.deepcopy(student).cpu().float().eval()
    detach_recipe(gm)  # a twin, not a student: evaluate() scores it as it is
    pool_before_quantizer(gm)
    layers, sites = exportable_parts(gm)
    report = OnnxReport(form="int8", integer_exact=exact)
    if exact:
        rewrite = _ExactRewrite(gm, report)
        weight_nodes = rewrite.run(layers)
        modules = rewrite.modules
    else:
        modules = dict(gm.named_modules())
        weight_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in layers]
    needs_requant: list[tuple[fx.Node, tuple[float, float]]] = []
    for node in weight_nodes:
        name = str(node.target)
        window = _weight_twin(name, layers[name], node, gm, modules, report, requantize)
        modules[name] = gm.get_submodule(name)
        if window is not None:
            needs_requant.append((node, window))
    for node, (left, right) in needs_requant:
        step = (left + right) / 255.0
        name = f"{node.target}_requant"
        gm.add_submodule(name, QDQRequant(step, min(255, round(left / step))))
        with gm.graph.inserting_after(node):
            rq = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(rq, delete_user_cb=lambda user: user is not rq)
        report.requantized.append(str(node.target))
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    convert_activations(gm, {n: site for n, site in sites.items() if n in called}, report)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms, the absorbed quantizers
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval(), report


# --------------------------------------------------------------------------- passes over the ONNX graph


def finish_proto(proto, report: OnnxReport, pack_int4: bool) -> None:
    """The int8 form's passes over the graph torch exported, in their order: the float
    layers' weights computed at load (:func:`float_at_load`), the int4 packing
    (:func:`pack_int4_weights`, counted in ``report``), for the integer-exact form the
    channels-last convolutions (:func:`qimera.export.onnx_layout.channels_last_convs`)
    and the short names (:func:`compact_names`)."""
    if report.float_kernel_layers:
        float_at_load(proto, report.float_kernel_layers)
    if pack_int4:
        report.int4_weights = pack_int4_weights(proto)
    if report.integer_exact:
        report.channels_last_convs = channels_last_convs(proto)
    compact_names(proto)



def _initializers(proto) -> dict[str, Any]:
    return {init.name: init for init in proto.graph.initializer}


def pack_int4_weights(proto) -> int:
    """Store every per-channel int8 weight behind ``DequantizeLinear`` whose channels
    take at most 16 levels of their grid as a packed ``int4`` initializer (in units of
    the channel's :func:`widen_grid` gain, minus a per-channel offset) read by
    ``Cast(int32) -> Add(offset) -> Mul(gain) -> Cast(int8)``; returns how many. The
    model must be opset 21 or newer (IR 10)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(proto)
    done: set[str] = set()
    new_nodes = []
    for node in proto.graph.node:
        if node.op_type not in ("DequantizeLinear", "Cast") or node.input[0] in done or node.input[0] not in inits:
            continue
        tensor = inits[node.input[0]]
        if tensor.data_type != TensorProto.INT8 or len(tensor.dims) < 2:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int32)
        flat = values.reshape(values.shape[0], -1)
        gain = np.maximum(np.gcd.reduce(np.abs(flat), axis=1), 1)  # widen_grid's k (or a multiple)
        units = flat // gain[:, None]
        low, high = units.min(axis=1), units.max(axis=1)
        if int((high - low).max()) > 15:
            continue
        offset = (low + 8).astype(np.int32)  # units - offset in [-8, 7]
        small = (units - offset[:, None]).reshape(values.shape)
        nibbles = (small.reshape(-1) & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
        name = tensor.name
        int4 = helper.make_tensor(f"{name}_int4", TensorProto.INT4, list(values.shape), packed, raw=True)
        shape = (-1,) + (1,) * (values.ndim - 1)
        off = numpy_helper.from_array(offset.reshape(shape), f"{name}_offset")
        mul = numpy_helper.from_array(gain.astype(np.int32).reshape(shape), f"{name}_gain")
        proto.graph.initializer.remove(tensor)
        proto.graph.initializer.extend([int4, off, mul])
        widened, shifted, scaled = f"{name}_int32", f"{name}_shifted", f"{name}_scaled"
        new_nodes += [
            helper.make_node("Cast", [int4.name], [widened], to=TensorProto.INT32, name=f"{name}_unpack"),
            helper.make_node("Add", [widened, off.name], [shifted], name=f"{name}_offset_add"),
            helper.make_node("Mul", [shifted, mul.name], [scaled], name=f"{name}_gain_mul"),
            helper.make_node("Cast", [scaled], [name], to=TensorProto.INT8, name=f"{name}_to_int8"),
        ]
        done.add(name)
    if new_nodes:
        nodes = new_nodes + list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        if proto.ir_version < 10:
            proto.ir_version = 10
        onnx.checker.check_model(proto)
    return len(done)


def compact_names(proto) -> None:
    """Rename every tensor but the graph's inputs and outputs to a short id (``t0``,
    ``t1``, ...) and drop node names: the deployable file need not carry the exporter's
    long names (``layer3.2.conv1.qweight_int4``, ``dequantize_per_channel_17``), which are
    a tenth of a 4-bit ResNet-20's file."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names):x}"
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


def float_at_load(proto, layers: list[str]) -> int:
    """For each layer in ``layers`` (its weight is the initializer ``<layer>.qweight``),
    replace the weight's ``DequantizeLinear`` (int8, zero point 0, axis 0) by ``Cast ->
    Mul(step)``: constant ops, which onnxruntime folds into a float weight when the session
    starts, so that the layer runs on the float kernels (NCHWc convolutions, fused with the
    following addition and ReLU) instead of dequantizing its weight at every call. The
    stored integers stay (and pack as int4). Returns how many were replaced."""
    from onnx import TensorProto, helper, numpy_helper

    wanted = {f"{layer}.qweight" for layer in layers}
    inits = _initializers(proto)
    nodes, count = [], 0
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in wanted and node.input[1] in inits:
            weight = inits[node.input[0]]
            step = numpy_helper.to_array(inits[node.input[1]]).astype("float32")
            shaped = numpy_helper.from_array(step.reshape((-1,) + (1,) * (len(weight.dims) - 1)),
                                             f"{node.input[0]}_step")
            proto.graph.initializer.append(shaped)
            widened = f"{node.input[0]}_float"
            nodes += [helper.make_node("Cast", [node.input[0]], [widened], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [widened, shaped.name], [node.output[0]])]
            count += 1
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for n in proto.graph.node for name in n.input}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)  # the zero points and scales the DequantizeLinears read
    return count
