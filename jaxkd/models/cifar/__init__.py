"""CIFAR teacher/student families of the CRD and DKD papers (mdistiller definitions).

Importing this package registers: resnet8/14/20/32/44/56/110, resnet8x4,
resnet32x4, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg13 (BN variants),
mobilenetv2 (mdistiller's `mobile_half`), shufflenetv1, shufflenetv2.
Build one with `jaxkd.models.registry.create(name, num_classes=100)`.
"""
from __future__ import annotations

from jaxkd.models.cifar import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
