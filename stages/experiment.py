"""An experiment (experiments/*.yaml) run and tracked in MLflow: one parent run per
experiment, one nested child run per cell, so that the MLflow UI compares the cells side
by side. The report (report.md, report.csv, report.png) is an artifact of the parent.

    python -m stages.experiment experiments/demo-grid.yaml [--jobs J] [--seeds N] [--set key=value ...]

The cells are run by the library (:func:`qimera.experiments.run_experiment`: skips the
finished ones, resumes the half-finished ones); afterwards every finished cell is logged
from the files it left (its resolved config, history.jsonl, summary.json). Logging is
idempotent: a cell already logged under this parent (tag ``qimera.cell``) is updated,
not duplicated. The store is chosen as for the pipeline (:func:`stages.tracking.tracking_uri`);
the MLflow experiment is named after the experiment file's ``name``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import repo_root, run_stage
from . import tracking

PARENT_TAG = "qimera.experiment"
CELL_TAG = "qimera.cell"


def _parent(client, exp_id: str, name: str, path: str) -> str:
    runs = client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{name}' and tags.`qimera.role` = 'parent'",
                              max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={PARENT_TAG: name, "qimera.role": "parent",
                                                         "qimera.experiment_file": path})
    return run.info.run_id


def log_cells(client, exp, parent_id: str, exp_id: str) -> int:
    """Log every finished cell of ``exp`` as a child of ``parent_id``; returns how many."""
    from qimera.experiments import SUMMARY, is_done

    children = {r.data.tags.get(CELL_TAG): r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)}
    logged = 0
    for cell in exp.cells:
        if not is_done(cell):
            continue
        summary = json.loads((cell.out_dir / SUMMARY).read_text())
        run_id = children.get(cell.id)
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=cell.id, tags={
                "mlflow.parentRunId": parent_id, CELL_TAG: cell.id, PARENT_TAG: exp.spec.name,
                "qimera.row": cell.row, "qimera.column": cell.column, "method": cell.method,
                "bits": f"w{cell.bits}a{cell.bits}"}).info.run_id
            params = tracking.flatten(cell.cfg.resolved())
            params.update({f"axis.{k}": json.dumps(v) for k, v in cell.values.items()})
            tracking.log_params(client, run_id, params)
            history = cell.out_dir / "history.jsonl"
            if history.is_file():
                for line in history.read_text().splitlines():
                    tracking.log_epoch(client, run_id, json.loads(line))
        tracking.log_metrics(client, run_id, {k: summary.get(k) for k in (
            "student_top1", "student_top5", "teacher_top1", "naive_top1", "seconds")})
        client.set_terminated(run_id, "FINISHED")
        logged += 1
    return logged


def main(argv: list[str] | None = None) -> None:
    from qimera.experiments import load_experiment, report, run_experiment

    p = argparse.ArgumentParser(prog="python -m stages.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment, seeds=args.seeds, overrides=tuple(args.overrides))
    uri = tracking.tracking_uri({}, repo_root())
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, exp.spec.name, uri)
    parent = _parent(client, exp_id, exp.spec.name, args.experiment)
    client.update_run(parent, status="RUNNING")
    try:
        counts = run_experiment(exp, jobs=max(1, args.jobs))
        paths = report(exp)
        logged = log_cells(client, exp, parent, exp_id)
        for path in paths.values():
            client.log_artifact(parent, str(path), "report")
        tracking.log_metrics(client, parent, {"cells": len(exp.cells), "cells_finished": logged,
                                              "cells_failed": counts["failed"]})
    except BaseException as exc:
        tracking.fail(client, parent, exc)
        raise
    client.set_terminated(parent, "FINISHED" if not counts["failed"] else "FAILED")
    print(paths["md"].read_text())
    print(f"experiment {exp.spec.name}: MLflow parent run {parent} with {logged} child runs at {tracking.redact(uri)}",
          file=sys.stderr)
    if counts["failed"]:
        print(f"experiment {exp.spec.name}: {counts['failed']} cell(s) failed; rerun to retry them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_stage("experiment", main)
