"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) as in CRD/mdistiller.

WRN-d-k: depth d = 6n + 4, widen factor k. A 3x3 stem conv with 16 channels,
three stages of n pre-activation blocks with 16k, 32k, 64k channels (stride 2
entering stages 2 and 3), then BN + ReLU, global average pooling and a linear
classifier. Dropout is 0 in every mdistiller model and is left out.

Pre-activation block, a = relu(BN(x)):
  out = conv3x3(relu(BN(conv3x3_s(a))))
  y = x + out                when in_channels == out_channels (identity on raw x)
  y = conv1x1_s(a) + out     otherwise (the projection sees the activated a)

Features: `stage1..stage3` are the raw stage outputs (mdistiller's `feats[1:]`;
the network is pre-activation, so these are residual sums without BN/ReLU),
`embedding` is the pooled relu(BN(stage3)).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.cifar.common import classifier_head
from jaxkd.models.layers import ModuleDef
from jaxkd.models.registry import register


class WideBasicBlock(nn.Module):
  """Pre-activation wide basic block (see module docstring).

  `conv` and `norm` are the network's constructors (`layers.conv`, `layers.batch_norm` partials).
  """
  out_planes: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    equal_in_out = x.shape[-1] == self.out_planes
    if equal_in_out and self.strides != 1:
      raise ValueError(f"WideBasicBlock: identity shortcut needs stride 1, "
                       f"got stride {self.strides}")
    a = nn.relu(self.norm(name="bn1")(x))
    out = self.conv(self.out_planes, 3, strides=self.strides, name="conv1")(a)
    out = nn.relu(self.norm(name="bn2")(out))
    out = self.conv(self.out_planes, 3, name="conv2")(out)
    if equal_in_out:
      return x + out
    shortcut = self.conv(self.out_planes, 1, strides=self.strides, name="shortcut_conv")(a)
    return shortcut + out


class WideResNet(nn.Module):
  """WRN-depth-widen_factor for 32x32 inputs."""
  depth: int
  widen_factor: int
  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), "
                       f"got {self.depth}")
    conv = functools.partial(layers.conv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    n = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    x = x.astype(self.dtype)
    x = conv(16, 3, name="conv1")(x)
    features = {}
    for stage, planes in enumerate(widths, start=1):
      for i in range(n):
        strides = 2 if (stage > 1 and i == 0) else 1
        x = WideBasicBlock(planes, conv=conv, norm=norm, strides=strides,
                           name=f"block{stage}_{i}")(x)
      features[f"stage{stage}"] = x
    x = nn.relu(norm(name="bn1")(x))
    # mdistiller: PyTorch-default Linear weight, zero bias.
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype, name="fc",
                           kernel_init=layers.torch_kernel_init, return_features=return_features)


def _register(name: str, depth: int, widen_factor: int) -> None:
  def factory(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> WideResNet:
    return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes,
                      dtype=dtype, **kwargs)

  factory.__name__ = name
  factory.__doc__ = f"mdistiller `{name}`: WRN-{depth}-{widen_factor}."
  register(name)(factory)


_register("wrn_16_2", 16, 2)
_register("wrn_40_1", 40, 1)
_register("wrn_40_2", 40, 2)
