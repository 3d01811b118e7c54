"""Figures 3, 5 and 6 of the paper for any trained run, from its teacher and generator alone.

The computation functions return arrays; the ``save_*`` functions draw them. matplotlib
(the ``pipeline`` extra) and scikit-learn are imported only inside the functions that need
them, so ``import qimera`` stays pure PyTorch. :func:`pca_figures` and
:func:`sample_figures` are what ``qimera figure pca|samples RUN_DIR`` runs; the pipeline's
``evaluate`` stage calls the same functions on its own teacher and generator.

Choices where the paper is silent (README, "Figures"):

* **Features** are the input of the teacher's final classifier (:func:`find_classifier`,
  as the generator's embedding initialisation finds it), captured by a forward hook; a
  1×1-convolution head's spatial input is averaged to one vector.
* **The generator runs in eval mode** (BatchNorm running statistics), so that an image does
  not depend on the batch it was drawn in; its training mode is restored afterwards.
* **Boundary samples** of a pair (a, b) are K = 2 superpositions of exactly those two
  classes with λ drawn as training draws it (``softmax`` of two N(0, 1)) and noise as in
  training.
* **The path** from a to b is ``(1−λ)·a + λ·b`` for λ = 0, 0.01, …, 1 with the generator's
  noise input neutral: zeros for Qimera's ``add`` (the standardized embedding itself),
  ones for GDFQ's ``multiply`` (``E[c]·σ_z``: zero noise would erase the class). Every
  tenth step (λ = 0, 0.1, …, 1) is marked.
* **The PCA** of a pair is fitted on the two class clouds and the boundary cloud; the
  path is projected into it. Figure 3's PCA is fitted on the plain samples of all classes.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ._files import atomic_write
from .generators import ClassMix, Generator, mix_weights, pair_mix

#: λ steps of the path between two class embeddings (λ = 0, 1/100, …, 1)
PATH_STEPS = 100
#: every this many path steps a larger dot (λ = 0, 0.1, …, 1)
PATH_MARK_EVERY = 10
#: the C × C grid shows every class up to this many, else the chosen classes
MAX_FULL_GRID = 20
#: the default chosen classes: all up to this many, else 0, C/10, 2C/10, …
CHOSEN_CLASSES = 10
#: the boundary cloud's colour (the paper's light green) and marker (a triangle, so that it
#: stays apart from a green class's dots)
BOUNDARY_COLOUR = "lightgreen"
BOUNDARY_MARKER = "^"
#: images per generator / teacher call
CHUNK = 256
#: ``--samples`` of ``qimera figure pca``: at most this many per class and per boundary
#: cloud (the PCA of 4096 points per cloud is already dense; more only costs time)
MAX_SAMPLES = 4096
#: ``--per-class`` of ``qimera figure samples``: at most this many images in a row
MAX_PER_CLASS = 64

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class FigureError(ValueError):
    """Bad input of a figure command (a class or pair list, a run directory without a
    checkpoint or without a generator); the message says what to change."""


# -- the input: class and pair lists --------------------------------------------------------
def parse_classes(text: str) -> list[int]:
    """``"0,100,200"`` → ``[0, 100, 200]``; anything else is a :class:`FigureError`."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(t.isdigit() for t in items):
        raise FigureError(f"--classes {text!r}: expected class indices separated by commas, e.g. 0,100,200")
    classes = [int(t) for t in items]
    if len(set(classes)) != len(classes):
        raise FigureError(f"--classes {text!r}: a class is listed twice")
    return classes


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"0-1,1-2"`` → ``[(0, 1), (1, 2)]``; anything else is a :class:`FigureError`."""
    pairs = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split("-")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise FigureError(f"--pairs {text!r}: {item.strip()!r} is not a pair; expected A-B,C-D,... "
                              "with class indices, e.g. 0-1,1-2")
        a, b = int(parts[0]), int(parts[1])
        if a == b:
            raise FigureError(f"--pairs {text!r}: pair {a}-{b} names one class twice; a pair needs two classes")
        pairs.append((a, b))
    return pairs


def check_classes(classes: Sequence[int], num_classes: int, what: str = "--classes") -> None:
    """Every class must lie in 0..C−1."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise FigureError(f"{what}: class {bad[0]} is outside 0..{num_classes - 1} (the run's generator has "
                          f"{num_classes} classes)")


