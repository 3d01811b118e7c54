"""What every teacher source builds on: the result type, the checks that need the built
model, and :func:`finish_teacher`, the last step of every loader."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from qimera._files import sha256_file
from qimera.config import TeacherConfig
from qimera.data import EvalTransform
from qimera.evaluate import first_non_finite

__all__ = [
    "EvalTransform",
    "TeacherError",
    "TeacherSpec",
    "LoadedTeacher",
    "check_batchnorm",
    "check_finite_weights",
    "drop_auxiliary_head",
    "find_classifier",
    "finish_teacher",
    "require_name",
    "check_num_classes",
    "download_error",
    "one_line",
]


class TeacherError(ValueError):
    """A teacher could not be built or loaded; the message says which setting to change."""


@dataclass(frozen=True)
class TeacherSpec:
    """What a named zoo model expects: class count, input size and normalisation, and how
    its evaluation images are resized and cropped (``None``: the standard 0.875 crop ratio,
    bilinear, :meth:`EvalTransform.from_ratio`)."""

    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_transform: EvalTransform | None = None
    #: the name of each class, in class order, where the weights carry them (``None``:
    #: unknown; ignored by :func:`finish_teacher` when the built model has another class count)
    class_names: tuple[str, ...] | None = None


@dataclass
class LoadedTeacher:
    """A ready-to-use teacher (eval mode, ``requires_grad=False``) and its metadata."""

    model: nn.Module
    #: ``(num_classes, feature_dim)`` detached copy of the final classifier's weight.
    fc_weight: torch.Tensor
    num_classes: int
    #: ``(channels, height, width)`` of the expected (normalised) input.
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    name: str
    #: ``"module:callable"`` that rebuilds the network without weights (called with
    #: ``num_classes=``), e.g. ``"torchvision.models:resnet18"``.
    arch: str
    #: Local file the weights came from, if any.
    weights_path: str | None = None
    #: SHA-256 (hex) of ``weights_path``.
    sha256: str | None = None
    #: How evaluation images are preprocessed for this teacher (resize, crop to
    #: ``input_size``, interpolation, ``mean``/``std``); :func:`finish_teacher` always sets it.
    eval_transform: EvalTransform | None = None
    #: The name of each class (index order) where the teacher's weights carry them (the
    #: torchvision and timm ImageNet classifiers); ``None``: label classes by index. The
    #: first comma-separated part is the short name (``"tench, Tinca tinca"``).
    class_names: tuple[str, ...] | None = None

    @property
    def feature_dim(self) -> int:
        """Width of the classifier's input (``D`` in ``fc_weight``'s ``(C, D)``)."""
        return int(self.fc_weight.shape[1])

    def content_sha256(self) -> str:
        """SHA-256 (hex) of the model's weights and buffers as loaded (names, dtypes,
        shapes and bytes, in ``state_dict`` order), whatever file or download they came
        from: what a checkpoint records of the teacher it was trained from."""
        digest = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            t = t.detach().cpu().contiguous()
            digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``"ExcType: first line of message"``, shortened to ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_download_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a network / download failure."""
    if isinstance(exc, (OSError, TimeoutError)):  # URLError, requests errors, socket errors
        return True
    module = type(exc).__module__ or ""
    return module.split(".")[0] in {"urllib", "urllib3", "requests", "http", "socket"}


def download_error(source: str, name: str, arch_hint: str, exc: BaseException,
                   alternative: str | None = None) -> TeacherError:
    """The one error of a failed pretrained download: it points to ``source: checkpoint``
    (and to ``alternative``, another way to give a local file, where the source has one)."""
    what = "download failed" if _is_download_error(exc) else "loading the pretrained weights failed"
    also = f" ({alternative})" if alternative else ""
    return TeacherError(
        f"teacher.source {source}: teacher.name {name!r}: {what} ({one_line(exc)}). "
        "On an offline machine, download the weights elsewhere and use source: checkpoint "
        f"with arch: {arch_hint} and weights: /path/to/file{also}"
    )


