"""Stage ``ladder``: the demo's bit-width ladder, the table ``dvc repro`` ends with.

Runs the experiment file that params ``ladder.experiment`` names (by default
``experiments/demo-ladder.yaml``: naive, GDFQ and Qimera on the digits demo at 4w4a and at
low bit widths where noise calibration collapses), ``ladder.jobs`` cells at once (``ladder.seeds``: seeds 1..N instead of the file's), each one
an ordinary run (:func:`qimera.experiments.run_cell`, one torch thread unless
``OMP_NUM_THREADS`` says otherwise) in ``outputs/ladder/<name>/<cell>/``, with
``ladder.set`` (``section.key=value`` strings) applied to every cell. It does not depend
on the preset: the ladder is its own experiment, and DVC reruns it only when the
experiment file, a config or the library changes. DVC removes ``outputs/ladder`` before
the stage runs, so every value is computed afresh by the current code.

MLflow: a new parent run per execution in the experiment named after the file's ``name``,
with one nested child run per cell (:func:`stages.experiment.tracked`). The cells are not
registered models; the model registry keeps the pipeline's own student.

Writes ``outputs/ladder/`` (the cells, ``report.md``, ``report.csv``, ``report.png``) and
``outputs/ladder.json`` (DVC metrics): the final-epoch top-1 of every (row, column) of the
report, the teacher's top-1 and the budget. ``ladder.experiment: null`` skips the ladder
(``ladder.json`` then says so). A failed cell fails the stage after the report of the
others is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .common import LADDER_DIR, LADDER_METRICS, PipelineError, load_params, run_stage, write_json

#: params.yaml ``ladder`` keys and their defaults
DEFAULTS = {"experiment": "experiments/demo-ladder.yaml", "jobs": 2, "seeds": None, "set": []}


def ladder_params(params: dict) -> dict:
    """The ``ladder`` section of params.yaml, checked (one line naming the key and value)."""
    section = params.get("ladder")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise PipelineError(f"params.yaml: ladder={section!r}: must be a mapping ({', '.join(DEFAULTS)})")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise PipelineError(f"params.yaml: ladder.{unknown[0]}: unknown key; allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **section}
    if out["experiment"] is not None and not isinstance(out["experiment"], str):
        raise PipelineError(f"params.yaml: ladder.experiment={out['experiment']!r}: a path to an experiment file, "
                            "or null for no ladder")
    jobs = out["jobs"]
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 64:
        raise PipelineError(f"params.yaml: ladder.jobs={jobs!r}: a whole number of cells at once, 1..64")
    seeds = out["seeds"]
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= 100):
        raise PipelineError(f"params.yaml: ladder.seeds={seeds!r}: null (the file's seeds) or a whole number N, "
                            "1..100 (seeds 1..N)")
    if not isinstance(out["set"], list) or not all(isinstance(x, str) for x in out["set"]):
        raise PipelineError(f"params.yaml: ladder.set={out['set']!r}: a list of 'section.key=value' strings")
    return out


def load_ladder(params: dict):
    """The ladder's experiment (validated, every cell resolved), or None when switched off.
    Its file and the configs it names are read relative to the workspace (the stage's
    working directory: the repository, or a queued experiment's copy of it)."""
    from qimera.experiments import load_experiment

    spec = ladder_params(params)
    if spec["experiment"] is None:
        return None
    path = Path(spec["experiment"])  # relative to the workspace, like the configs the file names
    if not path.is_file():
        raise PipelineError(f"params.yaml: ladder.experiment={spec['experiment']!r}: file not found in {Path.cwd()}")
    return load_experiment(path, seeds=spec["seeds"], overrides=tuple(spec["set"]), runs_dir=LADDER_DIR)


def ladder_metrics(exp) -> dict:
    """``ladder.json``: every report entry's final-epoch top-1 by row and column (the mean
    over the seeds, with its standard deviation and count), and the file's paired
    comparisons (``treatment − baseline`` per seed)."""
    from qimera.experiments import SUMMARY, collect, is_done, paired

    def r4(x):
        return None if x is None else round(x, 4)

    entries = collect(exp)
    rows: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    n: dict[str, dict[str, int]] = {}
    for entry in entries:
        rows.setdefault(entry.row, {})[entry.column] = r4(entry.mean)
        std.setdefault(entry.row, {})[entry.column] = r4(entry.std)
        n.setdefault(entry.row, {})[entry.column] = len(entry.values)
    pairs = [{"treatment": p.treatment, "baseline": p.baseline, "entry": p.entry,
              "by_seed": {str(s): r4(d) for s, d in p.diffs.items()}, "mean": r4(p.mean), "std": r4(p.std),
              "wins": p.wins} for p in paired(exp, entries)]
    teacher = {json.loads((c.out_dir / SUMMARY).read_text()).get("teacher_top1") for c in exp.cells if is_done(c)}
    budgets = sorted({c.budget for c in exp.cells})
    return {"experiment": str(exp.path), "columns": list(dict.fromkeys(c.column for c in exp.cells)),
            "rows": rows, "std": std, "n": n, "seeds": sorted({c.seed for c in exp.cells}), "pairs": pairs,
            "teacher_top1": teacher.pop() if len(teacher) == 1 else None,
            "budget": ", ".join(f"{e} x {i} x {b}" for e, i, b in budgets), "cells": len(exp.cells),
            "report": str(exp.dir / "report.md")}


def main() -> None:
    from qimera.experiments import run_experiment

    from .experiment import tracked

    params = load_params()
    exp = load_ladder(params)
    LADDER_DIR.mkdir(parents=True, exist_ok=True)
    if exp is None:
        write_json(LADDER_METRICS, {"experiment": None, "skipped": "params.yaml ladder.experiment is null"})
        print("ladder: skipped (ladder.experiment is null)")
        return
    jobs = ladder_params(params)["jobs"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the cells' runs: one thread each, as `make demo` runs
    out = tracked(exp, str(exp.path), lambda parent: run_experiment(exp, jobs=jobs), reuse_parent=False,
                  tags={"qimera.stage": "ladder"})
    metrics = {**ladder_metrics(exp), "failed": out["counts"]["failed"], "mlflow_parent_run": out["parent"],
               "mlflow_uri": out["uri"], "mlflow_url": out["url"]}
    write_json(LADDER_METRICS, metrics)
    print(f"ladder: {exp.spec.name}, {len(exp.cells)} cells, {jobs} at a time; MLflow parent run {out['parent']}; "
          f"the cells in the MLflow UI: {out['url']}")
    print(out["paths"]["md"].read_text())
    if out["counts"]["failed"]:
        raise SystemExit(f"ladder: {out['counts']['failed']} cell(s) failed (see {exp.dir}/<cell>/cell.json)")


if __name__ == "__main__":
    run_stage("ladder", main)
