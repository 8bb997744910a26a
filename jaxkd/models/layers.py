"""Building blocks shared by every model: BatchNorm with cross-device statistics,
convolutions with PyTorch's symmetric padding, depthwise convolution."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models.depthwise import depthwise_conv2d

# PyTorch's default kaiming_normal_(mode='fan_out', nonlinearity='relu'), as torchvision initialises convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, *, axis_name: Optional[str] = None, momentum: float = 0.9,
               epsilon: float = 1e-5, dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with float32 parameters and statistics.

  `momentum` is Flax's (running = momentum * running + (1 - momentum) * batch),
  i.e. 1 - PyTorch's momentum: PyTorch's default 0.1 is 0.9 here.
  `axis_name` reduces the batch statistics across devices inside shard_map/pmap;
  under jax.jit over a Mesh the batch axis is global already and it stays None.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                      axis_name=axis_name, dtype=dtype, param_dtype=jnp.float32, name=name)


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
