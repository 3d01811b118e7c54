"""params.yaml that picks another teacher source or dataset than its preset (issue 21
item 5): the preset's keys the new one does not read are dropped, since the config
refuses them and a null in params.yaml means "the preset's value"."""

from __future__ import annotations

from pathlib import Path

import pytest

from qimera.config import ConfigError
from stages.common import resolve_config

REPO = Path(__file__).resolve().parents[2]


def test_another_source_or_dataset_drops_the_presets_keys_it_does_not_read():
    params = {"preset": "cifar10", "quant": {"w_bits": 4, "a_bits": 4},
              "teacher": {"source": "checkpoint", "arch": "a.b:c", "weights": "w.pt", "name": None},
              "data": {"name": "npz", "path": "x.npz", "root": None}}
    cfg = resolve_config(params, REPO)  # the preset: pytorchcv teacher, CIFAR-10 with root and download
    assert (cfg.data.root, cfg.data.download, cfg.data.path) == (None, False, "x.npz")
    assert cfg.teacher.arch == "a.b:c" and cfg.teacher.cache_dir == "data/teachers"  # read by every source
    params["data"]["root"] = "elsewhere"  # set by params.yaml itself: refused, not dropped
    with pytest.raises(ConfigError, match="data.root='elsewhere': not used by data.name='npz'"):
        resolve_config(params, REPO)
    same = resolve_config({"preset": "cifar10", "quant": {"w_bits": 4, "a_bits": 4}, "data": {"name": "cifar10"}}, REPO)
    assert same.data.root == "data/cifar10" and same.data.download is True  # the preset's own dataset: kept
