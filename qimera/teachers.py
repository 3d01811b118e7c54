"""Loading full-precision teacher networks.

A teacher is described by a *source* and a few fields (the ``teacher`` section of a run
config; error messages name those keys, e.g. ``teacher.arch``):

``pytorchcv``
    A pretrained model from pytorchcv's model zoo, by ``name`` (one of
    :data:`PYTORCHCV_TEACHERS`), the zoo the Qimera paper used.
``torchvision``
    A pretrained model from torchvision, by ``name`` (one of :data:`TORCHVISION_TEACHERS`).
``checkpoint``
    Any importable architecture ``arch="package.module:callable"`` plus a local weights
    file ``weights`` (a state dict, loaded with ``weights_only=True``). This is the way to
    use pretrained weights on an offline machine: download them elsewhere, copy the file.
``demo``
    The small offline digits CNN of :mod:`qimera.models.digits_cnn` (trained on first use).

:func:`load_teacher` returns a :class:`LoadedTeacher`: the model in eval mode with frozen
parameters, its classifier weight (used by Qimera's boundary-sample generator), the
number of classes, and the input size and normalisation it expects. Every teacher must
contain ``nn.BatchNorm2d`` layers (:func:`check_batchnorm`), because the generator loss
matches their running statistics.

Pretrained downloads that fail raise a single :class:`TeacherError` which points to the
``checkpoint`` source.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "TeacherError",
    "TeacherSpec",
    "LoadedTeacher",
    "SOURCES",
    "PYTORCHCV_TEACHERS",
    "TORCHVISION_TEACHERS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_teacher",
    "find_classifier",
    "check_batchnorm",
    "load_state_dict_file",
    "sha256_file",
]


class TeacherError(ValueError):
    """A teacher could not be built or loaded; the message says which setting to change."""


SOURCES: tuple[str, ...] = ("pytorchcv", "torchvision", "checkpoint", "demo")

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2557, 0.2761)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_DEFAULT_CHECKPOINT_INPUT_SIZE: tuple[int, int, int] = (3, 32, 32)


@dataclass(frozen=True)
class TeacherSpec:
    """What a named zoo model expects: class count, input size and normalisation."""

    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR10 = TeacherSpec(10, (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD)
_CIFAR100 = TeacherSpec(100, (3, 32, 32), CIFAR100_MEAN, CIFAR100_STD)
_IMAGENET = TeacherSpec(1000, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD)

#: pytorchcv model names accepted by the ``pytorchcv`` source.
PYTORCHCV_TEACHERS: dict[str, TeacherSpec] = {
    "resnet20_cifar10": _CIFAR10,
    "resnet20_cifar100": _CIFAR100,
    "resnet18": _IMAGENET,
    "resnet50": _IMAGENET,
    "mobilenetv2_w1": _IMAGENET,
}


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
    #: Local file the weights came from, if any.
    weights_path: str | None = None
    #: SHA-256 (hex) of ``weights_path``.
    sha256: str | None = None

    @property
    def feature_dim(self) -> int:
        """Width of the classifier's input (``D`` in ``fc_weight``'s ``(C, D)``)."""
        return int(self.fc_weight.shape[1])


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(exc: BaseException, limit: int = 200) -> str:
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


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefix(key: str, prefix: str = "module.") -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file, safely (``weights_only=True``).

    Accepts a plain state dict, or a dict wrapping one under ``"state_dict"`` or
    ``"model"`` (e.g. ``{"best_prec1": ..., "state_dict": {...}}``); ``module.`` prefixes
    (from ``DataParallel``) are stripped.

    Raises:
        TeacherError: the file is missing, cannot be unpickled safely, or holds no state dict.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise TeacherError(f"teacher.weights: file not found: {str(file)!r}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a config error
        raise TeacherError(
            f"teacher.weights: could not load {str(file)!r} with torch.load(weights_only=True) "
            f"({_one_line(exc)}). Save a state dict (torch.save(model.state_dict(), path)), "
            "not a pickled model."
        ) from exc
    for _ in range(4):  # unwrap nested {"state_dict": ...} / {"model": ...}
        if _is_state_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "model_state_dict") if k in obj), None
            )
            if inner is not None:
                obj = inner
                continue
        break
    if not _is_state_dict(obj):
        kind = (
            f"a dict with keys {sorted(map(str, obj))[:10]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise TeacherError(
            f"teacher.weights: {str(file)!r} holds {kind}, not a state dict (expected a "
            "mapping of parameter names to tensors, optionally under 'state_dict' or 'model')"
        )
    return {_strip_prefix(k): v for k, v in obj.items()}


def check_batchnorm(model: nn.Module, key: str = "teacher") -> None:
    """Raise :class:`TeacherError` unless ``model`` contains an ``nn.BatchNorm2d``."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise TeacherError(
            f"{key} has no BatchNorm2d layer: Qimera's generator loss matches BN statistics; "
            "choose a teacher with BatchNorm2d layers (e.g. a ResNet or MobileNetV2)"
        )


