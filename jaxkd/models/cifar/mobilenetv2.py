"""MobileNetV2 for CIFAR (Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", CVPR 2018) as CRD/mdistiller's `mobile_half`.

Expansion t = 6, width multiplier 0.5. Stem: 3x3 stride-2 conv to int(32w)
channels + BN + ReLU (so 32x32 inputs become 16x16). Then the inverted
residual stages (t, c, n, s):
  (1, 16, 1, 1) (t, 24, 2, 1) (t, 32, 3, 2) (t, 64, 4, 2) (t, 96, 3, 1) (t, 160, 3, 2)
  (t, 320, 1, 1)
with c scaled to int(c * w). An inverted residual block is
  1x1 conv to in*t + BN + ReLU -> 3x3 depthwise (stride s) + BN + ReLU -> 1x1 conv to c + BN
plus the input when s == 1 and in == c. Unlike torchvision, the expansion 1x1
conv is present even for t = 1, and the activation is ReLU (not ReLU6), as in
mdistiller. Head: 1x1 conv to 1280 + BN + ReLU, global average pooling,
linear classifier.

Features: `stage1..stage4` are the outputs after inverted-residual stages
2, 3, 5 and 7 (mdistiller's `feats[1:]`; they end in BN with no activation, as
in mdistiller). At 32x32: 16x16x12, 8x8x16, 4x4x48, 2x2x160.
`embedding` is the pooled 1280-d vector.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.cifar.common import classifier_head
from jaxkd.models.layers import DepthwiseConv, ModuleDef
from jaxkd.models.registry import register

# (expansion or None for "the model's t", channels, blocks, stride); stages whose outputs are
# features.
_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
_FEATURE_AFTER = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """MobileNetV2 block (see module docstring).

  `conv`, `depthwise_conv` and `norm` are the network's constructors (`layers.conv`,
  `layers.DepthwiseConv`, `layers.batch_norm` partials).
  """
  out_channels: int
  strides: int
  expansion: int
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = self.conv(hidden, 1, name="expand_conv")(x)
    y = nn.relu(self.norm(name="expand_bn")(y))
    y = self.depthwise_conv(3, strides=self.strides, name="dw_conv")(y)
    y = nn.relu(self.norm(name="dw_bn")(y))
    y = self.conv(self.out_channels, 1, name="project_conv")(y)
    y = self.norm(name="project_bn")(y)
    if self.strides == 1 and in_channels == self.out_channels:
      y = x + y
    return y


class CifarMobileNetV2(nn.Module):
  """MobileNetV2 with expansion `expansion` and width multiplier `width_mult` for 32x32 inputs."""
  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    conv = functools.partial(layers.conv, dtype=self.dtype)
    depthwise_conv = functools.partial(DepthwiseConv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(int(32 * self.width_mult), 3, strides=2, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    features = {}
    for s, (t, c, n, stride) in enumerate(_SETTING):
      for i in range(n):
        x = InvertedResidual(int(c * self.width_mult), stride if i == 0 else 1,
                             self.expansion if t is None else t, conv=conv,
                             depthwise_conv=depthwise_conv, norm=norm, name=f"blocks{s}_{i}")(x)
      if s in _FEATURE_AFTER:
        features[f"stage{_FEATURE_AFTER.index(s) + 1}"] = x
    last_channels = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = conv(last_channels, 1, name="conv2")(x)
    x = nn.relu(norm(name="bn2")(x))
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype,
                           name="classifier", kernel_init=layers.linear_normal_init,
                           return_features=return_features)


@register("mobilenetv2")
def mobilenetv2(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarMobileNetV2:
  """mdistiller `mobile_half` (its CIFAR "MobileNetV2"): t = 6, width 0.5."""
  return CifarMobileNetV2(num_classes=num_classes, expansion=6, width_mult=0.5, dtype=dtype,
                          **kwargs)
