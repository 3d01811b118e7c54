"""MLflow tracking for the pipeline: one run per pipeline execution.

``train`` creates the run (or, after a kill, reopens the run it had started) and stores
its id in ``outputs/train/mlflow_run.json``; ``evaluate`` and ``export`` log into the same
run by id, and ``export`` closes it. The store is ``MLFLOW_TRACKING_URI`` when set, else
``mlflow.tracking_uri`` from params.yaml, else one SQLite file at the repository root,
``sqlite:////<abs root>/mlflow.db``, addressed by an absolute path so that queued DVC
experiments (which run in a temporary copy) log to the same file. Experiments created in
a SQLite store keep their artifacts next to it, in ``mlartifacts/``. :func:`connect`
creates or upgrades a SQLite store under an exclusive lock on ``<db>.lock`` beside it,
so that parallel stages (queued experiments) may open a new store at once.

Run status says who holds the run:

``RUNNING``
    a live process is working on it right now: :func:`claim` sets it and tags the run
    with that process (``qimera.pid``, ``qimera.pid_start``, ``qimera.host``) and the
    repository root (``qimera.workspace``);
``SCHEDULED``
    waiting for the next stage: ``train`` and ``evaluate`` end with :func:`hand_over`;
``FINISHED``
    ``export`` published the model;
``KILLED`` / ``FAILED``
    a stage was interrupted (Ctrl-C, SIGTERM, SIGHUP) or failed (:func:`fail`). A process
    that cannot act any more (SIGKILL, power loss) leaves its run RUNNING; the next stage
    started in this workspace on this host finds it (:func:`reap_dead_runs`: its process
    is gone) and marks it KILLED. A rerun of ``train`` reopens a KILLED or FAILED run
    when it resumes from the checkpoint, and starts a new run when it starts over.

:func:`outage_message` turns a tracking server that stopped answering in the middle of a
stage into one line (``run_stage`` prints it, exit status 1).

All MLflow imports stay in this module (the ``qimera`` library has none).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from qimera.trainer import AVERAGING_KEYS, EPOCH_DIAGNOSTICS, FAKE_QUANT_KEY

from .common import MLFLOW_RUN, PipelineError, bits_tag, read_json, redact, redact_text, repo_root, write_json

#: per-epoch record keys logged as MLflow metrics (step = epoch)
EPOCH_METRICS = ("loss_g", "loss_g_ce", "loss_g_bns", "loss_s", "top1", "top5", "iters_per_second",
                 *EPOCH_DIAGNOSTICS, *AVERAGING_KEYS, FAKE_QUANT_KEY)
_SECRET = re.compile(r"(?i)(secret|passw|token|credential|api[_-]?key|access[_-]?key|auth)")
_ACTIVE = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


def tracking_uri(params: dict | None = None, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` > params ``mlflow.tracking_uri`` > ``sqlite:///<root>/mlflow.db``.

    A relative SQLite path is taken relative to the repository root, so that it means the
    same file inside a queued experiment's temporary copy.
    """
    root = Path(root) if root is not None else repo_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or ((params or {}).get("mlflow") or {}).get("tracking_uri")
    if not uri:
        return f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri or uri.startswith("file:"):
        raise PipelineError(
            f"MLflow tracking URI {redact(uri)!r}: MLflow 3 has no plain file store; use a database URI such as "
            f"sqlite:///{root / 'mlflow.db'} or a server URL (http://host:5000)"
        )
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact root of a new experiment: ``mlartifacts/<experiment>`` beside a SQLite file
    (absolute, so runs from queued experiments' temporary copies land there too); the
    server's choice otherwise."""
    if uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///"):])
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
        return (db.parent / "mlartifacts" / safe).as_uri()
    return None


def _errno_text(text: str) -> str | None:
    """``[Errno 111] Connection refused`` out of a wrapped network error's text."""
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return errno.group(0).strip() if errno else None


@contextmanager
def _fail_fast():
    """One HTTP attempt with a 10 s timeout (unless the user configured otherwise)."""
    saved = {}
    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        if key not in os.environ:
            saved[key] = None
            os.environ[key] = value
    try:
        yield
    finally:
        for key in saved:
            os.environ.pop(key, None)


#: how long :func:`connect` waits for another process that is creating or upgrading a store
STORE_LOCK_TIMEOUT = 300.0
#: the store the last :func:`connect` opened (for :func:`outage_message`)
_connected_uri: str | None = None


@contextmanager
def _store_lock(db: Path, uri: str, timeout: float = STORE_LOCK_TIMEOUT):
    """An exclusive ``flock`` on ``<db>.lock`` (created when missing): MLflow creates or
    upgrades a SQLite store's schema when a client first touches it, and two processes
    doing that at once fail (``duplicate column name``, ``table ... already exists``)."""
    import fcntl

    lock = db.with_name(db.name + ".lock")
    try:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: flock needs no write access
            fd = os.open(lock, os.O_RDONLY)
    except OSError as exc:
        raise PipelineError(f"MLflow store {redact(uri)}: cannot create its lock file {lock} ({exc.strerror})") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"MLflow store {redact(uri)}: another process has held {lock} for {timeout:.0f} s (creating "
                        "or upgrading the store); wait for it to finish, or stop it") from None
                time.sleep(0.05)
            except OSError:  # a file system without flock: go on unlocked
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _sqlite_reason(exc: BaseException) -> str:
    """What really failed in a SQLite store: the sqlite3 error, else the first line."""
    import sqlite3

    from qimera.runtime import exception_chain

    for cause in exception_chain(exc):
        if isinstance(cause, sqlite3.Error):
            return f"{type(cause).__module__}.{type(cause).__name__}: {cause}"
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:500]


