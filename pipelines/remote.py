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

With ``QIMERA_DVC_REMOTE=s3://…`` as well (each flow run in its own clone of the
repository: ``prefect.team.yaml``), a cell is a DVC experiment of the pipeline instead
(:func:`run_dvc_cell`): ``dvc exp run --name <cell key>`` in the clone, its checkpoint in
``outputs/train`` pushed and restored the same way, its MLflow run a child of the
experiment's parent run, and when it is finished ``dvc push`` of its outputs to that
remote and, with ``QIMERA_DVC_EXP_REMOTE=<git remote>`` (e.g. ``origin``), ``dvc exp push``
of the experiment to the git remote.

The settings are read and checked once, by :meth:`RemoteSettings.from_env`. The library
knows nothing of this: it calls the hook the environment names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: the work pool's job variable: where cells keep their checkpoints and results
REMOTE_ENV = "QIMERA_REMOTE"
#: the work pool's job variable: the DVC remote (s3://…) finished cells push their outputs to
DVC_REMOTE_ENV = "QIMERA_DVC_REMOTE"
#: the work pool's job variable: the git remote (a name of the clone's, e.g. origin) the
#: cells' DVC experiments are pushed to
DVC_EXP_REMOTE_ENV = "QIMERA_DVC_EXP_REMOTE"
#: the work pool's job variable: the name of a Prefect Secret block holding the S3
#: credentials, for workers that have none in their environment
SECRET_BLOCK_ENV = "QIMERA_AWS_SECRET_BLOCK"
#: what such a block may hold (a JSON object of these)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: what the epoch hook reads in the cell's process: its directory and its S3 location
CHECKPOINT_DIR_ENV = "QIMERA_CHECKPOINT_DIR"
CHECKPOINT_URL_ENV = "QIMERA_CHECKPOINT_URL"
#: the hook :func:`run_remote_cell` gives ``qimera run``
HOOK = f"{__name__}:push_checkpoint"


