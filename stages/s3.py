"""S3 and S3-compatible object stores for the pipeline, through boto3.

* :func:`download` fetches one object (the ``checkpoint`` teacher's ``s3://bucket/key``);
* :func:`upload_dir` pushes a directory (the export stage's artifacts) under a prefix and
  writes ``MANIFEST.json`` last; :func:`download_dir` reads it back.

Credentials, region and endpoint come from boto3's usual chain: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with ``~/.aws``, instance
roles, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for
S3-compatible stores such as MinIO, Ceph or moto. Nothing here logs a credential.

Every transfer is verified: the object's size against the file's, and its SHA-256
against the store's own checksum (uploads ask S3 to compute a SHA-256 of what it
received) or, where the store has none for the whole object, against the bytes read
back. A directory upload is complete only once its manifest exists: the old manifest is
deleted before anything else is written, the manifest (sizes and SHA-256 of every file) is
written after every file has been verified, and the files of a failed upload are removed.
Readers refuse a prefix without a manifest.

Command line (for `qimera run` users, whose library does not import boto3)::

    python -m stages.s3 get s3://bucket/teachers/resnet20.pt resnet20.pt
    python -m stages.s3 put-dir outputs/export s3://bucket/qimera/demo
    python -m stages.s3 get-dir s3://bucket/qimera/demo local-dir
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qimera._files import WRITTEN_MARKER, OutputDirError, atomic_dir, default_permissions, sha256_file

from .common import PipelineError, redact, redact_text

MANIFEST = "MANIFEST.json"
#: single-request uploads up to this size, so that S3's stored SHA-256 covers the whole object
MULTIPART_THRESHOLD = 1 << 30
_CHUNK = 1 << 20


class StorageError(PipelineError):
    """A transfer to or from S3 failed; the message says what and what to do."""


class NoSuchObject(StorageError):
    """The object (for :func:`download_dir`: the prefix's manifest) is not in the bucket,
    which exists: what a caller that looks for something optional catches."""


def parse_url(url: str, *, key_required: bool = True) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; clear errors for anything else."""
    parts = urllib.parse.urlsplit(str(url))
    shown = repr(redact(str(url)))  # a presigned https URL given by mistake keeps its signature out of the message
    if parts.scheme != "s3":
        raise StorageError(f"{shown}: not an s3:// URL (expected s3://bucket/key)")
    if not parts.netloc:
        raise StorageError(f"{shown}: no bucket (expected s3://bucket/key)")
    if parts.query or parts.fragment:
        raise StorageError(f"{shown}: ? and # are not allowed in an s3:// URL")
    key = parts.path.lstrip("/")
    if key_required and (not key or key.endswith("/")):
        raise StorageError(f"{shown}: no object key (expected s3://bucket/key)")
    return parts.netloc, key


def join(prefix: str, *names: str) -> str:
    """``join("s3://b/a", "x/y")`` -> ``s3://b/a/x/y``."""
    bucket, key = parse_url(prefix, key_required=False)
    parts = [p.strip("/") for p in (key, *names) if p.strip("/")]
    return f"s3://{bucket}/{'/'.join(parts)}"


# --------------------------------------------------------------------------- client, errors


def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StorageError("s3:// needs boto3: pip install 'qimera[s3]'") from exc
    from botocore.exceptions import ProfileNotFound

    try:
        session = boto3.session.Session()
    except ProfileNotFound as exc:
        raise StorageError(f"AWS_PROFILE={os.environ.get('AWS_PROFILE')!r}: {exc}") from None
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return session.client("s3", config=config)


def _endpoint(client) -> str:
    """The S3 endpoint, as it may be printed (:func:`stages.common.redact`)."""
    return redact(client.meta.endpoint_url)


@contextmanager
def _errors(client, url: str, action: str) -> Iterator[None]:
    """Turn botocore's exceptions into one-line StorageErrors that say what to change."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )
    from boto3.exceptions import S3UploadFailedError

    bucket = urllib.parse.urlsplit(url).netloc
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StorageError(
            f"{action} {url}: no AWS credentials ({exc}). Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE naming a profile in ~/.aws/credentials"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise StorageError(
            f"{action} {url}: cannot reach the S3 endpoint {_endpoint(client)} ({type(exc).__name__}). "
            "Check AWS_ENDPOINT_URL (for S3-compatible stores) and the network"
        ) from None
    except (ClientError, S3UploadFailedError) as exc:
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
        text = str(exc)
        if code == "NoSuchBucket" or "NoSuchBucket" in text:
            raise StorageError(f"{action} {url}: bucket {bucket!r} does not exist at {_endpoint(client)}") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            if not _bucket_exists(client, bucket):
                raise StorageError(f"{action} {url}: bucket {bucket!r} does not exist at {_endpoint(client)}") from None
            raise NoSuchObject(f"{action} {url}: no such object") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken") or any(
                c in text for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
            raise StorageError(
                f"{action} {url}: access denied ({code or 'see the store'}); check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy"
            ) from None
        raise StorageError(f"{action} {url}: {redact_text(text.splitlines()[0])[:300]}") from None


def _bucket_exists(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=64 << 20)


def _stored_sha256(head: dict) -> str | None:
    """The store's SHA-256 of the whole object (hex) from a HEAD response, if it has one
    (multipart uploads carry a composite checksum instead)."""
    stored = head.get("ChecksumSHA256")
    if stored and "-" not in stored and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return base64.b64decode(stored).hex()
    return None


def _object_sha256(client, bucket: str, key: str, head: dict) -> str:
    """The SHA-256 of the stored object: the store's full-object checksum when it has one,
    else read back and hashed."""
    stored = _stored_sha256(head)
    if stored:
        return stored
    digest = hashlib.sha256()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in iter(lambda: body.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- one object


def exists(url: str, *, client=None) -> bool:
    """Whether the object ``url`` exists (a missing bucket, no access or no endpoint is a
    :class:`StorageError`, not False)."""
    bucket, key = parse_url(url)
    client = client or _client()
    try:
        with _errors(client, url, "look up"):
            client.head_object(Bucket=bucket, Key=key)
    except NoSuchObject:
        return False
    return True


def download(url: str, dest: str | os.PathLike, *, client=None) -> dict:
    """Fetch ``url`` into ``dest`` (written atomically) and verify size and SHA-256.

    The SHA-256 is checked against the object's stored checksum or its ``sha256``
    metadata (written by :func:`upload_file`) when either exists. Returns
    ``{"url", "size", "sha256", "etag"}``.
    """
    bucket, key = parse_url(url)
    client = client or _client()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _errors(client, url, "download"):
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            client.download_file(bucket, key, tmp, Config=_transfer_config())
            size = Path(tmp).stat().st_size
            if size != head["ContentLength"]:
                raise StorageError(f"download {url}: got {size} bytes, the store holds {head['ContentLength']}")
            digest = sha256_file(Path(tmp))
            expected = []
            if _stored_sha256(head):
                expected.append(("the store's checksum", _stored_sha256(head)))
            if head.get("Metadata", {}).get("sha256"):
                expected.append(("its sha256 metadata", head["Metadata"]["sha256"]))
            for what, value in expected:
                if value != digest:
                    raise StorageError(f"download {url}: SHA-256 {digest[:16]}… differs from {what} {value[:16]}…; "
                                       "the object is corrupt or was changed during the transfer")
            default_permissions(tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {"url": url, "size": size, "sha256": digest, "etag": head.get("ETag", "").strip('"')}


def upload_file(path: str | os.PathLike, url: str, *, client=None) -> dict:
    """Upload one file and verify what the store holds: size and SHA-256."""
    bucket, key = parse_url(url)
    client = client or _client()
    path = Path(path)
    digest = sha256_file(path)
    size = path.stat().st_size
    with _errors(client, url, "upload"):
        client.upload_file(str(path), bucket, key, Config=_transfer_config(),
                           ExtraArgs={"Metadata": {"sha256": digest}, "ChecksumAlgorithm": "SHA256"})
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        if head["ContentLength"] != size:
            raise StorageError(f"upload {url}: the store holds {head['ContentLength']} bytes, the file has {size}")
        stored = _object_sha256(client, bucket, key, head)
        if stored != digest:
            raise StorageError(f"upload {url}: the store's SHA-256 {stored[:16]}… differs from the file's {digest[:16]}…")
    return {"url": url, "size": size, "sha256": digest}


# --------------------------------------------------------------------------- directories


def upload_dir(local_dir: str | os.PathLike, prefix: str, *, client=None, metadata: dict | None = None) -> dict:
    """Upload every file under ``local_dir`` (but qimera's ownership markers,
    :data:`qimera._files.WRITTEN_MARKER`) to ``prefix``/<relative path>, verified, then
    ``prefix/MANIFEST.json``. On failure the files this call uploaded are deleted again
    and no manifest exists. Returns the manifest."""
    local_dir = Path(local_dir)
    bucket, base = parse_url(prefix, key_required=False)
    client = client or _client()
    # the markers by which a local directory says qimera wrote it are not content: the
    # directory a download makes gets its own
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != WRITTEN_MARKER)
    if not files:
        raise StorageError(f"upload {local_dir}: no files to upload")
    manifest_url = join(prefix, MANIFEST)
    uploaded: list[str] = []
    with _errors(client, manifest_url, "upload"):
        client.delete_object(Bucket=bucket, Key=parse_url(manifest_url)[1])  # no longer complete
    try:
        entries = {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            url = join(prefix, rel)
            uploaded.append(url)
            info = upload_file(path, url, client=client)
            entries[rel] = {"size": info["size"], "sha256": info["sha256"]}
        manifest = {"format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": entries, **(metadata or {})}
        with tempfile.TemporaryDirectory(prefix="qimera-manifest-") as tmp:
            mpath = Path(tmp) / MANIFEST
            mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            upload_file(mpath, manifest_url, client=client)
    except BaseException:
        for url in uploaded:
            try:
                client.delete_object(Bucket=bucket, Key=parse_url(url)[1])
            except Exception:  # best effort: the missing manifest already marks the prefix incomplete
                pass
        raise
    return manifest


def download_dir(prefix: str, dest: str | os.PathLike, *, client=None) -> dict:
    """Download a prefix written by :func:`upload_dir` into ``dest`` (which appears
    complete or not at all, and must be absent, empty or a directory qimera wrote:
    :class:`qimera._files.OutputDirError` otherwise), checking every file against the manifest."""
    client = client or _client()
    with atomic_dir(dest) as tmp:
        try:
            download(join(prefix, MANIFEST), tmp / MANIFEST, client=client)
        except NoSuchObject:
            raise NoSuchObject(f"download {prefix}: no {MANIFEST}, so the upload there is incomplete "
                               "(or nothing was uploaded)") from None
        manifest = json.loads((tmp / MANIFEST).read_text())
        for rel in manifest["files"]:
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
                raise StorageError(f"download {prefix}: {MANIFEST} names {rel!r}, which is not a file under the prefix")
        for rel, entry in manifest["files"].items():
            try:
                info = download(join(prefix, rel), tmp / rel, client=client)
            except NoSuchObject as exc:  # listed but gone: a damaged prefix, not an absent one
                raise StorageError(str(exc)) from None
            if (info["size"], info["sha256"]) != (entry["size"], entry["sha256"]):
                raise StorageError(f"download {join(prefix, rel)}: differs from the manifest "
                                   f"({info['size']} bytes, sha256 {info['sha256'][:16]}…)")
    return manifest


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.s3", description="verified S3 transfers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, a, b in (("get", "url", "file"), ("put", "file", "url"), ("get-dir", "prefix", "dir"),
                       ("put-dir", "dir", "prefix")):
        p = sub.add_parser(name)
        p.add_argument(a)
        p.add_argument(b)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "get":
            info = download(args.url, args.file)
        elif args.cmd == "put":
            info = upload_file(args.file, args.url)
        elif args.cmd == "get-dir":
            info = {"files": len(download_dir(args.prefix, args.dir)["files"])}
        else:
            info = {"files": len(upload_dir(args.dir, args.prefix)["files"]), "prefix": args.prefix}
    except (StorageError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
