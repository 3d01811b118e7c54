"""The Q/DQ reference form of the ONNX export, and what both ONNX forms share.

The ONNX export of a fake-quantized student with QuantizeLinear/DequantizeLinear nodes
(:func:`qimera.export.onnx.export_onnx`, ``form="qdq"``).

The exported graph keeps the quantization explicit, the way ONNX runtimes and
TensorRT-style toolchains expect it:

* every weight-quantized layer reads an integer initializer through
  ``DequantizeLinear`` (per output channel, ``axis=0``) into its ``Conv``/``Gemm``;
* every activation quantizer becomes ``QuantizeLinear -> Clip -> DequantizeLinear``
  (per tensor). ONNX's 8-bit types hold every bit width up to 8; the ``Clip`` on the
  integer tensor narrows the 8-bit grid to the student's ``2**b`` levels.

Integers are stored unsigned (``q - qmin`` in ``[0, 2**b - 1]`` with zero point
``-round(s * lo)``) when the zero point fits ``uint8``, which it does whenever the range
contains 0: all ReLU outputs and nearly every weight channel. A range that does not
contain 0 may need the signed form (``int8``, zero point ``-z``); a weight or activation
whose zero point fits neither keeps its exact fake-quant arithmetic as float ops, and the
export report counts it.

Both the ONNX graph and an eager PyTorch twin (:func:`qdq_model`) are built from two
custom ops, ``qimera::dequantize_per_channel`` and ``qimera::quantize_dequantize``, whose
PyTorch kernels compute ONNX's formulas (``round(x / scale) + zero_point``, saturate, clip,
``(q - zero_point) * scale``). The twin differs from the fake-quant student only in float
rounding (``x / (1/s)`` instead of ``x * s``), so onnxruntime, the twin and the student
agree on nearly every prediction.

Needs torch 2.6 or newer, ``onnx``, ``onnxscript`` (torch's exporter) and, to run the model, ``onnxruntime``:
``pip install 'qimera[onnx]'``. Nothing outside :mod:`qimera.export` in the library imports
it. The int8 form (:mod:`qimera.export.onnx_int8`) builds on the same custom ops, layer
modules, :class:`OnnxReport` and proto helpers.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._files import atomic_write
from ..quant import QuantConv2d, set_module
from ..quant.recipe import detach_recipe
from ..quant.functional import affine_params, qrange
from .integer import ExportError, exportable_parts, float_twin, integer_weight

__all__ = ["OnnxReport", "qdq_model", "activation_twin", "convert_activations", "QDQConv2d", "QDQLinear",
           "QDQActivation", "QDQRequant", "FloatFakeQuant", "strip_debug_info", "DEFAULT_OPSET", "INPUT_NAME",
           "OUTPUT_NAME"]

DEFAULT_OPSET = 20
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("qimera::quantize_dequantize", mutates_args=())
def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         qlo: torch.Tensor, qhi: torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear (round half to even, saturate), Clip to [qlo, qhi], DequantizeLinear."""
    zp = zero_point.float()
    q = torch.clamp(torch.round(x.float() / scale) + zp, qlo.float(), qhi.float())
    return ((q - zp) * scale).to(x.dtype)


@_quantize_dequantize.register_fake
def _(x, scale, zero_point, qlo, qhi):
    return torch.empty_like(x)


