"""The ONNX entry points: :func:`export_onnx` writes either form of a fake-quantized
student (``"qdq"``, the exact reference of :mod:`qimera.export.onnx_qdq`, or ``"int8"``,
the deployable form of :mod:`qimera.export.onnx_int8`), :func:`export_float_onnx` the
float teacher; the rest runs the files with onnxruntime: a session
(:func:`load_onnx_session`, :class:`OnnxRuntimeModel`), the operators its optimised graph
runs (:func:`optimized_node_counts`), latency (:func:`measure_latency`) and the one-pass
verification of the student against its exports (:func:`verify_exports`).

Needs the ``onnx`` extra: ``pip install 'qimera[onnx]'`` (imported where it is used).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..quant.recipe import is_integer_exact
from .integer import ExportError, load_integer
from .onnx_int8 import INT8_DEFAULT_OPSET, check_int4_opset, finish_proto, int8_model, translation_table
from .onnx_qdq import DEFAULT_OPSET, OnnxReport, _exported_proto, _op_counts, _write_proto, qdq_model

__all__ = ["OnnxRuntimeModel", "export_onnx", "load_onnx_session", "measure_latency", "optimized_node_counts",
           "verify_exports", "export_float_onnx", "FORMS", "LATENCY_BATCHES"]


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

    ``form="qdq"`` (default opset :data:`~qimera.export.onnx_qdq.DEFAULT_OPSET`) is the exact
    reference form of :mod:`qimera.export.onnx_qdq`. ``form="int8"`` (default opset
    :data:`qimera.export.onnx_int8.INT8_DEFAULT_OPSET`) is the deployable form of
    :mod:`qimera.export.onnx_int8`: BatchNorm folded, int8 weights with one zero point, so that
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
        model, report = int8_model(student, requantize=requantize)
    else:
        model, report = qdq_model(student)
    report.opset = int(opset)
    proto = _exported_proto(model, input_size, int(opset), translation_table() if form == "int8" else None)
    if form == "int8":
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

    For an integer-exact student (``QuantRecipe.integer_exact``) the models of
    ``onnx_models`` (its int8 forms) are compared with the student as it is evaluated,
    its integer-exact form (:func:`qimera.export.onnx_int8.int8_model`), whose top-1 is
    ``student_integer_exact_top1``; the integer export and the Q/DQ form still reproduce
    the fake-quant student, the paper's arithmetic.
    """
    models: dict[str, nn.Module] = {}
    if integer_dir is not None:
        models["integer"] = load_integer(integer_dir)
    if onnx_path is not None:
        models["onnx"] = OnnxRuntimeModel(onnx_path, threads=threads)
    for key, path in (onnx_models or {}).items():
        models[key] = OnnxRuntimeModel(path, threads=threads)
    student = student.eval()
    exact = int8_model(student)[0] if is_integer_exact(student) else None
    against = {key: "student_integer_exact" if exact is not None and key in (onnx_models or {}) else "student"
               for key in models}
    correct = {"student": 0, "student_integer_exact": 0, **{k: 0 for k in models}}
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
        refs = {"student": student(images).float()}
        if exact is not None:
            refs["student_integer_exact"] = exact(images).float()
        for name, ref in refs.items():
            if not bool(torch.isfinite(ref).all()):
                raise ExportError(f"verify_exports: the {name.replace('_', ' ')}'s logits are NaN or infinite (a "
                                  "diverged student?); nothing to verify against")
            correct[name] += int((ref.argmax(1) == labels).sum())
        for key, model in models.items():
            ref = refs[against[key]]
            out = model(images).float()
            # NaN-safe: a non-finite export output counts as an infinite difference
            gap = float((out - ref).abs().max()) if bool(torch.isfinite(out).all()) else float("inf")
            delta[key] = max(delta[key], gap)
            agree[key] += int((out.argmax(1) == ref.argmax(1)).sum())
            correct[key] += int((out.argmax(1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ExportError("verify_exports: the loader yielded no samples")
    result: dict[str, Any] = {"samples": seen, "student_top1": 100.0 * correct["student"] / seen}
    if exact is not None:
        result["student_integer_exact_top1"] = 100.0 * correct["student_integer_exact"] / seen
    for key in models:
        result[f"{key}_top1"] = 100.0 * correct[key] / seen
        result[f"{key}_max_abs_logit_delta"] = delta[key]
        result[f"{key}_prediction_agreement"] = agree[key] / seen
    return result
