"""An experiment's cells as queued DVC experiments of the pipeline (stages/experiment_dvc.py).

The unit tests check the mapping of a cell to ``dvc exp run -S`` settings against the
pipeline's own ``resolve`` logic; the end-to-end test queues one cell in a temporary git +
DVC copy of the project, runs the queue, and checks that the result is the same run as
``qimera experiment run`` makes, nested under the experiment's MLflow parent run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qimera.experiments import ExperimentError, load_experiment
from stages import experiment_dvc
from stages.common import PipelineError, load_params, resolve_config

REPO = Path(__file__).resolve().parents[2]
#: a tiny cell on the digits demo (one epoch of two iterations, 100 evaluation images)
TINY_SET = {"train.epochs": 1, "train.iters_per_epoch": 2, "train.lr_milestones": [1], "train.warmup_epochs": 0,
            "train.calibration_epochs": 1, "train.batch_size": 16, "naive.enabled": False, "data.limit": 100}


def _experiment(directory: Path, *, config: str = "configs/demo.yaml", grid_set: dict | None = None,
                axes: dict | None = None, name: str = "dvc-cells") -> Path:
    spec = {"name": name, "seeds": [1], "set": TINY_SET,
            "grids": [{"label": "digits", "config": config, "methods": ["qimera"], "set": grid_set or {},
                       "axes": axes or {"generator.p": [0.25]}, "row": "{label}", "column": "p={generator.p}"}]}
    path = directory / "experiments" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def in_repo(monkeypatch):
    """Experiment files name configs relative to the repository root: run from there."""
    monkeypatch.chdir(REPO)


def test_cell_params_reproduce_the_cell_even_over_params_yaml_values(in_repo, tmp_path):
    exp = load_experiment(_experiment(tmp_path))
    cell = exp.cells[0]
    params = load_params(REPO / "params.yaml")
    # params.yaml values the cell does not set must not leak into its run
    params["train"]["device"] = "cpu"
    params["generator"]["k"] = 3
    sets = experiment_dvc.cell_params(cell, params, REPO)
    assert sets["preset"] == "demo" and sets["generator.p"] == 0.25 and sets["train.seed"] == 1
    assert sets["generator.k"] == cell.cfg.generator.k and sets["train.device"] == cell.cfg.train.device
    got = resolve_config(experiment_dvc._with(params, sets), REPO)
    ignore = ("train.out_dir", "train.progress", "preset")
    assert got.fingerprint(ignore=ignore) == cell.cfg.fingerprint(ignore=ignore)
    cmd = experiment_dvc.queue_command("dvc", experiment_dvc.experiment_name(cell), sets)
    assert cmd[:5] == ["dvc", "exp", "run", "--queue", "--name"] and "preset=demo" in cmd
    assert "++generator.p=0.25" in cmd and "++train.lr_milestones=[1]" in cmd
    # the name changes with the config: an old result is never taken for a new config
    other = load_experiment(_experiment(tmp_path, grid_set={"generator.dm_layers": 2})).cells[0]
    assert experiment_dvc.experiment_name(other) != experiment_dvc.experiment_name(cell)
    assert experiment_dvc.experiment_name(other).startswith(other.id + "-")


def test_a_cell_the_pipeline_cannot_run_is_refused_before_anything_is_queued(in_repo, tmp_path):
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(base))
    exp = load_experiment(_experiment(tmp_path, config=str(tmp_path / "custom.yaml")))
    with pytest.raises(PipelineError, match=r"is not a pipeline preset.*qimera experiment run"):
        experiment_dvc.cell_params(exp.cells[0], load_params(REPO / "params.yaml"), REPO)
    # null in params.yaml means "the preset's value": a cell that needs null where its preset has a value
    # cannot be expressed
    exp = load_experiment(_experiment(tmp_path, config="configs/cifar10-shared.yaml", grid_set={"teacher.mean": None}))
    with pytest.raises(PipelineError, match=r"cannot express teacher\.mean"):
        experiment_dvc.cell_params(exp.cells[0], load_params(REPO / "params.yaml"), REPO)


def test_a_team_experiment_is_checked_before_any_cell_starts(in_repo, tmp_path):
    """Cells in their own clones (QIMERA_DVC_REMOTE): MLflow must be a server, and every
    cell a run the pipeline can make (pipelines.experiment_flow.check_dvc_cells)."""
    pytest.importorskip("prefect")
    from pipelines.experiment_flow import check_dvc_cells

    good = load_experiment(_experiment(tmp_path)).cells
    check_dvc_cells(good, REPO, {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"})
    for uri in ("", "sqlite:////home/me/mlflow.db", "file:///mnt/mlruns"):
        with pytest.raises(ValueError, match=f"MLFLOW_TRACKING_URI={uri!r} is not a tracking server"):
            check_dvc_cells(good, REPO, {"MLFLOW_TRACKING_URI": uri})
    with pytest.raises(ValueError) as info:  # a password in the URI is not repeated
        check_dvc_cells(good, REPO, {"MLFLOW_TRACKING_URI": "ftp://me:hunter2@mlflow.internal"})
    assert "hunter2" not in str(info.value)
    base = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(base))
    custom = load_experiment(_experiment(tmp_path, config=str(tmp_path / "custom.yaml"), name="custom")).cells
    with pytest.raises(PipelineError, match="is not a pipeline preset"):
        check_dvc_cells(good + custom, REPO, {"MLFLOW_TRACKING_URI": "https://mlflow.internal"})


def test_bad_experiment_input_fails_before_dvc_is_asked(in_repo, tmp_path):
    bad = _experiment(tmp_path, axes={"generator.nope": [1]})
    res = subprocess.run([sys.executable, "-m", "stages.experiment", str(bad), "--via", "dvc"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI":
                              f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert res.returncode == 2, res.stderr
    assert "generator.nope" in res.stderr and "is not a config key" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    with pytest.raises(ExperimentError):
        load_experiment(bad)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_queued_dvc_cell_is_the_same_run_and_a_child_of_the_experiment(dvc_project, teacher_cache, tmp_path):
    project = dvc_project.path
    exp_file = _experiment(project, grid_set={"teacher.cache_dir": str(teacher_cache)})
    rel = str(exp_file.relative_to(project))

    # the same cell run by `qimera experiment run`, elsewhere
    local = tmp_path / "local"
    (local / "experiments").mkdir(parents=True)
    (local / "configs").symlink_to(REPO / "configs")
    (local / rel).write_text(exp_file.read_text())
    res = subprocess.run([sys.executable, "-m", "qimera.cli", "experiment", "run", rel], cwd=local,
                         env=dvc_project.env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    cell_id = load_experiment(local / rel).cells[0].id
    local_summary = json.loads((local / "runs" / "dvc-cells" / cell_id / "summary.json").read_text())

    cmd = [sys.executable, "-m", "stages.experiment", rel, "--via", "dvc", "--jobs", "1"]
    res = dvc_project.run(cmd, timeout=500)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "1 queued now" in res.stdout
    cell_dir = project / "runs" / "dvc-cells" / cell_id
    summary = json.loads((cell_dir / "summary.json").read_text())
    record = json.loads((cell_dir / "cell.json").read_text())
    assert record["status"] == "done" and record["dvc_experiment"].startswith(cell_id + "-")
    # the pipeline ran the very config qimera run ran: the same final-epoch top-1
    assert summary["student_top1"] == pytest.approx(local_summary["student_top1"], abs=1e-6)
    assert summary["teacher_top1"] == pytest.approx(local_summary["teacher_top1"], abs=1e-6)
    shown = dvc_project.dvc("exp", "show", "--json", check=True).stdout
    assert record["dvc_experiment"] in shown

    parent, children = dvc_project.experiment_runs("dvc-cells")
    assert len(children) == 1
    child = children[0]
    # the child is the pipeline's own run (trained, evaluated, exported), not a copy of it
    assert child.info.run_id == summary["mlflow_run_id"] and child.info.status == "FINISHED"
    assert child.data.tags["dvc.exp_name"] == record["dvc_experiment"]
    assert child.data.tags["qimera.cell"] == cell_id and child.data.tags["qimera.column"] == "p=0.25"
    # named after its cell, with the short params the UI's columns show
    assert child.info.run_name == cell_id
    assert {k: child.data.params[k] for k in ("method", "bits", "seed", "generator.p")} == {
        "method": "qimera", "bits": "4w4a", "seed": "1", "generator.p": "0.25"}
    # DVC's twelve "No file hash info found" warnings per cell are said in one line
    assert "No file hash info found" not in res.stdout
    assert "DVC copied the workspace without" in res.stdout
    assert child.data.metrics["student_top1"] == pytest.approx(summary["student_top1"])

    again = dvc_project.run(cmd, timeout=300)  # finished: nothing is queued or run again
    assert again.returncode == 0, again.stdout[-4000:]
    assert "1 finished already, 0 queued now" in again.stdout
    assert len(dvc_project.experiment_runs("dvc-cells")[1]) == 1
    report = (project / "runs" / "dvc-cells" / "report.md").read_text()
    assert f"{summary['student_top1']:.2f} ± 0.00 (N=1)" in report
