"""Building blocks shared by every model: the initialisers, BatchNorm with cross-device statistics,
convolutions with PyTorch's symmetric padding (on CPU: 1x1 ones as a GEMM, k x k ones with
GEMM gradients), depthwise convolution.

Models follow the pattern of Flax's ImageNet example (examples/imagenet/models.py): the top-level
module builds its convolution and normalisation constructors once per call,

    conv = functools.partial(layers.conv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, dtype=self.dtype)

and hands them to its blocks as fields (`conv: ModuleDef`, `norm: ModuleDef`), which call
`self.conv(features, kernel_size, strides=..., name=...)` and `self.norm(name=...)`.

Initialisers (PyTorch's, so that a model starts where its PyTorch definition starts):

- `conv_kernel_init`: kaiming_normal_(mode='fan_out', nonlinearity='relu'), N(0, 2 / fan_out), as
  torchvision initialises the convolutions of its ResNets and MobileNetV3s.
- `torch_uniform_init(fan_in)`: PyTorch's default nn.Conv / nn.Linear initialisation,
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_(a=sqrt(5)) for the weight; the bias draws
  from the same interval), fan_in given explicitly (the weight's, also for the bias).
- `torch_kernel_init`: the same weight distribution with fan_in read from the kernel's shape
  (Flax's variance_scaling(1/3, 'fan_in', 'uniform'); scaled from U(-1, 1) rather than drawn on
  U(-b, b), so its values differ in the last bits from `torch_uniform_init`'s).
- `linear_normal_init`: N(0, 0.01^2), the classifier init of torchvision's MobileNetV3 and of the
  CIFAR VGG / MobileNetV2 definitions.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import spatial_conv
from jaxkd.models.batchnorm import BatchNorm
from jaxkd.models.depthwise import depthwise_conv2d

ModuleDef = Any  # a module class or a functools.partial of one (as Flax's ImageNet example)
Initializer = Callable[..., jax.Array]

conv_kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
linear_normal_init: Initializer = nn.initializers.normal(stddev=0.01)


def torch_uniform_init(fan_in: int) -> Initializer:
  """PyTorch's default Conv/Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  For a weight (kaiming_uniform_ with a = sqrt(5)) and for its bias alike; `fan_in` is the weight's
  input size times its receptive field (in_channels * kh * kw for a convolution).
  """
  if fan_in < 1:
    raise ValueError(f"fan_in must be >= 1, got {fan_in}")
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def batch_norm(train: bool, *, axis_name: str | None = None, momentum: float = 0.9,
               epsilon: float = 1e-5, dtype: Any = jnp.float32) -> Callable[..., BatchNorm]:
  """BatchNorm constructor (functools.partial of `BatchNorm`), float32 parameters and statistics.

  Call the result with `name=...` (and any other BatchNorm field) to get the module.
  `train` False normalises with the running statistics. `momentum` is Flax's
  (running = momentum * running + (1 - momentum) * batch), i.e. 1 - PyTorch's momentum: PyTorch's
  default 0.1 is 0.9 here. `axis_name` reduces the batch statistics across devices inside
  shard_map/pmap; under jax.jit over a Mesh the batch axis is global already and it stays None.
  Same variables and values as nn.BatchNorm, with a hand-written gradient (batchnorm.py).
  """
  return functools.partial(BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=epsilon, axis_name=axis_name, dtype=dtype,
                           param_dtype=jnp.float32)


def conv(features: int, kernel_size: int, *, strides: int = 1, groups: int = 1,
         use_bias: bool = False, kernel_init: Initializer = conv_kernel_init,
         dtype: Any = jnp.float32, name: str | None = None) -> nn.Conv:
  """k x k convolution with PyTorch's symmetric padding p = (k - 1) // 2 on every side.

  Output size floor((H + 2p - k) / s) + 1, as torch.nn.Conv2d(padding=p).
  `groups` > 1 is a grouped convolution (feature_group_count); depthwise
  convolutions use DepthwiseConv instead. On CPU, 1x1 convolutions run as one GEMM
  (pointwise.py) and k x k ones get gradients chosen per shape (spatial_conv.py); parameters are
  the same either way.
  """
  pad = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=spatial_conv.conv_general_dilated, name=name)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution with PyTorch's padding (k - 1) // 2; parameter `kernel`
  [k, k, 1, C] (as nn.Conv with feature_group_count=C)."""
  kernel_size: int
  strides: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    y = depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides=self.strides,
                         padding=(self.kernel_size - 1) // 2)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
