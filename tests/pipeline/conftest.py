"""Fixtures for the pipeline tests.

``dvc_project`` (function scope): a fresh, committed git + DVC copy of the project in a
temporary directory, with params.yaml cut down to a seconds-long demo, MLflow logging to
a SQLite file beside it and the demo teacher cached per session. See
:mod:`pipeline_project` for what it holds and how to run commands in it
(``dvc_project.dvc("exp", "run", "-S", "train.epochs=1")``, ``dvc_project.client()``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline_project import DvcProject, make_dvc_project
from servers import kill_group, prefect_server


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """Where the demo teacher is trained (once per session) and cached."""
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture
def dvc_project(tmp_path, teacher_cache) -> DvcProject:
    """A fresh, committed git + DVC copy of the project with tiny demo params."""
    return make_dvc_project(tmp_path / "project", teacher_cache=teacher_cache)


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 (a real HTTP endpoint; boto3 is not patched)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        #: what a process needs to use it: static test credentials and AWS_ENDPOINT_URL
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "qimera-test-key",
                    "AWS_SECRET_ACCESS_KEY": "qimera-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def process_env(self, base: dict, home: Path) -> dict[str, str]:
        """``base`` without its AWS_* settings, plus this server's credentials and endpoint
        and no ~/.aws files or instance metadata to fall back on (``home`` holds neither)."""
        env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
        return {**env, **self.env, **isolated_aws_files(home)}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="qimera-test-key", aws_secret_access_key="qimera-test-secret")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """A ThreadedMotoServer for the session, stopped at the end."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This process talks to the moto server: its credentials and endpoint in os.environ,
    and no ~/.aws files or instance metadata to fall back on."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_server.process_env({}, tmp_path).items():
        monkeypatch.setenv(key, value)
    return s3_server


def isolated_aws_files(tmp_path: Path) -> dict[str, str]:
    return {"AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A Prefect server on 127.0.0.1:<free port> with its home and database in a tmp dir
    (one per test module), killed by process group at the end."""
    server, info = prefect_server(tmp_path_factory.mktemp("prefect"))
    try:
        yield info
    finally:
        kill_group(server)
