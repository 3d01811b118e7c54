"""Stage ``export``: the quantized student as deployable files, in S3, and in the MLflow registry.

Writes ``outputs/export/``:

* ``student.pt``: the fake-quantized student's state dict (weights, activation ranges).
  Rebuild it with ``qimera.quant.build_student(cfg, teacher)`` and ``load_state_dict``;
* ``integer/``: the integer artifact (:mod:`qimera.export.integer`: packed integer weights,
  per-channel scale and zero point, activation ranges, ``quant_map.json``), reloaded with
  ``qimera.export.load_integer``;
* ``student.onnx``: the Q/DQ ONNX model (:mod:`qimera.export.onnx_qdq`), input ``images``
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
tag tells the versions apart.

The numbers are the stage's own: the top-1 in the tags, ``model.json`` and the model card
is the student's as this stage measures it on the whole evaluation set, first.
``metrics.json`` must agree with it (within one image or 0.1 point): otherwise it is not
the evaluation of this checkpoint, and the stage stops before anything is built.

A champion is replaced, never removed first. In order: the files are built in a
temporary directory beside ``outputs/export``; uploaded (with ``export.s3_prefix``); the
new version is registered, tagged, and verified (READY, its tags as given, the ONNX files
it carries identical to the built ones); the alias ``champion`` moves to it when its top-1
beats the current champion's (strictly, whatever the method: a baseline becomes the
champion only by scoring higher) or when the champion is a version of this same MLflow
run; ``model.json`` is written and the directory replaces ``outputs/export`` in one step
(:func:`qimera._files.publish_dir`); only then are the versions that an earlier,
interrupted export of this MLflow run left retired (deleted), so that one MLflow run ends
with one version, and the pipeline's MLflow run is closed as FINISHED (FAILED on an
error, KILLED on an interruption). A kill at any moment leaves ``@champion`` resolving to
a complete, verified version and the previous ``outputs/export`` in place until the new
one is complete. A student with non-finite parameters is refused before anything is
written; an ``outputs/export`` holding files qimera did not write is refused and kept.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from contextlib import contextmanager
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
    bits_tag,
    export_params,
    read_json,
    read_yaml,
    require,
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


def promote_if_better(client, name: str, version: str, top1: float, run_id: str | None = None) -> tuple[bool, str | None]:
    """Point ``champion`` at ``version`` when ``top1`` beats the champion's (strictly), or
    when the champion is a version of the same MLflow run ``run_id`` (left by an earlier,
    interrupted export of this run: the new version supersedes it). The alias moves in one
    call and nothing is removed. Returns (moved, the champion version afterwards)."""
    champ, best = _champion_top1(client, name)
    if not math.isfinite(top1):  # never promote a model without a finite accuracy
        return False, None if champ is None else str(champ.version)
    if champ is None or top1 > best or (run_id is not None and champ.run_id == run_id):
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, str(version)
    return False, str(champ.version)


def retire_earlier(client, name: str, run_id: str, keep: str) -> list[str]:
    """Delete the versions of ``name`` that an earlier, interrupted export of the MLflow run
    ``run_id`` registered: all but ``keep``, and never the one ``champion`` points at.
    Returns the versions deleted. Called last, once ``keep`` is registered, verified and
    published."""
    from mlflow.exceptions import MlflowException

    try:
        champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        champion = None
    retired = []
    for old in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if str(old.version) in (str(keep), champion):
            continue
        client.delete_model_version(name, old.version)
        retired.append(str(old.version))
    return retired


def _upload(export_dir: Path, prefix: str, name: str, run_id: str, cfg) -> str:
    from .s3 import join, upload_dir

    s3_uri = join(prefix, name, run_id)
    manifest = upload_dir(export_dir, s3_uri, metadata={
        "registered_model": name, "mlflow_run_id": run_id, "bits": bits_tag(cfg)})
    print(f"export: uploaded {len(manifest['files'])} files to {s3_uri}/ (verified, MANIFEST.json last)")
    return s3_uri


def _log_exports(export_dir: Path, run_id: str, verification: dict, s3_uri: str | None) -> None:
    """The built exports (in ``export_dir``) as artifacts and metrics of the pipeline's run."""
    import mlflow

    from qimera.export import INTEGER_DIR, ONNX_FILE, ONNX_INT8_FILE, VERIFICATION_FILE

    with mlflow.start_run(run_id=run_id):
        for f in (EXPORT_CONFIG, MODEL_CARD, VERIFICATION_FILE, ONNX_FILE, ONNX_INT8_FILE):
            if (export_dir / f).is_file():  # the int8 form is skipped for an untraceable student
                mlflow.log_artifact(str(export_dir / f), "export")
        mlflow.log_artifacts(str(export_dir / INTEGER_DIR), f"export/{INTEGER_DIR}")
        mlflow.log_metrics({k: verification[k] for k in ("onnx_top1", "onnx_int8_top1", "onnx_int8_prediction_agreement",
                                                          "student_integer_exact_top1",
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


def register(client, student, name: str, run_id: str, tags: dict[str, str], export_dir: Path):
    """Register ``student`` as a new version of ``name``, tagged in the same call (no version
    is ever untagged), and verify it (:func:`verify_version`). The logged model carries both
    ONNX forms of ``export_dir`` (the Q/DQ reference and the deployable int8 form) under
    ``extra_files/``, so that the registered version holds what is deployed. Nothing is
    removed here: the versions an earlier, interrupted export of this run left are retired
    by :func:`retire_earlier` once the new one is published. Returns ``(model version,
    logged model URI)``."""
    import mlflow
    import mlflow.pytorch
    import torch

    import qimera
    from qimera.export import ONNX_FILE, ONNX_INT8_FILE

    carried = [export_dir / f for f in (ONNX_FILE, ONNX_INT8_FILE) if (export_dir / f).is_file()]
    with mlflow.start_run(run_id=run_id), _without_pickle_warning():
        info = mlflow.pytorch.log_model(
            student, name="student", serialization_format="pickle", code_paths=[str(Path(qimera.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic>=2.5,<3", "pyyaml>=6"],
            extra_files=[str(f) for f in carried],
        )
    with _registry_progress_held_back():
        mv = mlflow.register_model(info.model_uri, name, tags=tags)
    verify_version(client, name, str(mv.version), tags, carried)
    return mv, info.model_uri


#: what the export stage says once instead of mlflow.pytorch's warning on pickled models
PICKLE_NOTE = ("the registered model is a pickled torch module (mlflow.pytorch, serialization_format='pickle'): "
               "loading it runs code, so load it only from a registry you trust; the ONNX and integer files are data")


@contextmanager
def _without_pickle_warning():
    """mlflow.pytorch's warning that pickled models can execute code, held back while the
    student is logged: the stage prints :data:`PICKLE_NOTE`, which says what it means here.
    Its other messages pass."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()

    logger = logging.getLogger("mlflow.pytorch")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


#: what MLflow's registry prints while registering (main prints the version in one line)
REGISTRY_PROGRESS = re.compile(r"^(Registered model '.*' already exists\. Creating a new version|Successfully registered "
                               r"model '|Created version '\d+' of model '|\d{4}/\d\d/\d\d \S+ INFO "
                               r"mlflow\.store\.model_registry\.abstract_store: Waiting up to)")


@contextmanager
def _registry_progress_held_back():
    """Drop the progress lines MLflow's registry prints on stderr (:data:`REGISTRY_PROGRESS`)
    during the call; every other line it printed is written out afterwards, all of them
    when the call fails."""
    import contextlib
    import io
    import sys

    buffer = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True)
                if failed or not REGISTRY_PROGRESS.match(line)]
        sys.stderr.write("".join(kept))


def verify_version(client, name: str, version: str, tags: dict[str, str], carried: list[Path]) -> None:
    """Check a registered version before the champion alias may point at it: READY, tagged
    as asked, its model complete (an ``MLmodel`` file) and its ``extra_files/`` identical,
    byte for byte (sha256), to the ONNX files ``carried``. A :class:`PipelineError`
    otherwise (the version stays registered, without the alias; a rerun retires it)."""
    import mlflow.artifacts

    from qimera._files import sha256_file

    mv = client.get_model_version(name, version)
    where = f"registered model {name} version {version}"
    if str(mv.status) != "READY":
        raise PipelineError(f"{where} is {mv.status}, not READY; champion not moved. Rerun the export stage")
    wrong = sorted(k for k, v in tags.items() if mv.tags.get(k) != v)
    if wrong:
        raise PipelineError(f"{where} lacks the tags it was registered with ({', '.join(wrong[:3])}); champion not "
                            "moved. Rerun the export stage")
    with tempfile.TemporaryDirectory(prefix="qimera-verify-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        if not (local / "MLmodel").is_file():
            raise PipelineError(f"{where} has no MLmodel file; champion not moved. Rerun the export stage")
        for f in carried:
            got = local / "extra_files" / f.name
            if not got.is_file() or sha256_file(got) != sha256_file(f):
                raise PipelineError(f"{where}: its extra_files/{f.name} is missing or differs from the exported "
                                    "file; champion not moved. Rerun the export stage")


def measured_top1(run) -> float:
    """The student's top-1 on the whole evaluation set as this stage measures it (on the
    run's device, as the evaluate stage does), before anything is built."""
    from qimera.evaluate import evaluate

    prep = run.prep
    return float(evaluate(run.student().to(prep.device), prep.eval_data.loader, device=prep.device,
                          num_classes=prep.teacher.num_classes).top1)


def check_metrics(metrics: dict, top1: float, samples: int) -> None:
    """``metrics.json`` must be the evaluation of this checkpoint: its student top-1 within
    one image (or 0.1 point) of what this stage measured on the same ``samples`` images; a
    :class:`PipelineError` otherwise."""
    claimed = (metrics.get("student") or {}).get("top1") if isinstance(metrics, dict) else None
    if not isinstance(claimed, (int, float)) or isinstance(claimed, bool) or not math.isfinite(claimed):
        raise PipelineError(f"{METRICS} has no finite student top-1 ({claimed!r}); rerun evaluate "
                            "(dvc repro evaluate)")
    if abs(float(claimed) - top1) > max(0.1, 100.0 / max(1, samples)):
        raise PipelineError(f"{METRICS} says the student's top-1 is {float(claimed):.4f}%, this stage measured "
                            f"{top1:.4f}% on the same {samples} images: it is not the evaluation of this checkpoint; "
                            "rerun evaluate (dvc repro evaluate); nothing was exported")


def _build(student, run, name: str, record: dict, out: Path, options: dict) -> dict:
    """The library's exports and the resolved config into the (empty) directory ``out``;
    returns the verification."""
    from qimera.export import export_deployables

    cfg = run.cfg
    verification = export_deployables(
        student, out, run.prep.eval_data.loader, arch=record["arch"],
        arch_kwargs={"num_classes": record["num_classes"]}, input_size=record["input_size"],
        opset=options["onnx_opset"], verify_samples=options["verify_samples"],
        latency_runs=options["latency_runs"], reference=run.prep.teacher.model, int8=options["int8_form"], metadata={
            "qimera.registered_model": name, "qimera.bits": bits_tag(cfg), "qimera.method": cfg.method,
            "qimera.teacher": f"{record['source']}:{record['name']}", "qimera.input_size": record["input_size"],
            "qimera.mean": record["mean"], "qimera.std": record["std"], "qimera.mlflow_run_id": run.run_id})
    shutil.copyfile(RUN_CONFIG, out / EXPORT_CONFIG)
    return verification


def main() -> None:
    import mlflow

    from qimera._files import check_replaceable, publish_dir, remove_stale_temps, sha256_file, staging_dir
    from qimera.export import STUDENT_FILE

    check_replaceable(EXPORT_DIR)  # a directory of someone else's is refused before any work, and kept
    require(METRICS, "evaluate")
    run = tracking.TrainedRun(with_data=True)
    cfg, client, run_id = run.cfg, run.client, run.run_id
    tracking.claim(client, run_id)
    options = export_params(run.params)
    name = registered_name(cfg)
    mlflow.set_tracking_uri(run.uri)
    mlflow.set_registry_uri(run.uri)
    try:
        student = run.student()
        record = read_json(TEACHER_RECORD)
        metrics = read_json(METRICS)
        for stale in remove_stale_temps(EXPORT_DIR):
            print(f"export: removed {stale}, left by a killed export")
        top1 = measured_top1(run)
        check_metrics(metrics, top1, run.prep.eval_data.num_samples)
        with staging_dir(EXPORT_DIR) as out:
            verification = _build(student, run, name, record, out, options)
            card_metrics = {**metrics, "student": {**metrics["student"], "top1": round(top1, 4)}}
            (out / MODEL_CARD).write_text(render_model_card(
                name=name, config=read_yaml(RUN_CONFIG), teacher=record, metrics=card_metrics, version=None,
                verification=verification))
            # in this order: upload; register and verify; move the alias; publish; retire
            s3_uri = _upload(out, options["s3_prefix"], name, run_id, cfg) if options["s3_prefix"] else None
            _log_exports(out, run_id, verification, s3_uri)
            mv, model_uri = register(client, student, name, run_id,
                                     version_tags(cfg, record, top1, verification, s3_uri), out)
            version = str(mv.version)
            moved, champion = promote_if_better(client, name, version, top1, run_id)
            write_json(out / MODEL_RECORD, {
                "mlflow_run_id": run_id, "model_uri": model_uri, "registered_model": name,
                "registered_version": version, "champion": moved, "champion_version": champion,
                "s3_uri": s3_uri, "student_sha256": sha256_file(out / STUDENT_FILE), "student_top1": round(top1, 4),
            })
            publish_dir(out, EXPORT_DIR)
        for old in retire_earlier(client, name, run_id, version):
            print(f"export: retired version {old} of {name}, left by an earlier export of this run")
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
        exact = "student_integer_exact_top1" in verification
        print(f"export: int8 form top-1 {verification['onnx_int8_top1']:.2f}%, same prediction"
              + (f" as the integer-exact student ({verification['student_integer_exact_top1']:.2f}%)" if exact else "")
              + f" on {100 * verification['onnx_int8_prediction_agreement']:.2f}%")
    print(f"export: MLflow model {name} version {version}"
          + (f", now {CHAMPION}" if moved else f"; {CHAMPION} stays version {champion} (top-1 not better)"))
    print(f"export: {PICKLE_NOTE}")


if __name__ == "__main__":
    run_stage("export", main)
