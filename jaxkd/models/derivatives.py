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

`bilinear_jvp` is the JVP rule the two convolutions share.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, linear_call

ENV = "JAXKD_XLA_GRADIENTS"


def xla_only() -> bool:
  """True when JAXKD_XLA_GRADIENTS=1: models use XLA's operations and derivatives only."""
  return os.environ.get(ENV, "") == "1"


def bilinear_jvp(forward: Callable[[jax.Array, jax.Array], jax.Array],
                 input_grad: Callable[[jax.Array, jax.Array], jax.Array],
                 kernel_grad: Callable[[jax.Array, jax.Array], jax.Array], primals, tangents):
  """The JVP rule of a convolution y = forward(x, k), bilinear in (x, k) (for `defjvp` with
  symbolic_zeros=True): dy = forward(dx, k) + forward(x, dk), each part a `linear_call` whose
  transpose is the hand-written gradient, `input_grad(ct, k)` -> dx and `kernel_grad(x, ct)` -> dk.
  """
  x, kernel = primals
  tx, tk = tangents
  y = forward(x, kernel)
  parts = []
  if not isinstance(tx, SymbolicZero):
    parts.append(linear_call(lambda k, t: forward(t, k), lambda k, ct: input_grad(ct, k),
                             kernel, tx))
  if not isinstance(tk, SymbolicZero):
    parts.append(linear_call(lambda xx, t: forward(xx, t), kernel_grad, x, tk))
  if not parts:
    return y, jnp.zeros_like(y)
  return y, functools.reduce(jnp.add, parts)
