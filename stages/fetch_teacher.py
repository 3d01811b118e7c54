"""Stage ``fetch_teacher``: the teacher's weights into the workspace, with provenance.

Loads the teacher the resolved config names (pytorchcv / torchvision download into their
cache, a ``checkpoint`` file or ``s3://bucket/key`` object, or the offline demo teacher;
S3 objects are fetched with :mod:`stages.s3`, size and SHA-256 verified), evaluates it on the
evaluation data, and writes

* ``outputs/teacher/weights.pt``: its state dict (``torch.save``);
* ``outputs/teacher/teacher.json``: source, name, the importable ``arch`` that rebuilds it
  (``module:callable``, :attr:`qimera.teachers.LoadedTeacher.arch`), classes, input size,
  normalisation, the evaluation resize and interpolation (``eval_resize``,
  ``eval_interpolation``: the teacher's own, e.g. timm's bicubic 235 -> 224), the class
  names (a list, or null where the weights carry none), the sha256 of the workspace file
  and of the file it came from, and its top-1/top-5/per-class accuracy.

Later stages load the teacher from that file as a ``checkpoint`` teacher
(:func:`stages.common.workspace_teacher`), with the same evaluation transform; this stage
checks that the rebuilt teacher has it. Both files are written into a temporary directory beside
``outputs/teacher/``, the weights are loaded back from there through the ``checkpoint``
source, and only then are the two files moved into ``outputs/teacher/`` (the record
last): a failure leaves neither file. Nothing else in ``outputs/teacher/`` is touched (DVC
keeps its ``.gitignore`` there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from qimera._files import sha256_file, staging_dir
from qimera.config import DataConfig, TeacherConfig

from .common import (
    TEACHER_CONFIG,
    TEACHER_DIR,
    TEACHER_RECORD,
    TEACHER_WEIGHTS,
    all_or_nothing,
    read_yaml,
    repo_root,
    root_relative,
    run_stage,
    workspace_teacher,
    write_json,
)


class _Inputs(BaseModel):
    """What this stage reads: ``outputs/config/teacher.yaml`` (its paths made absolute
    against the repository root by :func:`stages.common.root_relative`)."""

    model_config = ConfigDict(extra="forbid")
    teacher: TeacherConfig
    data: DataConfig
    device: str = "auto"


def _load_inputs():
    """The teacher (an ``s3://`` checkpoint fetched and verified first), the evaluation
    data and the device of ``outputs/config/teacher.yaml``, checked against each other.
    Returns ``(teacher, data, device, remote)``; ``remote`` describes the S3 object."""
    from qimera.config import ConfigError
    from qimera.data import check_fits_teacher, load_eval_data
    from qimera.teachers import load_teacher
    from qimera.trainer import resolve_device

    fragment = read_yaml(TEACHER_CONFIG)
    remote = None
    with tempfile.TemporaryDirectory(prefix="qimera-fetch-") as scratch:
        weights = (fragment["teacher"] or {}).get("weights") or ""
        if str(weights).startswith("s3://"):
            from .s3 import download

            local = Path(scratch) / "teacher-weights.pt"
            remote = download(weights, local)
            print(f"fetch_teacher: {weights} ({remote['size']} bytes, sha256 {remote['sha256'][:12]}, verified)")
            fragment["teacher"] = {**fragment["teacher"], "weights": str(local)}
        inputs = root_relative(_Inputs.model_validate(fragment), repo_root())
        try:
            device = resolve_device(inputs.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        teacher = load_teacher(inputs.teacher)
        data = load_eval_data(inputs.data, default_mean=teacher.mean, default_std=teacher.std,
                              transform=teacher.eval_transform)  # the teacher's own resize and crop
        check_fits_teacher(data, teacher.input_size, teacher.num_classes)
    return teacher, data, device, remote


def _record(teacher, data, res, remote, sha256: str) -> dict:
    """``teacher.json``: provenance, how to rebuild it, and its accuracy."""
    return {
        "source": teacher.source, "name": teacher.name, "arch": teacher.arch, "num_classes": teacher.num_classes,
        "input_size": list(teacher.input_size), "mean": list(teacher.mean), "std": list(teacher.std),
        "eval_resize": teacher.eval_transform.resize, "eval_interpolation": teacher.eval_transform.interpolation,
        "class_names": None if teacher.class_names is None else list(teacher.class_names),
        "weights": str(TEACHER_WEIGHTS), "sha256": sha256,
        "source_weights": remote["url"] if remote else teacher.weights_path,
        "source_sha256": remote["sha256"] if remote else teacher.sha256,
        "data": data.name, "num_samples": res.num_samples, "top1": res.top1, "top5": res.top5,
        "per_class": res.per_class,
    }


def check_rebuilt(teacher, rebuilt) -> None:
    """The workspace teacher must be evaluated as the original is: a different transform
    (resize, crop, interpolation, normalisation) would score it on other images."""
    if rebuilt.eval_transform != teacher.eval_transform:
        raise RuntimeError(
            f"fetch_teacher: the workspace teacher rebuilt from teacher.json has the evaluation transform "
            f"{rebuilt.eval_transform}, the {teacher.source} teacher {teacher.name!r} {teacher.eval_transform}; "
            "teacher.json does not describe it (a bug: please report it)"
        )


def main() -> None:
    import torch

    from qimera.evaluate import evaluate
    from qimera.teachers import load_teacher

    teacher, data, device, remote = _load_inputs()
    print(f"fetch_teacher: {teacher.source} {teacher.name} ({teacher.num_classes} classes, "
          f"input {list(teacher.input_size)}), rebuilt as {teacher.arch}")
    res = evaluate(teacher.model.to(device), data.loader, device=device, num_classes=teacher.num_classes)
    state = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}
    with staging_dir(TEACHER_DIR) as tmp:
        weights = tmp / TEACHER_WEIGHTS.name
        torch.save(state, weights)
        record = _record(teacher, data, res, remote, sha256_file(weights))
        rebuilt = load_teacher(workspace_teacher(record, weights))  # later stages rebuild it this way
        check_rebuilt(teacher, rebuilt)
        write_json(tmp / TEACHER_RECORD.name, record)
        TEACHER_DIR.mkdir(parents=True, exist_ok=True)
        with all_or_nothing(TEACHER_WEIGHTS, TEACHER_RECORD):
            os.replace(weights, TEACHER_WEIGHTS)
            os.replace(tmp / TEACHER_RECORD.name, TEACHER_RECORD)  # last: the record says the weights are complete
    print(f"fetch_teacher: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}% on {res.num_samples} {data.name} "
          f"images; sha256 {record['sha256'][:12]}")


if __name__ == "__main__":
    run_stage("fetch_teacher", main)
