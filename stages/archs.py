"""Architectures that the workspace teacher (``outputs/teacher/weights.pt``) is rebuilt with
when no plain ``module:callable`` of the zoo builds the same network."""

from __future__ import annotations


def inception_v3(num_classes: int = 1000):
    """torchvision's Inception-v3 as its pretrained weights expect it (aux head, input
    transform), randomly initialised: the weights come from the workspace file."""
    from torchvision.models import inception_v3 as build

    return build(weights=None, aux_logits=True, transform_input=True, init_weights=False,
                 num_classes=num_classes)
