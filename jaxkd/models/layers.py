"""Building blocks shared by every model: BatchNorm with cross-device statistics,
convolutions with PyTorch's symmetric padding (1x1 ones as a GEMM on CPU), depthwise convolution."""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import pointwise
from jaxkd.models.batchnorm import BatchNorm
from jaxkd.models.depthwise import depthwise_conv2d

# PyTorch's default kaiming_normal_(mode='fan_out', nonlinearity='relu'), as torchvision initialises convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, *, axis_name: Optional[str] = None, momentum: float = 0.9,
               epsilon: float = 1e-5, dtype: Any = jnp.float32, name: Optional[str] = None) -> BatchNorm:
  """BatchNorm with float32 parameters and statistics.

  `momentum` is Flax's (running = momentum * running + (1 - momentum) * batch),
  i.e. 1 - PyTorch's momentum: PyTorch's default 0.1 is 0.9 here.
  `axis_name` reduces the batch statistics across devices inside shard_map/pmap;
  under jax.jit over a Mesh the batch axis is global already and it stays None.
  Same variables and values as nn.BatchNorm, with a hand-written gradient (batchnorm.py).
  """
  return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                   axis_name=axis_name, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel_size: int, *, strides: int = 1, groups: int = 1, use_bias: bool = False,
         kernel_init: Callable[..., jax.Array] = conv_kernel_init, dtype: Any = jnp.float32,
         name: Optional[str] = None) -> nn.Conv:
  """k x k convolution with PyTorch's symmetric padding p = (k - 1) // 2 on every side.

  Output size floor((H + 2p - k) / s) + 1, as torch.nn.Conv2d(padding=p).
  `groups` > 1 is a grouped convolution (feature_group_count); depthwise
  convolutions use DepthwiseConv instead. 1x1 convolutions run as one GEMM on
  CPU (pointwise.conv_general_dilated); parameters are the same either way.
  """
  pad = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=pointwise.conv_general_dilated, name=name)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution; parameter `kernel` [k, k, 1, C] (as nn.Conv with feature_group_count=C)."""
  kernel_size: int
  strides: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    y = depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides=self.strides,
                         padding=(self.kernel_size - 1) // 2)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(self.dtype)
    return y
