"""Calibration-only baselines (SPEC §4): naive (Gaussian noise) and ZeroQ (distilled data).

Both quantize the teacher, run calibration batches through the student with its
activation quantizers observing (EMA ranges), freeze the ranges and return the student.
No weights are fine-tuned. :func:`calibrated_student` is the one call that makes a
calibration-only method's student from a run config (``qimera run`` and the pipeline's
``train`` stage both use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from .losses import BNStatsHook
from .quant import build_student, set_calibrating

#: the methods that only calibrate activation ranges (no generator, no fine-tuning)
CALIBRATION_METHODS = ("zeroq", "naive")


@torch.no_grad()
def calibrate(student: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Let every activation quantizer observe ``batches``, then freeze the ranges."""
    student.eval()
    set_calibrating(student, True)
    for x in batches:
        student(x)
    set_calibrating(student, False)
    return student


def gaussian_batches(n: int, batch_size: int, input_size: tuple[int, int, int], *,
                     seed: int, device: torch.device | str = "cpu"):
    """``n`` batches of N(0, 1) images (in the teacher's normalised input space)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for _ in range(n):
        yield torch.randn((batch_size, *input_size), generator=g, device=device)


def naive_calibrate(student: nn.Module, input_size, *, batches: int, batch_size: int, seed: int,
                    device="cpu") -> nn.Module:
    """The naive baseline: ranges calibrated on Gaussian noise."""
    return calibrate(student, gaussian_batches(batches, batch_size, input_size, seed=seed, device=device))


def naive_student(cfg, teacher, device="cpu") -> nn.Module:
    """The naive baseline for a run config: the student of ``cfg`` built from
    ``teacher`` (a :class:`qimera.teachers.LoadedTeacher`), calibrated on ``cfg.naive``'s
    noise batches, seeded by ``cfg.train.seed``."""
    student = build_student(cfg, teacher).to(device)
    return naive_calibrate(student, teacher.input_size, batches=cfg.naive.batches,
                           batch_size=cfg.naive.batch_size, seed=cfg.train.seed, device=device)


def distill_zeroq_images(
    teacher: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batch_size: int = 64,
    steps: int = 500,
    lr: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """ZeroQ's distilled data: a batch of random images optimised (Adam on the pixels)
    so that the statistics at every BatchNorm2d input match the stored running ones."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch_size, *input_size), generator=g, device=device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    hook = BNStatsHook(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            teacher(x)
            hook.loss().backward()
            opt.step()
    finally:
        hook.remove()
        teacher.train(was_training)
    return x.detach()


def zeroq_calibrate(student: nn.Module, teacher: nn.Module, input_size, *, batch_size: int, steps: int,
                    lr: float, seed: int, device="cpu") -> nn.Module:
    images = distill_zeroq_images(teacher, input_size, batch_size=batch_size, steps=steps, lr=lr,
                                  seed=seed, device=device)
    return calibrate(student, [images])


@dataclass(frozen=True)
class Calibrated:
    """A calibration-only method's result."""

    #: the quantized student, ranges frozen, in eval mode
    student: nn.Module
    #: ZeroQ's distilled images (the teacher's normalised input space), kept so that they
    #: can be shown; None for naive (its noise is not worth keeping)
    images: torch.Tensor | None
    #: optimisation steps taken: ZeroQ's distillation steps; naive takes none
    iterations: int


def calibrated_student(cfg, teacher, device="cpu") -> Calibrated:
    """The student of a calibration-only ``cfg.method`` (:data:`CALIBRATION_METHODS`) built
    from ``teacher`` (a :class:`qimera.teachers.LoadedTeacher` whose model is on
    ``device``): ZeroQ calibrates on ``cfg.zeroq``'s distilled batch, naive on
    ``cfg.naive``'s noise, both seeded by ``cfg.train.seed``."""
    if cfg.method == "naive":
        return Calibrated(naive_student(cfg, teacher, device), None, 0)
    if cfg.method != "zeroq":
        raise ValueError(f"method={cfg.method!r} is not calibration-only ({', '.join(CALIBRATION_METHODS)})")
    z = cfg.zeroq
    student = build_student(cfg, teacher).to(device)
    images = distill_zeroq_images(teacher.model, teacher.input_size, batch_size=z.batch_size, steps=z.steps,
                                  lr=z.lr, seed=cfg.train.seed, device=device)
    return Calibrated(calibrate(student, [images]), images, z.steps)
