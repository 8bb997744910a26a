"""Max pooling with PyTorch's padding, and on CPU a gradient that routes through the window taps.

`max_pool(x, window, stride, padding)` is torch.nn.MaxPool2d(window, stride, padding) on NHWC
input: padding with -inf (never selected), floor output size. Its value is XLA's
`lax.reduce_window` (as flax.linen.max_pool) on every platform.

Its derivative sends each output's cotangent to the first input of its window, in row-major
window order, that equals the maximum (PyTorch's choice on ties). On GPU/TPU that is XLA's own
gradient of `reduce_window` (select-and-scatter). XLA:CPU's lowering of that gradient tracks
the argmax with one int32 index array per input dimension through a variadic reduce-window:
measured at 0.45 s of a 7.4 s float32 ResNet-50 training step (batch 32, 2-core Intel Xeon)
for the stem's one 3x3/2 pool. The CPU path instead stores, per output, which of the k*k taps
won (int8), and computes

- the tangent as the selected tap of the input tangent (one fused select over the taps), and
- its transpose, the input cotangent, as the sum over taps t of the cotangents that tap t won,
  each placed back on the input grid with `lax.pad` (interior padding stride - 1), cropped to
  the unpadded input: one fused loop over the input.

The choice is made per lowering platform with `lax.platform_dependent`. As in depthwise.py,
`jax.grad` and `jax.jvp` work through it, `jax.vmap` of a gradient and `jax.hessian` do not
(derivatives.py; JAXKD_XLA_GRADIENTS=1 uses XLA's everywhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero, linear_call

from jaxkd.models import derivatives

IntPair = tuple[int, int]
PadPair = tuple[IntPair, IntPair]


def _xla_max_pool(x: jax.Array, window: IntPair, strides: IntPair, pad: PadPair) -> jax.Array:
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *pad, (0, 0)))


def _taps(xp: jax.Array, window: IntPair, strides: IntPair, out_hw: IntPair):
  """The window taps of padded NHWC `xp`: for each (i, j) in row-major order, the strided slice
  xp[:, i + sh*h, j + sw*w, :] over the output grid."""
  b, _, _, c = xp.shape
  (sh, sw), (ho, wo) = strides, out_hw
  for i in range(window[0]):
    for j in range(window[1]):
      yield lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1))


def _pad_with(x: jax.Array, pad: PadPair, value) -> jax.Array:
  return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pad[0], 0), (*pad[1], 0), (0, 0, 0)))


def _winners(x: jax.Array, y: jax.Array, window: IntPair, strides: IntPair,
             pad: PadPair) -> jax.Array:
  """[B, Ho, Wo, C] (int8, int32 beyond 127 taps): the row-major index of the first tap equal to
  the maximum y."""
  taps = list(_taps(_pad_with(x, pad, -jnp.inf), window, strides, y.shape[1:3]))
  index = jnp.int8 if len(taps) <= 127 else jnp.int32
  winner = jnp.full(y.shape, len(taps) - 1, index)
  for t in range(len(taps) - 2, -1, -1):
    winner = jnp.where(taps[t] == y, index(t), winner)
  return winner


def _select(winner: jax.Array, tx: jax.Array, window: IntPair, strides: IntPair,
            pad: PadPair) -> jax.Array:
  """The tangent of the output: the winning tap of the input tangent."""
  out = jnp.zeros(winner.shape, tx.dtype)
  for t, tap in enumerate(_taps(_pad_with(tx, pad, 0), window, strides, winner.shape[1:3])):
    out = jnp.where(winner == t, tap, out)
  return out


def _route(winner: jax.Array, ct: jax.Array, window: IntPair, strides: IntPair, pad: PadPair,
           in_hw: IntPair) -> jax.Array:
  """The input cotangent: each output's cotangent added at its winning tap's input position."""
  (sh, sw), (ho, wo) = strides, ct.shape[1:3]
  hp, wp = in_hw[0] + sum(pad[0]), in_hw[1] + sum(pad[1])
  zero = jnp.zeros((), ct.dtype)
  total = None
  for t in range(window[0] * window[1]):
    i, j = divmod(t, window[1])
    won = jnp.where(winner == t, ct, zero)
    placed = lax.pad(won, zero, ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                                 (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
    total = placed if total is None else total + placed
  return total[:, pad[0][0]:pad[0][0] + in_hw[0], pad[1][0]:pad[1][0] + in_hw[1]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _routed_max_pool(x, window, strides, pad):
  return _xla_max_pool(x, window, strides, pad)


def _routed_max_pool_jvp(window, strides, pad, primals, tangents):
  (x,), (tx,) = primals, tangents
  y = _xla_max_pool(x, window, strides, pad)
  if isinstance(tx, SymbolicZero):
    return y, jnp.zeros_like(y)
  winner = _winners(x, y, window, strides, pad)
  ty = linear_call(
      lambda w, t: _select(w, t, window, strides, pad),
      lambda w, ct: _route(w, ct, window, strides, pad, x.shape[1:3]),
      winner, tx)
  return y, ty


_routed_max_pool.defjvp(_routed_max_pool_jvp, symbolic_zeros=True)


def routed_max_pool(x: jax.Array, window: IntPair, strides: IntPair, pad: PadPair) -> jax.Array:
  """Max pooling with the CPU derivative of the module docstring, on any platform (for tests and
  benchmarks; models call `max_pool`)."""
  return _routed_max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in pad))


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """torch.nn.MaxPool2d(window, stride, padding) on NHWC `x`: -inf padding, floor output size.

  On CPU its derivative is computed as the module docstring says, elsewhere by XLA.
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool needs NHWC input [B, H, W, C], got shape {x.shape}")
  if window < 1 or stride < 1 or not 0 <= padding <= window // 2:
    raise ValueError(f"max_pool needs window >= 1, stride >= 1 and 0 <= padding <= window // 2 "
                     f"(as torch.nn.MaxPool2d); got window {window}, stride {stride}, "
                     f"padding {padding}")
  args = ((window, window), (stride, stride), ((padding, padding), (padding, padding)))
  if derivatives.xla_only():
    return _xla_max_pool(x, *args)
  return lax.platform_dependent(x, cpu=lambda v: routed_max_pool(v, *args),
                                default=lambda v: _xla_max_pool(v, *args))
