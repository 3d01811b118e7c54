"""An experiment's cells as queued DVC experiments of the pipeline (dvc.yaml).

Each cell of an experiment file (:mod:`qimera.experiments`) becomes one ``dvc exp run
--queue`` of the pipeline, named ``<cell id>-<first 8 hex digits of its config's
fingerprint>`` (a cell whose config changes gets a new name, never an old result), with
``-S preset=<the cell's base config>`` and ``-S ++key=value`` for what the cell sets.
:func:`cell_params` checks, before anything is queued, that the pipeline's ``resolve``
stage turns those params into exactly the cell's config (params.yaml's own non-null
values are overridden where they differ), so the DVC experiment is the same run as
``qimera experiment run`` would make.

The queue runs with ``dvc exp run --run-all -j J`` (``dvc queue start -j J`` plus
following the logs) or later by the user's own ``dvc queue start``. :func:`import_results`
then writes each successful experiment's ``metrics.json`` into the cell's directory
(``runs/<experiment>/<cell>/summary.json`` and ``cell.json``, as a local run leaves them),
so ``qimera experiment report`` and the MLflow parent run read one kind of result,
whoever ran the cell.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import (PipelineError, available_presets, dvc_executable, format_value, preset_file, redact_text,
                     resolve_config)

#: config keys that differ between a cell and its pipeline run by design
_PIPELINE_OWNED = ("preset", "train.out_dir", "train.progress")
#: DVC's experiment states (``dvc exp show``/``dvc queue status``) that need no new queue entry
_PENDING = ("Queued", "Running", "Success")


def experiment_name(cell) -> str:
    """The DVC experiment name of ``cell`` (valid as a git ref: cell ids are slugs)."""
    return cell.key


def preset_of(cell, root: Path) -> str:
    """The pipeline preset whose file is the cell's base config."""
    target = (root / cell.base_config).resolve()
    for name in available_presets(root):
        if preset_file(root, name, cell.w_bits, cell.a_bits).resolve() == target:
            return name
    raise PipelineError(
        f"cell {cell.id}: its base config {str(cell.base_config)!r} is not a pipeline preset "
        f"(configs/<preset>.yaml or configs/<preset>-w<b>a<b>.yaml; presets: {', '.join(available_presets(root))}); "
        "run this experiment with `qimera experiment run` instead"
    )


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _with(params: dict, sets: dict[str, Any]) -> dict:
    out = json.loads(json.dumps(params))
    for dotted, value in sets.items():
        node = out
        *parents, last = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise PipelineError(f"params.yaml: {key!r} is not a section (setting {dotted})")
            node = child
        node[last] = value
    return out


def cell_params(cell, params: dict, root: Path) -> dict[str, Any]:
    """The ``-S`` settings (``{"preset": …, "section.key": value}``) under which the pipeline,
    starting from ``params`` (params.yaml), runs exactly ``cell``'s config."""
    sets: dict[str, Any] = {"preset": preset_of(cell, root), **cell.settings}
    want = {k: v for k, v in _flat(cell.cfg.resolved()).items() if k not in _PIPELINE_OWNED}
    for _ in range(2):  # the second pass only confirms what the first one added
        got = _flat(resolve_config(_with(params, sets), root).resolved())
        differ = [k for k, v in want.items() if got.get(k) != v]
        if not differ:
            return sets
        sets.update({k: want[k] for k in differ})
    raise PipelineError(
        f"cell {cell.id}: the pipeline cannot express {', '.join(differ)} as params.yaml values "
        "(null in params.yaml means \"the preset's value\"); run this experiment with `qimera experiment run`"
    )


def queue_command(dvc: str, name: str, sets: dict[str, Any], *, queue: bool = True) -> list[str]:
    """``dvc exp run [--queue] --name <name> -S …`` for the settings of :func:`cell_params`."""
    cmd = [dvc, "exp", "run", *(["--queue"] if queue else []), "--name", name]
    for key, value in sets.items():
        cmd += ["-S", f"{key}={format_value(value)}" if key == "preset" else f"++{key}={format_value(value)}"]
    return cmd


def experiments(root: Path) -> dict[str, dict]:
    """DVC's experiments of the workspace's baseline commit, by name (``dvc exp show``)."""
    import dvc.api

    rows = dvc.api.exp_show(repo=str(root))
    return {row["Experiment"]: row for row in rows if row.get("Experiment")}


