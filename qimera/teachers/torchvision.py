"""Source ``torchvision``: a pretrained torchvision model, by ``teacher.name`` (one of
:data:`TORCHVISION_TEACHERS`). Also :func:`inception_v3`, the network that rebuilds a
pretrained Inception-v3 without weights (plain ``torchvision.models:<name>`` does for the
others)."""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path
from typing import Any

import torch

from qimera.config import TeacherConfig

from .base import EvalTransform, LoadedTeacher, TeacherError, TeacherSpec, check_num_classes, download_error
from .base import finish_teacher, one_line, require_name

__all__ = ["TORCHVISION_TEACHERS", "inception_v3", "torchvision_arch", "weights_spec", "load"]


def _torchvision_teachers() -> dict[str, Any]:
    from torchvision import models as tvm

    return {
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
        "mobilenet_v2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
        "inception_v3": tvm.Inception_V3_Weights.IMAGENET1K_V1,
        "shufflenet_v2_x1_0": tvm.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1,
        # SqueezeNet has no BatchNorm2d, so it is rejected by check_batchnorm(); it is
        # listed so that the error says why rather than "unknown model".
        "squeezenet1_1": tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }


#: torchvision model names accepted by the ``torchvision`` source, with their weights enum.
TORCHVISION_TEACHERS: dict[str, Any] = _torchvision_teachers()


def inception_v3(num_classes: int = 1000):
    """torchvision's Inception-v3 as its pretrained weights expect it (aux head, input
    transform), randomly initialised: the weights come from a checkpoint file."""
    from torchvision.models import inception_v3 as build

    return build(weights=None, aux_logits=True, transform_input=True, init_weights=False,
                 num_classes=num_classes)


def torchvision_arch(name: str) -> str:
    """The ``module:callable`` that rebuilds torchvision model ``name`` without weights."""
    if name == "inception_v3":
        return f"{__name__}:{inception_v3.__name__}"
    return f"torchvision.models:{name}"


def weights_spec(weights: Any) -> TeacherSpec:
    """What a torchvision ``Weights`` enum member says its model expects, read from its
    ``transforms()`` and ``meta["categories"]`` (the class names; available offline: the
    enum carries no tensors)."""
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    mean = tuple(float(v) for v in transform.mean)
    std = tuple(float(v) for v in transform.std)
    return TeacherSpec(
        num_classes=len(weights.meta["categories"]),
        input_size=(3, crop, crop),
        mean=mean,
        std=std,
        eval_transform=EvalTransform(resize=int(transform.resize_size[0]), crop=(crop, crop),
                                     interpolation=transform.interpolation.value, mean=mean, std=std),
        class_names=tuple(str(n) for n in weights.meta["categories"]),
    )


def load(config: TeacherConfig) -> LoadedTeacher:
    """Build (and with ``teacher.pretrained``, download) ``teacher.name`` from torchvision."""
    name = require_name(config, TORCHVISION_TEACHERS)
    weights = TORCHVISION_TEACHERS[name]
    spec = weights_spec(weights)
    n_cls = check_num_classes(config, spec.num_classes)
    import torchvision

    kwargs: dict[str, Any] = {}
    if name == "inception_v3":
        # Same architecture as the pretrained weights; in eval mode it returns plain logits.
        kwargs.update(aux_logits=True, transform_input=True)
        if not config.pretrained:
            kwargs["init_weights"] = True
    if n_cls != spec.num_classes:
        kwargs["num_classes"] = n_cls

    previous_hub_dir = torch.hub.get_dir()
    if config.cache_dir is not None:
        torch.hub.set_dir(str(config.cache_dir))
    try:
        try:
            model = torchvision.models.get_model(
                name, weights=weights if config.pretrained else None, **kwargs
            )
        except Exception as exc:  # noqa: BLE001 - urllib / hub raise many kinds
            if not config.pretrained:
                raise TeacherError(
                    f"teacher.name: building torchvision model {name!r} failed ({one_line(exc)})"
                ) from exc
            raise download_error("torchvision", name, torchvision_arch(name), exc) from exc
        weights_path = None
        if config.pretrained:
            filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
            candidate = Path(torch.hub.get_dir()) / "checkpoints" / filename
            weights_path = str(candidate) if candidate.is_file() else None
    finally:
        if config.cache_dir is not None:
            torch.hub.set_dir(previous_hub_dir)
    return finish_teacher(config, model, name=name, arch=torchvision_arch(name),
                          spec=dataclasses.replace(spec, num_classes=n_cls), weights_path=weights_path)
