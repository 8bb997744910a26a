"""jaxkd.models.pointwise: 1x1 convolutions as a GEMM on CPU equal XLA's convolution.

Compared with: `lax.conv_general_dilated` (value, and both gradients through jax.vjp)
and, for one case, float64 NumPy written from y[b, h, w, :] = x[b, s*h, s*w, :] @ w[0, 0].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd.models import layers, pointwise

_DN = ("NHWC", "HWIO", "NHWC")


def _max_rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _arrays(x_shape, w_shape, strides, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  b, h, w, _ = x_shape
  out_shape = (b, -(-h // strides[0]), -(-w // strides[1]), w_shape[-1])
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
               for s in (x_shape, w_shape, out_shape))


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _value_and_vjps(conv, x, w, g):
  y, pullback = jax.vjp(conv, x, w)
  return (y, *pullback(g))


# (x shape, Cout, strides, padding as Flax/lax accept it)
CASES = [
    ((2, 8, 8, 16), 24, (1, 1), "VALID"),
    ((3, 7, 5, 6), 10, (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 9, 8), 12, (2, 2), ((0, 0), (0, 0))),  # odd size, stride 2: ceil(9 / 2) = 5 rows
    ((2, 10, 7, 5), 3, (2, 1), "SAME"),  # SAME never pads a 1x1 window
    ((1, 4, 4, 1), 1, (3, 3), "VALID"),
]
# grouped (ShuffleNetV1): (x shape, Cout, strides, padding, groups)
GROUPED = [
    ((2, 6, 6, 12), 9, (1, 1), "VALID", 3),
    ((2, 7, 5, 8), 16, (2, 2), ((0, 0), (0, 0)), 4),
    ((2, 4, 4, 6), 6, (1, 1), "SAME", 6),  # one input channel per group
]


def test_value_and_gradients_match_lax():
  @jax.jit
  def run(arrays):
    out = []
    for (_, _, s, pad), (x, w, g) in zip(CASES, arrays):
      def lax_conv(a, b, s=s, pad=pad):
        return _lax_conv(a, b, s, pad)

      def gemm(a, b, s=s):
        return pointwise.pointwise_conv2d(a, b, strides=s)

      def dispatched(a, b, s=s, pad=pad):
        return pointwise.conv_general_dilated(a, b, s, pad, dimension_numbers=_DN)

      out.append(tuple(_value_and_vjps(conv, x, w, g) for conv in (lax_conv, gemm, dispatched)))
    return out

  arrays = [_arrays(shape, (1, 1, shape[-1], cout), s, seed=i)
            for i, (shape, cout, s, _) in enumerate(CASES)]
  for case, (ref, *gots) in zip(CASES, run(arrays)):
    for got in gots:
      for name, a, b in zip(("y", "dx", "dkernel"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (case, name)
        assert _max_rel_err(a, b) < 1e-5, (case, name, _max_rel_err(a, b))


def test_grouped_value_and_gradients_match_lax():
  @jax.jit
  def run(arrays):
    out = []
    for (_, _, s, pad, groups), (x, w, g) in zip(GROUPED, arrays):
      def conv(a, b, s=s, pad=pad, groups=groups):
        return lax.conv_general_dilated(a, b, s, pad, dimension_numbers=_DN,
                                        feature_group_count=groups)

      def dispatched(a, b, s=s, pad=pad, groups=groups):
        return pointwise.conv_general_dilated(a, b, s, pad, dimension_numbers=_DN,
                                              feature_group_count=groups)

      out.append((_value_and_vjps(conv, x, w, g), _value_and_vjps(dispatched, x, w, g)))
    return out

  arrays = [_arrays(shape, (1, 1, shape[-1] // groups, cout), s, seed=10 + i)
            for i, (shape, cout, s, _, groups) in enumerate(GROUPED)]
  for case, (ref, got) in zip(GROUPED, run(arrays)):
    for name, a, b in zip(("y", "dx", "dkernel"), got, ref):
      assert a.shape == b.shape and a.dtype == b.dtype, (case, name)
      assert _max_rel_err(a, b) < 1e-5, (case, name, _max_rel_err(a, b))
  # and the CPU program of a grouped one has no convolution
  x, w, _ = arrays[0]
  def fn(a, b):
    return pointwise.conv_general_dilated(a, b, (1, 1), "VALID", dimension_numbers=_DN,
                                          feature_group_count=3)

  assert "stablehlo.convolution" not in _lowered_text(fn, "cpu", x, w)
  assert "stablehlo.convolution" in _lowered_text(fn, "cuda", x, w)


def test_grouped_forward_matches_float64_numpy():
  x, w, _ = _arrays((2, 3, 3, 6), (1, 1, 2, 9), (1, 1), seed=6)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)[0, 0]
  ref = np.concatenate([x64[..., 2 * g:2 * g + 2] @ w64[:, 3 * g:3 * g + 3] for g in range(3)],
                       axis=-1)
  assert _max_rel_err(pointwise.pointwise_conv2d(x, w, groups=3), ref) < 1e-6


def test_forward_matches_float64_numpy():
  x, w, _ = _arrays((2, 7, 7, 5), (1, 1, 5, 4), (2, 2), seed=3)
  ref = np.einsum("bhwc,cd->bhwd", np.asarray(x, np.float64)[:, ::2, ::2],
                  np.asarray(w, np.float64)[0, 0])
  got = jax.jit(lambda a, b: pointwise.pointwise_conv2d(a, b, strides=(2, 2)))(x, w)
  assert got.shape == (2, 4, 4, 4)
  assert _max_rel_err(got, ref) < 1e-6


def test_bfloat16_as_close_as_xla_conv():
  x, w, g = _arrays((2, 6, 6, 32), (1, 1, 32, 16), (1, 1), dtype=jnp.bfloat16, seed=4)
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  ref = (np.einsum("bhwc,cd->bhwd", x64, w64[0, 0]), np.einsum("bhwd,cd->bhwc", g64, w64[0, 0]),
         np.einsum("bhwc,bhwd->cd", x64, g64)[None, None])
  got = jax.jit(lambda *a: _value_and_vjps(pointwise.pointwise_conv2d, *a))(x, w, g)
  xla = jax.jit(lambda *a: _value_and_vjps(
      lambda p, q: _lax_conv(p, q, (1, 1), "VALID"), *a))(x, w, g)
  for name, a, c, r in zip(("y", "dx", "dkernel"), got, xla, ref):
    assert a.dtype == jnp.bfloat16, name
    assert _max_rel_err(a, r) <= _max_rel_err(c, r) + 2 ** -8, name


def _lowered_text(fn, platform: str, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_dispatch_gemm_on_cpu_convolution_elsewhere():
  x, w, g = _arrays((2, 8, 8, 4), (1, 1, 4, 6), (2, 2))

  def train_like(x, w):
    def loss(a, b):
      y = pointwise.conv_general_dilated(a, b, (2, 2), "VALID", dimension_numbers=_DN)
      return jnp.sum(y * g)

    return jax.grad(loss, (0, 1))(x, w)

  cpu = _lowered_text(train_like, "cpu", x, w)
  assert "stablehlo.convolution" not in cpu and "stablehlo.dot_general" in cpu
  gpu = _lowered_text(train_like, "cuda", x, w)  # lowering only: no GPU needed
  assert "stablehlo.convolution" in gpu and "stablehlo.dot_general" not in gpu
  compiled = jax.jit(train_like).lower(x, w).compile().as_text()
  assert "convolution(" not in compiled and "conditional(" not in compiled


@pytest.mark.parametrize("kernel_shape, kwargs", [
    ((3, 3, 4, 6), {}),  # not 1x1
    ((1, 1, 4, 6), {"batch_group_count": 2}),  # batch-grouped (a kernel-gradient form)
    # dilation of a 1x1 window is a no-op but not the plain form
    ((1, 1, 4, 6), {"rhs_dilation": (2, 2)}),
])
def test_other_convolutions_stay_lax(kernel_shape, kwargs):
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones(kernel_shape)
  def fn(a, b):
    return pointwise.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=_DN, **kwargs)

  assert "stablehlo.convolution" in _lowered_text(fn, "cpu", x, w)
  ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, **kwargs)
  np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(ref))


def test_nchw_layout_stays_lax():
  x, w = jnp.ones((2, 4, 8, 8)), jnp.ones((6, 4, 1, 1))
  def fn(a, b):
    return pointwise.conv_general_dilated(a, b, (1, 1), "VALID",
                                          dimension_numbers=("NCHW", "OIHW", "NCHW"))

  assert "stablehlo.convolution" in _lowered_text(fn, "cpu", x, w)


def test_layers_conv_data_parallel_equals_plain_nn_conv():
  """layers.conv (the models' conv) on a batch sharded over 8 CPU devices: same params, value and
  gradient."""
  x, _, _ = _arrays((16, 9, 9, 8), (1, 1, 8, 12), (2, 2), seed=5)
  ours = layers.conv(12, 1, strides=2)
  plain = nn.Conv(12, (1, 1), strides=(2, 2), padding=((0, 0), (0, 0)), use_bias=False)
  variables = jax.jit(ours.init)(jax.random.key(0), x)
  plain_shapes = jax.eval_shape(plain.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, plain_shapes)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))

  def loss(module):
    return jax.jit(jax.value_and_grad(lambda v, a: jnp.sum(jnp.tanh(module.apply(v, a)) ** 2)))

  value, grads = loss(ours)(variables, xs)
  ref_value, ref_grads = loss(plain)(variables, x)
  assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
  assert _max_rel_err(grads["params"]["kernel"], ref_grads["params"]["kernel"]) < 1e-5


def test_bad_arguments_name_the_shapes():
  with pytest.raises(ValueError, match=r"kernel \[1, 1, C / groups, O\].*\(3, 3, 4, 6\)"):
    pointwise.pointwise_conv2d(jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 6)))
  with pytest.raises(ValueError, match=r"x \(2, 8, 8, 5\)"):
    pointwise.pointwise_conv2d(jnp.zeros((2, 8, 8, 5)), jnp.zeros((1, 1, 4, 6)))
  with pytest.raises(ValueError, match=r"groups 4"):
    pointwise.pointwise_conv2d(jnp.zeros((2, 8, 8, 8)), jnp.zeros((1, 1, 2, 6)), groups=4)
