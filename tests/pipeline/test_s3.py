"""stages.s3 against moto's S3-compatible server on 127.0.0.1: verified transfers, the
manifest protocol for directories, and the errors a user meets."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("boto3")

from stages import s3  # noqa: E402
from stages.s3 import MANIFEST, StorageError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32))
    return path


def test_parse_url_names_what_is_wrong():
    assert s3.parse_url("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    assert s3.join("s3://bucket/runs/", "m", "r1") == "s3://bucket/runs/m/r1"
    assert s3.join("s3://bucket", "x") == "s3://bucket/x"
    for bad, msg in (("https://x/y", "not an s3:// URL"), ("s3:///key", "no bucket"), ("s3://bucket", "no object key"),
                     ("s3://bucket/dir/", "no object key")):
        with pytest.raises(StorageError, match=msg):
            s3.parse_url(bad)


def test_file_roundtrip_is_verified(s3_env, tmp_path):
    bucket = s3_env.bucket("qimera-unit-files")
    src = _file(tmp_path / "weights.pt", 3_000_001)
    up = s3.upload_file(src, f"s3://{bucket}/teachers/weights.pt")
    head = s3_env.client().head_object(Bucket=bucket, Key="teachers/weights.pt", ChecksumMode="ENABLED")
    assert head["ContentLength"] == src.stat().st_size
    assert head["Metadata"]["sha256"] == up["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert head.get("ChecksumSHA256")  # the store computed its own SHA-256 of what it received
    down = s3.download(f"s3://{bucket}/teachers/weights.pt", tmp_path / "back" / "w.pt")
    assert (tmp_path / "back" / "w.pt").read_bytes() == src.read_bytes()
    assert down["sha256"] == up["sha256"] and down["size"] == src.stat().st_size
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["w.pt"]  # no temporary left


def test_corrupt_object_is_refused_and_nothing_written(s3_env, tmp_path):
    bucket = s3_env.bucket("qimera-unit-corrupt")
    s3_env.client().put_object(Bucket=bucket, Key="w.pt", Body=b"not the bytes that were hashed",
                               Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError, match="SHA-256 .* differs from its sha256 metadata"):
        s3.download(f"s3://{bucket}/w.pt", tmp_path / "out" / "w.pt")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_bucket_and_key(s3_env, tmp_path):
    bucket = s3_env.bucket("qimera-unit-missing")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        s3.download("s3://no-such-bucket/w.pt", tmp_path / "w.pt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        s3.upload_file(_file(tmp_path / "a", 10), "s3://no-such-bucket/a")
    with pytest.raises(StorageError, match=f"s3://{bucket}/nothing.pt: no such object"):
        s3.download(f"s3://{bucket}/nothing.pt", tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()
    assert not s3.exists(f"s3://{bucket}/nothing.pt")
    s3.upload_file(_file(tmp_path / "a", 10), f"s3://{bucket}/a")
    assert s3.exists(f"s3://{bucket}/a")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        s3.exists("s3://no-such-bucket/a")


def test_missing_credentials(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials .*AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
        s3.download("s3://qimera-any/w.pt", tmp_path / "w.pt")
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(StorageError, match="AWS_PROFILE='nobody'"):
        s3.download("s3://qimera-any/w.pt", tmp_path / "w.pt")


def test_credentials_from_a_profile(s3_env, monkeypatch, tmp_path):
    bucket = s3_env.bucket("qimera-unit-profile")
    s3_env.client().put_object(Bucket=bucket, Key="w.pt", Body=b"weights")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[qimera]\naws_access_key_id = qimera-test-key\naws_secret_access_key = qimera-test-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "qimera")
    s3.download(f"s3://{bucket}/w.pt", tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == b"weights"


def test_unreachable_endpoint(s3_env, monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}.*AWS_ENDPOINT_URL"):
        s3.download("s3://qimera-any/w.pt", tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()


def test_directory_upload_writes_the_manifest_last(s3_env, tmp_path):
    bucket = s3_env.bucket("qimera-unit-dir")
    local = tmp_path / "export"
    _file(local / "student.onnx", 5000, 1)
    _file(local / "integer" / "quant_map.json", 300, 2)
    manifest = s3.upload_dir(local, f"s3://{bucket}/runs/r1", metadata={"mlflow_run_id": "r1"})
    assert s3_env.keys(bucket) == ["runs/r1/MANIFEST.json", "runs/r1/integer/quant_map.json", "runs/r1/student.onnx"]
    assert manifest["mlflow_run_id"] == "r1" and set(manifest["files"]) == {"student.onnx", "integer/quant_map.json"}
    back = s3.download_dir(f"s3://{bucket}/runs/r1", tmp_path / "back")
    assert back["files"] == manifest["files"]
    for rel in manifest["files"]:
        assert (tmp_path / "back" / rel).read_bytes() == (local / rel).read_bytes()


def test_failed_directory_upload_leaves_nothing_that_looks_complete(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.bucket("qimera-unit-half")
    local = tmp_path / "export"
    for i in range(3):
        _file(local / f"f{i}.bin", 1000, i)
    prefix = f"s3://{bucket}/runs/r2"
    s3.upload_dir(local, prefix)  # a complete earlier upload at the same prefix
    real = s3.upload_file
    calls = []

    def failing(path, url, **kw):  # the third file's transfer breaks (e.g. the network drops)
        calls.append(url)
        if len(calls) == 3:
            raise StorageError(f"upload {url}: connection reset")
        return real(path, url, **kw)

    monkeypatch.setattr(s3, "upload_file", failing)
    _file(local / "f0.bin", 1000, 9)  # new content
    with pytest.raises(StorageError, match="connection reset"):
        s3.upload_dir(local, prefix)
    monkeypatch.setattr(s3, "upload_file", real)
    keys = s3_env.keys(bucket, "runs/r2/")
    assert f"runs/r2/{MANIFEST}" not in keys  # the old manifest went first
    assert "runs/r2/f0.bin" not in keys and "runs/r2/f1.bin" not in keys  # this attempt's files removed
    with pytest.raises(StorageError, match="no MANIFEST.json, so the upload there is incomplete"):
        s3.download_dir(prefix, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_a_manifest_cannot_write_outside_the_destination(s3_env, tmp_path):
    bucket = s3_env.bucket("qimera-unit-evil")
    evil = tmp_path / "m" / MANIFEST
    evil.parent.mkdir()
    evil.write_text(json.dumps({"format_version": 1, "files": {"../outside.txt": {"size": 1, "sha256": "0" * 64}}}))
    s3.upload_file(evil, f"s3://{bucket}/p/{MANIFEST}")
    with pytest.raises(StorageError, match="not a file under the prefix"):
        s3.download_dir(f"s3://{bucket}/p", tmp_path / "dest" / "back")
    assert not (tmp_path / "dest" / "outside.txt").exists() and list((tmp_path / "dest").iterdir()) == []


def test_command_line_get_and_its_errors(s3_server, tmp_path):
    bucket = s3_server.bucket("qimera-unit-cli")
    src = _file(tmp_path / "t.pt", 777)
    s3_server.client().upload_file(str(src), bucket, "t.pt")
    env = {**s3_server.process_env(dict(os.environ), tmp_path), "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "stages.s3", "get", f"s3://{bucket}/t.pt", str(tmp_path / "o.pt")],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["size"] == 777 and (tmp_path / "o.pt").read_bytes() == src.read_bytes()
    bad = subprocess.run([sys.executable, "-m", "stages.s3", "get", f"s3://{bucket}/missing.pt", str(tmp_path / "m")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such object" in bad.stderr and "Traceback" not in bad.stderr
