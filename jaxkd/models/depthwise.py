"""Depthwise 2-D convolution, the core of MobileNet blocks.

`depthwise_conv2d` is numerically `lax.conv_general_dilated` with
`feature_group_count = channels`; the backend decides how it is computed
(see issue "Performance": XLA:CPU's grouped convolution is slow).
"""
from __future__ import annotations

import jax
from jax import lax


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: int = 1, padding: int = 0) -> jax.Array:
  """Depthwise convolution of NHWC `x` [B, H, W, C] with `kernel` [kh, kw, 1, C].

  Symmetric zero padding of `padding` pixels on every side (PyTorch's
  convention, not XLA's 'SAME', which pads stride-2 convolutions asymmetrically).
  """
  channels = x.shape[-1]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels)
