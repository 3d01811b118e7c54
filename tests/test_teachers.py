"""Tests for qimera.teachers (sources, checkpoint loading and the errors they raise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from qimera.models.cifar_resnet import resnet20, resnet32
from qimera.teachers import (
    PYTORCHCV_TEACHERS,
    SOURCES,
    TORCHVISION_TEACHERS,
    LoadedTeacher,
    TeacherError,
    check_batchnorm,
    find_classifier,
    load_state_dict_file,
    load_teacher,
)

SHARED_CKPT = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "teachers" / "resnet20-cifar10-optionA.th"
)
SHARED_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"
ARCH20 = "qimera.models.cifar_resnet:resnet20"
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

needs_shared = pytest.mark.skipif(
    not SHARED_CKPT.is_file(), reason=f"shared checkpoint absent: {SHARED_CKPT}"
)


#: any (failing) download attempt gives up quickly (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("short_socket_timeout")


@pytest.fixture(scope="module")
def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return resnet20().state_dict()


def _save(obj, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


# ----------------------------------------------------------------- the shared checkpoint


@needs_shared
def test_shared_checkpoint_loads_by_spec() -> None:
    teacher = load_teacher(
        "checkpoint", arch=ARCH20, weights=str(SHARED_CKPT), num_classes=10, **IMAGENET
    )
    assert isinstance(teacher, LoadedTeacher)
    assert teacher.num_classes == 10
    assert teacher.feature_dim == 64
    assert teacher.fc_weight.shape == (10, 64)
    assert teacher.input_size == (3, 32, 32)
    assert teacher.mean == IMAGENET["mean"] and teacher.std == IMAGENET["std"]
    assert teacher.source == "checkpoint" and teacher.name == ARCH20
    assert Path(teacher.weights_path).resolve() == SHARED_CKPT.resolve()
    assert teacher.sha256 == SHARED_SHA256
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    state = torch.load(SHARED_CKPT, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(teacher.fc_weight, state["module.linear.weight"])
    torch.testing.assert_close(teacher.model.layer3[2].bn2.running_var, state["module.layer3.2.bn2.running_var"])
    assert not teacher.fc_weight.requires_grad
    assert teacher.fc_weight.data_ptr() != teacher.model.linear.weight.data_ptr()


@needs_shared
def test_load_state_dict_file_unwraps_shared_checkpoint() -> None:
    state = load_state_dict_file(SHARED_CKPT)
    assert "linear.weight" in state and not any(k.startswith("module.") for k in state)


# ----------------------------------------------------------------- state dict formats


@pytest.mark.parametrize("layout", ["plain", "module_prefix", "state_dict", "model", "nested"])
def test_state_dict_layouts_load(tmp_path: Path, resnet20_state, layout: str) -> None:
    prefixed = {f"module.{k}": v for k, v in resnet20_state.items()}
    obj = {
        "plain": resnet20_state,
        "module_prefix": prefixed,
        "state_dict": {"state_dict": prefixed, "best_prec1": 90.0},
        "model": {"model": resnet20_state, "epoch": 3},
        "nested": {"model": {"state_dict": prefixed}},
    }[layout]
    path = _save(obj, tmp_path / "w.pt")
    teacher = load_teacher("checkpoint", arch=ARCH20, weights=path, num_classes=10)
    torch.testing.assert_close(teacher.fc_weight, resnet20_state["linear.weight"])
    assert teacher.mean == (0.485, 0.456, 0.406) and teacher.input_size == (3, 32, 32)
    assert len(teacher.sha256) == 64


def test_missing_num_batches_tracked_is_tolerated(tmp_path: Path, resnet20_state) -> None:
    state = {k: v for k, v in resnet20_state.items() if not k.endswith("num_batches_tracked")}
    teacher = load_teacher("checkpoint", arch=ARCH20, weights=_save(state, tmp_path / "w.pt"))
    assert teacher.num_classes == 10  # inferred from the last nn.Linear


def test_torchvision_arch_checkpoint(tmp_path: Path) -> None:
    import torchvision

    state = torchvision.models.resnet18(num_classes=7).state_dict()
    teacher = load_teacher(
        "checkpoint",
        arch="torchvision.models:resnet18",
        weights=_save(state, tmp_path / "r18.pth"),
        num_classes=7,
        input_size=(3, 64, 64),
    )
    assert teacher.fc_weight.shape == (7, 512) and teacher.input_size == (3, 64, 64)


def test_wrong_weights_list_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = _save(resnet32().state_dict(), tmp_path / "r32.pt")
    with pytest.raises(TeacherError) as info:
        load_teacher("checkpoint", arch=ARCH20, weights=path, num_classes=10)
    message = str(info.value)
    assert "teacher.weights" in message and "unexpected keys" in message
    assert "layer1.3.conv1.weight" in message


def test_missing_keys_and_shape_mismatch_reported(tmp_path: Path, resnet20_state) -> None:
    state = dict(resnet20_state)
    del state["conv1.weight"]
    state["linear.weight"] = torch.zeros(5, 64)
    with pytest.raises(TeacherError, match=r"1 missing keys: conv1\.weight.*shape mismatches: linear\.weight"):
        load_teacher("checkpoint", arch=ARCH20, weights=_save(state, tmp_path / "w.pt"))


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.th"
    with pytest.raises(TeacherError, match="teacher.weights") as info:
        load_teacher("checkpoint", arch=ARCH20, weights=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(TeacherError, match="teacher.weights"):
        load_state_dict_file(missing)


def test_remote_weights_rejected_with_a_way_forward() -> None:
    with pytest.raises(TeacherError, match="local files only") as info:
        load_teacher("checkpoint", arch=ARCH20, weights="s3://bucket/resnet20.th")
    assert "python -m stages.s3 get s3://bucket/resnet20.th" in str(info.value)
    with pytest.raises(TeacherError, match="https:// URL"):
        load_teacher("checkpoint", arch=ARCH20, weights="https://example.com/resnet20.th")


def test_pickled_module_rejected(tmp_path: Path) -> None:
    path = _save(resnet20(), tmp_path / "full.pt")
    with pytest.raises(TeacherError, match="weights_only"):
        load_state_dict_file(path)


def test_non_state_dict_rejected(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="not a state dict"):
        load_state_dict_file(_save({"epoch": 3}, tmp_path / "x.pt"))


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [
        ("qimera.models.cifar_resnet.resnet20", "package.module:callable"),
        ("no_such_module_xyz:resnet20", "cannot import"),
        ("qimera.models.cifar_resnet:resnet999", "no attribute"),
        (None, "teacher.arch is required"),
    ],
)
def test_bad_arch(tmp_path: Path, resnet20_state, arch, fragment: str) -> None:
    path = _save(resnet20_state, tmp_path / "w.pt")
    with pytest.raises(TeacherError, match="teacher.arch") as info:
        load_teacher("checkpoint", arch=arch, weights=path)
    assert fragment in str(info.value)


class _NoBN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _no_bn(num_classes: int = 10) -> nn.Module:
    return _NoBN(num_classes)


def test_model_without_batchnorm_rejected(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(TeacherError, match="no BatchNorm2d"):
        check_batchnorm(_NoBN())
    monkeypatch.setattr("qimera.models.cifar_resnet._test_no_bn", _no_bn, raising=False)
    path = _save(_NoBN().state_dict(), tmp_path / "w.pt")
    with pytest.raises(TeacherError, match="BatchNorm2d"):
        load_teacher("checkpoint", arch="qimera.models.cifar_resnet:_test_no_bn", weights=path)


def test_find_classifier_picks_last_matching_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 10), nn.BatchNorm1d(10), nn.Linear(10, 10), nn.Linear(10, 3))
    assert find_classifier(model, 10) is model[2]
    assert find_classifier(model) is model[3]
    with pytest.raises(TeacherError, match="classifier"):
        find_classifier(model, 1000)


# ----------------------------------------------------------------- sources and zoo names


def test_unknown_source_lists_sources() -> None:
    with pytest.raises(TeacherError, match="teacher.source") as info:
        load_teacher("hub", name="resnet18")
    assert all(s in str(info.value) for s in SOURCES)


@pytest.mark.parametrize("source", ["pytorchcv", "torchvision"])
def test_unknown_zoo_name_lists_allowed(source: str) -> None:
    with pytest.raises(TeacherError, match="teacher.name") as info:
        load_teacher(source, name="vgg_nonexistent")
    allowed = PYTORCHCV_TEACHERS if source == "pytorchcv" else TORCHVISION_TEACHERS
    assert all(name in str(info.value) for name in allowed)


def test_zoo_tables() -> None:
    assert PYTORCHCV_TEACHERS["resnet20_cifar10"].mean == (0.4914, 0.4822, 0.4465)
    assert PYTORCHCV_TEACHERS["resnet20_cifar100"].num_classes == 100
    assert PYTORCHCV_TEACHERS["resnet50"].input_size == (3, 224, 224)
    # the supplement's Table 10 teachers, as ZeroQ/DSG used them
    assert PYTORCHCV_TEACHERS["inceptionv3"].input_size == (3, 299, 299)
    assert {"sqnxt23_w1", "sqnxt23_w3d2", "sqnxt23_w2", "sqnxt23v5_w1", "shufflenet_g1_w1",
            "shufflenet_g8_w1"} <= set(PYTORCHCV_TEACHERS)
    assert {"pytorchcv", "torchvision", "timm", "checkpoint", "demo"} <= set(SOURCES)
    assert set(TORCHVISION_TEACHERS) == {
        "resnet18", "resnet50", "mobilenet_v2", "inception_v3", "shufflenet_v2_x1_0", "squeezenet1_1"
    }


def test_pytorchcv_download_failure_points_to_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TeacherError) as info:
        load_teacher("pytorchcv", name="resnet20_cifar10", cache_dir=tmp_path)
    message = str(info.value)
    assert "pytorchcv" in message and "resnet20_cifar10" in message
    assert "download failed" in message and "checkpoint" in message
    assert "pytorchcv.models.resnet_cifar:resnet20_cifar10" in message
    assert info.value.__cause__ is not None


def test_torchvision_download_failure_points_to_checkpoint(tmp_path: Path) -> None:
    before = torch.hub.get_dir()
    with pytest.raises(TeacherError) as info:
        load_teacher("torchvision", name="resnet18", cache_dir=tmp_path)
    message = str(info.value)
    assert "torchvision" in message and "resnet18" in message
    assert "download failed" in message and "checkpoint" in message
    assert info.value.__cause__ is not None
    assert torch.hub.get_dir() == before  # cache_dir override is restored


def test_torchvision_resnet18_without_pretrained_builds() -> None:
    teacher = load_teacher("torchvision", name="resnet18", pretrained=False)
    assert teacher.num_classes == 1000 and teacher.fc_weight.shape == (1000, 512)
    assert teacher.input_size == (3, 224, 224)
    assert teacher.mean == pytest.approx((0.485, 0.456, 0.406))
    assert teacher.weights_path is None and teacher.sha256 is None


def test_torchvision_inception_input_size_from_enum() -> None:
    weights = TORCHVISION_TEACHERS["inception_v3"]
    assert weights.transforms().crop_size == [299]


def test_torchvision_squeezenet_rejected_for_missing_batchnorm() -> None:
    with pytest.raises(TeacherError, match="BatchNorm2d"):
        load_teacher("torchvision", name="squeezenet1_1", pretrained=False)


def test_pytorchcv_without_pretrained_builds() -> None:
    teacher = load_teacher("pytorchcv", name="resnet20_cifar100", pretrained=False)
    assert teacher.num_classes == 100 and teacher.feature_dim == 64
    assert teacher.mean == (0.5071, 0.4867, 0.4408) and teacher.input_size == (3, 32, 32)


def test_pretrained_num_classes_mismatch() -> None:
    with pytest.raises(TeacherError, match="teacher.num_classes"):
        load_teacher("pytorchcv", name="resnet20_cifar10", num_classes=100)


def test_mean_std_channel_validation(tmp_path: Path, resnet20_state) -> None:
    path = _save(resnet20_state, tmp_path / "w.pt")
    with pytest.raises(TeacherError, match="teacher.mean"):
        load_teacher("checkpoint", arch=ARCH20, weights=path, mean=(0.5,), std=(0.2, 0.2, 0.2))
    with pytest.raises(TeacherError, match="teacher.std"):
        load_teacher("checkpoint", arch=ARCH20, weights=path, std=(0.2, 0.0, 0.2))


def test_find_classifier_falls_back_to_final_1x1_conv() -> None:
    head = nn.Conv2d(16, 10, 1, bias=False)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), head)
    assert find_classifier(model, 10) is head
    with pytest.raises(TeacherError, match="classifier"):
        find_classifier(model, 5)
    with pytest.raises(TeacherError, match="classifier"):
        find_classifier(nn.Sequential(nn.Conv2d(3, 10, 3)), 10)


def test_pytorchcv_mobilenetv2_conv_head_builds() -> None:
    teacher = load_teacher("pytorchcv", name="mobilenetv2_w1", pretrained=False)
    assert teacher.num_classes == 1000 and teacher.fc_weight.shape == (1000, 1280)
    assert teacher.input_size == (3, 224, 224)


# ----------------------------------------------------------------- evaluation transforms


def test_torchvision_teacher_brings_its_weights_transform() -> None:
    teacher = load_teacher("torchvision", name="resnet18", pretrained=False)
    reference = TORCHVISION_TEACHERS["resnet18"].transforms()
    t = teacher.eval_transform
    assert (t.resize, t.crop, t.interpolation) == (reference.resize_size[0], (224, 224), "bilinear")
    assert t.mean == teacher.mean and t.std == teacher.std


def test_pytorchcv_transform_from_its_published_crop_ratio() -> None:
    from qimera.teachers.pytorchcv import _crop_ratio

    assert _crop_ratio("sqnxt23_w1") == 0.875 and _crop_ratio("inceptionv3") == 0.875
    assert _crop_ratio("resnet20_cifar10") is None  # pytorchcv gives none: the standard ratio
    t = load_teacher("pytorchcv", name="shufflenet_g1_w1", pretrained=False).eval_transform
    assert (t.resize, t.crop, t.interpolation) == (256, (224, 224), "bilinear")
    t = load_teacher("pytorchcv", name="inceptionv3", pretrained=False).eval_transform
    assert (t.resize, t.crop) == (342, (299, 299))


def test_transform_follows_teacher_settings() -> None:
    """``teacher.input_size`` / ``mean`` / ``std`` set by hand reach the transform too."""
    teacher = load_teacher("torchvision", name="resnet18", pretrained=False, input_size=[3, 160, 160],
                           mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    t = teacher.eval_transform
    assert (t.resize, t.crop, t.mean, t.std) == (183, (160, 160), (0.5,) * 3, (0.25,) * 3)


def test_checkpoint_teacher_gets_the_standard_transform(tmp_path: Path, resnet20_state) -> None:
    path = _save(resnet20_state, tmp_path / "w.pt")
    t = load_teacher("checkpoint", arch=ARCH20, weights=path).eval_transform
    assert (t.resize, t.crop, t.interpolation, t.mean) == (37, (32, 32), "bilinear", IMAGENET["mean"])


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the timm extra is not installed")
@pytest.mark.parametrize("name", ["resnet50.a1_in1k", "inception_v3.tv_in1k"])
def test_timm_teacher_transform_is_timms(name: str) -> None:
    """timm's data config (input size, crop_pct, interpolation, mean, std) and its eval
    transform give the same tensor as the teacher's transform."""
    import numpy as np
    import timm
    from PIL import Image

    teacher = load_teacher("timm", name=name, pretrained=False)
    config = timm.data.resolve_model_data_config(teacher.model)
    assert teacher.input_size == config["input_size"]
    assert (teacher.mean, teacher.std) == (config["mean"], config["std"])
    assert teacher.eval_transform.interpolation == config["interpolation"] == "bicubic"
    reference = timm.data.create_transform(**config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    torch.testing.assert_close(teacher.eval_transform.compose()(image), reference(image), rtol=0, atol=1e-6)


def test_eval_resize_and_interpolation_replace_the_sources(tmp_path: Path, resnet20_state) -> None:
    """A checkpoint teacher trained with timm's preprocessing says so: 235 -> 224, bicubic."""
    from qimera.teachers import EvalTransform

    path = _save(resnet20_state, tmp_path / "w.pt")
    teacher = load_teacher("checkpoint", arch=ARCH20, weights=path, input_size=[3, 224, 224],
                           eval_resize=235, eval_interpolation="bicubic")
    assert teacher.eval_transform == EvalTransform(235, (224, 224), "bicubic", teacher.mean, teacher.std)
    # one of the two: the other stays the source's (the standard 256 -> 224, bilinear)
    t = load_teacher("checkpoint", arch=ARCH20, weights=path, input_size=[3, 224, 224],
                     eval_interpolation="nearest").eval_transform
    assert (t.resize, t.crop, t.interpolation) == (256, (224, 224), "nearest")
    t = load_teacher("torchvision", name="resnet18", pretrained=False, eval_resize=224).eval_transform
    assert (t.resize, t.crop, t.interpolation) == (224, (224, 224), "bilinear")  # resize = crop is allowed


def test_eval_resize_smaller_than_the_crop_is_refused(tmp_path: Path, resnet20_state) -> None:
    path = _save(resnet20_state, tmp_path / "w.pt")
    with pytest.raises(TeacherError) as info:
        load_teacher("checkpoint", arch=ARCH20, weights=path, input_size=[3, 224, 224], eval_resize=200)
    message = str(info.value)
    assert "teacher.eval_resize=200" in message and "224x224" in message and "\n" not in message
    with pytest.raises(TeacherError, match=r"teacher.eval_resize=31: smaller than the crop 32x32"):
        load_teacher("checkpoint", arch=ARCH20, weights=path, eval_resize=31)  # the default 32x32 input


# ----------------------------------------------------------------- class names


def test_torchvision_teacher_names_its_classes() -> None:
    teacher = load_teacher("torchvision", name="shufflenet_v2_x1_0", pretrained=False)
    names = teacher.class_names
    assert len(names) == 1000 and names[0].startswith("tench") and names == tuple(
        TORCHVISION_TEACHERS["shufflenet_v2_x1_0"].meta["categories"])
    # another class count than the weights': the names do not apply
    assert load_teacher("torchvision", name="resnet18", pretrained=False, num_classes=10).class_names is None


def test_pytorchcv_and_checkpoint_teachers_have_no_class_names(tmp_path: Path, resnet20_state) -> None:
    assert load_teacher("pytorchcv", name="resnet20_cifar10", pretrained=False).class_names is None
    path = _save(resnet20_state, tmp_path / "w.pt")
    assert load_teacher("checkpoint", arch=ARCH20, weights=path).class_names is None


def test_finish_teacher_takes_the_specs_class_names_only_when_they_fit(resnet20_state) -> None:
    from qimera.config import TeacherConfig
    from qimera.teachers import TeacherSpec, finish_teacher

    model = resnet20()
    model.load_state_dict(resnet20_state)
    config = TeacherConfig(source="checkpoint", arch=ARCH20, weights="unused.pt")
    names = tuple(f"class {i}" for i in range(10))
    spec = TeacherSpec(10, (3, 32, 32), IMAGENET["mean"], IMAGENET["std"], class_names=names)
    assert finish_teacher(config, model, name="r20", arch=ARCH20, spec=spec).class_names == names
    spec = TeacherSpec(10, (3, 32, 32), IMAGENET["mean"], IMAGENET["std"], class_names=names[:9])
    assert finish_teacher(config, model, name="r20", arch=ARCH20, spec=spec).class_names is None
