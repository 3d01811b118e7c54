"""Credentials never reach a printed line or a written file (issue 21 item 6): every URI
the pipeline prints, raises or records goes through :func:`stages.common.redact`, which
drops ``user:password@`` and replaces the value of credential query and fragment
parameters with ``***``."""

from __future__ import annotations

import json

import pytest

from servers import free_port
from stages import common, tracking
from stages.common import PipelineError, redact, redact_text

SECRET = "s3cr3t-VALUE"


@pytest.mark.parametrize("uri, expected", [
    ("https://bob:secret@host:5000/x", "https://host:5000/x"),  # the form of before
    (f"http://127.0.0.1:5999/?token={SECRET}", "http://127.0.0.1:5999/?token=***"),
    (f"https://h/p?a=1&X-Amz-Signature={SECRET}&X-Amz-Credential=AK%2F20&X-Amz-Security-Token={SECRET}&X-Amz-Date=2",
     "https://h/p?a=1&X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Date=2"),
    (f"https://h/?sig={SECRET}&api_key={SECRET}&APIKEY={SECRET}&Password={SECRET}&client_secret={SECRET}",
     "https://h/?sig=***&api_key=***&APIKEY=***&Password=***&client_secret=***"),
    (f"https://h/cb#access_token={SECRET}&state=7", "https://h/cb#access_token=***&state=7"),
    (f"https://h/?auth={SECRET};key={SECRET}", "https://h/?auth=***;key=***"),
    (f"postgresql://user:{SECRET}@db:5432/mlflow?sslmode=require", "postgresql://db:5432/mlflow?sslmode=require"),
    (f"https://{SECRET}@github.com/org/repo.git", "https://github.com/org/repo.git"),
    (f"http://u:{SECRET}@[::1]:5000/?token={SECRET}", "http://[::1]:5000/?token=***"),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),  # kept as written
    ("s3://bucket/prefix/key", "s3://bucket/prefix/key"),
    ("http://h/a@b?page=2&sort=name", "http://h/a@b?page=2&sort=name"),
    ("not a uri", "not a uri"),
])
def test_redact(uri, expected):
    assert redact(uri) == expected


def test_redact_text_finds_uris_and_bare_query_parameters():
    text = (f"HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: /?token={SECRET}/api/2.0 "
            f"(see https://u:{SECRET}@h/x?apikey={SECRET}, a&b=c)")
    out = redact_text(text)
    assert SECRET not in out and "url: /?token=***" in out and "https://h/x?apikey=***" in out and "a&b=c" in out


def test_the_tracking_errors_carry_no_token(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}/?token={SECRET}"
    with pytest.raises(PipelineError) as err:
        tracking.connect(uri)  # nothing listens there
    message = str(err.value)
    assert SECRET not in message and f"'{uri.split('?')[0]}?token=***' is not usable" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:///tmp/mlruns?token={SECRET}")
    with pytest.raises(PipelineError) as err:
        tracking.tracking_uri({})
    assert SECRET not in str(err.value) and "token=***" in str(err.value)
    monkeypatch.setattr(tracking, "_connected_uri", uri)
    assert tracking.outage_message(RuntimeError("unrelated"), "train") is None


def test_mlflow_run_json_records_the_redacted_uri(tmp_path, monkeypatch):
    """open_run writes the tracking URI into outputs/train/mlflow_run.json, and compares it
    on resume: the file holds the redacted form, and a resume still finds the run."""
    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / common.TRAIN_DIR).mkdir(parents=True)
    uri = f"https://user:{SECRET}@mlflow.example/?token={SECRET}"
    run_id = tracking.open_run(client, uri, "redact", None, resume=False, tags={}, name="r")
    text = (tmp_path / common.MLFLOW_RUN).read_text()
    assert SECRET not in text and json.loads(text)["tracking_uri"] == "https://mlflow.example/?token=***"
    assert tracking.open_run(client, uri, "redact", None, resume=True, tags={}, name="r") == run_id


def test_s3_url_errors_and_endpoints_are_redacted():
    from stages.s3 import StorageError, parse_url

    with pytest.raises(StorageError) as err:
        parse_url(f"https://bucket.s3.amazonaws.com/k?X-Amz-Signature={SECRET}")
    assert SECRET not in str(err.value) and "X-Amz-Signature=***" in str(err.value)
    with pytest.raises(StorageError) as err:
        parse_url(f"s3://bucket/k?token={SECRET}")
    assert SECRET not in str(err.value) and "? and # are not allowed" in str(err.value)


def test_remote_settings_errors_are_redacted():
    from pipelines.remote import RemoteSettings
    from stages.s3 import StorageError

    with pytest.raises(StorageError) as err:
        RemoteSettings.from_env({"QIMERA_REMOTE": f"s3://b/p?token={SECRET}"})
    assert SECRET not in str(err.value) and "QIMERA_REMOTE" in str(err.value)
    with pytest.raises(StorageError) as err:
        RemoteSettings.from_env({"QIMERA_DVC_EXP_REMOTE": f"https://x:{SECRET}@git.example/r.git"})
    assert SECRET not in str(err.value) and "https://git.example/r.git" in str(err.value)
