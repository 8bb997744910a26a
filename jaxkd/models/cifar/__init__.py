"""CIFAR teacher/student families of the CRD and DKD papers (mdistiller definitions).

CRD: Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020.
DKD: Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR 2022.

Importing this package registers: resnet8/14/20/32/44/56/110, resnet8x4,
resnet32x4, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg13 (BN variants),
mobilenetv2 (mdistiller's `mobile_half`), shufflenetv1, shufflenetv2.
Build one with `jaxkd.models.registry.create(name, num_classes=100)`.

As the ImageNet models, each network builds its convolution and BatchNorm
constructors once per call (`conv`, `norm`, and `depthwise_conv` where it has
depthwise layers; see `jaxkd.models.layers`) and hands them to its blocks.
"""
from __future__ import annotations

from jaxkd.models.cifar import (  # noqa: F401
    mobilenetv2,
    resnet,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
