"""Deployment figures of the ONNX forms: file size, the operators onnxruntime runs, and
latency at batch 1 and 64 on this machine, beside the float teacher's. The export stage's
model card and ``benchmarks/deploy.py`` both take them from here."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .onnx import LATENCY_BATCHES, export_float_onnx, measure_latency, optimized_node_counts
from .onnx_int8 import INTEGER_OPS

__all__ = ["machine_description", "deployment_figures", "form_figures"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: int | None = None) -> dict[str, Any]:
    """What latency figures depend on: the CPU, its vector capability as torch sees it
    (``AVX2``, ``AVX512``, ...), the cores, onnxruntime's version and its thread count."""
    import onnxruntime

    return {"cpu": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "threads": threads if threads else "onnxruntime default (one per physical core)"}


def form_figures(path: str | os.PathLike, input_size: Sequence[int], *, runs: int,
                 batches: Sequence[int] = LATENCY_BATCHES, threads: int | None = None) -> dict[str, Any]:
    """One ONNX file's size, optimised-graph operators (and those of them that are integer
    kernels) and median latency in ms per batch size."""
    ops = optimized_node_counts(path, threads=threads)
    return {
        "file_bytes": Path(path).stat().st_size,
        "optimized_ops": ops,
        "integer_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
        "latency_ms": {str(b): measure_latency(path, input_size, batch=b, runs=runs, threads=threads)
                       for b in batches},
    }


def deployment_figures(forms: Mapping[str, str | os.PathLike], input_size: Sequence[int], *, runs: int,
                       reference: nn.Module | None = None, threads: int | None = None,
                       batches: Sequence[int] = LATENCY_BATCHES) -> dict[str, Any]:
    """:func:`form_figures` of each ONNX file in ``forms`` (name -> path) and, with
    ``reference`` (the float teacher), of its plain ONNX export as ``"fp32"``, measured one
    after another on this machine; with the machine and the settings."""
    out: dict[str, Any] = {"machine": machine_description(threads), "runs": int(runs),
                           "batches": [int(b) for b in batches], "forms": {}}
    with tempfile.TemporaryDirectory(prefix="qimera-fp32-") as tmp:
        if reference is not None:
            fp32 = Path(tmp) / "teacher.onnx"
            export_float_onnx(reference, fp32, input_size=input_size)
            out["forms"]["fp32"] = form_figures(fp32, input_size, runs=runs, batches=batches, threads=threads)
        for name, path in forms.items():
            out["forms"][name] = form_figures(path, input_size, runs=runs, batches=batches, threads=threads)
    return out
