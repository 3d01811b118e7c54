"""Faults during ``train`` in a real ``dvc repro`` of the tiny demo, and what the rerun does:

* the whole ``dvc repro`` SIGKILLed before the first checkpoint: the rerun marks the run
  that was left RUNNING KILLED and starts over with a new run;
* SIGTERM during training: the run is KILLED, one line, exit status 143;
* the MLflow tracking server (a real ``mlflow server`` on 127.0.0.1) killed after epoch 1:
  one line, exit status 1; once it is back, the rerun resumes the same run.

``dvc repro train`` stops after train: evaluate and export add nothing here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reliability_hooks
from pipeline_project import DVC, DvcProject
from servers import MlflowServer, kill_group

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TRAIN_FILES = {"checkpoint.pt", "history.jsonl", "train.json", "mlflow_run.json"}


def epochs(project: DvcProject) -> list[int]:
    lines = (project.path / "outputs/train/history.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def stage_errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("qimera stage ")]


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs")


def test_sigkill_before_the_first_checkpoint_starts_over_with_a_new_run(dvc_project):
    project = dvc_project
    project.set_params({"train.iters_per_epoch": 60})  # epoch 1 lasts seconds: time to kill it
    proc = subprocess.Popen([DVC, "repro", "train"], cwd=project.path, env={**project.env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            opened = re.match(r"train: MLflow run (\w+) ", line)
            if opened:
                os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage, as a lost machine would
                break
    finally:
        kill_group(proc)
        proc.stdout.close()
    assert opened, "".join(seen)[-4000:]
    old = opened.group(1)
    client = project.client()
    run = client.get_run(old)
    wait_gone(int(run.data.tags["qimera.pid"]))
    train_dir = project.path / "outputs/train"
    assert not (train_dir / "checkpoint.pt").exists(), "killed too late: epoch 1 was checkpointed"
    assert run.info.status == "RUNNING"  # nobody could close it

    res = project.dvc("repro", "train", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert f"MLflow run {old} was left RUNNING by process" in res.stdout and "marked KILLED" in res.stdout
    assert "resuming" not in res.stdout
    assert client.get_run(old).info.status == "KILLED"
    new = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    assert new != old and client.get_run(new).info.status == "SCHEDULED"  # handed over to evaluate
    assert [h.step for h in client.get_metric_history(new, "loss_g")] == [1, 2]
    assert client.get_metric_history(old, "loss_g") == []
    assert epochs(project) == [1, 2] and project.read_json("outputs/train/train.json")["resumed_from_epoch"] == 0
    assert {p.name for p in train_dir.iterdir()} == TRAIN_FILES  # no temporary files left


def test_sigterm_during_train_marks_the_run_killed_with_one_line(dvc_project):
    project = dvc_project
    res = project.dvc("repro", "train", env=reliability_hooks.env("sigterm_after_epoch_1"), timeout=600)
    assert res.returncode != 0 and "sending this process SIGTERM" in res.stdout, res.stdout[-4000:]
    assert stage_errors(res.stdout) == ["qimera stage train: stopped by SIGTERM; rerun to continue"], res.stdout
    assert "Traceback" not in res.stdout and "exited with 143" in res.stdout
    run_id = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    assert project.client().get_run(run_id).info.status == "KILLED"
    assert epochs(project) == [1]  # epoch 1's checkpoint stays: the rerun resumes from it


def test_dvc_exp_run_again_after_a_stop_resumes_the_same_run(dvc_project):
    """`dvc exp run` checks the baseline's outputs out before the stages run, which removes
    the checkpoint a stopped run left in outputs/train; the train stage takes it back
    from its stash (stages.train.RESUME_STASH), so a rerun (a Prefect retry, a user's
    second `dvc exp run`) resumes instead of starting over."""
    project = dvc_project
    sets = ["-S", "train.epochs=3", "-S", "train.lr_milestones=[2]"]
    res = project.dvc("exp", "run", *sets, env=reliability_hooks.env("sigterm_after_epoch_1"), timeout=600)
    assert res.returncode != 0 and "stopped by SIGTERM" in res.stdout, res.stdout[-4000:]
    stopped = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    res = project.dvc("exp", "run", *sets, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "took back the checkpoint of the stopped run" in res.stdout and "resuming after epoch 1/3" in res.stdout
    assert project.read_json("outputs/train/train.json")["resumed_from_epoch"] == 1
    assert project.read_json("outputs/train/mlflow_run.json")["run_id"] == stopped  # the same MLflow run
    assert epochs(project) == [1, 2, 3]
    assert not (project.path / ".dvc" / "tmp" / "qimera-train").exists()  # finished: no stash left


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_tracking_server_going_away_mid_training_is_one_line_then_the_run_resumes(dvc_project, mlflow_server):
    project = dvc_project
    project.set_params({"train.epochs": 3})
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    res = project.dvc("repro", "train", env={**env, **reliability_hooks.env("kill_server_after_epoch_1"),
                                             reliability_hooks.SERVER_PGID: str(mlflow_server.proc.pid)},
                      timeout=600)
    assert res.returncode != 0 and "killing the MLflow server" in res.stdout, res.stdout[-4000:]
    assert stage_errors(res.stdout) == [
        f"qimera stage train: error: the MLflow tracking server {mlflow_server.url} stopped answering "
        "(ConnectionError: [Errno 111] Connection refused); training resumes from the last checkpoint when "
        "you rerun once it is back"], res.stdout[-4000:]
    assert "Traceback" not in res.stdout and "exited with 1" in res.stdout
    assert epochs(project) == [1, 2]  # epoch 2 was checkpointed; logging it failed
    run_id = project.read_json("outputs/train/mlflow_run.json")["run_id"]

    mlflow_server.stop()
    mlflow_server.start()  # back, same port and store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).info.status == "RUNNING"  # the server was gone when train failed
    res = project.dvc("repro", "train", env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resuming after epoch 2/3" in res.stdout and f"MLflow run {run_id} was left RUNNING" in res.stdout
    assert project.read_json("outputs/train/mlflow_run.json")["run_id"] == run_id  # the same run
    assert client.get_run(run_id).info.status == "SCHEDULED"
    assert [m.step for m in client.get_metric_history(run_id, "loss_g")] == [1, 2, 3]  # epoch 2 caught up
    assert epochs(project) == [1, 2, 3]
