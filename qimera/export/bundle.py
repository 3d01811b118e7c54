"""The whole export of a trained student in one call: :func:`export_deployables`.

It writes the student's state dict, the integer artifact (:mod:`qimera.export.integer`),
the Q/DQ ONNX model (:mod:`qimera.export.onnx_qdq`), the deployable int8 ONNX model
(:mod:`qimera.export.onnx_int8`) and ``verification.json`` (all of them scored on
evaluation data in one pass, :func:`qimera.export.onnx.verify_exports`), failing when an
export does not reproduce the student within :data:`INTEGER_MAX_DELTA` and
:data:`ONNX_MAX_TOP1_GAP`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .._files import atomic_dir, atomic_write
from ..evaluate import check_finite_parameters
from .deploy import deployment_figures
from .integer import INTEGER_MAX_DELTA, ExportError, export_integer
from .onnx import export_onnx, verify_exports
from .onnx_int8 import INT8_DEFAULT_OPSET, check_onnxruntime
from .onnx_qdq import DEFAULT_OPSET

#: the files :func:`export_deployables` writes into its directory
STUDENT_FILE = "student.pt"
INTEGER_DIR = "integer"
ONNX_FILE = "student.onnx"
#: the deployable ONNX form (integer kernels in onnxruntime, :mod:`qimera.export.onnx_int8`)
ONNX_INT8_FILE = "student.int8.onnx"
VERIFICATION_FILE = "verification.json"
#: onnxruntime's top-1 may differ from the student's by at most this many points
#: (ONNX rounds x / scale where the student rounds x * s; see qimera.export.onnx_qdq)
ONNX_MAX_TOP1_GAP = 0.1


def check_verification(v: dict) -> None:
    """Raise :class:`ExportError` when an exported model does not reproduce the student
    within :data:`INTEGER_MAX_DELTA` (logits) and :data:`ONNX_MAX_TOP1_GAP` (top-1)."""
    # written as "not (x <= bound)" so that NaN fails too
    if "integer_max_abs_logit_delta" in v and not v["integer_max_abs_logit_delta"] <= INTEGER_MAX_DELTA:
        raise ExportError(
            f"export: the reloaded integer model's logits differ from the student's by "
            f"{v['integer_max_abs_logit_delta']:.3g} (> {INTEGER_MAX_DELTA}); see outputs of qimera.export")
    if "onnx_top1" in v:
        gap = abs(v["onnx_top1"] - v["student_top1"])
        if not gap <= ONNX_MAX_TOP1_GAP:
            raise ExportError(
                f"export: onnxruntime top-1 {v['onnx_top1']:.2f}% differs from the student's "
                f"{v['student_top1']:.2f}% by {gap:.2f} points (> {ONNX_MAX_TOP1_GAP})")


def int8_rejection(v: dict) -> str | None:
    """Why the int8 form of verification ``v`` is not shipped (its top-1 differs from the
    student's, as the student is evaluated, by more than :data:`ONNX_MAX_TOP1_GAP`, or is
    NaN), or None when it passes or was not made. The student as evaluated is its
    integer-exact form where its recipe says so (``student_integer_exact_top1``), else the
    fake-quant student."""
    if "onnx_int8_top1" not in v:
        return None
    exact = "student_integer_exact_top1" in v
    reference = v["student_integer_exact_top1"] if exact else v["student_top1"]
    gap = abs(v["onnx_int8_top1"] - reference)
    if gap <= ONNX_MAX_TOP1_GAP:
        return None
    if exact:
        cause = ("the student is integer-exact, so onnxruntime ran kernels whose arithmetic qimera.quant.kernels does "
                 "not describe on this machine: report it with the machine's CPU and onnxruntime version")
    else:
        cause = ("its integer kernels round each bias to the int32 accumulator grid, and a sensitive 4-bit network "
                 "amplifies the one-level flips that causes; a student trained with quant.integer_exact=true "
                 "computes what the kernels compute (qimera.export.onnx_int8)")
    return (f"its top-1 {v['onnx_int8_top1']:.2f}% differs from the {'integer-exact ' if exact else ''}student's "
            f"{reference:.2f}% by {gap:.2f} points (> {ONNX_MAX_TOP1_GAP}; same prediction on "
            f"{100 * v['onnx_int8_prediction_agreement']:.2f}% of the images): {cause}")


def export_deployables(
    student: nn.Module,
    out_dir: str | os.PathLike,
    loader,
    *,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    input_size: Sequence[int],
    opset: int | None = None,
    metadata: dict[str, Any] | None = None,
    verify_samples: int | None = None,
    latency_runs: int = 0,
    reference: nn.Module | None = None,
    int8: bool = True,
) -> dict[str, Any]:
    """Export a trained student into ``out_dir`` and verify the exports.

    Writes :data:`STUDENT_FILE` (the fake-quant state dict), :data:`INTEGER_DIR`
    (:func:`export_integer`), :data:`ONNX_FILE` (the Q/DQ reference form,
    :func:`qimera.export.onnx.export_onnx` at ``opset``), :data:`ONNX_INT8_FILE` (the
    deployable int8 form at ``opset`` or 21, whichever is newer, so that its weights are
    packed int4; skipped, with the reason under ``"onnx_int8"``, when ``int8`` is false or
    for a student torch.fx could not trace) and :data:`VERIFICATION_FILE`: the student, the reloaded integer
    model and both ONNX forms under onnxruntime scored on ``loader`` (its first
    ``verify_samples`` images, or all) in one pass. An int8 form whose top-1 misses the
    student's by more than :data:`ONNX_MAX_TOP1_GAP` is removed again, with the reason
    under ``"onnx_int8"."rejected"`` (:func:`int8_rejection`): measured, not shipped. With ``latency_runs`` > 0 it also
    holds each form's file size, the operators onnxruntime's optimised graph runs and its
    median latency at :data:`qimera.export.onnx.LATENCY_BATCHES` (``reference``, the
    float teacher, is timed too, as plain ONNX in a temporary file), under
    ``"deployment"``, with the machine they were measured on. Returns that verification
    after :func:`check_verification` passed. Needs the ``onnx`` extra.

    ``out_dir`` appears complete or not at all (:func:`qimera._files.atomic_dir`): it may
    be absent, empty or an earlier export of qimera's; anything else is refused before the
    work starts, and left as it is.
    """
    check_finite_parameters(student, "student")
    if int8:
        check_onnxruntime()  # before any file is written: the int8 form needs a recent onnxruntime
    with atomic_dir(out_dir) as out:
        state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        atomic_write(out / STUDENT_FILE, lambda handle: torch.save(state, handle), "wb")
        export_integer(student, out / INTEGER_DIR, arch=arch, arch_kwargs=arch_kwargs)
        opset = DEFAULT_OPSET if opset is None else int(opset)
        report = export_onnx(student, out / ONNX_FILE, input_size=input_size, opset=opset, metadata=metadata)
        int8_report: dict[str, Any]
        if not int8:
            int8_report = {"skipped": "switched off (export.int8_form: false)"}
        elif isinstance(student, fx.GraphModule):
            int8_report = export_onnx(student, out / ONNX_INT8_FILE, input_size=input_size, form="int8",
                                      opset=max(opset, INT8_DEFAULT_OPSET), metadata=metadata).to_dict()
        else:
            int8_report = {"skipped": "the student is not a torch.fx graph (its teacher could not be traced), "
                                      "which the int8 form's rewrite needs"}
        verification = verify_exports(student, loader, integer_dir=out / INTEGER_DIR, onnx_path=out / ONNX_FILE,
                                      onnx_models={} if "skipped" in int8_report else {"onnx_int8": out / ONNX_INT8_FILE},
                                      max_samples=verify_samples)
        verification["onnx"] = report.to_dict()
        verification["onnx_int8"] = int8_report
        if latency_runs > 0:
            forms = {"qdq": out / ONNX_FILE}
            if "skipped" not in int8_report:
                forms["int8"] = out / ONNX_INT8_FILE
            verification["deployment"] = deployment_figures(forms, input_size, runs=latency_runs, reference=reference)
        check_verification(verification)
        rejected = int8_rejection(verification)
        if rejected:  # measured and reported, not shipped
            verification["onnx_int8"]["rejected"] = rejected
            (out / ONNX_INT8_FILE).unlink()
        atomic_write(out / VERIFICATION_FILE, lambda handle: handle.write(json.dumps(verification, indent=2) + "\n"), "w")
    return verification