def connect(uri: str):
    """An ``MlflowClient`` for ``uri`` after proving the store answers; PipelineError if not.

    A SQLite store is created or upgraded (MLflow does that on first use) under an
    exclusive lock on ``<db>.lock``, so that several stages may open a new store at once.
    """
    global _connected_uri
    from mlflow.tracking import MlflowClient

    # MLflow draws a progress bar for every artifact download (the export stage verifies the
    # registered model by downloading it): one line per stage is enough. Set it to true to
    # see them again.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    if uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise PipelineError(f"MLflow store {redact(uri)}: directory {db.parent} does not exist or is not writable")
        try:
            with _store_lock(db, uri):
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)  # the registry's tables too
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means "not usable"
            reason = redact_text(_sqlite_reason(exc))  # (cut to 500 characters of a message without URIs)
            remedy = (f"back the file up, then run `mlflow db upgrade {redact(uri)}`" if "mlflow db upgrade" in reason
                      else "repair the file or move it away (a missing file is created as a new store)")
            raise PipelineError(
                f"MLflow store {redact(uri)} (SQLite file {db}) cannot be opened: {reason.rstrip('.')}. To fix: "
                f"{remedy}, or point MLFLOW_TRACKING_URI (or mlflow.tracking_uri in params.yaml) at another store"
            ) from None
        _connected_uri = uri
        return client
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _fail_fast():
            client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not usable"
        text = redact_text(str(exc))  # before any cut, which could leave half a token unrecognised
        reason = _errno_text(text) or (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PipelineError(
            f"MLflow tracking store {redact(uri)!r} is not usable: {reason}. Start the server, fix "
            "MLFLOW_TRACKING_URI (or mlflow.tracking_uri in params.yaml), or unset it to use the local "
            "sqlite:///<repository root>/mlflow.db"
        ) from None
    _connected_uri = uri
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """The id of the experiment ``name`` (created, or restored when deleted), tagged as
    model training (:func:`mark_training`)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location(uri, name))
        except Exception:  # noqa: BLE001 - created concurrently by a parallel queue worker
            if client.get_experiment_by_name(name) is None:
                raise
        exp = client.get_experiment_by_name(name)
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    mark_training(client, exp)
    return exp.experiment_id


def experiment_name(params: dict, cfg) -> str:
    return ((params.get("mlflow") or {}).get("experiment")) or cfg.preset


#: the tag that names an experiment cell's run (also on the child runs stages.experiment makes)
CELL_TAG = "qimera.cell"


def nesting_tags(params: dict) -> dict[str, str]:
    """Tags that make the pipeline's run a cell of an experiment: ``mlflow.parent_run``
    (the experiment's parent run, so the MLflow UI nests it) and ``mlflow.cell`` (the cell
    id), both set by ``python -m stages.experiment --via dvc`` for each queued cell."""
    section = params.get("mlflow") or {}
    tags = {}
    if section.get("parent_run"):
        tags["mlflow.parentRunId"] = str(section["parent_run"])
    if section.get("cell"):
        tags[CELL_TAG] = str(section["cell"])
    return tags


# --------------------------------------------------------------------------- the MLflow UI

#: the query parameter that opens MLflow 3's model-training pages of an experiment (its runs,
#: models and traces) rather than its GenAI overview. MLflow 3.17's UI chooses between the
#: two from this parameter, then from the browser's last choice, and defaults to GenAI; it
#: does not read the experiment's kind tag for that (seen in headless Chromium: an
#: experiment tagged as model training still opened on the overview), so every link this
#: project prints carries it (tests/pipeline/test_mlflow_ui.py opens them).
UI_TRAINING_VIEW = "workflowType=machine_learning"
#: the experiment tag, and its value, that MLflow's UI itself writes when a user declares an
#: experiment as model training; the UI's experiment-kind selector shows it. Set on every
#: experiment this project creates, for the UIs that go by it; the links do not rely on it.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
#: where ``mlflow ui`` and ``mlflow server`` listen unless told otherwise
DEFAULT_UI = "http://127.0.0.1:5000"
#: prefix of the experiment tags that hold the UI's shared views (its *Share* button makes
#: them; a link with ``viewStateShareKey=<key>`` opens one)
SHARED_VIEW_TAG = "mlflow.sharedViewState."
#: the note (description) of a run or an experiment, as the UI shows and edits it
NOTE_TAG = "mlflow.note.content"


def ui_base(uri: str) -> str:
    """The address of the UI that shows the store ``uri``: the tracking server itself, or
    for a database file the ``mlflow ui`` started on it (:func:`ui_command`)."""
    if uri.startswith(("http://", "https://")):
        return redact(uri).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return DEFAULT_UI


def mlflow_executable() -> str:
    """How to call the ``mlflow`` of this interpreter's environment from the current
    directory: ``mlflow`` when that is the one on PATH, else its path (``.venv/bin/mlflow``
    after ``make demo``, which does not put the virtualenv on the user's PATH)."""
    import shutil

    exe = Path(sys.executable).parent / "mlflow"
    if not exe.is_file() or shutil.which("mlflow") == str(exe):
        return "mlflow"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def ui_command(uri: str) -> str | None:
    """The command that serves a database store in the UI (None for a tracking server)."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"{mlflow_executable()} ui --backend-store-uri {redact(uri)}"


def experiment_url(uri: str, experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs in the UI's model-training view; ``view``: a shared view's key
    (:func:`share_view`)."""
    url = f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{UI_TRAINING_VIEW}"
    return f"{url}&viewStateShareKey={urllib.parse.quote(view)}" if view else url


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """One run's page (its parameters, metrics, artifacts) in the model-training view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{UI_TRAINING_VIEW}"


def where_to_open(uri: str, url: str) -> str:
    """``open <url>``, after the command that serves the store when it is a file."""
    command = ui_command(uri)
    return f"`{command}`, then open {url}" if command else f"open {url}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


#: the runs table's sort key, and its column, of the run name
RUN_NAME_SORT, RUN_NAME_COLUMN = "tags.`mlflow.runName`", "attributes.`Run Name`"


def share_view(client, experiment_id: str, key: str, *, search: str, params: Iterable[str] = (),
               metrics: Iterable[str] = (), order_by: str = RUN_NAME_SORT, name_width: int = 260) -> str:
    """Store a shared view of the experiment's runs table (an experiment tag, as the UI's
    *Share* button writes one) and return its key for :func:`experiment_url`: the runs
    that match ``search`` (an MLflow search filter), ordered by ``order_by``, with the
    ``metrics`` and ``params`` as the first columns, the run names ``name_width`` pixels
    wide (cell names are long). The UI does not share which parent runs are expanded, so a
    view of an experiment's cells searches for its children, which it then lists flat."""
    state = {"searchFilter": search, "orderByKey": order_by, "orderByAsc": True, "startTime": "ALL",
             "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
             "selectedColumns": [*(_column("metrics", m) for m in metrics), *(_column("params", p) for p in params)],
             # the UI applies a width only to a column that the order names
             "columnOrder": [RUN_NAME_COLUMN], "columnWidths": {RUN_NAME_COLUMN: name_width},
             "runsHiddenMode": "SHOW_ALL"}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(state))
    return key


