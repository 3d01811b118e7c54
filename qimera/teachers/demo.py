"""Source ``demo``: the small offline digits CNN of :mod:`qimera.models.digits_cnn`
(trained on first use, cached under ``teacher.cache_dir``)."""

from __future__ import annotations

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
    model, meta = load_demo_teacher(cache_dir=config.cache_dir)
    spec = TeacherSpec(
        int(meta["num_classes"]),
        tuple(meta["input_size"]),  # type: ignore[arg-type]
        tuple(meta["mean"]),
        tuple(meta["std"]),
    )
    return finish_teacher(config, model, name=config.name or "digits_cnn",
                          arch=f"{DigitsCNN.__module__}:{DigitsCNN.__qualname__}", spec=spec,
                          weights_path=meta.get("weights_path"))
