"""The DVC pipeline end to end in a temporary git repository: `dvc repro` of a tiny demo,
what MLflow recorded, a rerun that does nothing, exact reruns after a param change, a
killed `train` that resumes, and bad input that stops before training."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time

import pytest
import yaml

import epoch_hooks
from pipeline_project import DVC, REPO, DvcProject, make_dvc_project
from stages.common import available_presets

pytestmark = pytest.mark.slow

STAGES = ("resolve", "fetch_teacher", "init_embeddings", "train", "evaluate", "export", "ladder")


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


def skipped(out: str) -> set[str]:
    return set(re.findall(r"Stage '(\w+)' didn't change, skipping", out))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_files(project: DvcProject) -> list:
    cache = project.path / ".dvc" / "cache"
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_cache):
    """The tiny demo after one `dvc repro` (read-only for the tests that use it)."""
    project = make_dvc_project(tmp_path_factory.mktemp("built") / "project", teacher_cache=teacher_cache)
    start = time.perf_counter()
    res = project.dvc("repro", timeout=600)
    project.seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stdout[-6000:]
    assert ran(res.stdout) == set(STAGES), res.stdout
    project.commit("repro")
    return project


@pytest.fixture
def copy_of_built(built, tmp_path) -> DvcProject:
    """A private copy of the built project (git, DVC cache, outputs and MLflow store)."""
    dest = tmp_path / "project"
    shutil.copytree(built.path, dest, symlinks=True)
    db = tmp_path / "mlflow.db"
    shutil.copy2(built.tracking_uri[len("sqlite:///"):], db)
    uri = f"sqlite:///{db}"
    return DvcProject(dest, {**built.env, "MLFLOW_TRACKING_URI": uri}, uri)


def test_repro_runs_the_demo_and_records_everything(built, tmp_path):
    print(f"first dvc repro of the tiny demo: {built.seconds:.1f} s")
    m = built.read_json("metrics.json")
    assert m["w_bits"] == 4 and m["a_bits"] == 4
    assert m["epochs"] == 2 and m["iterations"] == 6
    for model in ("teacher", "naive", "student"):
        assert 0.0 <= m[model]["top1"] <= m[model]["top5"] <= 100.0
        assert len(m[model]["per_class"]) == 10
    assert m["teacher"]["top1"] >= 90.0  # the demo teacher, ~99% on held-out digits

    teacher = built.read_json("outputs/teacher/teacher.json")
    assert teacher["source"] == "demo" and teacher["arch"] == "qimera.models.digits_cnn:DigitsCNN"
    assert teacher["sha256"] == sha256(built.path / "outputs/teacher/weights.pt")
    assert teacher["top1"] == pytest.approx(m["teacher"]["top1"], abs=1e-3)
    rows = (built.path / "outputs/history.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "loss_g"] and len(rows) == 3
    assert built.read_json("outputs/train/train.json")["resumed_from_epoch"] == 0
    model_info = built.read_json("outputs/export/model.json")
    assert model_info["student_sha256"] == sha256(built.path / "outputs/export/student.pt")
    run_cfg = yaml.safe_load((built.path / "outputs/export/config.yaml").read_text())
    from qimera.data import load_eval_data
    from qimera.export import load_integer

    card = (built.path / "outputs/export/MODEL_CARD.md").read_text()
    assert "# qimera-demo-w4a4" in card and "without any training data" in card
    assert f"{m['student']['top1']:.2f}% top-1" in card and f"{m['teacher']['top1']:.2f}% top-1" in card
    assert "source: `demo`" in card and "preset: demo" in card
    integer = load_integer(built.path / "outputs/export/integer")  # rebuilt from integers alone
    x, _ = next(iter(load_eval_data("digits", batch_size=64).loader))
    assert integer(x).shape == (64, 10)
    v = built.read_json("outputs/export/verification.json")
    assert v["samples"] == teacher["num_samples"]  # the whole evaluation set
    assert v["student_top1"] == pytest.approx(m["student"]["top1"], abs=1e-3)
    assert v["integer_max_abs_logit_delta"] <= 1e-5 and abs(v["onnx_top1"] - v["student_top1"]) <= 0.1
    assert "onnxruntime" in card and "QuantizeLinear" in card
    import onnx

    graph = onnx.load(str(built.path / "outputs/export/student.onnx"))
    assert {n.op_type for n in graph.graph.node} >= {"QuantizeLinear", "Clip", "DequantizeLinear", "Conv"}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["qimera.bits"] == "w4a4" and meta["qimera.mlflow_run_id"] == m["mlflow_run_id"]
    # the deployable int8 form: verified like the reference form, timed beside the float teacher
    int8 = onnx.load(str(built.path / "outputs/export/student.int8.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in int8.graph.node}
    assert {p.key: p.value for p in int8.metadata_props}["qimera.bits"] == "w4a4"
    assert abs(v["onnx_int8_top1"] - v["student_top1"]) <= 0.1 and v["onnx_int8_prediction_agreement"] >= 0.99
    assert v["onnx_int8"]["folded_batchnorms"] == 3 and v["onnx_int8"]["int4_weights"] == 4
    d = v["deployment"]
    assert set(d["forms"]) == {"fp32", "qdq", "int8"} and d["runs"] == 3 and d["batches"] == [1, 64]
    assert d["forms"]["int8"]["integer_ops"]["QLinearConv"] == 2 and not d["forms"]["qdq"]["integer_ops"]
    assert d["forms"]["int8"]["file_bytes"] < d["forms"]["qdq"]["file_bytes"] < d["forms"]["fp32"]["file_bytes"]
    assert "`student.int8.onnx`: int8 form" in card and d["machine"]["cpu"] in card
    assert run_cfg["preset"] == "demo" and run_cfg["train"]["out_dir"] == "outputs/train"
    for png in ("samples.png", "pca.png", "curves.png"):
        assert (built.path / "outputs/figures" / png).read_bytes()[:4] == b"\x89PNG"

    client = built.client()
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "demo"
    p = run.data.params
    assert p["preset"] == "demo" and p["method"] == "qimera" and p["preset_file"] == "demo.yaml"
    assert p["quant.w_bits"] == "4" and p["quant.a_bits"] == "4"
    assert p["train.epochs"] == "2" and p["train.iters_per_epoch"] == "3"
    assert p["generator.p"] == "0.4" and p["generator.embedding_init"] == "random"
    assert p["train.lr_generator"] == "0.001"  # from configs/demo.yaml (null in params.yaml)
    head = built.git("rev-parse", "HEAD~1", check=True).stdout.strip()
    t = run.data.tags
    assert t["mlflow.source.git.commit"] == head and t["git_commit"] == head
    assert t["device"] == "cpu" and t["preset"] == "demo" and t["bits"] == "w4a4"
    assert "dvc.exp_name" not in t and "prefect.flow_run_id" not in t  # plain `dvc repro`
    for key in ("loss_g", "loss_g_ce", "loss_g_bns", "loss_s", "top1", "top5", "iters_per_second",
                "teacher_agree_plain", "teacher_max_prob", "label_max"):  # and the generated samples' diagnostics
        assert [h.step for h in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    final = run.data.metrics
    for model in ("teacher", "naive", "student"):
        assert final[f"{model}_top1"] == pytest.approx(m[model]["top1"], abs=1e-3)

    def listing(path=None):
        out = []
        for a in client.list_artifacts(run.info.run_id, path):
            out += listing(a.path) if a.is_dir else [a.path]
        return out

    arts = set(listing())
    assert {"config/run.yaml", "figures/samples.png", "figures/pca.png", "figures/curves.png",
            "evaluation/metrics.json", "training/history.csv", "export/config.yaml", "export/student.onnx", "export/verification.json",
            "export/student.int8.onnx",
            "export/integer/quant_map.json", "export/integer/student.safetensors"} <= arts, arts
    assert final["onnx_top1"] == pytest.approx(v["onnx_top1"])
    assert final["onnx_int8_top1"] == pytest.approx(v["onnx_int8_top1"])
    assert final["deploy_int8_latency_ms_b64"] == pytest.approx(d["forms"]["int8"]["latency_ms"]["64"])

    versions = client.search_model_versions("name='qimera-demo-w4a4'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert model_info["registered_model"] == "qimera-demo-w4a4"
    assert str(model_info["registered_version"]) == str(versions[0].version)
    tags = versions[0].tags
    assert tags["bits"] == "w4a4" and tags["preset"] == "demo" and tags["teacher"] == "demo:digits_cnn"
    assert float(tags["top1"]) == pytest.approx(m["student"]["top1"], abs=1e-3)
    assert model_info["champion"] is True and model_info["s3_uri"] is None  # first version; no upload
    assert client.get_model_version_by_alias("qimera-demo-w4a4", "champion").version == versions[0].version
    # the registered version carries both ONNX forms
    listed = subprocess.run(
        ["python", "-c", "import os, sys; from mlflow.artifacts import download_artifacts; "
         "p = download_artifacts('models:/qimera-demo-w4a4/1', dst_path=sys.argv[1]); "
         "print(sorted(os.listdir(os.path.join(p, 'extra_files'))))", str(tmp_path / "registered")],
        cwd=built.path, env=built.env, capture_output=True, text=True, timeout=300)
    assert listed.stdout.strip().endswith("['student.int8.onnx', 'student.onnx']"), listed.stdout + listed.stderr
    # the registered model loads and classifies digits (pickle format)
    check = subprocess.run(
        ["python", "-c",
         "import mlflow.pytorch, torch; m = mlflow.pytorch.load_model('models:/qimera-demo-w4a4/1'); "
         "print(tuple(m(torch.randn(3, 1, 8, 8)).shape))"],
        cwd=built.path, env=built.env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip().endswith("(3, 10)"), check.stdout + check.stderr


def test_second_repro_runs_nothing_and_reports_work(built, tmp_path):
    assert list((built.path / "qimera").rglob("*.pyc"))  # bytecode is there and must not count
    res = built.dvc("repro", check=True)
    assert ran(res.stdout) == set() and skipped(res.stdout) == set(STAGES), res.stdout
    assert "Data and pipelines are up to date" in res.stdout
    assert "up to date" in built.dvc("status", check=True).stdout

    shown = built.dvc("metrics", "show", "--json", check=True).stdout
    assert "student" in shown and "mlflow_run_id" in shown
    exps = built.dvc("exp", "show", "--csv", check=True).stdout
    header = exps.splitlines()[0].split(",")
    assert {"student.top1", "teacher.top1", "preset", "quant.a_bits", "generator.p"} <= set(header), header
    res = built.dvc("plots", "show", "-o", str(tmp_path / "plots"), check=True)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "loss_g" in html and "top1" in html and "samples.png" in html
    assert built.git("status", "--porcelain", check=True).stdout.strip() == ""


def test_a_bits_reruns_train_evaluate_export_but_not_the_teacher(copy_of_built):
    project = copy_of_built
    before = project.read_json("metrics.json")["mlflow_run_id"]
    res = project.dvc("exp", "run", "-S", "quant.a_bits=5", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert ran(res.stdout) == {"resolve", "train", "evaluate", "export"}, res.stdout
    assert skipped(res.stdout) == {"fetch_teacher", "init_embeddings", "ladder"}, res.stdout  # ladder: not the preset's

    m = project.read_json("metrics.json")
    assert m["a_bits"] == 5 and m["mlflow_run_id"] != before
    run = project.client().get_run(m["mlflow_run_id"])
    exp_name = re.search(r"Ran experiment\(s\): (\S+)", res.stdout).group(1)
    assert run.data.tags["dvc.exp_name"] == exp_name and run.data.tags["bits"] == "w4a5"
    assert run.data.params["quant.a_bits"] == "5"
    assert run.info.run_name == f"demo-w4a5-{exp_name}"
    assert project.client().search_model_versions("name='qimera-demo-w4a5'")
    assert exp_name in project.dvc("exp", "show", "--csv", check=True).stdout


def test_killed_train_resumes_on_rerun(copy_of_built):
    project = copy_of_built
    project.set_params({"train.seed": 7, "train.epochs": 3})  # another config: training starts over
    res = project.dvc("repro", env=epoch_hooks.env(), timeout=600)
    assert res.returncode != 0 and "killing this process" in res.stdout, res.stdout[-4000:]
    history = (project.path / "outputs/train/history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in history] == [1]
    run_id = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    client = project.client()
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nobody closed it

    res = project.dvc("repro", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resuming after epoch 1/3" in res.stdout, res.stdout
    assert project.read_json("outputs/train/train.json")["resumed_from_epoch"] == 1
    history = (project.path / "outputs/train/history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in history] == [1, 2, 3]
    m = project.read_json("metrics.json")
    assert m["epochs"] == 3 and m["mlflow_run_id"] == run_id  # the same MLflow run, reopened
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    assert [h.step for h in client.get_metric_history(run_id, "loss_g")] == [1, 2, 3]
    assert "up to date" in project.dvc("status", check=True).stdout


def test_k_above_the_teachers_classes_stops_before_training(copy_of_built):
    project = copy_of_built
    ckpt = project.path / "outputs/train/checkpoint.pt"
    client = project.client()

    def runs() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000))

    digest, before = sha256(ckpt), runs()
    lock = (project.path / "dvc.lock").read_text()
    project.set_params({"generator.k": 50})
    res = project.dvc("repro", timeout=600)
    assert res.returncode != 0
    assert "generator.k=50" in res.stdout and "number of classes (10)" in res.stdout, res.stdout[-3000:]
    assert "Traceback" not in res.stdout
    assert ran(res.stdout) == {"resolve", "train"}
    assert sha256(ckpt) == digest  # the previous checkpoint is untouched
    assert runs() == before  # no MLflow run was opened
    new_lock = yaml.safe_load((project.path / "dvc.lock").read_text())["stages"]
    assert new_lock["train"] == yaml.safe_load(lock)["stages"]["train"]


@pytest.mark.parametrize(
    "updates, env, message",
    [
        ({"preset": "nope"}, {},  # the list itself is pinned in test_stages_config.py
         "preset='nope' is not a preset; allowed: " + ", ".join(available_presets(REPO))),
        ({"generator.p": 1.5}, {}, "generator.p=1.5: Input should be less than or equal to 1"),
        ({"teacher.source": "checkpoint", "teacher.arch": "qimera.models.digits_cnn:DigitsCNN",
          "teacher.weights": "teachers/missing.pt"}, {},
         "teacher.weights='teachers/missing.pt': file not found"),
        ({}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
         "MLflow tracking store 'http://127.0.0.1:9' is not usable: [Errno 111] Connection refused"),
        ({"export.s3_prefix": "https://bucket/x"}, {},
         "export.s3_prefix='https://bucket/x': expected s3://bucket/prefix, or null to skip the upload"),
    ],
    ids=["unknown-preset", "invalid-value", "missing-teacher-file", "unreachable-mlflow", "bad-s3-prefix"],
)
def test_bad_input_fails_early_and_writes_nothing(dvc_project, updates, env, message):
    project = dvc_project
    project.set_params(updates)
    res = project.dvc("repro", env=env, timeout=300)
    assert res.returncode != 0
    assert message in res.stdout, res.stdout[-3000:]
    assert "Traceback" not in res.stdout
    assert ran(res.stdout) == {"resolve"}
    assert not (project.path / "outputs").exists()
    assert not (project.path / "metrics.json").exists() and not (project.path / "dvc.lock").exists()
    assert cache_files(project) == []


def _kill_when(project: DvcProject, args: list[str], ready, timeout: float = 300) -> str:
    """Start `dvc *args` in its own process group and SIGKILL the whole group as soon as
    ``ready()`` is true; returns what it printed."""
    import os
    import signal

    proc = subprocess.Popen([DVC, *args], cwd=project.path, env=project.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"dvc ended before the kill point:\n{proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        out = proc.communicate(timeout=60)[0]
    return out


def _champion(project: DvcProject, name: str):
    """The version ``@champion`` resolves to: READY, with a complete model (MLmodel)."""
    import os
    import tempfile
    from pathlib import Path
    from unittest import mock

    import mlflow.artifacts

    from stages.export import CHAMPION

    champ = project.client().get_model_version_by_alias(name, CHAMPION)
    assert str(champ.status) == "READY" and champ.tags.get("top1")
    # a models:/ URI is resolved through the registry named by the environment
    uris = {"MLFLOW_TRACKING_URI": project.tracking_uri, "MLFLOW_REGISTRY_URI": project.tracking_uri}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, uris):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@{CHAMPION}", dst_path=tmp))
        assert (local / "MLmodel").is_file() and (local / "extra_files" / "student.onnx").is_file()
    return str(champ.version)


def test_a_killed_export_keeps_the_champion_and_the_previous_export_and_the_rerun_registers_once(copy_of_built):
    """Issue 21 item 2: a SIGKILL while the files are built, and another right after the new
    version is registered, leave ``outputs/export`` as it was and ``@champion`` resolving to
    a complete version; the rerun registers one version for the run, takes the alias and
    retires the earlier ones last. An edited metrics.json is refused before anything is built."""
    project = copy_of_built
    client = project.client()
    name = "qimera-demo-w4a4"
    run_id = project.read_json("metrics.json")["mlflow_run_id"]
    outputs = project.path / "outputs"
    before = (outputs / "export" / "model.json").read_bytes()
    champion = _champion(project, name)

    # the top-1 in the tags and the card is the stage's own measurement
    metrics = project.read_json("metrics.json")
    edited = {**metrics, "student": {**metrics["student"], "top1": 99.99}}
    (project.path / "metrics.json").write_text(json.dumps(edited))
    res = project.dvc("repro", "--force", "--single-item", "export", timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if "not the evaluation of this checkpoint" in ln]
    assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.stdout, res.stdout[-4000:]
    assert "99.9900%" in lines[0] and f"{metrics['student']['top1']:.4f}%" in lines[0]
    assert (outputs / "export" / "model.json").read_bytes() == before
    (project.path / "metrics.json").write_text(json.dumps(metrics))

    def building() -> bool:  # the export's temporary directory holds its first files
        return any(p.name.startswith(".export-") and any(p.iterdir()) for p in outputs.iterdir())

    _kill_when(project, ["repro", "--force", "--single-item", "export"], building)
    assert (outputs / "export" / "model.json").read_bytes() == before  # the previous export, untouched
    assert [p.name for p in outputs.iterdir() if p.name.startswith(".export-")]  # SIGKILL left its temp dir
    assert _champion(project, name) == champion

    versions = len(client.search_model_versions(f"name='{name}'"))
    last = [0.0]

    def registered() -> bool:  # "Created version": the new version is there, nothing else is done yet
        if time.monotonic() - last[0] < 0.05:
            return False
        last[0] = time.monotonic()
        return len(client.search_model_versions(f"name='{name}'")) > versions

    _kill_when(project, ["repro", "--force", "--single-item", "export"], registered)
    now = project.read_json("outputs/export/model.json")
    assert (outputs / "export" / "model.json").read_bytes() == before or now["registered_version"] != champion
    _champion(project, name)  # resolves, READY and complete, whichever version it is

    res = project.dvc("repro", "--force", "--single-item", "export", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "left by a killed export" in res.stdout and "left by an earlier export of this run" in res.stdout
    assert not [p for p in outputs.iterdir() if p.name.startswith(".export-")]
    model = project.read_json("outputs/export/model.json")
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    assert [str(v.version) for v in versions] == [model["registered_version"]]  # one version for the run
    assert model["champion"] and _champion(project, name) == model["registered_version"]
    assert all(v.tags.get("top1") == f"{metrics['student']['top1']:.4f}" and v.tags.get("bits") == "w4a4"
               for v in versions)
    assert client.get_run(run_id).info.status == "FINISHED"
    untagged = [v for v in client.search_model_versions(f"name='{name}'") if not v.tags.get("top1")]
    assert untagged == []


def test_evaluate_and_export_check_what_they_are_handed(copy_of_built):
    """Issue 21 item 4: a checkpoint that does not match the resolved config (quant changed,
    only resolve rerun), a teacher changed after fetch_teacher, a garbage checkpoint, a
    missing checkpoint or metrics.json: each stage stops in one line before it touches the
    MLflow run or writes anything."""
    project = copy_of_built
    client = project.client()
    name = "qimera-demo-w4a4"
    run_id = project.read_json("metrics.json")["mlflow_run_id"]
    logged = client.get_run(run_id).data.metrics["student_top1"]
    versions = len(client.search_model_versions("name LIKE 'qimera-demo-%'"))
    export_before = (project.path / "outputs/export/model.json").read_bytes()

    def stage(module: str, needle: str) -> None:
        res = project.run(["python", "-m", f"stages.{module}"])
        lines = [ln for ln in res.stdout.splitlines() if needle in ln]
        assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.stdout, res.stdout[-4000:]
        assert "weights_only=False" not in res.stdout

    project.set_params({"quant.w_bits": 2, "quant.a_bits": 8})
    assert project.dvc("repro", "--single-item", "resolve").returncode == 0
    for module in ("evaluate", "export"):
        stage(module, "quant.w_bits: 4 in the checkpoint, 2 in outputs/config/run.yaml")
    project.set_params({"quant.w_bits": 4, "quant.a_bits": 4})
    assert project.dvc("repro", "--single-item", "resolve").returncode == 0

    checkpoint = project.path / "outputs/train/checkpoint.pt"
    saved = checkpoint.read_bytes()
    checkpoint.write_bytes(b"\x80\x04garbage")
    stage("export", "is not a readable qimera checkpoint")
    checkpoint.unlink()
    stage("evaluate", "run the train stage first")
    checkpoint.write_bytes(saved)

    teacher = next((project.path / "outputs/teacher").glob("*.pt"))
    original = teacher.read_bytes()
    teacher.write_bytes(original[:-8] + bytes(8))
    stage("evaluate", "were changed after fetch_teacher")
    teacher.write_bytes(original)

    metrics = project.path / "metrics.json"
    metrics.rename(project.path / "metrics.saved")
    stage("export", "metrics.json: not found; run the evaluate stage first")
    (project.path / "metrics.saved").rename(metrics)

    assert client.get_run(run_id).data.metrics["student_top1"] == logged
    assert len(client.search_model_versions("name LIKE 'qimera-demo-%'")) == versions
    assert (project.path / "outputs/export/model.json").read_bytes() == export_before


def test_a_diverging_run_stops_in_train_and_publishes_nothing(copy_of_built):
    project = copy_of_built
    client = project.client()
    versions = len(client.search_model_versions("name='qimera-demo-w4a4'"))
    project.set_params({"train.lr_student": 1e30})
    res = project.dvc("repro", timeout=600)
    assert res.returncode != 0
    line = [ln for ln in res.stdout.splitlines() if "training diverged" in ln]
    assert line and "train.lr_student=1e+30" in line[0] and "Traceback" not in res.stdout, res.stdout[-4000:]
    assert ran(res.stdout) == {"resolve", "train"}
    assert len(client.search_model_versions("name='qimera-demo-w4a4'")) == versions  # nothing registered
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "params.`train.lr_student` = '1e+30'")
    assert [r.info.status for r in runs] == ["FAILED"]
