"""End to end through Prefect: a real server on 127.0.0.1, the process work pool, the
deployments of prefect.yaml, a worker with ``--limit 1``, and ``qimera/demo`` run by name.

Everything runs in the ``dvc_project`` fixture's temporary git + DVC copy of the project
(tiny demo params, MLflow in a temporary SQLite file), to which ``pipelines/`` and
``prefect.yaml`` are added, with a temporary Prefect home and database. Every process is
started in its own session and killed by process group at teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import flow_run as _flow_run, flow_run_id as _flow_run_id, kill_group, prefect_cli as _cli, tail

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
POOL = "qimera-pool"

# The run's `overrides` parameter (passed to DVC as -S ++key=value), on top of the
# fixture's already tiny params.yaml.
TINY = {"train.epochs": 1, "train.iters_per_epoch": 2, "data.limit": 200}

RUN_WAIT_S = 240

pytestmark = pytest.mark.slow


RESULT_SCRIPT = """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    state = c.read_flow_run(sys.argv[1]).state
print("RESULT=" + json.dumps(state.result(), default=str))
"""


@pytest.mark.timeout(600)
def test_demo_deployment_runs_by_name(prefect_env, dvc_project, tmp_path):
    api = prefect_env["api"]
    project = dvc_project.path
    shutil.copytree(REPO / "pipelines", project / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "prefect.yaml", project / "prefect.yaml")
    dvc_project.commit("prefect deployments")
    # the project's environment (tiny threads, its MLflow store) plus the Prefect server's
    env = {**dvc_project.env, **prefect_env["settings"]}
    penv = {**env, "PWD": str(project)}  # `prefect deploy` bakes $PWD into the deployments

    _cli(penv, "work-pool", "create", POOL, "--type", "process", cwd=project)
    out = _cli(penv, "--no-prompt", "deploy", "--all", cwd=project, timeout=180)
    for name in ("demo", "cifar10", "cifar100", "imagenet"):
        assert f"qimera/{name}" in out, out

    # The imagenet deployment: ResNet-18 and 4w4a by default, parameters change them. The
    # run is created while no worker is up, inspected, and deleted.
    dep = httpx.get(f"{api}/deployments/name/qimera/imagenet", timeout=10).json()
    assert dep["parameters"] == {"preset": "imagenet", "model": "resnet18", "w_bits": 4, "a_bits": 4}
    assert dep["job_variables"]["env"]["QIMERA_PROJECT_DIR"] == str(project)
    out = _cli(penv, "deployment", "run", "qimera/imagenet", "--param", "model=resnet50",
               "--param", "w_bits=5", "--param", "a_bits=5", cwd=project)
    run = _flow_run(api, _flow_run_id(out))
    assert run["parameters"] == {"preset": "imagenet", "model": "resnet50", "w_bits": 5, "a_bits": 5}
    httpx.delete(f"{api}/flow_runs/{run['id']}", timeout=10).raise_for_status()
    bad = subprocess.run([PREFECT, "deployment", "run", "qimera/imagenet", "--param", "model=vgg16"],
                         env=penv, cwd=project, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0, bad.stdout  # the parameter schema only allows the ImageNet teachers

    # A worker started elsewhere (its cwd is not the project) with one run at a time.
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as wout:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
                                  env=env, cwd=tmp_path, stdout=wout, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out = _cli(penv, "deployment", "run", "qimera/demo", "--params",
                   json.dumps({"overrides": TINY}), cwd=tmp_path)
        flow_run_id = _flow_run_id(out)
        deadline = time.monotonic() + RUN_WAIT_S
        while True:
            state = _flow_run(api, flow_run_id)["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            if worker.poll() is not None:
                pytest.fail(f"worker exited with {worker.returncode}:\n{tail(worker_log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"flow run still {state['type']} after {RUN_WAIT_S} s:\n{tail(worker_log)}")
            time.sleep(2)
        assert state["type"] == "COMPLETED", f"{state}\n{tail(worker_log, 150)}"
    finally:
        kill_group(worker)

    res = subprocess.run([sys.executable, "-c", RESULT_SCRIPT, flow_run_id], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT=")]
    assert line, res.stdout + res.stderr
    result = json.loads(line[0][len("RESULT="):])
    assert result["preset"] == "demo" and result["w_bits"] == 4 and result["a_bits"] == 4
    assert result["flow_run_id"] == flow_run_id
    assert result["overrides"] == TINY
    assert result["dvc_experiment"]
    metrics = result["metrics"]
    assert metrics == json.loads((project / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == result["mlflow_run_id"]
    assert metrics["epochs"] == TINY["train.epochs"]
    for model in ("teacher", "naive", "student"):
        assert 0 <= metrics[model]["top1"] <= 100
    # the flow put params.yaml back as it was: the next run starts from the same params
    git = subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=project,
                         capture_output=True, text=True, timeout=60)
    assert git.stdout.strip() == "", git.stdout
    # the flow run's artifact: the accuracies and the MLflow run id
    arts = httpx.post(f"{api}/artifacts/filter", timeout=10, json={
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    ours = [a for a in arts if a["key"] == "qimera-demo-w4a4"]
    assert len(ours) == 1 and result["mlflow_run_id"] in ours[0]["data"], arts
    # and the run's page in the MLflow UI's model-training view
    assert result["mlflow_url"].endswith(f"/runs/{result['mlflow_run_id']}?workflowType=machine_learning")
    assert result["mlflow_url"] in ours[0]["data"]
    # dvc's output went through Prefect's logger into the flow run's logs
    logs = httpx.post(f"{api}/logs/filter", timeout=10, json={
        "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
    messages = "\n".join(entry["message"] for entry in logs)
    assert "dvc" in messages and "exp run" in messages and "preset=demo" in messages, messages

    client = dvc_project.client()
    mrun = client.get_run(result["mlflow_run_id"])
    assert mrun.info.status == "FINISHED"
    assert mrun.data.tags.get("prefect.flow_run_id") == flow_run_id, mrun.data.tags
    assert client.get_experiment(mrun.info.experiment_id).name == "demo"


RETRY_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from prefect import flow
from pipelines import flow as q

counter = Path(sys.argv[2])

def attempt(code):
    return [sys.executable, "-c",
            f"import sys; open({str(counter)!r}, 'a').write('x'); print('attempt'); sys.exit({code})"]

@flow(name="retry-probe")
def probe():
    out = {}
    for code in (2, 1):
        counter.write_text("")
        try:
            q.run_pipeline.with_options(retry_delay_seconds=[2, 2])(attempt(code), sys.argv[1])
        except q.FlowRunError as exc:
            out[code] = [type(exc).__name__, len(counter.read_text())]
    return out

print("OUT=" + __import__("json").dumps(probe()))
"""


@pytest.mark.timeout(300)
def test_task_retries_transient_failures_only(prefect_env, tmp_path):
    """Through the real server: a configuration error (a stage exiting with 2) is tried
    once; another failure is tried 1 + 2 times (retry delays shortened to 2 s)."""
    res = subprocess.run([sys.executable, "-c", RETRY_SCRIPT, str(REPO), str(tmp_path / "attempts")],
                         env=prefect_env["env"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("OUT=")]
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[0][4:])
    assert out == {"2": ["FlowInputError", 1], "1": ["FlowRunError", 3]}, out
