"""Exports of a trained student: the integer artifact, the two ONNX forms, deployment
figures, and the whole export with its verification.

Each module imports only from the modules above it (``tests/export/test_package.py``
checks it)::

    integer.py      the integer artifact (safetensors + JSON map) and its loader; ExportError
    onnx_qdq.py     the Q/DQ reference form and what both ONNX forms share (custom ops, layers, proto helpers)
    onnx_layout.py  a pass over the int8 form's graph: channels-last integer convolutions for onnxruntime
    onnx_int8.py    the int8 form: BatchNorm folding, integer kernels, int4 packing
    onnx.py         the ONNX entry points: export_onnx(form=...), onnxruntime, latency, verify_exports
    deploy.py       deployment figures: size, latency, integer kernels, the machine
    bundle.py       export_deployables: every export of a student, verified, in one directory

The names below are imported lazily, on first use, so that ``import qimera.export`` (the
CLI does, for :class:`ExportError`) loads no ONNX module; ``from qimera.export import
export_onnx`` loads what that needs. The ``onnx`` extra (onnx, onnxscript, onnxruntime)
is imported only where it is used.
"""

from __future__ import annotations

from importlib import import_module

#: public name -> the module of the package that defines it
_EXPORTS = {
    **dict.fromkeys(("ExportError", "INTEGER_MAX_DELTA", "export_integer", "exportable_parts", "load_integer",
                     "pack_int4", "unpack_int4"), "integer"),
    **dict.fromkeys(("OnnxReport", "qdq_model"), "onnx_qdq"),
    **dict.fromkeys(("check_int4_opset", "check_onnxruntime", "int8_model"), "onnx_int8"),
    **dict.fromkeys(("OnnxRuntimeModel", "export_onnx", "measure_latency", "optimized_node_counts",
                     "verify_exports"), "onnx"),
    **dict.fromkeys(("deployment_figures",), "deploy"),
    **dict.fromkeys(("INTEGER_DIR", "ONNX_FILE", "ONNX_INT8_FILE", "ONNX_MAX_TOP1_GAP", "STUDENT_FILE",
                     "VERIFICATION_FILE", "check_verification", "export_deployables", "int8_rejection"), "bundle"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

