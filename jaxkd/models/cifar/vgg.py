"""VGG with BatchNorm for CIFAR (Simonyan and Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015) as in CRD/mdistiller.

Five blocks of 3x3 convs (with bias) + BN + ReLU; 2x2 max pooling after
blocks 0, 1 and 2 (and after block 3 only for 64x64 inputs, as mdistiller);
global average pooling of block 4 (512 channels) and one linear layer.
  vgg8  (config "S"): [64], [128], [256], [512], [512]
  vgg13 (config "B"): [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]
The registered names are the BN variants (mdistiller's `vgg8_bn`, `vgg13_bn`,
which its CIFAR tables call vgg8 / vgg13).

Features: `stage1..stage4` are the post-ReLU outputs of blocks 1-4 before
pooling (mdistiller's `feats[1:]`, at 32x32 input: 16x16x128, 8x8x256,
4x4x512, 4x4x512); block 0's output (mdistiller's `feats[0]`) is not returned.
`embedding` is the pooled 512-d vector.
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
from jaxkd.models.registry import register

CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class CifarVGG(nn.Module):
  """VGG-BN over `cfg`, a sequence of five tuples of conv widths."""
  cfg: Sequence[Sequence[int]]
  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    if len(self.cfg) != 5:
      raise ValueError(f"CifarVGG needs 5 blocks of conv widths, got {len(self.cfg)}: {self.cfg}")
    conv = functools.partial(layers.conv, use_bias=True, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)
    input_height = x.shape[1]
    x = x.astype(self.dtype)
    features = {}
    for b, widths in enumerate(self.cfg):
      for j, width in enumerate(widths):
        x = conv(width, 3, name=f"block{b}_conv{j}")(x)
        x = nn.relu(norm(name=f"block{b}_bn{j}")(x))
      if b >= 1:
        features[f"stage{b}"] = x
      if b <= 2 or (b == 3 and input_height == 64):
        x = _max_pool_2x2(x)
    return classifier_head(x, features, num_classes=self.num_classes, dtype=self.dtype,
                           name="classifier", kernel_init=layers.linear_normal_init,
                           return_features=return_features)


@register("vgg8")
def vgg8(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarVGG:
  """mdistiller `vgg8_bn` (config "S")."""
  return CifarVGG(cfg=CONFIGS["S"], num_classes=num_classes, dtype=dtype, **kwargs)


@register("vgg13")
def vgg13(*, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> CifarVGG:
  """mdistiller `vgg13_bn` (config "B")."""
  return CifarVGG(cfg=CONFIGS["B"], num_classes=num_classes, dtype=dtype, **kwargs)
