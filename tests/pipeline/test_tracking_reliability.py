"""MLflow bookkeeping that must survive faults, without DVC: a new SQLite store opened by
several processes at once, a broken store, who holds a run (claim, hand over, fail, dead
processes' runs marked KILLED), signals in a stage, and a tracking server that stops
answering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port
from stages import common, tracking
from stages.common import PipelineError

REPO = Path(__file__).resolve().parents[2]

CONNECT = """
import sys, time
from pathlib import Path
from stages import tracking
uri, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
tracking.connect(uri)
print("connected")
"""


def test_a_new_sqlite_store_opens_in_several_processes_at_once(tmp_path):
    """Each process imports MLflow first, then all connect at the same moment (MLflow
    creates the schema on first use; without the lock 3 of 4 fail)."""
    uri, go, n = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", tmp_path / "go", 4
    (tmp_path / "store").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    procs = [subprocess.Popen([sys.executable, "-c", CONNECT, uri, str(tmp_path / f"ready{i}"), str(go)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and out.strip().endswith("connected"), out[-3000:]
    client = tracking.connect(uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert (tmp_path / "store" / "mlflow.db.lock").is_file()


def test_a_broken_sqlite_store_names_the_sqlite_error(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database, it only has its name " * 20)
    with pytest.raises(PipelineError) as err:
        tracking.connect(f"sqlite:///{db}")
    message = str(err.value)
    assert f"MLflow store sqlite:///{db} (SQLite file {db}) cannot be opened: " in message
    assert "sqlite3.DatabaseError: file is not a database" in message
    assert "server" not in message and "\n" not in message


@pytest.fixture
def store(tmp_path):
    """A new SQLite store with one experiment: (client, experiment id)."""
    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.create_experiment("reliability")


def test_a_sqlite_store_overwritten_while_a_stage_runs_is_one_line(store, tmp_path, capsys):
    """Issue 21: the store's file replaced by garbage during train gave a 103-line traceback."""
    client, exp = store
    run_id = client.create_run(exp).info.run_id
    (tmp_path / "mlflow.db").write_bytes(b"garbage, not a database " * 100)

    def train() -> None:
        client.log_metric(run_id, "student_top1", 1.0)

    with pytest.raises(SystemExit) as stop:
        common.run_stage("train", train)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "became unreadable while the train stage ran (DatabaseError: file is not a database)" in lines[0]
    assert "training resumes from the last checkpoint" in lines[0]
    assert tracking.outage_message(ValueError("no store in this"), "train") is None


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_hand_over_and_fail(store):
    client, exp = store
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id, "KILLED")
    tracking.claim(client, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    tags = run.data.tags
    assert tags["qimera.pid"] == str(os.getpid()) and tags["qimera.workspace"] == str(common.repo_root())
    assert tags["qimera.host"] and tags["qimera.pid_start"].isdigit()
    tracking.hand_over(client, run_id)
    assert client.get_run(run_id).info.status == "SCHEDULED"
    for exc, status in ((KeyboardInterrupt("SIGTERM"), "KILLED"), (RuntimeError("boom"), "FAILED")):
        tracking.claim(client, run_id)
        tracking.fail(client, run_id, exc)
        assert client.get_run(run_id).info.status == status


def test_runs_of_dead_processes_of_this_workspace_are_marked_killed(store, capsys):
    client, exp = store
    dead = str(dead_pid())

    def run(status="RUNNING", **tags):
        run_id = client.create_run(exp, tags={**tracking.claim_tags(), **tags}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    gone = run(**{"qimera.pid": dead})
    pid_reused = run(**{"qimera.pid_start": "1"})  # this process's pid, another start time
    alive = run()
    other_workspace = run(**{"qimera.pid": dead, "qimera.workspace": "/somewhere/else"})
    other_host = run(**{"qimera.pid": dead, "qimera.host": "another-host"})
    finished = run("FINISHED", **{"qimera.pid": dead})
    untagged = client.create_run(exp).info.run_id

    assert sorted(tracking.reap_dead_runs(client)) == sorted([gone, pid_reused])
    status = {r: client.get_run(r).info.status for r in (gone, pid_reused, alive, other_workspace, other_host,
                                                          finished, untagged)}
    assert status == {gone: "KILLED", pid_reused: "KILLED", alive: "RUNNING", other_workspace: "RUNNING",
                      other_host: "RUNNING", finished: "FINISHED", untagged: "RUNNING"}
    assert f"MLflow run {gone} was left RUNNING by process {dead}, which is gone: marked KILLED" in capsys.readouterr().out
    assert tracking.reap_dead_runs(client) == []


def test_sigterm_and_sighup_stop_a_stage_with_one_line(capsys):
    before = signal.getsignal(signal.SIGTERM)
    closed = []

    def main(sig):
        def run():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(10)
            except KeyboardInterrupt:
                os.kill(os.getpid(), sig)  # a second signal while closing is ignored
                time.sleep(0.05)
                closed.append(sig)
                raise
        return run

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        with pytest.raises(SystemExit) as ex:
            common.run_stage("train", main(sig))
        assert ex.value.code == code
        assert capsys.readouterr().err == f"qimera stage train: stopped by {sig.name}; rerun to continue\n"
    assert closed == [signal.SIGTERM, signal.SIGHUP]
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def server_error(port: int, monkeypatch) -> Exception:
    """What MLflow raises when the server at ``port`` does not answer (one attempt)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        MlflowClient(f"http://127.0.0.1:{port}").get_run("0" * 32)
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing listens there, yet the request succeeded")


def test_a_tracking_server_that_stops_answering_is_one_line_and_status_1(monkeypatch, capsys):
    port = free_port()
    exc = server_error(port, monkeypatch)
    monkeypatch.setattr(tracking, "_connected_uri", f"http://127.0.0.1:{port}")
    expected = (f"the MLflow tracking server http://127.0.0.1:{port} stopped answering (ConnectionError: "
                "[Errno 111] Connection refused); ")
    assert tracking.outage_message(exc, "train") == expected + (
        "training resumes from the last checkpoint when you rerun once it is back")
    assert tracking.outage_message(exc, "export") == expected + "rerun once it is back"

    def main():
        try:
            raise exc
        except Exception:
            raise RuntimeError("the epoch callback failed") from exc  # wrapped again: still found

    with pytest.raises(SystemExit) as ex:
        common.run_stage("train", main)
    err = capsys.readouterr().err
    assert ex.value.code == 1 and err.startswith("qimera stage train: error: " + expected)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_other_connection_errors_keep_their_traceback(monkeypatch, capsys):
    exc = server_error(free_port(), monkeypatch)
    monkeypatch.setattr(tracking, "_connected_uri", f"http://127.0.0.1:{free_port()}")  # another server
    assert tracking.outage_message(exc, "train") is None
    monkeypatch.setattr(tracking, "_connected_uri", "sqlite:////tmp/mlflow.db")
    assert tracking.outage_message(exc, "train") is None

    def main():
        raise exc

    with pytest.raises(SystemExit) as ex:
        common.run_stage("fetch_teacher", main)
    assert ex.value.code == 1 and "Traceback" in capsys.readouterr().err
