"""What the project tells a user about the MLflow UI, without a browser: the links (the
model-training view, a shared view of an experiment's cells), the experiment's kind tag and
note, the parent run's description and the cells' short params, the summary's lines, and
the terminal noise that is held back (DVC's uncached-output warnings, MLflow's registry
progress and pickle warning). The browser test is tests/pipeline/test_mlflow_ui.py."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from stages import experiment, export, experiment_dvc, summary, tracking

REPO = Path(__file__).resolve().parents[2]


def test_links_open_the_model_training_view_of_the_right_page():
    server = "http://user:secret@mlflow.example:5000/"
    assert tracking.experiment_url(server, "7") == ("http://mlflow.example:5000/#/experiments/7/runs"
                                                    "?workflowType=machine_learning")
    assert tracking.experiment_url(server, "7", "cells-ab").endswith("?workflowType=machine_learning"
                                                                       "&viewStateShareKey=cells-ab")
    assert tracking.run_url(server, "7", "r1") == ("http://mlflow.example:5000/#/experiments/7/runs/r1"
                                                  "?workflowType=machine_learning")
    assert tracking.ui_command(server) is None
    assert tracking.where_to_open(server, "U") == "open U"
    db = "sqlite:////tmp/x/mlflow.db"
    assert tracking.run_url(db, "1", "r").startswith("http://127.0.0.1:5000/#/experiments/1/runs/r?")
    mlflow = tracking.mlflow_executable()  # `mlflow`, or the virtualenv's when that is not on PATH
    assert mlflow == "mlflow" or Path(mlflow).name == "mlflow" and Path(mlflow).is_file()
    assert tracking.where_to_open(db, "U") == f"`{mlflow} ui --backend-store-uri sqlite:////tmp/x/mlflow.db`, then open U"


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tracking.connect(uri), uri


def test_experiments_are_tagged_as_training_and_a_users_kind_or_note_stays(client):
    client, uri = client
    first = tracking.experiment_id(client, "one", uri)
    tags = client.get_experiment(first).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.TRAINING_KIND
    assert "one child run per cell" in tags[tracking.NOTE_TAG]
    client.set_experiment_tag(first, tracking.EXPERIMENT_KIND_TAG, "genai_development")
    client.set_experiment_tag(first, tracking.NOTE_TAG, "mine")
    assert tracking.experiment_id(client, "one", uri) == first
    tags = client.get_experiment(first).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development" and tags[tracking.NOTE_TAG] == "mine"


def test_a_shared_view_lists_the_cells_with_their_columns(client):
    client, uri = client
    exp_id = tracking.experiment_id(client, "grid", uri)
    key = tracking.share_view(client, exp_id, "cells-p1", search="tags.`mlflow.parentRunId` = 'p1'",
                              metrics=["student_top1"], params=["method", "bits", "seed"])
    state = json.loads(client.get_experiment(exp_id).tags[tracking.SHARED_VIEW_TAG + key])
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'p1'"
    assert state["selectedColumns"] == ["metrics.`student_top1`", "params.`method`", "params.`bits`", "params.`seed`"]
    assert state["orderByKey"] == tracking.RUN_NAME_SORT and state["orderByAsc"] is True
    assert state["columnWidths"] == {tracking.RUN_NAME_COLUMN: 260} and state["columnOrder"] == [tracking.RUN_NAME_COLUMN]
    # the same search finds exactly the cells
    parent = client.create_run(exp_id, run_name="grid").info.run_id
    child = client.create_run(exp_id, run_name="cell", tags={"mlflow.parentRunId": parent}).info.run_id
    client.create_run(exp_id, run_name="other")
    found = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.run_id for r in found] == [child]


def _experiment(tmp_path, tiny_config):
    from qimera.experiments import load_experiment

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config))
    spec = {"name": "described", "title": "two learning rates", "seeds": [1, 2], "compare": [["qimera", "gdfq"]],
            "grids": [{"label": "digits", "config": str(tmp_path / "base.yaml"), "methods": ["gdfq", "qimera"],
                       "bits": ["2w4a"], "axes": {"train.lr_student": [0.0001, 0.001]}, "row": "{method}",
                       "column": "lr={train.lr_student}"}]}
    path = tmp_path / "described.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_experiment(path, runs_dir=tmp_path / "runs")


def test_the_parent_says_what_it_compares_and_the_cells_carry_short_params(tmp_path, tiny_config):
    exp = _experiment(tmp_path, tiny_config)
    text = experiment.description(exp)
    assert text.startswith("two learning rates\n")
    for part in ("8 cells", "methods gdfq, qimera at 2w4a", "train.lr_student in 0.0001, 0.001", "seeds 1, 2",
                 "budget (epochs × iterations × batch) 3 × 3 × 16", "qimera − gdfq", "report/report.md",
                 "final epoch"):
        assert part in text, part
    assert experiment.view_columns(exp) == ["method", "bits", "train.lr_student", "seed"]
    cell = exp.cells[0]
    assert cell.id == "digits-gdfq-w2a4-lr_student=0.0001-seed1"
    assert experiment.cell_params(cell) == {"method": "gdfq", "bits": "2w4a", "seed": "1", "grid": "digits"}


def test_the_summary_says_how_to_open_the_run_and_the_ladder():
    run = {"run_id": "r1", "experiment_id": "1", "tracking_uri": "sqlite:////w/mlflow.db"}
    ladder = {"mlflow_uri": "sqlite:////w/mlflow.db", "mlflow_url": tracking.experiment_url("sqlite:////w/mlflow.db",
                                                                                           "2", "cells-p")}
    lines = summary.mlflow_lines(run, ladder).splitlines()
    assert lines[0] == f"MLflow: run `{tracking.mlflow_executable()} ui --backend-store-uri sqlite:////w/mlflow.db`, then open"
    assert lines[1].split() == ["this", "run:", "http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning"]
    assert lines[2].split()[-1].endswith("/#/experiments/2/runs?workflowType=machine_learning&viewStateShareKey=cells-p")
    assert "Compare" in lines[3]
    assert summary.mlflow_lines({}, {}) == ""


def test_dvcs_uncached_output_warnings_become_one_line(tmp_path):
    script = ("import sys\n"
              "print('Reproducing experiment a')\n"
              "for name in ('outputs/train', 'outputs/export', 'outputs/embeddings.pt'):\n"
              "    print(f\"WARNING: No file hash info found for '/tmp/x/{name}'. It won't be created.\")\n"
              "print('Running stage resolve')\n"
              "sys.exit(3)\n")
    out = io.StringIO()
    status = experiment_dvc.follow([sys.executable, "-c", script], tmp_path, out)
    assert status == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "Reproducing experiment a" and lines[2] == "Running stage resolve"
    assert "No file hash info" not in out.getvalue()
    assert lines[1].startswith("(DVC copied the workspace without 3 outputs that its cache lacks (embeddings.pt, "
                               "export, train)")


def test_the_registrys_progress_and_the_pickle_warning_are_held_back(capsys):
    with export._registry_progress_held_back():
        print("Registered model 'm' already exists. Creating a new version of this model...", file=sys.stderr)
        print("Created version '3' of model 'm'.", file=sys.stderr)
        print("something else", file=sys.stderr)
    assert capsys.readouterr().err == "something else\n"
    with pytest.raises(RuntimeError), export._registry_progress_held_back():
        print("Created version '3' of model 'm'.", file=sys.stderr)
        raise RuntimeError("registry down")
    assert "Created version '3'" in capsys.readouterr().err  # a failure shows everything
    logger, seen = logging.getLogger("mlflow.pytorch"), []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        with export._without_pickle_warning():
            logger.warning("Saving pytorch model by Pickle or CloudPickle format requires exercising caution")
            logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another warning"]
