"""Atomic publication of files and directories, shared by every writer in the project:
a file or directory appears complete, with ordinary permissions, or not at all. A directory
is replaced only when qimera wrote it (:data:`WRITTEN_MARKER`); anything else is refused
(:class:`OutputDirError`). Also the project's one file checksum, :func:`sha256_file`."""

from __future__ import annotations

import errno
import hashlib
import json
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
    """Remove the temporary files and directories that :func:`atomic_write`,
    :func:`atomic_dir` and :func:`staging_dir` left beside ``dest`` when their process was
    killed (SIGKILL gives it no chance to clean up), and the temporaries of those
    temporaries (a staging directory that was itself filled through :func:`atomic_dir`).
    Only for a ``dest`` that one process at a time writes (a stage's output, a run's
    checkpoint). Returns what went."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    gone = [p for p in dest.parent.glob(_temp_prefix(dest) + "*") if p.is_dir()]
    gone += [p for nested in list(gone) for p in dest.parent.glob(_temp_prefix(nested) + "*") if p.is_dir()]
    gone += [p for p in dest.parent.glob(f".{dest.name}.*.tmp") if p.is_file()]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


# --------------------------------------------------------------------------- directories

#: the file by which a directory says that qimera wrote it, and what it wrote there: JSON
#: ``{"written_by": "qimera", "entries": [relative paths]}``. A directory is replaced only
#: when it is absent, empty, or carries this file and holds nothing but the entries it lists.
WRITTEN_MARKER = ".qimera-written.json"


class OutputDirError(ValueError):
    """A directory that a writer would replace holds something it did not write (or is not
    a directory a writer may replace): nothing is written, nothing is removed."""


def _entries(root: Path) -> list[str]:
    """Every file and directory under ``root`` as sorted relative POSIX paths, without the
    top-level marker."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found += [(rel / name).as_posix() for name in (*dirnames, *filenames)]
    return sorted(e for e in found if e != WRITTEN_MARKER)


def written_entries(path: str | os.PathLike) -> list[str] | None:
    """What the marker of directory ``path`` says qimera wrote there, or None when it has
    no readable marker."""
    marker = Path(path) / WRITTEN_MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entries = data.get("entries") if isinstance(data, dict) and data.get("written_by") == "qimera" else None
    return entries if isinstance(entries, list) and all(isinstance(e, str) for e in entries) else None


def mark_written(path: str | os.PathLike) -> None:
    """Record in directory ``path`` that qimera wrote everything it now holds."""
    path = Path(path)
    text = json.dumps({"written_by": "qimera", "entries": _entries(path)}, indent=1) + "\n"
    (path / WRITTEN_MARKER).write_text(text, encoding="utf-8")


def _shown(entries: list[str]) -> str:
    names = ", ".join(repr(e) for e in entries[:3])
    return names + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def check_replaceable(dest: str | os.PathLike) -> bool:
    """Whether ``dest`` exists; raises :class:`OutputDirError` (one line naming it) unless a
    writer may replace it: absent, an empty directory, or a directory whose marker
    (:data:`WRITTEN_MARKER`) lists everything it holds. Never the working directory or
    one that holds it, never a file or a symbolic link."""
    dest = Path(dest)
    if not os.path.lexists(dest):
        return False
    where = f"output directory {str(dest)!r}"
    if dest.is_symlink():
        raise OutputDirError(f"{where} is a symbolic link; give the directory itself or a new path")
    if not dest.is_dir():
        raise OutputDirError(f"{where} is a file, not a directory; move it away or choose another path")
    here, target = Path.cwd().resolve(), dest.resolve()
    if target == here or target in here.parents:
        raise OutputDirError(f"{where} is the working directory or holds it; give a new or empty directory")
    found = _entries(dest)
    if not found and not (dest / WRITTEN_MARKER).exists():
        return True
    written = written_entries(dest)
    if written is None:
        raise OutputDirError(f"{where} holds files qimera did not write ({_shown(found)}; no {WRITTEN_MARKER}), so "
                             "it is not replaced; move them away or choose a new or empty directory")
    foreign = sorted(set(found) - set(written))
    if foreign:
        raise OutputDirError(f"{where} holds {_shown(foreign)}, which qimera did not write there, so it is not "
                             "replaced; move it away or choose a new or empty directory")
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make the filled directory ``tmp`` (beside ``dest``, from :func:`staging_dir`) the
    directory ``dest``: marked as qimera's (:func:`mark_written`), with ordinary
    permissions, in place of a ``dest`` that :func:`check_replaceable` allows. An earlier
    ``dest`` is swapped out in one step where the system can (it is then at ``tmp``, which
    :func:`staging_dir` removes), so that ``dest`` never goes missing; otherwise it is
    renamed aside and put back if the second rename fails."""
    tmp, dest = Path(tmp), Path(dest)
    mark_written(tmp)
    for item in [*tmp.rglob("*"), tmp]:  # some writers (safetensors) make 0600 files
        default_permissions(item)
    if not check_replaceable(dest) or not any(dest.iterdir()):
        os.replace(tmp, dest)  # over nothing, or over an empty directory
        return
    if _exchange(tmp, dest):
        return
    aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        os.rmdir(aside)
        os.rename(dest, aside)
        os.rename(tmp, dest)
    except BaseException:
        if not os.path.lexists(dest) and os.path.isdir(aside):
            os.rename(aside, dest)  # the earlier one back
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staging_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """A new temporary directory beside ``dest`` (same file system, so that it can be
    renamed into place with :func:`publish_dir`), removed when the block ends, whatever is
    left in it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest`` to fill; when the block succeeds it
    (and everything in it) gets ordinary permissions and replaces ``dest``, otherwise it
    is removed and ``dest`` is untouched. ``dest`` must be absent, empty or a directory
    qimera wrote (:func:`check_replaceable`, checked before the block and again before
    the swap): anything else is refused with :class:`OutputDirError` and left as it is."""
    check_replaceable(dest)
    with staging_dir(dest) as tmp:
        yield tmp
        publish_dir(tmp, dest)
