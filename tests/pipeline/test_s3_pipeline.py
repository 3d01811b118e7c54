"""The pipeline against an S3-compatible store (moto's server on 127.0.0.1, boto3 unpatched):

* the teacher's weights come from ``s3://`` into a ``dvc repro`` of the tiny demo;
* MLflow is a real ``mlflow server`` on loopback whose ``--artifacts-destination`` is an
  ``s3://`` bucket, so the run's artifacts and the registered model land in S3;
* the export stage uploads its files under ``export.s3_prefix``, which read back verified;
* ``dvc push`` / ``dvc pull`` move the pipeline's outputs through an S3 remote;
* a missing teacher bucket or export bucket stops the stage with its error, and leaves no
  export behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("boto3")
pytest.importorskip("onnxruntime")

from pipeline_project import DvcProject, make_dvc_project  # noqa: E402
from servers import free_port, kill_group, wait_healthy  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TEACHER_URL = "s3://qimera-teachers/digits/digits_cnn.pt"
EXPORT_PREFIX = "s3://qimera-exports/runs"
MLFLOW_BUCKET = "qimera-mlflow"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts proxied to S3."""
    root = tmp_path_factory.mktemp("mlflow-server")
    s3_server.bucket(MLFLOW_BUCKET)
    port = free_port()
    env = s3_server.process_env({k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, root)
    env["MLFLOW_S3_ENDPOINT_URL"] = s3_server.endpoint
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"],
            env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, "mlflow server", 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_group(proc)


@pytest.fixture(scope="module")
def s3_run(s3_server, mlflow_server, tmp_path_factory, teacher_cache):
    """The tiny demo with its teacher read from S3, MLflow on the server, exports to S3."""
    import torch

    from qimera.models.digits_cnn import DIGITS_MEAN, DIGITS_STD
    from qimera.teachers import load_teacher

    work = tmp_path_factory.mktemp("s3-run")
    teacher = load_teacher("demo", cache_dir=str(teacher_cache))
    weights = work / "digits_cnn.pt"
    torch.save(teacher.model.state_dict(), weights)
    client = s3_server.client()
    for bucket in ("qimera-teachers", "qimera-exports", "qimera-dvc"):
        s3_server.bucket(bucket)
    client.upload_file(str(weights), "qimera-teachers", "digits/digits_cnn.pt")

    project = make_dvc_project(work / "project", teacher_cache=teacher_cache, tracking_uri=mlflow_server)
    project.env = s3_server.process_env(project.env, work)
    project.set_params({
        "teacher.source": "checkpoint", "teacher.arch": "qimera.models.digits_cnn:DigitsCNN",
        "teacher.weights": TEACHER_URL, "teacher.num_classes": 10, "teacher.name": "digits_cnn",
        "teacher.input_size": [1, 8, 8], "teacher.mean": list(DIGITS_MEAN), "teacher.std": list(DIGITS_STD),
        "export.s3_prefix": EXPORT_PREFIX,
    })
    project.commit("teacher from S3, exports to S3")
    res = project.dvc("repro", timeout=900)
    assert res.returncode == 0, res.stdout[-8000:]
    project.commit("repro")
    project.weights_sha256 = sha256(weights)
    return project


def test_teacher_comes_from_s3_verified(s3_run):
    record = s3_run.read_json("outputs/teacher/teacher.json")
    assert record["source"] == "checkpoint" and record["source_weights"] == TEACHER_URL
    assert record["source_sha256"] == s3_run.weights_sha256
    assert record["top1"] > 90.0  # the demo teacher, loaded intact
    log = "\n".join(s3_run.log)
    assert f"fetch_teacher: {TEACHER_URL}" in log and "verified" in log


def test_exports_are_uploaded_and_read_back(s3_run, s3_server, tmp_path, monkeypatch):
    from qimera.export import OnnxRuntimeModel, load_integer
    from stages import s3

    model = s3_run.read_json("outputs/export/model.json")
    uri = model["s3_uri"]
    assert uri == f"{EXPORT_PREFIX}/qimera-demo-w4a4/{model['mlflow_run_id']}"
    keys = s3_server.keys("qimera-exports", uri[len("s3://qimera-exports/"):] + "/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"MANIFEST.json", "student.onnx", "student.pt", "MODEL_CARD.md", "verification.json",
            "quant_map.json", "student.safetensors", "config.yaml"} <= names, keys
    for key, value in s3_server.process_env({}, tmp_path).items():
        monkeypatch.setenv(key, value)
    manifest = s3.download_dir(uri, tmp_path / "back")
    assert manifest["mlflow_run_id"] == model["mlflow_run_id"] and manifest["registered_model"] == "qimera-demo-w4a4"
    local = s3_run.path / "outputs/export"
    for rel in manifest["files"]:
        assert sha256(tmp_path / "back" / rel) == sha256(local / rel), rel
    import torch

    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        a = load_integer(tmp_path / "back" / "integer")(x)
        b = OnnxRuntimeModel(tmp_path / "back" / "student.onnx")(x)
    assert a.shape == b.shape == (5, 10)


def test_mlflow_server_keeps_artifacts_in_s3(s3_run, s3_server):
    model = s3_run.read_json("outputs/export/model.json")
    client = s3_run.client()
    run = client.get_run(model["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["s3_uri"] == model["s3_uri"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    keys = s3_server.keys(MLFLOW_BUCKET)
    run_keys = [k for k in keys if f"/{run.info.run_id}/artifacts/" in k]
    for rel in ("export/student.onnx", "export/MODEL_CARD.md", "evaluation/metrics.json", "figures/samples.png"):
        assert any(k.endswith(rel) for k in run_keys), (rel, run_keys)
    assert any(k.endswith("MLmodel") for k in keys)  # the logged model's files
    version = client.get_model_version_by_alias("qimera-demo-w4a4", "champion")
    assert version.run_id == run.info.run_id and version.tags["bits"] == "w4a4"
    assert version.tags["teacher"] == "checkpoint:digits_cnn" and version.tags["s3_uri"] == model["s3_uri"]


def test_dvc_push_and_pull_through_an_s3_remote(s3_run, s3_server, tmp_path):
    project: DvcProject = s3_run
    project.dvc("remote", "add", "-d", "storage", "s3://qimera-dvc/cache", check=True)
    project.dvc("remote", "modify", "storage", "endpointurl", s3_server.endpoint, check=True)
    project.commit("S3 remote")
    pushed = project.dvc("push", timeout=300)
    assert pushed.returncode == 0, pushed.stdout
    assert len(s3_server.keys("qimera-dvc", "cache/")) >= 5

    # a teammate's fresh clone: git brings the code and dvc.lock, `dvc pull` the outputs
    subprocess.run(["git", "clone", "-q", str(project.path), str(tmp_path / "clone")], check=True,
                   env=project.env, timeout=120)
    clone = DvcProject(tmp_path / "clone", dict(project.env), project.tracking_uri)
    assert not (clone.path / "outputs/export/student.onnx").exists()
    pulled = clone.dvc("pull", timeout=300)
    assert pulled.returncode == 0, pulled.stdout

    def files(root: Path) -> dict:
        return {p.relative_to(root): sha256(p) for p in (root / "outputs").rglob("*") if p.is_file()}

    assert files(clone.path) == files(project.path)
    status = clone.dvc("status", timeout=120)
    assert "up to date" in status.stdout, status.stdout


def test_missing_buckets_stop_the_stage_with_their_error(s3_run, tmp_path):
    shutil.copytree(s3_run.path, tmp_path / "p", symlinks=True)
    project = DvcProject(tmp_path / "p", dict(s3_run.env), s3_run.tracking_uri)
    before = (project.path / "outputs/export/model.json").read_bytes()

    project.set_params({"export.s3_prefix": "s3://no-such-export-bucket/runs"})
    res = project.dvc("repro", timeout=600)
    assert res.returncode != 0
    assert "bucket 'no-such-export-bucket' does not exist" in res.stdout, res.stdout[-4000:]
    assert "Traceback" not in res.stdout
    # nothing half-written: the previous export stays as it was, no temporary directory is left
    assert (project.path / "outputs/export/model.json").read_bytes() == before
    assert not [p for p in (project.path / "outputs").iterdir() if p.name.startswith(".export-")]

    project.set_params({"export.s3_prefix": None, "teacher.weights": "s3://no-such-teacher-bucket/w.pt"})
    res = project.dvc("repro", "fetch_teacher", timeout=600)
    assert res.returncode != 0
    assert "bucket 'no-such-teacher-bucket' does not exist" in res.stdout, res.stdout[-4000:]
    params = yaml.safe_load((project.path / "params.yaml").read_text())
    assert params["teacher"]["weights"] == "s3://no-such-teacher-bucket/w.pt"
