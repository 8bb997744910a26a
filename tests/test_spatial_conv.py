"""jaxkd.models.spatial_conv: k x k convolutions whose CPU gradients are chosen per shape.

Compared with float64 NumPy written from the definition (xp the padded input)

    y[b, h, w, :]   = sum_{i,j} xp[b, s*h + i, s*w + j, :] @ W[i, j]
    dW[i, j]        = sum_{b,h,w} xp[b, s*h + i, s*w + j, :]^T dy[b, h, w, :]
    dxp[b, s*h + i, s*w + j, :] += dy[b, h, w, :] @ W[i, j]^T   (then cropped to x)

for shapes that take each kernel-gradient method ('shift', 'im2col', 'xla') and each input-gradient
method ('phases', 'xla'), and with lax.conv_general_dilated's forward-mode derivative.
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

from jaxkd.models import layers, spatial_conv

_DN = ("NHWC", "HWIO", "NHWC")


def _max_rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _numpy_conv_and_grads(x, w, dy, strides, pad):
  """float64 value, dx and dW from the definition in the module docstring."""
  x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
  (sh, sw), ((ph0, ph1), (pw0, pw1)) = strides, pad
  kh, kw = w.shape[:2]
  xp = np.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  dw = np.zeros_like(w)
  dxp = np.zeros_like(xp)
  for i in range(kh):
    for j in range(kw):
      tap = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      y += tap @ w[i, j]
      if dy is not None:
        dw[i, j] = np.einsum("bhwc,bhwd->cd", tap, dy)
        dxp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dy @ w[i, j].T
  dx = dxp[:, ph0:ph0 + x.shape[1], pw0:pw0 + x.shape[2]]
  return y, dx, dw


def _out_hw(x_shape, k, strides, pad):
  return tuple((n + lo + hi - kk) // s + 1
               for n, kk, s, (lo, hi) in zip(x_shape[1:3], k, strides, pad))


# (x shape, kernel (kh, kw), Cout, strides, padding, the kernel- and input-gradient methods)
CASES = [
    ((2, 23, 21, 3), (7, 7), 8, (2, 2), ((3, 3), (3, 3)), "im2col", "phases"),  # a ResNet stem
    ((2, 12, 12, 64), (3, 3), 16, (1, 1), ((1, 1), (1, 1)), "shift", "xla"),
    ((2, 24, 23, 64), (3, 3), 16, (2, 2), ((1, 1), (1, 1)), "shift", "phases"),
    ((1, 31, 33, 64), (3, 5), 8, (3, 2), ((1, 0), (2, 2)), "shift", "phases"),
    ((2, 13, 13, 5), (3, 3), 7, (2, 2), ((1, 1), (1, 1)), "shift", "xla"),  # 49 output pixels
    ((2, 6, 6, 80), (3, 3), 8, (1, 1), ((1, 1), (1, 1)), "shift", "xla"),  # 36 output pixels
    ((2, 30, 28, 4), (5, 5), 6, (2, 2), ((2, 1), (0, 2)), "im2col", "phases"),
    ((1, 40, 40, 64), (2, 2), 8, (3, 3), ((0, 0), (0, 0)), "shift", "phases"),  # kernel < stride
]


# The whole batch in one chunk (CHUNK_BYTES default) for every case, and one image per chunk
# (the kernel gradient's scan over 2 chunks) for a stem, a stride-1 and a strided layer.
CHUNKED = [(case, None) for case in CASES] + [(CASES[i], 1) for i in (0, 1, 2)]


@pytest.mark.parametrize("case,chunk_bytes", CHUNKED,
                         ids=[f"{i}-{'per-image' if c else 'one-chunk'}"
                              for i, (_, c) in enumerate(CHUNKED)])
def test_value_and_gradients_match_float64(case, chunk_bytes, monkeypatch):
  x_shape, kernel, cout, strides, pad, kernel_method, input_method = case
  if chunk_bytes is not None:
    monkeypatch.setattr(spatial_conv, "CHUNK_BYTES", chunk_bytes)
  out_hw = _out_hw(x_shape, kernel, strides, pad)
  assert spatial_conv.kernel_grad_method(x_shape[3], kernel, out_hw) == kernel_method
  expected_input = "xla" if out_hw[0] * out_hw[1] < 100 or strides == (1, 1) else "phases"
  assert spatial_conv.input_grad_method(strides, out_hw) == input_method == expected_input
  rng = np.random.default_rng(0)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal((*kernel, x_shape[3], cout)).astype(np.float32)
  dy = rng.standard_normal((x_shape[0], *out_hw, cout)).astype(np.float32)

  def value_and_grads(x, w, dy):
    y, pullback = jax.vjp(lambda a, b: spatial_conv.cpu_conv2d(a, b, strides, pad), x, w)
    return (y, *pullback(dy))

  got = jax.jit(value_and_grads)(x, w, dy)
  ref = _numpy_conv_and_grads(x, w, dy, strides, pad)
  for name, g, r in zip(("value", "dx", "dW"), got, ref):
    assert _max_rel_err(g, r) < 2e-6, (name, _max_rel_err(g, r))


def test_forward_mode_matches_lax():
  x_shape, strides, pad = (2, 20, 20, 64), (2, 2), ((1, 1), (1, 1))
  rng = np.random.default_rng(1)
  x, tx = (jnp.asarray(rng.standard_normal(x_shape), jnp.float32) for _ in range(2))
  w, tw = (jnp.asarray(rng.standard_normal((3, 3, 64, 8)), jnp.float32) for _ in range(2))
  ours = jax.jvp(lambda a, b: spatial_conv.cpu_conv2d(a, b, strides, pad), (x, w), (tx, tw))
  theirs = jax.jvp(lambda a, b: lax.conv_general_dilated(a, b, strides, pad, dimension_numbers=_DN),
                   (x, w), (tx, tw))
  for got, ref in zip(ours, theirs):
    assert _max_rel_err(got, ref) < 2e-6


def test_bfloat16_gradients_accumulate_in_float32():
  x_shape, strides, pad = (2, 24, 24, 64), (2, 2), ((1, 1), (1, 1))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 16)), jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((2, 12, 12, 16)), jnp.bfloat16)
  _, pullback = jax.vjp(lambda a, b: spatial_conv.cpu_conv2d(a, b, strides, pad), x, w)
  dx, dw = pullback(dy)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  _, ref_dx, ref_dw = _numpy_conv_and_grads(x.astype(jnp.float32), w.astype(jnp.float32),
                                            dy.astype(jnp.float32), strides, pad)
  # one bfloat16 rounding of a float32 sum (relative 2^-8), not one per partial sum
  assert _max_rel_err(dx, ref_dx) < 8e-3
  assert _max_rel_err(dw, ref_dw) < 8e-3


def test_flax_conv_takes_the_cpu_path_and_matches_lax_on_a_sharded_batch():
  """`layers.conv` (nn.Conv with spatial_conv.conv_general_dilated) under jit with the batch
  sharded over the 8 devices: the kernel gradient is a sum over the global batch."""
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.devices.size == 8
  module = layers.conv(16, 3, strides=2)
  reference = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((16, 20, 20, 64)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((16, 10, 10, 16)), jnp.float32)
  params = module.init(jax.random.key(0), x[:1])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape,
                                                         reference.init(jax.random.key(0), x[:1]))
  shard = NamedSharding(mesh, P("batch"))
  x, g = jax.device_put(x, shard), jax.device_put(g, shard)

  def grads(m):
    def loss(p, x):
      return jnp.sum(m.apply(p, x) * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  jaxpr = str(jax.make_jaxpr(lambda p, x: module.apply(p, x))(params, x))
  assert "custom_jvp_call" in jaxpr and "platform_index" in jaxpr
  (dp, dx), (rp, rx) = grads(module), grads(reference)
  assert _max_rel_err(dp["params"]["kernel"], rp["params"]["kernel"]) < 2e-6
  assert _max_rel_err(dx, rx) < 2e-6


@pytest.mark.parametrize("kwargs", [
    dict(feature_group_count=2),  # grouped: XLA's
    dict(rhs_dilation=(2, 2)),  # dilated: XLA's
    dict(preferred_element_type=jnp.float32),
])
def test_other_convolutions_are_xla_s(kwargs):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4 // kwargs.get("feature_group_count", 1), 6)),
                  jnp.float32)
  pad = ((1, 1), (1, 1))

  def f(a, b):
    return spatial_conv.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=_DN, **kwargs)

  assert "custom_jvp_call" not in str(jax.make_jaxpr(f)(x, w))
  ref = lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_DN, **kwargs)
  np.testing.assert_array_equal(f(x, w), ref)


def test_resnet_stem_and_stage_shapes_take_the_measured_methods():
  """The rule of the module docstring at ResNet-50's shapes (batch 32, 224 px)."""
  assert spatial_conv.kernel_grad_method(3, (7, 7), (112, 112)) == "im2col"
  assert spatial_conv.kernel_grad_method(3, (3, 3), (112, 112)) == "shift"  # MobileNetV3 stem
  assert spatial_conv.kernel_grad_method(128, (3, 3), (28, 28)) == "shift"
  assert spatial_conv.kernel_grad_method(512, (3, 3), (7, 7)) == "shift"
  assert spatial_conv.input_grad_method((2, 2), (28, 28)) == "phases"
  assert spatial_conv.input_grad_method((2, 2), (7, 7)) == "xla"


