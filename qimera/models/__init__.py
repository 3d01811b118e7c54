"""Model definitions used as teachers.

* :mod:`qimera.models.cifar_resnet`: CIFAR ResNet-20/32/44/56 with option-A shortcuts.
* :mod:`qimera.models.digits_cnn`: the offline demo teacher (imported on demand, so that
  importing this package stays light).
"""

from qimera.models.cifar_resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56"]
