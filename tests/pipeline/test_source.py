"""What the team deployments clone (pipelines/source.py): the remote's URL and a commit
the remote has, refused with a line that says what to do otherwise."""

from __future__ import annotations

import subprocess

import pytest

from pipelines.source import SourceError, commit, main, url

ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@localhost"}


def _git(cwd, *args):
    import os

    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **ENV})


@pytest.fixture
def checkout(tmp_path):
    bare, work = tmp_path / "team.git", tmp_path / "work"
    _git(tmp_path, "init", "-q", "--bare", str(bare))
    _git(tmp_path, "init", "-q", str(work))
    (work / "a.txt").write_text("a\n")
    _git(work, "add", "a.txt")
    _git(work, "commit", "-q", "-m", "a")
    return work, bare


def test_the_deployed_commit_must_be_on_the_remote(checkout, capsys):
    work, bare = checkout
    with pytest.raises(SourceError, match="no such git remote"):
        url(work, {})
    _git(work, "remote", "add", "origin", "../team.git")  # a relative path: made absolute for the workers
    assert url(work, {}) == str(bare.resolve())
    assert url(work, {"QIMERA_GIT_URL": "https://example.org/qimera.git"}) == "https://example.org/qimera.git"
    with pytest.raises(SourceError, match=r"is not on any branch of the git remote 'origin': push it first"):
        commit(work, {})
    _git(work, "push", "-q", "origin", "HEAD")
    sha = commit(work, {})
    assert len(sha) == 40
    (work / "a.txt").write_text("changed\n")
    assert commit(work, {}) == sha and "uncommitted changes are not deployed" in capsys.readouterr().err
    (work / "a.txt").write_text("a\n")
    (work / "b.txt").write_text("b\n")
    _git(work, "add", "b.txt")
    _git(work, "commit", "-q", "-m", "b")  # not pushed
    with pytest.raises(SourceError, match="push it first"):
        commit(work, {})


def test_the_command_line_prints_one_value_or_one_error(checkout, monkeypatch, capsys):
    work, _ = checkout
    monkeypatch.chdir(work)
    monkeypatch.delenv("QIMERA_GIT_URL", raising=False)
    monkeypatch.delenv("QIMERA_GIT_REMOTE", raising=False)
    assert main(["commit"]) == 1 and capsys.readouterr().err.startswith("error: commit ")
    assert main(["nonsense"]) == 2
