"""Tests for qimera.evaluate.evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from qimera.evaluate import EvalResult, evaluate


class TableModel(nn.Module):
    """Returns a fixed logits row per sample; the input's first element is the row index."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.bn = nn.BatchNorm1d(1)  # a submodule whose training flag must be restored
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.table[x[:, 0].long()]


def _rank_logits(order: list[int], num_classes: int) -> torch.Tensor:
    """Logits ranking ``order`` first, second, ... (no ties)."""
    logits = torch.zeros(num_classes)
    for rank, cls in enumerate(order):
        logits[cls] = float(num_classes - rank)
    return logits - 100.0 * (logits == 0)


def _setup() -> tuple[TableModel, DataLoader]:
    c = 7
    rows = [
        # (label, ranking of classes)       top1  top5
        (0, [0, 1, 2, 3, 4]),  # hit   hit
        (0, [1, 0, 2, 3, 4]),  # miss  hit
        (1, [2, 3, 4, 5, 6]),  # miss  miss
        (2, [2, 0, 1, 3, 4]),  # hit   hit
        (2, [0, 1, 3, 4, 2]),  # miss  hit (5th)
        (2, [0, 1, 3, 4, 5]),  # miss  miss
        (6, [6, 0, 1, 2, 3]),  # hit   hit
        (3, [4, 5, 6, 0, 1]),  # miss  miss
    ]
    table = torch.stack([_rank_logits(order, c) for _, order in rows])
    x = torch.arange(len(rows), dtype=torch.float32).view(-1, 1)
    y = torch.tensor([label for label, _ in rows])
    return TableModel(table), DataLoader(TensorDataset(x, y), batch_size=3)


def test_exact_top1_top5_per_class() -> None:
    model, loader = _setup()
    result = evaluate(model, loader)
    assert isinstance(result, EvalResult)
    assert result.num_samples == 8
    assert result.top1 == pytest.approx(100 * 3 / 8)
    assert result.top5 == pytest.approx(100 * 5 / 8)
    assert len(result.per_class) == 7
    expected = [50.0, 0.0, 100 / 3, 0.0, math.nan, math.nan, 100.0]
    for got, want in zip(result.per_class, expected):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_num_classes_extends_per_class_and_caps_topk() -> None:
    model, loader = _setup()
    result = evaluate(model, loader, num_classes=9)
    assert len(result.per_class) == 9 and math.isnan(result.per_class[8])
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, loader, num_classes=3)  # labels 3 and 6 exceed the range


def test_topk_uses_min_5_num_classes() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    model = TableModel(logits)
    x = torch.arange(3, dtype=torch.float32).view(-1, 1)
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 2, 0])), batch_size=2)
    result = evaluate(model, loader)
    assert result.top1 == pytest.approx(200 / 3)
    assert result.top5 == 100.0  # k = 3 covers every class


def test_restores_training_flags_and_evals_inside() -> None:
    model, loader = _setup()
    model.train()
    model.bn.eval()
    evaluate(model, loader)
    assert model.training and not model.bn.training
    assert model.seen_training and not any(model.seen_training)
    model.eval()
    evaluate(model, loader)
    assert not model.training


def test_autocast_and_channels_last_on_conv_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    x = torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert evaluate(model, loader, channels_last=True).top1 == 100.0
    result = evaluate(model, loader, autocast_dtype=torch.bfloat16)
    assert result.num_samples == 10 and 0.0 <= result.top1 <= 100.0


def test_empty_loader_raises() -> None:
    model, _ = _setup()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, empty)
