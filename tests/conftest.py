"""Shared fixtures: a tiny random-weight teacher and a few-second run config."""

import os
from pathlib import Path

import pytest
import torch

from qimera.models.digits_cnn import DigitsCNN
from qimera.teachers import load_teacher


def pytest_configure(config):
    """Under pytest-xdist (``make test``: two workers on a 2-core machine) each worker's
    torch, and the processes its tests start, run one thread: two workers at two threads
    each would oversubscribe the cores."""
    if hasattr(config, "workerinput"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A DigitsCNN with random weights and non-trivial BN statistics, saved as a checkpoint."""
    torch.manual_seed(0)
    model = DigitsCNN(10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def tiny_config(tiny_weights, tmp_path) -> dict:
    """A few-second Qimera run on the digits data with the tiny teacher."""
    return {
        "method": "qimera",
        "teacher": {"source": "checkpoint", "arch": "qimera.models.digits_cnn:DigitsCNN",
                    "weights": str(tiny_weights), "num_classes": 10, "input_size": [1, 8, 8],
                    "mean": [0.3], "std": [0.4]},
        "data": {"name": "digits", "batch_size": 256},
        "quant": {"w_bits": 4, "a_bits": 4},
        "generator": {"p": 0.5, "k": 2, "dm_layers": 1, "embedding_init": "teacher_fc"},
        # warm-up 0 and a milestone at 1, so that one-epoch runs (train.epochs=1) are valid
        "train": {"epochs": 3, "iters_per_epoch": 3, "batch_size": 16, "warmup_epochs": 0,
                  "calibration_epochs": 1, "lr_milestones": [1], "seed": 3, "progress": False,
                  "out_dir": str(tmp_path / "run")},
        "naive": {"batches": 2, "batch_size": 16},
    }


@pytest.fixture
def tiny_teacher(tiny_config):
    t = tiny_config["teacher"]
    return load_teacher("checkpoint", arch=t["arch"], weights=t["weights"], num_classes=10,
                        input_size=(1, 8, 8), mean=(0.3,), std=(0.4,))


@pytest.fixture
def short_socket_timeout():
    """Keep any (failing) download attempt from hanging: a 5 s socket timeout."""
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(previous)