def mark_training(client, experiment) -> None:
    """Tag ``experiment`` (an MLflow Experiment) as model training, and give it a note, where
    neither was set: a kind or a note the user chose stays."""
    tags = experiment.tags or {}
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    if NOTE_TAG not in tags:
        client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, (
            "Runs of the qimera data-free quantization pipeline. A pipeline run (train, evaluate, export) has the "
            "student's top-1 (student_top1) and its exports. An experiment file's execution is a parent run with the "
            "report (report/report.md) and one child run per cell, named after the cell (grid, method, bits, axis "
            "values, seed: digits-qimera-w2a2-seed1), with the params method, bits and seed."))


# --------------------------------------------------------------------------- params and tags


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 2}}`` -> ``{"train.epochs": "2"}``; secret-looking keys dropped."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if _SECRET.search(str(key)):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def git_commit(cwd: str | os.PathLike = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return os.environ.get("DVC_EXP_BASELINE_REV") or None


def prefect_flow_run_id() -> str | None:
    """The Prefect flow run that started this pipeline, if any (env, or Prefect's runtime
    when Prefect is already imported in this process; never imported here)."""
    value = os.environ.get("PREFECT__FLOW_RUN_ID")
    if value:
        return value
    import sys

    if "prefect.runtime" in sys.modules:  # pragma: no cover - stages run as subprocesses
        try:
            return sys.modules["prefect.runtime"].flow_run.id
        except Exception:  # noqa: BLE001
            return None
    return None


