"""Source ``pytorchcv``: a pretrained model of pytorchcv's zoo (the one the Qimera paper
used), by ``teacher.name`` (one of :data:`PYTORCHCV_TEACHERS`).

Evaluation preprocessing: pytorchcv publishes each ImageNet model's input size and crop
ratio (``img_size``, ``img_scale`` in its ``model_metainfos.csv``, 0.875 for every model
here), not the interpolation; images are resized to ``ceil(size / ratio)`` (256 for 224,
342 for 299), bilinear, and centre-cropped (:meth:`EvalTransform.from_ratio`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from qimera.config import TeacherConfig
from qimera.normalisation import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD

from .base import EvalTransform, LoadedTeacher, TeacherError, TeacherSpec, check_num_classes, download_error
from .base import finish_teacher, one_line, require_name

__all__ = ["PYTORCHCV_TEACHERS", "pytorchcv_arch", "load"]

_CIFAR10 = TeacherSpec(10, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD)
_CIFAR100 = TeacherSpec(100, (3, 32, 32), CIFAR100_MEAN, CIFAR100_STD)
_IMAGENET = TeacherSpec(1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)
_IMAGENET_299 = TeacherSpec(1000, (3, 299, 299), IMAGENET_MEAN, IMAGENET_STD)

#: pytorchcv model names accepted by the ``pytorchcv`` source: the SPEC §3 teachers, and
#: the networks of the supplement's Table 10 (which names none; ZeroQ's pytorchcv model
#: list has ``inceptionv3``, ``sqnxt23_w2`` and ``shufflenet_g1_w1``): InceptionV3,
#: SqueezeNext-23 (all widths, v1 and v5) and ShuffleNet (width 1, all group counts).
PYTORCHCV_TEACHERS: dict[str, TeacherSpec] = {
    "resnet20_cifar10": _CIFAR10,
    "resnet20_cifar100": _CIFAR100,
    "resnet18": _IMAGENET,
    "resnet50": _IMAGENET,
    "mobilenetv2_w1": _IMAGENET,
    "inceptionv3": _IMAGENET_299,
    **{f"sqnxt23{v}_w{w}": _IMAGENET for v in ("", "v5") for w in ("1", "3d2", "2")},
    **{f"shufflenet_g{g}_w1": _IMAGENET for g in (1, 2, 3, 4, 8)},
}


def _crop_ratio(name: str) -> float | None:
    """pytorchcv's published crop ratio (``img_scale``) for ``name``; ``None`` where it
    gives none (the CIFAR models) or the table cannot be read."""
    try:
        from pytorchcv.models.common.model_store import get_model_metainfos_file_path, load_csv

        rows = load_csv(get_model_metainfos_file_path())
        column = rows[0].index("img_scale")
        value = next(row[column] for row in rows[1:] if row[0] == name)
        return float(value) if 0.0 < float(value) <= 1.0 else None
    except Exception:  # noqa: BLE001 - NA, a missing row or another pytorchcv layout: the standard ratio
        return None


def _eval_transform(name: str, spec: TeacherSpec) -> EvalTransform:
    ratio = _crop_ratio(name)
    return EvalTransform.from_ratio(spec.input_size[1:], spec.mean, spec.std,
                                    **({} if ratio is None else {"ratio": ratio}))


def pytorchcv_arch(name: str) -> str:
    """The ``module:function`` of pytorchcv that builds ``name`` (e.g.
    ``pytorchcv.models.resnet_cifar:resnet20_cifar10``)."""
    try:
        from pytorchcv.model_provider import _models  # type: ignore[attr-defined]

        fn = _models[name]
        return f"{fn.__module__}:{fn.__name__}"
    except Exception:  # noqa: BLE001 - only used to rebuild or to hint
        return f"<module>:{name}"


def _weights_file(name: str, cache_dir: str | None) -> str | None:
    """Path of pytorchcv's cached weights file for ``name``, if it exists."""
    try:
        from pytorchcv.models.common.model_store import get_model_name_suffix_data

        error, sha1_hash, _ = get_model_name_suffix_data(name)
        root = cache_dir if cache_dir is not None else os.path.join("~", ".torch", "models")
        path = Path(root).expanduser() / f"{name}-{error}-{sha1_hash[:8]}.pth"
        return str(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def load(config: TeacherConfig) -> LoadedTeacher:
    """Build (and with ``teacher.pretrained``, download) ``teacher.name`` from pytorchcv."""
    name = require_name(config, PYTORCHCV_TEACHERS)
    spec = PYTORCHCV_TEACHERS[name]
    n_cls = check_num_classes(config, spec.num_classes)
    from pytorchcv.model_provider import get_model

    kwargs: dict[str, Any] = {"pretrained": config.pretrained}
    if config.cache_dir is not None:
        kwargs["root"] = config.cache_dir
    if n_cls != spec.num_classes:
        kwargs["num_classes"] = n_cls
    arch = pytorchcv_arch(name)
    try:
        model = get_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - pytorchcv raises many kinds of errors
        if not config.pretrained:
            raise TeacherError(
                f"teacher.name: building pytorchcv model {name!r} failed ({one_line(exc)})"
            ) from exc
        raise download_error("pytorchcv", name, arch, exc) from exc
    weights_path = _weights_file(name, config.cache_dir) if config.pretrained else None
    spec = dataclasses.replace(spec, num_classes=n_cls, eval_transform=_eval_transform(name, spec))
    return finish_teacher(config, model, name=name, arch=arch, spec=spec, weights_path=weights_path)
