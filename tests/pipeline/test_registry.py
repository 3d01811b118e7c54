"""The export stage's registry rules on a real MLflow store (SQLite): version tags and the
``champion`` alias, which moves only to a version whose top-1 beats the champion's (or
that supersedes a version of the same run), and the retiring of a run's earlier versions,
which never touches the champion."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")

from stages.export import CHAMPION, promote_if_better, retire_earlier  # noqa: E402


@pytest.fixture
def client(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version(client, name: str, top1: float | None, run_id: str | None = None) -> str:
    v = client.create_model_version(name, source=f"file:///tmp/{name}-src", run_id=run_id)
    if top1 is not None:
        client.set_model_version_tag(name, v.version, "top1", f"{top1:.4f}")
    return str(v.version)


def test_champion_moves_only_on_strictly_better_top1(client):
    name = "qimera-demo-w4a4"
    client.create_registered_model(name)
    assert promote_if_better(client, name, _version(client, name, 70.0), 70.0) == (True, "1")
    assert promote_if_better(client, name, _version(client, name, 69.0), 69.0) == (False, "1")
    assert promote_if_better(client, name, _version(client, name, 70.0), 70.0) == (False, "1")  # a tie keeps it
    assert promote_if_better(client, name, _version(client, name, 71.5), 71.5) == (True, "4")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "4"


def test_champion_without_a_top1_tag_is_judged_by_its_run(client, tmp_path):
    name = "qimera-cifar10-w4a4"
    client.create_registered_model(name)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "student_top1", 80.0)
    client.set_registered_model_alias(name, CHAMPION, _version(client, name, None, run.info.run_id))
    assert promote_if_better(client, name, _version(client, name, 79.0), 79.0) == (False, "1")
    assert promote_if_better(client, name, _version(client, name, 80.5), 80.5) == (True, "3")


def test_a_rerun_of_the_same_run_takes_the_alias_and_retires_its_earlier_versions_last(client, tmp_path):
    name = "qimera-demo-w2a4"
    client.create_registered_model(name)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run, other = (client.create_run(exp).info.run_id for _ in range(2))
    first = _version(client, name, 90.0, run)
    assert promote_if_better(client, name, first, 90.0, run) == (True, first)
    interrupted = _version(client, name, 90.0, run)  # an export of the same run killed before the alias moved
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first
    again = _version(client, name, 90.0, run)
    # the same run's numbers do not beat themselves, yet its newer version supersedes the champion
    assert promote_if_better(client, name, again, 90.0, run) == (True, again)
    assert sorted(retire_earlier(client, name, run, keep=again)) == sorted([first, interrupted])
    left = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in left] == [again]
    # another run's version that does not beat it leaves the champion where it is, and its
    # own retiring never deletes the champion
    loser = _version(client, name, 89.0, other)
    assert promote_if_better(client, name, loser, 89.0, other) == (False, again)
    assert retire_earlier(client, name, run, keep=loser) == []
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == again
