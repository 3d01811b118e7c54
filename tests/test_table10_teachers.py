"""The supplement's Table 10 teachers (InceptionV3, SqueezeNext, ShuffleNet) and timm:
each loads by spec without a download, quantizes with one activation quantizer per
ReLU call site, and trains for an iteration through ``qimera.run`` at 4w4a and 6w6a;
bad teachers are refused with one line before any work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import qimera
from qimera.config import ConfigError, load_config
from qimera.quant import act_quantizers, build_student
from qimera.teachers import TeacherError, load_teacher

#: the timm tests skip where the optional extra is absent; the others run anyway
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="the timm extra (pip install 'qimera[timm]') is not installed")


#: any (failing) download attempt gives up quickly (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("short_socket_timeout")


@pytest.fixture(scope="module")
def timm_resnet18_weights(tmp_path_factory) -> Path:
    """A ``timm.create_model("resnet18", pretrained=False)`` state dict, as one would copy a
    downloaded one onto an offline machine."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "resnet18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def fx_relu_sites(model: nn.Module) -> int:
    """ReLU/ReLU6 call sites as torch.fx sees them in ``model``'s eval-mode graph: module
    calls, functional calls and tensor methods, counted independently of the quantizer."""
    gm = fx.symbolic_trace(model.eval())
    modules = dict(gm.named_modules())
    functions = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            count += isinstance(modules[node.target], (nn.ReLU, nn.ReLU6))
        elif node.op == "call_function":
            count += node.target in functions
        elif node.op == "call_method":
            count += node.target in ("relu", "relu_")
    return count


def _teacher(source: str, name: str, weights: Path | None = None):
    if weights is not None:
        return load_teacher(source, name=name, weights=str(weights))
    return load_teacher(source, name=name, pretrained=False)


# (source, name, ReLU call sites, input side)
TEACHERS = [
    pytest.param("torchvision", "inception_v3", 94, 299, id="tv-inception_v3"),
    pytest.param("pytorchcv", "inceptionv3", 94, 299, id="cv-inceptionv3"),
    pytest.param("pytorchcv", "sqnxt23_w1", 132, 224, id="cv-sqnxt23_w1"),
    pytest.param("pytorchcv", "sqnxt23_w2", 132, 224, id="cv-sqnxt23_w2"),
    pytest.param("pytorchcv", "shufflenet_g1_w1", 33, 224, id="cv-shufflenet_g1_w1"),
    pytest.param("torchvision", "shufflenet_v2_x1_0", 37, 224, id="tv-shufflenet_v2_x1_0"),
    pytest.param("timm", "resnet18", 17, 224, id="timm-resnet18", marks=needs_timm),
]


@pytest.mark.parametrize(("source", "name", "sites", "side"), TEACHERS)
def test_activation_sites_match_the_teachers_relu_calls(request, source, name, sites, side):
    weights = request.getfixturevalue("timm_resnet18_weights") if source == "timm" else None
    teacher = _teacher(source, name, weights)
    assert teacher.input_size == (3, side, side) and teacher.num_classes == 1000
    assert not teacher.model.training
    assert fx_relu_sites(teacher.model) == sites
    x = torch.randn(2, 3, side, side)
    for bits in (4, 6):
        student = build_student(load_config({"quant": {"w_bits": bits, "a_bits": bits}}), teacher)
        quantizers = list(act_quantizers(student))
        assert len(quantizers) == sites and {q.bits for q in quantizers} == {bits}
        with torch.no_grad():
            y = student(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 1000) and torch.isfinite(y).all()


def test_inception_v3_teacher_is_eval_only_without_its_aux_head():
    """The auxiliary classifier runs only in train mode: the teacher drops it (its
    BatchNorm layers would never get statistics for the BNS loss) and returns logits."""
    teacher = _teacher("torchvision", "inception_v3")
    assert teacher.model.AuxLogits is None and not teacher.model.training
    assert not any(name.startswith("AuxLogits") for name, _ in teacher.model.named_modules())
    with torch.no_grad():
        y = teacher.model(torch.randn(1, 3, 299, 299))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 1000)


def test_inception_v3_rebuilds_from_its_saved_state(tmp_path):
    """What the pipeline does: save the loaded teacher's state, rebuild it from ``arch``
    (which builds the aux head the published weights carry)."""
    teacher = _teacher("torchvision", "inception_v3")
    path = tmp_path / "weights.pt"
    torch.save(teacher.model.state_dict(), path)
    again = load_teacher("checkpoint", arch=teacher.arch, weights=str(path), input_size=[3, 299, 299])
    assert again.model.AuxLogits is None
    torch.testing.assert_close(again.fc_weight, teacher.fc_weight)


