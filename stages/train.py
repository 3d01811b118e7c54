"""Stage ``train``: the generator and the quantized student, logged to MLflow per epoch.

Validates everything first (config, the workspace teacher, the evaluation data, the
generator's K against the teacher's classes, the MLflow store); only then does it open
the MLflow run and train. ``outputs/train`` is a persistent DVC output: the trainer
writes ``checkpoint.pt`` and ``history.jsonl`` there after every epoch, and a rerun after
a kill **resumes** from the last finished epoch, reopening the same MLflow run. A
checkpoint of another configuration, teacher or embedding table (or of more epochs than
asked) is discarded and training starts over.

Outputs: ``outputs/train/`` (checkpoint.pt, history.jsonl, inputs.json, train.json,
mlflow_run.json) and ``outputs/history.csv`` (one row per epoch, for ``dvc plots``).

Test hook (used by tests/pipeline): with ``QIMERA_TEST_KILL_AFTER_EPOCH=N`` in the
environment the process sends itself SIGKILL right after epoch N's checkpoint has been
written and logged: a real, uncatchable kill at a deterministic point.
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import time

from .common import (
    EMBEDDINGS,
    HISTORY_COLUMNS,
    HISTORY_CSV,
    RUN_CONFIG,
    TEACHER_RECORD,
    TRAIN_DIR,
    TRAIN_RECORD,
    input_errors,
    load_params,
    load_run_config,
    preset_file,
    read_json,
    repo_root,
    root_relative,
    run_stage,
    workspace_teacher_config,
    write_json,
    write_text,
)
from . import tracking

INPUTS = TRAIN_DIR / "inputs.json"
KILL_HOOK = "QIMERA_TEST_KILL_AFTER_EPOCH"


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


def library_hash() -> str:
    """sha256 of the ``qimera`` package's source: a checkpoint made by other library code
    is not resumed (DVC reruns train when the library changes; that must retrain)."""
    import hashlib
    from pathlib import Path

    import qimera

    pkg = Path(qimera.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _clear_stale(reason: str) -> None:
    print(f"train: starting over ({reason})")
    for name in ("checkpoint.pt", "history.jsonl", "inputs.json", "train.json", "mlflow_run.json"):
        (TRAIN_DIR / name).unlink(missing_ok=True)


def _resumable(expected: dict, cfg) -> list[dict] | None:
    """The history of the checkpoint in ``outputs/train`` when this run may continue it,
    else None (after clearing what is there)."""
    import torch

    ckpt = TRAIN_DIR / "checkpoint.pt"
    if not cfg.train.resume:
        _clear_stale("train.resume is false")
        return None
    if not ckpt.is_file():
        if any(TRAIN_DIR.iterdir()):
            _clear_stale("no checkpoint")
        return None
    try:
        inputs = read_json(INPUTS)
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - unreadable leftovers are not resumable
        _clear_stale(f"unreadable checkpoint or inputs.json: {type(exc).__name__}")
        return None
    if inputs != expected or state.get("fingerprint") != expected["fingerprint"]:
        _clear_stale("the checkpoint belongs to another configuration, teacher, embedding table or library version")
        return None
    if int(state.get("epoch", 0)) > cfg.train.epochs:
        _clear_stale(f"the checkpoint has {state['epoch']} epochs, more than train.epochs={cfg.train.epochs}")
        return None
    return list(state.get("history", []))


def main() -> None:
    import torch

    from qimera.api import prepare
    from qimera.runtime import tune_cpu_allocator
    from qimera.teachers import sha256_file
    from qimera.trainer import RESUME_MAY_CHANGE, Trainer

    tune_cpu_allocator()
    root = repo_root()
    params = load_params()
    cfg = load_run_config()
    uri = tracking.tracking_uri(params, root)
    client = tracking.connect(uri)

    created = not TRAIN_DIR.exists()
    try:
        prep = prepare(workspace_teacher_config(cfg))
    except input_errors():
        if created and TRAIN_DIR.is_dir() and not any(TRAIN_DIR.iterdir()):
            TRAIN_DIR.rmdir()
        raise
    table = torch.load(EMBEDDINGS, map_location="cpu", weights_only=True)["embeddings"]
    # the trainer gets the preset's teacher spec (for its fingerprint and the record) and
    # the teacher object loaded from the workspace copy
    tcfg = root_relative(cfg, root)
    record = read_json(TEACHER_RECORD)
    expected = {"fingerprint": tcfg.fingerprint(ignore=RESUME_MAY_CHANGE), "library": library_hash(),
                "teacher_sha256": record["sha256"], "embeddings_sha256": sha256_file(EMBEDDINGS)}
    previous = _resumable(expected, cfg)
    resume = previous is not None

    tags = tracking.run_tags(cfg, prep.device, {"teacher.sha256": record["sha256"],
                                                "teacher.top1": f"{record['top1']:.4f}"})
    exp_name = tracking.experiment_name(params, cfg)
    run_id = tracking.open_run(client, uri, exp_name, cfg, resume=resume, tags=tags, name=tracking.run_name(cfg))
    try:
        tracking.log_tags(client, run_id, tags)
        flat = tracking.flatten(cfg.resolved())
        flat["preset_file"] = preset_file(root, cfg.preset, cfg.quant.w_bits, cfg.quant.a_bits).name
        tracking.log_params(client, run_id, flat)
        client.log_artifact(run_id, str(RUN_CONFIG), "config")
        if not resume:
            write_json(INPUTS, expected)

        trainer = Trainer(tcfg, prep.teacher, prep.eval_data, initial_embeddings=table,
                          callbacks=(lambda rec: tracking.log_epoch(client, run_id, rec), _kill_hook()))
        if resume:
            tracking.log_missing_epochs(client, run_id, previous)
            print(f"train: resuming after epoch {len(previous)}/{cfg.train.epochs}")
        print(f"train: MLflow run {run_id} in experiment {exp_name!r} at {tracking.redact(uri)}")
        result = trainer.fit()
    except KeyboardInterrupt:
        tracking.terminate(client, run_id, "KILLED")
        raise
    except BaseException:
        tracking.terminate(client, run_id, "FAILED")
        raise

    write_text(HISTORY_CSV, history_csv(result.history))
    write_json(TRAIN_RECORD, {
        "epochs": cfg.train.epochs, "iterations": cfg.train.epochs * cfg.train.iters_per_epoch,
        "resumed_from_epoch": result.resumed_from_epoch, "seconds_this_run": round(result.seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    tracking.log_tags(client, run_id, {"resumed_from_epoch": str(result.resumed_from_epoch)})
    client.log_artifact(run_id, str(HISTORY_CSV), "training")
    final = result.final
    print(f"train: {cfg.train.epochs} epochs done (resumed from {result.resumed_from_epoch}); "
          f"student top-1 {final.get('top1', float('nan')):.2f}%")


def _kill_hook():
    after = os.environ.get(KILL_HOOK)

    def hook(record: dict) -> None:
        if after and int(record["epoch"]) == int(after):
            print(f"train: {KILL_HOOK}={after}: killing this process now", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    run_stage("train", main)