def find_classifier(model: nn.Module, num_classes: int | None = None) -> nn.Linear | nn.Conv2d:
    """The model's final classifier layer.

    The last ``nn.Linear`` in module order with ``out_features == num_classes`` (any width
    when ``num_classes`` is ``None``). Models whose head is a 1x1 convolution instead
    (pytorchcv's MobileNetV2, for instance) have no such layer; for them the last
    ``nn.Conv2d`` is returned when it is a 1x1, ungrouped convolution with
    ``num_classes`` outputs. Its weight has shape ``(C, D, 1, 1)``; use
    ``weight.flatten(1)`` for the ``(C, D)`` matrix (as :func:`load_teacher` does).

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


def _format_key_diff(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:10]) + (", ..." if len(items) > 10 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    return "; ".join(parts)


def _load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``, raising a readable :class:`TeacherError` on mismatch."""
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in state and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise TeacherError(
            f"teacher.weights: {where} does not match teacher.arch: "
            + _format_key_diff(missing, unexpected, shapes)
        )
    model.load_state_dict(dict(state), strict=False)


def _check_local_path(weights: str | os.PathLike[str]) -> Path:
    text = os.fspath(weights)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    if len(scheme) > 1:  # one letter is a Windows drive, e.g. C:\...
        hint = (
            " The pipeline's fetch_teacher stage downloads s3:// weights (verified); with "
            f"`qimera run`, fetch the file first: python -m stages.s3 get {text} teacher.pt"
            if scheme == "s3" else ""
        )
        raise TeacherError(
            f"teacher.weights: {text!r} is a {scheme}:// URL; the qimera library reads local files only.{hint}"
        )
    return Path(text).expanduser()


