"""A cell's checkpoint in S3 (pipelines/remote.py): pushed at the end of every epoch, and
taken up by another worker, with its own disk, when the first dies mid-cell."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from qimera.api import EPOCH_HOOK_ENV
from qimera.experiments import load_experiment, run_cell

import epoch_hooks
from pipelines.remote import RemoteSettings, cell_url, fetch_finished, hook_env, restore, run_remote_cell

pytest.importorskip("moto")


def _worker_disk(path, base: dict):
    """One worker's own checkout: the experiment file and its base config."""
    path.mkdir()
    (path / "base.yaml").write_text(yaml.safe_dump(base))
    (path / "exp.yaml").write_text(yaml.safe_dump({
        "name": "remote", "title": "one cell", "seeds": [1],
        "grids": [{"label": "digits", "config": "base.yaml", "methods": ["qimera"], "bits": [4],
                   "row": "{label} {bits}", "column": "qimera"}]}, sort_keys=False))
    return path


def test_a_cell_resumes_on_another_worker_from_the_checkpoint_in_s3(tiny_config, s3_env, tmp_path, monkeypatch):
    prefix = f"s3://{s3_env.bucket('cells')}/team"
    monkeypatch.setenv("QIMERA_REMOTE", prefix)
    assert RemoteSettings.from_env().prefix == prefix
    base = {**tiny_config, "train": {**tiny_config["train"], "epochs": 2, "iters_per_epoch": 2},
            "naive": {"enabled": False}}
    a, b = _worker_disk(tmp_path / "a", base), _worker_disk(tmp_path / "b", base)

    # worker A dies right after epoch 1's checkpoint reached S3
    monkeypatch.chdir(a)
    cell = load_experiment("exp.yaml").cells[0]
    url = cell_url(prefix, "remote", cell)
    env = {**hook_env(cell.out_dir, url), EPOCH_HOOK_ENV: f"{epoch_hooks.__name__}:push_then_die_after_epoch_1"}
    env["PYTHONPATH"] = os.pathsep.join((epoch_hooks.HOOKS_DIR, env["PYTHONPATH"]))
    assert run_cell(cell, env=env)["status"] == "failed"
    bucket, key = url[len("s3://"):].split("/", 1)
    assert s3_env.keys(bucket, key) == [f"{key}/checkpoint.pt", f"{key}/history.jsonl"]
    assert restore(tmp_path / "look", url)
    epoch_1 = torch.load(tmp_path / "look" / "checkpoint.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in epoch_1] == [1]

    # worker B: an empty disk, the same cell; it resumes from S3 instead of epoch 0
    monkeypatch.chdir(b)
    cell = load_experiment("exp.yaml").cells[0]
    lines: list[str] = []
    record = run_remote_cell(cell, "remote", prefix, log=lines.append)
    assert record["status"] == "done", record
    assert lines == [f"{cell.id}: resuming from the checkpoint in {url}/"]
    state = torch.load(cell.out_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert state["history"][0] == epoch_1[0]  # worker A's epoch 1, timings and all: not run again
    keys = s3_env.keys(bucket, key)
    assert f"{key}/MANIFEST.json" in keys and f"{key}/summary.json" in keys and f"{key}/cell.json" in keys
    # the epoch-2 checkpoint replaced epoch 1's in S3; a third disk finds the finished one
    third = tmp_path / "c"
    assert restore(third, url) and torch.load(third / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not restore(third, url)  # a local checkpoint is never overwritten

    # a machine that never ran the cell sees it finished (S3 has its MANIFEST) and gets its
    # results for the report; a rerun of the cell anywhere skips it
    d = _worker_disk(tmp_path / "d", base)
    monkeypatch.chdir(d)
    cell = load_experiment("exp.yaml").cells[0]
    assert fetch_finished(cell, "remote", prefix)
    assert json.loads((cell.out_dir / "summary.json").read_text()) == json.loads(
        (b / cell.out_dir / "summary.json").read_text())
    assert run_remote_cell(cell, "remote", prefix, log=lines.append)["status"] == "done"
    assert lines[-1] == f"{cell.id}: finished already (in {url}/)"
    # another configuration of the same cell id is not "finished" by that upload
    other = {**base, "train": {**base["train"], "iters_per_epoch": 3}}
    e = _worker_disk(tmp_path / "e", other)
    monkeypatch.chdir(e)
    other_cell = load_experiment("exp.yaml").cells[0]
    assert other_cell.id == cell.id and cell_url(prefix, "remote", other_cell) != url
    assert not fetch_finished(other_cell, "remote", prefix) and not other_cell.out_dir.exists()
    # nothing uploaded: not finished
    assert not fetch_finished(load_experiment("exp.yaml").cells[0], "elsewhere", prefix)


def test_remote_settings_are_checked_once_with_the_variable_named():
    from stages.s3 import StorageError

    assert RemoteSettings.from_env({}) == RemoteSettings()
    assert not RemoteSettings.from_env({"QIMERA_REMOTE": "  "}).prefix  # an empty job variable is unset
    got = RemoteSettings.from_env({"QIMERA_REMOTE": "s3://b/cells", "QIMERA_DVC_REMOTE": "s3://b/dvc",
                                   "QIMERA_DVC_EXP_REMOTE": "origin", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert got.via_dvc and (got.prefix, got.dvc_remote, got.exp_git_remote, got.endpoint) == (
        "s3://b/cells", "s3://b/dvc", "origin", "http://127.0.0.1:9")
    assert not RemoteSettings.from_env({"QIMERA_REMOTE": "s3://b/cells"}).via_dvc
    for env, words in [({"QIMERA_REMOTE": "/shared/cells"}, "QIMERA_REMOTE: '/shared/cells': not an s3:// URL"),
                       ({"QIMERA_REMOTE": "s3://b/c", "QIMERA_DVC_REMOTE": "b/dvc"}, "QIMERA_DVC_REMOTE: 'b/dvc'"),
                       ({"QIMERA_DVC_REMOTE": "s3://b/dvc"}, "QIMERA_DVC_REMOTE is set but QIMERA_REMOTE is not"),
                       ({"QIMERA_REMOTE": "s3://b/c", "QIMERA_DVC_EXP_REMOTE": "origin"},
                        "QIMERA_DVC_EXP_REMOTE='origin' needs QIMERA_DVC_REMOTE")]:
        with pytest.raises(StorageError, match=words.replace("(", r"\(").replace("?", r"\?")):
            RemoteSettings.from_env(env)
