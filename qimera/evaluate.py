"""Top-1 / top-5 / per-class accuracy of a classifier over an evaluation loader."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .export.onnx_int8 import int8_model
from .quant.recipe import is_integer_exact

__all__ = ["EvalResult", "NonFiniteError", "check_finite_parameters", "evaluate", "evaluated_form",
           "first_non_finite"]


class NonFiniteError(ValueError):
    """A model has non-finite parameters or produces non-finite logits (a diverged
    student, typically): its accuracy means nothing and it must not be published."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor] | None:
    """The first ``(name, tensor)`` of floating point ``named`` tensors that holds a NaN or
    an infinity, or None; one host synchronisation when all are finite."""
    tensors = [(n, t) for n, t in named if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return None
    return next((n, t) for n, t in tensors if not bool(torch.isfinite(t).all()))


def check_finite_parameters(model: nn.Module, what: str = "model") -> None:
    """Raise :class:`NonFiniteError` naming the first parameter or buffer of ``model``
    that holds a NaN or an infinity."""
    found = first_non_finite((*model.named_parameters(), *model.named_buffers()))
    if found is not None:
        name, t = found
        raise NonFiniteError(f"the {what}'s {name} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) "
                             f"of {t.numel()} (a diverged training run?); it is not evaluated or exported")


@dataclass
class EvalResult:
    """Accuracies in percent (0..100).

    Attributes:
        top1: top-1 accuracy.
        top5: top-k accuracy with ``k = min(5, num_classes)``.
        per_class: top-1 accuracy of each class, indexed by label; ``nan`` for a class with
            no samples in the evaluated data.
        num_samples: number of samples evaluated.
    """

    top1: float
    top5: float
    per_class: list[float]
    num_samples: int


def _logits_of(output: object) -> torch.Tensor:
    """Accept a tensor, or a tuple/list whose first element is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"evaluate: the model returned {type(output).__name__}; expected a logits tensor of "
        "shape (batch, num_classes)"
    )


@torch.no_grad()
def evaluated_form(model: nn.Module) -> nn.Module:
    """``model`` as it is evaluated. A student whose recipe is integer-exact
    (``QuantRecipe.integer_exact``, ``quant.integer_exact``) is evaluated as its int8 ONNX
    form computes: :func:`qimera.export.onnx_int8.int8_model`, built from its weights,
    ranges and BatchNorm statistics as they are now, on the model's device. Any other
    model is returned as it is."""
    if not is_integer_exact(model):
        return model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return int8_model(model)[0].to(device)


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    fake_quant: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on every ``(images, labels)`` batch of ``loader``.

    The model must already live on ``device``; batches are moved there. The model is put in
    eval mode for the call and every submodule's training flag is restored afterwards. An
    integer-exact student is scored as its int8 form computes (:func:`evaluated_form`,
    in float32 whatever ``autocast_dtype`` says: its integers must stay exact).
    Correct counts accumulate as tensors on ``device``, so the only host synchronisation is
    the final read-out.

    Args:
        model: classifier returning logits of shape ``(batch, C)``.
        loader: iterable of ``(images, labels)`` with int64 labels in ``[0, num_classes)``.
        device: where the batches are sent.
        num_classes: number of classes (length of ``per_class``); defaults to the logits'
            width ``C``. Top-5 uses ``k = min(5, num_classes, C)``.
        autocast_dtype: when given, run the forward under ``torch.autocast(device.type,
            dtype=autocast_dtype)`` (e.g. ``torch.bfloat16``).
        channels_last: send 4-D batches in ``torch.channels_last`` memory format (convert the
            model yourself with ``model.to(memory_format=torch.channels_last)``).
        fake_quant: score an integer-exact student in the paper's fake-quant arithmetic
            (its own forward) instead of as its int8 form computes.

    Raises:
        ValueError: the loader is empty, or a label lies outside ``[0, num_classes)``.
        NonFiniteError: a logit is NaN or infinite.
    """
    dev = torch.device(device)
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"evaluate: num_classes={num_classes!r} must be a positive integer")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    scored = model if fake_quant else evaluated_form(model)
    if scored is not model:
        autocast_dtype = None
    amp = (
        torch.autocast(device_type=dev.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    total = 0
    top1 = top5 = per_class_correct = per_class_count = classes = None
    try:
        for images, labels in loader:
            images = images.to(dev, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(dev, non_blocking=True).long().view(-1)
            with amp:
                logits = _logits_of(scored(images))
            if classes is None:
                classes = int(num_classes) if num_classes is not None else int(logits.shape[1])
                zeros = torch.zeros((), dtype=torch.int64, device=dev)
                top1, top5, nonfinite = zeros.clone(), zeros.clone(), zeros.clone()
                per_class_correct = torch.zeros(classes, dtype=torch.int64, device=dev)
                per_class_count = torch.zeros(classes, dtype=torch.int64, device=dev)
                class_ids = torch.arange(classes, device=dev)
                k = max(1, min(5, classes, int(logits.shape[1])))
            hit1 = logits.argmax(dim=1) == labels
            hit5 = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
            top1 += hit1.sum()
            top5 += hit5.sum()
            nonfinite += (~torch.isfinite(logits)).any(dim=1).sum()
            # one-hot comparison instead of bincount: static shapes, no host sync, deterministic
            onehot = labels.unsqueeze(1) == class_ids.unsqueeze(0)
            per_class_count += onehot.sum(dim=0)
            per_class_correct += (onehot & hit1.unsqueeze(1)).sum(dim=0)
            total += int(labels.shape[0])
    finally:
        for module, flag in flags:
            module.training = flag

    if total == 0 or classes is None:
        raise ValueError("evaluate: the loader yielded no samples")
    # the single host synchronisation
    packed = torch.cat([top1.view(1), top5.view(1), nonfinite.view(1), per_class_count, per_class_correct])
    stats = packed.cpu().tolist()
    correct1, correct5, bad = stats[0], stats[1], stats[2]
    counts = stats[3 : 3 + classes]
    correct = stats[3 + classes :]
    if bad:
        raise NonFiniteError(f"evaluate: the model's logits are NaN or infinite on {bad} of {total} images "
                             "(a diverged student?); its accuracy would mean nothing")
    if sum(counts) != total:
        raise ValueError(
            f"evaluate: {total - sum(counts)} of {total} labels lie outside [0, {classes}) "
            "(num_classes too small for the labels?)"
        )
    return EvalResult(
        top1=100.0 * correct1 / total,
        top5=100.0 * correct5 / total,
        per_class=[100.0 * c / n if n else math.nan for c, n in zip(correct, counts)],
        num_samples=total,
    )