def test_xla_gradients_opt_out_allows_per_example_gradients(monkeypatch):
  """With JAXKD_XLA_GRADIENTS=1 models use XLA's operations, which every transformation supports:
  jax.vmap of a gradient through a k x k convolution, a depthwise convolution and max pooling."""
  from jaxkd.models import derivatives, pooling
  monkeypatch.setenv(derivatives.ENV, "1")
  conv = layers.conv(4, 3, strides=2)
  depthwise = layers.DepthwiseConv(3)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 12, 12, 8)), jnp.float32)
  pc = conv.init(jax.random.key(0), x[:1])
  pd = depthwise.init(jax.random.key(1), jnp.zeros((1, 6, 6, 4)))

  def loss(params, image):
    y = depthwise.apply(params[1], conv.apply(params[0], image[None]))
    return jnp.sum(pooling.max_pool(y, 3, 2, 1) ** 2)

  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))((pc, pd), x)
  for i in range(3):
    one = jax.grad(loss)((pc, pd), x[i])
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(one)):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
  assert "custom_jvp_call" not in str(jax.make_jaxpr(loss)((pc, pd), x[0]))


@pytest.mark.parametrize("batch,per_image,budget,expected", [
    (64, 65536, 1 << 20, 16),  # CIFAR 16 channels at 32 px: 16 images per chunk
    (32, 802816, 1 << 20, 1),  # ResNet-50 64 channels at 56 px: one image
    (32, 200704, 1 << 20, 4),  # 5 would fit; 4 is the largest divisor of 32 that does
    (6, 10, 1 << 20, 6),  # the whole batch
    (7, 1 << 21, 1 << 20, 1),  # an image larger than the budget: still one
])
def test_batch_chunk_is_the_largest_divisor_that_fits(batch, per_image, budget, expected):
  assert spatial_conv.batch_chunk(batch, per_image, budget) == expected
