"""One writer per ``train.out_dir``: :func:`hold_out_dir`.

A run holds an exclusive ``flock`` on :data:`LOCK_NAME` inside its ``out_dir`` from
before it reads a checkpoint there until it has written its summary. The file holds the
holder's pid, host and start time, so that a second run is refused with one line naming
them (:class:`OutDirBusy`). The kernel releases a ``flock`` when its process dies, however
it dies, so the lock of a killed run is free at once: the next run takes it over (and
overwrites the details). The holder removes the file when it lets go, and with it the
directories it created for the run if they stayed empty.

The lock is re-entrant within one thread (:func:`qimera.api.run` holds it and the
:class:`qimera.trainer.Trainer` it starts takes it again); another thread of the same
process is refused like another process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .config import create_out_dir, remove_created_dirs

#: the lock file inside ``train.out_dir`` (removed when its holder lets go)
LOCK_NAME = ".qimera.lock"


class OutDirBusy(RuntimeError):
    """``train.out_dir`` is held by another run (process or thread); the message names
    the holder (pid, host, start time) and the choices."""


@dataclass
class _Held:
    fd: int
    thread: int
    created: list[Path] = field(default_factory=list)
    depth: int = 1


#: what flock answers on a file system that has no such locks
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_held: dict[str, _Held] = {}  # realpath of the out_dir -> what this process holds there
_guard = threading.Lock()


def lock_path(out_dir: str | os.PathLike) -> Path:
    """Where the lock of ``out_dir`` lives."""
    return Path(out_dir) / LOCK_NAME


def read_holder(out_dir: str | os.PathLike) -> dict | None:
    """The details the holder of ``out_dir``'s lock wrote (pid, host, started, command),
    or None when there is no lock file or it holds none (its holder may be dead: only
    :func:`hold_out_dir` can tell)."""
    try:
        return _parse(lock_path(out_dir).read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _busy(out_dir: str | os.PathLike, holder: dict | None) -> OutDirBusy:
    if holder:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"started {holder.get('started', '?')}")
    else:
        who = "a process that has not written its details yet"
    return OutDirBusy(f"train.out_dir={str(out_dir)!r} is in use by another run ({who}); one run writes an "
                      "out_dir at a time: wait for it to finish or stop it, or choose another train.out_dir")


def _details() -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "command": " ".join(sys.argv)[:500]}) + "\n").encode()


def _acquire(out_dir: Path) -> _Held:
    """Create ``out_dir`` if need be and take its lock, or raise :class:`OutDirBusy`."""
    created = create_out_dir(out_dir)
    path = lock_path(out_dir)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            remove_created_dirs(created)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_FLOCK:  # a file system without flock (some network mounts): unguarded
                break
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                remove_created_dirs(created)
                raise
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            remove_created_dirs(created)
            raise _busy(out_dir, holder) from None
        # the holder before us removes the file when it lets go: a lock on a file that is no
        # longer the one at `path` guards nothing, so take the new one
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _details(), 0)
    except BaseException:
        _release(_Held(fd, threading.get_ident(), created), path)
        raise
    return _Held(fd, threading.get_ident(), created)


def _release(held: _Held, path: Path) -> None:
    try:
        path.unlink()  # before the lock goes: a run that opened it now retries on a new file
    except OSError:
        pass
    os.close(held.fd)
    remove_created_dirs(held.created)


@contextmanager
def hold_out_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out_dir`` (created if missing) for one writer for the duration of the block.

    Raises :class:`OutDirBusy` when another process, or another thread of this one, holds
    it; a ``train.out_dir`` that cannot be created or written is a
    :class:`qimera.config.ConfigError`. Re-entrant in the holding thread."""
    out_dir = Path(out_dir)
    key = os.path.realpath(out_dir)
    me = threading.get_ident()
    with _guard:
        held = _held.get(key)
        if held is not None:
            if held.thread != me:
                raise OutDirBusy(f"train.out_dir={str(out_dir)!r} is in use by another run of this process "
                                 f"(pid {os.getpid()}, another thread); one run writes an out_dir at a time: "
                                 "choose another train.out_dir")
            held.depth += 1
    if held is not None:
        try:
            yield out_dir
        finally:
            with _guard:
                held.depth -= 1
        return
    held = _acquire(out_dir)
    with _guard:
        _held[key] = held
    try:
        yield out_dir
    finally:
        with _guard:
            _held.pop(key, None)
        _release(held, lock_path(out_dir))
