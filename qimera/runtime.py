"""Process-level performance settings for CPU training.

:func:`tune_cpu_allocator` keeps glibc's ``malloc`` from handing every large tensor
back to the kernel when it is freed. Training allocates and frees the same few tens of
MB-sized activations every iteration; by default each of them is a fresh ``mmap`` whose
pages fault in (and are zeroed) on first touch, which costs several percent of a CPU
iteration. With ``M_MMAP_MAX=0`` and a large trim threshold the freed memory is reused
instead, and ``M_ARENA_MAX=1`` keeps oneDNN's worker threads on the same (reused) heap
rather than per-thread arenas that are trimmed and faulted in again. The price: the
process does not shrink its resident memory after a peak.

It is called by the ``qimera`` console script and the benchmarks; library users may call
it themselves. ``QIMERA_DEFAULT_MALLOC=1`` in the environment turns it off.

:func:`machine_fault` turns an out-of-memory or a full-disk error into one line with a
remedy, for the CLI and the pipeline stages.

:func:`signal_of` names the signal a ``KeyboardInterrupt`` stands for,
:func:`stop_with_parent` makes an experiment's cell stop when its runner dies, and
:func:`stop_group` stops a child's whole process group, signal by signal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import signal
import subprocess
import sys
from typing import Iterator, Sequence

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def tune_cpu_allocator() -> bool:
    """Apply the malloc settings once; returns True when they are in effect."""
    global _done
    if _done:
        return True
    if os.environ.get("QIMERA_DEFAULT_MALLOC") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = (libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
              and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    return ok


_OOM = re.compile(r"can't allocate memory|out of memory|not enough memory|Cannot allocate memory", re.IGNORECASE)
#: errno values that mean "the machine's storage", not the program
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = (str(exc).strip().splitlines() or [""])[-1 if "enforce fail" in str(exc) else 0]
    return text[:limit]


def machine_fault(exc: BaseException) -> str | None:
    """One line with a remedy for a fault of the machine rather than of the input (memory
    that cannot be had, a full or failing disk), or ``None`` for anything else. The CLI
    and the pipeline stages print it instead of a traceback and exit with status 1. The
    chain of causes is followed: torch's checkpoint writer turns a full disk's OSError into
    a RuntimeError of its own."""
    return next((m for m in map(_fault_of, exception_chain(exc)) if m is not None), None)


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__``, else
    ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _fault_of(exc: BaseException) -> str | None:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and _OOM.search(str(exc))):
        return (f"out of memory ({_first_line(exc)}); lower train.batch_size (or data.batch_size for "
                "evaluation), or free memory on this machine, and rerun")
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return (f"cannot write{where}: {exc.strerror or exc}; free space (or fix the disk) and rerun the same "
                "command: training resumes from the last checkpoint")
    return None


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal a ``KeyboardInterrupt`` stands for: the CLI and the stages raise it for
    SIGTERM and SIGHUP with the signal's name as its argument; Ctrl-C is SIGINT."""
    name = str(exc.args[0]) if exc.args else ""
    value = getattr(signal, name, None) if name.startswith("SIG") else None
    return int(value) if isinstance(value, int) else int(signal.SIGINT)


#: the pid of the process whose death must stop this one, set by
#: :func:`qimera.experiments.run_cell` for the ``qimera run`` of a cell
PARENT_PID_ENV = "QIMERA_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """When :data:`PARENT_PID_ENV` names this process's parent, ask the kernel to send this
    process SIGTERM when the parent dies (Linux; elsewhere nothing happens). A cell whose
    runner was killed outright (SIGKILL after a scheduler's grace period) then stops as on
    SIGTERM, its last checkpoint kept, instead of running on as an orphan."""
    spec = os.environ.pop(PARENT_PID_ENV, None)  # not for this process's own children
    if not spec or not sys.platform.startswith("linux"):
        return
    try:
        parent = int(spec)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (ValueError, OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def stop_group(proc: subprocess.Popen, steps: Sequence[tuple[int, float]]) -> None:
    """Stop the process group that ``proc`` leads (started with ``start_new_session``):
    each ``(signal, seconds)`` of ``steps`` in turn, sent to the group while ``proc`` runs,
    waiting up to ``seconds`` for it to exit; then SIGKILL to what is left of the group
    (children the leader left behind), and wait for ``proc``."""
    for signum, seconds in steps:
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
