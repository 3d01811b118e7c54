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