def default_pairs(num_classes: int) -> list[tuple[int, int]]:
    """The paper's nine adjacent pairs 0–1, …, 8–9 (fewer when there are fewer classes)."""
    return [(i, i + 1) for i in range(min(num_classes, CHOSEN_CLASSES) - 1)]


def default_classes(num_classes: int, limit: int = CHOSEN_CLASSES) -> list[int]:
    """All classes up to ``limit``, else ``0, C/limit, 2C/limit, …`` (the paper's ImageNet
    rows 0, 100, …, 900)."""
    if num_classes <= limit:
        return list(range(num_classes))
    return [i * num_classes // limit for i in range(limit)]


def grid_classes(num_classes: int, chosen: Sequence[int] | None = None) -> list[int]:
    """The classes of the C × C grid: all up to :data:`MAX_FULL_GRID`, else ``chosen``
    (default :func:`default_classes`)."""
    if num_classes <= MAX_FULL_GRID:
        return list(range(num_classes))
    return list(chosen) if chosen is not None else default_classes(num_classes)


def dataset_class_names(data_name: str, num_classes: int) -> list[str] | None:
    """Class names for labels where they are known for the dataset (CIFAR-10; ImageNet's
    1000, from torchvision's weights metadata); ``None`` means "label by index"."""
    if data_name == "cifar10" and num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    if data_name == "imagenet" and num_classes == 1000:
        try:
            from torchvision.models import ResNet18_Weights

            return [str(n) for n in ResNet18_Weights.IMAGENET1K_V1.meta["categories"]]
        except (ImportError, AttributeError, KeyError):
            return None
    return None


def class_labels(teacher_names: Sequence[str] | None, data_name: str, num_classes: int) -> list[str] | None:
    """The class names the figures label classes with: the teacher's
    (:attr:`qimera.teachers.LoadedTeacher.class_names`, or the pipeline's ``teacher.json``
    ``class_names``) where it has one per class, else :func:`dataset_class_names`;
    ``None`` means "label by index"."""
    if teacher_names is not None and len(teacher_names) == num_classes:
        return [str(n) for n in teacher_names]
    return dataset_class_names(data_name, num_classes)


def _label(c: int, class_names: Sequence[str] | None) -> str:
    return f"{c}: {class_names[c].split(',')[0]}" if class_names else str(c)


# -- generating and featurising ---------------------------------------------------------------
def concat_mixes(mixes: Sequence[ClassMix]) -> ClassMix:
    """One batch of several :class:`ClassMix` (same K)."""
    return ClassMix(torch.cat([m.labels for m in mixes]), torch.cat([m.lam for m in mixes]))


def plain_mix(classes: Sequence[int], per_class: int) -> ClassMix:
    """K = 1: ``per_class`` samples of each class, class-major."""
    labels = torch.tensor(list(classes), dtype=torch.long).repeat_interleave(per_class).view(-1, 1)
    return ClassMix(labels, torch.ones(labels.shape[0], 1))


def neutral_noise(generator: Generator, mix: ClassMix) -> torch.Tensor:
    """The generator's noise input that adds nothing to the embedding: zeros for ``add``,
    ones for ``multiply`` (GDFQ's ``E[c] ⊙ ε``, where zeros would erase the class)."""
    shape = (*mix.labels.shape, generator.embed_dim)
    fill = torch.zeros if generator.combine == "add" else torch.ones
    return fill(shape, device=mix.labels.device)


def training_lam(n: int, seed: int) -> torch.Tensor:
    """λ of the second class for ``n`` K = 2 samples, as training draws it:
    ``softmax(g)`` with ``g ~ N(0, I_2)``."""
    return mix_weights(n, 2, generator=torch.Generator().manual_seed(seed), device="cpu")[:, 1]


def generate(generator: Generator, mix: ClassMix, *, noise: torch.Tensor | None = None, seed: int = 0,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The generator's images of ``mix`` in eval mode, without gradients, on ``device``:
    ``noise`` as given (B, K, D) or drawn from a generator seeded with ``seed``."""
    device = torch.device(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    was_training = generator.training
    generator.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, mix.batch_size, CHUNK):
                part = slice(start, start + CHUNK)
                m = ClassMix(mix.labels[part].to(device), mix.lam[part].to(device))
                z = None if noise is None else noise[part].to(device)
                out.append(generator(m, z, generator=rng).float())
    finally:
        generator.train(was_training)
    return torch.cat(out)


def penultimate_features(model: nn.Module, images: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """The input of ``model``'s final classifier (:func:`qimera.teachers.find_classifier`)
    for ``images``, as (N, D) float on the CPU; a 1×1-conv head's input is averaged over
    its spatial positions."""
    from .teachers import find_classifier

    head = find_classifier(model, num_classes)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def hook(module, inputs):  # noqa: ARG001
        x = inputs[0].detach().float()
        captured.append((x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)).cpu())

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, len(images), CHUNK):
                model(images[start:start + CHUNK].to(device))
    finally:
        handle.remove()
    return torch.cat(captured)


# -- Figures 3 and 5: the PCA points ----------------------------------------------------------
@dataclass
class PcaPoints:
    """Every point of Figures 3 and 5, one row each.

    ``pair`` indexes ``pairs`` (−1: Figure 3, the PCA of all classes); ``kind`` is
    ``"class"``, ``"boundary"`` or ``"path"``; ``cls`` the class of a plain sample (−1
    otherwise); ``lam`` the weight of the pair's second class (0 or 1 for plain samples,
    NaN in Figure 3); ``mark`` the path's 10th-percentile dots. ``pca_mean`` and
    ``pca_components`` (one per pair, then Figure 3's) map a feature vector ``f`` to
    ``(f − mean) @ components.T``.
    """

    pairs: np.ndarray  # (P, 2) int
    pair: np.ndarray
    kind: np.ndarray
    cls: np.ndarray
    lam: np.ndarray
    mark: np.ndarray
    x: np.ndarray
    y: np.ndarray
    pca_mean: np.ndarray  # (P + 1, D)
    pca_components: np.ndarray  # (P + 1, 2, D)

    def save(self, path: str | Path) -> None:
        """Write all fields to one ``.npz`` (atomically)."""
        arrays = {k: getattr(self, k) for k in self.__dataclass_fields__}
        atomic_write(Path(path), lambda h: np.savez(h, **arrays), "wb")

    @classmethod
    def load(cls, path: str | Path) -> "PcaPoints":
        with np.load(path) as f:
            return cls(**{k: f[k] for k in cls.__dataclass_fields__})


def path_lam() -> torch.Tensor:
    """λ = 0, 0.01, …, 1 (:data:`PATH_STEPS` + 1 values)."""
    return torch.arange(PATH_STEPS + 1, dtype=torch.float64).div(PATH_STEPS).float()


def _fit_pca(clouds: np.ndarray):
    from sklearn.decomposition import PCA

    # ARPACK for the two leading components: deterministic with a fixed start and much
    # cheaper than a full SVD of (samples, D); it needs more than two samples and features
    solver = "arpack" if min(clouds.shape) > 2 else "full"
    return PCA(n_components=2, svd_solver=solver, random_state=0).fit(clouds)


def _rows(pair: int, kind: str, cls, lam, mark, xy: np.ndarray) -> dict[str, np.ndarray]:
    n = len(xy)
    return {"pair": np.full(n, pair), "kind": np.full(n, kind, dtype="<U8"),
            "cls": np.broadcast_to(np.asarray(cls), (n,)).astype(int),
            "lam": np.broadcast_to(np.asarray(lam, dtype=float), (n,)).astype(float),
            "mark": np.broadcast_to(np.asarray(mark, dtype=bool), (n,)).copy(), "x": xy[:, 0], "y": xy[:, 1]}


@dataclass
class Clouds:
    """Teacher features (float64) of the generated samples behind Figures 3 and 5."""

    plain: dict[int, np.ndarray]  # class -> (samples, D), K = 1 with noise
    boundary_lam: np.ndarray  # (P, samples): λ of each pair's second class
    boundary: np.ndarray  # (P, samples, D), K = 2 with noise
    path: np.ndarray  # (P, PATH_STEPS + 1, D), K = 2 without noise


def cloud_features(teacher, generator: Generator, pairs: Sequence[tuple[int, int]], classes: Sequence[int], *,
                   samples: int, seed: int, device: torch.device | str = "cpu") -> Clouds:
    """Generate the plain samples of ``classes`` and each pair's boundary samples and
    path (module docstring: λ, noise), and take the teacher's features of all of them."""
    def feats(mix: ClassMix, noise=None, salt: int = 0) -> np.ndarray:
        x = generate(generator, mix, noise=noise, seed=seed + salt, device=device)
        return penultimate_features(teacher.model, x, teacher.num_classes).numpy().astype(np.float64)

    plain = feats(plain_mix(classes, samples)).reshape(len(classes), samples, -1)
    lam_b = training_lam(samples * len(pairs), seed).view(len(pairs), samples)
    boundary = feats(concat_mixes([pair_mix(a, b, lam_b[i]) for i, (a, b) in enumerate(pairs)]), salt=1)
    path_mix = concat_mixes([pair_mix(a, b, path_lam()) for a, b in pairs])
    path = feats(path_mix, neutral_noise(generator, path_mix))
    return Clouds({k: plain[i] for i, k in enumerate(classes)}, lam_b.numpy(),
                  boundary.reshape(len(pairs), samples, -1), path.reshape(len(pairs), PATH_STEPS + 1, -1))


def _pair_rows(i: int, a: int, b: int, clouds: Clouds):
    """Figure 5's rows of pair ``i`` in its own PCA (fitted on the three clouds), and the PCA."""
    pca = _fit_pca(np.concatenate([clouds.plain[a], clouds.plain[b], clouds.boundary[i]]))
    marks = np.arange(PATH_STEPS + 1) % PATH_MARK_EVERY == 0
    rows = [_rows(i, "class", a, 0.0, False, pca.transform(clouds.plain[a])),
            _rows(i, "class", b, 1.0, False, pca.transform(clouds.plain[b])),
            _rows(i, "boundary", -1, clouds.boundary_lam[i], False, pca.transform(clouds.boundary[i])),
            _rows(i, "path", -1, path_lam().numpy(), marks, pca.transform(clouds.path[i]))]
    return rows, pca


def pca_points(teacher, generator: Generator, pairs: Sequence[tuple[int, int]], *, samples: int = 64,
               seed: int = 0, device: torch.device | str = "cpu", all_classes: Sequence[int] | None = None
               ) -> PcaPoints:
    """The points of Figure 5 (per pair: both class clouds, the boundary cloud and the
    no-noise path, in the pair's own 2-D PCA) and Figure 3 (plain samples of
    ``all_classes``, default every class up to :data:`MAX_FULL_GRID`, else the pairs'
    classes). ``teacher`` is a :class:`qimera.teachers.LoadedTeacher`; ``samples`` images
    per class and per boundary cloud."""
    if not pairs:
        raise FigureError("no class pair to draw")
    pair_classes = sorted({k for p in pairs for k in p})
    if all_classes is None:
        all_classes = range(teacher.num_classes) if teacher.num_classes <= MAX_FULL_GRID else pair_classes
    all_classes = list(all_classes)
    clouds = cloud_features(teacher, generator, pairs, sorted(set(all_classes) | set(pair_classes)),
                            samples=samples, seed=seed, device=device)
    rows, pcas = [], []
    for i, (a, b) in enumerate(pairs):
        pair_rows, pca = _pair_rows(i, a, b, clouds)
        rows += pair_rows
        pcas.append(pca)
    pcas.append(_fit_pca(np.concatenate([clouds.plain[k] for k in all_classes])))
    rows += [_rows(-1, "class", k, math.nan, False, pcas[-1].transform(clouds.plain[k])) for k in all_classes]
    table = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    return PcaPoints(pairs=np.asarray(pairs, dtype=int).reshape(-1, 2), **table,
                     pca_mean=np.stack([p.mean_ for p in pcas]),
                     pca_components=np.stack([p.components_ for p in pcas]))


# -- Figure 6: image grids --------------------------------------------------------------------
def tile(x: torch.Tensor, mean, std, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """Images ``x`` (N ≤ rows·cols, C, H, W) in the normalised input space as one float
    array (rows·(H+pad)−pad, cols·(W+pad)−pad, C) in [0, 1]: de-normalised with ``mean``
    and ``std``, row-major cells separated by ``pad`` white pixels, missing cells white."""
    x = x.detach().float().cpu()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    x = torch.cat([x, x.new_ones((rows * cols - len(x), *x.shape[1:]))])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=1.0)  # white lines between cells
    c, h, w = x.shape[1:]
    grid = x.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return grid[: rows * h - pad, : cols * w - pad].numpy()


def image_grid(images: torch.Tensor, mean, std, *, cols: int = 8, pad: int = 1) -> np.ndarray:
    """``images`` (N, C, H, W, normalised as the teacher's inputs) as a grid of ``cols``
    columns, in the form :func:`tile` returns."""
    cols = max(1, min(cols, len(images)))
    return tile(images, mean, std, math.ceil(len(images) / cols), cols, pad)


def sample_grid(generator: Generator, classes: Sequence[int], mean, std, *, lam: float = 0.5, seed: int = 0,
                device: torch.device | str = "cpu", pad: int = 1) -> np.ndarray:
    """Figure 6a/d: cell (i, j) is the generator's image of the superposition of class
    ``classes[i]`` and ``classes[j]`` (K = 2, λ = ``lam``); the diagonal shows plain
    classes. Returns :func:`tile`'s array, ``len(classes)`` cells square."""
    n = len(classes)
    lam_t = torch.tensor([lam])
    mix = concat_mixes([pair_mix(ci, cj, lam_t) for ci in classes for cj in classes])
    return tile(generate(generator, mix, seed=seed, device=device), mean, std, n, n, pad)


def class_rows(generator: Generator, classes: Sequence[int], mean, std, *, per_class: int = 8, seed: int = 0,
               device: torch.device | str = "cpu", pad: int = 1) -> np.ndarray:
    """Figure 6c: one row of ``per_class`` plain (K = 1) samples per class."""
    x = generate(generator, plain_mix(classes, per_class), seed=seed, device=device)
    return tile(x, mean, std, len(classes), per_class, pad)


# -- drawing (matplotlib, without pyplot's global state) --------------------------------------
def new_figure(**kwargs):
    """A matplotlib Figure not registered with pyplot (no backend switch, nothing to close)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise FigureError(matplotlib_missing()) from None
    return Figure(**kwargs)


def matplotlib_missing() -> str:
    return "drawing figures needs matplotlib: pip install matplotlib (or the extra: pip install 'qimera[pipeline]')"


def require_matplotlib() -> None:
    """Raise :class:`FigureError` now, before any work, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FigureError(matplotlib_missing()) from None


def save_png(path: str | Path, fig) -> None:
    """Write ``fig`` as a PNG atomically."""
    atomic_write(Path(path), lambda h: fig.savefig(h, format="png"), "wb")


def _show(ax, grid: np.ndarray) -> None:
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")


def save_sample_grid(path: str | Path, grid: np.ndarray, classes: Sequence[int],
                     class_names: Sequence[str] | None = None, *, lam: float = 0.5, pad: int = 1,
                     title: str | None = None) -> None:
    """A :func:`sample_grid` with its classes on both axes."""
    n = len(classes)
    cell = (grid.shape[0] + pad) / n  # pixels per cell, separator included
    names = [_label(c, class_names) for c in classes]
    side = 1.0 + 0.9 * n + (1.0 if class_names else 0.0)
    fig = new_figure(figsize=(side, side), dpi=max(100, min(int(cell), 160)))
    ax = fig.subplots()
    _show(ax, grid)
    ticks = [cell * i + (cell - pad) / 2 for i in range(n)]
    ax.set_xticks(ticks, names, rotation=90 if class_names else 0)
    ax.set_yticks(ticks, names)
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title(title or f"generated samples: superposition of class i and class j (K=2, λ={lam})", fontsize=9)
    fig.tight_layout()
    save_png(path, fig)


def save_class_rows(path: str | Path, grid: np.ndarray, classes: Sequence[int],
                    class_names: Sequence[str] | None = None, *, pad: int = 1) -> None:
    """A :func:`class_rows` grid with each row's class on the left."""
    n = len(classes)
    cell = (grid.shape[0] + pad) / n
    cols = round((grid.shape[1] + pad) / cell)
    label_width = 1.5 if class_names else 0.0  # room for "200: Tibetan terrier"
    fig = new_figure(figsize=(2.0 + label_width + 0.9 * cols, 1.0 + 0.9 * n), dpi=max(100, min(int(cell), 160)))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_xticks([])
    ax.set_yticks([cell * i + (cell - pad) / 2 for i in range(n)], [_label(c, class_names) for c in classes])
    ax.tick_params(length=0, labelsize=8)
    ax.set_title("generated samples per class (K=1)", fontsize=9)
    fig.tight_layout()
    save_png(path, fig)


def save_images(path: str | Path, grid: np.ndarray, title: str) -> None:
    """An :func:`image_grid` with a title, no axes."""
    height, width = grid.shape[:2]
    scale = 6.0 / max(height, width)
    fig = new_figure(figsize=(max(4.0, width * scale), 0.8 + height * scale), dpi=100)
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    save_png(path, fig)


def class_colours(classes: Sequence[int]) -> dict[int, tuple]:
    """One colour per class, the same in every panel: tab10 up to 10 classes, tab20 up to
    20, else evenly spaced hues."""
    from matplotlib import colormaps

    classes = sorted(set(classes))
    name = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "hsv"
    cmap = colormaps[name]
    if name == "hsv":
        return {c: cmap(i / len(classes)) for i, c in enumerate(classes)}
    return {c: cmap(i) for i, c in enumerate(classes)}


def _colours_of(pts: PcaPoints) -> dict[int, tuple]:
    """:func:`class_colours` over every class in ``pts``, so that Figures 3 and 5 agree."""
    return class_colours(pts.cls[pts.kind == "class"].tolist())


def _panel(ax, pts: PcaPoints, i: int, colours, class_names) -> None:
    sel = pts.pair == i
    a, b = (int(v) for v in pts.pairs[i])
    bnd = sel & (pts.kind == "boundary")
    ax.scatter(pts.x[bnd], pts.y[bnd], s=9, c=BOUNDARY_COLOUR, marker=BOUNDARY_MARKER, alpha=0.8, linewidths=0)
    for c in (a, b):
        m = sel & (pts.kind == "class") & (pts.cls == c)
        ax.scatter(pts.x[m], pts.y[m], s=6, color=colours[c], alpha=0.8, linewidths=0)
    path = sel & (pts.kind == "path")
    ax.plot(pts.x[path], pts.y[path], color="black", linewidth=0.6)
    ax.scatter(pts.x[path], pts.y[path], s=3, c="black", linewidths=0)
    ax.scatter(pts.x[path & pts.mark], pts.y[path & pts.mark], s=22, c="black", linewidths=0)
    ax.margins(0.08)  # the path's larger dots stay inside the frame
    ax.set_title(f"class {_label(a, class_names)} – {_label(b, class_names)}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def save_pca_pairs(path: str | Path, pts: PcaPoints, class_names: Sequence[str] | None = None) -> None:
    """Figure 5: one panel per pair (3 × 3 for nine), each in its own PCA."""
    from matplotlib.lines import Line2D

    n = len(pts.pairs)
    cols = min(3, n) if n <= 9 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    height = 3.2 * rows + 0.7  # the panels and the legend below them
    fig = new_figure(figsize=(3.2 * cols, height), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours = _colours_of(pts)
    for i in range(n):
        _panel(axes[i], pts, i, colours, class_names)
    for ax in axes[n:]:
        ax.set_axis_off()
    dot = dict(marker="o", linestyle="", markersize=5)
    handles = [Line2D([], [], color=colours[c], label=_label(c, class_names), **dot)
               for c in sorted(set(pts.pairs.ravel().tolist()))]
    handles += [Line2D([], [], color=BOUNDARY_COLOUR, label="boundary (K=2)", **{**dot, "marker": BOUNDARY_MARKER}),
                Line2D([], [], color="black", marker="o", markersize=5, linewidth=0.6,
                       label="path λ 0→1, no noise (large: every 0.1)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle("teacher's penultimate features of generated samples, PCA per class pair", fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1 - 0.35 / height))
    save_png(path, fig)


def save_pca_all(path: str | Path, pts: PcaPoints, class_names: Sequence[str] | None = None) -> None:
    """Figure 3: plain samples of all classes in one PCA, coloured by class (the colours
    of :func:`save_pca_pairs`)."""
    sel = pts.pair == -1
    classes = sorted(set(pts.cls[sel].tolist()))
    colours = _colours_of(pts)
    fig = new_figure(figsize=(6.5, 5.5), dpi=100)
    ax = fig.subplots()
    for c in classes:
        m = sel & (pts.cls == c)
        ax.scatter(pts.x[m], pts.y[m], s=8, color=colours[c], alpha=0.8, linewidths=0, label=_label(c, class_names))
    ax.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("teacher's penultimate features of generated samples (K=1), PCA of all classes", fontsize=9)
    fig.tight_layout()
    save_png(path, fig)


# -- a run directory --------------------------------------------------------------------------
@dataclass
class RunFigures:
    """What a figure needs from a trained run: its config, checkpoint and class count."""

    run_dir: Path
    cfg: object  # qimera.config.Config
    state: dict
    num_classes: int
    #: the ``--config`` file the config came from (None: the checkpoint's own)
    config_file: str | Path | None = None

    def load(self, device: torch.device):
        """The run's teacher (:func:`qimera.teachers.load_teacher`) and its generator with
        the checkpoint's weights, both on ``device``; a config whose generator does not fit
        the checkpoint's is a :class:`FigureError`."""
        from .generators import build_generator
        from .teachers import load_teacher
        from .trainer import checkpoint_file

        teacher = load_teacher(self.cfg.teacher)
        generator = build_generator(self.cfg, teacher)
        try:
            generator.load_state_dict(self.state["generator"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            what = (f"--config {str(self.config_file)!r}" if self.config_file is not None
                    else f"the config in {str(checkpoint_file(self.run_dir))!r}")
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = first if len(first) <= 160 else first[:159] + "…"
            raise FigureError(f"{what} does not describe the run's generator ({first}); give the config the run "
                              "was trained with") from None
        teacher.model.to(device)
        return teacher, generator.to(device)


def figure_device(name: str) -> torch.device:
    """``--device`` (auto, cpu, cuda, ...) as a device, or a :class:`FigureError`."""
    from .trainer import resolve_device

    try:
        return resolve_device(str(name))
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        if text.startswith("train.device="):  # resolve_device names the config key
            text = text.split(": ", 1)[-1]
        raise FigureError(f"--device {name!r}: {text}") from None


def open_run(run_dir: str | Path, config: str | Path | None = None) -> RunFigures:
    """Check that ``run_dir`` is a trained run with a generator, and read its config (the
    checkpoint's, or ``config``) and checkpoint; cheap, so that bad input stops before any
    work."""
    from .baselines import CALIBRATION_METHODS
    from .config import load_config
    from .trainer import CHECKPOINT_NAME, read_checkpoint

    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        method = _summary_method(run_dir)
        if method in CALIBRATION_METHODS:
            raise FigureError(_no_generator(run_dir, method))
        where = "is not a directory" if not run_dir.is_dir() else f"has no {CHECKPOINT_NAME}"
        raise FigureError(f"run directory {str(run_dir)!r} {where}: give the train.out_dir of a "
                          "`qimera run` (or the pipeline's outputs/train)")
    try:
        state = read_checkpoint(run_dir, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input here
        raise FigureError(f"{str(ckpt)!r} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "generator" not in state:
        raise FigureError(f"{str(ckpt)!r} is not a qimera checkpoint")
    if config is not None:
        cfg = load_config(config)
    elif isinstance(state.get("config"), dict):
        cfg = load_config(state["config"])
    else:
        raise FigureError(f"{str(ckpt)!r} holds no config: pass the run's config with --config FILE")
    if cfg.method in CALIBRATION_METHODS or state["generator"] is None:
        raise FigureError(_no_generator(run_dir, cfg.method))
    try:
        num_classes = int(state["generator"]["embedding.weight"].shape[0])
    except (KeyError, TypeError, AttributeError, IndexError):
        raise FigureError(f"{str(ckpt)!r} is not a qimera checkpoint (its generator has no class embedding)") from None
    return RunFigures(run_dir, cfg, state, num_classes, config)


def _summary_method(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def _no_generator(run_dir: Path, method: str | None) -> str:
    return (f"run {str(run_dir)!r} (method {method}) has no generator: the figures need a qimera or gdfq run "
            "(zeroq and naive only calibrate activation ranges)")


def _out_dir(run: RunFigures, out: str | Path | None) -> Path:
    """Where the figures go, checked (it can be created and written) but not created:
    :func:`_writing` creates it when there is something to write."""
    from .config import ConfigError, probe_out_dir

    path = Path(out) if out is not None else run.run_dir / "figures"
    try:
        probe_out_dir(path, "--out")
    except ConfigError as exc:
        raise FigureError(str(exc)) from None
    return path


@contextmanager
def _writing(folder: Path, paths: Sequence[Path]):
    """Create ``folder`` for the block's files ``paths`` (each written whole, or not at
    all); when the block fails or is interrupted, the ones it added are removed again, and
    the directories this made if they are then empty: no half set of figures is left."""
    from .config import ConfigError, create_out_dir, remove_created_dirs

    try:
        created = create_out_dir(folder, "--out")
    except ConfigError as exc:
        raise FigureError(str(exc)) from None
    new = [p for p in paths if not p.exists()]
    try:
        yield folder
    except BaseException:
        for p in new:
            p.unlink(missing_ok=True)
        remove_created_dirs(created)
        raise


def pca_figures(run_dir: str | Path, pairs: Sequence[tuple[int, int]] | None = None, *,
                out: str | Path | None = None, config: str | Path | None = None, samples: int = 64,
                seed: int | None = None, device: str = "auto") -> list[Path]:
    """``qimera figure pca``: Figure 5 (``pca_pairs.png``), Figure 3 (``pca_all.png``) and
    their points (``pca_points.npz``, :class:`PcaPoints`) into ``out`` (default
    ``RUN_DIR/figures``). ``seed`` defaults to the run's ``train.seed``."""
    if not 2 <= samples <= MAX_SAMPLES:
        raise FigureError(f"--samples {samples}: need at least 2 samples per cloud for a PCA" if samples < 2
                          else f"--samples {samples}: at most {MAX_SAMPLES} samples per class and per cloud")
    require_matplotlib()
    run = open_run(run_dir, config)
    pairs = list(pairs) if pairs is not None else default_pairs(run.num_classes)
    check_classes([c for p in pairs for c in p], run.num_classes, "--pairs")
    if not pairs:
        raise FigureError("--pairs: the run has one class, there is no pair to draw")
    dev = figure_device(device)
    folder = _out_dir(run, out)
    teacher, generator = run.load(dev)
    pts = pca_points(teacher, generator, pairs, samples=samples,
                     seed=run.cfg.train.seed if seed is None else seed, device=dev)
    names = class_labels(teacher.class_names, run.cfg.data.name, run.num_classes)
    paths = [folder / "pca_pairs.png", folder / "pca_all.png", folder / "pca_points.npz"]
    with _writing(folder, paths):
        save_pca_pairs(paths[0], pts, names)
        save_pca_all(paths[1], pts, names)
        pts.save(paths[2])
    return paths


def sample_figures(run_dir: str | Path, classes: Sequence[int] | None = None, *, out: str | Path | None = None,
                   config: str | Path | None = None, per_class: int = 8, seed: int | None = None,
                   device: str = "auto") -> list[Path]:
    """``qimera figure samples``: Figure 6a (``samples_grid.png``, the C × C grid, or the
    chosen classes' when C > :data:`MAX_FULL_GRID`), 6c (``samples_rows.png``, plain
    samples of the chosen classes), 6d (``samples_boundary.png``, the chosen classes' K = 2,
    λ = 0.5 grid) and the three arrays (``samples.npz``) into ``out``."""
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise FigureError(f"--per-class {per_class}: expected 1 to {MAX_PER_CLASS} samples per row")
    require_matplotlib()
    run = open_run(run_dir, config)
    if classes is not None:
        check_classes(classes, run.num_classes)
    chosen = list(classes) if classes is not None else default_classes(run.num_classes)
    full = grid_classes(run.num_classes, chosen)
    dev = figure_device(device)
    folder = _out_dir(run, out)
    teacher, generator = run.load(dev)
    seed = run.cfg.train.seed if seed is None else seed
    m, s = teacher.mean, teacher.std
    grid = sample_grid(generator, full, m, s, seed=seed, device=dev)
    rows = class_rows(generator, chosen, m, s, per_class=per_class, seed=seed, device=dev)
    boundary = sample_grid(generator, chosen, m, s, seed=seed, device=dev)
    names = class_labels(teacher.class_names, run.cfg.data.name, run.num_classes)
    paths = [folder / "samples_grid.png", folder / "samples_rows.png", folder / "samples_boundary.png",
             folder / "samples.npz"]
    arrays = {"grid": grid, "grid_classes": np.asarray(full), "rows": rows, "boundary": boundary,
              "classes": np.asarray(chosen)}
    with _writing(folder, paths):
        save_sample_grid(paths[0], grid, full, names)
        save_class_rows(paths[1], rows, chosen, names)
        save_sample_grid(paths[2], boundary, chosen, names,
                         title="boundary supporting samples of the chosen classes (K=2, λ=0.5)")
        atomic_write(paths[3], lambda h: np.savez(h, **arrays), "wb")
    return paths
