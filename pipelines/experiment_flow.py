"""Prefect flows for experiments (experiments/*.yaml): ``qimera-experiment`` fans an
experiment's cells out as flow runs of the deployment ``qimera-cell/cell`` over the work
pool, waits for them, then writes the report and tracks it in MLflow (one parent run, a
nested child per cell: :func:`stages.experiment.tracked`).

Each cell flow run is one ordinary run of the cell's resolved config
(:func:`qimera.experiments.run_cell`: ``qimera run`` in a child process, resuming from the
cell's checkpoint), so any worker of the pool can take any cell, and the cells' results
land where ``qimera experiment run`` puts them (``runs/<experiment>/<cell>/``). A worker
that runs several cells at once gives each the least busy GPU of its
``CUDA_VISIBLE_DEVICES`` (:mod:`pipelines.gpus`). With
``QIMERA_REMOTE=s3://bucket/prefix`` in the worker's environment (a job variable of the
pool), the cell's checkpoint goes to S3 at the end of every epoch and a retried cell
resumes from it on whichever worker takes it (:mod:`pipelines.remote`); with
``QIMERA_DVC_REMOTE`` as well (``prefect.team.yaml``: each flow run in its own clone), the
cell is a DVC experiment of the pipeline, pushed to the DVC remote when it is finished. A
cell whose flow run CRASHED (its worker died, :mod:`pipelines.zombies`) is submitted again
for any worker (``cell_retries``). How many
run at once is the pool's business: the workers' ``--limit`` and the work queue's
concurrency limit (``prefect work-queue set-concurrency-limit cells J --pool qimera-pool``).
The experiment's own flow run takes a worker slot while it waits, so give the workers
one slot more than the cells should use.

A rerun of the experiment skips finished cells; the cell flow runs of one experiment flow
run carry an idempotency key, so a retried experiment flow run does not start a cell twice.
Deployments: ``prefect.yaml`` (one per experiment file, ``qimera-experiment/<name>``);
commands: ``pipelines/README.md``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import Field

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

#: the deployment the experiment flow starts for each cell (prefect.yaml)
CELL_DEPLOYMENT = "qimera-cell/cell"
#: the work queue the cell flow runs go to (its concurrency limit caps the cells at once)
CELL_QUEUE = "cells"
_FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
Seeds = Annotated[Optional[int], Field(ge=1, le=100)]


class CellFailed(RuntimeError):
    """The cell's run failed; its ``cell.json`` says how."""


def _load(experiment: str, seeds: int | None, overrides: list[str]):
    from qimera.experiments import load_experiment

    return load_experiment(experiment, seeds=seeds, overrides=tuple(overrides))


@flow(name="qimera-cell", persist_result=True)
def cell_flow(experiment: str, cell: str, seeds: Seeds = None, overrides: list[str] | None = None,
              threads: Optional[int] = None, mlflow_parent: Optional[str] = None) -> dict[str, Any]:
    """Run one cell of an experiment file (skipped when it is finished already).

    Args:
        experiment: the experiment file, relative to the project directory.
        cell: the cell's id (``runs/<experiment>/<cell>/``).
        seeds, overrides: as given to the experiment (they change which cells there are).
        threads: ``OMP_NUM_THREADS`` for the run unless the worker's environment sets it.
        mlflow_parent: the experiment's MLflow parent run; a cell run as a DVC experiment
            (``QIMERA_DVC_REMOTE``) logs its pipeline run as that run's child.
    """
    from qimera.experiments import cell_top1, is_done, run_cell

    logger = get_run_logger()
    exp = _load(experiment, seeds, overrides or [])
    match = [c for c in exp.cells if c.id == cell]
    if not match:
        raise ValueError(f"cell {cell!r} is not a cell of {experiment} (cells: {', '.join(c.id for c in exp.cells)})")
    target = match[0]
    from pipelines.gpus import gpu_slot
    from pipelines.remote import RemoteSettings, run_dvc_cell, run_remote_cell

    remote = RemoteSettings.from_env()
    remote.use_credentials()
    prefix = remote.prefix
    if is_done(target):
        logger.info("%s: finished already", target.id)
    else:
        if threads and not os.environ.get("OMP_NUM_THREADS"):
            os.environ["OMP_NUM_THREADS"] = str(threads)  # for the DVC stages (run_cell sets its own)
        with gpu_slot() as gpu:  # the least busy of the worker's GPUs (pipelines/gpus.py)
            logger.info("%s: running %s%s%s", target.id,
                        f"as DVC experiment in {Path.cwd()}" if remote.via_dvc else target.out_dir,
                        f" on GPU {gpu['CUDA_VISIBLE_DEVICES']}" if gpu else "",
                        f" (checkpoint kept in {prefix})" if prefix else "")
            if remote.via_dvc:
                record = run_dvc_cell(target, exp.spec.name, remote, Path.cwd(), env=gpu, log=logger.info,
                                      mlflow={"experiment": exp.spec.name, "parent_run": mlflow_parent})
            elif prefix:
                record = run_remote_cell(target, exp.spec.name, prefix, threads=threads, env=gpu, log=logger.info)
            else:
                record = run_cell(target, threads=threads, env=gpu)
        if record["status"] != "done":
            raise CellFailed(f"{target.id}: exit {record.get('returncode')}: {record.get('error')}")
    top1 = cell_top1(target)
    logger.info("%s: student top-1 %s", target.id, top1)
    return {"cell": target.id, "student_top1": top1, "out_dir": str(target.out_dir)}


