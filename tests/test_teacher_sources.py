"""A new teacher source is one loader and one registration: this module adds ``toy`` (a
tiny BatchNorm CNN) and runs it through the config validation, ``load_teacher`` and
``qimera.run``; likewise a dataset through ``load_eval_data``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qimera
from qimera.config import ConfigError, TeacherConfig, load_config
from qimera.data import DATA_LOADERS, DATASETS, EvalData, load_eval_data, register_dataset
from qimera.teachers import (
    SOURCES,
    TEACHER_SOURCES,
    LoadedTeacher,
    TeacherError,
    TeacherSpec,
    finish_teacher,
    load_teacher,
    register_source,
)


class ToyCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def load_toy(config: TeacherConfig) -> LoadedTeacher:
    """The whole ``toy`` source: build the network, let finish_teacher do the rest."""
    torch.manual_seed(0)
    model = ToyCNN(config.num_classes or 10)
    return finish_teacher(config, model, name=config.name or "toy", arch=f"{__name__}:ToyCNN",
                          spec=TeacherSpec(10, (1, 8, 8), (0.3,), (0.4,)))


@pytest.fixture
def toy():
    register_source("toy", load_toy)
    yield
    TEACHER_SOURCES.unregister("toy")


def test_unregistered_source_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"teacher.source='toy': unknown source; allowed: pytorchcv") as info:
        load_config({"teacher": {"source": "toy"}, "quant": {"w_bits": 4, "a_bits": 4}})
    assert all(s in str(info.value) for s in SOURCES)


def test_registered_source_validates_and_loads(toy):
    assert "toy" in SOURCES and SOURCES[-1] == "toy"
    assert TeacherConfig(source="toy").source == "toy"
    teacher = load_teacher(TeacherConfig(source="toy", num_classes=7))
    assert teacher.source == "toy" and teacher.name == "toy" and teacher.num_classes == 7
    assert teacher.arch == f"{__name__}:ToyCNN" and teacher.fc_weight.shape == (7, 8)
    assert teacher.input_size == (1, 8, 8) and teacher.mean == (0.3,) and not teacher.model.training
    # the shorthand goes through the same validation
    assert load_teacher("toy", std=[0.5]).std == (0.5,)
    with pytest.raises(TeacherError, match=r"teacher.std=\[0.0\]: every value must be > 0"):
        load_teacher("toy", std=[0.0])
    with pytest.raises(TeacherError, match=r"teacher.mean: has 3 values but the input has 1 channels"):
        load_teacher("toy", mean=[0.1, 0.2, 0.3], std=[0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="already registered"):
        register_source("toy", load_toy)


def test_registered_source_by_import_path(toy):
    register_source("toy", f"{__name__}:load_toy", replace=True)
    assert load_teacher("toy").arch == f"{__name__}:ToyCNN"


def test_run_end_to_end_with_a_registered_source(toy, tmp_path):
    cfg = {
        "method": "qimera",
        "teacher": {"source": "toy"},
        "data": {"name": "digits", "limit": 64},
        "quant": {"w_bits": 4, "a_bits": 4},
        "train": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 8, "warmup_epochs": 0,
                  "calibration_epochs": 1, "lr_milestones": [1], "progress": False,
                  "out_dir": str(tmp_path / "run")},
        "naive": {"batches": 1, "batch_size": 8},
    }
    prep = qimera.prepare(cfg)
    assert prep.teacher.source == "toy" and prep.eval_data.mean == (0.3,)  # the teacher's normalisation
    summary = qimera.run(cfg, prepared=prep).summary()
    assert 0.0 <= summary["student_top1"] <= 100.0


def test_registered_dataset(tmp_path):
    def load_ones(config) -> EvalData:
        images = torch.ones(6, 1, 8, 8)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.int64)),
                                             batch_size=config.batch_size)
        return EvalData(loader, 1, 6, (1, 8, 8), tuple(config.mean), tuple(config.std), config.name)

    register_dataset("ones", load_ones)
    try:
        assert "ones" in DATASETS
        data = load_eval_data("ones", batch_size=4, default_mean=[0.5], default_std=[0.25])
        assert data.name == "ones" and data.mean == (0.5,) and [len(b[1]) for b in data.loader] == [4, 2]
    finally:
        DATA_LOADERS.unregister("ones")
    with pytest.raises(ConfigError, match=r"data.name='ones': unknown dataset; allowed: cifar10"):
        load_config({"data": {"name": "ones"}, "quant": {"w_bits": 4, "a_bits": 4}})


def test_a_source_without_a_transform_gets_the_standard_one_and_prepare_passes_it_on(toy, tmp_path):
    """A source that states no evaluation transform gets the standard one (0.875 crop
    ratio, bilinear, its mean/std); ``qimera.prepare`` hands the teacher's transform to
    every dataset loader that takes a ``transform`` keyword."""
    seen = []

    def load_probe(config, transform=None) -> EvalData:
        seen.append(transform)
        images = torch.zeros(2, 1, 8, 8)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(2, dtype=torch.int64)))
        return EvalData(loader, 1, 2, (1, 8, 8), tuple(config.mean), tuple(config.std), config.name)

    register_dataset("probe", load_probe)
    try:
        prep = qimera.prepare({"teacher": {"source": "toy"}, "data": {"name": "probe"},
                               "quant": {"w_bits": 4, "a_bits": 4}, "train": {"out_dir": str(tmp_path / "run")}})
    finally:
        DATA_LOADERS.unregister("probe")
    t = prep.teacher.eval_transform
    assert (t.resize, t.crop, t.interpolation, t.mean, t.std) == (10, (8, 8), "bilinear", (0.3,), (0.4,))
    assert seen == [t] and prep.eval_data.mean == (0.3,)
