"""The pipeline's own figures: training curves and notes for figures with nothing to show.

The paper's figures (the class × class sample grid, the PCA of generated samples, image
grids) belong to the library, :mod:`qimera.figures`; ``evaluate`` calls it directly. A
calibration-only method has neither a generator nor epochs: its ``curves.png`` and
``pca.png`` say so (:func:`save_note`), and so does naive's ``samples.png``.
"""

from __future__ import annotations

import math
from pathlib import Path


def save_note(path: Path, text: str) -> None:
    """A figure that only says ``text`` (for a plot that has nothing to show)."""
    from qimera.figures import new_figure, save_png

    fig = new_figure(figsize=(6, 1.5), dpi=100)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    save_png(path, fig)


def save_curves(path: Path, history: list[dict], teacher_top1: float | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    from qimera.figures import new_figure, save_png

    def series(key):
        pts = [(r["epoch"], r[key]) for r in history
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = new_figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
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
    save_png(path, fig)
