"""Tests for the offline demo teacher qimera.models.digits_cnn."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn

from qimera.data import load_eval_data
from qimera.evaluate import evaluate
from qimera.models.digits_cnn import (
    DIGITS_MEAN,
    DIGITS_STD,
    DigitsCNN,
    digits_split,
    load_demo_teacher,
)


def test_architecture_and_fx_trace() -> None:
    model = DigitsCNN()
    modules = [m for m in model.modules() if not list(m.children())]
    assert isinstance(modules[-1], nn.Linear) and modules[-1].out_features == 10
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            assert isinstance(modules[i + 1], nn.BatchNorm2d)
    assert any(isinstance(m, nn.ReLU) for m in modules)
    traced = torch.fx.symbolic_trace(model.eval())
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(traced(x), model(x))
    assert model(x).shape == (4, 10)


def test_split_is_fixed_and_stats_match_training_split() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    assert x_train.shape == (1257, 1, 8, 8) and x_test.shape == (540, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    again = digits_split(seed=5)
    assert torch.equal(again[2], x_test) and torch.equal(again[3], y_test)
    assert float(x_train.mean()) == pytest.approx(DIGITS_MEAN[0], abs=1e-3)
    assert float(x_train.std()) == pytest.approx(DIGITS_STD[0], abs=1e-3)


def test_demo_teacher_trains_caches_and_reaches_97(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, meta = load_demo_teacher(cache_dir=tmp_path)
    train_seconds = time.perf_counter() - start
    weights = Path(meta["weights_path"])
    assert weights == tmp_path / "digits_cnn_seed0.pt" and weights.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [weights.name]  # no temp leftovers
    assert meta["num_classes"] == 10 and meta["input_size"] == (1, 8, 8)
    assert meta["mean"] == DIGITS_MEAN and meta["std"] == DIGITS_STD
    assert not model.training

    data = load_eval_data("digits")
    result = evaluate(model, data.loader, num_classes=data.num_classes)
    assert result.num_samples == 540
    assert result.top1 >= 97.0, f"held-out top-1 {result.top1:.2f}% (trained in {train_seconds:.1f}s)"

    start = time.perf_counter()
    cached, meta2 = load_demo_teacher(cache_dir=tmp_path)
    assert time.perf_counter() - start < min(2.0, train_seconds)
    assert meta2 == meta and not cached.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), cached.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
