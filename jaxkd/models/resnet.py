"""ResNet-18/34/50/101 (He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016) exactly as torchvision's ResNet v1.5.

v1.5: in a Bottleneck the stride sits on the 3x3 conv (conv2), not on the first
1x1. Stem: 7x7/2 conv (pad 3), BN, ReLU, 3x3/2 max pool (pad 1 with -inf, as
PyTorch). BatchNorm eps 1e-5, PyTorch momentum 0.1 (Flax momentum 0.9). Convs
have no bias; the classifier `fc` has one.

Parameter naming (one-to-one with torchvision's state dict; the converter follows it):

  torchvision key                         Flax path (params / batch_stats)
  conv1.weight [O,I,kh,kw]                conv1/kernel [kh,kw,I,O]   (transpose (2,3,1,0))
  bn1.weight / bn1.bias                   bn1/scale / bn1/bias
  bn1.running_mean / running_var          batch_stats bn1/mean / bn1/var
  bn1.num_batches_tracked                 (dropped)
  layer{s}.{i}.conv{j}.weight             layer{s}_{i}/conv{j}/kernel
  layer{s}.{i}.bn{j}.*                    layer{s}_{i}/bn{j}/*
  layer{s}.{i}.downsample.0.weight        layer{s}_{i}/downsample_conv/kernel
  layer{s}.{i}.downsample.1.*             layer{s}_{i}/downsample_bn/*
  fc.weight [O,I] / fc.bias               fc/kernel [I,O] (transpose) / fc/bias

Features (`return_features=True`): stage1..stage4 = outputs of layer1..layer4
(strides 4, 8, 16, 32), embedding = global-average-pooled layer4 output
(2048-d for ResNet-50/101, 512-d for 18/34), the input of `fc`. Stage maps are in the compute
dtype, the embedding and the logits in float32.

The blocks receive the network's convolution and BatchNorm constructors as fields (`conv`, `norm`),
built once per call in `ResNet.__call__` (the pattern of Flax's ImageNet example).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers, pooling
from jaxkd.models.layers import ModuleDef
from jaxkd.models.registry import register

_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
_BN_EPS = 1e-5


def max_pool_torch(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """PyTorch MaxPool2d: symmetric padding with -inf (never selected), floor output size."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


class BasicBlock(nn.Module):
  """3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, plus identity/downsample, ReLU. Expansion 1.

  `conv` and `norm` are the network's constructors (`layers.conv`, `layers.batch_norm` partials).
  """
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x):
    out_channels = self.planes * self.expansion
    y = self.conv(self.planes, 3, strides=self.stride, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.norm(name="bn2")(self.conv(self.planes, 3, name="conv2")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = self.conv(out_channels, 1, strides=self.stride, name="downsample_conv")(x)
      shortcut = self.norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, v1.5) -> 1x1 (x4), each with BN, ReLU after the first two and after the
  sum. `conv` and `norm` as in BasicBlock."""
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out_channels = self.planes * self.expansion
    y = nn.relu(self.norm(name="bn1")(self.conv(self.planes, 1, name="conv1")(x)))
    y = self.conv(self.planes, 3, strides=self.stride, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.norm(name="bn3")(self.conv(out_channels, 1, name="conv3")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = self.conv(out_channels, 1, strides=self.stride, name="downsample_conv")(x)
      shortcut = self.norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision ResNet (v1.5) for ImageNet-size inputs, NHWC."""
  block: str  # 'basic' or 'bottleneck'
  layers: Sequence[int]
  num_classes: int = 1000
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    conv = functools.partial(layers.conv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, momentum=_BN_MOMENTUM,
                             epsilon=_BN_EPS, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = norm(name="bn1")(conv(64, 7, strides=2, name="conv1")(x))
    # Same values either way; training takes pooling.max_pool for its CPU gradient, inference
    # Flax's max_pool, which the ONNX and LiteRT exporters recognise.
    pool = pooling.max_pool if train else max_pool_torch
    x = pool(nn.relu(x))
    features = {}
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
      for i in range(count):
        stride = 2 if (i == 0 and stage > 1) else 1
        x = block_cls(planes, conv=conv, norm=norm, stride=stride, name=f"layer{stage}_{i}")(x)
      features[f"stage{stage}"] = x
    embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    linear_init = layers.torch_uniform_init(embedding.shape[-1])  # torch.nn.Linear's default
    fc = nn.Dense(self.num_classes, kernel_init=linear_init, bias_init=linear_init,
                  dtype=self.dtype, param_dtype=jnp.float32, name="fc")
    logits = fc(embedding.astype(self.dtype)).astype(jnp.float32)
    if return_features:
      features["embedding"] = embedding
      return logits, features
    return logits


def _factory(block: str, depths: Sequence[int]):
  variant = functools.partial(ResNet, block=block, layers=tuple(depths))

  def factory(*, num_classes: int, dtype=jnp.float32, bn_axis_name: str | None = None) -> ResNet:
    return variant(num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name)

  return factory


resnet18 = register("resnet18")(_factory("basic", (2, 2, 2, 2)))
resnet34 = register("resnet34")(_factory("basic", (3, 4, 6, 3)))
resnet50 = register("resnet50")(_factory("bottleneck", (3, 4, 6, 3)))
resnet101 = register("resnet101")(_factory("bottleneck", (3, 4, 23, 3)))
