"""An experiment (experiments/*.yaml) run and tracked in MLflow: one parent run per
experiment, one nested child run per cell, so that the MLflow UI compares the cells side
by side. The report (report.md, report.csv, report.png) is an artifact of the parent.

    python -m stages.experiment experiments/demo-grid.yaml [--jobs J] [--seeds N] [--set key=value ...]
                                [--via local|dvc] [--queue-only]

``--via local`` (the default): the cells are run by the library
(:func:`qimera.experiments.run_experiment`: skips the finished ones, resumes the
half-finished ones); afterwards every finished cell is logged as a child run from the
files it left (its resolved config, history.jsonl, summary.json).

``--via dvc``: every unfinished cell is queued as a DVC experiment of the pipeline
(:mod:`stages.experiment_dvc`), the queue is run with ``J`` workers (``dvc exp run
--run-all -j J``), and each successful experiment's metrics are recorded in the cell's
directory. Each cell's pipeline run is itself the child run (the stages tag it with the
parent, params ``mlflow.parent_run`` and ``mlflow.cell``). ``--queue-only`` stops after
queueing: start the queue yourself (``dvc queue start -j J``) and rerun the command to
collect the results; cells still queued or running are not queued twice.

Logging is idempotent: a cell already logged under this parent (tag ``qimera.cell``) is
updated, not duplicated. The store is chosen as for the pipeline
(:func:`stages.tracking.tracking_uri`); the MLflow experiment is named after the
experiment file's ``name``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .common import repo_root, run_stage
from . import tracking

PARENT_TAG = "qimera.experiment"
CELL_TAG = tracking.CELL_TAG


#: the metric every cell's run carries for the report's entries: the final epoch's top-1 (%)
CELL_METRIC = "student_top1"


def cell_params(cell) -> dict[str, str]:
    """The short params that say which cell a child run is, besides the flattened config
    (where ``method`` and the axis keys, such as ``generator.p``, are already): its bit
    widths as the report writes them, its seed, and its grid's label."""
    return {"method": cell.method, "bits": cell.bits, "seed": str(cell.seed), "grid": cell.grid}


def view_columns(exp) -> list[str]:
    """The params a view of the experiment's cells shows first: method, bits, the axes, seed."""
    axes = dict.fromkeys(key for cell in exp.cells for key in cell.values)
    return ["method", "bits", *axes, "seed"]


def description(exp) -> str:
    """The parent run's note: what the experiment compares, at which budget and seeds, and
    where its report and its cells are."""
    from qimera.experiments import FINAL_EPOCH_NOTE

    def listed(values) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values))

    cells = exp.cells
    axes: dict[str, list] = {}
    for cell in cells:
        for key, value in cell.values.items():
            axes.setdefault(key, [])
            if value not in axes[key]:
                axes[key].append(value)
    budgets = listed(f"{e} × {i} × {b}" for e, i, b in (c.budget for c in cells))
    lines = [exp.spec.title or exp.spec.name, "",
             f"Experiment file `{exp.path}`: {len(cells)} cells over the grids {listed(c.grid for c in cells)}; "
             f"methods {listed(c.method for c in cells)} at {listed(c.bits for c in cells)}"
             + "".join(f"; {key} in {listed(values)}" for key, values in axes.items())
             + f"; seeds {listed(c.seed for c in cells)}; budget (epochs × iterations × batch) {budgets}."]
    if exp.spec.compare:
        lines.append("Paired comparisons, per seed: " + "; ".join(f"{t} − {b}" for t, b in exp.spec.compare) + ".")
    lines.append(f"Each child run is one cell, named after it and with the params {', '.join(view_columns(exp))}; "
                 f"`{CELL_METRIC}` is its final-epoch top-1 (%). The table of means ± std and the paired "
                 "differences: artifacts `report/report.md` of this run.")
    lines.append(FINAL_EPOCH_NOTE)
    return "\n".join(lines)


