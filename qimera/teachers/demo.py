"""Source ``demo``: the small offline digits CNN of :mod:`qimera.models.digits_cnn`
(trained on first use, cached under ``teacher.cache_dir``)."""

from __future__ import annotations

import pickle

from qimera.config import TeacherConfig

from .base import LoadedTeacher, TeacherError, TeacherSpec, finish_teacher, one_line

__all__ = ["load"]


def load(config: TeacherConfig) -> LoadedTeacher:
    """The demo teacher, trained and cached on first use."""
    try:
        from qimera.models.digits_cnn import DigitsCNN, load_demo_teacher
    except ImportError as exc:
        raise TeacherError(
            f"teacher.source demo: the demo teacher is not available ({one_line(exc)})"
        ) from exc
    try:
        model, meta = load_demo_teacher(cache_dir=config.cache_dir)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:  # the others: a corrupt file
        where = repr(config.cache_dir) if config.cache_dir else "the default cache (~/.cache/qimera)"
        reason = ("the cached file is not a state dict: corrupt" if isinstance(exc, pickle.UnpicklingError)
                  else one_line(exc))
        raise TeacherError(
            f"teacher.cache_dir={where}: the demo teacher cannot be read from or written to its cache "
            f"({reason}); delete the cached file, or set teacher.cache_dir to a writable directory"
        ) from None
    spec = TeacherSpec(
        int(meta["num_classes"]),
        tuple(meta["input_size"]),  # type: ignore[arg-type]
        tuple(meta["mean"]),
        tuple(meta["std"]),
    )
    return finish_teacher(config, model, name=config.name or "digits_cnn",
                          arch=f"{DigitsCNN.__module__}:{DigitsCNN.__qualname__}", spec=spec,
                          weights_path=meta.get("weights_path"))
