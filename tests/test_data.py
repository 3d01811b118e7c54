"""Tests for qimera.data.load_eval_data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qimera.data import (
    DATASETS,
    DEFAULT_NORMALISATION,
    DataError,
    EvalData,
    EvalTransform,
    load_eval_data,
)
from qimera.models.digits_cnn import DIGITS_MEAN, DIGITS_STD

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO_ROOT.parent / "shared" / "data" / "cifar10-test-jpeg-q75.npz"


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _all(data: EvalData) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*data.loader)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- npz


def test_npz_uint8_rgb_normalised_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 3, 1, 2, 3, 0, 1], dtype=np.int64)
    f = _write_npz(tmp_path / "d.npz", images=images, labels=labels)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    data = load_eval_data("npz", path=f, mean=mean, std=std, batch_size=3)
    assert data.name == "npz"
    assert (data.num_samples, data.num_classes, data.input_size) == (7, 4, (3, 5, 6))
    assert data.mean == mean and data.std == std
    x, y = _all(data)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (expected - m) / s
    torch.testing.assert_close(x, expected)
    assert y.tolist() == labels.tolist()
    assert [len(b[1]) for b in data.loader] == [3, 3, 1]


def test_npz_defaults_to_imagenet_stats_and_limit(tmp_path: Path) -> None:
    images = np.full((10, 4, 4, 3), 255, dtype=np.uint8)
    labels = np.arange(10) % 5
    f = _write_npz(tmp_path / "d.npz", images=images, labels=labels)
    data = load_eval_data("npz", path=str(f), limit=4)
    assert data.mean == DEFAULT_NORMALISATION["imagenet"][0]
    assert data.std == DEFAULT_NORMALISATION["imagenet"][1]
    assert data.num_samples == 4 and data.num_classes == 5
    x, y = _all(data)
    assert x.shape == (4, 3, 4, 4) and y.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(x[0, 0], torch.full((4, 4), (1 - 0.485) / 0.229))


@pytest.mark.parametrize("shape", [(6, 4, 4), (6, 4, 4, 1)])
def test_npz_grayscale_and_float(tmp_path: Path, shape: tuple[int, ...]) -> None:
    images = np.linspace(0, 1, num=int(np.prod(shape)), dtype=np.float32).reshape(shape)
    f = _write_npz(tmp_path / "g.npz", images=images, labels=np.zeros(6, dtype=np.int32))
    data = load_eval_data("npz", path=f, mean=[0.5], std=[0.5])
    x, y = _all(data)
    assert data.input_size == (1, 4, 4) and data.num_classes == 1
    torch.testing.assert_close(x.view(-1), torch.from_numpy(images).view(-1) * 2 - 1)
    assert y.dtype == torch.int64


def test_npz_grayscale_needs_mean_std(tmp_path: Path) -> None:
    images, labels = np.zeros((2, 4, 4), np.uint8), np.zeros(2, int)
    f = _write_npz(tmp_path / "g.npz", images=images, labels=labels)
    with pytest.raises(DataError, match=r"data\.mean"):
        load_eval_data("npz", path=f)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"labels": np.zeros(2, int)}, "'images'"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "'labels'"),
        ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.zeros(2, int)}, r"4, 4, 2\)"),
        ({"images": np.zeros((2, 3, 4, 4), np.uint8), "labels": np.zeros(2, int)}, r"3, 4, 4\)"),
        ({"images": np.zeros((2, 48), np.uint8), "labels": np.zeros(2, int)}, r"\(2, 48\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.int32), "labels": np.zeros(2, int)}, "int32"),
        ({"images": np.full((2, 4, 4, 3), 2.0, np.float32), "labels": np.zeros(2, int)}, r"0, 1\]"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, int)}, r"\(3,\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros((2, 1), int)}, r"\(2, 1\)"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2, np.float32)}, "float32"),
        ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, -1])}, "-1"),
    ],
)
def test_npz_invalid_raises_data_error(tmp_path: Path, arrays: dict, needle: str) -> None:
    f = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"data\.path") as info:
        load_eval_data("npz", path=f)
    assert re.search(needle, str(info.value)), str(info.value)


def test_npz_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path"):
        load_eval_data("npz", path=tmp_path / "nope.npz")
    with pytest.raises(DataError, match=r"data\.path is required"):
        load_eval_data("npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"data\.path"):
        load_eval_data("npz", path=junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match=r"not a \.npz"):
        load_eval_data("npz", path=single)


def test_mean_std_length_must_match_channels(tmp_path: Path) -> None:
    images, labels = np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, int)
    f = _write_npz(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.raises(DataError, match=r"data\.mean=\[0\.5\] has 1 value.*3 channel"):
        load_eval_data("npz", path=f, mean=[0.5])
    with pytest.raises(DataError, match=r"data\.std"):
        load_eval_data("npz", path=f, std=[0.1, 0.2])
    with pytest.raises(DataError, match=r"data\.std.*positive"):
        load_eval_data("npz", path=f, std=[0.1, 0.0, 0.2])


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.name='mnist'.*cifar10"):
        load_eval_data("mnist")
    with pytest.raises(DataError, match=r"data\.limit"):
        load_eval_data("digits", limit=0)
    with pytest.raises(DataError, match=r"data\.batch_size"):
        load_eval_data("digits", batch_size=0)
    assert set(DATASETS) == {"cifar10", "cifar100", "imagenet", "npz", "digits"}


@pytest.mark.skipif(not SHARED_NPZ.is_file(), reason=f"shared test data absent: {SHARED_NPZ}")
def test_shared_cifar10_jpeg_npz() -> None:
    mean, std = DEFAULT_NORMALISATION["cifar10"]
    data = load_eval_data("npz", path=SHARED_NPZ, mean=mean, std=std, batch_size=2500)
    assert data.num_samples == 10_000 and data.num_classes == 10
    assert data.input_size == (3, 32, 32)
    counts = torch.zeros(10, dtype=torch.int64)
    n = 0
    for x, y in data.loader:
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        counts += torch.bincount(y, minlength=10)
        n += len(y)
    assert n == 10_000 and counts.tolist() == [1000] * 10


# --------------------------------------------------------------------------- torchvision sets


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_root_gives_data_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=r"data\.root") as info:
        load_eval_data(name, root=tmp_path, download=False)
    assert "data.download: true" in str(info.value)
    with pytest.raises(DataError, match=r"data\.root is required"):
        load_eval_data(name)


def test_imagenet_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(300, 260), (256, 256), (320, 400)]
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    data = load_eval_data("imagenet", path=tmp_path, batch_size=4)
    assert (data.num_classes, data.num_samples, data.input_size) == (2, 6, (3, 224, 224))
    assert data.mean == DEFAULT_NORMALISATION["imagenet"][0]
    x, y = _all(data)
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.min() < -1.5 and x.max() > 1.5  # normalised, not [0, 1]

    limited = load_eval_data("imagenet", path=tmp_path, limit=2)
    assert limited.num_samples == 2 and len(limited.loader.dataset) == 2


def test_imagenet_bad_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path"):
        load_eval_data("imagenet", path=tmp_path / "missing")
    with pytest.raises(DataError, match=r"data\.path"):
        load_eval_data("imagenet", path=tmp_path)  # exists but has no class folders
    with pytest.raises(DataError, match=r"data\.mean"):
        (tmp_path / "a").mkdir()
        load_eval_data("imagenet", path=tmp_path, mean=[0.5])


# --------------------------------------------------------------------------- the teacher's transform


def _random_image(width: int = 500, height: int = 375, seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("name", "resize", "crop"), [("resnet18", 256, 224), ("inception_v3", 342, 299)])
def test_torchvision_teacher_transform_is_torchvisions(name: str, resize: int, crop: int) -> None:
    """The transform a torchvision teacher brings equals its weights' ``transforms()``."""
    from qimera.teachers import TORCHVISION_TEACHERS
    from qimera.teachers.torchvision import weights_spec

    reference = TORCHVISION_TEACHERS[name].transforms()
    ours = weights_spec(TORCHVISION_TEACHERS[name]).eval_transform
    assert (ours.resize, ours.crop) == (reference.resize_size[0], (reference.crop_size[0],) * 2) == (resize, (crop, crop))
    assert ours.interpolation == reference.interpolation.value == "bilinear"
    assert ours.mean == tuple(reference.mean) and ours.std == tuple(reference.std)
    for image in (_random_image(), _random_image(333, 480, seed=1)):
        torch.testing.assert_close(ours.compose()(image), reference(image), rtol=0, atol=1e-6)