def _parent(client, exp_id: str, name: str, path: str, *, reuse: bool = True) -> str:
    if reuse:
        runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{name}' and tags.`qimera.role` = 'parent'",
                                  max_results=1)
        if runs:
            return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={PARENT_TAG: name, "qimera.role": "parent",
                                                         "qimera.experiment_file": path})
    return run.info.run_id


def log_cells(client, exp, parent_id: str, exp_id: str) -> int:
    """Log every finished cell of ``exp`` as a child of ``parent_id``; returns how many."""
    from qimera.experiments import SUMMARY, cell_history, is_done

    children: dict[str, str] = {}
    for r in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000):
        cell_id = r.data.tags.get(CELL_TAG)
        if cell_id and (cell_id not in children or r.info.status == "FINISHED"):
            children[cell_id] = r.info.run_id  # a pipeline run that failed before a rerun is not the cell
    logged = 0
    for cell in exp.cells:
        if not is_done(cell):
            continue
        summary = json.loads((cell.out_dir / SUMMARY).read_text())
        tags = {"mlflow.parentRunId": parent_id, CELL_TAG: cell.id, PARENT_TAG: exp.spec.name,
                "qimera.row": cell.row, "qimera.column": cell.column, "method": cell.method,
                "bits": f"w{cell.w_bits}a{cell.a_bits}"}
        # a DVC cell's pipeline run is the child already (its summary names it)
        run_id = summary.get("mlflow_run_id") if summary.get("mlflow_run_id") in children.values() else None
        run_id = run_id or children.get(cell.id)
        if run_id is None:  # timed as the cell ran: it ended as its summary was written, `seconds` before
            ended = int((cell.out_dir / SUMMARY).stat().st_mtime * 1000)
            began = ended - int(1000 * float(summary.get("seconds") or 0))
            run_id = client.create_run(exp_id, start_time=began, run_name=cell.id, tags=tags).info.run_id
            params = tracking.flatten(cell.cfg.resolved())
            params.update({f"axis.{k}": json.dumps(v) for k, v in cell.values.items()})
            tracking.log_params(client, run_id, {**cell_params(cell), **params})
            for record in cell_history(cell):
                tracking.log_epoch(client, run_id, record)
            finished = False
        else:  # logged before, or a pipeline run (a DVC cell): named and tagged as the cell it ran
            ended, run = None, client.get_run(run_id)
            finished = run.info.status == "FINISHED"  # keeps the time it ended
            tracking.log_tags(client, run_id, tags)
            tracking.log_params(client, run_id, cell_params(cell))
            if run.info.run_name != cell.id:
                client.update_run(run_id, name=cell.id)
        tracking.log_metrics(client, run_id, {k: summary.get(k) for k in (
            CELL_METRIC, "student_top5", "teacher_top1", "naive_top1", "seconds")})
        if not finished:
            client.set_terminated(run_id, "FINISHED", end_time=ended)
        logged += 1
    return logged


