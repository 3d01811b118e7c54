"""A cell's checkpoint and results in S3, so that any worker can take the cell up.

A worker on another machine has its own disk. When the work pool's job variables set
``QIMERA_REMOTE=s3://bucket/prefix`` (with the worker's own AWS credentials, never the
deployment's), a cell flow run (:func:`run_remote_cell`):

1. downloads the cell's last checkpoint from ``<prefix>/runs/<experiment>/<cell key>/`` when
   its own directory has none (a retried cell, on this worker or another), so that
   ``qimera run`` resumes from it instead of epoch 0;
2. runs the cell with the epoch hook :func:`push_checkpoint`
   (``QIMERA_EPOCH_HOOK``, :data:`qimera.api.EPOCH_HOOK_ENV`): at the end of every epoch,
   after the trainer wrote it, the checkpoint and the history go to S3 (size and SHA-256
   verified, :mod:`stages.s3`), so a worker that dies loses at most the epoch it was in;
3. uploads the finished cell's directory (summary, config, record) beside them, with a
   ``MANIFEST.json`` last: a cell is finished for every machine once that is there, so a
   rerun anywhere skips it and the experiment flow builds its report from S3
   (:func:`fetch_finished`), not from the workers' disks.

The library knows nothing of this: it calls the hook the environment names.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the work pool's job variable: where cells keep their checkpoints and results
REMOTE_ENV = "QIMERA_REMOTE"
#: what the epoch hook reads in the cell's process: its directory and its S3 location
CHECKPOINT_DIR_ENV = "QIMERA_CHECKPOINT_DIR"
CHECKPOINT_URL_ENV = "QIMERA_CHECKPOINT_URL"
#: the hook :func:`run_remote_cell` gives ``qimera run``
HOOK = f"{__name__}:push_checkpoint"


def remote_prefix(environ=None) -> str | None:
    """``QIMERA_REMOTE`` (checked: ``s3://bucket[/prefix]``), or None when unset."""
    from stages.s3 import parse_url

    value = (environ if environ is not None else os.environ).get(REMOTE_ENV) or None
    if value is not None:
        parse_url(value, key_required=False)
    return value


def cell_url(prefix: str, experiment: str, cell) -> str:
    """The S3 location of one cell in its configuration: ``<prefix>/runs/<experiment>/<cell
    key>`` (:attr:`qimera.experiments.Cell.key`, so that the same cell under other settings
    never takes up this one's checkpoint)."""
    from stages.s3 import join

    return join(prefix, "runs", experiment, cell.key)


def _checkpoint_files() -> tuple[str, str]:
    from qimera.trainer import CHECKPOINT_NAME, HISTORY_NAME

    return CHECKPOINT_NAME, HISTORY_NAME


def restore(cell_dir: str | os.PathLike, url: str) -> bool:
    """Download the cell's checkpoint (and history) from ``url`` into ``cell_dir`` when
    ``cell_dir`` has no checkpoint and S3 has one; returns whether it did."""
    from stages.s3 import NoSuchObject, download, join

    checkpoint, history = _checkpoint_files()
    local = Path(cell_dir)
    if (local / checkpoint).is_file():
        return False
    try:
        download(join(url, checkpoint), local / checkpoint)
    except NoSuchObject:
        return False
    try:
        download(join(url, history), local / history)
    except NoSuchObject:
        pass  # the trainer rebuilds what it needs from the checkpoint
    return True


def push_checkpoint(record: dict) -> None:
    """The epoch hook: upload the cell's checkpoint and history (written just before this
    is called) to ``QIMERA_CHECKPOINT_URL``."""
    from stages.s3 import join, upload_file

    local, url = Path(os.environ[CHECKPOINT_DIR_ENV]), os.environ[CHECKPOINT_URL_ENV]
    for name in _checkpoint_files():
        if (local / name).is_file():
            upload_file(local / name, join(url, name))


def hook_env(cell_dir: str | os.PathLike, url: str) -> dict[str, str]:
    """The child's environment additions that make it push a checkpoint every epoch."""
    from qimera.api import EPOCH_HOOK_ENV

    project = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
    return {EPOCH_HOOK_ENV: HOOK, CHECKPOINT_DIR_ENV: str(Path(cell_dir).resolve()), CHECKPOINT_URL_ENV: url,
            "PYTHONPATH": path}


def fetch_finished(cell, experiment: str, prefix: str) -> bool:
    """Bring a cell that some worker finished (its directory and ``MANIFEST.json`` in S3)
    into ``cell.out_dir`` when this machine does not have it finished; returns whether the
    cell is finished here now (:func:`qimera.experiments.is_done`: the same configuration).
    A half-uploaded or missing cell is left alone."""
    import json
    import shutil
    import tempfile

    from qimera.experiments import CELL_RECORD, is_done

    from stages.s3 import NoSuchObject, download_dir

    if is_done(cell):
        return True
    url = cell_url(prefix, experiment, cell)
    with tempfile.TemporaryDirectory(prefix="qimera-cell-", dir=cell.out_dir.parent if cell.out_dir.parent.is_dir()
                                     else None) as tmp:
        copy = Path(tmp) / "cell"
        try:
            download_dir(url, copy)
        except NoSuchObject:  # no MANIFEST.json: nobody finished it (or the upload was cut short)
            return False
        record = json.loads((copy / CELL_RECORD).read_text()) if (copy / CELL_RECORD).is_file() else {}
        if record.get("status") != "done" or record.get("fingerprint") != cell.cfg.fingerprint():
            return False  # not this configuration's result: leave this disk alone
        if cell.out_dir.exists():
            shutil.rmtree(cell.out_dir)
        cell.out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(copy), str(cell.out_dir))
    return is_done(cell)


def run_remote_cell(cell, experiment: str, prefix: str, *, threads: int | None = None,
                    env: dict[str, str] | None = None, log=print) -> dict:
    """Run ``cell`` (a :class:`qimera.experiments.Cell` of the experiment named
    ``experiment``) with its checkpoint kept in S3 under ``prefix`` (module docstring),
    ``env`` added to its environment; returns the cell's record, as
    :func:`qimera.experiments.run_cell` does."""
    from qimera.experiments import cell_record, run_cell

    from stages.s3 import upload_dir

    url = cell_url(prefix, experiment, cell)
    if fetch_finished(cell, experiment, prefix):
        log(f"{cell.id}: finished already (in {url}/)")
        return cell_record(cell)
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    if restore(cell.out_dir, url):
        log(f"{cell.id}: resuming from the checkpoint in {url}/")
    record = run_cell(cell, threads=threads, env={**(env or {}), **hook_env(cell.out_dir, url)})
    if record["status"] == "done":
        upload_dir(cell.out_dir, url, metadata={"cell": cell.id, "experiment": experiment})
    return record