def require_name(config: TeacherConfig, allowed: Mapping[str, Any]) -> str:
    """``teacher.name``, which must be one of ``allowed`` (a zoo's table)."""
    if config.name not in allowed:
        raise TeacherError(
            f"teacher.name: unknown {config.source} teacher {config.name!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return config.name


def check_num_classes(config: TeacherConfig, expected: int) -> int:
    """The class count to build: ``teacher.num_classes``, which a pretrained zoo model fixes."""
    given = config.num_classes
    if given is None:
        return expected
    if config.pretrained and given != expected:
        raise TeacherError(
            f"teacher.num_classes: pretrained {config.source} model {config.name!r} has {expected} "
            f"classes, got {given} (use pretrained: false or source: checkpoint for another class count)"
        )
    return int(given)


def check_batchnorm(model: nn.Module, key: str = "teacher") -> None:
    """Raise :class:`TeacherError` unless ``model`` contains an ``nn.BatchNorm2d``."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise TeacherError(
            f"{key} has no BatchNorm2d layer: Qimera's generator loss matches BN statistics; "
            "choose a teacher with BatchNorm2d layers (e.g. a ResNet or MobileNetV2)"
        )


def check_finite_weights(model: nn.Module, config: TeacherConfig | None = None) -> None:
    """Raise :class:`TeacherError` naming the first parameter or buffer of the teacher that
    holds a NaN or an infinity (damaged weights): nothing it computes would mean anything."""
    found = first_non_finite((*model.named_parameters(), *model.named_buffers()))
    if found is None:
        return
    name, t = found
    where = f" (teacher.weights={config.weights!r})" if config is not None and config.weights else ""
    raise TeacherError(f"teacher{where}: its {name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite "
                       f"value(s) of {t.numel()}; the weights are damaged: use other teacher weights")


def drop_auxiliary_head(model: nn.Module) -> bool:
    """Remove an auxiliary classifier that runs only in training mode (torchvision's
    Inception-v3 ``AuxLogits``); returns whether there was one.

    A teacher only ever runs in eval mode, where that head is dead code; but its
    BatchNorm2d layers would still be found by the BNS loss, which matches every
    BatchNorm2d of the teacher and would wait for statistics that never come. Eval-mode
    outputs are unchanged (the model returns plain logits either way).
    """
    if getattr(model, "AuxLogits", None) is None or not hasattr(model, "aux_logits"):
        return False
    model.AuxLogits = None
    model.aux_logits = False
    return True


def find_classifier(model: nn.Module, num_classes: int | None = None) -> nn.Linear | nn.Conv2d:
    """The model's final classifier layer.

    The last ``nn.Linear`` in module order with ``out_features == num_classes`` (any width
    when ``num_classes`` is ``None``). Models whose head is a 1x1 convolution instead
    (pytorchcv's MobileNetV2, for instance) have no such layer; for them the last
    ``nn.Conv2d`` is returned when it is a 1x1, ungrouped convolution with
    ``num_classes`` outputs. Its weight has shape ``(C, D, 1, 1)``; use
    ``weight.flatten(1)`` for the ``(C, D)`` matrix (as :func:`finish_teacher` does).

    Raises:
        TeacherError: no such layer.
    """
    found: nn.Linear | None = None
    last_conv: nn.Conv2d | None = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and (
            num_classes is None or module.out_features == num_classes
        ):
            found = module
        elif isinstance(module, nn.Conv2d):
            last_conv = module
    if found is not None:
        return found
    if (
        last_conv is not None
        and tuple(last_conv.kernel_size) == (1, 1)
        and last_conv.groups == 1
        and (num_classes is None or last_conv.out_channels == num_classes)
    ):
        return last_conv
    what = "nn.Linear" if num_classes is None else f"nn.Linear with {num_classes} outputs"
    raise TeacherError(
        f"teacher has no classifier ({what}, or a final 1x1 nn.Conv2d): Qimera needs the "
        "final fully connected layer's weight (check teacher.num_classes against the "
        "model's class count)"
    )


def _out_features(layer: nn.Linear | nn.Conv2d) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def finish_teacher(
    config: TeacherConfig,
    model: nn.Module,
    *,
    name: str,
    arch: str,
    spec: TeacherSpec,
    weights_path: str | None = None,
) -> LoadedTeacher:
    """The :class:`LoadedTeacher` of a built ``model``: the last step of every source.

    Puts the model in eval mode with frozen parameters, checks it (BatchNorm2d present,
    classifier found), and takes ``teacher.mean``/``std``/``input_size`` where the config
    gives them, else ``spec``'s (the source's defaults; ``spec.num_classes <= 0`` means
    "infer from the classifier"). The evaluation transform is ``spec.eval_transform`` (or
    the standard 0.875 crop ratio) cropped to the input size and normalised with the
    resolved mean/std, so that it always agrees with what the teacher is fed in training;
    ``teacher.eval_resize`` / ``eval_interpolation``, where given, replace its resize and
    interpolation. ``spec.class_names`` become the teacher's where there is one per class.
    The config has already checked each field on its own; this checks the mean/std channel
    count against the input size and the resize against the crop, after the model is built
    and loaded, so that a checkpoint that does not fit its arch is reported first.
    """
    model.eval()
    model.requires_grad_(False)
    drop_auxiliary_head(model)
    check_batchnorm(model)
    check_finite_weights(model, config)
    wanted = config.num_classes if config.num_classes is not None else (
        spec.num_classes if spec.num_classes > 0 else None)
    classifier = find_classifier(model, wanted)

    mean = tuple(config.mean) if config.mean is not None else tuple(spec.mean)
    std = tuple(config.std) if config.std is not None else tuple(spec.std)
    input_size = tuple(config.input_size) if config.input_size is not None else tuple(spec.input_size)
    for key, values in (("teacher.mean", mean), ("teacher.std", std)):
        if len(values) != input_size[0]:
            raise TeacherError(
                f"{key}: has {len(values)} values but the input has {input_size[0]} channels "
                "(teacher.input_size)"
            )

    crop = (int(input_size[1]), int(input_size[2]))
    if config.eval_resize is not None and config.eval_resize < max(crop):
        raise TeacherError(
            f"teacher.eval_resize={config.eval_resize}: smaller than the crop {crop[0]}x{crop[1]} "
            "(teacher.input_size's height and width); the shorter side is resized to it before the "
            f"centre crop, so it must be at least {max(crop)}"
        )

    base = spec.eval_transform or EvalTransform.from_ratio(crop, mean, std)
    eval_transform = dataclasses.replace(base.with_crop(crop), mean=mean, std=std)
    if config.eval_resize is not None:
        eval_transform = dataclasses.replace(eval_transform, resize=int(config.eval_resize))
    if config.eval_interpolation is not None:
        eval_transform = dataclasses.replace(eval_transform, interpolation=config.eval_interpolation)
    num_classes = int(_out_features(classifier))
    class_names = (tuple(str(n) for n in spec.class_names)
                   if spec.class_names is not None and len(spec.class_names) == num_classes else None)

    digest = sha256_file(weights_path) if weights_path is not None and os.path.isfile(weights_path) else None
    return LoadedTeacher(
        model=model,
        fc_weight=classifier.weight.detach().flatten(1).clone(),
        num_classes=num_classes,
        input_size=input_size,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        source=config.source,
        name=name,
        arch=arch,
        weights_path=weights_path,
        sha256=digest,
        eval_transform=eval_transform,
        class_names=class_names,
    )
