"""jaxkd.models.pooling: max pooling with PyTorch's padding and first-maximum gradient routing.

Compared with float64 NumPy written from torch.nn.MaxPool2d's definition: -inf padding, floor
output size, and each output's cotangent added to the first input of its window (row-major) that
equals the maximum. Ties are made common with small integer inputs; without ties the gradient
also equals XLA's (select-and-scatter).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd.models import pooling


def _numpy_max_pool_and_grad(x, dy, window, stride, padding):
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
              constant_values=-np.inf)
  ho = (h + 2 * padding - window) // stride + 1
  wo = (w + 2 * padding - window) // stride + 1
  y = np.full((b, ho, wo, c), -np.inf)
  dxp = np.zeros_like(xp)
  for n in range(b):
    for oh in range(ho):
      for ow in range(wo):
        for ch in range(c):
          patch = xp[n, oh * stride:oh * stride + window, ow * stride:ow * stride + window, ch]
          first = int(np.argmax(patch.reshape(-1)))  # np.argmax returns the first maximum
          i, j = divmod(first, window)
          y[n, oh, ow, ch] = patch[i, j]
          if dy is not None:
            dxp[n, oh * stride + i, ow * stride + j, ch] += float(dy[n, oh, ow, ch])
  return y, dxp[:, padding:padding + h, padding:padding + w]


CASES = [(3, 2, 1, (2, 11, 12, 3)), (3, 2, 1, (1, 8, 8, 2)), (2, 2, 0, (2, 7, 9, 2)),
         (3, 1, 1, (1, 6, 5, 2)), (5, 3, 2, (1, 13, 10, 2))]


@pytest.mark.parametrize("window,stride,padding,shape", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_value_and_gradient_match_float64(window, stride, padding, shape, ties):
  rng = np.random.default_rng(window * 10 + stride)
  x = rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)
  x = np.asarray(x, np.float32)
  y_ref, _ = _numpy_max_pool_and_grad(x, None, window, stride, padding)
  dy = rng.standard_normal(y_ref.shape).astype(np.float32)
  _, dx_ref = _numpy_max_pool_and_grad(x, dy, window, stride, padding)

  def value_and_grad(x, dy):
    args = ((window, window), (stride, stride), ((padding, padding), (padding, padding)))
    y, pullback = jax.vjp(lambda v: pooling.routed_max_pool(v, *args), x)
    return y, pullback(dy)[0]

  y, dx = jax.jit(value_and_grad)(x, dy)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
  if not ties:  # XLA's select-and-scatter picks the same input when the maximum is unique
    xla = jax.vjp(lambda v: nn.max_pool(v, (window, window), strides=(stride, stride),
                                        padding=((padding, padding),) * 2), x)[1](dy)[0]
    np.testing.assert_allclose(dx, xla, rtol=1e-6, atol=1e-6)


def test_forward_mode_selects_the_winning_tangent():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  ours = jax.jvp(lambda v: pooling.max_pool(v, 3, 2, 1), (x,), (t,))
  theirs = jax.jvp(lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
                   (x,), (t,))
  for got, ref in zip(ours, theirs):
    np.testing.assert_array_equal(got, ref)


def test_sharded_batch_and_bfloat16():
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  rng = np.random.default_rng(6)
  x = rng.standard_normal((8, 10, 10, 4)).astype(np.float32)
  dy = rng.standard_normal((8, 5, 5, 4)).astype(np.float32)
  shard = NamedSharding(mesh, P("batch"))
  for dtype in (jnp.float32, jnp.bfloat16):
    xs = jax.device_put(jnp.asarray(x, dtype), shard)
    dys = jax.device_put(jnp.asarray(dy, dtype), shard)
    # the reference on the rounded inputs: rounding to bfloat16 can change which input wins
    y_ref, dx_ref = _numpy_max_pool_and_grad(np.asarray(xs, np.float32),
                                             np.asarray(dys, np.float32), 3, 2, 1)
    y, pullback = jax.vjp(lambda v: pooling.max_pool(v, 3, 2, 1), xs)
    dx = jax.jit(pullback)(dys)[0]
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), y_ref)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2  # two cotangents meeting at one input, rounded
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_ref, rtol=tol, atol=tol)


def test_windows_beyond_127_taps():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((1, 14, 14, 1)).astype(np.float32)
  dy = rng.standard_normal((1, 2, 2, 1)).astype(np.float32)
  _, dx_ref = _numpy_max_pool_and_grad(x, dy, 12, 2, 0)
  _, pullback = jax.vjp(lambda v: pooling.routed_max_pool(v, (12, 12), (2, 2), ((0, 0),) * 2), x)
  np.testing.assert_allclose(pullback(dy)[0], dx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args", [(3, 2, 2), (0, 1, 0), (3, 0, 1)])
def test_bad_arguments_are_named(args):
  with pytest.raises(ValueError, match=r"window .*stride .*padding"):
    pooling.max_pool(jnp.zeros((1, 8, 8, 1)), *args)
