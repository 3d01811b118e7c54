"""Evaluation data: the labelled test sets a teacher and its quantized students are scored on.

Data-free quantization never trains on real data; real images are only used to *measure*
accuracy. :func:`load_eval_data` turns a ``data`` config section into an :class:`EvalData`
whose ``loader`` yields ``(images, labels)`` batches in a fixed order: normalised float32
images in NCHW layout and int64 labels.

Supported datasets (``data.name``):

``cifar10`` / ``cifar100``
    The torchvision test split under ``data.root`` (downloaded there when
    ``data.download`` is true). Held in memory as one normalised tensor.
``imagenet``
    An ImageNet-style validation split at ``data.path`` laid out as one folder per class,
    read with :class:`torchvision.datasets.ImageFolder` and preprocessed as the teacher
    expects (:class:`EvalTransform`: resize the shorter side, centre-crop to the teacher's
    input size, normalise); without a teacher, Resize(256) -> CenterCrop(224), bilinear.
``npz``
    A ``.npz`` archive at ``data.path`` with ``images`` (uint8 ``(N, H, W, 3)`` RGB,
    ``(N, H, W, 1)`` or ``(N, H, W)`` grayscale, or float in ``[0, 1]``) and ``labels``
    (non-negative integers, shape ``(N,)``). Held in memory.
``digits``
    The offline demo data: the held-out split of scikit-learn's ``load_digits`` used by
    :mod:`qimera.models.digits_cnn`.

Every problem with the inputs raises :class:`DataError`, whose message names the config key
(``data.path``, ``data.root``, ``data.mean``, ...), the offending value and what is allowed.

Each dataset is a loader ``loader(config: DataConfig) -> EvalData`` in :data:`DATA_LOADERS`
(``{data.name: loader}``); :func:`register_dataset` adds one, and ``data.name`` then
validates and loads. A loader that also takes a keyword ``transform`` receives the
teacher's :class:`EvalTransform` (the built-in ``imagenet`` loader does; the in-memory
datasets are stored at their final size and only take the normalisation).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from qimera._registry import DATA_LOADERS, section_config
from qimera.config import ConfigError, DataConfig
from qimera.normalisation import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Stats,
)

__all__ = [
    "DataError",
    "EvalData",
    "EvalTransform",
    "STANDARD_CROP_RATIO",
    "DATASETS",
    "DATA_LOADERS",
    "DEFAULT_NORMALISATION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_eval_data",
    "register_dataset",
    "check_fits_teacher",
]


class DataError(ValueError):
    """Evaluation data is missing, malformed, or inconsistent with the configuration."""


#: crop side / resize side of the usual ImageNet evaluation (224 of 256). Used where a
#: model zoo states no ratio of its own.
STANDARD_CROP_RATIO = 0.875

Interpolation = Literal["nearest", "bilinear", "bicubic"]


@dataclass(frozen=True)
class EvalTransform:
    """How an image file becomes a teacher's input: resize the shorter side to ``resize``
    (``interpolation``, antialiased), centre-crop to ``crop`` = ``(height, width)``,
    scale to ``[0, 1]``, normalise with ``mean``/``std``.

    The one description of evaluation preprocessing: every teacher source fills it in
    (:attr:`qimera.teachers.LoadedTeacher.eval_transform`) from what its zoo publishes,
    because accuracy depends on it (Inception-v3 wants 342 -> 299, timm's ResNets 235 ->
    224 bicubic), and :meth:`compose` turns it into the torchvision pipeline.
    """

    resize: int
    crop: tuple[int, int]
    interpolation: Interpolation
    mean: Stats
    std: Stats

    def __post_init__(self) -> None:
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"interpolation={self.interpolation!r}: allowed nearest, bilinear, bicubic")
        if len(self.crop) != 2 or min(self.crop) < 1 or self.resize < 1:
            raise ValueError(f"resize={self.resize}, crop={self.crop}: expected positive sizes, crop (height, width)")

    @classmethod
    def from_ratio(cls, crop: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], *,
                   ratio: float = STANDARD_CROP_RATIO, interpolation: Interpolation = "bilinear") -> "EvalTransform":
        """The transform that crops ``crop`` out of an image resized to
        ``ceil(max(crop) / ratio)`` (256 for 224 and 342 for 299 at the standard ratio,
        as torchvision's weights use)."""
        hw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        # rounded first, so that float error in a quotient that is a whole number does not
        # push the ceiling one pixel up
        resize = math.ceil(round(max(hw) / ratio, 6))
        return cls(resize, hw, interpolation, tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def with_crop(self, crop: tuple[int, int]) -> "EvalTransform":
        """The same preprocessing for another input size (``teacher.input_size`` set by
        hand): the resize keeps its ratio to the crop."""
        crop = (int(crop[0]), int(crop[1]))
        if crop == tuple(self.crop):
            return self
        return dataclasses.replace(self, crop=crop, resize=max(1, round(max(crop) * self.resize / max(self.crop))))

    def compose(self) -> Callable[[Any], torch.Tensor]:
        """The torchvision pipeline: a PIL image in, a normalised float ``(C, H, W)`` tensor out."""
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.resize, interpolation=transforms.InterpolationMode(self.interpolation),
                              antialias=True),
            transforms.CenterCrop(list(self.crop)),
            transforms.ToTensor(),
            transforms.Normalize(list(self.mean), list(self.std)),
        ])


