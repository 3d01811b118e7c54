"""The ``{name: loader}`` tables behind ``teacher.source`` and ``data.name``, and the typed
call that both loaders accept.

:data:`TEACHER_SOURCES` maps a source to ``loader(config: TeacherConfig) -> LoadedTeacher``
(:mod:`qimera.teachers`); :data:`DATA_LOADERS` maps a dataset to
``loader(config: DataConfig) -> EvalData`` (:mod:`qimera.data`). The config validators
check names against these tables, so a registered name is valid everywhere at once.
Built-in loaders are named by import path (``"module:function"``) and imported on first
use: validating a config imports neither torch nor any loader.

Adding a source::

    from qimera.teachers import register_source

    register_source("toy", load_toy)           # or "mypackage.toy:load"
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["Registry", "TEACHER_SOURCES", "DATA_LOADERS", "GENERATOR_TERMS", "STUDENT_TERMS", "IMAGE_FILTERS",
           "AVERAGING", "import_callable", "section_config"]

Loader = Callable[[Any], Any]
M = TypeVar("M")


def import_callable(spec: str, key: str, error: type[Exception] = ValueError) -> Callable[..., Any]:
    """The callable that ``"package.module:attr.path"`` names: the one resolver for every
    such string in the project (``teacher.arch``, an export's arch, registry entries,
    the train stage's epoch hook). Failures raise ``error`` with one line naming ``key``."""
    import re

    text = spec.strip() if isinstance(spec, str) else ""
    if not re.fullmatch(r"[\w.]+:[\w.]+", text):
        raise error(f"{key}: {spec!r} is not of the form 'package.module:callable' "
                    "(e.g. 'qimera.models.cifar_resnet:resnet20' or 'torchvision.models:resnet18')")
    module_name, attr_path = text.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise error(f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {first})") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise error(f"{key}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{key}: {spec!r} is not callable")
    return obj


class _Names(Sequence[str]):
    """A live, read-only tuple-like view of a registry's names (in registration order)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, index):  # type: ignore[override]
        return tuple(self._registry)[index]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, _Names)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class Registry(Mapping[str, Loader]):
    """``{name: loader}`` for one config key (``key``, e.g. ``teacher.source``).

    Entries are callables or ``"package.module:callable"`` strings, imported on first
    lookup. Iterating yields the names in registration order.
    """

    def __init__(self, key: str, what: str, builtins: Mapping[str, Loader | str] = ()) -> None:
        self.key = key
        self.what = what
        self._entries: dict[str, Loader | str] = dict(builtins)

    def register(self, name: str, loader: Loader | str | None = None, *, replace: bool = False):
        """Register ``loader`` under ``name``; without ``loader``, a decorator that does.

        Raises:
            ValueError: ``name`` is not a non-empty string, or is taken (unless ``replace``).
        """
        if loader is None:
            return lambda fn: self.register(name, fn, replace=replace)
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"{self.key}: a {self.what} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.key}: {self.what} {name!r} is already registered (pass replace=True)")
        if not (callable(loader) or isinstance(loader, str)):
            raise ValueError(f"{self.key}: the loader for {name!r} must be callable or 'module:callable'")
        self._entries[name] = loader
        return loader

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when it is not registered)."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Loader:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = import_callable(entry, f"{self.key}={name!r}")
            self._entries[name] = entry
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> _Names:
        """The registered names, as a live tuple-like view."""
        return _Names(self)

    def allowed(self) -> str:
        """``"a, b, c"``: the registered names, for error messages."""
        return ", ".join(self)

    def unknown(self, name: object) -> str:
        """The one message for a name that is not registered."""
        return f"unknown {self.what}; allowed: {self.allowed()}"

    def check(self, name: str) -> str:
        """``name`` if it is registered, else ``ValueError(unknown(name))`` (config validators)."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return name


TEACHER_SOURCES = Registry("teacher.source", "source", {
    "pytorchcv": "qimera.teachers.pytorchcv:load",
    "torchvision": "qimera.teachers.torchvision:load",
    "timm": "qimera.teachers.timm:load",
    "checkpoint": "qimera.teachers.checkpoint:load",
    "demo": "qimera.teachers.demo:load",
})

DATA_LOADERS = Registry("data.name", "dataset", {
    "cifar10": "qimera.data:_load_cifar",
    "cifar100": "qimera.data:_load_cifar",
    "imagenet": "qimera.data:_load_imagenet",
    "npz": "qimera.data:_load_npz",
    "digits": "qimera.data:_load_digits",
})

#: the method parts of the ``parts`` config section (:mod:`qimera.parts`): generator-loss
#: terms ``term(GeneratorBatch, Config) -> scalar``, student-loss terms
#: ``term(StudentBatch, Config) -> scalar``, image filters ``factory(Config, input_size) ->
#: (images -> images) | None`` and averaging rules ``factory(Config) -> (student ->
#: AveragingRule) | None``
GENERATOR_TERMS = Registry("parts.generator_loss", "generator-loss term", {
    "ce": "qimera.parts:generator_ce",
    "bns": "qimera.parts:generator_bns",
    "margin": "qimera.parts:generator_margin",
})
STUDENT_TERMS = Registry("parts.student_loss", "student-loss term", {
    "kd": "qimera.parts:student_kd",
    "ce": "qimera.parts:student_ce",
    "ce_easy": "qimera.parts:student_ce_easy",
})
IMAGE_FILTERS = Registry("parts.image_filter", "image filter", {
    "none": "qimera.parts:no_filter",
    "lowpass": "qimera.parts:lowpass_filter",
})
AVERAGING = Registry("parts.averaging", "averaging rule", {
    "none": "qimera.parts:no_averaging",
    "ema": "qimera.parts:ema_rule",
    "swa": "qimera.parts:swa_rule",
})

_wrappers: dict[tuple[type, str], type] = {}


def section_config(model: type[M], section: str, config: Any, fields: Mapping[str, Any],
                   error: type[Exception], key: str) -> M:
    """The validated ``model`` (a config section class) a loader was called with.

    ``config`` is an instance of ``model`` (then ``fields`` must be empty), a mapping of
    its fields, a value for ``key`` (``load_teacher("checkpoint", arch=...)``) or ``None``;
    ``fields`` add to or override it. Path-like values become strings. A validation error
    becomes one line ``error`` naming ``section.key``, the value and what is allowed (the
    formatting of :func:`qimera.config.load_config`).
    """
    if isinstance(config, model):
        if fields:
            raise TypeError(f"pass the {section} fields in the {model.__name__}, not as keywords: {sorted(fields)}")
        return config
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        data = {key: config}
    data.update(fields)
    data = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in data.items()}

    from pydantic import ValidationError, create_model

    from .config import _error_lines

    wrapper = _wrappers.get((model, section))
    if wrapper is None:
        wrapper = _wrappers[(model, section)] = create_model(f"_{section}_only", **{section: (model, ...)})
    try:
        return getattr(wrapper.model_validate({section: data}), section)
    except ValidationError as exc:
        lines = [line.strip() for line in _error_lines(exc, data)]
        lines = [line.removeprefix(f"{section}: ") if line.startswith(f"{section}: {section}.") else line
                 for line in lines]
        raise error("; ".join(lines)) from None