def _calibrate_batchnorm(model: nn.Module, side: int) -> None:
    """Give a randomly initialised teacher the BN statistics of its own activations on
    noise, as pretrained weights would have: otherwise activations grow layer by layer
    (running variance 1) and the BNS loss overflows in a deep net like Inception-v3."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets them
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(0)))
    for m in layers:
        m.momentum = 0.1
    model.eval()


def _tiny_run(tmp_path: Path, teacher: dict, bits: int, side: int) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    np.savez(tmp_path / "eval.npz", images=images, labels=np.array([0, 1]))
    cfg = {
        "method": "qimera",
        "teacher": teacher,
        "data": {"name": "npz", "path": str(tmp_path / "eval.npz"), "batch_size": 2},
        "quant": {"w_bits": bits, "a_bits": bits},
        "generator": {"variant": "imagenet", "p": 0.5, "k": 2},
        "train": {"epochs": 1, "iters_per_epoch": 1, "batch_size": 2, "warmup_epochs": 0,
                  "calibration_epochs": 1, "lr_milestones": [], "progress": False, "device": "cpu",
                  "out_dir": str(tmp_path / "run")},
        "naive": {"enabled": False},
    }
    prep = qimera.prepare(cfg)
    assert prep.eval_data.input_size == (3, side, side)
    _calibrate_batchnorm(prep.teacher.model, side)
    result = qimera.run(cfg, prepared=prep)
    assert result.iterations == 1 and len(result.history) == 1
    summary = result.summary()
    assert 0.0 <= summary["student_top1"] <= 100.0
    return summary


RUNS = [
    pytest.param("pytorchcv", "sqnxt23_w1", 224, id="cv-sqnxt23_w1"),
    pytest.param("pytorchcv", "shufflenet_g1_w1", 224, id="cv-shufflenet_g1_w1"),
    pytest.param("torchvision", "shufflenet_v2_x1_0", 224, id="tv-shufflenet_v2_x1_0"),
    pytest.param("torchvision", "inception_v3", 299, id="tv-inception_v3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize(("source", "name", "side"), RUNS)
def test_one_training_iteration(tmp_path, source, name, side, bits):
    _tiny_run(tmp_path, {"source": source, "name": name, "pretrained": False}, bits, side)


@needs_timm
def test_one_training_iteration_with_a_timm_teacher(tmp_path, timm_resnet18_weights):
    _tiny_run(tmp_path, {"source": "timm", "name": "resnet18", "weights": str(timm_resnet18_weights)}, 4, 224)


# ----------------------------------------------------------------- timm as a source


@needs_timm
def test_timm_teacher_from_a_local_weights_file(timm_resnet18_weights):
    import timm

    teacher = load_teacher("timm", name="resnet18.a1_in1k", weights=str(timm_resnet18_weights))
    state = torch.load(timm_resnet18_weights, weights_only=True)
    torch.testing.assert_close(teacher.fc_weight, state["fc.weight"])
    assert teacher.arch == "timm.models.resnet:resnet18" and teacher.name == "resnet18.a1_in1k"
    assert teacher.weights_path == str(timm_resnet18_weights) and len(teacher.sha256) == 64
    # resnet18.a1_in1k's pretrained config: 224 input, crop_pct 0.95, bicubic
    cfg = timm.data.resolve_model_data_config(teacher.model)
    assert teacher.input_size == cfg["input_size"] == (3, 224, 224)
    assert teacher.mean == cfg["mean"] and teacher.std == cfg["std"]
    t = teacher.eval_transform
    assert (t.resize, t.crop, t.interpolation) == (235, (224, 224), "bicubic") and cfg["crop_pct"] == 0.95
    # the arch rebuilds it: the pipeline's checkpoint route
    again = load_teacher("checkpoint", arch=teacher.arch, weights=str(timm_resnet18_weights), input_size=[3, 224, 224])
    torch.testing.assert_close(again.fc_weight, teacher.fc_weight)


@needs_timm
def test_the_pipelines_workspace_teacher_keeps_timms_transform(timm_resnet18_weights):
    """fetch_teacher's teacher.json rebuilds a timm teacher as a checkpoint teacher with
    timm's evaluation transform (235 -> 224, bicubic), not the standard 256 -> 224."""
    import json
    from types import SimpleNamespace

    from stages import fetch_teacher
    from stages.common import workspace_teacher

    teacher = load_teacher("timm", name="resnet18.a1_in1k", weights=str(timm_resnet18_weights))
    res = SimpleNamespace(num_samples=1, top1=0.0, top5=0.0, per_class=[0.0] * 1000)
    record = json.loads(json.dumps(fetch_teacher._record(teacher, SimpleNamespace(name="imagenet"), res, None, "")))
    assert (record["eval_resize"], record["eval_interpolation"]) == (235, "bicubic")
    assert record["class_names"] == list(teacher.class_names)
    rebuilt = load_teacher(workspace_teacher(record, timm_resnet18_weights))
    assert rebuilt.eval_transform == teacher.eval_transform and rebuilt.class_names is None
    fetch_teacher.check_rebuilt(teacher, rebuilt)