def torch_threads() -> int:
    """torch's intra-op threads: CPU results depend on it (the order of float sums)."""
    import torch

    return torch.get_num_threads()


def device_tag(device) -> str:
    import torch

    text = str(device)
    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        text += f" ({torch.cuda.get_device_name(device)})"
    return text


def run_tags(cfg, device, extra: dict | None = None) -> dict[str, str]:
    tags = {
        "preset": cfg.preset or "",
        "method": cfg.method,
        "bits": bits_tag(cfg),
        "device": device_tag(device),
        "torch_threads": str(torch_threads()),
        "mlflow.source.name": "dvc.yaml",
        "mlflow.source.type": "JOB",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    tags.update(extra or {})
    return tags


def run_name(cfg, params: dict | None = None) -> str:
    """The pipeline run's name: the experiment cell it runs (params ``mlflow.cell``, set for
    a queued cell), else ``<preset>-w<bits>a<bits>`` and the DVC experiment's name."""
    cell = ((params or {}).get("mlflow") or {}).get("cell")
    if cell:
        return str(cell)
    name = f"{cfg.preset}-{bits_tag(cfg)}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{name}-{exp}" if exp else name


# --------------------------------------------------------------------------- logging


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(client, run_id: str, values: dict[str, Any], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, step) for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_epoch(client, run_id: str, record: dict) -> None:
    log_metrics(client, run_id, {k: record.get(k) for k in EPOCH_METRICS if k in record}, step=int(record["epoch"]))


def log_missing_epochs(client, run_id: str, history: Iterable[dict]) -> None:
    """Log the epochs of ``history`` that the run does not have yet (after a resume)."""
    logged = {m.step for m in client.get_metric_history(run_id, "loss_g")}
    for record in history:
        if int(record["epoch"]) not in logged:
            log_epoch(client, run_id, record)


# --------------------------------------------------------------------------- the run


def open_run(client, uri: str, exp_name: str, cfg, *, resume: bool, tags: dict, name: str) -> str:
    """The run of this pipeline execution.

    With ``resume`` (train continues from its checkpoint) the run recorded in
    ``outputs/train/mlflow_run.json`` is reopened when it exists in this store and was not
    finished; otherwise a new run is created in ``exp_name``. Either way the run is
    RUNNING and claimed by this process (:func:`claim`) when this returns.
    """
    exp_id = experiment_id(client, exp_name, uri)
    if resume and MLFLOW_RUN.is_file():
        try:
            info = read_json(MLFLOW_RUN)
            run = client.get_run(info["run_id"])
            if (info.get("tracking_uri") == redact(uri) and run.info.experiment_id == exp_id
                    and run.info.status in _ACTIVE and run.info.lifecycle_stage == "active"):
                claim(client, run.info.run_id)
                return run.info.run_id
        except Exception:  # noqa: BLE001 - unknown or deleted run: start a new one
            pass
    run = client.create_run(exp_id, tags={**tags, **claim_tags()}, run_name=name)
    write_json(MLFLOW_RUN, {"run_id": run.info.run_id, "experiment_id": exp_id,
                            "experiment_name": exp_name, "tracking_uri": redact(uri)})
    return run.info.run_id


def current_run(client, uri: str, exp_name: str, cfg, tags: dict) -> str:
    """The run ``train`` started (evaluate/export). If this store does not know it (e.g.
    the train outputs came from another store), a new run is created and tagged so."""
    info = read_json(MLFLOW_RUN) if MLFLOW_RUN.is_file() else {}
    try:
        run = client.get_run(info["run_id"])
        if run.info.lifecycle_stage == "active":
            return run.info.run_id
    except Exception:  # noqa: BLE001
        pass
    exp_id = experiment_id(client, exp_name, uri)
    run = client.create_run(exp_id, tags={**tags, **claim_tags(), "qimera.note": "train ran against another MLflow store"},
                            run_name=run_name(cfg))
    return run.info.run_id


def terminate(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status=status)
    except Exception:  # noqa: BLE001 - best effort while failing
        pass


# --------------------------------------------------------------------------- who holds the run

#: run tags that name the process working on a RUNNING run (see :func:`claim`)
PID_TAG, PID_START_TAG, HOST_TAG, WORKSPACE_TAG = "qimera.pid", "qimera.pid_start", "qimera.host", "qimera.workspace"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _host() -> str:
    import socket

    return socket.gethostname()


def claim_tags() -> dict[str, str]:
    """The tags that say this process, on this host, in this workspace, holds a run."""
    stat = _proc_stat(os.getpid())
    return {PID_TAG: str(os.getpid()), PID_START_TAG: stat[1] if stat else "", HOST_TAG: _host(),
            WORKSPACE_TAG: str(repo_root())}


def claim(client, run_id: str) -> None:
    """Mark the run RUNNING, held by this process: a stage calls it before it works on the
    run (``open_run`` does it for ``train``). The tags come first, so that the run is never
    RUNNING under a dead process's name (which :func:`reap_dead_runs` would mark KILLED)."""
    log_tags(client, run_id, claim_tags())
    client.update_run(run_id, status="RUNNING")


def hand_over(client, run_id: str) -> None:
    """The stage is done with the run and the next one may take it: status SCHEDULED."""
    client.update_run(run_id, status="SCHEDULED")


def interrupted(exc: BaseException) -> bool:
    """Ctrl-C, or SIGTERM/SIGHUP as ``run_stage`` raises them (both KeyboardInterrupt)."""
    return isinstance(exc, KeyboardInterrupt)


def fail(client, run_id: str, exc: BaseException) -> None:
    """Close the run because the stage is ending with ``exc``: KILLED when it was
    interrupted (Ctrl-C, SIGTERM, SIGHUP), FAILED for an error. Best effort, one attempt
    (the store may be what failed)."""
    with _fail_fast():
        terminate(client, run_id, "KILLED" if interrupted(exc) else "FAILED")


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start`` clock ticks, when known) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):  # exited, not yet waited for
        return False
    return not start or started == start  # another process that got the same pid


