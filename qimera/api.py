"""The one obvious call: :func:`run` (teacher → naive baseline → method → evaluation).

Everything that can be checked is checked before any training starts: the config, the
output directory, the teacher (loadable, has BatchNorm2d, finite weights, K ≤ classes),
the evaluation data (shape, classes, input size). A run holds its ``train.out_dir`` for
itself from start to summary (:func:`qimera._lock.hold_out_dir`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ._files import atomic_write
from ._lock import hold_out_dir
from .baselines import CALIBRATION_METHODS, calibrated_student, naive_student
from .config import Config, ConfigError, check_out_files, load_config, probe_out_dir
from .data import EvalData, check_fits_teacher, load_eval_data
from .evaluate import EvalResult, evaluate
from .generators import generated_side
from .quant.convert import check_exclude, weight_layer_names
from .teachers import LoadedTeacher, load_teacher
from .trainer import CHECKPOINT_NAME, HISTORY_NAME, EpochCallback, Trainer, resolve_device

SUMMARY_NAME = "summary.json"
#: the environment variable naming an extra per-epoch callback (``package.module:callable``,
#: called with the epoch's record after its checkpoint is written), read by ``qimera run``
#: and the pipeline's train stage: how a scheduler adds work at each epoch (e.g. the
#: upload of the checkpoint, :mod:`pipelines.remote`) without the library knowing of it
EPOCH_HOOK_ENV = "QIMERA_EPOCH_HOOK"


def hook_from_env(name: str, error: type[Exception] = ConfigError):
    """The callable the environment variable ``name`` names (``package.module:callable``),
    or None when it is unset; a name that does not import raises ``error`` with one line."""
    from ._registry import import_callable

    spec = os.environ.get(name)
    return import_callable(spec, name, error) if spec else None


def epoch_hook_from_env(error: type[Exception] = ConfigError) -> EpochCallback | None:
    """The callback :data:`EPOCH_HOOK_ENV` names, or None (:func:`hook_from_env`)."""
    return hook_from_env(EPOCH_HOOK_ENV, error)


@dataclass
class Prepared:
    """What a run needs before training: validated config, teacher, data, device."""

    cfg: Config
    teacher: LoadedTeacher
    eval_data: Optional[EvalData]
    device: torch.device
    out_dir: Path


@dataclass
class RunResult:
    cfg: Config
    teacher: EvalResult | None
    naive: EvalResult | None
    student: EvalResult | None
    student_model: nn.Module
    generator: Optional[nn.Module]
    history: list[dict] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The one-line JSON summary the CLI prints last."""
        def top1(r):
            return None if r is None else round(r.top1, 4)

        return {
            "method": self.cfg.method,
            "w_bits": self.cfg.quant.w_bits,
            "a_bits": self.cfg.quant.a_bits,
            "teacher_top1": top1(self.teacher),
            "naive_top1": top1(self.naive),
            "student_top1": top1(self.student),
            "student_top5": None if self.student is None else round(self.student.top5, 4),
            "iterations": self.iterations,
            "seconds": round(self.seconds, 2),
            "seed": self.cfg.train.seed,
            # results depend on it on the CPU (the order of float sums): OMP_NUM_THREADS=1 qimera run
            # reproduces `make demo`, which runs one thread per process
            "torch_threads": torch.get_num_threads(),
            "out_dir": self.cfg.train.out_dir,
        }


#: the files a run writes into ``train.out_dir``
OUT_FILES = (CHECKPOINT_NAME, HISTORY_NAME, SUMMARY_NAME)


def prepare(config: str | os.PathLike | dict | Config, overrides=(), *, with_data: bool = True) -> Prepared:
    """Validate everything a run needs, load the teacher and the evaluation data. The
    output directory is checked (it can be created and written; the files a run writes
    there are not directories), not created: :func:`run` creates it."""
    cfg = load_config(config, overrides)
    out_dir = probe_out_dir(cfg.train.out_dir)
    check_out_files(out_dir, OUT_FILES)
    return _prepare(cfg, out_dir, with_data)


