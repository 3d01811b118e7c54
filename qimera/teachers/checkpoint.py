"""Source ``checkpoint``: any importable architecture ``teacher.arch =
"package.module:callable"`` plus a local state-dict file ``teacher.weights`` (loaded with
``weights_only=True``). This is the way to use pretrained weights on an offline machine:
download them elsewhere, copy the file."""

from __future__ import annotations

import inspect
import os
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qimera._registry import import_callable
from qimera.config import TeacherConfig
from qimera.normalisation import IMAGENET_MEAN, IMAGENET_STD

from .base import LoadedTeacher, TeacherError, TeacherSpec, drop_auxiliary_head, finish_teacher, one_line

__all__ = ["load_state_dict_file", "local_weights_path", "load_weights_file", "load"]

#: what a checkpoint teacher expects unless the config says otherwise (the class count
#: comes from its classifier)
_DEFAULTS = TeacherSpec(-1, (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)


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
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a config error
        raise TeacherError(
            f"teacher.weights: could not load {str(file)!r} with torch.load(weights_only=True) "
            f"({one_line(exc)}). Save a state dict (torch.save(model.state_dict(), path)), "
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


def _load_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: str,
                       what: str = "teacher.arch") -> None:
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
            f"teacher.weights: {where} does not match {what}: "
            + _format_key_diff(missing, unexpected, shapes)
        )
    model.load_state_dict(dict(state), strict=False)


def _check_local_path(weights: str) -> Path:
    scheme = urllib.parse.urlparse(weights).scheme
    if scheme == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(weights).path))
    if len(scheme) > 1:  # one letter is a Windows drive, e.g. C:\...
        hint = (
            " The pipeline's fetch_teacher stage downloads s3:// weights (verified); with "
            f"`qimera run`, fetch the file first: python -m stages.s3 get {weights} teacher.pt"
            if scheme == "s3" else ""
        )
        raise TeacherError(
            f"teacher.weights: {weights!r} is a {scheme}:// URL; the qimera library reads local files only.{hint}"
        )
    return Path(weights).expanduser()


def _accepts_num_classes(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell: try it
    return any(
        p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
    )


def _build_arch(arch: str, num_classes: int | None) -> nn.Module:
    fn = import_callable(arch, "teacher.arch", TeacherError)
    try:
        if num_classes is not None and _accepts_num_classes(fn):
            model = fn(num_classes=num_classes)
        else:
            model = fn()
    except Exception as exc:  # noqa: BLE001 - report any constructor failure as config error
        raise TeacherError(f"teacher.arch: calling {arch!r} failed ({one_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise TeacherError(
            f"teacher.arch: {arch!r} returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def local_weights_path(weights: str) -> Path:
    """``teacher.weights`` as an existing local file (URLs and missing files are refused
    with one line), checked before any network is built."""
    path = _check_local_path(weights)
    if not path.is_file():
        raise TeacherError(f"teacher.weights: file not found: {str(path)!r}")
    return path


def load_weights_file(model: nn.Module, path: Path, what: str = "teacher.arch") -> None:
    """Load the state dict in the local file ``path`` into ``model``: every key and shape
    must match (the error lists the differences and names ``what`` as the model).

    The one tolerance: weights without the training-only auxiliary head (a teacher saved
    after :func:`finish_teacher` dropped it, as the pipeline's ``fetch_teacher`` saves
    Inception-v3) load into an arch that builds one; the head is dropped first."""
    state = load_state_dict_file(path)
    if getattr(model, "AuxLogits", None) is not None and not any(k.startswith("AuxLogits.") for k in state):
        drop_auxiliary_head(model)
    _load_weights_into(model, state, repr(str(path)), what)


def load(config: TeacherConfig) -> LoadedTeacher:
    """Build ``teacher.arch`` and load ``teacher.weights`` into it (both required by the config)."""
    path = local_weights_path(config.weights)
    model = _build_arch(config.arch, config.num_classes)
    load_weights_file(model, path)
    return finish_teacher(config, model, name=config.name or config.arch, arch=config.arch,
                          spec=_DEFAULTS, weights_path=str(path))
