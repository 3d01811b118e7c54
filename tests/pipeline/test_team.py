"""The team setup of pipelines/README.md ("From one machine to many"), on one machine.

Every server is real and listens on 127.0.0.1 only: a Prefect server, an ``mlflow server``
whose artifacts go to moto's S3 server, and the same S3 server as the DVC remote and the
cells' checkpoint store. The repository lives in a local bare repository; the
"laptop" (the test's project) pushes to it and deploys ``prefect.team.yaml``; two process
workers start in empty directories of their own and each flow run clones the deployed
commit into its own temporary directory. The workers share nothing but the servers.

An experiment of four digits cells runs over both workers. Worker A is killed (with every
process it started, as a lost machine) once its cell's first checkpoint is in S3; Prefect
marks that flow run CRASHED when its heartbeats stop (``python -m pipelines.zombies``), the
experiment flow submits the cell again, worker B takes it and resumes from the
checkpoint. Then: the report equals the cells' MLflow runs, every cell's DVC experiment
is in the bare repository and its outputs in the DVC remote (the laptop pulls one back),
and the test credentials appear in no log, no Prefect object and no MLflow record.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import isolated_aws_files
from pipeline_project import DVC, make_dvc_project
from servers import PREFECT, MlflowServer, flow_run_id, kill_group, prefect_cli, tail

REPO = Path(__file__).resolve().parents[2]
POOL = "qimera-team"
EXPERIMENT = "demo-grid"
#: every cell: 3 epochs of 100 iterations (seconds each on one thread), 200 test images
OVERRIDES = ["train.epochs=3", "train.iters_per_epoch=100", "train.batch_size=32", "train.lr_milestones=[2]",
             "train.warmup_epochs=0", "data.limit=200"]


#: saves a Secret block (named by argv[1]) of the S3 credentials in the environment
SAVE_SECRET = ("import os, sys\nfrom prefect.blocks.system import Secret\n"
               "Secret(value={k: os.environ[k] for k in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY')})"
               ".save(sys.argv[1], overwrite=True)\n")


def _deployments(name: str) -> list[dict]:
    return yaml.safe_load((REPO / name).read_text())["deployments"]


def test_the_team_file_deploys_what_prefect_yaml_deploys():
    """prefect.team.yaml differs from prefect.yaml only in where flow runs get their code
    (a git clone) and their pool; the deployments themselves are the same."""
    team, local = _deployments("prefect.team.yaml"), _deployments("prefect.yaml")

    def strip(dep):
        return {k: v for k, v in dep.items() if k != "work_pool"}

    assert [strip(d) for d in team] == [strip(d) for d in local]
    assert [d["work_pool"]["work_queue_name"] for d in team] == [d["work_pool"]["work_queue_name"] for d in local]
    spec = yaml.safe_load((REPO / "prefect.team.yaml").read_text())
    assert list(spec["pull"][0]) == ["prefect.deployments.steps.git_clone"]
    env = spec["definitions"]["work_pool"]["job_variables"]["env"]
    # settings travel (each the deploying shell's variable of the same name), credentials never do
    assert not set(env) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"}, env
    assert all(value in ("{{ $%s }}" % key, "30") for key, value in env.items()), env


def test_a_secret_block_gives_a_flow_run_its_credentials_by_name(prefect_env):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.remote import RemoteSettings
    from stages.s3 import StorageError

    def settings(name):
        return RemoteSettings.from_env({"QIMERA_REMOTE": "s3://b/c", "QIMERA_AWS_SECRET_BLOCK": name})

    with temporary_settings(updates={PREFECT_API_URL: prefect_env["api"]}):
        Secret(value={"AWS_ACCESS_KEY_ID": "id-1", "AWS_SECRET_ACCESS_KEY": "secret-1"}).save("unit-s3", overwrite=True)
        Secret(value="just-a-string").save("unit-str", overwrite=True)
        Secret(value={"AWS_ACCESS_KEY_ID": "id-1", "PASSWORD": "x"}).save("unit-other", overwrite=True)
        Secret(value={"AWS_ACCESS_KEY_ID": "id-1"}).save("unit-half", overwrite=True)
        env: dict[str, str] = {}
        assert settings("unit-s3").use_credentials(env) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        assert env == {"AWS_ACCESS_KEY_ID": "id-1", "AWS_SECRET_ACCESS_KEY": "secret-1"}
        assert RemoteSettings.from_env({}).use_credentials(env) == []
        for name, words in [("no-such-block", "QIMERA_AWS_SECRET_BLOCK='no-such-block'"),
                            ("unit-str", "must hold a JSON object"), ("unit-other", "it holds"),
                            ("unit-half", "lacks AWS_SECRET_ACCESS_KEY")]:
            with pytest.raises(StorageError, match=words) as info:
                settings(name).use_credentials({})
            assert "secret-1" not in str(info.value) and "just-a-string" not in str(info.value)


def _git(*args: str, cwd: Path, env: dict) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _worker(name: str, queues: list[str], limit: int, env: dict, root: Path) -> tuple[subprocess.Popen, Path]:
    home = root / name
    home.mkdir()
    log = root / f"{name}.log"
    cmd = [PREFECT, "worker", "start", "--pool", POOL, "--name", name, "--limit", str(limit)]
    for queue in queues:
        cmd += ["--work-queue", queue]
    wenv = {**env, "PREFECT_HOME": str(home / "prefect-home"), "QIMERA_GPU_SLOTS": str(home / "gpu-slots")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=wenv, cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def _submitted(log: Path) -> list[str]:
    """The flow run ids a worker's log says it submitted."""
    import re

    return re.findall(r"[Ss]ubmitting flow run '([0-9a-f-]{36})'", log.read_text(errors="replace"))