@needs_timm
def test_timm_teacher_names_its_imagenet_classes(timm_resnet18_weights):
    """timm's own ImageNet metadata (no download); a model with another class count has none."""
    names = load_teacher("timm", name="resnet18", weights=str(timm_resnet18_weights)).class_names
    assert len(names) == 1000 and names[0].startswith("tench") and names[1].split(",")[0] == "goldfish"
    assert load_teacher("timm", name="resnet18", pretrained=False, num_classes=10).class_names is None


@needs_timm
def test_timm_weights_that_do_not_fit(timm_resnet18_weights):
    with pytest.raises(TeacherError, match=r"does not match timm model 'resnet34'.*missing keys"):
        load_teacher("timm", name="resnet34", weights=str(timm_resnet18_weights))


@needs_timm
def test_timm_download_failure_points_to_checkpoint_and_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as offline
    with pytest.raises(TeacherError) as info:
        load_teacher("timm", name="resnet18", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "teacher.source timm" in message and "download failed" in message
    assert "source: checkpoint with arch: timm.models.resnet:resnet18" in message
    assert "teacher.weights" in message and info.value.__cause__ is not None


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(TeacherError, match=r"timm package is not installed.*pip install 'qimera\[timm\]'"):
        load_teacher("timm", name="resnet18", pretrained=False)


# ----------------------------------------------------------------- bad input, one line


def _prepare(tmp_path, teacher: dict):
    return qimera.prepare({"teacher": teacher, "quant": {"w_bits": 4, "a_bits": 4},
                           "train": {"out_dir": str(tmp_path / "run")}}, with_data=False)


@needs_timm
@pytest.mark.parametrize(("name", "fragment"), [
    ("resnet18_nope", "unknown timm model 'resnet18_nope' (not in timm.list_models(); close matches: "),
    ("resnet18.nope_in1k", "timm model 'resnet18' has no pretrained tag 'nope_in1k'; its tags: resnet18.a1_in1k"),
], ids=["architecture", "tag"])
def test_unknown_timm_name(tmp_path, name, fragment):
    with pytest.raises(TeacherError) as info:
        _prepare(tmp_path, {"source": "timm", "name": name})  # pretrained: no download is tried
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_teacher_without_a_classifier(tmp_path, monkeypatch):
    class Headless(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, num_classes, 3))

        def forward(self, x):
            return self.body(x).mean((2, 3))

    monkeypatch.setattr("qimera.models.cifar_resnet._test_headless", Headless, raising=False)
    path = tmp_path / "w.pt"
    torch.save(Headless().state_dict(), path)
    with pytest.raises(TeacherError, match=r"teacher has no classifier \(nn.Linear, or a final 1x1 nn.Conv2d\)") as info:
        _prepare(tmp_path, {"source": "checkpoint", "arch": "qimera.models.cifar_resnet:_test_headless",
                            "weights": str(path)})
    assert "\n" not in str(info.value)


def test_input_size_the_generator_cannot_make(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher input size \(3, 224, 200\): the generator makes square images"):
        _prepare(tmp_path, {"source": "torchvision", "name": "resnet18", "pretrained": False,
                            "input_size": [3, 224, 200]})
    assert not (tmp_path / "run").exists()


def test_image_folder_data_are_cropped_for_the_299_teacher(tmp_path):
    """``qimera.prepare`` evaluates an Inception-v3 teacher on 342 -> 299 images (not the
    fixed 256 -> 224), so the data fit the teacher."""
    from PIL import Image

    for cls in ("n01", "n02"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        pixels = np.random.default_rng(len(cls)).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "val" / cls / "0.png")
    prep = qimera.prepare({"teacher": {"source": "torchvision", "name": "inception_v3", "pretrained": False},
                           "data": {"name": "imagenet", "path": str(tmp_path / "val")},
                           "quant": {"w_bits": 4, "a_bits": 4}, "train": {"out_dir": str(tmp_path / "run")}})
    t = prep.teacher.eval_transform
    assert (t.resize, t.crop) == (342, (299, 299)) and prep.eval_data.input_size == (3, 299, 299)
    images, _ = next(iter(prep.eval_data.loader))
    assert images.shape == (2, 3, 299, 299)
