"""Whether models use jaxkd's hand-written CPU derivatives or XLA's own.

The CPU paths of depthwise convolutions (depthwise.py), k x k convolutions (spatial_conv.py) and
max pooling (pooling.py) give their derivatives as a custom JVP whose linear parts carry their
own transposes (`jax.custom_derivatives.linear_call`). `jax.grad` and `jax.jvp` work through them;
`jax.vmap` of a gradient (per-example gradients), `jax.hessian` and forward-over-reverse do not,
because `linear_call` has no batching rule and no JVP. As `lax.platform_dependent` traces every
platform's branch, this holds on GPU and TPU too.

Set the environment variable JAXKD_XLA_GRADIENTS=1 (read when a model is traced) to use
`lax.conv_general_dilated` and `lax.reduce_window` with XLA's derivatives everywhere instead:
the same values, every transformation, and XLA:CPU's slower gradients.
"""
from __future__ import annotations

import os

ENV = "JAXKD_XLA_GRADIENTS"


def xla_only() -> bool:
  """True when JAXKD_XLA_GRADIENTS=1: models use XLA's operations and derivatives only."""
  return os.environ.get(ENV, "") == "1"