@torch.library.custom_op("qimera::requantize", mutates_args=())
def _requantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear to the 8-bit type of ``zero_point`` (round half to even,
    saturate) then DequantizeLinear: the requantization the int8 form puts after a
    convolution whose output no activation quantizer takes directly (:mod:`qimera.export.onnx_int8`)."""
    zp = zero_point.float()
    lo, hi = (0.0, 255.0) if zero_point.dtype == torch.uint8 else (-128.0, 127.0)
    q = torch.clamp(torch.round(x.float() / scale) + zp, lo, hi)
    return ((q - zp) * scale).to(x.dtype)


@_requantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("qimera::dequantize_per_channel", mutates_args=())
def _dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX DequantizeLinear with axis 0: ``(q - zero_point) * scale`` per output channel."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@_dequantize_per_channel.register_fake
def _(q, scale, zero_point):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _translation_table() -> dict:
    try:
        from onnxscript import opset18 as op
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'qimera[onnx]'") from exc

    def quantize_dequantize(x, scale, zero_point, qlo, qhi):
        q = op.QuantizeLinear(x, scale, zero_point)
        return op.DequantizeLinear(op.Clip(q, qlo, qhi), scale, zero_point)

    def dequantize_per_channel(q, scale, zero_point):
        return op.DequantizeLinear(q, scale, zero_point, axis=0)

    def requantize(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    return {
        torch.ops.qimera.quantize_dequantize.default: quantize_dequantize,
        torch.ops.qimera.dequantize_per_channel.default: dequantize_per_channel,
        torch.ops.qimera.requantize.default: requantize,
    }


# --------------------------------------------------------------------------- the Q/DQ twin


def _integer_form(q: torch.Tensor, z: torch.Tensor, qmin: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(integers, zero_point, offset)`` in uint8 or int8 such that ``q + z = ints - zp``,
    or None when the zero points fit neither type. ``offset`` maps the signed grid onto the
    stored one (``ints = q + offset``)."""
    zp_unsigned = -(z + qmin)  # = -round(s * lo)
    if zp_unsigned.min() >= 0 and zp_unsigned.max() <= 255:
        return (q - qmin).to(torch.uint8), zp_unsigned.to(torch.uint8), -qmin
    zp_signed = -z
    if zp_signed.min() >= -128 and zp_signed.max() <= 127:
        return q.to(torch.int8), zp_signed.to(torch.int8), 0
    return None


