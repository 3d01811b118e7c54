"""An experiment through Prefect: a real server on 127.0.0.1, the deployments of
prefect.yaml, one worker, and ``qimera-experiment/demo-grid`` run by name. The experiment
flow run fans the cells out as ``qimera-cell/cell`` flow runs on the pool's ``cells``
queue, then reports and tracks the experiment in MLflow.

Runs in the ``dvc_project`` fixture's temporary copy of the project (which has
``experiments/``), with ``pipelines/`` and ``prefect.yaml`` added; every process is killed by process group.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from servers import PREFECT, flow_run_id, kill_group, prefect_cli, tail, wait_flow_run

REPO = Path(__file__).resolve().parents[2]
POOL = "qimera-pool"
pytestmark = pytest.mark.slow


def test_every_experiment_file_has_a_deployment():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    experiments = {d["name"]: d for d in deployments if d["entrypoint"].endswith(":experiment_flow")}
    files = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
    assert sorted(experiments) == files
    for name, dep in experiments.items():
        assert dep["parameters"] == {"experiment": f"experiments/{name}.yaml"}
    cells = [d for d in deployments if d["entrypoint"].endswith(":cell_flow")]
    assert len(cells) == 1 and cells[0]["name"] == "cell" and cells[0]["work_pool"]["work_queue_name"] == "cells"


@pytest.mark.timeout(900)
def test_experiment_deployment_fans_cells_out_and_reports(prefect_env, dvc_project, teacher_cache, tmp_path):
    api = prefect_env["api"]
    project = dvc_project.path
    shutil.copytree(REPO / "pipelines", project / "pipelines", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    env = {**dvc_project.env, **prefect_env["settings"]}
    penv = {**env, "PWD": str(project)}
    prefect_cli(penv, "work-pool", "create", POOL, "--type", "process", cwd=project)
    out = prefect_cli(penv, "--no-prompt", "deploy", "--all", cwd=project, timeout=240)
    assert "qimera-experiment/demo-grid" in out and "qimera-cell/cell" in out, out

    # demo-grid at one seed (4 cells), one epoch of two iterations on 100 images
    overrides = ["train.epochs=1", "train.iters_per_epoch=2", "train.lr_milestones=[1]", "train.warmup_epochs=0",
                 "train.batch_size=16", "data.limit=100", f"teacher.cache_dir={teacher_cache}"]
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as wout:  # the experiment's flow run holds one slot, cells take two
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "3"],
                                  env=env, cwd=tmp_path, stdout=wout, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out = prefect_cli(penv, "deployment", "run", "qimera-experiment/demo-grid", "--params",
                          json.dumps({"seeds": 1, "overrides": overrides, "threads": 1, "poll_seconds": 1}),
                          cwd=tmp_path)
        parent_id = flow_run_id(out)
        state = wait_flow_run(api, parent_id, worker, worker_log, 600)
        assert state["type"] == "COMPLETED", f"{state}\n{tail(worker_log, 200)}"
    finally:
        kill_group(worker)

    # one flow run of qimera-cell per cell, each a subflow of the experiment's flow run
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flow_runs": {"tags": {"all_": ["experiment:demo-grid"]}}}).json()
    assert len(runs) == 4 and {r["state"]["type"] for r in runs} == {"COMPLETED"}, runs
    assert {r["parameters"]["cell"] for r in runs} == {
        f"digits-qimera-w4a4-p={p}-k={k}-seed1" for p in (0.25, 0.7) for k in (2, 4)}
    assert all(r["parent_task_run_id"] for r in runs)

    # the report's entries are the cells' summaries
    exp_dir = project / "runs" / "demo-grid"
    with open(exp_dir / "report.csv") as handle:
        rows = {(r["row"], r["column"]): r for r in csv.DictReader(handle)}
    assert len(rows) == 4
    for run in runs:
        cell_dir = exp_dir / run["parameters"]["cell"]
        summary = json.loads((cell_dir / "summary.json").read_text())
        p = cell_dir.name.split("p=")[1].split("-")[0]
        k = cell_dir.name.split("k=")[1].split("-")[0]
        row = rows[(f"p={p}", f"K={k}")]
        assert row["n"] == "1" and float(row["mean_top1"]) == pytest.approx(summary["student_top1"], abs=1e-4)
        assert json.loads((cell_dir / "cell.json").read_text())["status"] == "done"

    # MLflow: one parent, one child per cell, the report attached
    parent, children = dvc_project.experiment_runs("demo-grid")
    assert len(children) == 4
    assert {a.path for a in dvc_project.client().list_artifacts(parent.info.run_id, "report")} >= {"report/report.md"}
    # the flow run's artifact is the report
    arts = httpx.post(f"{api}/artifacts/filter", timeout=10, json={
        "artifacts": {"flow_run_id": {"any_": [parent_id]}}}).json()
    assert any(a["key"] == "experiment-demo-grid" and "p=0.25" in a["data"] for a in arts), arts
    # with the page of the cells in the MLflow UI (the model-training view of the parent's cells)
    assert any(f"viewStateShareKey=cells-{parent.info.run_id}" in a["data"] for a in arts), arts
