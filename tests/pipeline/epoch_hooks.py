"""Epoch callbacks for the train stage's ``QIMERA_EPOCH_HOOK`` setting, used by the tests.

:func:`kill_after_epoch_1` sends the stage's own process SIGKILL right after epoch 1's
checkpoint has been written and logged: a real, uncatchable kill at a deterministic point.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

#: the value of QIMERA_EPOCH_HOOK that names :func:`kill_after_epoch_1`
KILL_AFTER_EPOCH_1 = f"{Path(__file__).stem}:kill_after_epoch_1"
#: the directory to put on PYTHONPATH so that the stage can import this module
HOOKS_DIR = str(Path(__file__).resolve().parent)


def kill_after_epoch_1(record: dict) -> None:
    if int(record["epoch"]) == 1:
        print("train: epoch hook: killing this process now", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def env() -> dict[str, str]:
    """Environment entries that make the train stage call :func:`kill_after_epoch_1`."""
    path = os.pathsep.join(p for p in (HOOKS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return {"QIMERA_EPOCH_HOOK": KILL_AFTER_EPOCH_1, "PYTHONPATH": path}


def push_then_die_after_epoch_1(record: dict) -> None:
    """A worker that dies mid-cell: epoch 1's checkpoint reaches S3
    (:func:`pipelines.remote.push_checkpoint`), then the process is killed."""
    from pipelines.remote import push_checkpoint

    push_checkpoint(record)
    kill_after_epoch_1(record)
