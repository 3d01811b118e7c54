"""Which GPU a cell runs on, when a worker runs several cells at once.

A Prefect process worker started with ``--limit N`` runs up to N cell flow runs at once,
each in its own process. :func:`gpu_slot` gives each cell one of the GPUs the worker was
given (``CUDA_VISIBLE_DEVICES=0,1,…``), the least busy one, so that the cells take the
GPUs in turn; with one GPU they share it, and without ``CUDA_VISIBLE_DEVICES`` nothing is
set (the cell sees what the worker sees). The count of cells per GPU is kept in lock
files in a directory of the worker's machine (``QIMERA_GPU_SLOTS``, default a directory
under the temporary directory): a slot is a file the cell's process holds an ``flock`` on,
so the slot of a process that died is free again at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

SLOTS_ENV = "QIMERA_GPU_SLOTS"


def visible_gpus(environ=None) -> list[str]:
    """The GPUs of ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), in order; [] when unset or empty."""
    value = (environ if environ is not None else os.environ).get("CUDA_VISIBLE_DEVICES", "")
    return [g.strip() for g in value.split(",") if g.strip() and g.strip() != "-1"]


def _slots_dir(environ) -> Path:
    default = Path(tempfile.gettempdir()) / f"qimera-gpu-slots-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path = Path(environ.get(SLOTS_ENV) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _held(path: Path) -> bool:
    """Whether some open file holds ``path``'s flock (a live slot); a free one is removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock this probe took
    path.unlink(missing_ok=True)  # its holder is gone
    return False


@contextlib.contextmanager
def gpu_slot(environ=None) -> Iterator[dict[str, str]]:
    """Take the least busy GPU for the duration of the block; yields the environment
    additions for the cell's process (``{"CUDA_VISIBLE_DEVICES": id}``, or ``{}``)."""
    environ = environ if environ is not None else os.environ
    gpus = visible_gpus(environ)
    if not gpus:
        yield {}
        return
    folder = _slots_dir(environ)
    with open(folder / ".choose", "a+") as choose:  # one process chooses at a time
        fcntl.flock(choose, fcntl.LOCK_EX)
        busy = {g: sum(_held(p) for p in folder.glob(f"gpu-{g}-*.slot")) for g in gpus}
        gpu = min(gpus, key=lambda g: (busy[g], gpus.index(g)))
        slot = folder / f"gpu-{gpu}-{os.getpid()}-{id(busy)}.slot"
        handle = open(slot, "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield {"CUDA_VISIBLE_DEVICES": gpu}
    finally:
        handle.close()
        slot.unlink(missing_ok=True)
