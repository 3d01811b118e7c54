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
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._files import atomic_write
from .export import ExportError, _float_twin, exportable_parts, integer_weight
from .quant import QuantConv2d, set_module
from .quant.functional import affine_params, qrange

__all__ = ["OnnxReport", "OnnxRuntimeModel", "qdq_model", "export_onnx", "load_onnx_session", "measure_latency",
           "optimized_node_counts", "verify_exports", "export_float_onnx", "FORMS", "LATENCY_BATCHES"]

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
    convolution whose output no activation quantizer takes directly (:mod:`qimera.onnx_int8`)."""
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
    #: "qdq" (the exact reference form) or "int8" (the deployable form, :mod:`qimera.onnx_int8`)
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


# --------------------------------------------------------------------------- export


#: the two forms :func:`export_onnx` writes
FORMS = ("qdq", "int8")


def export_onnx(
    student: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int],
    opset: int | None = None,
    metadata: dict[str, Any] | None = None,
    form: str = "qdq",
    pack_int4: bool | None = None,
    requantize: bool = False,
) -> OnnxReport:
    """Write ``student`` (frozen, fake-quantized) as an ONNX model at ``path``.

    ``form="qdq"`` (default opset :data:`DEFAULT_OPSET`) is the exact reference form
    described above. ``form="int8"`` (default opset
    :data:`qimera.onnx_int8.INT8_DEFAULT_OPSET`) is the deployable form of
    :mod:`qimera.onnx_int8`: BatchNorm folded, int8 weights with one zero point, so that
    onnxruntime runs each convolution between two quantizers as ``QLinearConv``;
    ``pack_int4`` stores weights of at most 4 bits as packed ONNX ``int4`` (None: where
    the opset allows it, 21 or newer); ``requantize`` adds the approximate 8-bit
    requantization of residual branches (faster, not exact).

    The graph has one input ``images`` (float32, ``(batch, *input_size)``, normalised as
    the teacher expects; the batch dimension is dynamic) and one output ``logits``.
    ``metadata`` entries are stored as the model's ``metadata_props``. ``opset`` 18 to 23
    (torch's exporter writes nothing older). The file appears complete or not at all.
    """
    if form not in FORMS:
        raise ExportError(f"ONNX export: form={form!r}; allowed {', '.join(FORMS)}")
    if form == "int8":
        from .onnx_int8 import INT8_DEFAULT_OPSET, check_int4_opset

        opset = INT8_DEFAULT_OPSET if opset is None else opset
    opset = DEFAULT_OPSET if opset is None else opset
    if not 18 <= int(opset) <= 23:
        raise ExportError(f"ONNX export: opset={opset!r}; allowed 18 to 23")
    if form == "int8":
        pack_int4 = check_int4_opset(int(opset), pack_int4)
    elif pack_int4 or requantize:
        raise ExportError("ONNX export: pack_int4 and requantize apply to form='int8' only (the qdq form is the "
                          "exact reference, with uint8 weights)")
    try:
        import onnx  # noqa: F401 - checked here, before any work, for the error message
    except ImportError as exc:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'qimera[onnx]'") from exc
    if form == "int8":
        from .onnx_int8 import int8_model

        model, report = int8_model(student, requantize=requantize)
    else:
        model, report = qdq_model(student)
    report.opset = int(opset)
    proto = _exported_proto(model, input_size, int(opset))
    if form == "int8":
        from .onnx_int8 import finish_proto

        finish_proto(proto, report, pack_int4)
    report.node_counts = _write_proto(proto, path, metadata)
    return report


def export_float_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int],
                      opset: int = DEFAULT_OPSET) -> dict[str, int]:
    """Write a float model (the teacher) as plain ONNX, with the same input, output and
    dynamic batch as the student's exports: the baseline the deployment figures compare
    against. Returns the node counts."""
    model = copy.deepcopy(model).cpu().float().eval()
    return _write_proto(_exported_proto(model, input_size, int(opset)), path, None)


def _exported_proto(model: nn.Module, input_size: Sequence[int], opset: int):
    """``model`` through torch's ONNX exporter (the qimera custom ops translated), one input
    ``images`` with a dynamic batch and one output ``logits``."""
    example = torch.zeros((2, *[int(d) for d in input_size]))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), external_data=False,
        custom_translation_table=_translation_table(), verbose=False,
    )
    return program.model_proto


def strip_debug_info(proto) -> None:
    """Drop what torch's exporter records for debugging and no runtime reads: each node's
    stack trace, FX node and name scopes (``metadata_props``, ``doc_string``) and the
    intermediate shapes (``value_info``, which onnxruntime infers again). It is about
    half of a small model's file."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


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


# --------------------------------------------------------------------------- running it


def load_onnx_session(path: str | os.PathLike, *, threads: int | None = None, optimized_path: str | None = None):
    """An onnxruntime CPU session for an exported model (no custom op needed), with every
    graph optimisation on; ``optimized_path`` is where onnxruntime writes the graph it runs."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("running the ONNX model needs onnxruntime: pip install 'qimera[onnx]'") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: not the optimiser's notes on unused initializers
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


#: the batch sizes :func:`measure_latency` is reported at by the export and benchmarks/deploy.py
LATENCY_BATCHES = (1, 64)


def measure_latency(path: str | os.PathLike, input_size: Sequence[int], *, batch: int, runs: int = 30,
                    warmup: int = 5, threads: int | None = None) -> float:
    """Median wall time in milliseconds of one onnxruntime call on a ``(batch,
    *input_size)`` float input, over ``runs`` calls after ``warmup`` (all optimisations
    on, CPU, ``threads`` intra-op threads or onnxruntime's default)."""
    import time

    import numpy as np

    if runs < 1:
        raise ExportError(f"measure_latency: runs={runs!r}; need at least 1")
    session = load_onnx_session(path, threads=threads)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (int(batch), *[int(d) for d in input_size])).astype(np.float32)}
    for _ in range(max(0, warmup)):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def optimized_node_counts(path: str | os.PathLike, *, threads: int | None = None) -> dict[str, int]:
    """The operator types (and how many of each) in the graph onnxruntime actually runs:
    the model as its optimiser leaves it (``SessionOptions.optimized_model_filepath``)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="qimera-ort-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        load_onnx_session(path, threads=threads, optimized_path=out)
        return _op_counts(onnx.load(out))


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
    onnx_models: Mapping[str, str | os.PathLike] | None = None,
    max_samples: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the fake-quant student, the reloaded integer export and the ONNX models (the
    Q/DQ form ``onnx_path``, reported as ``onnx``, and any others in ``onnx_models``,
    reported under their key, e.g. ``{"onnx_int8": path}``) under onnxruntime over
    ``loader`` (the first ``max_samples`` images, or all) in one pass.

    Returns top-1 of each (``student_top1``, ``integer_top1``, ``onnx_top1``,
    ``<key>_top1``), and for each export its max |Δ logits| against the student and its
    prediction agreement (the fraction of images where it predicts the student's class).
    """
    from .export import load_integer

    models: dict[str, nn.Module] = {}
    if integer_dir is not None:
        models["integer"] = load_integer(integer_dir)
    if onnx_path is not None:
        models["onnx"] = OnnxRuntimeModel(onnx_path, threads=threads)
    for key, path in (onnx_models or {}).items():
        models[key] = OnnxRuntimeModel(path, threads=threads)
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
