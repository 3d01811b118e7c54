"""The calibration-only methods (zeroq, naive) through the DVC pipeline: no generator and no
epochs, but the same stages, files, MLflow run and registry as qimera, and the numbers of
`qimera run` on the same resolved config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline_project import BIN

pytestmark = pytest.mark.slow

#: ZeroQ with a short distillation; 2-bit activations, where ZeroQ and naive differ
ZEROQ = {"method": "zeroq", "quant.a_bits": "2", "+zeroq.steps": "5", "+zeroq.batch_size": "16"}


def test_zeroq_runs_end_to_end_and_matches_qimera_run(dvc_project):
    project = dvc_project
    res = project.dvc("exp", "run", *(a for k, v in ZEROQ.items() for a in ("-S", f"{k}={v}")), timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "no weights were fine-tuned" in res.stdout

    m = project.read_json("metrics.json")
    assert m["epochs"] == 0 and m["iterations"] == 5 and m["a_bits"] == 2
    assert math.isfinite(m["student"]["top1"]) and 0.0 <= m["student"]["top1"] <= 100.0
    train = project.read_json("outputs/train/train.json")
    assert train["method"] == "zeroq" and train["iterations"] == 5 and train["epochs"] == 0
    assert (project.path / "outputs/history.csv").read_text().splitlines() == [
        "epoch,loss_g,loss_g_ce,loss_g_bns,loss_s,top1,top5,iters_per_second,"
        "teacher_agree_plain,teacher_agree_superposed,teacher_max_prob,label_max"]
    state = torch.load(project.path / "outputs/train/checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["generator"] is None and state["history"] == [] and state["epoch"] == 0
    assert state["calibration_images"].shape == (16, 1, 8, 8)
    for png in ("samples.png", "curves.png"):
        assert (project.path / "outputs/figures" / png).read_bytes()[:4] == b"\x89PNG"

    v = project.read_json("outputs/export/verification.json")
    assert (project.path / "outputs/export/student.onnx").is_file()
    assert v["integer_max_abs_logit_delta"] <= 1e-5 and abs(v["onnx_top1"] - v["student_top1"]) <= 0.1
    assert v["student_top1"] == pytest.approx(m["student"]["top1"], abs=1e-3)
    card = (project.path / "outputs/export/MODEL_CARD.md").read_text()
    assert "**ZeroQ**" in card and "No weights were fine-tuned" in card and "5 Adam steps" in card

    client = project.client()
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "zeroq" and run.data.params["zeroq.steps"] == "5"
    assert run.data.metrics["student_top1"] == pytest.approx(m["student"]["top1"], abs=1e-3)
    model = project.read_json("outputs/export/model.json")
    assert model["registered_model"] == "qimera-demo-w4a2"
    version = client.get_model_version("qimera-demo-w4a2", model["registered_version"])
    assert version.tags["method"] == "zeroq" and version.run_id == run.info.run_id

    # `qimera run` on the resolved config: the same teacher weights (the pipeline's
    # workspace copy is the demo teacher's state dict), seed and calls, hence the same numbers
    cli = project.run([str(BIN / "qimera"), "run", "outputs/config/run.yaml", "--set",
                       f"train.out_dir={project.path.parent / 'cli-run'}", "--set", "train.progress=false"],
                      timeout=300, check=True)
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary["method"] == "zeroq" and summary["iterations"] == 5
    assert summary["student_top1"] == m["student"]["top1"] and summary["student_top5"] == m["student"]["top5"]
    assert summary["naive_top1"] == m["naive"]["top1"] and summary["teacher_top1"] == m["teacher"]["top1"]
    print(f"zeroq 4w2a top-1 {m['student']['top1']} (naive {m['naive']['top1']})")


def test_naive_trains_and_evaluates_and_a_rerun_starts_clean(dvc_project):
    project = dvc_project
    project.set_params({"method": "naive"})
    res = project.dvc("repro", "evaluate", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    m = project.read_json("metrics.json")
    assert m["epochs"] == 0 and m["iterations"] == 0
    # the method's student is the naive baseline: the same call with the same seed
    assert m["student"] == m["naive"] and math.isfinite(m["student"]["top1"])
    first = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    run = project.client().get_run(first)
    assert run.info.status == "SCHEDULED" and run.data.tags["method"] == "naive"
    assert (project.path / "outputs/figures/samples.png").read_bytes()[:4] == b"\x89PNG"

    res = project.dvc("repro", "-s", "-f", "train", timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resuming" not in res.stdout
    again = project.read_json("outputs/train/mlflow_run.json")["run_id"]
    assert again != first and project.client().get_run(again).info.status == "SCHEDULED"
    print(f"naive 4w4a top-1 {m['student']['top1']}")
