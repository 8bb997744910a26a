"""Pointwise (1x1) convolution as a matrix product on CPU.

A 1x1 convolution of NHWC `x` [B, H, W, Cin] with kernel w [1, 1, Cin, Cout],
stride s and no padding is

    y[b, h, w, :] = x[b, s*h, s*w, :] @ w[0, 0]

i.e. one GEMM [B*Ho*Wo, Cin] x [Cin, Cout] over the (strided) pixels; its
gradients are GEMMs too: dx = dy @ w^T (scattered back to the strided pixels)
and dw = x^T @ dy, a contraction over all B*Ho*Wo pixels.

XLA:CPU lowers a 1x1 `conv_general_dilated` and, worse, its two gradients to
convolution kernels that run at a few GFLOP/s on the wide, shallow tensors of
MobileNet's early blocks (measured: the backward of the 16 -> 64 expand conv at
112x112 alone took ~20% of a MobileNetV3-Large training step on CPU), while its
GEMM runs an order of magnitude faster. `conv_general_dilated` below is a
drop-in for `lax.conv_general_dilated` (Flax's `nn.Conv(conv_general_dilated=...)`)
that computes eligible convolutions (1x1 kernel, no padding, no dilation,
NHWC/HWIO) as that GEMM on CPU -- grouped ones (ShuffleNet) as a batched GEMM
over the groups, whose gradients XLA:CPU otherwise computes 5-15x slower -- and
leaves every other convolution, and every convolution on GPU/TPU (cuDNN, the
TPU convolution units), to `lax.conv_general_dilated`. The choice is made per
lowering platform with `lax.platform_dependent`, as for depthwise convolutions
(depthwise.py).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def pointwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] = (1, 1),
                     groups: int = 1, precision: Any = None,
                     preferred_element_type: Any = None) -> jax.Array:
  """1x1 convolution of NHWC `x` [B, H, W, Cin] with `kernel` [1, 1, Cin / groups, Cout] as one
  GEMM.

  Equal to `lax.conv_general_dilated(x, kernel, strides, 'VALID',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)`: output
  [B, ceil(H / sh), ceil(W / sw), Cout]. With groups G > 1, group g maps input channels
  [g Cin/G, (g+1) Cin/G) to output channels [g Cout/G, (g+1) Cout/G) with kernel columns
  [g Cout/G, (g+1) Cout/G): a batched GEMM over the G groups. Low-precision (bfloat16/float16)
  inputs are multiplied with float32 accumulation and rounded once at the end, as XLA's
  convolutions do.
  """
  if (kernel.ndim != 4 or kernel.shape[:2] != (1, 1) or x.ndim != 4 or groups < 1
      or x.shape[-1] != kernel.shape[2] * groups or kernel.shape[3] % groups):
    raise ValueError(f"pointwise_conv2d needs x [B, H, W, C] and kernel [1, 1, C / groups, O] "
                     f"with O divisible by groups; got x {x.shape}, kernel {kernel.shape}, "
                     f"groups {groups}")
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw, :]
  b, h, w, c = x.shape
  out = kernel.shape[3]
  out_dtype = preferred_element_type or jnp.result_type(x, kernel)
  accumulate = jnp.float32 if jnp.finfo(out_dtype).bits < 32 else out_dtype
  if groups == 1:
    y = jnp.dot(x.reshape(b * h * w, c), kernel.reshape(c, out), precision=precision,
                preferred_element_type=accumulate)
  else:
    # [G, Cin/G, Cout/G]
    per_group = kernel.reshape(c // groups, groups, out // groups).transpose(1, 0, 2)
    y = jnp.einsum("ngc,gcd->ngd", x.reshape(b * h * w, groups, c // groups), per_group,
                   precision=precision, preferred_element_type=accumulate)
  return y.astype(out_dtype).reshape(b, h, w, out)


def is_nhwc_hwio(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  """True when `dimension_numbers` lay a 4-D convolution out as NHWC input, HWIO kernel, NHWC
  output."""
  if dimension_numbers is None:
    return False
  try:
    return (lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC))
  except (TypeError, ValueError):
    return False


def _is_pointwise(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count) -> bool:
  """True when the convolution is a strided 1x1 NHWC/HWIO convolution (grouped or not) without
  padding."""
  if batch_group_count != 1 or lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[:2] != (1, 1):
    return False
  if not is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape):
    return False
  if lhs.shape[-1] != rhs.shape[2] * feature_group_count or rhs.shape[3] % feature_group_count:
    return False
  if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    return False
  if isinstance(padding, str):
    return padding.upper() in ("VALID", "SAME", "SAME_LOWER")  # a 1x1 window never pads
  return all(tuple(p) == (0, 0) for p in padding)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with 1x1 NHWC convolutions computed as a GEMM on CPU (module
  docstring)."""
  conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                           padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers,
                           feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision,
                           preferred_element_type=preferred_element_type)
  if not _is_pointwise(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, batch_group_count):
    return conv(lhs, rhs)
  gemm = functools.partial(pointwise_conv2d, strides=tuple(window_strides),
                           groups=feature_group_count, precision=precision,
                           preferred_element_type=preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=gemm, default=conv)