def reap_dead_runs(client) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this workspace on this host that
    is gone (SIGKILL, a crash, power loss); returns their ids. One search over the active
    experiments, best effort: a failure prints a warning and reaps nothing."""
    from mlflow.entities import ViewType

    workspace, host = str(repo_root()), _host()
    query = f"attributes.status = 'RUNNING' and tags.\"{HOST_TAG}\" = '{host}'"
    if "'" not in workspace and "\\" not in workspace:
        query += f" and tags.\"{WORKSPACE_TAG}\" = '{workspace}'"
    reaped = []
    try:
        exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs = client.search_runs(exp_ids, query, max_results=1000) if exp_ids else []
        for run in runs:
            tags = run.data.tags
            pid = tags.get(PID_TAG, "")
            if tags.get(WORKSPACE_TAG) != workspace or not pid.isdigit() or _alive(int(pid), tags.get(PID_START_TAG)):
                continue
            fresh = client.get_run(run.info.run_id)  # not claimed again meanwhile
            if fresh.info.status != "RUNNING" or fresh.data.tags.get(PID_TAG) != pid:
                continue
            client.set_terminated(run.info.run_id, status="KILLED")
            reaped.append(run.info.run_id)
            print(f"MLflow run {run.info.run_id} was left RUNNING by process {pid}, which is gone: marked KILLED")
    except Exception as exc:  # noqa: BLE001 - reaping is housekeeping; the stage goes on
        print(f"warning: could not look for MLflow runs left RUNNING by dead processes: {exc}".splitlines()[0],
              file=sys.stderr)
    return reaped


# --------------------------------------------------------------------------- server outage


def _same_server(url: str, uri: str) -> bool:
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(uri)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def _server_failure(exc: BaseException, uri: str) -> BaseException | None:
    """The ``requests`` connection error or timeout in ``exc``'s chain that a request to
    the tracking server ``uri`` raised, if any."""
    requests = sys.modules.get("requests")
    if requests is None:
        return None
    from qimera.runtime import exception_chain

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    api_url = None
    for cause in exception_chain(exc):
        found = re.search(r"API request to (\S+?://[^/\s]+)", str(cause))
        api_url = api_url or (found.group(1) if found else None)
        if isinstance(cause, kinds):
            url = getattr(getattr(cause, "request", None), "url", None) or api_url
            return cause if url and _same_server(url, uri) else None
    return None


def outage_message(exc: BaseException, stage: str) -> str | None:
    """One line for the tracking server (the one :func:`connect` opened) that stopped
    answering while ``stage`` ran, or for the SQLite store that became unreadable
    (:func:`_damaged_store`), or None when ``exc`` is something else."""
    uri = _connected_uri
    if uri and uri.startswith("sqlite:"):
        return _damaged_store(exc, uri, stage)
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    failure = _server_failure(exc, uri)
    if failure is None:
        return None
    text = redact_text(str(failure))
    detail = _errno_text(text) or re.sub(r"^\w*ConnectionPool\([^)]*\):\s*", "", text)
    detail = (detail.strip().splitlines() or [""])[0][:200]
    reason = f"{type(failure).__name__}: {detail}" if detail else type(failure).__name__
    remedy = ("training resumes from the last checkpoint when you rerun once it is back" if stage == "train"
              else "rerun once it is back")
    return f"the MLflow tracking server {redact(uri)} stopped answering ({reason}); {remedy}"


def _damaged_store(exc: BaseException, uri: str, stage: str) -> str | None:
    """One line for the SQLite MLflow store ``uri`` that was overwritten or damaged while
    ``stage`` ran (sqlite3's DatabaseError in ``exc``'s chain), or None."""
    import sqlite3

    from qimera.runtime import exception_chain

    damage = ("not a database", "malformed", "no such table")  # not "database is locked": that passes
    failure = next((c for c in exception_chain(exc) if isinstance(c, sqlite3.DatabaseError)
                    and any(d in str(c) for d in damage)), None)
    if failure is None:
        return None
    detail = (str(failure).strip().splitlines() or [""])[0][:120]
    remedy = ("training resumes from the last checkpoint when you rerun" if stage == "train" else "then rerun")
    return (f"the MLflow store {redact(uri)} became unreadable while the {stage} stage ran ({type(failure).__name__}: "
            f"{detail}): it was overwritten or damaged; restore it from a copy, or set MLFLOW_TRACKING_URI to another "
            f"store (a new one starts empty); {remedy}")


class TrainedRun:
    """What the stages after ``train`` start from: the resolved config, the workspace
    teacher (and evaluation data when asked), the final checkpoint and the open MLflow run.
    The checkpoint is checked first (:func:`stages.common.trained_checkpoint`: readable,
    of this config, teacher, embedding table and library, finished), before the store is
    touched or anything is written. Opening the store also marks KILLED the runs that dead
    processes left RUNNING (:func:`reap_dead_runs`); the stage then takes the run with
    :func:`claim`."""

    def __init__(self, *, with_data: bool):
        from qimera.api import prepare

        from qimera.trainer import CHECKPOINT_NAME

        from .common import (TRAIN_DIR, load_params, load_run_config, require, root_relative, trained_checkpoint,
                             workspace_teacher_config)

        self.root = repo_root()
        self.params = load_params()
        self.cfg = load_run_config()
        require(TRAIN_DIR / CHECKPOINT_NAME, "train")  # before the store or the teacher is touched
        self.prep = prepare(workspace_teacher_config(self.cfg), with_data=with_data)
        self.state = trained_checkpoint(self.cfg, self.prep.teacher, self.root)
        self.uri = tracking_uri(self.params, self.root)
        self.client = connect(self.uri)
        reap_dead_runs(self.client)
        #: the config with paths made relative to the repository root (for model building)
        self.root_cfg = root_relative(self.cfg, self.root)
        self.run_id = current_run(self.client, self.uri, experiment_name(self.params, self.cfg), self.cfg,
                                  run_tags(self.cfg, self.prep.device))

    def student(self):
        """The final epoch's fake-quantized student (its weight average when the run
        averaged), ranges frozen, in eval mode (on CPU)."""
        from qimera.parts import deployed_student_state
        from qimera.quant import build_student, set_calibrating

        student = build_student(self.root_cfg, self.prep.teacher).cpu()
        student.load_state_dict(deployed_student_state(self.state))
        set_calibrating(student, False)
        return student.eval()
