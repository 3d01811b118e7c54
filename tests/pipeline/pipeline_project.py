"""A throw-away git + DVC copy of the project, for the pipeline tests (see conftest.py).

:func:`make_dvc_project` builds a :class:`DvcProject`: a fresh git repository in
a temporary directory holding ``dvc.yaml``, ``params.yaml``, ``stages/``, ``configs/``,
``qimera/``, ``experiments/``, ``.dvc/config``, ``.gitignore`` and ``.dvcignore``, committed, with
``params.yaml`` cut down to a seconds-long demo (:data:`TINY_PARAMS`). Its ``env`` puts
the running interpreter's bin directory first on PATH (the stages call ``python``),
points ``MLFLOW_TRACKING_URI`` at a SQLite file in the temporary directory, caches the
demo teacher in a per-session temporary directory and pins torch to one thread (tiny
workloads on shared cores run far faster that way). Use ``project.dvc("repro")`` or
``project.run([...])`` to run commands in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
PROJECT_DIRS = ("stages", "configs", "qimera", "experiments")
#: params.yaml overrides for a demo pipeline that runs in seconds (no warm-up and a
#: milestone at 1: configs refuse a warm-up that outlasts the run and milestones beyond it)
TINY_PARAMS = {
    "train": {"epochs": 2, "iters_per_epoch": 3, "batch_size": 16, "device": "cpu", "warmup_epochs": 0,
              "calibration_epochs": 1, "lr_milestones": [1]},
    "naive": {"batches": 2, "batch_size": 16},
    "export": {"latency_runs": 3},
    # the ladder stage has its own test (test_ladder.py); elsewhere it is switched off
    "ladder": {"experiment": None},
}
#: variables of the caller's environment that would leak into the project's runs
_SCRUB = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT",
          "DVC_STAGE", "PREFECT__FLOW_RUN_ID", "QIMERA_EPOCH_HOOK", "VIRTUAL_ENV",
          # Python writes bytecode next to the sources, as on a user's machine: .dvcignore
          # must keep it from changing the `qimera` dependency's hash
          "PYTHONDONTWRITEBYTECODE")


@dataclass
class DvcProject:
    path: Path
    env: dict[str, str]
    tracking_uri: str
    log: list[str] = field(default_factory=list)

    def run(self, cmd: list[str], *, env: dict | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the project; stdout and stderr together in ``.stdout``."""
        res = subprocess.run(cmd, cwd=self.path, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
        self.log.append(f"$ {' '.join(cmd)}\n{res.stdout}")
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {res.returncode}:\n{res.stdout[-6000:]}")
        return res

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run([DVC, *args], **kw)

    def git(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["git", *args], **kw)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, updates: dict) -> None:
        """Set ``{"section.key": value}`` (dotted) in params.yaml."""
        params = self.params()
        for dotted, value in updates.items():
            node = params
            *parents, last = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, message: str = "update") -> None:
        self.git("add", "-A", check=True)
        self.git("commit", "-q", "--allow-empty", "-m", message, check=True)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_runs(self, experiment: str):
        """The one FINISHED parent run of an experiment (stages.experiment) and its child runs."""
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        parents = client.search_runs([exp.experiment_id], "tags.`qimera.role` = 'parent'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        return parents[0], children

    def read_json(self, rel: str):
        import json

        return json.loads((self.path / rel).read_text())


def project_env(tracking_uri: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(workdir / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "qimera tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
        "GIT_COMMITTER_NAME": "qimera tests", "GIT_COMMITTER_EMAIL": "tests@localhost",
    })
    return env


def make_dvc_project(dest: Path, *, teacher_cache: Path, tracking_uri: str | None = None,
                     tiny: bool = True) -> DvcProject:
    """Copy the project into ``dest`` (must not exist), ``git init`` and commit it."""
    dest.mkdir(parents=True)
    for rel in PROJECT_FILES:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for rel in PROJECT_DIRS:
        shutil.copytree(REPO / rel, dest / rel, ignore=ignore)
    uri = tracking_uri or f"sqlite:///{dest.parent / (dest.name + '-mlflow.db')}"
    project = DvcProject(dest, project_env(uri, dest.parent), uri)
    if not (dest / ".dvc" / ".gitignore").is_file():
        project.dvc("init", "-q", "-f", check=True)
    updates = {"teacher.cache_dir": str(teacher_cache)}
    if tiny:
        updates.update({f"{sec}.{k}": v for sec, values in TINY_PARAMS.items() for k, v in values.items()})
    project.set_params(updates)
    project.git("init", "-q", check=True)
    project.commit("project")
    return project
