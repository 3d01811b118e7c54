"""Stage ``train``: the generator and the quantized student, logged to MLflow per epoch.

For a calibration-only method (``zeroq``, ``naive``: :data:`qimera.baselines.CALIBRATION_METHODS`)
there is no generator and no epoch: the stage calibrates the student's activation ranges
(:func:`qimera.baselines.calibrated_student`, as ``qimera run`` does) and writes the same
checkpoint file, with ``epoch`` 0, no generator and an empty history (ZeroQ's distilled
images ride along for the evaluate stage's figure). These are short, so a rerun always
starts clean: an old checkpoint is discarded and a new MLflow run is opened.

Validates everything first (config, the workspace teacher, the evaluation data, the
generator's K against the teacher's classes, the MLflow store); only then does it open
the MLflow run and train. ``outputs/train`` is a persistent DVC output: the trainer
writes its checkpoint and ``history.jsonl`` there after every epoch, and a rerun after a
kill **resumes** from the last finished epoch, reopening the same MLflow run (a run that
a killed process left RUNNING is marked KILLED first, :func:`stages.tracking.reap_dead_runs`).
The run is RUNNING while this stage trains and SCHEDULED (for ``evaluate``) when it is
done; KILLED when the stage is interrupted (Ctrl-C, SIGTERM, SIGHUP), FAILED on an
error. Whether a checkpoint may be continued is the trainer's decision (:meth:`qimera.trainer.Trainer.
resume_status`): its fingerprint covers the configuration plus what this stage adds (the
workspace teacher's and the embedding table's sha256, the library's source). A checkpoint
of anything else (or of more epochs than asked) is discarded, with a line that says why,
and training starts over.

Outputs: ``outputs/train/`` (checkpoint, history.jsonl, train.json, mlflow_run.json) and
``outputs/history.csv`` (one row per epoch, for ``dvc plots``; only the header for a
calibration-only method).

Settings: ``QIMERA_EPOCH_HOOK=package.module:callable`` in the environment adds a callback
that is called with each epoch's record (a dict: epoch, losses, top-1, ...) after that
epoch's checkpoint is written and logged, e.g. to notify someone or to upload the
checkpoint (:func:`pipelines.remote.push_checkpoint`). The tests use it to kill the stage
at a deterministic point. ``QIMERA_RESTORE_HOOK=package.module:callable`` is called with
``outputs/train`` before the trainer looks for a checkpoint (:data:`RESTORE_HOOK_ENV`).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

from .common import (
    EMBEDDINGS,
    HISTORY_COLUMNS,
    HISTORY_CSV,
    MLFLOW_RUN,
    RUN_CONFIG,
    TEACHER_RECORD,
    TRAIN_DIR,
    TRAIN_RECORD,
    PipelineError,
    checkpoint_fingerprint,
    library_hash,  # noqa: F401 - re-exported: stages.common owns it
    load_params,
    load_run_config,
    preset_file,
    read_json,
    repo_root,
    root_relative,
    run_stage,
    torch_save,
    training_inputs,
    workspace_teacher_config,
    write_json,
    write_text,
)
from . import tracking



def history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for record in history:
        row = []
        for key in HISTORY_COLUMNS:
            value = record.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            row.append(("%d" % value if key == "epoch" else "%.6g" % value) if ok else "")
        writer.writerow(row)
    return buf.getvalue()


def epoch_hook():
    """The callback that ``QIMERA_EPOCH_HOOK`` names, or None (:func:`qimera.api.epoch_hook_from_env`)."""
    from qimera.api import epoch_hook_from_env

    return epoch_hook_from_env(PipelineError)


#: ``package.module:callable``, called with ``outputs/train`` before the trainer looks for a
#: checkpoint there: it may put one there (a worker taking up another's cell from S3,
#: :func:`pipelines.remote.restore_checkpoint`). ``dvc exp run`` checks the baseline's
#: outputs out before the stages run, so a checkpoint put there before DVC starts is gone.
RESTORE_HOOK_ENV = "QIMERA_RESTORE_HOOK"


def restore_hook():
    """The callable ``QIMERA_RESTORE_HOOK`` names, or None (:func:`qimera.api.hook_from_env`)."""
    from qimera.api import hook_from_env

    return hook_from_env(RESTORE_HOOK_ENV, PipelineError)


def _prepare(cfg):
    """The workspace teacher and the evaluation data, checked (a failed check leaves no
    empty ``outputs/train``: :func:`qimera.prepare` removes the directory it made)."""
    from qimera.api import prepare

    return prepare(workspace_teacher_config(cfg))


def _trainer(cfg, prep, root):
    """The trainer, with what its checkpoint must have been trained from: the preset's
    config (whose teacher section is the fingerprint's), the workspace teacher's and the
    embedding table's hashes, the library's source (:func:`stages.common.training_inputs`:
    evaluate and export check the same fingerprint)."""
    import torch

    from qimera.trainer import Trainer

    table = torch.load(EMBEDDINGS, map_location="cpu", weights_only=True)["embeddings"]
    return Trainer(root_relative(cfg, root), prep.teacher, prep.eval_data, initial_embeddings=table,
                   extra_fingerprint=training_inputs())


def _resume_or_start_over(trainer):
    """The trainer's answer on resuming; when it says no, everything of the old run goes."""
    status = trainer.resume_status()
    if not status.resumable:
        if status.found:
            print(f"train: starting over ({status.reason})")
        _discard_outputs()
    return status


def _discard_outputs() -> None:
    """Everything an earlier run of this stage left: the checkpoint and history, train.json
    and the record of its MLflow run (which is then not reopened)."""
    from qimera.trainer import discard_checkpoint

    discard_checkpoint(TRAIN_DIR)
    TRAIN_RECORD.unlink(missing_ok=True)
    MLFLOW_RUN.unlink(missing_ok=True)
    clear_stash()


#: hard links to the last finished epoch's checkpoint files, outside DVC's outputs (in
#: DVC's own temporary directory, which git ignores). ``dvc exp run`` checks the baseline
#: commit's outputs out before it runs the stages, and that removes the checkpoint a
#: stopped run left in ``outputs/train``; the rerun takes it back from here.
RESUME_STASH = Path(".dvc") / "tmp" / "qimera-train"


def resume_files() -> tuple[str, ...]:
    """What a resumed run needs from ``outputs/train``: the checkpoint first, its history,
    the MLflow run it reopens."""
    from qimera.trainer import CHECKPOINT_NAME, HISTORY_NAME

    return CHECKPOINT_NAME, HISTORY_NAME, MLFLOW_RUN.name


def _link(src: Path, dest: Path) -> None:
    """``dest`` becomes ``src``'s content, atomically (a hard link, else a copy)."""
    import os
    import shutil

    tmp = dest.with_name(dest.name + ".linking")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def stash(record: dict | None = None) -> None:
    """The epoch callback: link this epoch's checkpoint files into :data:`RESUME_STASH`
    (the trainer writes each one as a new file, so a link keeps this epoch's content)."""
    RESUME_STASH.mkdir(parents=True, exist_ok=True)
    for name in resume_files():
        if (TRAIN_DIR / name).is_file():
            _link(TRAIN_DIR / name, RESUME_STASH / name)


def take_up_stash() -> bool:
    """Put the stashed checkpoint files back into ``outputs/train`` when it has no
    checkpoint (DVC removed it); returns whether it did. The trainer then decides, by the
    checkpoint's fingerprint, whether to resume."""
    checkpoint, *_ = names = resume_files()
    if (TRAIN_DIR / checkpoint).exists() or not (RESUME_STASH / checkpoint).is_file():
        return False
    TRAIN_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (RESUME_STASH / name).is_file():
            _link(RESUME_STASH / name, TRAIN_DIR / name)
    print("train: took back the checkpoint of the stopped run (DVC had checked outputs/train out)")
    return True


def clear_stash() -> None:
    import shutil

    shutil.rmtree(RESUME_STASH, ignore_errors=True)


def _open_run(client, uri: str, params: dict, cfg, prep, status, root) -> str:
    """The MLflow run of this pipeline execution (reopened on resume), tagged and with the
    config logged."""
    record = read_json(TEACHER_RECORD)
    tags = tracking.run_tags(cfg, prep.device, {"teacher.sha256": record["sha256"],
                                                "teacher.top1": f"{record['top1']:.4f}",
                                                **tracking.nesting_tags(params)})
    exp_name = tracking.experiment_name(params, cfg)
    run_id = tracking.open_run(client, uri, exp_name, cfg, resume=status.resumable, tags=tags,
                               name=tracking.run_name(cfg, params))
    try:
        tracking.log_tags(client, run_id, tags)
        flat = tracking.flatten(cfg.resolved())
        flat["preset_file"] = preset_file(root, cfg.preset, cfg.quant.w_bits, cfg.quant.a_bits).name
        tracking.log_params(client, run_id, flat)
        client.log_artifact(run_id, str(RUN_CONFIG), "config")
        if status.resumable:
            tracking.log_missing_epochs(client, run_id, status.history)
    except BaseException as exc:
        tracking.fail(client, run_id, exc)
        raise
    # a tracking server's page can be opened as it is (a database file's: stages.summary says how)
    page = ("" if tracking.ui_command(uri)
            else f" ({tracking.run_url(uri, client.get_run(run_id).info.experiment_id, run_id)})")
    print(f"train: MLflow run {run_id} in experiment {exp_name!r} at {tracking.redact(uri)}{page}")
    return run_id


#: how many of ZeroQ's distilled images the checkpoint keeps for the samples figure
KEPT_IMAGES = 16


def _calibrate(client, uri: str, params: dict, cfg, prep, root) -> None:
    """A calibration-only method: the calibrated student as a checkpoint of epoch 0 that
    the later stages read like a trained one; the MLflow run opened, logged and handed over."""
    import torch

    from qimera.baselines import calibrated_student
    from qimera.trainer import HISTORY_NAME, ResumeStatus, checkpoint_file

    inputs = training_inputs()  # checked before anything is discarded or opened
    _discard_outputs()  # a calibration-only method never resumes
    status = ResumeStatus("none", f"{cfg.method} calibrates only: nothing to resume")
    run_id = _open_run(client, uri, params, cfg, prep, status, root)
    try:
        start = time.perf_counter()
        torch.manual_seed(cfg.train.seed)  # as `qimera run` does before anything else
        prep.teacher.model.to(prep.device)
        calibrated = calibrated_student(root_relative(cfg, root), prep.teacher, prep.device)
        images = None if calibrated.images is None else calibrated.images[:KEPT_IMAGES].cpu()
        root_cfg = root_relative(cfg, root)
        state = {"format": 1, "method": cfg.method, "epoch": 0, "student": calibrated.student.state_dict(),
                 "generator": None, "history": [], "config": root_cfg.resolved(), "calibration_images": images,
                 "fingerprint": checkpoint_fingerprint(root_cfg, prep.teacher, inputs)}
        torch_save(checkpoint_file(TRAIN_DIR), state)
        write_text(TRAIN_DIR / HISTORY_NAME, "")
        write_text(HISTORY_CSV, history_csv([]))
        seconds = time.perf_counter() - start
        write_json(TRAIN_RECORD, {
            "method": cfg.method, "epochs": 0, "iterations": calibrated.iterations, "resumed_from_epoch": 0,
            "seconds_this_run": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        tracking.log_tags(client, run_id, {"resumed_from_epoch": "0"})
        client.log_artifact(run_id, str(HISTORY_CSV), "training")
        tracking.hand_over(client, run_id)  # SCHEDULED: evaluate takes it next
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM, SIGHUP): KILLED; an error: FAILED
        tracking.fail(client, run_id, exc)
        raise
    on = "Gaussian noise" if cfg.method == "naive" else f"images distilled in {calibrated.iterations} steps"
    print(f"train: {cfg.method}: activation ranges calibrated on {on} in {seconds:.1f} s; "
          "no weights were fine-tuned")


def main() -> None:
    from qimera.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    root, params, cfg = repo_root(), load_params(), load_run_config()
    uri = tracking.tracking_uri(params, root)
    client = tracking.connect(uri)
    tracking.reap_dead_runs(client)
    hook, restore = epoch_hook(), restore_hook()
    prep = _prepare(cfg)
    from qimera._lock import hold_out_dir

    with hold_out_dir(TRAIN_DIR):  # one writer: another train stage there is refused, naming it
        _train(client, uri, params, cfg, prep, root, hook, restore)


def _train(client, uri: str, params: dict, cfg, prep, root, hook, restore) -> None:
    from qimera.baselines import CALIBRATION_METHODS

    if cfg.method in CALIBRATION_METHODS:
        _calibrate(client, uri, params, cfg, prep, root)
        return
    if not take_up_stash() and restore is not None:  # this machine's own checkpoint first, then S3's
        restore(TRAIN_DIR)
    trainer = _trainer(cfg, prep, root)
    status = _resume_or_start_over(trainer)
    run_id = _open_run(client, uri, params, cfg, prep, status, root)
    trainer.callbacks.append(stash)
    trainer.callbacks.append(lambda rec: tracking.log_epoch(client, run_id, rec))
    if hook is not None:
        trainer.callbacks.append(hook)
    if status.resumable:
        print(f"train: resuming after epoch {status.epoch}/{cfg.train.epochs}")
    try:
        result = trainer.fit()
        write_text(HISTORY_CSV, history_csv(result.history))
        write_json(TRAIN_RECORD, {
            "method": cfg.method, "epochs": cfg.train.epochs,
            "iterations": cfg.train.epochs * cfg.train.iters_per_epoch,
            "resumed_from_epoch": result.resumed_from_epoch, "seconds_this_run": round(result.seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        tracking.log_tags(client, run_id, {"resumed_from_epoch": str(result.resumed_from_epoch)})
        client.log_artifact(run_id, str(HISTORY_CSV), "training")
        tracking.hand_over(client, run_id)  # SCHEDULED: evaluate takes it next
    except BaseException as exc:  # interrupted (Ctrl-C, SIGTERM, SIGHUP): KILLED; an error: FAILED
        tracking.fail(client, run_id, exc)
        raise
    clear_stash()  # finished: outputs/train is DVC's now
    print(f"train: {cfg.train.epochs} epochs done (resumed from {result.resumed_from_epoch}); "
          f"student top-1 {result.final.get('top1', float('nan')):.2f}%")


if __name__ == "__main__":
    run_stage("train", main)
