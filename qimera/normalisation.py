"""Per-channel input normalisation constants, for pixels scaled to ``[0, 1]``: the one place
they are written down. Teachers (:mod:`qimera.teachers`), evaluation data
(:mod:`qimera.data`) and the demo CNN (:mod:`qimera.models.digits_cnn`) import them from here.
"""

from __future__ import annotations

Stats = tuple[float, ...]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2557, 0.2761)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Mean of the digits training split (:mod:`qimera.models.digits_cnn`) after scaling
#: pixels to ``[0, 1]`` (``/16``), computed once and written down.
DIGITS_MEAN: tuple[float] = (0.3056,)
#: Standard deviation of the digits training split after scaling to ``[0, 1]``.
DIGITS_STD: tuple[float] = (0.3761,)
