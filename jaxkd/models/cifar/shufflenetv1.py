"""ShuffleNet V1 for CIFAR (Zhang, Zhou, Lin and Sun, "ShuffleNet: An Extremely Efficient
Convolutional Neural Network for Mobile Devices", CVPR 2018) as CRD/mdistiller's `ShuffleV1`.

Groups g = 3, stage widths (240, 480, 960), blocks (4, 8, 4). Stem: 1x1 conv
3 -> 24 + BN + ReLU at full 32x32 resolution (no stride, no max pool). A unit
with output width o and bottleneck width m = o // 4:
  y = BN(gconv1x1_g(shuffle_g1(relu(BN(gconv1x1_g1(x)))) -> relu(BN(dw3x3_s(.)))))
where g1 = 1 for the very first unit (24 input channels) and g otherwise.
  stride 1: out = relu(y + x)
  stride 2: out = relu(concat[y, avgpool3x3_s2_p1(x)])  (y has o - in channels)
The first unit of every stage has stride 2. The shortcut average pool counts
the zero padding in its divisor (PyTorch AvgPool2d's count_include_pad=True).
Global average pooling and a linear classifier follow.

Features: `stage1..stage3` are the post-ReLU stage outputs (mdistiller's
`feats[1:]`), 16x16x240, 8x8x480, 4x4x960 at 32x32; `embedding` the pooled
960-d vector.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.cifar.common import channel_shuffle, classifier_head
from jaxkd.models.layers import DepthwiseConv, ModuleDef
from jaxkd.models.registry import register

_STEM_CHANNELS = 24


def avg_pool_3x3_s2_include_pad(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 2, 1 pixel of zero padding counted in the divisor (always / 9)."""
  return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


class ShuffleV1Unit(nn.Module):
  """ShuffleNet V1 unit (see module docstring); `out_planes` excludes the concatenated shortcut.

  `conv`, `depthwise_conv` and `norm` are the network's constructors (`layers.conv`,
  `layers.DepthwiseConv`, `layers.batch_norm` partials).
  """
  out_planes: int
  strides: int
  groups: int
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_planes = x.shape[-1]
    mid_planes = self.out_planes // 4
    first_groups = 1 if in_planes == _STEM_CHANNELS else self.groups
    y = self.conv(mid_planes, 1, groups=first_groups, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = channel_shuffle(y, first_groups)
    y = self.depthwise_conv(3, strides=self.strides, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.out_planes, 1, groups=self.groups, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.strides == 2:
      return nn.relu(jnp.concatenate([y, avg_pool_3x3_s2_include_pad(x)], axis=-1))
    return nn.relu(y + x)


class CifarShuffleNetV1(nn.Module):
  """ShuffleNet V1 (g groups) for 32x32 inputs."""
  num_classes: int
  out_planes: Sequence[int] = (240, 480, 960)
  num_blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    conv = functools.partial(layers.conv, kernel_init=layers.torch_kernel_init, dtype=self.dtype)
    depthwise_conv = functools.partial(DepthwiseConv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(_STEM_CHANNELS, 1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    features = {}
    for stage, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
      for i in range(blocks):
        concat_planes = x.shape[-1] if i == 0 else 0
        x = ShuffleV1Unit(planes - concat_planes, 2 if i == 0 else 1, self.groups, conv=conv,
                          depthwise_conv=depthwise_conv, norm=norm, name=f"layer{stage}_{i}")(x)
      features[f"stage{stage}"] = x
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype,
                           name="linear", kernel_init=layers.torch_kernel_init,
                           torch_default_bias=True, return_features=return_features)


@register("shufflenetv1")
def shufflenetv1(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarShuffleNetV1:
  """mdistiller `ShuffleV1`: g = 3, widths (240, 480, 960), blocks (4, 8, 4)."""
  return CifarShuffleNetV1(num_classes=num_classes, dtype=dtype, **kwargs)
