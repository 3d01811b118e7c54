"""What the team deployments (``prefect.team.yaml``) clone: the repository URL and the
commit ``prefect deploy`` ran at. Its build steps call::

    python -m pipelines.source url      # the git remote's URL (QIMERA_GIT_URL overrides it)
    python -m pipelines.source commit   # HEAD, refused unless the remote has it

and the deployments' ``git_clone`` pull step checks that commit out for every flow run,
so a worker runs the code that was deployed, whatever the branch has become since.

``QIMERA_GIT_REMOTE`` names the remote (default ``origin``). A remote that is a local
path is written as an absolute path: the workers clone it from there, so it must be a
path they can read (the tests' bare repository; an NFS path), or give
``QIMERA_GIT_URL=https://…`` (or ``git@…``, ``file://…``) as the workers must see it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GIT_REMOTE_ENV = "QIMERA_GIT_REMOTE"
GIT_URL_ENV = "QIMERA_GIT_URL"


class SourceError(RuntimeError):
    """The checkout cannot be deployed as it is; the message says why and what to do."""


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def remote_name(environ=None) -> str:
    return ((environ if environ is not None else os.environ).get(GIT_REMOTE_ENV) or "origin").strip()


def url(root: Path, environ=None) -> str:
    """The URL the workers clone: ``QIMERA_GIT_URL``, else the remote's (a local path made
    absolute)."""
    environ = environ if environ is not None else os.environ
    if (environ.get(GIT_URL_ENV) or "").strip():
        return environ[GIT_URL_ENV].strip()
    remote = remote_name(environ)
    got = _git("remote", "get-url", remote, cwd=root)
    if got.returncode != 0:
        from stages.common import redact_text

        raise SourceError(f"{GIT_REMOTE_ENV}={remote!r}: this checkout has no such git remote "
                          f"({redact_text(got.stderr.strip())}); add one (`git remote add {remote} URL`) and push, or set "
                          f"{GIT_URL_ENV}")
    value = got.stdout.strip()
    if "://" not in value and not value.startswith("git@") and ":" not in value.split("/")[0]:
        value = str((root / value).resolve())  # a local path, relative to the checkout
    return value


def commit(root: Path, environ=None) -> str:
    """HEAD's full SHA, refused unless a branch of the remote contains it (as last pushed
    or fetched): a worker could not check out a commit that exists only here."""
    head = _git("rev-parse", "--verify", "HEAD^{commit}", cwd=root)
    if head.returncode != 0:
        raise SourceError(f"{root}: not a git checkout with a commit ({head.stderr.strip()})")
    sha = head.stdout.strip()
    remote = remote_name(environ)
    branches = _git("branch", "-r", "--contains", sha, cwd=root)
    if branches.returncode != 0 or not any(b.strip().startswith(f"{remote}/") for b in branches.stdout.splitlines()):
        raise SourceError(f"commit {sha[:12]} is not on any branch of the git remote {remote!r}: push it first "
                          f"(`git push {remote} HEAD`), then run `prefect deploy` again")
    dirty = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    if dirty.stdout.strip():
        print(f"warning: uncommitted changes are not deployed; the workers run commit {sha[:12]}", file=sys.stderr)
    return sha


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["url"], ["commit"]):
        print("usage: python -m pipelines.source url|commit", file=sys.stderr)
        return 2
    root = Path.cwd()
    try:
        print(url(root) if args == ["url"] else commit(root))
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
