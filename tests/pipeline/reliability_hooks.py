"""Epoch callbacks (``QIMERA_EPOCH_HOOK``) for the reliability tests of the train stage.

* :func:`sigterm_after_epoch_1` sends the stage's own process SIGTERM after epoch 1, as a
  supervisor (Prefect, systemd, ``docker stop``) would;
* :func:`kill_server_after_epoch_1` SIGKILLs the process group ``QIMERA_TEST_SERVER_PGID``
  (the test's ``mlflow server``) after epoch 1 and waits until its port refuses
  connections: the tracking server goes away in the middle of training.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.parse
from pathlib import Path

HOOKS_DIR = str(Path(__file__).resolve().parent)
SERVER_PGID = "QIMERA_TEST_SERVER_PGID"


def sigterm_after_epoch_1(record: dict) -> None:
    if int(record["epoch"]) == 1:
        print("train: epoch hook: sending this process SIGTERM", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this


def kill_server_after_epoch_1(record: dict) -> None:
    if int(record["epoch"]) != 1:
        return
    print("train: epoch hook: killing the MLflow server", flush=True)
    try:
        os.killpg(int(os.environ[SERVER_PGID]), signal.SIGKILL)
    except ProcessLookupError:
        pass
    url = urllib.parse.urlsplit(os.environ["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((url.hostname, url.port), timeout=1).close()
        except OSError:
            return  # refused: the server is gone
        time.sleep(0.1)
    raise RuntimeError("the MLflow server still answers 30 s after SIGKILL")


def env(hook: str) -> dict[str, str]:
    """Environment entries that make the train stage call ``hook`` (a function above)."""
    path = os.pathsep.join(p for p in (HOOKS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return {"QIMERA_EPOCH_HOOK": f"{Path(__file__).stem}:{hook}", "PYTHONPATH": path}