def tracked(exp, experiment_file: str, run_cells: Callable[[str], dict[str, int]], *, reuse_parent: bool = True,
            tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an experiment's cells under its MLflow parent run and report them.

    ``run_cells(parent_run_id)`` runs (or schedules) the cells and returns the counts
    ``{"failed": n, "pending": n, ...}``. Then the report is written, every finished cell
    is logged as a child (:func:`log_cells`), the report is attached to the parent, and
    the parent is closed: FINISHED, FAILED when a cell failed, SCHEDULED while cells are
    still pending. The parent's note says what the experiment compares
    (:func:`description`), and a shared view of the experiment lists the parent's cells
    with their top-1, method, bits, axis values and seed as the first columns. Returns
    ``{"counts", "paths", "parent", "logged", "uri", "url"}``: ``url`` opens that view.

    ``reuse_parent``: log under the experiment's existing parent run (a rerun of the same
    cells); False makes a new one (cells computed afresh, as the pipeline's ``ladder``
    stage does). ``tags`` are added to the parent run.
    """
    from qimera.experiments import report

    root = repo_root()
    uri = tracking.tracking_uri({}, root)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, exp.spec.name, uri)
    parent = _parent(client, exp_id, exp.spec.name, experiment_file, reuse=reuse_parent)
    client.update_run(parent, status="RUNNING")
    try:
        if tracking.NOTE_TAG not in client.get_run(parent).data.tags:  # a description the user wrote stays
            tracking.log_tags(client, parent, {tracking.NOTE_TAG: description(exp)})
        if tags:
            tracking.log_tags(client, parent, tags)
        view = tracking.share_view(client, exp_id, f"cells-{parent}",
                                   search=f"tags.`mlflow.parentRunId` = '{parent}'", metrics=[CELL_METRIC],
                                   params=view_columns(exp))
        counts = run_cells(parent)
        paths = report(exp)
        logged = log_cells(client, exp, parent, exp_id)
        for path in paths.values():
            client.log_artifact(parent, str(path), "report")
        tracking.log_metrics(client, parent, {"cells": len(exp.cells), "cells_finished": logged,
                                              "cells_failed": counts["failed"]})
    except BaseException as exc:
        tracking.fail(client, parent, exc)
        raise
    if counts.get("pending"):
        client.update_run(parent, status="SCHEDULED")  # more cells will come: not finished yet
    else:
        client.set_terminated(parent, "FINISHED" if not counts["failed"] else "FAILED")
    return {"counts": counts, "paths": paths, "parent": parent, "logged": logged, "uri": tracking.redact(uri),
            "url": tracking.experiment_url(uri, exp_id, view)}


def _run_with_dvc(exp, args, parent: str) -> dict[str, int]:
    from . import experiment_dvc
    from .common import PARAMS_FILE, load_params

    root = repo_root()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    queued = experiment_dvc.queue_cells(exp, root, load_params(root / PARAMS_FILE),
                                        {"experiment": exp.spec.name, "parent_run": parent}, log)
    log(f"experiment {exp.spec.name}: {len(exp.cells)} cells, {queued['finished']} finished already, "
        f"{queued['queued']} queued now, {queued['pending']} queued or running before")
    if not args.queue_only and queued["queued"] + queued["pending"]:
        status = experiment_dvc.run_queue(root, max(1, args.jobs))
        if status:
            log(f"experiment {exp.spec.name}: `dvc exp run --run-all` exited with {status}")
    counts = experiment_dvc.import_results(exp, root)
    if counts["pending"]:
        log(f"experiment {exp.spec.name}: {counts['pending']} cell(s) still queued or running in DVC "
            f"(`dvc queue status`); rerun this command when they are done")
    return counts


def main(argv: list[str] | None = None) -> None:
    from qimera.experiments import load_experiment, run_experiment

    p = argparse.ArgumentParser(prog="python -m stages.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--via", choices=("local", "dvc"), default="local",
                   help="run the cells here (local) or as queued DVC experiments of the pipeline (dvc)")
    p.add_argument("--queue-only", action="store_true", help="with --via dvc: queue the cells and stop")
    args = p.parse_args(argv)
    if args.queue_only and args.via != "dvc":
        p.error("--queue-only needs --via dvc")
    exp = load_experiment(args.experiment, seeds=args.seeds, overrides=tuple(args.overrides))
    if args.via == "dvc":
        out = tracked(exp, args.experiment, lambda parent: _run_with_dvc(exp, args, parent))
    else:
        out = tracked(exp, args.experiment, lambda parent: run_experiment(exp, jobs=max(1, args.jobs)))
    counts = out["counts"]
    print(out["paths"]["md"].read_text())
    print(f"experiment {exp.spec.name}: MLflow parent run {out['parent']} with {out['logged']} child runs at "
          f"{out['uri']}; to compare the cells: {tracking.where_to_open(out['uri'], out['url'])}", file=sys.stderr)
    if counts["failed"]:
        print(f"experiment {exp.spec.name}: {counts['failed']} cell(s) failed; rerun to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_stage("experiment", main)