def test_imagenet_folder_preprocessed_as_the_teacher_says(tmp_path: Path) -> None:
    """An Inception-v3 teacher's 342 -> 299 reaches the ImageFolder data; ``data.mean`` /
    ``data.std`` still override its normalisation."""
    from qimera.teachers import TORCHVISION_TEACHERS
    from qimera.teachers.torchvision import weights_spec

    weights = TORCHVISION_TEACHERS["inception_v3"]
    transform = weights_spec(weights).eval_transform
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        _random_image(seed=len(cls) + ord(cls[-1])).save(tmp_path / cls / "0.png")
    data = load_eval_data("imagenet", path=tmp_path, transform=transform)
    assert data.input_size == (3, 299, 299) and data.mean == transform.mean
    x, _ = _all(data)
    from PIL import Image

    with Image.open(tmp_path / "n01" / "0.png") as image:
        expected = weights.transforms()(image.convert("RGB"))
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)

    overridden = load_eval_data("imagenet", path=tmp_path, transform=transform, mean=[0.5] * 3, std=[0.25] * 3)
    assert overridden.mean == (0.5,) * 3 and overridden.std == (0.25,) * 3
    x2, _ = _all(overridden)
    torch.testing.assert_close(x2[0], ((expected * torch.tensor(transform.std)[:, None, None]
                                        + torch.tensor(transform.mean)[:, None, None]) - 0.5) / 0.25,
                               rtol=0, atol=1e-5)


