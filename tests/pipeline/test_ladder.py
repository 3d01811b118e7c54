"""The pipeline's ``ladder`` stage: the demo's bit-width ladder (experiments/demo-ladder.yaml)
at a tiny budget. Checks the table's shape and that every value is a real run's final
epoch; it does not assert accuracies a two-iteration budget cannot reach."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

#: every ladder cell at one epoch of two iterations on 100 images
TINY_LADDER = ["train.epochs=1", "train.iters_per_epoch=2", "train.lr_milestones=[1]", "train.warmup_epochs=0",
               "train.calibration_epochs=1", "train.batch_size=16", "naive.batches=2", "naive.batch_size=16",
               "data.limit=100"]


@pytest.mark.timeout(600)
def test_ladder_stage_tables_every_method_by_bit_width(dvc_project, teacher_cache):
    project = dvc_project.path
    dvc_project.set_params({"ladder.experiment": "experiments/demo-ladder.yaml", "ladder.jobs": 2, "ladder.seeds": 2,
                            "ladder.set": [*TINY_LADDER, f"teacher.cache_dir={teacher_cache}"]})
    res = dvc_project.dvc("repro", "ladder", timeout=500)
    assert res.returncode == 0, res.stdout[-6000:]
    ladder = json.loads((project / "outputs" / "ladder.json").read_text())
    spec = yaml.safe_load((project / "experiments" / "demo-ladder.yaml").read_text())
    bits = [f"{b}w{b}a" if isinstance(b, int) else b for b in spec["grids"][0]["bits"]]
    assert ladder["columns"] == bits and list(ladder["rows"]) == spec["grids"][0]["methods"]
    assert "1 x 2 x 16" in ladder["budget"] and ladder["failed"] == 0 and ladder["seeds"] == [1, 2]

    # every value is the mean (and std) of the finished cells' final-epoch top-1 over the seeds
    cells = project / "outputs" / "ladder" / "demo-ladder"
    teacher = set()
    tops: dict[tuple[str, str], list[float]] = {}
    for method, row in ladder["rows"].items():
        for column, value in row.items():
            w, a = column[:-1].split("w")
            for seed in (1, 2):
                cell = cells / f"digits-{method}-w{w}a{a}-seed{seed}"
                summary = json.loads((cell / "summary.json").read_text())
                assert json.loads((cell / "cell.json").read_text())["status"] == "done"
                assert (summary["w_bits"], summary["a_bits"], summary["seed"]) == (int(w), int(a), seed)
                tops.setdefault((method, column), []).append(summary["student_top1"])
                teacher.add(summary["teacher_top1"])
                history = (cell / "history.jsonl").read_text().splitlines() if method != "naive" else []
                assert len(history) == (0 if method == "naive" else 1)  # the generator methods trained one epoch
            assert value == pytest.approx(statistics.fmean(tops[(method, column)]), abs=1e-4)
            assert ladder["std"][method][column] == pytest.approx(statistics.stdev(tops[(method, column)]), abs=1e-4)
            assert ladder["n"][method][column] == 2
    assert teacher == {ladder["teacher_top1"]}
    # the paired difference Qimera − GDFQ, per seed, at every bit width
    assert [p["entry"] for p in ladder["pairs"]] == bits
    for p in ladder["pairs"]:
        assert (p["treatment"], p["baseline"]) == ("qimera", "gdfq")
        q, g = tops[("qimera", p["entry"])], tops[("gdfq", p["entry"])]
        assert [p["by_seed"][s] for s in ("1", "2")] == pytest.approx([q[0] - g[0], q[1] - g[1]], abs=1e-3)

    # MLflow: a parent run for this execution, one child per cell
    client = dvc_project.client()
    exp = client.get_experiment_by_name("demo-ladder")
    parent = client.get_run(ladder["mlflow_parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.tags["qimera.stage"] == "ladder"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(bits) * len(ladder["rows"]) * 2

    # `make demo`'s last command prints the table
    out = dvc_project.run([sys.executable, "-m", "stages.summary"]).stdout
    assert "bit-width ladder" in out and "naive (noise calibration)" in out and "GDFQ" in out, out
    assert "mean ± std over seeds 1, 2" in out and "Qimera − GDFQ at 2w2a:" in out, out
    again = dvc_project.dvc("repro", "ladder", timeout=120)  # nothing changed: DVC runs nothing
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout[-3000:]