def _wait(runs: dict[str, Any], poll_seconds: float, logger,
          resubmit: Callable[[str], Any] | None = None) -> dict[str, str]:
    """Poll the cell flow runs until each is in a final state; returns cell id -> state type.

    A run that ends CRASHED (its worker or machine died: Prefect marks it so when its
    heartbeats stop, ``python -m pipelines.zombies``) is handed to ``resubmit(cell id)``,
    which returns a new flow run of the cell for any worker to take, or None when the
    cell has no retry left; ``runs`` is updated in place."""
    from prefect.client.orchestration import get_client

    states: dict[str, str] = {}
    waiting_since = time.monotonic()
    warned = False
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            started = False
            for cell_id, run in list(runs.items()):
                if cell_id in states:
                    continue
                state = client.read_flow_run(run.id).state
                kind = state.type.value if state else "SCHEDULED"
                started |= kind not in ("SCHEDULED", "PENDING")
                if kind == "CRASHED" and resubmit is not None:
                    again = resubmit(cell_id)
                    if again is not None:
                        logger.warning("cell %s: flow run %s CRASHED (%s); retried as flow run %s on any worker",
                                       cell_id, run.id, (state.message or "").strip()[:200], again.id)
                        runs[cell_id] = again
                        continue
                if kind in _FINAL:
                    states[cell_id] = kind
                    logger.info("cell %s: %s (%d of %d ended)", cell_id, kind, len(states), len(runs))
            if started or states:
                waiting_since = time.monotonic()
            elif not warned and time.monotonic() - waiting_since > 120:
                logger.warning("no cell flow run has started for 2 minutes: is a worker of the pool polling with a "
                               "free slot? (this flow run holds one slot itself)")
                warned = True
            if len(states) < len(runs):
                time.sleep(poll_seconds)
    return states


def check_dvc_cells(cells, root: Path, environ=None) -> None:
    """Before any cell starts, when the cells are to run as DVC experiments in their own
    clones (``QIMERA_DVC_REMOTE``): MLflow must be a server every machine reaches, and the
    pipeline must be able to run each cell's config (:func:`stages.experiment_dvc.cell_params`)."""
    from pipelines.remote import DVC_REMOTE_ENV
    from stages.common import PARAMS_FILE, load_params
    from stages.experiment_dvc import cell_params
    from stages.tracking import redact

    uri = (environ if environ is not None else os.environ).get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
        raise ValueError(f"{DVC_REMOTE_ENV} is set (each cell runs in its own clone, on any machine), but "
                         f"MLFLOW_TRACKING_URI={redact(uri)!r} is not a tracking server they all reach: set it to "
                         "http://host:port (a job variable of the pool, pipelines/README.md)")
    params = load_params(root / PARAMS_FILE)
    for cell in cells:
        cell_params(cell, params, root)


