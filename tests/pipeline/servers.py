"""Servers that tests start on 127.0.0.1: a free port, waiting for health, and killing the
whole process group at teardown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qimera.runtime import stop_group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group that ``proc`` leads."""
    stop_group(proc, ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)))


def tail(path: Path, n: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, name: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not healthy after {timeout} s:\n{tail(log)}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- Prefect

PREFECT = str(Path(sys.executable).parent / "prefect")
PREFECT_START_S = 90


def prefect_server(root: Path):
    """Start a Prefect server on 127.0.0.1:<free port> with its home and database under
    ``root``; returns ``(process, {"env", "settings", "api", "server_log"})``. The caller
    kills the process group (:func:`kill_group`)."""
    port = free_port()
    settings = {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "DO_NOT_TRACK": "1",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    env.update(settings, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log = root / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/api/health", log, "prefect server", PREFECT_START_S)
    except BaseException:
        kill_group(server)
        raise
    return server, {"env": env, "settings": settings, "api": settings["PREFECT_API_URL"], "server_log": log}


def prefect_cli(env: dict, *args: str, cwd: Path, timeout: float = 120) -> str:
    """``prefect <args>``; fails the test unless it exits with 0. Returns its output."""
    proc = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited with {proc.returncode}:\n{out}"
    return out


def flow_run_id(out: str) -> str:
    """The flow run id that ``prefect deployment run`` printed."""
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    return m.group(1)


def flow_run(api: str, run_id: str) -> dict:
    r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    r.raise_for_status()
    return r.json()


def wait_flow_run(api: str, run_id: str, worker: subprocess.Popen, worker_log: Path, timeout: float) -> dict:
    """Poll the flow run until it ends; fails the test when the worker dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        state = flow_run(api, run_id)["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        if worker.poll() is not None:
            pytest.fail(f"worker exited with {worker.returncode}:\n{tail(worker_log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {state['type']} after {timeout} s:\n{tail(worker_log)}")
        time.sleep(2)


# --------------------------------------------------------------------------- MLflow


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend; restartable on the same port.
    Artifacts are proxied to ``artifacts`` (a folder of ``root`` by default, or an
    ``s3://`` destination, with the S3 credentials and endpoint in ``env``)."""

    def __init__(self, root: Path, *, artifacts: str | None = None, env: dict[str, str] | None = None):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts or str(root / "artifacts")
        self.extra_env = dict(env or {})
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runners: starts in seconds
        env.update(self.extra_env)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", self.artifacts],
                env=env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        wait_healthy(self.proc, f"{self.url}/health", self.log, "mlflow server", 120)

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
