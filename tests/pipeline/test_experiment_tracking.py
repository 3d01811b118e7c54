"""An experiment tracked in MLflow: one parent run, one child run per cell, the report as
the parent's artifacts, and a rerun that neither reruns cells nor duplicates child runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_parent_run_with_one_child_per_cell(tiny_config, tmp_path):
    base = dict(tiny_config)
    base["train"] = {**base["train"], "epochs": 1, "iters_per_epoch": 2}
    base["naive"] = {"enabled": False}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "tracked", "seeds": [1], "plot": "lines",
            "grids": [{"label": "digits", "config": "base.yaml", "axes": {"generator.p": [0.25, 0.75]},
                       "row": "{label}", "column": "p={generator.p}"}]}
    (tmp_path / "tracked.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run():
        res = subprocess.run([sys.executable, "-m", "stages.experiment", "tracked.yaml", "--jobs", "2"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        return res

    run()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tracked")
    parents = client.search_runs([exp.experiment_id], "tags.`qimera.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.data.tags["qimera.column"] for c in children) == ["p=0.25", "p=0.75"]
    assert sorted(c.info.run_name for c in children) == ["digits-qimera-w4a4-p=0.25-seed1",
                                                          "digits-qimera-w4a4-p=0.75-seed1"]
    assert all(c.data.params["bits"] == "4w4a" and c.data.params["seed"] == "1" for c in children)
    note = parents[0].data.tags["mlflow.note.content"]
    assert "2 cells" in note and "generator.p in 0.25, 0.75" in note
    shared = client.get_experiment(exp.experiment_id).tags[f"mlflow.sharedViewState.cells-{parent}"]
    assert parent in json.loads(shared)["searchFilter"]
    for child in children:
        summary = json.loads((tmp_path / "runs" / "tracked" / child.data.tags["qimera.cell"] / "summary.json").read_text())
        assert child.data.metrics["student_top1"] == pytest.approx(summary["student_top1"])
        assert child.data.params["generator.p"] == child.data.params["axis.generator.p"]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss_g")] == [1]
        # timed as the cell ran, not as it was logged
        assert child.info.end_time - child.info.start_time == pytest.approx(1000 * summary["seconds"], abs=2)
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert names == {"report/report.md", "report/report.csv", "report/report.png"}

    second = run()  # nothing to run again, and no second set of children
    assert "2 finished already, 0 to run" in second.stderr
    assert len(client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")) == 2
    assert len(client.search_runs([exp.experiment_id], "tags.`qimera.role` = 'parent'")) == 1
