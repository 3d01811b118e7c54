"""Locations of the shared offline data and constants used by several test modules."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_TEACHER = SHARED / "teachers" / "resnet20-cifar10-optionA.th"
SHARED_NPZ = SHARED / "data" / "cifar10-test-jpeg-q75.npz"
R20_ARCH = "qimera.models.cifar_resnet:resnet20"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: skip marker for tests that need the shared ResNet-20 and CIFAR-10 npz
needs_shared = pytest.mark.skipif(
    not (SHARED_TEACHER.is_file() and SHARED_NPZ.is_file()),
    reason="shared ResNet-20 teacher or CIFAR-10 npz not present (../shared)")


def shared_r20_config(out_dir) -> dict:
    """A 4w4a config of the shared ResNet-20 teacher evaluated on the shared npz."""
    return {
        "teacher": {"source": "checkpoint", "arch": R20_ARCH, "weights": str(SHARED_TEACHER), "num_classes": 10,
                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "data": {"name": "npz", "path": str(SHARED_NPZ)},
        "quant": {"w_bits": 4, "a_bits": 4},
        "train": {"out_dir": str(out_dir)},
    }