def test_eval_transform_from_ratio_and_with_crop() -> None:
    mean, std = DEFAULT_NORMALISATION["imagenet"]
    assert EvalTransform.from_ratio(224, mean, std).resize == 256
    assert EvalTransform.from_ratio(299, mean, std).resize == 342  # ceil(341.7), as torchvision's weights
    assert EvalTransform.from_ratio((224, 224), mean, std, ratio=0.95).resize == 236
    t = EvalTransform.from_ratio(224, mean, std)
    assert t.with_crop((224, 224)) is t
    assert (t.with_crop((160, 160)).resize, t.with_crop((160, 160)).crop) == (183, (160, 160))  # ratio kept
    with pytest.raises(ValueError, match="interpolation='lanczos'"):
        EvalTransform(256, (224, 224), "lanczos", mean, std)  # type: ignore[arg-type]


def test_without_a_teacher_imagenet_is_256_to_224(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _random_image().save(tmp_path / "a" / "0.png")
    data = load_eval_data("imagenet", path=tmp_path)
    x, _ = _all(data)
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(*DEFAULT_NORMALISATION["imagenet"])])
    torch.testing.assert_close(x[0], reference(_random_image()), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- digits


def test_digits_held_out_split() -> None:
    data = load_eval_data("digits", batch_size=256)
    assert data.name == "digits"
    assert (data.num_samples, data.num_classes, data.input_size) == (540, 10, (1, 8, 8))
    assert data.mean == DIGITS_MEAN and data.std == DIGITS_STD
    x, y = _all(data)
    assert x.shape == (540, 1, 8, 8)
    assert torch.bincount(y, minlength=10).min() >= 50  # stratified
    lo, hi = (0 - DIGITS_MEAN[0]) / DIGITS_STD[0], (1 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5
    assert load_eval_data("digits", limit=10).num_samples == 10
