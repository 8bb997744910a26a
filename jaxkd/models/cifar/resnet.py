"""CIFAR ResNets (He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, Sec. 4.2) as in CRD/mdistiller.

Depth 6n + 2: a 3x3 stem conv (widths[0] channels), three stages of n basic
blocks with widths[1..3] channels at 32, 16, 8 pixels (the first block of
stages 2 and 3 has stride 2), global average pooling and a linear classifier.
A basic block is relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); the
shortcut is the identity, or a 1x1 conv + BN projection when the stride or the
channel count changes (He et al.'s option B). resnet8x4/32x4 have a 32-channel
stem and a 64-channel stage 1, so their first block projects too.

Features: `stage1..stage3` are the post-ReLU outputs of the three stages
(mdistiller's `feats[1:]`; its pre-ReLU `preact_feats` are not returned),
`embedding` is the pooled vector fed to the classifier.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.cifar.common import classifier_head
from jaxkd.models.layers import ModuleDef
from jaxkd.models.registry import register


class BasicBlock(nn.Module):
  """y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x)).

  `conv` and `norm` are the network's constructors (`layers.conv`, `layers.batch_norm` partials).
  """
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.planes, 3, strides=self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.planes, 3, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      shortcut = self.conv(self.planes, 1, strides=self.strides, name="downsample_conv")(x)
      shortcut = self.norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """CIFAR ResNet of depth 6n + 2 with channel widths (stem, stage1, stage2, stage3)."""
  depth: int
  widths: Sequence[int]
  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), "
                       f"got {self.depth}")
    if len(self.widths) != 4:
      raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got {self.widths}")
    conv = functools.partial(layers.conv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    blocks_per_stage = (self.depth - 2) // 6
    x = x.astype(self.dtype)
    x = conv(self.widths[0], 3, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    features = {}
    for stage, planes in enumerate(self.widths[1:], start=1):
      for i in range(blocks_per_stage):
        strides = 2 if (stage > 1 and i == 0) else 1
        x = BasicBlock(planes, conv=conv, norm=norm, strides=strides,
                       name=f"layer{stage}_{i}")(x)
      features[f"stage{stage}"] = x
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype, name="fc",
                           kernel_init=layers.torch_kernel_init, torch_default_bias=True,
                           return_features=return_features)


_NARROW = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def _register(name: str, depth: int, widths: Sequence[int]) -> None:
  def factory(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarResNet:
    return CifarResNet(depth=depth, widths=tuple(widths), num_classes=num_classes, dtype=dtype,
                       **kwargs)

  factory.__name__ = name
  factory.__doc__ = f"mdistiller `{name}`: CIFAR ResNet depth {depth}, widths {tuple(widths)}."
  register(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  _register(f"resnet{_depth}", _depth, _NARROW)
_register("resnet8x4", 8, _X4)
_register("resnet32x4", 32, _X4)
