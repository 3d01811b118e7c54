"""The one list of the library's "bad input" errors: the CLI and the pipeline stages print
them as one line and exit with status 2 (anything else is a fault of the machine or a bug)."""

from __future__ import annotations

import sys

#: (module, class) of every exception that means "the input is wrong, do not retry"
INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("qimera.config", "ConfigError"), ("qimera.teachers", "TeacherError"), ("qimera.data", "DataError"),
    ("qimera.export", "ExportError"), ("qimera.trainer", "TrainingDiverged"), ("qimera.trainer", "CheckpointError"),
    ("qimera.evaluate", "NonFiniteError"), ("qimera.experiments", "ExperimentError"),
    ("qimera.figures", "FigureError"), ("qimera._lock", "OutDirBusy"),
    ("qimera._files", "OutputDirError"),
)


def input_errors() -> tuple[type[BaseException], ...]:
    """The classes of :data:`INPUT_ERRORS` whose modules are imported: an exception of a
    module that was never imported cannot have been raised, and nobody pays its import."""
    return tuple(getattr(sys.modules[m], name) for m, name in INPUT_ERRORS if m in sys.modules)
