"""Stage ``export``: the quantized student, as files and as an MLflow registered model.

Writes ``outputs/export/``:

* ``student.pt``: the fake-quantized student's state dict (weights, activation ranges).
  Rebuild it with ``qimera.trainer.build_student(cfg, teacher)`` and ``load_state_dict``;
* ``config.yaml``: the resolved configuration it was trained with;
* ``model.json``: the MLflow run, model URI, registered model name and version, and the
  sha256 of ``student.pt``.

Logs the student with ``mlflow.pytorch.log_model`` (pickle serialization, the ``qimera``
package bundled as code) registered as ``qimera-<preset>-w<bits>a<bits>``, and closes the
pipeline's MLflow run as FINISHED. Integer and ONNX export are a later issue.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import (
    EXPORT_DIR,
    METRICS,
    RUN_CONFIG,
    TEACHER_RECORD,
    all_or_nothing,
    bits_tag,
    read_json,
    read_yaml,
    run_stage,
    torch_save,
    write_json,
)
from . import tracking
from .model_card import render_model_card


def registered_name(cfg) -> str:
    return f"qimera-{cfg.preset}-{bits_tag(cfg)}"


def main() -> None:
    import mlflow
    import mlflow.pytorch
    import torch

    import qimera
    from qimera.export import export_integer
    from qimera.teachers import sha256_file

    run = tracking.TrainedRun(with_data=False)
    cfg, client, run_id, uri = run.cfg, run.client, run.run_id, run.uri
    student = run.student()
    name = registered_name(cfg)

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with all_or_nothing(EXPORT_DIR):
            torch_save(EXPORT_DIR / "student.pt", {k: v.detach().cpu() for k, v in student.state_dict().items()})
            shutil.copyfile(RUN_CONFIG, EXPORT_DIR / "config.yaml")
            record = read_json(TEACHER_RECORD)
            card = render_model_card(name=name, config=read_yaml(RUN_CONFIG), teacher=record,
                                     metrics=read_json(METRICS), version=None)
            (EXPORT_DIR / "MODEL_CARD.md").write_text(card)
            export_integer(student, EXPORT_DIR / "integer", arch=record["arch"],
                           arch_kwargs={"num_classes": record["num_classes"]},
                           w_bits=cfg.quant.w_bits, a_bits=cfg.quant.a_bits,
                           first_last_bits=8 if cfg.quant.first_last_8bit else None,
                           exclude=cfg.quant.exclude)
            with mlflow.start_run(run_id=run_id):
                mlflow.log_artifact(str(EXPORT_DIR / "config.yaml"), "export")
                mlflow.log_artifact(str(EXPORT_DIR / "MODEL_CARD.md"), "export")
                info = mlflow.pytorch.log_model(
                    student, name="student", serialization_format="pickle", registered_model_name=name,
                    code_paths=[str(Path(qimera.__file__).parent)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic>=2.5,<3", "pyyaml>=6"],
                )
            write_json(EXPORT_DIR / "model.json", {
                "mlflow_run_id": run_id, "model_uri": info.model_uri, "registered_model": name,
                "registered_version": info.registered_model_version,
                "student_sha256": sha256_file(EXPORT_DIR / "student.pt"),
            })
    except BaseException:
        tracking.terminate(client, run_id, "FAILED")
        raise
    print(f"export: outputs/export/student.pt; MLflow model {name} version {info.registered_model_version}")


if __name__ == "__main__":
    run_stage("export", main)