@dataclass(frozen=True)
class RemoteSettings:
    """Where a worker keeps what it shares with the others (module docstring), from the
    flow run's environment (the work pool's job variables): checked once, then passed on."""

    #: ``QIMERA_REMOTE``: the cells' checkpoints and finished results; None: this disk only
    prefix: str | None = None
    #: ``QIMERA_DVC_REMOTE``: run cells as DVC experiments and push their outputs here
    dvc_remote: str | None = None
    #: ``QIMERA_DVC_EXP_REMOTE``: the git remote their experiments are pushed to
    exp_git_remote: str | None = None
    #: ``AWS_ENDPOINT_URL``: an S3-compatible store's endpoint (for the DVC remote)
    endpoint: str | None = None
    #: ``QIMERA_AWS_SECRET_BLOCK``: the Prefect Secret block with the S3 credentials
    secret_block: str | None = None

    @classmethod
    def from_env(cls, environ=None) -> "RemoteSettings":
        """Read and check the variables; a clear error names the variable and its value."""
        from stages.common import redact
        from stages.s3 import StorageError, parse_url

        env = environ if environ is not None else os.environ
        get = {name: (env.get(name) or "").strip() or None
               for name in (REMOTE_ENV, DVC_REMOTE_ENV, DVC_EXP_REMOTE_ENV, SECRET_BLOCK_ENV)}
        for name in (REMOTE_ENV, DVC_REMOTE_ENV):
            if get[name] is not None:
                try:
                    parse_url(get[name], key_required=False)
                except StorageError as exc:
                    raise StorageError(f"{name}: {exc}") from None
        if get[DVC_REMOTE_ENV] and not get[REMOTE_ENV]:
            raise StorageError(f"{DVC_REMOTE_ENV} is set but {REMOTE_ENV} is not: cells that run as DVC experiments "
                               f"in their own clones keep their checkpoints and results in {REMOTE_ENV} "
                               "(s3://bucket/prefix)")
        if get[DVC_EXP_REMOTE_ENV] and not get[DVC_REMOTE_ENV]:
            raise StorageError(f"{DVC_EXP_REMOTE_ENV}={redact(get[DVC_EXP_REMOTE_ENV])!r} needs {DVC_REMOTE_ENV} "
                               "(the DVC remote the experiments' outputs go to)")
        return cls(prefix=get[REMOTE_ENV], dvc_remote=get[DVC_REMOTE_ENV], exp_git_remote=get[DVC_EXP_REMOTE_ENV],
                   endpoint=(env.get("AWS_ENDPOINT_URL") or "").strip() or None, secret_block=get[SECRET_BLOCK_ENV])

    def use_credentials(self, environ=None) -> list[str]:
        """With :attr:`secret_block`, put the block's credentials into ``environ`` (this flow
        run's process, so the processes it starts inherit them); returns the variable
        names set, never their values. The block's value is a JSON object of
        :data:`SECRET_KEYS`; anything else is refused with the block's name."""
        if not self.secret_block:
            return []
        from prefect.blocks.system import Secret

        from stages.s3 import StorageError

        environ = environ if environ is not None else os.environ
        try:
            value = Secret.load(self.secret_block).get()
        except ValueError as exc:  # no such block
            raise StorageError(f"{SECRET_BLOCK_ENV}={self.secret_block!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(value, dict) or not value or set(value) - set(SECRET_KEYS) or not all(
                isinstance(v, str) and v for v in value.values()):
            keys = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise StorageError(f"{SECRET_BLOCK_ENV}={self.secret_block!r}: the Secret block must hold a JSON object "
                               f"of non-empty strings with keys among {', '.join(SECRET_KEYS)} (it holds {keys})")
        missing = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} - set(value)
        if missing:
            raise StorageError(f"{SECRET_BLOCK_ENV}={self.secret_block!r}: the Secret block lacks "
                               f"{', '.join(sorted(missing))}")
        environ.update(value)
        return sorted(value)

    @property
    def via_dvc(self) -> bool:
        """Whether cells run as DVC experiments of the pipeline (each flow run has its clone)."""
        return self.dvc_remote is not None


def cell_url(prefix: str, experiment: str, cell) -> str:
    """The S3 location of one cell in its configuration: ``<prefix>/runs/<experiment>/<cell
    key>`` (:attr:`qimera.experiments.Cell.key`, so that the same cell under other settings
    never takes up this one's checkpoint)."""
    from stages.s3 import join

    return join(prefix, "runs", experiment, cell.key)


def _checkpoint_files() -> tuple[str, ...]:
    """The checkpoint, then what goes with it: the history and (in the pipeline's
    ``outputs/train``) the MLflow run the resumed run reopens."""
    from stages.train import resume_files

    return resume_files()


def _has_checkpoint(url: str) -> bool:
    from stages.s3 import exists, join

    return exists(join(url, _checkpoint_files()[0]))


def restore(cell_dir: str | os.PathLike, url: str) -> bool:
    """Download the cell's checkpoint (and what goes with it) from ``url`` into
    ``cell_dir`` when ``cell_dir`` has no checkpoint and S3 has one; returns whether it did."""
    from stages.s3 import NoSuchObject, download, join

    checkpoint, *extras = _checkpoint_files()
    local = Path(cell_dir)
    if (local / checkpoint).is_file():
        return False
    try:
        download(join(url, checkpoint), local / checkpoint)
    except NoSuchObject:
        return False
    for name in extras:
        try:
            download(join(url, name), local / name)
        except NoSuchObject:
            pass  # the trainer rebuilds what it needs from the checkpoint
    return True


def push_checkpoint(record: dict) -> None:
    """The epoch hook: upload the cell's checkpoint and what goes with it (written just
    before this is called) to ``QIMERA_CHECKPOINT_URL``, the checkpoint first."""
    from stages.s3 import join, upload_file

    local, url = Path(os.environ[CHECKPOINT_DIR_ENV]), os.environ[CHECKPOINT_URL_ENV]
    for name in _checkpoint_files():
        if (local / name).is_file():
            upload_file(local / name, join(url, name))