class _QDQWeightLayer(nn.Module):
    """A layer whose weight is read through ``DequantizeLinear`` (axis 0) from integers."""

    def __init__(self, layer: nn.Module, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        if bias is None and layer.bias is not None:
            bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        return torch.ops.qimera.dequantize_per_channel(self.qweight, self.scale, self.zero_point)


class QDQConv2d(_QDQWeightLayer):
    """Conv2d reading its weight through ``DequantizeLinear`` from integers."""

    def __init__(self, conv: nn.Conv2d, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None = None):
        if conv.padding_mode != "zeros":
            raise ExportError(f"ONNX export: conv padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        super().__init__(conv, qweight, scale, zero_point, bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(_QDQWeightLayer):
    """Linear reading its weight through ``DequantizeLinear`` from integers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class QDQActivation(nn.Module):
    """A frozen activation quantizer as ``QuantizeLinear -> Clip -> DequantizeLinear``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qlo: torch.Tensor, qhi: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("qlo", qlo)
        self.register_buffer("qhi", qhi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qimera.quantize_dequantize(x, self.scale, self.zero_point, self.qlo, self.qhi)


class QDQRequant(nn.Module):
    """``QuantizeLinear -> DequantizeLinear`` to uint8 with step ``scale`` and zero point
    ``zero_point``: the window ``[-zero_point * scale, (255 - zero_point) * scale]``."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qimera.requantize(x, self.scale, self.zero_point)


class FloatFakeQuant(nn.Module):
    """The SPEC quantizer as plain float ops, for a range whose zero point fits no 8-bit type."""

    def __init__(self, s: torch.Tensor, z: torch.Tensor, bits: int):
        super().__init__()
        self.qmin, self.qmax = qrange(bits)
        self.register_buffer("s", s.reshape(()).clone())
        self.register_buffer("z", z.reshape(()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x * self.s - self.z), self.qmin, self.qmax)
        return (q + self.z) / self.s


@dataclass
class OnnxReport:
    """What the conversion to ONNX did (either form)."""

    qdq_weights: int = 0  #: layers whose weight is an integer initializer behind DequantizeLinear
    qdq_activations: int = 0  #: activation sites as QuantizeLinear -> Clip -> DequantizeLinear
    float_weights: list[str] = field(default_factory=list)  #: zero points fit no 8-bit type
    float_activations: list[str] = field(default_factory=list)
    opset: int = DEFAULT_OPSET
    node_counts: dict[str, int] = field(default_factory=dict)
    #: "qdq" (the exact reference form) or "int8" (the deployable form, :mod:`qimera.export.onnx_int8`)
    form: str = "qdq"
    #: int8 form: BatchNorm layers folded into the preceding convolution's scale and bias
    folded_batchnorms: int = 0
    #: int8 form: convolutions whose output gets an 8-bit requantization (layer names)
    requantized: list[str] = field(default_factory=list)
    #: int8 form: weight initializers stored as packed ONNX int4
    int4_weights: int = 0
    #: int8 form: layers that run in float (no quantizer on both sides to fuse with), on a
    #: weight onnxruntime computes once from the stored integers
    float_kernel_layers: list[str] = field(default_factory=list)
    #: int8 form: the student's recipe is integer-exact, and so is this form (QuantRecipe.integer_exact)
    integer_exact: bool = False
    #: int8 form, integer-exact: additions run as QLinearAdd
    integer_adds: int = 0
    #: int8 form, integer-exact: convolutions written as channels-last QLinearConv (onnx_layout)
    channels_last_convs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def qdq_model(student: nn.Module) -> tuple[nn.Module, OnnxReport]:
    """An eval-mode CPU copy of ``student`` whose quantizers compute ONNX's Q/DQ formulas.

    The copy is what :func:`qimera.export.onnx.export_onnx` traces; it runs in PyTorch too, which is how the
    tests check the ONNX semantics against the fake-quant student.
    """
    model = copy.deepcopy(student).cpu().float().eval()
    detach_recipe(model)  # a twin, not a student
    layers, sites = exportable_parts(model)
    report = OnnxReport()
    for name, mod in layers.items():
        bits = mod.w_bits
        qmin, _ = qrange(bits)
        q, s, z = integer_weight(mod.weight, bits)
        form = _integer_form(q, z.reshape(-1), qmin)
        if form is None:
            new = float_twin(mod, (q + z) / s)
            report.float_weights.append(name)
        else:
            ints, zp, _ = form
            scale = (1.0 / s).reshape(-1).float()
            cls = QDQConv2d if isinstance(mod, QuantConv2d) else QDQLinear
            new = cls(mod, ints.contiguous(), scale.contiguous(), zp.contiguous())
            report.qdq_weights += 1
        set_module(model, name, new)
    convert_activations(model, sites, report)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), report


def activation_twin(site) -> nn.Module | None:
    """A frozen activation quantizer as :class:`QDQActivation` (its integers in uint8, or
    int8 for a range that needs the signed form), or None when its zero point fits
    neither type."""
    lo, hi = site.range
    s, z = affine_params(lo.reshape(()), hi.reshape(()), site.bits)
    qmin, qmax = qrange(site.bits)
    form = _integer_form(torch.zeros(()), z, qmin)
    if form is None:
        return None
    _, zp, offset = form
    dtype = zp.dtype
    return QDQActivation((1.0 / s).float(), zp,
                         torch.tensor(qmin + offset, dtype=dtype), torch.tensor(qmax + offset, dtype=dtype))


def convert_activations(model: nn.Module, sites: dict, report: OnnxReport) -> None:
    """Replace every activation quantizer of ``model`` by its Q/DQ twin (the float
    fake-quant where no 8-bit type holds its zero point), counting both in ``report``."""
    for name, site in sites.items():
        new = activation_twin(site)
        if new is None:
            lo, hi = site.range
            s, z = affine_params(lo.reshape(()), hi.reshape(()), site.bits)
            new = FloatFakeQuant(s, z, site.bits)
            report.float_activations.append(name)
        else:
            report.qdq_activations += 1
        set_module(model, name, new)


# --------------------------------------------------------------------------- the ONNX proto


def _exported_proto(model: nn.Module, input_size: Sequence[int], opset: int, translations: dict | None = None):
    """``model`` through torch's ONNX exporter (the qimera custom ops translated, with the
    ``translations`` of other forms' ops), one input ``images`` with a dynamic batch and
    one output ``logits``."""
    example = torch.zeros((2, *[int(d) for d in input_size]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False,
        custom_translation_table={**_translation_table(), **(translations or {})}, verbose=False,
    )
    return program.model_proto


def strip_debug_info(proto) -> None:
    """Drop what torch's exporter records for debugging and no runtime reads: each node's
    stack trace, FX node and name scopes (``metadata_props``, ``doc_string``) and the
    intermediate shapes (``value_info``, which onnxruntime infers again). It is about
    half of a small model's file. Also the graph's ``pkg.torch.export.*`` entries (the
    exported program's signature and shape ranges, as text: 20 kB of a ResNet-20's file)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    keep = [p for p in proto.graph.metadata_props if not p.key.startswith("pkg.torch.export.")]
    del proto.graph.metadata_props[:]
    proto.graph.metadata_props.extend(keep)


def _write_proto(proto, path: str | os.PathLike, metadata: dict[str, Any] | None) -> dict[str, int]:
    """Strip the exporter's debug info, add ``metadata``, check ``proto`` and write it
    atomically; returns its node counts."""
    import onnx

    strip_debug_info(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda handle: handle.write(proto.SerializeToString()), "wb")
    return _op_counts(proto)


def _op_counts(proto) -> dict[str, int]:
    """How many nodes of each operator type ``proto``'s graph has, by type."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
