"""Atomic publication of files and directories, shared by every writer in the project:
a file or directory appears complete, with ordinary permissions, or not at all. Also the
project's one file checksum, :func:`sha256_file`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_permissions(path: str | os.PathLike) -> None:
    """Give a temporary file or directory (``mkstemp`` makes 0600, ``mkdtemp`` 0700) the
    permissions an ordinary ``open``/``mkdir`` would, before it is renamed into place."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path`` (opened with ``mode``),
    then rename it to ``path``; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}-"


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that :func:`atomic_write` and
    :func:`atomic_dir` left beside ``dest`` when their process was killed (SIGKILL gives
    it no chance to clean up). Only for a ``dest`` that one process at a time writes (a
    stage's output, a run's checkpoint). Returns what went."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    gone = [p for p in dest.parent.glob(_temp_prefix(dest) + "*") if p.is_dir()]
    gone += [p for p in dest.parent.glob(f".{dest.name}.*.tmp") if p.is_file()]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest`` to fill; when the block succeeds it
    (and everything in it) gets ordinary permissions and replaces ``dest``, otherwise it
    is removed and ``dest`` is untouched."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        for item in [*tmp.rglob("*"), tmp]:  # some writers (safetensors) make 0600 files
            default_permissions(item)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
