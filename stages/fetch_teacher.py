"""Stage ``fetch_teacher``: the teacher's weights into the workspace, with provenance.

Loads the teacher the resolved config names (pytorchcv / torchvision download into their
cache, a ``checkpoint`` file or ``s3://bucket/key`` object, or the offline demo teacher;
S3 objects are fetched with :mod:`stages.s3`, size and SHA-256 verified), evaluates it on the
evaluation data, and writes

* ``outputs/teacher/weights.pt``: its state dict (``torch.save``);
* ``outputs/teacher/teacher.json``: source, name, the importable ``arch`` that rebuilds it
  (``module:callable``), classes, input size, normalisation, the sha256 of the workspace
  file and of the file it came from, and its top-1/top-5/per-class accuracy.

Later stages load the teacher from that file as a ``checkpoint`` teacher. Both files are
written only after the workspace copy has been loaded back through the ``checkpoint``
source, so a failure leaves neither.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qimera._files import default_permissions

from .common import (
    TEACHER_CONFIG,
    TEACHER_DIR,
    TEACHER_RECORD,
    TEACHER_WEIGHTS,
    read_yaml,
    repo_root,
    root_relative,
    run_stage,
    write_json,
)

TORCHVISION_ARCHS = {"inception_v3": "stages.archs:inception_v3"}


def teacher_arch(source: str, name: str, cfg_arch: str | None) -> str:
    """The ``module:callable`` that builds the teacher's network without weights."""
    if source == "checkpoint":
        return cfg_arch
    if source == "demo":
        return "qimera.models.digits_cnn:DigitsCNN"
    if source == "torchvision":
        return TORCHVISION_ARCHS.get(name, f"torchvision.models:{name}")
    from qimera.teachers import _pytorchcv_arch_hint

    return _pytorchcv_arch_hint(name)


def main() -> None:
    import torch

    from qimera.api import prepare
    from qimera.config import Config
    from qimera.evaluate import evaluate
    from qimera.teachers import load_teacher, sha256_file

    root = repo_root()
    fragment = read_yaml(TEACHER_CONFIG)
    remote = None
    # a throw-away out_dir: prepare() proves it writable, and this stage must not create
    # the train stage's output
    with tempfile.TemporaryDirectory(prefix="qimera-fetch-") as scratch:
        weights = (fragment["teacher"] or {}).get("weights") or ""
        if str(weights).startswith("s3://"):
            from .s3 import download

            remote = download(weights, Path(scratch) / "teacher-weights.pt")
            print(f"fetch_teacher: {weights} ({remote['size']} bytes, sha256 {remote['sha256'][:12]}, verified)")
            fragment["teacher"] = {**fragment["teacher"], "weights": str(Path(scratch) / "teacher-weights.pt")}
        # method naive: the generator's constraints are checked by train, which uses it
        cfg = Config.model_validate({
            "method": "naive", "teacher": fragment["teacher"], "data": fragment["data"],
            "quant": {"w_bits": 8, "a_bits": 8}, "train": {"device": fragment["device"], "out_dir": scratch},
        })
        prep = prepare(root_relative(cfg, root))
    teacher = prep.teacher
    arch = teacher_arch(cfg.teacher.source, cfg.teacher.name, cfg.teacher.arch)
    print(f"fetch_teacher: {cfg.teacher.source} {teacher.name} ({teacher.num_classes} classes, "
          f"input {list(teacher.input_size)}), rebuilt as {arch}")

    res = evaluate(teacher.model.to(prep.device), prep.eval_data.loader, device=prep.device,
                   num_classes=teacher.num_classes)
    state = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}

    TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".pt.tmp", dir=TEACHER_DIR)
    os.close(fd)
    try:
        torch.save(state, tmp)
        # prove that later stages can rebuild it exactly this way
        load_teacher("checkpoint", name=teacher.name, arch=arch, weights=tmp, num_classes=teacher.num_classes,
                     input_size=teacher.input_size, mean=teacher.mean, std=teacher.std)
        record = {
            "source": cfg.teacher.source,
            "name": teacher.name,
            "arch": arch,
            "num_classes": teacher.num_classes,
            "input_size": list(teacher.input_size),
            "mean": list(teacher.mean),
            "std": list(teacher.std),
            "weights": str(TEACHER_WEIGHTS),
            "sha256": sha256_file(tmp),
            "source_weights": remote["url"] if remote else teacher.weights_path,
            "source_sha256": remote["sha256"] if remote else teacher.sha256,
            "data": cfg.data.name,
            "num_samples": res.num_samples,
            "top1": res.top1,
            "top5": res.top5,
            "per_class": res.per_class,
        }
        default_permissions(tmp)
        os.replace(tmp, TEACHER_WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_json(TEACHER_RECORD, record)
    print(f"fetch_teacher: top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}% on {res.num_samples} {cfg.data.name} "
          f"images; sha256 {record['sha256'][:12]}")


if __name__ == "__main__":
    run_stage("fetch_teacher", main)
