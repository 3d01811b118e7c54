"""ONNX export of a fake-quantized student with QuantizeLinear/DequantizeLinear nodes.

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
``pip install 'qimera[onnx]'``. Nothing here is imported by the rest of the library.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._files import atomic_write
from .export import ExportError, _float_twin, exportable_parts, integer_weight
from .quant import QuantConv2d, set_module
from .quant.functional import affine_params, qrange

__all__ = ["OnnxReport", "OnnxRuntimeModel", "qdq_model", "export_onnx", "load_onnx_session"]

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

    return {
        torch.ops.qimera.quantize_dequantize.default: quantize_dequantize,
        torch.ops.qimera.dequantize_per_channel.default: dequantize_per_channel,
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

    def __init__(self, layer: nn.Module, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        return torch.ops.qimera.dequantize_per_channel(self.qweight, self.scale, self.zero_point)


class QDQConv2d(_QDQWeightLayer):
    """Conv2d reading its weight through ``DequantizeLinear`` from integers."""

    def __init__(self, conv: nn.Conv2d, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
        if conv.padding_mode != "zeros":
            raise ExportError(f"ONNX export: conv padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        super().__init__(conv, qweight, scale, zero_point)
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
    """What the Q/DQ conversion did."""

    qdq_weights: int = 0  #: layers whose weight is an integer initializer behind DequantizeLinear
    qdq_activations: int = 0  #: activation sites as QuantizeLinear -> Clip -> DequantizeLinear
    float_weights: list[str] = field(default_factory=list)  #: zero points fit no 8-bit type
    float_activations: list[str] = field(default_factory=list)
    opset: int = DEFAULT_OPSET
    node_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def qdq_model(student: nn.Module) -> tuple[nn.Module, OnnxReport]:
    """An eval-mode CPU copy of ``student`` whose quantizers compute ONNX's Q/DQ formulas.

    The copy is what :func:`export_onnx` traces; it runs in PyTorch too, which is how the
    tests check the ONNX semantics against the fake-quant student.
    """
    model = copy.deepcopy(student).cpu().float().eval()
    layers, sites = exportable_parts(model)
    report = OnnxReport()
    for name, mod in layers.items():
        bits = mod.w_bits
        qmin, _ = qrange(bits)
        q, s, z = integer_weight(mod.weight, bits)
        form = _integer_form(q, z.reshape(-1), qmin)
        if form is None:
            new = _float_twin(mod, (q + z) / s)
            report.float_weights.append(name)
        else:
            ints, zp, _ = form
            scale = (1.0 / s).reshape(-1).float()
            cls = QDQConv2d if isinstance(mod, QuantConv2d) else QDQLinear
            new = cls(mod, ints.contiguous(), scale.contiguous(), zp.contiguous())
            report.qdq_weights += 1
        set_module(model, name, new)
    for name, site in sites.items():
        lo, hi = site.range
        s, z = affine_params(lo.reshape(()), hi.reshape(()), site.bits)
        qmin, qmax = qrange(site.bits)
        form = _integer_form(torch.zeros(()), z, qmin)
        if form is None:
            new = FloatFakeQuant(s, z, site.bits)
            report.float_activations.append(name)
        else:
            _, zp, offset = form
            dtype = zp.dtype
            new = QDQActivation((1.0 / s).float(), zp,
                                torch.tensor(qmin + offset, dtype=dtype), torch.tensor(qmax + offset, dtype=dtype))
            report.qdq_activations += 1
        set_module(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), report


# --------------------------------------------------------------------------- export


def export_onnx(
    student: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> OnnxReport:
    """Write ``student`` (frozen, fake-quantized) as a Q/DQ ONNX model at ``path``.

    The graph has one input ``images`` (float32, ``(batch, *input_size)``, normalised as
    the teacher expects; the batch dimension is dynamic) and one output ``logits``.
    ``metadata`` entries are stored as the model's ``metadata_props``. ``opset`` 18 to 23
    (torch's exporter writes nothing older). The file appears complete or not at all.
    """
    if not 18 <= int(opset) <= 23:
        raise ExportError(f"ONNX export: opset={opset!r}; allowed 18 to 23")
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'qimera[onnx]'") from exc
    model, report = qdq_model(student)
    report.opset = int(opset)
    example = torch.zeros((2, *[int(d) for d in input_size]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=int(opset), input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False,
        custom_translation_table=_translation_table(), verbose=False,
    )
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda handle: handle.write(proto.SerializeToString()), "wb")
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    report.node_counts = dict(sorted(counts.items()))
    return report


# --------------------------------------------------------------------------- running it


def load_onnx_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU session for an exported model (no custom op needed)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("running the ONNX model needs onnxruntime: pip install 'qimera[onnx]'") from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` call interface, so that
    :func:`qimera.evaluate.evaluate` scores it like any PyTorch classifier (CPU tensors)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        super().__init__()
        self.session = load_onnx_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: images.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


@torch.no_grad()
def verify_exports(
    student: nn.Module,
    loader,
    *,
    integer_dir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    max_samples: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the fake-quant student, the reloaded integer export and the ONNX model under
    onnxruntime over ``loader`` (the first ``max_samples`` images, or all) in one pass.

    Returns top-1 of each, the integer model's max |Δ logits| against the student, and the
    ONNX model's prediction agreement and max |Δ logits|.
    """
    from .export import load_integer

    models: dict[str, nn.Module] = {}
    if integer_dir is not None:
        models["integer"] = load_integer(integer_dir)
    if onnx_path is not None:
        models["onnx"] = OnnxRuntimeModel(onnx_path, threads=threads)
    student = student.eval()
    correct = {"student": 0, **{k: 0 for k in models}}
    delta = {k: 0.0 for k in models}
    agree = {k: 0 for k in models}
    seen = 0
    for images, labels in loader:
        if max_samples is not None:
            if seen >= max_samples:
                break
            images, labels = images[: max_samples - seen], labels[: max_samples - seen]
        images = images.cpu().float()
        labels = labels.cpu().long().view(-1)
        ref = student(images).float()
        if not bool(torch.isfinite(ref).all()):
            raise ExportError("verify_exports: the student's logits are NaN or infinite (a diverged student?); "
                              "nothing to verify against")
        pred = ref.argmax(1)
        correct["student"] += int((pred == labels).sum())
        for key, model in models.items():
            out = model(images).float()
            # NaN-safe: a non-finite export output counts as an infinite difference
            gap = float((out - ref).abs().max()) if bool(torch.isfinite(out).all()) else float("inf")
            delta[key] = max(delta[key], gap)
            agree[key] += int((out.argmax(1) == pred).sum())
            correct[key] += int((out.argmax(1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ExportError("verify_exports: the loader yielded no samples")
    result: dict[str, Any] = {"samples": seen, "student_top1": 100.0 * correct["student"] / seen}
    for key in models:
        result[f"{key}_top1"] = 100.0 * correct[key] / seen
        result[f"{key}_max_abs_logit_delta"] = delta[key]
        result[f"{key}_prediction_agreement"] = agree[key] / seen
    return result
