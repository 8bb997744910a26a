"""ShuffleNet V2 1.0x for CIFAR (Ma, Zhang, Zheng and Sun, "ShuffleNet V2: Practical Guidelines
for Efficient CNN Architecture Design", ECCV 2018) as CRD/mdistiller's `ShuffleV2`.

Stem: 1x1 conv 3 -> 24 + BN + ReLU at full 32x32 resolution (no stride, no
max pool). Three stages with widths (116, 232, 464); each is one down-sampling
unit followed by (3, 7, 3) basic units. Head: 1x1 conv 464 -> 1024 + BN +
ReLU, global average pooling, linear classifier.

Basic unit (c channels): split into x1 = first c/2 channels, x2 = the rest;
  b = relu(BN(conv1x1(BN(dw3x3(relu(BN(conv1x1(x2))))))))
  out = shuffle_2(concat[x1, b]).
Down-sampling unit (in -> o channels, m = o // 2):
  left  = relu(BN(conv1x1_m(BN(dw3x3_s2(x)))))
  right = relu(BN(conv1x1_m(BN(dw3x3_s2(relu(BN(conv1x1_m(x))))))))
  out = shuffle_2(concat[left, right]).

Features: `stage1..stage3` are the stage outputs (mdistiller's `feats[1:]`),
16x16x116, 8x8x232, 4x4x464 at 32x32; `embedding` is the pooled 1024-d vector
after the head conv.
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


class ShuffleV2BasicUnit(nn.Module):
  """Stride-1 ShuffleNet V2 unit with a 50/50 channel split.

  `conv`, `depthwise_conv` and `norm` are the network's constructors (`layers.conv`,
  `layers.DepthwiseConv`, `layers.batch_norm` partials).
  """
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % 2:
      raise ValueError(f"ShuffleV2BasicUnit needs an even channel count, got {channels}")
    half = channels // 2
    x1, x2 = x[..., :half], x[..., half:]
    b = self.conv(half, 1, name="conv1")(x2)
    b = nn.relu(self.norm(name="bn1")(b))
    b = self.depthwise_conv(3, name="conv2")(b)
    b = self.norm(name="bn2")(b)
    b = self.conv(half, 1, name="conv3")(b)
    b = nn.relu(self.norm(name="bn3")(b))
    return channel_shuffle(jnp.concatenate([x1, b], axis=-1), 2)


class ShuffleV2DownUnit(nn.Module):
  """Stride-2 ShuffleNet V2 unit: two branches of `out_channels // 2` each; `conv`,
  `depthwise_conv` and `norm` as in ShuffleV2BasicUnit."""
  out_channels: int
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mid = self.out_channels // 2
    left = self.depthwise_conv(3, strides=2, name="conv1")(x)
    left = self.norm(name="bn1")(left)
    left = nn.relu(self.norm(name="bn2")(self.conv(mid, 1, name="conv2")(left)))
    right = nn.relu(self.norm(name="bn3")(self.conv(mid, 1, name="conv3")(x)))
    right = self.norm(name="bn4")(self.depthwise_conv(3, strides=2, name="conv4")(right))
    right = nn.relu(self.norm(name="bn5")(self.conv(mid, 1, name="conv5")(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class CifarShuffleNetV2(nn.Module):
  """ShuffleNet V2 for 32x32 inputs; `out_channels` = three stage widths + head width."""
  num_classes: int
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    conv = functools.partial(layers.conv, kernel_init=layers.torch_kernel_init, dtype=self.dtype)
    depthwise_conv = functools.partial(DepthwiseConv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    units = dict(conv=conv, depthwise_conv=depthwise_conv, norm=norm)
    x = x.astype(self.dtype)
    x = nn.relu(norm(name="bn1")(conv(24, 1, name="conv1")(x)))
    features = {}
    for stage, (width, blocks) in enumerate(zip(self.out_channels[:3], self.num_blocks), start=1):
      x = ShuffleV2DownUnit(width, name=f"layer{stage}_0", **units)(x)
      for i in range(1, blocks + 1):
        x = ShuffleV2BasicUnit(name=f"layer{stage}_{i}", **units)(x)
      features[f"stage{stage}"] = x
    x = nn.relu(norm(name="bn2")(conv(self.out_channels[3], 1, name="conv2")(x)))
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype,
                           name="linear", kernel_init=layers.torch_kernel_init,
                           torch_default_bias=True, return_features=return_features)


@register("shufflenetv2")
def shufflenetv2(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarShuffleNetV2:
  """mdistiller `ShuffleV2` (net size 1.0): widths (116, 232, 464, 1024), blocks (3, 7, 3)."""
  return CifarShuffleNetV2(num_classes=num_classes, dtype=dtype, **kwargs)
