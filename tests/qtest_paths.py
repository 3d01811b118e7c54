"""Locations of the shared offline data and constants used by several test modules."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_TEACHER = SHARED / "teachers" / "resnet20-cifar10-optionA.th"
SHARED_NPZ = SHARED / "data" / "cifar10-test-jpeg-q75.npz"
R20_ARCH = "qimera.models.cifar_resnet:resnet20"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
