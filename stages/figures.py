"""Figures for the MLflow run and ``dvc plots``: generated samples and training curves.

A calibration-only method has neither a generator nor epochs: its ``samples.png`` shows
the images its ranges were calibrated on (:func:`save_images`, ZeroQ's distilled batch)
or says there is nothing to show (:func:`save_note`), and so does its ``curves.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import atomic_write

MAX_GRID_CLASSES = 10


def _save(path: Path, fig) -> None:
    """Write the PNG atomically and free the figure."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda h: fig.savefig(h, format="png"), "wb")
    finally:
        plt.close(fig)


def grid_classes(num_classes: int, limit: int = MAX_GRID_CLASSES) -> list[int]:
    """All classes when there are at most ``limit``, else ``limit`` evenly spaced ones."""
    if num_classes <= limit:
        return list(range(num_classes))
    return [round(i * (num_classes - 1) / (limit - 1)) for i in range(limit)]


def sample_grid(generator, classes: list[int], mean, std, *, lam: float = 0.5, seed: int = 0, device="cpu",
                pad: int = 1):
    """Figure 6 of the paper: cell (i, j) is the generator's image of the superposition of
    class ``classes[i]`` and ``classes[j]`` (K = 2, λ = ``lam``); the diagonal shows plain
    classes. Returns a float array (rows·(H+pad)-pad, cols·(W+pad)-pad, C) in [0, 1],
    cells separated by ``pad`` white pixels."""
    import torch

    from qimera.generators import ClassMix, pair_mix

    n = len(classes)
    lam_t = torch.tensor([lam], device=device)
    mixes = [pair_mix(ci, cj, lam_t) for ci in classes for cj in classes]
    mix = ClassMix(torch.cat([m.labels for m in mixes]).to(device), torch.cat([m.lam for m in mixes]).to(device))
    rng = torch.Generator(device=device).manual_seed(seed)
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            x = generator(mix, generator=rng).float()
    finally:
        generator.train(was_training)
    return _tile(x, mean, std, n, n, pad)


def _tile(x, mean, std, rows: int, cols: int, pad: int):
    """Images ``x`` (N ≤ rows·cols, C, H, W) in the normalised input space as one float
    array (rows·(H+pad)-pad, cols·(W+pad)-pad, C) in [0, 1]: row-major cells separated by
    ``pad`` white pixels, missing cells white."""
    import torch

    x = x.detach().float().cpu()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    x = torch.cat([x, x.new_ones((rows * cols - len(x), *x.shape[1:]))])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=1.0)  # white lines between cells
    c, h, w = x.shape[1:]
    grid = x.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid[: rows * h - pad, : cols * w - pad].numpy()


def image_grid(images, mean, std, *, cols: int = 8, pad: int = 1):
    """``images`` (N, C, H, W, normalised as the teacher's inputs) as a grid of ``cols``
    columns, in the form :func:`sample_grid` returns."""
    cols = max(1, min(cols, len(images)))
    return _tile(images, mean, std, math.ceil(len(images) / cols), cols, pad)


def save_sample_grid(path: Path, grid, classes: list[int], class_names=None, *, lam: float = 0.5,
                     pad: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    cell = (grid.shape[0] + pad) / n  # pixels per cell, separator included
    names = [str(class_names[c]) if class_names else str(c) for c in classes]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n, 1.0 + 0.9 * n), dpi=max(100, min(int(cell), 160)))
    _show(ax, grid)
    ticks = [cell * i + (cell - pad) / 2 for i in range(n)]
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title(f"generated samples: superposition of class i and class j (K=2, λ={lam})", fontsize=9)
    fig.tight_layout()
    _save(path, fig)


def _show(ax, grid) -> None:
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")


def save_images(path: Path, grid, title: str) -> None:
    """An :func:`image_grid` with a title, no axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = grid.shape[:2]
    scale = 6.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(max(4.0, width * scale), 0.8 + height * scale), dpi=100)
    _show(ax, grid)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(path, fig)


def save_note(path: Path, text: str) -> None:
    """A figure that only says ``text`` (for a plot that has nothing to show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.5), dpi=100)
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    _save(path, fig)


def save_curves(path: Path, history: list[dict], teacher_top1: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key):
        pts = [(r["epoch"], r[key]) for r in history
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, label in (("loss_g", "generator"), ("loss_g_ce", "generator CE"),
                       ("loss_g_bns", "generator BNS"), ("loss_s", "student")):
        xs, ys = series(key)
        if xs:
            ax1.plot(xs, ys, marker=".", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    for key, label in (("top1", "student top-1"), ("top5", "student top-5")):
        xs, ys = series(key)
        if xs:
            ax2.plot(xs, ys, marker=".", label=label)
    if teacher_top1 is not None:
        ax2.axhline(teacher_top1, color="gray", linestyle="--", label="teacher top-1")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save(path, fig)
