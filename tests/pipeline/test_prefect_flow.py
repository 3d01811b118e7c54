"""The Prefect flow's pure parts, without a server: presets, the ``dvc exp run`` command,
the failure classification behind the retry policy, and the pipeline task's process
handling (run as a plain function with a stand-in logger)."""

from __future__ import annotations

import json
import logging
import sys
import typing
from pathlib import Path

import pytest
from prefect.states import Failed

from pipelines import flow as q

REPO = Path(__file__).resolve().parents[2]


def test_presets_and_imagenet_models():
    assert q.resolve_preset("demo") == "demo"
    assert q.resolve_preset("cifar100", "resnet50") == "cifar100"  # model only matters for imagenet
    assert q.resolve_preset("imagenet") == "imagenet-resnet18"
    assert q.resolve_preset("imagenet", "resnet50") == "imagenet-resnet50"
    assert q.resolve_preset("imagenet", "mobilenetv2") == "imagenet-mobilenetv2"
    assert q.resolve_preset("imagenet-resnet50") == "imagenet-resnet50"
    for model in ("inceptionv3", "sqnxt23", "shufflenet"):  # the supplement's Table 10 teachers
        assert q.resolve_preset("imagenet", model) == f"imagenet-{model}"
    with pytest.raises(q.FlowInputError, match="preset='cifar1000'"):
        q.resolve_preset("cifar1000")
    with pytest.raises(q.FlowInputError, match="model='vgg16'"):
        q.resolve_preset("imagenet", "vgg16")


def test_presets_match_the_config_files():
    assert q.available_presets(REPO) == ["cifar10", "cifar10-shared", "cifar100", "demo", "imagenet-inceptionv3",
                                         "imagenet-mobilenetv2", "imagenet-resnet18", "imagenet-resnet50",
                                         "imagenet-shufflenet", "imagenet-sqnxt23"]
    assert q.resolve_preset("cifar10-shared", project=REPO) == "cifar10-shared"
    # the imagenet shorthand names every ImageNet preset, and the model parameter allows each
    imagenet = [p for p in q.available_presets(REPO) if p.startswith("imagenet-")]
    assert sorted(q.IMAGENET_MODELS.values()) == imagenet
    assert typing.get_args(q.Model) == tuple(q.IMAGENET_MODELS)
    with pytest.raises(q.FlowInputError, match="allowed: imagenet, cifar10, "):
        q.resolve_preset("nope", project=REPO)


def test_dvc_command():
    cmd = q.dvc_command("dvc", "imagenet-resnet50", 5, 5,
                        {"train.epochs": 2, "generator.p": 0.25, "train.amp": "bf16",
                         "train.lr_milestones": [1, 2], "train.progress": False,
                         "train.out_dir": "runs/a b", "data.path": "x,y"})
    settings = ["preset=imagenet-resnet50", "quant.w_bits=5", "quant.a_bits=5",
                "train.epochs=2", "generator.p=0.25", "train.amp=bf16",
                "train.lr_milestones=[1,2]", "train.progress=false",
                "train.out_dir='runs/a b'",
                "data.path='x,y'"]  # quoted: a bare comma would make a DVC sweep
    settings[3:] = ["++" + s for s in settings[3:]]  # overrides may add keys params.yaml lacks
    assert cmd == ["dvc", "exp", "run"] + [a for s in settings for a in ("-S", s)]
    with pytest.raises(q.FlowInputError, match="flow parameter"):
        q.dvc_command("dvc", "demo", 4, 4, {"quant.w_bits": 5})
    with pytest.raises(q.FlowInputError, match="dotted"):
        q.dvc_command("dvc", "demo", 4, 4, {"train epochs": 5})


@pytest.mark.parametrize("code, output, kind", [
    (255, "ERROR: failed to reproduce 'train': failed to run: python stages/train.py, exited with 2",
     q.FlowInputError),
    (255, "qimera: error: quant.w_bits=9 is not allowed (2..8)", q.FlowInputError),
    (255, "qimera stage resolve: error: preset='x' is not a preset", q.FlowInputError),
    (255, "ERROR: Could not override 'trian.epochs'", q.FlowInputError),
    (255, "ERROR: Unable to acquire lock. Most likely another DVC process is running", q.FlowRunError),
    (255, "qimera: error: teacher download failed: <urlopen error [Errno -3] Temporary failure in "
          "name resolution>\nexited with 2", q.FlowRunError),
    (255, "ERROR: failed to run: python stages/train.py, exited with -9", q.FlowRunError),
    (255, "qimera stage resolve: error: MLflow tracking store 'http://127.0.0.1:9' is not usable: "
          "[Errno 111] Connection refused. Start the server\nexited with 2", q.FlowRunError),
    (255, "qimera stage fetch_teacher: error: teacher.source pytorchcv: teacher.name 'resnet18': "
          "download failed (OSError). On an offline machine\nexited with 2", q.FlowRunError),
    (-9, "", q.FlowRunError),
    (1, "RuntimeError: something odd", q.FlowRunError),
])
def test_classify_failure(code, output, kind):
    assert q.classify_failure(code, output) is kind


def test_retry_condition():
    assert q._retry_unless_config_error(None, None, Failed(data=q.FlowRunError("x"))) is True
    assert q._retry_unless_config_error(None, None, Failed(data=RuntimeError("x"))) is True
    assert q._retry_unless_config_error(None, None, Failed(data=q.FlowInputError("x"))) is False


