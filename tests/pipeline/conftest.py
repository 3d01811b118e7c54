"""Fixtures for the pipeline tests.

``dvc_project`` (function scope): a fresh, committed git + DVC copy of the project in a
temporary directory, with params.yaml cut down to a seconds-long demo, MLflow logging to
a SQLite file beside it and the demo teacher cached per session. See
:mod:`pipeline_project` for what it holds and how to run commands in it
(``dvc_project.dvc("exp", "run", "-S", "train.epochs=1")``, ``dvc_project.client()``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_project import DvcProject, make_dvc_project


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """Where the demo teacher is trained (once per session) and cached."""
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture
def dvc_project(tmp_path, teacher_cache) -> DvcProject:
    """A fresh, committed git + DVC copy of the project with tiny demo params."""
    return make_dvc_project(tmp_path / "project", teacher_cache=teacher_cache)
