"""Channel / spatial attention modules that can be dropped into any NHWC network.

Every module maps x [B, H, W, C] -> x * gate with the gate broadcast over the
dimensions it does not depend on. The gate (pooling, MLP, energy) is computed in
float32 whatever the compute dtype of `x` is; only the final product is in
`x.dtype`, so bf16 networks keep float32-accurate statistics.

Modules (cite the papers; formulas below are what the tests check):

- `ECA` (Wang, Wu, Zhu, Li, Zuo and Hu, "ECA-Net: Efficient Channel Attention for Deep
  Convolutional Neural Networks", CVPR 2020): g = sigmoid(conv1d_k(avgpool(x)))
  across channels, no bias, zero padding (k - 1) / 2, with the adaptive kernel
  size `eca_kernel_size(C)`. Parameter `conv/kernel` [k, 1, 1] (torch Conv1d
  weight [1, 1, k] transposed (2, 1, 0)).
- `SE` (Hu, Shen and Sun, "Squeeze-and-Excitation Networks", CVPR 2018, as used by
  MobileNetV3, Howard et al., "Searching for MobileNetV3", ICCV 2019):
  s = avgpool(x); g = hardsigmoid(fc2(relu(fc1(s)))) with fc1, fc2 1x1 convs
  with bias, squeeze width make_divisible(C / 4, 8) (`squeeze_channels` to
  override). Parameters `fc1/{kernel,bias}`, `fc2/{kernel,bias}` are torchvision's
  `SqueezeExcitation.fc1/fc2` (kernel = torch weight transposed (2, 3, 1, 0)).
  hardsigmoid(z) = relu6(z + 3) / 6.
- `CBAM` (Woo, Park, Lee and Kweon, "CBAM: Convolutional Block Attention Module",
  ECCV 2018): channel gate
  g_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), shared MLP
  C -> max(C // 16, 1) -> C with bias and ReLU (`mlp_fc1`, `mlp_fc2`, Dense);
  then on x' = x * g_c a spatial gate g_s = sigmoid(conv7x7([max_c(x'),
  mean_c(x')])) (channel order max, mean as the authors' code; zero padding 3;
  no bias; the authors' BatchNorm after this conv is left out so that attention
  modules hold no batch statistics). Output x' * g_s.
- `SimAM` (Yang, Zhang, Li and Xie, "SimAM: A Simple, Parameter-Free Attention Module
  for Convolutional Neural Networks", ICML 2021): parameter-free. Per channel over
  the H*W positions, with n = H * W, mu the spatial mean and
  var = sum((x - mu)^2) / (n - 1) (the sample variance, as the authors' code
  divides by `w * h - 1`),
  e = (x - mu)^2 / (4 (var + lambda)) + 0.5, lambda = 1e-4; out = x * sigmoid(e).
  For a 1x1 map (n = 1) the divisor is clamped to 1 (x - mu = 0 there, so e = 0.5)
  instead of the authors' 0/0.
- `Identity` for kind 'none'.

`make_attention(kind, ...)` builds any of them by name. Parameters start at PyTorch's default
initialisation (`layers.torch_uniform_init`) unless a module is given other initialisers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models.layers import torch_uniform_init

ATTENTION_KINDS = ("se", "eca", "cbam", "simam", "none")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds `value` to the nearest multiple of `divisor` (at least `min_value`, default `divisor`),
  never going more than 10% below `value` (MobileNet's channel rounding rule)."""
  if min_value is None:
    min_value = divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA's adaptive kernel size: t = int(|log2(C) + b| / gamma); k = t if t is odd else t + 1."""
  if channels < 1:
    raise ValueError(f"channels must be >= 1, got {channels}")
  t = int(abs(math.log2(channels) + b) / gamma)
  return t if t % 2 == 1 else t + 1


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """relu6(x + 3) / 6, PyTorch's nn.Hardsigmoid."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
  """x * relu6(x + 3) / 6, PyTorch's nn.Hardswish."""
  return x * hard_sigmoid(x)


class Identity(nn.Module):
  """Returns its input (attention kind 'none')."""

  @nn.compact
  def __call__(self, x):
    return x