@pytest.fixture
def plain_logger(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="qimera-test")
    monkeypatch.setattr(q, "get_run_logger", lambda: logging.getLogger("qimera-test"))
    return caplog


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def test_run_pipeline_streams_output_and_collects_results(tmp_path, plain_logger):
    body = ("import json, os\n"
            "print('Running stage train', flush=True)\n"
            "json.dump({'mlflow_run_id': 'abc123', 'teacher': {'top1': 90.0}}, open('metrics.json', 'w'))\n"
            "print('Ran experiment(s): pious-lion')\n")
    out = q.run_pipeline.fn(_script(body), str(tmp_path))
    assert out == {"mlflow_run_id": "abc123",
                   "metrics": {"mlflow_run_id": "abc123", "teacher": {"top1": 90.0}},
                   "dvc_experiment": "pious-lion"}
    assert "Running stage train" in plain_logger.text


def test_run_pipeline_failures(tmp_path, plain_logger):
    with pytest.raises(q.FlowInputError, match="status 2"):
        q.run_pipeline.fn(_script("import sys; print('qimera: error: bad'); sys.exit(2)"), str(tmp_path))
    with pytest.raises(q.FlowRunError, match="status 1") as info:
        q.run_pipeline.fn(_script("raise SystemExit(1)"), str(tmp_path))
    assert info.type is q.FlowRunError
    with pytest.raises(q.FlowRunError, match="no metrics.json"):
        q.run_pipeline.fn(_script("pass"), str(tmp_path))


def test_run_id_from_the_train_record(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"student": {"top1": 80.0, "top5": 99.0}}))
    assert q.collect_results(tmp_path) == (None, {"student": {"top1": 80.0, "top5": 99.0}})
    (tmp_path / q.MLFLOW_RUN).parent.mkdir(parents=True)
    (tmp_path / q.MLFLOW_RUN).write_text(json.dumps({"run_id": "r1", "experiment_id": "1"}))
    assert q.collect_results(tmp_path)[0] == "r1"
    assert "| student | 80.0 | 99.0 |" in q.metrics_table(q.collect_results(tmp_path)[1])


def test_run_pipeline_puts_params_yaml_back(tmp_path, plain_logger):
    """`dvc exp run -S` leaves its values in params.yaml; the next flow run must not
    inherit them, so the task restores the file, after success and after failure."""
    params = tmp_path / "params.yaml"
    params.write_text("# comment\npreset: demo\n")
    body = ("import json\n"
            "open('params.yaml', 'w').write('preset: cifar10\\n')\n"
            "json.dump({'mlflow_run_id': 'r'}, open('metrics.json', 'w'))\n")
    q.run_pipeline.fn(_script(body), str(tmp_path))
    assert params.read_text() == "# comment\npreset: demo\n"
    with pytest.raises(q.FlowRunError):
        q.run_pipeline.fn(_script("import os; os.remove('params.yaml'); raise SystemExit(3)"),
                          str(tmp_path))
    assert params.read_text() == "# comment\npreset: demo\n"


def test_a_team_flow_run_pushes_its_outputs_and_experiment(s3_env, tmp_path, plain_logger, monkeypatch):
    """With QIMERA_DVC_REMOTE (a flow run in its own clone, prefect.team.yaml) the flow
    pushes the run's outputs to that DVC remote and, with QIMERA_DVC_EXP_REMOTE, its DVC
    experiment to the git remote; without it, nothing is pushed."""
    import os
    import subprocess

    from pipeline_project import DVC

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "DVC_NO_ANALYTICS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    work, bare = tmp_path / "clone", tmp_path / "team.git"

    def run(*cmd, cwd=work):
        proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("git", "init", "-q", "--bare", str(bare), cwd=tmp_path)
    run("git", "init", "-q", str(work), cwd=tmp_path)
    run(DVC, "init", "-q")
    (work / "result.txt").write_text("baseline\n")
    run(DVC, "add", "-q", "result.txt")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")
    run("git", "remote", "add", "origin", str(bare))
    run("git", "push", "-q", "origin", "HEAD")
    (work / "result.txt").write_text("the run's output\n")
    run(DVC, "add", "-q", "result.txt")
    run(DVC, "exp", "save", "-q", "-n", "cell-1")

    from pipelines.remote import RemoteSettings

    assert q._push(work, "cell-1", RemoteSettings.from_env(), logging.getLogger("qimera-test")) == []  # no team settings
    bucket = s3_env.bucket("team-flow")
    monkeypatch.setenv("QIMERA_REMOTE", f"s3://{bucket}/cells")
    monkeypatch.setenv("QIMERA_DVC_REMOTE", f"s3://{bucket}/dvc")
    monkeypatch.setenv("QIMERA_DVC_EXP_REMOTE", "origin")
    assert q._push(work, "cell-1", RemoteSettings.from_env(), logging.getLogger("qimera-test")) == [
        "dvc push", "dvc exp push origin cell-1"]
    assert "cell-1" in run("git", "ls-remote", str(bare), "refs/exps/*")
    assert s3_env.keys(bucket, "dvc/")  # the output's content, in DVC's remote layout
    assert "dvc push; dvc exp push origin cell-1" in plain_logger.text
    local = (work / ".dvc" / "config.local").read_text()  # DVC's local config: never committed
    assert "remote = qimera" in local and f"url = s3://{bucket}/dvc" in local
    assert "qimera" not in (work / ".dvc" / "config").read_text()
