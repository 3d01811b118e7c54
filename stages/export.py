"""Stage ``export``: the quantized student as deployable files, in S3, and in the MLflow registry.

Writes ``outputs/export/``:

* ``student.pt``: the fake-quantized student's state dict (weights, activation ranges).
  Rebuild it with ``qimera.quant.build_student(cfg, teacher)`` and ``load_state_dict``;
* ``integer/``: the integer artifact (:mod:`qimera.export`: packed integer weights,
  per-channel scale and zero point, activation ranges, ``quant_map.json``), reloaded with
  ``qimera.export.load_integer``;
* ``student.onnx``: the Q/DQ ONNX model (:mod:`qimera.onnx_export`), input ``images``
  (normalised as ``teacher.json`` says), output ``logits``;
* ``verification.json``: the student, the reloaded integer model and onnxruntime scored on
  the evaluation set in one pass (``export.verify_samples`` images, default all). The stage
  fails when the integer model's logits move by more than 1e-5 or the ONNX top-1 by more
  than 0.1 point.

These four are written by :func:`qimera.export.export_deployables`. The stage adds:

* ``MODEL_CARD.md`` and ``config.yaml`` (the resolved configuration);
* ``model.json``: MLflow run, model URI, registered name and version, whether it is the
  champion, the S3 location, and the sha256 of ``student.pt``.

With ``export.s3_prefix`` set, the files (all but ``model.json``) are uploaded to
``<prefix>/<registered name>/<MLflow run id>/``, verified, manifest last
(:mod:`stages.s3`).

The student is logged with ``mlflow.pytorch.log_model`` (pickle serialization, the
``qimera`` package bundled as code) and registered as ``qimera-<preset>-w<bits>a<bits>``,
with its tags (bits, top-1, teacher, preset, method, ...) given in the registering call, so
no version is ever untagged. Every method (qimera, gdfq, and the calibration-only zeroq and
naive, whose students fine-tune no weights) registers under that one name; the ``method``
tag tells the versions apart. One MLflow run has one version: a rerun after an interrupted
export deletes the version that export left and registers anew. The alias ``champion``
moves to it only when its (finite) top-1 beats the current champion's, whatever the
method: a baseline becomes the champion only by scoring strictly higher. Finally the
pipeline's MLflow run is closed as FINISHED (FAILED on an error, KILLED on an interruption).

All or nothing: the files are built in a temporary directory beside ``outputs/export``
and published with one rename; the upload and the registration come after that, and
``model.json`` last. Any failure removes ``outputs/export``; a temporary directory that a
killed export left behind is removed by the next one. A student with non-finite
parameters or logits is refused before anything is written.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from .common import (
    EXPORT_CONFIG,
    EXPORT_DIR,
    METRICS,
    MODEL_CARD,
    MODEL_RECORD,
    RUN_CONFIG,
    TEACHER_RECORD,
    PipelineError,
    all_or_nothing,
    bits_tag,
    export_params,
    read_json,
    read_yaml,
    run_stage,
    write_json,
)
from . import tracking
from .model_card import render_model_card

CHAMPION = "champion"


def registered_name(cfg) -> str:
    return f"qimera-{cfg.preset}-{bits_tag(cfg)}"


def version_tags(cfg, record: dict, top1: float, verification: dict, s3_uri: str | None) -> dict[str, str]:
    tags = {
        "bits": bits_tag(cfg), "w_bits": str(cfg.quant.w_bits), "a_bits": str(cfg.quant.a_bits),
        "top1": f"{top1:.4f}", "teacher": f"{record['source']}:{record['name']}", "preset": cfg.preset,
        "method": cfg.method, "teacher_top1": f"{record['top1']:.4f}", "onnx_top1": f"{verification['onnx_top1']:.4f}",
    }
    if s3_uri:
        tags["s3_uri"] = s3_uri
    return tags


def _champion_top1(client, name: str):
    """The current champion version and its top-1 (tag, else its run's student_top1), or (None, -inf)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, -math.inf
    value = champ.tags.get("top1")
    if value is None and champ.run_id:
        value = client.get_run(champ.run_id).data.metrics.get("student_top1")
    return champ, float(value) if value is not None else -math.inf


def promote_if_better(client, name: str, version: str, top1: float) -> tuple[bool, str | None]:
    """Point ``champion`` at ``version`` when ``top1`` beats the champion's (strictly).
    Returns (moved, the champion version afterwards)."""
    champ, best = _champion_top1(client, name)
    if not math.isfinite(top1):  # never promote a model without a finite accuracy
        return False, None if champ is None else str(champ.version)
    if champ is None or top1 > best:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, str(version)
    return False, str(champ.version)


def _upload(prefix: str, name: str, run_id: str, cfg) -> str:
    from .s3 import join, upload_dir

    s3_uri = join(prefix, name, run_id)
    manifest = upload_dir(EXPORT_DIR, s3_uri, metadata={
        "registered_model": name, "mlflow_run_id": run_id, "bits": bits_tag(cfg)})
    print(f"export: uploaded {len(manifest['files'])} files to {s3_uri}/ (verified, MANIFEST.json last)")
    return s3_uri


def _log_exports(run_id: str, verification: dict, s3_uri: str | None) -> None:
    """The published exports as artifacts and metrics of the pipeline's run."""
    import mlflow

    from qimera.export import INTEGER_DIR, ONNX_FILE, ONNX_INT8_FILE, VERIFICATION_FILE

    with mlflow.start_run(run_id=run_id):
        for f in (EXPORT_CONFIG, MODEL_CARD, VERIFICATION_FILE, ONNX_FILE, ONNX_INT8_FILE):
            if (EXPORT_DIR / f).is_file():  # the int8 form is skipped for an untraceable student
                mlflow.log_artifact(str(EXPORT_DIR / f), "export")
        mlflow.log_artifacts(str(EXPORT_DIR / INTEGER_DIR), f"export/{INTEGER_DIR}")
        mlflow.log_metrics({k: verification[k] for k in ("onnx_top1", "onnx_int8_top1", "onnx_int8_prediction_agreement",
                                                          "integer_max_abs_logit_delta") if k in verification})
        for form, figures in verification.get("deployment", {}).get("forms", {}).items():
            mlflow.log_metrics({f"deploy_{form}_{key}": value for key, value in _deploy_metrics(figures).items()})
        if s3_uri:
            mlflow.set_tag("s3_uri", s3_uri)


def _deploy_metrics(figures: dict) -> dict[str, float]:
    """One form's deployment figures as MLflow metrics: ``file_bytes`` and
    ``latency_ms_b<batch>``."""
    out = {"file_bytes": float(figures["file_bytes"])}
    out.update({f"latency_ms_b{batch}": float(ms) for batch, ms in figures["latency_ms"].items()})
    return out


def register(client, student, name: str, run_id: str, tags: dict[str, str]):
    """Register ``student`` as a new version of ``name``, tagged in the same call, as the one
    version of this MLflow run: versions an earlier, interrupted export of the same run
    left behind are deleted first, so a rerun leaves neither a duplicate nor an untagged
    orphan. The logged model carries both ONNX forms of ``outputs/export`` (the Q/DQ
    reference and the deployable int8 form) under ``extra_files/``, so that the registered
    version holds what is deployed. Returns ``(model version, logged model URI)``."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    import qimera
    from qimera.export import ONNX_FILE, ONNX_INT8_FILE

    try:
        earlier = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:  # the registered model does not exist yet
        earlier = []
    for old in earlier:
        client.delete_model_version(name, old.version)
        print(f"export: removed version {old.version} of {name}, left by an earlier export of this run")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            student, name="student", serialization_format="pickle", code_paths=[str(Path(qimera.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic>=2.5,<3", "pyyaml>=6"],
            extra_files=[str(EXPORT_DIR / f) for f in (ONNX_FILE, ONNX_INT8_FILE) if (EXPORT_DIR / f).is_file()],
        )
    return mlflow.register_model(info.model_uri, name, tags=tags), info.model_uri


def _build(student, run, name: str, record: dict, metrics: dict, options: dict) -> dict:
    """Everything but model.json, into outputs/export in one rename; returns the verification."""
    from qimera._files import atomic_dir, remove_stale_temps
    from qimera.export import export_deployables

    cfg = run.cfg
    for stale in remove_stale_temps(EXPORT_DIR):
        print(f"export: removed {stale}, left by a killed export")
    with atomic_dir(EXPORT_DIR) as tmp:
        verification = export_deployables(
            student, tmp, run.prep.eval_data.loader, arch=record["arch"],
            arch_kwargs={"num_classes": record["num_classes"]}, input_size=record["input_size"],
            opset=options["onnx_opset"], verify_samples=options["verify_samples"],
            latency_runs=options["latency_runs"], reference=run.prep.teacher.model, int8=options["int8_form"], metadata={
                "qimera.registered_model": name, "qimera.bits": bits_tag(cfg), "qimera.method": cfg.method,
                "qimera.teacher": f"{record['source']}:{record['name']}", "qimera.input_size": record["input_size"],
                "qimera.mean": record["mean"], "qimera.std": record["std"], "qimera.mlflow_run_id": run.run_id})
        shutil.copyfile(RUN_CONFIG, tmp / EXPORT_CONFIG)
        (tmp / MODEL_CARD).write_text(render_model_card(
            name=name, config=read_yaml(RUN_CONFIG), teacher=record, metrics=metrics, version=None,
            verification=verification))
    return verification


def main() -> None:
    import mlflow

    from qimera._files import sha256_file
    from qimera.export import STUDENT_FILE

    run = tracking.TrainedRun(with_data=True)
    cfg, client, run_id = run.cfg, run.client, run.run_id
    tracking.claim(client, run_id)
    options = export_params(run.params)
    student = run.student()
    name = registered_name(cfg)
    record = read_json(TEACHER_RECORD)
    metrics = read_json(METRICS)
    top1 = float(metrics["student"]["top1"])
    if not math.isfinite(top1):
        raise PipelineError(f"export: metrics.json has student top-1 {top1}: a model without a finite accuracy "
                            "is not exported or registered")
    mlflow.set_tracking_uri(run.uri)
    mlflow.set_registry_uri(run.uri)
    try:
        with all_or_nothing(EXPORT_DIR):
            # built in a temporary directory and published with one rename; only then do the
            # upload and the registration run, and model.json records them last
            verification = _build(student, run, name, record, metrics, options)
            s3_uri = _upload(options["s3_prefix"], name, run_id, cfg) if options["s3_prefix"] else None
            _log_exports(run_id, verification, s3_uri)
            mv, model_uri = register(client, student, name, run_id,
                                     version_tags(cfg, record, top1, verification, s3_uri))
            version = str(mv.version)
            moved, champion = promote_if_better(client, name, version, top1)
            write_json(EXPORT_DIR / MODEL_RECORD, {
                "mlflow_run_id": run_id, "model_uri": model_uri, "registered_model": name,
                "registered_version": version, "champion": moved, "champion_version": champion,
                "s3_uri": s3_uri, "student_sha256": sha256_file(EXPORT_DIR / STUDENT_FILE),
            })
    except BaseException as exc:
        tracking.fail(client, run_id, exc)
        raise
    tracking.terminate(client, run_id, "FINISHED")
    print(f"export: integer max |Δlogits| {verification['integer_max_abs_logit_delta']:.2g}, onnxruntime top-1 "
          f"{verification['onnx_top1']:.2f}% vs student {verification['student_top1']:.2f}% "
          f"({verification['samples']} images)")
    int8 = verification.get("onnx_int8", {})
    if "rejected" in int8:
        print(f"export: WARNING: student.int8.onnx not shipped: {int8['rejected']}")
    elif "onnx_int8_top1" in verification:
        print(f"export: int8 form top-1 {verification['onnx_int8_top1']:.2f}%, same prediction on "
              f"{100 * verification['onnx_int8_prediction_agreement']:.2f}%")
    print(f"export: MLflow model {name} version {version}"
          + (f", now {CHAMPION}" if moved else f"; {CHAMPION} stays version {champion} (top-1 not better)"))


if __name__ == "__main__":
    run_stage("export", main)