def _kill_machine(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and everything it started, wherever their process groups are."""
    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _wait(predicate, timeout: float, what: str, logs: list[Path], step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"{what}: not after {timeout} s\n" + "\n".join(f"--- {p.name}\n{tail(p, 60)}" for p in logs))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_workers_in_their_own_clones_share_only_the_servers(prefect_env, s3_server, teacher_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    from qimera.experiments import load_experiment
    from qimera.trainer import CHECKPOINT_NAME

    from stages.common import METRICS, MLFLOW_RUN

    api = prefect_env["api"]
    bucket = s3_server.bucket("team")
    s3 = {**s3_server.env, **isolated_aws_files(tmp_path)}
    secrets = [s3_server.env["AWS_ACCESS_KEY_ID"], s3_server.env["AWS_SECRET_ACCESS_KEY"]]

    # the tracking server: artifacts proxied to S3 (only the server holds S3 credentials for them)
    (tmp_path / "mlflow").mkdir()
    mlflow = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{bucket}/mlflow",
                          env={**s3, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint})
    mlflow.start()
    workers: list[subprocess.Popen] = []
    try:
        # the laptop: the project, pushed to a bare repository that every worker clones from
        laptop = make_dvc_project(tmp_path / "laptop", teacher_cache=teacher_cache, tracking_uri=mlflow.url)
        shutil.copytree(REPO / "pipelines", laptop.path / "pipelines",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("prefect.yaml", "prefect.team.yaml"):
            shutil.copy2(REPO / name, laptop.path / name)
        laptop.commit("pipelines")
        genv = {k: v for k, v in laptop.env.items() if not k.startswith("AWS_")}
        bare = tmp_path / "qimera.git"
        _git("init", "-q", "--bare", str(bare), cwd=tmp_path, env=genv)
        _git("remote", "add", "origin", str(bare), cwd=laptop.path, env=genv)
        _git("push", "-q", "origin", "HEAD", cwd=laptop.path, env=genv)
        commit = _git("rev-parse", "HEAD", cwd=laptop.path, env=genv).strip()

        settings = {"QIMERA_REMOTE": f"s3://{bucket}/cells", "QIMERA_DVC_REMOTE": f"s3://{bucket}/dvc",
                    "QIMERA_DVC_EXP_REMOTE": "origin", "MLFLOW_TRACKING_URI": mlflow.url,
                    "QIMERA_AWS_SECRET_BLOCK": "team-s3"}
        deployer = {**genv, **prefect_env["settings"], **settings, "PWD": str(laptop.path)}
        prefect_cli(deployer, "work-pool", "create", POOL, "--type", "process", cwd=laptop.path)
        out = prefect_cli(deployer, "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.team.yaml",
                          cwd=laptop.path, timeout=600)
        assert "qimera-experiment/demo-grid" in out and "qimera-cell/cell" in out, out
        # four heartbeats of slack: with `make test`'s two workers, a busy flow run's heartbeat
        # came more than 60 s late and a healthy cell was taken for a zombie
        subprocess.run([sys.executable, "-m", "pipelines.zombies", "--within", "120"], cwd=laptop.path,
                       env=deployer, check=True, capture_output=True, timeout=120)
        # the S3 credentials as a Secret block, read from the environment (never a command line)
        subprocess.run([sys.executable, "-c", SAVE_SECRET, "team-s3"], cwd=laptop.path, check=True, timeout=120,
                       env={**deployer, **{k: s3[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
        dep = httpx.get(f"{api}/deployments/name/qimera-cell/cell", timeout=10).json()
        assert dep["pull_steps"][0]["prefect.deployments.steps.git_clone"]["commit_sha"] == commit
        assert dep["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == str(bare)

        # two machines: their own directories and Prefect homes; MLflow and the remotes come
        # from the pool's job variables. A has the S3 credentials in its environment, B has
        # none: its flow runs take them from the Secret block the job variables name
        wenv = {**{k: v for k, v in genv.items() if k != "MLFLOW_TRACKING_URI"}, **prefect_env["settings"], **s3}
        worker_a, log_a = _worker("worker-a", ["cells"], 1, wenv, tmp_path)
        workers.append(worker_a)
        bare_env = {k: v for k, v in wenv.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        worker_b, log_b = _worker("worker-b", ["default", "cells"], 3, bare_env, tmp_path)
        workers.append(worker_b)
        logs = [log_a, log_b]

        overrides = [*OVERRIDES, f"teacher.cache_dir={teacher_cache}"]
        params = {"seeds": 1, "overrides": overrides, "threads": 1, "poll_seconds": 1}
        parent_id = flow_run_id(prefect_cli(deployer, "deployment", "run", f"qimera-experiment/{EXPERIMENT}",
                                            "--params", json.dumps(params), cwd=tmp_path))
        exp = load_experiment(laptop.path / "experiments" / f"{EXPERIMENT}.yaml", seeds=1, overrides=tuple(overrides))
        cells = {c.id: c for c in exp.cells}
        assert len(cells) == 4

        # worker A's cell, killed with its machine once its first checkpoint is in S3
        def a_cell():
            for run_id in _submitted(log_a):
                run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
                if run["parameters"].get("cell") in cells:
                    return run
            return None

        first = _wait(a_cell, 300, "worker A takes a cell", logs)
        victim = cells[first["parameters"]["cell"]]
        prefix = f"cells/runs/{EXPERIMENT}/{victim.key}"
        _wait(lambda: f"{prefix}/{MLFLOW_RUN.name}" in s3_server.keys(bucket, prefix), 300,
              "worker A's first checkpoint reaches S3", logs)
        assert f"{prefix}/{CHECKPOINT_NAME}" in s3_server.keys(bucket, prefix)
        assert "MANIFEST.json" not in " ".join(s3_server.keys(bucket, prefix)), "the cell finished before the kill"
        _kill_machine(worker_a)

        def ended():
            state = httpx.get(f"{api}/flow_runs/{parent_id}", timeout=10).json()["state"]
            if worker_b.poll() is not None:
                pytest.fail(f"worker B exited:\n{tail(log_b)}")
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(ended, 900, "the experiment ends", logs, step=2)
        assert state["type"] == "COMPLETED", f"{state}\n{tail(log_b, 200)}"
        for worker in workers:  # both machines go: what follows reads only the servers
            kill_group(worker)
        client = MlflowClient(tracking_uri=mlflow.url)
        exp_ml = client.get_experiment_by_name(EXPERIMENT)
        runs_by_exp = client.search_runs([exp_ml.experiment_id]) if exp_ml is not None else []

        # Prefect: the killed cell's flow run CRASHED, its retry ran on worker B and resumed
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
            "flow_runs": {"tags": {"all_": [f"experiment:{EXPERIMENT}"]}}}).json()
        by_cell: dict[str, list[dict]] = {}
        for run in runs:
            by_cell.setdefault(run["parameters"]["cell"], []).append(run)
        assert sorted(by_cell) == sorted(cells)
        for cell_id, cell_runs in by_cell.items():
            kinds = sorted(r["state"]["type"] for r in cell_runs)
            assert kinds == (["COMPLETED", "CRASHED"] if cell_id == victim.id else ["COMPLETED"]), (cell_id, kinds)
        retry = next(r for r in by_cell[victim.id] if r["state"]["type"] == "COMPLETED")
        assert retry["name"].endswith("(retry 1)") and retry["id"] in _submitted(log_b)
        retry_logs = httpx.post(f"{api}/logs/filter", timeout=10, json={
            "logs": {"flow_run_id": {"any_": [retry["id"]]}}, "limit": 200}).json()
        assert any("resuming from the checkpoint in s3://" in entry["message"] for entry in retry_logs), retry_logs

        # MLflow: one parent, one child per cell (the cells' own pipeline runs); the report
        # (an artifact of the parent, in S3 through the server) equals the children's metrics
        parents = [r for r in runs_by_exp if r.data.tags.get("qimera.role") == "parent"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = {r.data.tags["qimera.cell"]: r for r in runs_by_exp
                    if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
        assert sorted(children) == sorted(cells)
        assert all(r.info.status == "FINISHED" for r in children.values())
        assert int(children[victim.id].data.tags["resumed_from_epoch"]) >= 1  # not epoch 0
        assert [k for k in s3_server.keys(bucket, "mlflow/") if k.endswith("report/report.csv")]
        report = Path(client.download_artifacts(parents[0].info.run_id, "report/report.csv", str(tmp_path)))
        with open(report) as handle:
            rows = {(r["row"], r["column"]): r for r in csv.DictReader(handle)}
        assert len(rows) == 4
        for cell_id, child in children.items():
            cell = cells[cell_id]
            row = rows[(cell.row, cell.column)]
            assert row["n"] == "1" and float(row["mean_top1"]) == pytest.approx(child.data.metrics["student_top1"],
                                                                                 abs=1e-4)

        # DVC: every cell's experiment in the bare repository, its outputs in the DVC remote;
        # the laptop pulls one back and finds the cell's exported student
        refs = _git("ls-remote", str(bare), "refs/exps/*", cwd=tmp_path, env=genv)
        assert all(cell.key in refs for cell in cells.values()), refs
        assert s3_server.keys(bucket, "dvc/")
        lenv = {**laptop.env, **s3}
        for cmd in ([DVC, "remote", "add", "--local", "-d", "team", f"s3://{bucket}/dvc"],
                    [DVC, "remote", "modify", "--local", "team", "endpointurl", s3_server.endpoint],
                    [DVC, "exp", "pull", "origin", victim.key], [DVC, "exp", "apply", victim.key]):
            res = laptop.run(cmd, env=lenv, timeout=300)
            assert res.returncode == 0, res.stdout[-3000:]
        metrics = laptop.read_json(str(METRICS))
        assert metrics["student"]["top1"] == pytest.approx(children[victim.id].data.metrics["student_top1"])
        assert (laptop.path / "outputs" / "export").is_dir() and any((laptop.path / "outputs" / "export").iterdir())

        # no credential anywhere: worker and server logs, Prefect's API, MLflow's store
        texts = {p.name: p.read_text(errors="replace") for p in (log_a, log_b, prefect_env["server_log"], mlflow.log)}
        texts["deployments"] = httpx.post(f"{api}/deployments/filter", timeout=10, json={}).text
        texts["flow runs"] = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={}).text
        texts["logs"] = _all_logs(api)
        texts["work pool"] = httpx.get(f"{api}/work_pools/{POOL}", timeout=10).text
        texts["mlflow runs"] = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs_by_exp])
        texts["mlflow.db"] = (tmp_path / "mlflow" / "mlflow.db").read_bytes().decode("latin-1")
        leaks = {where: s for where, text in texts.items() for s in secrets if s in text}
        assert not leaks, leaks
        assert "MLFLOW_TRACKING_URI" in texts["deployments"]  # the job variables are there, the credentials not
    finally:
        for worker in workers:
            kill_group(worker)
        mlflow.stop()


def _all_logs(api: str) -> str:
    """Every log record on the server, as JSON text (the API returns at most 200 at a time)."""
    out, offset = [], 0
    while True:
        page = httpx.post(f"{api}/logs/filter", timeout=30, json={"limit": 200, "offset": offset}).json()
        out += page
        offset += len(page)
        if len(page) < 200:
            return json.dumps(out)
