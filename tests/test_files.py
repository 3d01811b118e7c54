"""Atomically published files get ordinary permissions, not mkstemp's private 0600."""

import os
import stat
import tempfile

import pytest
import torch

from qimera._files import default_permissions
from qimera.baselines import calibrate
from qimera.export import export_integer
from qimera.models.digits_cnn import DigitsCNN
from qimera.quant import QuantRecipe, quantize_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_temporary_files_and_dirs_get_the_umask_permissions(tmp_path, umask_022):
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    d = tempfile.mkdtemp(dir=tmp_path)
    assert _mode(name) == 0o600 and _mode(d) == 0o700
    default_permissions(name)
    default_permissions(d)
    assert _mode(name) == 0o644 and _mode(d) == 0o755
    assert os.umask(0o022) == 0o022  # the process umask is left as it was


def test_integer_export_is_readable_by_the_team(tmp_path, umask_022):
    student, _ = quantize_model(DigitsCNN(10).eval(), QuantRecipe(4, 4))
    calibrate(student, [torch.randn(8, 1, 8, 8)])
    export_integer(student, tmp_path / "int", arch="qimera.models.digits_cnn:DigitsCNN")
    assert _mode(tmp_path / "int") == 0o755
    assert all(_mode(p) == 0o644 for p in (tmp_path / "int").iterdir())


def test_atomic_dir_refuses_a_directory_it_did_not_write(tmp_path):
    """Issue 21 item 1: a directory holding a user's files is refused, and kept whole."""
    import pytest

    from qimera._files import OutputDirError, atomic_dir

    dest = tmp_path / "mine"
    (dest / "sub").mkdir(parents=True)
    (dest / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputDirError, match="thesis.txt"):
        with atomic_dir(dest) as tmp:
            (tmp / "out.bin").write_bytes(b"x")
    assert (dest / "thesis.txt").read_text() == "years of work" and (dest / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_atomic_dir_replaces_what_it_wrote_and_refuses_the_cwd(tmp_path, monkeypatch):
    import pytest

    from qimera._files import WRITTEN_MARKER, OutputDirError, atomic_dir

    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (dest / WRITTEN_MARKER).is_file()
    with atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == sorted([WRITTEN_MARKER, "b.txt"])
    (dest / "added-by-user.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="added-by-user.txt"):
        with atomic_dir(dest):
            pass
    assert (dest / "added-by-user.txt").exists() and (dest / "b.txt").exists()
    (cwd := tmp_path / "cwd").mkdir()
    (cwd / "f").write_text("x")
    monkeypatch.chdir(cwd)
    with pytest.raises(OutputDirError, match="working directory"):
        with atomic_dir("."):
            pass
    assert (cwd / "f").exists()