@flow(name="qimera-experiment", persist_result=True)
def experiment_flow(experiment: str, seeds: Seeds = None, overrides: list[str] | None = None,
                    threads: Optional[int] = None, poll_seconds: Annotated[float, Field(gt=0, le=300)] = 5.0,
                    cell_retries: Annotated[int, Field(ge=0, le=10)] = 2) -> dict[str, Any]:
    """Run an experiment file's grid as one flow run per cell over the work pool.

    Args:
        experiment: the experiment file, relative to the project directory
            (``experiments/table8.yaml``).
        seeds: run seeds 1..N instead of the file's.
        overrides: ``section.key=value`` settings for every cell (``qimera experiment run --set``).
        threads: ``OMP_NUM_THREADS`` for each cell's run (default: the worker's setting,
            else all its cores).
        poll_seconds: how often the cell flow runs' states are read.
        cell_retries: how many times a cell whose flow run CRASHED (its worker died) is
            submitted again, for any worker; it resumes from its checkpoint in S3 when
            ``QIMERA_REMOTE`` is set. A cell that FAILED (its run exited with an error)
            is not retried: rerun the experiment for that.
    """
    from prefect.deployments import run_deployment

    from qimera.experiments import is_done

    from stages.experiment import tracked

    logger = get_run_logger()
    overrides = list(overrides or [])
    if not (Path.cwd() / experiment).is_file():
        raise FileNotFoundError(f"experiment={experiment!r}: no such file in {Path.cwd()} (the deployment's working "
                                "directory must be the qimera project: run `prefect deploy` from the repository root)")
    from pipelines.remote import RemoteSettings, fetch_finished

    exp = _load(experiment, seeds, overrides)  # every cell validated before any flow run starts
    remote = RemoteSettings.from_env()
    remote.use_credentials()
    prefix = remote.prefix

    def finished(cell) -> bool:  # on this disk, or (with QIMERA_REMOTE) finished by any worker
        return fetch_finished(cell, exp.spec.name, prefix) if prefix else is_done(cell)

    todo = [c for c in exp.cells if not finished(c)]
    if remote.via_dvc:
        check_dvc_cells(todo, Path.cwd())
    logger.info("experiment %s: %d cells, %d finished already, %d to run as %s flow runs", exp.spec.name,
                len(exp.cells), len(exp.cells) - len(todo), len(todo), CELL_DEPLOYMENT)
    me = str(flow_run.id) if flow_run.id else f"local-{os.getpid()}"

    def run_cells(parent: str) -> dict[str, int]:
        attempts: dict[str, int] = {}

        def submit(cell_id: str):
            attempt = attempts.get(cell_id, -1) + 1
            if attempt > cell_retries:
                return None
            attempts[cell_id] = attempt
            again = f" (retry {attempt})" if attempt else ""
            return run_deployment(
                CELL_DEPLOYMENT, timeout=0, work_queue_name=CELL_QUEUE,
                flow_run_name=f"{exp.spec.name}/{cell_id}{again}",
                idempotency_key=f"{me}:{cell_id}" + (f":retry-{attempt}" if attempt else ""),
                tags=["qimera", f"experiment:{exp.spec.name}"],
                parameters={"experiment": experiment, "cell": cell_id, "seeds": seeds, "overrides": overrides,
                            "threads": threads, "mlflow_parent": parent})

        runs = {cell.id: submit(cell.id) for cell in todo}
        states = _wait(runs, poll_seconds, logger, resubmit=submit)
        if prefix:  # the report is built from what the workers left in S3, not from their disks
            for cell in todo:
                if states.get(cell.id) == "COMPLETED" and not finished(cell):
                    states[cell.id] = "FAILED"
                    logger.error("cell %s: its flow run completed but %s holds no finished cell", cell.id, prefix)
        failed = [c for c, s in states.items() if s != "COMPLETED"]
        for cell_id in failed:
            logger.error("cell %s ended %s (flow run %s)", cell_id, states[cell_id], runs[cell_id].id)
        return {"failed": len(failed), "done": len(states) - len(failed), "pending": 0}

    out = tracked(exp, experiment, run_cells)
    table = out["paths"]["md"].read_text()
    create_markdown_artifact(key=f"experiment-{exp.spec.name}".lower().replace("_", "-").replace(".", "-"),
                             markdown=f"{table}\n\nThe cells in the MLflow UI: {out['url']}\n",
                             description=f"The report of {experiment}")
    result = {"experiment": exp.spec.name, "cells": len(exp.cells), "ran": len(todo), **out["counts"],
              "report": str(out["paths"]["md"]), "mlflow_parent_run": out["parent"], "mlflow_url": out["url"]}
    if out["counts"]["failed"]:
        raise CellFailed(f"experiment {exp.spec.name}: {out['counts']['failed']} cell(s) failed; the report has "
                         f"the others ({out['paths']['md']}); rerun to retry them")
    return result