#: what ``imagenet`` data get without a teacher's transform (SPEC §3: 256 -> 224)
_DEFAULT_IMAGE_TRANSFORM = EvalTransform.from_ratio(224, IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class EvalData:
    """A ready-to-iterate evaluation set.

    Attributes:
        loader: yields ``(images, labels)``: normalised float32 NCHW images and int64
            labels, in a fixed order (no shuffling).
        num_classes: number of classes the labels index into.
        num_samples: number of samples the loader yields (after ``limit``).
        input_size: ``(C, H, W)`` of one image.
        mean: per-channel mean used for normalisation (of pixels scaled to ``[0, 1]``).
        std: per-channel standard deviation used for normalisation.
        name: the dataset name (one of :data:`DATASETS`).
    """

    loader: DataLoader
    num_classes: int
    num_samples: int
    input_size: tuple[int, int, int]
    mean: Stats
    std: Stats
    name: str


#: The registered dataset names (a live tuple-like view of :data:`DATA_LOADERS`).
DATASETS = DATA_LOADERS.names

#: ``register_dataset(name, loader, *, replace=False)``: make ``data.name: name`` load with
#: ``loader(config: DataConfig) -> EvalData`` (a callable or a ``"module:callable"`` string).
register_dataset = DATA_LOADERS.register

#: Default ``(mean, std)`` per dataset, for pixels scaled to ``[0, 1]``. ``npz`` has no
#: entry: it defaults to ImageNet's statistics for 3-channel images and otherwise needs
#: ``data.mean`` / ``data.std``.
DEFAULT_NORMALISATION: dict[str, tuple[Stats, Stats]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "digits": (DIGITS_MEAN, DIGITS_STD),
}

_NPZ_ALLOWED_IMAGES = (
    "uint8 (or float in [0, 1]) of shape (N, H, W, 3) RGB, (N, H, W, 1) or (N, H, W) grayscale"
)


# --------------------------------------------------------------------------- helpers


def _resolve_stats(
    name: str, channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Stats, Stats]:
    """Pick the normalisation statistics and check them against the channel count."""
    default = DEFAULT_NORMALISATION.get(name)
    if default is None and channels == 3:
        default = (IMAGENET_MEAN, IMAGENET_STD)
    resolved: list[Stats] = []
    for key, given, fallback in (
        ("data.mean", mean, None if default is None else default[0]),
        ("data.std", std, None if default is None else default[1]),
    ):
        if given is None:
            if fallback is None:
                raise DataError(
                    f"{key} is required for {channels}-channel {name!r} data: give "
                    f"{channels} value(s), one per channel, for pixels scaled to [0, 1]"
                )
            values: Stats = tuple(float(v) for v in fallback)
        else:
            try:
                values = tuple(float(v) for v in given)
            except (TypeError, ValueError):
                raise DataError(
                    f"{key}={given!r} is not a list of numbers; give {channels} value(s), "
                    "one per channel"
                ) from None
        if len(values) != channels:
            raise DataError(
                f"{key}={list(values)} has {len(values)} value(s) but the {name!r} images have "
                f"{channels} channel(s); give exactly {channels}"
            )
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{key}={list(values)} must contain finite numbers only")
        if key == "data.std" and any(v <= 0 for v in values):
            raise DataError(f"data.std={list(values)} must be strictly positive")
        resolved.append(values)
    return resolved[0], resolved[1]


def _normalise_(images: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Normalise float NCHW ``images`` in place, per channel."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(m).div_(s)


def _uint8_nhwc_to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 -> contiguous ``(N, C, H, W)`` float32 in ``[0, 1]``."""
    nchw = images.permute(0, 3, 1, 2)
    return nchw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _make_loader(dataset: Dataset, config: DataConfig) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        drop_last=False,
    )


def _in_memory(config: DataConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> EvalData:
    """Normalise float NCHW ``images`` in ``[0, 1]`` (in place) and wrap them with ``labels``."""
    channels = int(images.shape[1])
    m, s = _resolve_stats(config.name, channels, config.mean, config.std)
    _normalise_(images, m, s)
    return EvalData(
        loader=_make_loader(TensorDataset(images, labels), config),
        num_classes=num_classes,
        num_samples=int(labels.shape[0]),
        input_size=(channels, int(images.shape[2]), int(images.shape[3])),
        mean=m,
        std=s,
        name=config.name,
    )


# --------------------------------------------------------------------------- datasets


def _read_cifar(
    name: str, root: str | os.PathLike[str] | None, download: bool, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(images uint8 NHWC, labels int64, num_classes)`` of a CIFAR test split."""
    from torchvision import datasets

    if root is None or str(root).strip() == "":
        raise DataError(
            f"data.root is required for data.name={name!r}: the directory that holds (or "
            f"will receive) the extracted torchvision {name.upper()} dataset"
        )
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        dataset = cls(root=str(root), train=False, download=bool(download))
    except Exception as exc:  # torchvision raises RuntimeError; offline downloads raise OSError
        hint = (
            "the download failed (is this machine offline?)"
            if download
            else "the dataset files are missing or corrupted"
        )
        raise DataError(
            f"cannot load {name} from data.root={str(root)!r}: {hint} ({type(exc).__name__}: "
            f"{exc}). Put the extracted dataset there (the '{folder}' folder as torchvision "
            "expects it) or set data.download: true and run on a machine that is online"
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(dataset.data))
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels, len(dataset.classes)


def _read_npz(
    path: str | os.PathLike[str] | None, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate and read an npz archive; return ``(images float NCHW in [0,1], labels, K)``."""
    if path is None or str(path).strip() == "":
        raise DataError("data.path is required for data.name='npz': the .npz file to evaluate on")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"data.path={str(path)!r} does not exist or is not a file (expected a .npz archive)"
        )
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"data.path={str(path)!r} cannot be read as a .npz archive "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"data.path={str(path)!r} is a single .npy array, not a .npz archive with "
            "'images' and 'labels'"
        )
    with archive:
        missing = [k for k in ("images", "labels") if k not in archive.files]
        if missing:
            raise DataError(
                f"data.path={str(path)!r} lacks the key(s) {missing}: it has "
                f"{sorted(archive.files)}; a .npz archive needs 'images' and 'labels'"
            )
        try:
            images = archive["images"]
            labels = archive["labels"]
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise DataError(
                f"data.path={str(path)!r}: cannot read 'images'/'labels' without pickle ({exc}); "
                "store plain numeric arrays"
            ) from exc

    # images: shape and dtype
    stored_shape = tuple(images.shape)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"data.path={str(path)!r}: 'images' has shape {stored_shape} and dtype "
            f"{images.dtype}; allowed: {_NPZ_ALLOWED_IMAGES}"
        )
    is_float = np.issubdtype(images.dtype, np.floating)
    if images.dtype != np.uint8 and not is_float:
        raise DataError(
            f"data.path={str(path)!r}: 'images' has dtype {images.dtype} (shape "
            f"{stored_shape}); allowed: {_NPZ_ALLOWED_IMAGES}"
        )
    n = images.shape[0]
    if n == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"data.path={str(path)!r}: 'images' is empty (shape {stored_shape})")

    # labels: 1-D, same N, non-negative integers
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(
            f"data.path={str(path)!r}: 'labels' has shape {tuple(labels.shape)} but must be 1-D "
            f"with one label per image, i.e. shape ({n},)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"data.path={str(path)!r}: 'labels' has dtype {labels.dtype}; allowed: integer "
            "class indices (e.g. int64)"
        )
    if int(labels.min()) < 0:
        raise DataError(
            f"data.path={str(path)!r}: 'labels' contains {int(labels.min())}; class indices "
            "must be non-negative"
        )
    num_classes = int(labels.max()) + 1

    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if is_float:
        if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
            finite = images[np.isfinite(images)]
            found = f"[{float(finite.min())}, {float(finite.max())}]" if finite.size else "no finite value"
            raise DataError(
                f"data.path={str(path)!r}: float 'images' (dtype {images.dtype}) must lie in "
                f"[0, 1]; found range {found} or non-finite values"
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        x = x.permute(0, 3, 1, 2).contiguous()
    else:
        x = _uint8_nhwc_to_float_nchw(torch.from_numpy(np.ascontiguousarray(images)))
    y = torch.from_numpy(labels.astype(np.int64, copy=True))
    return x, y, num_classes


def _image_folder(
    path: str | os.PathLike[str] | None,
    transform: EvalTransform,
    limit: int | None,
) -> tuple[Dataset, int, int]:
    """Return ``(dataset, num_samples, num_classes)`` of an ImageFolder validation split."""
    from torchvision import datasets

    if path is None or str(path).strip() == "":
        raise DataError(
            "data.path is required for data.name='imagenet': the validation split laid out as "
            "one sub-folder per class"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.path={str(path)!r} is not a directory; for data.name='imagenet' it must be "
            "the validation split laid out as one sub-folder per class (ImageFolder layout)"
        )
    try:
        dataset: Dataset = datasets.ImageFolder(str(folder), transform=transform.compose())
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"data.path={str(path)!r} is not a usable ImageFolder ({exc}); expected one "
            "sub-folder per class containing images (.jpg, .jpeg, .png, ...)"
        ) from exc
    num_classes = len(dataset.classes)  # type: ignore[attr-defined]
    num_samples = len(dataset)  # type: ignore[arg-type]
    if limit is not None and limit < num_samples:
        dataset = Subset(dataset, range(limit))
        num_samples = limit
    return dataset, num_samples, num_classes


def _load_cifar(config: DataConfig) -> EvalData:
    raw, labels, num_classes = _read_cifar(config.name, config.root, config.download, config.limit)
    return _in_memory(config, _uint8_nhwc_to_float_nchw(raw), labels, num_classes)


def _load_npz(config: DataConfig) -> EvalData:
    return _in_memory(config, *_read_npz(config.path, config.limit))


def _load_digits(config: DataConfig) -> EvalData:
    from qimera.models.digits_cnn import DIGITS_NUM_CLASSES, digits_split

    _, _, images, labels = digits_split()
    if config.limit is not None:
        images, labels = images[: config.limit], labels[: config.limit]
    return _in_memory(config, images.clone(), labels, DIGITS_NUM_CLASSES)  # normalised in place


def _load_imagenet(config: DataConfig, transform: EvalTransform | None = None) -> EvalData:
    """An ImageFolder split preprocessed with ``transform`` (the teacher's; the standard
    256 -> 224 without one); ``data.mean``/``data.std`` override its normalisation."""
    m, s = _resolve_stats(config.name, 3, config.mean, config.std)
    transform = dataclasses.replace(transform or _DEFAULT_IMAGE_TRANSFORM, mean=m, std=s)
    dataset, num_samples, num_classes = _image_folder(config.path, transform, config.limit)
    return EvalData(
        loader=_make_loader(dataset, config),
        num_classes=num_classes,
        num_samples=num_samples,
        input_size=(3, *transform.crop),
        mean=m,
        std=s,
        name=config.name,
    )


# --------------------------------------------------------------------------- public entry


def load_eval_data(
    config: DataConfig | Mapping[str, Any] | str | None = None,
    /,
    *,
    default_mean: Sequence[float] | None = None,
    default_std: Sequence[float] | None = None,
    transform: EvalTransform | None = None,
    **fields: Any,
) -> EvalData:
    """Load the evaluation set ``config`` describes (see the module docstring).

    ``config`` is a validated :class:`qimera.config.DataConfig` (``data.name`` one of
    :data:`DATASETS`). As a shorthand (tests, scripts) it may also be a dataset name plus
    fields, ``load_eval_data("npz", path=..., limit=100)``, or a mapping of fields; these
    are validated as ``DataConfig`` is, and a bad field raises a :class:`DataError`
    naming ``data.<key>``.

    Args:
        default_mean, default_std: the statistics used where ``data.mean`` / ``data.std``
            are not set; without them, ``transform``'s, else the dataset's
            :data:`DEFAULT_NORMALISATION` (ImageNet's for 3-channel ``npz`` data).
        transform: the teacher's preprocessing (a run passes
            ``teacher.eval_transform``): image-file datasets resize and crop with it;
            ``data.mean``/``data.std`` still override its normalisation.

    Raises:
        DataError: on any missing file, malformed array or inconsistent setting.
    """
    config = section_config(DataConfig, "data", config, fields, DataError, key="name")
    if config.name not in DATA_LOADERS:  # unregistered after the config was validated
        raise DataError(f"data.name={config.name!r}: {DATA_LOADERS.unknown(config.name)}")
    if transform is not None:
        default_mean = transform.mean if default_mean is None else default_mean
        default_std = transform.std if default_std is None else default_std
    update = {key: list(default) for key, default in (("mean", default_mean), ("std", default_std))
              if default is not None and not getattr(config, key)}
    if update:
        config = config.model_copy(update=update)
    loader = DATA_LOADERS[config.name]
    if transform is not None and _takes_transform(loader):
        return loader(config, transform=transform)
    return loader(config)


def _takes_transform(loader: Callable[..., Any]) -> bool:
    """Whether a dataset loader accepts the teacher's ``transform`` keyword."""
    try:
        return "transform" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return False


def check_fits_teacher(data: EvalData, input_size: Sequence[int], num_classes: int) -> None:
    """Raise :class:`~qimera.config.ConfigError` unless ``data`` suits a teacher with this
    input size and class count."""
    if tuple(data.input_size) != tuple(input_size):
        raise ConfigError(
            f"data.name={data.name!r}: images are {tuple(data.input_size)} but the teacher expects "
            f"{tuple(input_size)} (set teacher.input_size or use matching data)"
        )
    if data.num_classes > num_classes:
        raise ConfigError(
            f"data.name={data.name!r}: labels go up to {data.num_classes - 1} but the teacher has "
            f"{num_classes} classes"
        )