class ECA(nn.Module):
  """Efficient Channel Attention (Wang et al., CVPR 2020): x * sigmoid(conv1d_k(mean_hw(x))).

  `kernel_size` None -> `eca_kernel_size(C, gamma, b)`.
  """
  kernel_size: int | None = None
  gamma: int = 2
  b: int = 1

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    k = self.kernel_size or eca_kernel_size(channels, self.gamma, self.b)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]
    conv = nn.Conv(1, kernel_size=(k,), padding=[((k - 1) // 2, (k - 1) // 2)], use_bias=False,
                   kernel_init=torch_uniform_init(k), dtype=jnp.float32, param_dtype=jnp.float32,
                   name="conv")
    y = conv(pooled[:, :, None])  # channels as the 1-D "length" axis
    gate = jax.nn.sigmoid(y[:, :, 0])
    return x * gate[:, None, None, :].astype(x.dtype)


class SE(nn.Module):
  """Squeeze-and-Excitation as in MobileNetV3: x * hardsigmoid(fc2(relu(fc1(mean_hw(x))))).

  fc1: 1x1 conv C -> squeeze (default make_divisible(C / 4, 8)), fc2: back to C, both with bias.
  `gate` selects the scale activation: 'hard_sigmoid' (MobileNetV3) or 'sigmoid' (original SE).
  `kernel_init` / `bias_init` None: PyTorch's Conv2d default, U(+-1/sqrt(fan_in)).
  """
  squeeze_channels: int | None = None
  gate: str = "hard_sigmoid"
  kernel_init: Callable | None = None
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    squeeze = self.squeeze_channels or make_divisible(channels / 4, 8)

    def conv(features: int, fan_in: int, name: str) -> nn.Conv:
      return nn.Conv(features, (1, 1), use_bias=True,
                     kernel_init=self.kernel_init or torch_uniform_init(fan_in),
                     bias_init=self.bias_init or torch_uniform_init(fan_in), dtype=jnp.float32,
                     param_dtype=jnp.float32, name=name)

    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    s = nn.relu(conv(squeeze, channels, "fc1")(s))
    s = conv(channels, squeeze, "fc2")(s)
    if self.gate == "hard_sigmoid":
      g = hard_sigmoid(s)
    elif self.gate == "sigmoid":
      g = jax.nn.sigmoid(s)
    else:
      raise ValueError(f"SE gate must be 'hard_sigmoid' or 'sigmoid', got {self.gate!r}")
    return x * g.astype(x.dtype)


class CBAM(nn.Module):
  """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel, then spatial gate."""
  reduction: int = 16
  spatial_kernel_size: int = 7

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    hidden = max(channels // self.reduction, 1)
    fc1 = nn.Dense(hidden, kernel_init=torch_uniform_init(channels),
                   bias_init=torch_uniform_init(channels), name="mlp_fc1")
    fc2 = nn.Dense(channels, kernel_init=torch_uniform_init(hidden),
                   bias_init=torch_uniform_init(hidden), name="mlp_fc2")

    def mlp(v: jax.Array) -> jax.Array:
      return fc2(nn.relu(fc1(v)))

    xf = x.astype(jnp.float32)
    channel_gate = jax.nn.sigmoid(mlp(jnp.mean(xf, axis=(1, 2))) + mlp(jnp.max(xf, axis=(1, 2))))
    xc = xf * channel_gate[:, None, None, :]
    descriptor = jnp.concatenate([jnp.max(xc, axis=-1, keepdims=True),
                                  jnp.mean(xc, axis=-1, keepdims=True)], axis=-1)  # [B, H, W, 2]
    k = self.spatial_kernel_size
    p = (k - 1) // 2
    spatial_conv = nn.Conv(1, (k, k), padding=((p, p), (p, p)), use_bias=False,
                           kernel_init=torch_uniform_init(2 * k * k), dtype=jnp.float32,
                           param_dtype=jnp.float32, name="spatial_conv")
    s = spatial_conv(descriptor)
    return (xc * jax.nn.sigmoid(s)).astype(x.dtype)


class SimAM(nn.Module):
  """Parameter-free SimAM attention (Yang et al., ICML 2021); the module docstring gives the
  variance used."""
  e_lambda: float = 1e-4

  @nn.compact
  def __call__(self, x):
    xf = x.astype(jnp.float32)
    n = x.shape[1] * x.shape[2]
    d = jnp.square(xf - jnp.mean(xf, axis=(1, 2), keepdims=True))
    var = jnp.sum(d, axis=(1, 2), keepdims=True) / max(n - 1, 1)
    e = d / (4.0 * (var + self.e_lambda)) + 0.5
    return (xf * jax.nn.sigmoid(e)).astype(x.dtype)


def make_attention(kind: str | None, *, name: str | None = None, **options: Any) -> nn.Module:
  """Attention module by name: 'se', 'eca', 'cbam', 'simam' or 'none' (None means 'none').

  `options` go to the module (e.g. `squeeze_channels` for SE, `kernel_size` for ECA,
  `reduction` for CBAM, `e_lambda` for SimAM). Channels are read from the input at call time.
  """
  kind = "none" if kind is None else kind
  classes = {"se": SE, "eca": ECA, "cbam": CBAM, "simam": SimAM, "none": Identity}
  if kind not in classes:
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}")
  if kind == "none" and options:
    raise ValueError(f"attention 'none' takes no options, got {sorted(options)}")
  return classes[kind](name=name, **options)