def _import_arch(arch: str) -> Callable[..., Any]:
    if not isinstance(arch, str) or not re.fullmatch(r"[\w.]+:[\w.]+", arch.strip()):
        raise TeacherError(
            f"teacher.arch: {arch!r} is not of the form 'package.module:callable' "
            "(e.g. 'qimera.models.cifar_resnet:resnet20' or 'torchvision.models:resnet18')"
        )
    module_name, attr_path = arch.strip().split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TeacherError(
            f"teacher.arch: cannot import module {module_name!r} ({_one_line(exc)})"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TeacherError(f"teacher.arch: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TeacherError(f"teacher.arch: {arch!r} is not callable")
    return obj


def _accepts_num_classes(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell: try it
    return any(
        p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
    )


def _build_arch(arch: str, num_classes: int | None) -> nn.Module:
    fn = _import_arch(arch)
    try:
        if num_classes is not None and _accepts_num_classes(fn):
            model = fn(num_classes=num_classes)
        else:
            model = fn()
    except Exception as exc:  # noqa: BLE001 - report any constructor failure as config error
        raise TeacherError(f"teacher.arch: calling {arch!r} failed ({_one_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise TeacherError(
            f"teacher.arch: {arch!r} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def _download_error(source: str, name: str, arch_hint: str, exc: BaseException) -> TeacherError:
    what = "download failed" if _is_download_error(exc) else "loading the pretrained weights failed"
    return TeacherError(
        f"teacher.source {source}: teacher.name {name!r}: {what} ({_one_line(exc)}). "
        "On an offline machine, download the weights elsewhere and use source: checkpoint "
        f"with arch: {arch_hint} and weights: /path/to/file"
    )


def _require_name(source: str, name: str | None, allowed: Mapping[str, Any]) -> str:
    allowed_list = ", ".join(sorted(allowed))
    if not name:
        raise TeacherError(f"teacher.name is required for source {source!r} (one of: {allowed_list})")
    if name not in allowed:
        raise TeacherError(
            f"teacher.name: unknown {source} teacher {name!r}; allowed: {allowed_list}"
        )
    return name


def _check_num_classes(source: str, name: str, expected: int, given: int | None, pretrained: bool) -> int:
    if given is None:
        return expected
    if pretrained and given != expected:
        raise TeacherError(
            f"teacher.num_classes: pretrained {source} model {name!r} has {expected} classes, "
            f"got {given} (use pretrained: false or source: checkpoint for another class count)"
        )
    return int(given)


# --------------------------------------------------------------------------- sources


def _load_pytorchcv(
    name: str | None, num_classes: int | None, pretrained: bool, cache_dir: str | None
) -> tuple[nn.Module, str, TeacherSpec, str | None]:
    name = _require_name("pytorchcv", name, PYTORCHCV_TEACHERS)
    spec = PYTORCHCV_TEACHERS[name]
    n_cls = _check_num_classes("pytorchcv", name, spec.num_classes, num_classes, pretrained)
    from pytorchcv.model_provider import get_model

    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if cache_dir is not None:
        kwargs["root"] = cache_dir
    if n_cls != spec.num_classes:
        kwargs["num_classes"] = n_cls
    try:
        model = get_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - pytorchcv raises many kinds of errors
        if not pretrained:
            raise TeacherError(
                f"teacher.name: building pytorchcv model {name!r} failed ({_one_line(exc)})"
            ) from exc
        raise _download_error("pytorchcv", name, _pytorchcv_arch_hint(name), exc) from exc
    weights_path = _pytorchcv_weights_file(name, cache_dir) if pretrained else None
    return model, name, TeacherSpec(n_cls, spec.input_size, spec.mean, spec.std), weights_path


def _pytorchcv_arch_hint(name: str) -> str:
    try:
        from pytorchcv.model_provider import _models  # type: ignore[attr-defined]

        fn = _models[name]
        return f"{fn.__module__}:{fn.__name__}"
    except Exception:  # noqa: BLE001 - only a hint
        return f"<module>:{name}"


def _pytorchcv_weights_file(name: str, cache_dir: str | None) -> str | None:
    """Path of pytorchcv's cached weights file for ``name``, if it exists."""
    try:
        from pytorchcv.models.common.model_store import get_model_name_suffix_data

        error, sha1_hash, _ = get_model_name_suffix_data(name)
        root = cache_dir if cache_dir is not None else os.path.join("~", ".torch", "models")
        path = Path(root).expanduser() / f"{name}-{error}-{sha1_hash[:8]}.pth"
        return str(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - provenance is best effort
        return None


def _load_torchvision(
    name: str | None, num_classes: int | None, pretrained: bool, cache_dir: str | None
) -> tuple[nn.Module, str, TeacherSpec, str | None]:
    name = _require_name("torchvision", name, TORCHVISION_TEACHERS)
    weights = TORCHVISION_TEACHERS[name]
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    spec = TeacherSpec(
        num_classes=len(weights.meta["categories"]),
        input_size=(3, crop, crop),
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
    )
    n_cls = _check_num_classes("torchvision", name, spec.num_classes, num_classes, pretrained)
    import torchvision

    kwargs: dict[str, Any] = {}
    if name == "inception_v3":
        # Same architecture as the pretrained weights; in eval mode it returns plain logits.
        kwargs.update(aux_logits=True, transform_input=True)
        if not pretrained:
            kwargs["init_weights"] = True
    if n_cls != spec.num_classes:
        kwargs["num_classes"] = n_cls

    previous_hub_dir = torch.hub.get_dir()
    if cache_dir is not None:
        torch.hub.set_dir(str(cache_dir))
    try:
        try:
            model = torchvision.models.get_model(
                name, weights=weights if pretrained else None, **kwargs
            )
        except Exception as exc:  # noqa: BLE001 - urllib / hub raise many kinds
            if not pretrained:
                raise TeacherError(
                    f"teacher.name: building torchvision model {name!r} failed ({_one_line(exc)})"
                ) from exc
            raise _download_error("torchvision", name, f"torchvision.models:{name}", exc) from exc
        weights_path = None
        if pretrained:
            filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
            candidate = Path(torch.hub.get_dir()) / "checkpoints" / filename
            weights_path = str(candidate) if candidate.is_file() else None
    finally:
        if cache_dir is not None:
            torch.hub.set_dir(previous_hub_dir)
    return model, name, TeacherSpec(n_cls, spec.input_size, spec.mean, spec.std), weights_path


def _load_checkpoint(
    name: str | None, arch: str | None, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, str, str]:
    if not arch:
        raise TeacherError(
            "teacher.arch is required for source 'checkpoint' (a 'package.module:callable', "
            "e.g. 'qimera.models.cifar_resnet:resnet20')"
        )
    if not weights:
        raise TeacherError(
            "teacher.weights is required for source 'checkpoint' (path to a state dict file)"
        )
    path = _check_local_path(weights)
    if not path.is_file():
        raise TeacherError(f"teacher.weights: file not found: {str(path)!r}")
    model = _build_arch(arch, num_classes)
    state = load_state_dict_file(path)
    _load_weights_into(model, state, repr(str(path)))
    return model, name or arch, str(path)


def _load_demo(cache_dir: str | None) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from qimera.models.digits_cnn import load_demo_teacher
    except ImportError as exc:
        raise TeacherError(
            f"teacher.source demo: the demo teacher is not available ({_one_line(exc)})"
        ) from exc
    return load_demo_teacher(cache_dir=cache_dir)


def _as_floats(value: Any, key: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise TeacherError(f"{key}: expected a list of numbers, got {value!r}") from exc
    if not out:
        raise TeacherError(f"{key}: must not be empty")
    return out


def _as_input_size(value: Any) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise TeacherError(
            f"teacher.input_size: expected [channels, height, width], got {value!r}"
        ) from exc
    if len(out) != 3 or min(out) < 1:
        raise TeacherError(
            f"teacher.input_size: expected three positive ints [channels, height, width], got {value!r}"
        )
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- public entry


def load_teacher(
    source: str,
    *,
    name: str | None = None,
    arch: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    mean: Any = None,
    std: Any = None,
    input_size: Any = None,
) -> LoadedTeacher:
    """Build or load a teacher (see the module docstring for the sources).

    Args:
        source: one of :data:`SOURCES`.
        name: zoo model name (``pytorchcv`` / ``torchvision``; required there); a label
            otherwise (defaults to ``arch`` for ``checkpoint``).
        arch: ``"package.module:callable"`` building the network (``checkpoint`` only).
        weights: local state-dict file (``checkpoint`` only).
        num_classes: class count; for ``checkpoint`` passed to the ``arch`` callable when
            it accepts it, for zoo sources it must match the pretrained model.
        pretrained: load zoo weights (``pytorchcv`` / ``torchvision``); ``False`` builds a
            randomly initialised network.
        cache_dir: where zoo / demo weights are cached (the libraries' default if ``None``).
        mean, std, input_size: override the normalisation and ``(C, H, W)`` input size
            (defaults: the zoo model's; ImageNet mean/std and ``(3, 32, 32)`` for ``checkpoint``).

    Returns:
        A :class:`LoadedTeacher`; its model is in eval mode with frozen parameters.

    Raises:
        TeacherError: for any configuration problem, including failed downloads.
    """
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    weights_path: str | None
    if source == "pytorchcv":
        model, label, spec, weights_path = _load_pytorchcv(name, num_classes, pretrained, cache)
    elif source == "torchvision":
        model, label, spec, weights_path = _load_torchvision(name, num_classes, pretrained, cache)
    elif source == "checkpoint":
        model, label, weights_path = _load_checkpoint(
            name, arch, os.fspath(weights) if weights is not None else None, num_classes
        )
        spec = TeacherSpec(-1, _DEFAULT_CHECKPOINT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    elif source == "demo":
        model, meta = _load_demo(cache)
        label = name or "digits_cnn"
        weights_path = meta.get("weights_path")
        spec = TeacherSpec(
            int(meta["num_classes"]),
            tuple(meta["input_size"]),  # type: ignore[arg-type]
            tuple(meta["mean"]),
            tuple(meta["std"]),
        )
    else:
        raise TeacherError(
            f"teacher.source: unknown source {source!r}; allowed: {', '.join(SOURCES)}"
        )

    model.eval()
    model.requires_grad_(False)
    check_batchnorm(model)
    wanted = num_classes if num_classes is not None else (spec.num_classes if spec.num_classes > 0 else None)
    classifier = find_classifier(model, wanted)

    final_mean = _as_floats(mean, "teacher.mean") if mean is not None else tuple(spec.mean)
    final_std = _as_floats(std, "teacher.std") if std is not None else tuple(spec.std)
    final_size = _as_input_size(input_size) if input_size is not None else tuple(spec.input_size)
    if any(s <= 0 for s in final_std):
        raise TeacherError(f"teacher.std: every value must be > 0, got {final_std}")
    for key, values in (("teacher.mean", final_mean), ("teacher.std", final_std)):
        if len(values) != final_size[0]:
            raise TeacherError(
                f"{key}: has {len(values)} values but the input has {final_size[0]} channels "
                "(teacher.input_size)"
            )

    digest = None
    if weights_path is not None and os.path.isfile(weights_path):
        digest = sha256_file(weights_path)
    return LoadedTeacher(
        model=model,
        fc_weight=classifier.weight.detach().flatten(1).clone(),
        num_classes=int(_out_features(classifier)),
        input_size=final_size,  # type: ignore[arg-type]
        mean=final_mean,
        std=final_std,
        source=source,
        name=label,
        weights_path=weights_path,
        sha256=digest,
    )
