"""File-system helpers shared by the writers that publish files atomically."""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def _umask() -> int:
    with _lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_permissions(path: str | os.PathLike) -> None:
    """Give a temporary file or directory (``mkstemp`` makes 0600, ``mkdtemp`` 0700) the
    permissions an ordinary ``open``/``mkdir`` would, before it is renamed into place."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~_umask())