def _prepare(cfg: Config, out_dir: Path, with_data: bool) -> Prepared:
    try:
        device = resolve_device(cfg.train.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    teacher = load_teacher(cfg.teacher)
    try:  # quant.exclude can only be checked against the teacher's layers
        check_exclude(weight_layer_names(teacher.model), cfg.quant.exclude)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    gen = cfg.effective_generator()
    if cfg.method not in CALIBRATION_METHODS:
        if gen.p > 0 and gen.k > teacher.num_classes:
            raise ConfigError(
                f"generator.k={gen.k}: must be between 1 and the teacher's number of classes "
                f"({teacher.num_classes})"
            )
        try:  # square sides only; others than multiples of 4 are generated larger and cropped
            generated_side(teacher.input_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    eval_data = None
    if with_data:
        eval_data = load_eval_data(cfg.data, default_mean=teacher.mean, default_std=teacher.std,
                                   transform=teacher.eval_transform)
        check_fits_teacher(eval_data, teacher.input_size, teacher.num_classes)
    return Prepared(cfg, teacher, eval_data, device, out_dir)


def _evaluate(model: nn.Module, prep: Prepared) -> EvalResult | None:
    if prep.eval_data is None:
        return None
    return evaluate(model, prep.eval_data.loader, device=prep.device, num_classes=prep.teacher.num_classes)


def run(
    config: str | os.PathLike | dict | Config,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    callbacks: tuple[EpochCallback, ...] = (),
    prepared: Prepared | None = None,
    initial_embeddings: torch.Tensor | None = None,
) -> RunResult:
    """Quantize a teacher without data, as the config says, and evaluate it.

    ``config`` is a YAML path, a dict or a :class:`Config`; ``overrides`` are
    ``section.key=value`` strings. Returns the accuracies (teacher, naive baseline,
    student at the **final** epoch), the student model and the training history, and
    writes ``summary.json`` into ``train.out_dir``.

    The run holds ``train.out_dir`` from before the teacher is loaded until the summary
    is written: another run there is refused (:class:`qimera._lock.OutDirBusy`, naming
    this one's pid, host and start time). A run that fails leaves no directory it created
    empty behind.
    """
    cfg = prepared.cfg if prepared is not None else load_config(config, overrides)
    with hold_out_dir(cfg.train.out_dir):
        prep = prepared or prepare(cfg)
        return _run(prep, callbacks, initial_embeddings)


def _run(prep: Prepared, callbacks: tuple[EpochCallback, ...], initial_embeddings: torch.Tensor | None) -> RunResult:
    cfg = prep.cfg
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    prep.teacher.model.to(prep.device)
    teacher_res = _evaluate(prep.teacher.model, prep)

    naive_res = None
    naive_model = None
    if cfg.naive.enabled or cfg.method == "naive":
        naive_model = naive_student(cfg, prep.teacher, prep.device)
        naive_res = _evaluate(naive_model, prep)

    history: list[dict] = []
    iterations = 0
    generator = None
    student_res = None
    if cfg.method not in CALIBRATION_METHODS:
        trainer = Trainer(cfg, prep.teacher, prep.eval_data, callbacks=callbacks,
                          initial_embeddings=initial_embeddings)
        result = trainer.fit()
        student, generator, history = trainer.deployed_student(), trainer.generator, result.history
        iterations = cfg.train.epochs * cfg.train.iters_per_epoch
        student_res = trainer.final_eval  # already measured at the end of the last epoch
    elif cfg.method == "naive":  # its student is the baseline measured above (the same call and seed)
        student = naive_model
    else:
        calibrated = calibrated_student(cfg, prep.teacher, prep.device)
        student, iterations = calibrated.student, calibrated.iterations
    if student_res is None:
        student_res = _evaluate(student, prep)
    seconds = time.perf_counter() - start

    res = RunResult(cfg, teacher_res, naive_res, student_res, student, generator, history, iterations, seconds)
    summary = res.summary()
    if student_res is not None:
        # null for a class the evaluation data lacks (NaN is not JSON)
        summary["student_per_class"] = [None if math.isnan(v) else round(v, 4) for v in student_res.per_class]
    atomic_write(prep.out_dir / SUMMARY_NAME, lambda handle: handle.write(json.dumps(summary, indent=2) + "\n"), "w")
    return res