def _run(cmd: list[str], root: Path, env: dict | None = None, *, echo: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    # the stages run `python`: make it this interpreter (the venv's)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if echo:
        return subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=subprocess.STDOUT,
                              text=True)
    return subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def cell_sets(cell, root: Path, params: dict, mlflow: dict[str, str]) -> dict[str, Any]:
    """Everything ``dvc exp run -S`` sets for ``cell``: :func:`cell_params` plus the
    ``mlflow.*`` params (``mlflow``: experiment, parent run) and no ladder stage."""
    extra = {f"mlflow.{k}": v for k, v in mlflow.items()}
    extra["mlflow.cell"] = cell.id
    extra["ladder.experiment"] = None  # a cell is one run: not the demo's ladder stage too
    return {**cell_params(cell, params, root), **extra}


def queue_cells(exp, root: Path, params: dict, mlflow: dict[str, str], log) -> dict[str, int]:
    """Queue every cell that is neither finished nor already queued, running or done in
    DVC; returns the counts ``{"queued", "pending", "finished"}``. ``mlflow``: the
    ``mlflow.*`` params every cell's run gets (experiment, parent run)."""
    from qimera.experiments import is_done

    plans = []
    for cell in exp.cells:  # everything is checked before anything is queued
        if not is_done(cell):
            plans.append((cell, cell_sets(cell, root, params, mlflow)))
    known = experiments(root)
    counts = {"queued": 0, "pending": 0, "finished": len(exp.cells) - len(plans)}
    dvc = dvc_executable()
    for cell, sets in plans:
        name = experiment_name(cell)
        state = (known.get(name) or {}).get("State")
        if state in _PENDING:
            counts["pending"] += 1
            continue
        if name in known:  # failed before: remove it, so that the name can be queued again
            _run([dvc, "exp", "remove", name], root)
        proc = _run(queue_command(dvc, name, sets), root)
        if proc.returncode != 0:
            raise PipelineError(f"cell {cell.id}: `dvc exp run --queue` exited with {proc.returncode}: "
                                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        counts["queued"] += 1
        log(f"queued DVC experiment {name}")
    return counts


#: DVC's warning, once per pipeline output, when it copies the workspace for a queued
#: experiment: the outputs of the last ``dvc repro`` that its cache lacks are not copied
UNCACHED_OUTPUT = re.compile(r"^WARNING: No file hash info found for '(.*)'\. It won't be created\.\s*$")


def run_queue(root: Path, jobs: int, out=None) -> int:
    """``dvc exp run --run-all -j jobs``: start ``jobs`` queue workers and follow every
    queued experiment to its end, its output passed on to ``out`` (stderr by default) by
    :func:`follow`. Returns DVC's exit status."""
    return follow([dvc_executable(), "exp", "run", "--run-all", "-j", str(jobs)], root, out or sys.stderr)


def follow(cmd: list[str], root: Path, out) -> int:
    """Run ``cmd`` in ``root`` (this interpreter's directory first on PATH, as the stages
    need) and pass its output on to ``out`` line by line, except DVC's
    :data:`UNCACHED_OUTPUT` warnings (about twelve per queued experiment): each run of them
    becomes one line that says what they mean, since every stage of a cell's experiment
    runs and builds those outputs afresh. Returns the exit status."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    skipped: list[str] = []

    def say_skipped() -> None:
        if skipped:
            names = sorted(Path(p).name for p in skipped)
            out.write(f"(DVC copied the workspace without {len(skipped)} outputs that its cache lacks ("
                      f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): the experiment's stages build "
                      "them)\n")
            skipped.clear()

    with subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            found = UNCACHED_OUTPUT.match(line)
            if found:
                skipped.append(found.group(1))
                continue
            say_skipped()
            out.write(line)
            out.flush()
        say_skipped()
    return proc.returncode


def _summary(cell, metrics: dict, name: str) -> dict:
    def top(section: str, key: str = "top1"):
        entry = metrics.get(section)
        return entry.get(key) if isinstance(entry, dict) else None

    return {"method": cell.method, "w_bits": metrics.get("w_bits"), "a_bits": metrics.get("a_bits"),
            "teacher_top1": top("teacher"), "naive_top1": top("naive"), "student_top1": top("student"),
            "student_top5": top("student", "top5"), "iterations": metrics.get("iterations"), "seconds": None,
            "seed": cell.seed, "out_dir": str(cell.out_dir), "student_per_class": top("student", "per_class"),
            "dvc_experiment": name, "mlflow_run_id": metrics.get("mlflow_run_id")}


def import_results(exp, root: Path) -> dict[str, int]:
    """Record every cell whose DVC experiment has ended (summary.json from its
    metrics.json, cell.json); returns ``{"done", "failed", "pending"}``."""
    from qimera.experiments import is_done, record_cell

    from .common import METRICS

    known = experiments(root)
    counts = {"done": 0, "failed": 0, "pending": 0}
    for cell in exp.cells:
        if is_done(cell):
            continue
        name = experiment_name(cell)
        row = known.get(name)
        state = (row or {}).get("State")
        if state == "Success":
            shown = subprocess.run(["git", "show", f"{row['rev']}:{METRICS}"], cwd=root, capture_output=True, text=True)
            if shown.returncode == 0:
                record_cell(cell, "done", _summary(cell, json.loads(shown.stdout), name), dvc_experiment=name,
                            dvc_rev=row["rev"])
                counts["done"] += 1
                continue
            state = f"Success without {METRICS}"
        if state in ("Queued", "Running"):
            counts["pending"] += 1
        elif row is not None:
            record_cell(cell, "failed", dvc_experiment=name, error=f"DVC experiment {name}: {state}")
            counts["failed"] += 1
    return counts


#: the name of the DVC remote :func:`use_remote` configures in a worker's clone
WORKER_REMOTE = "qimera"


def use_remote(root: Path, url: str, *, endpoint: str | None = None) -> None:
    """Make ``url`` (``s3://bucket/prefix``) the default DVC remote of the clone at ``root``,
    in ``.dvc/config.local`` (never committed), with ``endpoint`` as its ``endpointurl``
    for an S3-compatible store. Credentials stay in the environment: DVC's S3 remote reads
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE`` itself."""
    from .s3 import parse_url

    parse_url(url, key_required=False)
    dvc = dvc_executable()
    steps = [[dvc, "remote", "add", "--local", "--default", "--force", WORKER_REMOTE, url]]
    if endpoint:
        steps.append([dvc, "remote", "modify", "--local", WORKER_REMOTE, "endpointurl", endpoint])
    for cmd in steps:
        proc = _run(cmd, root)
        if proc.returncode != 0:
            raise PipelineError(f"`{' '.join(cmd[1:4])} …` exited with {proc.returncode}: "
                                f"{redact_text((proc.stderr or proc.stdout).strip())[-500:]}")


def run_here(cell, root: Path, sets: dict[str, Any], *, env: dict[str, str] | None = None) -> dict:
    """Run ``cell`` as the DVC experiment :func:`experiment_name` in the workspace at
    ``root`` (``dvc exp run --name … -S …``, not queued: the workspace is this run's own
    clone), with ``env`` added to its environment; record the outcome in the cell's
    directory as :func:`import_results` does and return it (``cell.json``'s content).
    ``outputs/train`` is persistent, so a checkpoint put there first is resumed from."""
    from qimera.experiments import record_cell

    from .common import METRICS

    name = experiment_name(cell)
    proc = _run(queue_command(dvc_executable(), name, sets, queue=False), root, env, echo=True)
    if proc.returncode != 0:
        return record_cell(cell, "failed", returncode=proc.returncode, dvc_experiment=name,
                           error=f"`dvc exp run --name {name}` exited with {proc.returncode} (its output is in the log)")
    row = experiments(root).get(name) or {}
    metrics = json.loads((root / METRICS).read_text())
    return record_cell(cell, "done", _summary(cell, metrics, name), returncode=0, dvc_experiment=name,
                       dvc_rev=row.get("rev"))


def push_results(root: Path, name: str, *, git_remote: str | None = None) -> list[str]:
    """Push the workspace's outputs (the experiment ``name`` just run) to the default DVC
    remote (``dvc push``) and, when ``git_remote`` is given, the experiment itself to that
    git remote (``dvc exp push``: its commit under ``refs/exps``; ``dvc exp pull`` brings it
    back). Returns the commands run; raises :class:`PipelineError` when one fails."""
    dvc = dvc_executable()
    steps = [[dvc, "push"]]
    if git_remote:
        steps.append([dvc, "exp", "push", git_remote, name])
    for cmd in steps:
        proc = _run(cmd, root)
        if proc.returncode != 0:
            raise PipelineError(redact_text(f"`{' '.join(['dvc', *cmd[1:]])}` exited with {proc.returncode}: ")
                                + redact_text((proc.stderr or proc.stdout).strip())[-800:])
    return [redact_text(" ".join(["dvc", *cmd[1:]])) for cmd in steps]