def restore_checkpoint(checkpoint_dir) -> None:
    """The train stage's restore hook (``QIMERA_RESTORE_HOOK``): :func:`restore` from
    ``QIMERA_CHECKPOINT_URL`` into ``checkpoint_dir``, after DVC has checked out the
    baseline's outputs and before the trainer looks for a checkpoint."""
    if restore(checkpoint_dir, os.environ[CHECKPOINT_URL_ENV]):
        print(f"train: took up the checkpoint in {os.environ[CHECKPOINT_URL_ENV]}/")


def hook_env(cell_dir: str | os.PathLike, url: str) -> dict[str, str]:
    """The child's environment additions that make it push a checkpoint every epoch (and,
    in the DVC pipeline's train stage, take up the one in S3 first)."""
    from qimera.api import EPOCH_HOOK_ENV

    from stages.train import RESTORE_HOOK_ENV

    project = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
    return {EPOCH_HOOK_ENV: HOOK, RESTORE_HOOK_ENV: f"{__name__}:restore_checkpoint",
            CHECKPOINT_DIR_ENV: str(Path(cell_dir).resolve()), CHECKPOINT_URL_ENV: url, "PYTHONPATH": path}


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


def run_dvc_cell(cell, experiment: str, settings: RemoteSettings, root: str | os.PathLike, *,
                 mlflow: dict[str, str], env: dict[str, str] | None = None, log=print) -> dict:
    """Run ``cell`` as a DVC experiment of the pipeline in the clone at ``root`` (this flow
    run's own checkout), its checkpoint kept in S3 as :func:`run_remote_cell` keeps it;
    once it is finished, push its outputs to the DVC remote and its experiment to the git
    remote (``settings``), then upload its record. ``mlflow``: the ``mlflow.*`` params of
    the pipeline's run (the experiment and its parent run). Returns the cell's record."""
    from qimera.experiments import cell_record, record_cell

    from stages.common import PARAMS_FILE, TRAIN_DIR, PipelineError, load_params, redact, redact_text
    from stages.experiment_dvc import cell_sets, push_results, run_here, use_remote
    from stages.s3 import upload_dir

    root = Path(root)
    url = cell_url(settings.prefix, experiment, cell)
    if fetch_finished(cell, experiment, settings.prefix):
        log(f"{cell.id}: finished already (in {url}/)")
        return cell_record(cell)
    sets = cell_sets(cell, root, load_params(root / PARAMS_FILE), mlflow)
    use_remote(root, settings.dvc_remote, endpoint=settings.endpoint)
    if _has_checkpoint(url):  # the train stage takes it up (restore_checkpoint), after DVC's checkout
        log(f"{cell.id}: resuming from the checkpoint in {url}/")
    record = run_here(cell, root, sets, env={**(env or {}), **hook_env(root / TRAIN_DIR, url)})
    if record["status"] != "done":
        return record
    try:
        pushed = push_results(root, record["dvc_experiment"], git_remote=settings.exp_git_remote)
    except PipelineError as exc:  # the run is good but nobody could fetch it: not finished
        return record_cell(cell, "failed", returncode=record.get("returncode"), dvc_experiment=record["dvc_experiment"],
                           error=str(exc))
    log(redact_text(f"{cell.id}: {'; '.join(pushed)} ({settings.dvc_remote}"
                    f"{', ' + settings.exp_git_remote if settings.exp_git_remote else ''})"))
    exp_remote = redact(settings.exp_git_remote) if settings.exp_git_remote else None  # a name, or a URL
    record = record_cell(cell, "done", dvc_pushed=redact(settings.dvc_remote), dvc_exp_pushed=exp_remote,
                         **{k: v for k, v in record.items() if k not in ("cell", "status", "fingerprint")})
    upload_dir(cell.out_dir, url, metadata={"cell": cell.id, "experiment": experiment})
    return record
