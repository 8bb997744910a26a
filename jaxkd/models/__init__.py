"""Model zoo: ImageNet-style ResNets and MobileNetV3s, the CIFAR families, attention modules.

    from jaxkd import models
    model = models.create("mobilenet_v3_large_eca", num_classes=101)
    variables = model.init(jax.random.key(0), images)    # images: float [B, H, W, 3]
    logits = model.apply(variables, images)              # [B, 101] float32
    # features: stage1..stageN, embedding
    logits, feats = model.apply(variables, images, return_features=True)
    # {'params', 'macs', 'flops', 'xla_macs'}
    models.cost("resnet50", image_size=224, num_classes=1000)
    variables = models.load_pretrained("resnet50", "resnet50.safetensors", num_classes=101)

Every model builds its convolution and BatchNorm constructors once per call and hands them to
its blocks (`jaxkd.models.layers`, which also holds the PyTorch initialisers all models use).
"""
from __future__ import annotations

from typing import Any

# imported for their registrations: the CIFAR models, mobilenet_v3_*, resnet18/34/50/101
from jaxkd.models import cifar, mobilenetv3, resnet  # noqa: F401
from jaxkd.models.cost import cost
from jaxkd.models.registry import create, names

__all__ = ["create", "names", "cost", "load_pretrained"]


def load_pretrained(name: str, path: str, *, num_classes: int, **kwargs: Any) -> Any:
  """Flax variables of model `name` from a torchvision checkpoint at `path`
  (see `jaxkd.models.convert`)."""
  from jaxkd.models import convert  # lazy: conversion code is only needed when loading weights
  return convert.load_pretrained(name, path, num_classes=num_classes, **kwargs)
