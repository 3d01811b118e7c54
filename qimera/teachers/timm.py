"""Source ``timm``: a model of timm (pytorch-image-models), by ``teacher.name``, an
architecture with an optional pretrained tag (``resnet18``, ``resnet50.a1_in1k``).

The input size, mean, std, crop percentage and interpolation come from the model's
pretrained config (``timm.data.resolve_model_data_config``), because timm's weights are
trained and scored with their own preprocessing (e.g. ``resnet50.a1_in1k``: bicubic,
resize 235, crop 224), and the evaluation transform follows timm's eval rule: resize
the shorter side to ``floor(size / crop_pct)``, centre-crop ``size``.

Weights: ``teacher.pretrained`` downloads them through timm (the Hugging Face hub);
``teacher.weights`` (a local state-dict file, e.g. ``torch.save(model.state_dict(), f)``
of a ``timm.create_model(name)`` made elsewhere) is loaded into
``timm.create_model(name, pretrained=False)`` instead, with no network. timm is the
optional extra ``qimera[timm]``.

Class names: an ImageNet classifier (1k, 12k, 21k/22k: timm infers the subset from the
class count) gets timm's own label descriptions (``"tench, Tinca tinca"``); other models
none.
"""

from __future__ import annotations

import difflib
import math
import warnings
from types import ModuleType
from typing import Any

import torch.nn as nn

from qimera.config import TeacherConfig
from qimera.data import STANDARD_CROP_RATIO

from .base import EvalTransform, LoadedTeacher, TeacherError, TeacherSpec, check_num_classes, download_error
from .base import finish_teacher, one_line
from .checkpoint import load_weights_file, local_weights_path

__all__ = ["INSTALL_HINT", "check_timm_name", "timm_arch", "timm_class_names", "timm_spec", "load"]

#: how to get timm, named by every error about it missing
INSTALL_HINT = "pip install 'qimera[timm]'"

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _timm() -> ModuleType:
    """The timm package, or one :class:`TeacherError` naming the extra that installs it."""
    try:
        import timm
    except ImportError as exc:
        raise TeacherError(
            f"teacher.source timm: the timm package is not installed ({one_line(exc)}); it is the "
            f"optional extra timm: {INSTALL_HINT}"
        ) from exc
    return timm


def check_timm_name(name: str) -> None:
    """Refuse a name timm does not know, before anything is built or downloaded: the
    architecture must be in ``timm.list_models()`` and a tag one of its pretrained tags."""
    timm = _timm()
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise TeacherError(f"teacher.name: unknown timm model {name!r} (not in timm.list_models(); {hint})")
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            shown = ", ".join(tagged[:10]) if tagged else "none"
            raise TeacherError(
                f"teacher.name: timm model {arch!r} has no pretrained tag {tag!r}; its tags: {shown}"
            )


def timm_arch(name: str) -> str:
    """The ``module:function`` that rebuilds timm model ``name`` without weights (its
    entrypoint, e.g. ``timm.models.resnet:resnet50``; the tag changes only the weights)."""
    from timm.models import model_entrypoint, split_model_name_tag

    fn = model_entrypoint(split_model_name_tag(name)[0])
    return f"{fn.__module__}:{fn.__name__}"


def timm_class_names(model: nn.Module) -> tuple[str, ...] | None:
    """The class names of a built timm ImageNet classifier, from timm's own ImageNet
    metadata (``timm.data.infer_imagenet_subset`` by class count, ``ImageNetInfo``'s label
    descriptions, which ship with timm: no download); ``None`` for any other model."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        names = tuple(str(n) for n in ImageNetInfo(subset).label_descriptions())
    except Exception:  # noqa: BLE001 - names are labels only: without them, classes go by index
        return None
    return names if len(names) == int(getattr(model, "num_classes", 0) or 0) else None


def timm_spec(model: nn.Module, name: str) -> TeacherSpec:
    """What a built timm model expects, from its pretrained config: class count, input
    size, normalisation and the evaluation transform (timm's ``floor(size / crop_pct)``
    resize, centre crop); and its class names (:func:`timm_class_names`)."""
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(model)
    input_size = tuple(int(v) for v in data["input_size"])
    mean = tuple(float(v) for v in data["mean"])
    std = tuple(float(v) for v in data["std"])
    interpolation = str(data.get("interpolation") or "bilinear")
    if interpolation not in _INTERPOLATIONS:
        raise TeacherError(
            f"teacher.name: timm model {name!r} is evaluated with {interpolation!r} interpolation; "
            f"qimera's evaluation transform supports {', '.join(_INTERPOLATIONS)}"
        )
    crop_pct = float(data.get("crop_pct") or STANDARD_CROP_RATIO)
    crop_mode = data.get("crop_mode") or "center"
    if crop_mode != "center":
        warnings.warn(
            f"timm model {name!r} is evaluated with crop_mode={crop_mode!r}; qimera resizes the shorter "
            "side and centre-crops, so its top-1 may differ slightly from timm's",
            stacklevel=3,
        )
    crop = (input_size[1], input_size[2])
    transform = EvalTransform(resize=math.floor(max(crop) / crop_pct), crop=crop,
                              interpolation=interpolation, mean=mean, std=std)  # type: ignore[arg-type]
    return TeacherSpec(int(getattr(model, "num_classes", -1) or -1), input_size,  # type: ignore[arg-type]
                       mean, std, eval_transform=transform, class_names=timm_class_names(model))


def _pretrained_classes(name: str) -> int | None:
    """The class count of ``name``'s pretrained weights (``None``: timm has no config)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return None if cfg is None or not getattr(cfg, "num_classes", None) else int(cfg.num_classes)


def load(config: TeacherConfig) -> LoadedTeacher:
    """Build ``teacher.name`` with timm: downloaded weights (``teacher.pretrained``), those
    of the local file ``teacher.weights``, or random ones (``pretrained: false``)."""
    timm = _timm()
    name = str(config.name)
    check_timm_name(name)
    path = local_weights_path(config.weights) if config.weights else None
    download = config.pretrained and path is None
    pretrained_classes = _pretrained_classes(name)
    kwargs: dict[str, Any] = {}
    if download and pretrained_classes is not None:
        n_cls = check_num_classes(config, pretrained_classes)
    else:
        n_cls = config.num_classes or pretrained_classes
    if n_cls is not None and n_cls != pretrained_classes:
        kwargs["num_classes"] = n_cls
    if download and config.cache_dir is not None:
        kwargs["cache_dir"] = config.cache_dir
    arch = timm_arch(name)
    try:
        model = timm.create_model(name, pretrained=download, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the hub, urllib and timm raise many kinds
        if not download:
            raise TeacherError(f"teacher.name: building timm model {name!r} failed ({one_line(exc)})") from exc
        raise download_error(
            "timm", name, arch, exc,
            alternative=f"or keep source: timm and set teacher.weights: /path/to/file, a state dict of "
                        f"timm.create_model({name!r})",
        ) from exc
    if path is not None:
        load_weights_file(model, path, what=f"timm model {name!r}")
    return finish_teacher(config, model, name=name, arch=arch, spec=timm_spec(model, name),
                          weights_path=None if path is None else str(path))
