"""Figures for the MLflow run and ``dvc plots``: generated samples and training curves."""

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
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1).cpu()  # (n*n, C, H, W)
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=1.0)  # white lines between cells
    c, h, w = x.shape[1:]
    grid = x.view(n, n, c, h, w).permute(0, 3, 1, 4, 2).reshape(n * h, n * w, c)
    return grid[: n * h - pad, : n * w - pad].numpy()


def save_sample_grid(path: Path, grid, classes: list[int], class_names=None, *, lam: float = 0.5,
                     pad: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    cell = (grid.shape[0] + pad) / n  # pixels per cell, separator included
    names = [str(class_names[c]) if class_names else str(c) for c in classes]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * n, 1.0 + 0.9 * n), dpi=max(100, min(int(cell), 160)))
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ticks = [cell * i + (cell - pad) / 2 for i in range(n)]
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title(f"generated samples: superposition of class i and class j (K=2, λ={lam})", fontsize=9)
    fig.tight_layout()
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
