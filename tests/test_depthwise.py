"""jaxkd.models.depthwise: the CPU shifted-slice path equals XLA's grouped convolution.

Compared with: `lax.conv_general_dilated(feature_group_count=C)` (value, jax.vjp for both
gradients, jax.jvp) and, for one small case, a float64 NumPy loop written from
y[b, h, w, c] = sum_{i,j} xp[b, s*h + i, s*w + j, c] * k[i, j, 0, c].
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd.models import depthwise
from jaxkd.models.depthwise import depthwise_conv2d, shift_depthwise_conv2d, xla_depthwise_conv2d
from jaxkd.models.layers import DepthwiseConv


def _max_rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _value_and_vjps(conv, x, k, g, strides, padding):
  """y, dL/dx, dL/dk for L = <y, g> (call inside jit)."""
  y, pullback = jax.vjp(lambda a, b: conv(a, b, strides=strides, padding=padding), x, k)
  return (y, *pullback(g))


def _inputs(shape, k, channels, strides, padding, dtype=jnp.float32, seed=0):
  """x [*shape, C], kernel [*k, 1, C] and an output cotangent g, standard normal (NumPy: no
  compiles)."""
  rng = np.random.default_rng(seed)
  s = (strides, strides) if isinstance(strides, int) else strides
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  out = [(n + lo + hi - kk) // st + 1 for n, (lo, hi), kk, st in zip(shape[1:], padding, k, s)]
  arrays = (rng.standard_normal(shape + (channels,)), rng.standard_normal(k + (1, channels)),
            rng.standard_normal((shape[0], *out, channels)))
  return tuple(jnp.asarray(a, jnp.float32).astype(dtype) for a in arrays)


def _compare_cases(cases, convs, tol=1e-5):
  """cases: (label, x, kernel, g, strides, padding). One jit computes every case with lax and each
  of `convs`."""

  @jax.jit
  def run(arrays):
    out = []
    for (_, _, _, _, s, pad), (x, k, g) in zip(cases, arrays):
      out.append([_value_and_vjps(conv, x, k, g, s, pad)
                  for conv in (xla_depthwise_conv2d,) + convs])
    return out

  results = run([case[1:4] for case in cases])
  for case, (ref, *gots) in zip(cases, results):
    for conv, got in zip(convs, gots):
      for name, a, b in zip(("y", "dx", "dkernel"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (case[0], name)
        err = _max_rel_err(a, b)
        assert err < tol, (case[0], conv.__name__, name, err)


# MobileNet/ShuffleNet cases: k 3 and 5, stride 1 and 2, even and odd sizes, symmetric padding
# (k-1)//2.
@pytest.mark.parametrize("k", (3, 5))
@pytest.mark.parametrize("s", (1, 2))
def test_grid_matches_lax_value_and_gradients(k, s):
  pad = (k - 1) // 2
  cases = []
  for size in ((8, 8), (9, 7)):
    for c in (1, 12):
      cases.append((f"size {size} C {c}", *_inputs((2,) + size, (k, k), c, s, pad, seed=c), s, pad))
  # on CPU the dispatcher is the shift path (test_dispatch_... checks the compiled program)
  _compare_cases(cases, (shift_depthwise_conv2d, depthwise_conv2d))


def test_edge_cases_match_lax():
  """The phase bookkeeping: 1x1 and 2x2 kernels, kernel < stride, stride 3, no / asymmetric / large
  padding, non-square kernel, different strides per axis."""
  edges = [((7, 8), (1, 1), 2, 0), ((6, 9), (2, 2), 1, 0), ((9, 9), (2, 2), 3, ((1, 0), (0, 1))),
           ((10, 11), (3, 3), 3, 1), ((8, 8), (3, 5), (2, 1), ((1, 1), (2, 2))),
           ((5, 6), (3, 3), 2, 2), ((7, 7), (5, 5), 2, ((2, 1), (0, 3)))]
  cases = [(f"size {size} k {k} s {s} pad {pad}",
            *_inputs((2,) + size, k, 3, s, pad, seed=i), s, pad)
           for i, (size, k, s, pad) in enumerate(edges)]
  _compare_cases(cases, (shift_depthwise_conv2d,))


def test_forward_matches_float64_numpy_loop():
  x, kernel, _ = _inputs((2, 7, 6), (3, 3), 4, 2, 1, seed=2)
  xn, kn = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  xp = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (7 + 2 - 3) // 2 + 1, (6 + 2 - 3) // 2 + 1
  ref = np.zeros((2, ho, wo, 4))
  for h in range(ho):
    for w in range(wo):
      window = xp[:, 2 * h:2 * h + 3, 2 * w:2 * w + 3, :]
      ref[:, h, w, :] = np.einsum("bijc,ijc->bc", window, kn[:, :, 0, :])
  got = jax.jit(lambda a, b: depthwise_conv2d(a, b, strides=2, padding=1))(x, kernel)
  assert _max_rel_err(got, ref) < 1e-6


def test_forward_mode_and_second_order():
  x, kernel, g = _inputs((2, 9, 8), (5, 5), 4, 2, 2, seed=3)
  tx, tk, _ = _inputs((2, 9, 8), (5, 5), 4, 2, 2, seed=7)

  def jvp(conv):
    def tangent():
      return jax.jvp(lambda a, b: conv(a, b, strides=2, padding=2), (x, kernel), (tx, tk))[1]

    return jax.jit(tangent)()

  assert _max_rel_err(jvp(depthwise_conv2d), jvp(xla_depthwise_conv2d)) < 1e-5

  def grad_of_grad(conv):  # d/dk of |dL/dk|^2, L = sum(sin(conv))
    inner = jax.grad(lambda b: jnp.sum(jnp.sin(conv(x, b, strides=2, padding=2))))
    return jax.jit(jax.grad(lambda b: jnp.sum(inner(b) ** 2)))(kernel)

  assert _max_rel_err(grad_of_grad(depthwise_conv2d), grad_of_grad(xla_depthwise_conv2d)) < 1e-4


@pytest.mark.parametrize("s", (1, 2))
def test_bfloat16_within_bf16_tolerance(s):
  x, kernel, g = _inputs((2, 10, 9), (3, 3), 16, s, 1, dtype=jnp.bfloat16, seed=4)
  def up(a):
    return a.astype(jnp.float32)

  @jax.jit
  def run(x, kernel, g):
    # the first is the exact float32 result of the bf16 values
    return (_value_and_vjps(xla_depthwise_conv2d, up(x), up(kernel), up(g), s, 1),
            _value_and_vjps(depthwise_conv2d, x, kernel, g, s, 1),
            _value_and_vjps(xla_depthwise_conv2d, x, kernel, g, s, 1))

  ref, got, lax_bf16 = run(x, kernel, g)
  for name, a, b, c in zip(("y", "dx", "dkernel"), got, ref, lax_bf16):
    assert a.dtype == jnp.bfloat16
    # float32 accumulation, one rounding to bf16 (8 significant bits): within 2^-8 of the largest
    # value
    assert _max_rel_err(a, b) < 2 ** -8, (name, _max_rel_err(a, b))
    # as close as XLA's own bf16 convolution
    assert _max_rel_err(a, b) <= _max_rel_err(c, b) + 2 ** -8, name


def _lowered_text(fn, platform: str, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _grouped_convolutions(text: str) -> int:
  counts = re.findall(r"(?:feature|batch)_group_count = (\d+)", text)
  return sum(int(c) > 1 for c in counts)


def test_dispatch_cpu_has_no_grouped_convolution_and_gpu_keeps_it():
  x, kernel, g = _inputs((2, 8, 8), (3, 3), 8, 2, 1)

  def train_like(x, k):
    def loss(a, b):
      return jnp.sum(depthwise_conv2d(a, b, strides=2, padding=1) * g)

    return jax.grad(loss, (0, 1))(x, k)

  for fn in (lambda x, k: depthwise_conv2d(x, k, strides=2, padding=1), train_like):
    cpu = _lowered_text(fn, "cpu", x, kernel)
    assert "stablehlo.convolution" not in cpu and _grouped_convolutions(cpu) == 0
    gpu = _lowered_text(fn, "cuda", x, kernel)  # lowering only: no GPU needed
    assert _grouped_convolutions(gpu) >= 1 and "stablehlo.reduce" not in gpu
  # both gradients on GPU are XLA's own transposes (cuDNN): a grouped and a batch-grouped
  # convolution
  gpu = _lowered_text(train_like, "cuda", x, kernel)
  assert "feature_group_count = 8" in gpu and "batch_group_count = 8" in gpu
  # and what XLA:CPU finally compiles has no convolution and no leftover platform conditional
  compiled = jax.jit(train_like).lower(x, kernel).compile().as_text()
  assert "convolution(" not in compiled and "conditional(" not in compiled


def test_layer_and_data_parallel_jit():
  """DepthwiseConv (layers.py) through the dispatcher, batch sharded over the 8 CPU devices."""
  x, _, _ = _inputs((16, 12, 12), (3, 3), 8, 2, 1, seed=5)
  layer = DepthwiseConv(5, strides=2)
  variables = jax.jit(layer.init)(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))

  def loss(v, x):
    return jnp.sum(jnp.tanh(layer.apply(v, x)) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables, xs)
  ref_value, ref_grad = jax.jit(jax.value_and_grad(
      lambda k: jnp.sum(jnp.tanh(xla_depthwise_conv2d(x, k, strides=2, padding=2)) ** 2)))(kernel)
  assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
  assert _max_rel_err(grads["params"]["kernel"], ref_grad) < 1e-5


def test_bad_arguments_name_the_value():
  x = jnp.zeros((2, 8, 8, 4))
  with pytest.raises(ValueError, match=r"\[kh, kw, 1, C\]"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 4, 1)))
  with pytest.raises(TypeError, match="bfloat16"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4), jnp.bfloat16))
  with pytest.raises(ValueError, match="padding"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), padding="SAME")
  with pytest.raises(ValueError, match="strides"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), strides=0)
  with pytest.raises(ValueError, match="smaller than the kernel"):
    depthwise_conv2d(jnp.zeros((1, 2, 2, 4)), jnp.zeros((5, 5, 1, 4)))
  assert depthwise._out_size(112, 3, 2, (1, 1)) == 56
