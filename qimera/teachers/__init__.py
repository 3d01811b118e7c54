"""Loading full-precision teacher networks.

A teacher is described by the ``teacher`` section of a run config, a
:class:`qimera.config.TeacherConfig` (error messages name its keys, e.g. ``teacher.arch``).
Its ``source`` picks the loader from :data:`TEACHER_SOURCES`, one module per source:

``pytorchcv`` (:mod:`qimera.teachers.pytorchcv`)
    A pretrained model from pytorchcv's model zoo, by ``name`` (one of
    :data:`PYTORCHCV_TEACHERS`), the zoo the Qimera paper used.
``torchvision`` (:mod:`qimera.teachers.torchvision`)
    A pretrained model from torchvision, by ``name`` (one of :data:`TORCHVISION_TEACHERS`).
``timm`` (:mod:`qimera.teachers.timm`)
    Any timm model, by ``name`` (``resnet50.a1_in1k``), downloaded or from a local
    ``weights`` file; needs the optional extra ``qimera[timm]``.
``checkpoint`` (:mod:`qimera.teachers.checkpoint`)
    Any importable architecture ``arch="package.module:callable"`` plus a local weights
    file ``weights`` (a state dict, loaded with ``weights_only=True``). This is the way to
    use pretrained weights on an offline machine: download them elsewhere, copy the file.
``demo`` (:mod:`qimera.teachers.demo`)
    The small offline digits CNN of :mod:`qimera.models.digits_cnn` (trained on first use).

:func:`load_teacher` returns a :class:`LoadedTeacher`: the model in eval mode with frozen
parameters, its classifier weight (used by Qimera's boundary-sample generator), the
number of classes, the input size and normalisation it expects, how its evaluation
images are resized and cropped (:class:`EvalTransform`, from the zoo's own
preprocessing), the class names where the weights carry them (torchvision's and timm's
ImageNet classifiers; ``None`` otherwise: classes are labelled by index), and the ``arch``
(``module:callable``) that rebuilds the network without weights. Every teacher must
contain ``nn.BatchNorm2d`` layers (:func:`check_batchnorm`), because the generator loss
matches their running statistics.

Two keys of every source change the evaluation transform: ``eval_resize`` (the shorter
side is resized to it before the centre crop to the input size; at least the crop's
height and width) and ``eval_interpolation`` (``nearest``, ``bilinear`` or ``bicubic``);
``None``, the default, keeps the source's own. A ``checkpoint`` teacher trained with,
say, timm's bicubic 235 -> 224 says so with ``eval_resize: 235, eval_interpolation: bicubic``.

Pretrained downloads that fail raise a single :class:`TeacherError` which points to the
``checkpoint`` source.

A new source is one function ``load(config: TeacherConfig) -> LoadedTeacher`` (build the
model, then return :func:`finish_teacher`'s result) and one call::

    register_source("toy", load)   # teacher.source: toy now validates and loads
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qimera._files import sha256_file
from qimera._registry import TEACHER_SOURCES, section_config
from qimera.config import TeacherConfig
from qimera.normalisation import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD

from .base import EvalTransform, LoadedTeacher, TeacherError, TeacherSpec, check_batchnorm, find_classifier
from .base import finish_teacher
from .checkpoint import load_state_dict_file
from .pytorchcv import PYTORCHCV_TEACHERS
from .torchvision import TORCHVISION_TEACHERS

__all__ = [
    "TeacherError",
    "TeacherSpec",
    "LoadedTeacher",
    "EvalTransform",
    "SOURCES",
    "TEACHER_SOURCES",
    "PYTORCHCV_TEACHERS",
    "TORCHVISION_TEACHERS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_teacher",
    "register_source",
    "finish_teacher",
    "find_classifier",
    "check_batchnorm",
    "load_state_dict_file",
    "sha256_file",
]

#: The registered sources (a live tuple-like view of :data:`TEACHER_SOURCES`).
SOURCES = TEACHER_SOURCES.names

#: ``register_source(name, loader, *, replace=False)``: make ``teacher.source: name`` load
#: with ``loader(config: TeacherConfig) -> LoadedTeacher`` (a callable or a
#: ``"module:callable"`` string). Usable as a decorator: ``@register_source("toy")``.
register_source = TEACHER_SOURCES.register


def load_teacher(
    config: TeacherConfig | Mapping[str, Any] | str | None = None, /, **fields: Any
) -> LoadedTeacher:
    """Build or load the teacher ``config`` describes (see the module docstring).

    ``config`` is a validated :class:`TeacherConfig`. As a shorthand (tests, scripts) it
    may also be a source name plus fields, ``load_teacher("checkpoint", arch=..., weights=...)``,
    or a mapping of fields; these are validated as ``TeacherConfig`` is, and a bad field
    raises a :class:`TeacherError` naming ``teacher.<key>``, the value and what is allowed.

    Returns:
        A :class:`LoadedTeacher`; its model is in eval mode with frozen parameters.

    Raises:
        TeacherError: for any configuration problem, including failed downloads.
    """
    config = section_config(TeacherConfig, "teacher", config, fields, TeacherError, key="source")
    if config.source not in TEACHER_SOURCES:  # unregistered after the config was validated
        raise TeacherError(f"teacher.source={config.source!r}: {TEACHER_SOURCES.unknown(config.source)}")
    return TEACHER_SOURCES[config.source](config)
