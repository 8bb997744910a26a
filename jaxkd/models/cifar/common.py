"""Small pieces shared by the CIFAR model definitions (mdistiller / CRD families).

PyTorch conventions are kept so that a converted checkpoint gives the same
function: symmetric zero padding, channels in the same order (channel shuffle
and split act on the last axis exactly as PyTorch's act on axis 1), BatchNorm
eps 1e-5 and PyTorch momentum 0.1 (Flax momentum 0.9). The initialisers are
those of `jaxkd.models.layers`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import torch_uniform_init


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of NHWC `x` -> [B, C].

  At 32x32 input this equals each original definition's fixed-size pooling
  (AvgPool2d(8) for ResNet/WRN, avg_pool2d(4) for ShuffleNets, AvgPool2d(2) for
  MobileNetV2, AdaptiveAvgPool2d(1) for VGG), all of which cover the whole final map.
  """
  return jnp.mean(x, axis=(1, 2))


def classifier_head(x: jax.Array, features: dict, *, num_classes: int, dtype: Any, name: str,
                    kernel_init: Callable[..., jax.Array], torch_default_bias: bool = False,
                    return_features: bool = False):
  """The common end of the CIFAR models: global average pool -> Linear(num_classes).

  Records the pooled vector as features['embedding'] and returns float32 logits, or
  (logits, features) when `return_features`. The bias is zero, or PyTorch's default
  U(+-1/sqrt(fan_in)) over the pooled width when `torch_default_bias`.
  """
  embedding = global_avg_pool(x)
  features["embedding"] = embedding
  bias_init = torch_uniform_init(x.shape[-1]) if torch_default_bias else nn.initializers.zeros
  logits = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                    bias_init=bias_init, name=name)(embedding).astype(jnp.float32)
  return (logits, features) if return_features else logits


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle (Zhang, Zhou, Lin and Sun, "ShuffleNet: An Extremely Efficient
  Convolutional Neural Network for Mobile Devices", CVPR 2018) on the last axis of NHWC `x`.

  Channel c = g * (C/groups) + j moves to position j * groups + g, i.e.
  reshape to [groups, C/groups], transpose, flatten: the same permutation
  PyTorch's [N, g, C/g, H, W] -> permute(0, 2, 1, 3, 4) gives on NCHW.
  """
  channels = x.shape[-1]
  if channels % groups:
    raise ValueError(f"channel_shuffle: {channels} channels are not divisible by groups={groups}")
  if groups == 1:
    return x
  lead = x.shape[:-1]
  return x.reshape(*lead, groups, channels // groups).swapaxes(-1, -2).reshape(*lead, channels)
