"""jaxkd.models.batchnorm: the hand-written BatchNorm gradient equals autodiff of nn.BatchNorm.

Compared with: Flax's nn.BatchNorm (value, running statistics, and jax.vjp of its autodiff
gradient), a float64 NumPy forward written from y = (x - E[x]) / sqrt(Var[x] + eps) * scale + bias,
and the same layer on the global batch for the shard_map (axis_name) case.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxkd.models import batchnorm, layers


def _max_rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _data(shape, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, c) + offset + rng.standard_normal(c)
  return (jnp.asarray(x, jnp.float32), jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
          jnp.asarray(rng.standard_normal(c), jnp.float32),
          jnp.asarray(rng.standard_normal(shape), jnp.float32))


def _variables(scale, bias, c):
  return {"params": {"scale": scale, "bias": bias},
          "batch_stats": {"mean": jnp.linspace(-1.0, 1.0, c), "var": jnp.linspace(0.5, 2.0, c)}}


def _train_apply(module, variables, x):
  return module.apply(variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("shape, eps, momentum", [((4, 6, 5, 8), 1e-5, 0.9),
                                                  ((3, 7, 7, 16), 1e-3, 0.99),
                                                  ((16, 3), 1e-5, 0.9)])
def test_train_mode_matches_flax_value_stats_and_gradients(shape, eps, momentum):
  x, scale, bias, g = _data(shape, seed=len(shape) + shape[-1])
  ours = batchnorm.BatchNorm(momentum=momentum, epsilon=eps)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=momentum, epsilon=eps)
  variables = _variables(scale, bias, shape[-1])

  @jax.jit
  def run(variables, x):
    out = []
    for module in (ours, flax_bn):
      def f(params, x, module=module):
        y, state = _train_apply(
            module, {"params": params, "batch_stats": variables["batch_stats"]}, x)
        # the loss also reads the updated running statistics, so their cotangents are exercised
        return y, state["batch_stats"]
      (y, stats), pullback = jax.vjp(f, variables["params"], x)
      stat_ct = {"mean": jnp.linspace(0.3, -0.2, shape[-1]),
                 "var": jnp.linspace(-0.5, 0.4, shape[-1])}
      dparams, dx = pullback((g, stat_ct))
      out.append((y, stats, dparams, dx))
    return out

  (y, stats, dparams, dx), (ref_y, ref_stats, ref_dparams, ref_dx) = run(variables, x)
  assert _max_rel_err(y, ref_y) < 1e-6
  for name in ("mean", "var"):
    assert _max_rel_err(stats[name], ref_stats[name]) < 1e-6, name
  for name in ("scale", "bias"):
    assert _max_rel_err(dparams[name], ref_dparams[name]) < 2e-5, name
  assert _max_rel_err(dx, ref_dx) < 2e-5

  # float64 NumPy forward from the definition
  x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
  scale64, bias64 = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
  ref64 = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + eps) * scale64 + bias64
  assert _max_rel_err(np.asarray(y).reshape(-1, shape[-1]), ref64) < 1e-5


def test_gradient_matches_float64_finite_differences():
  """Independent of Flax: central differences of a float64 NumPy BatchNorm loss."""
  x, scale, bias, g = _data((3, 4, 4, 3), seed=7)
  eps = 1e-3

  def loss64(x, scale, bias):
    x2 = x.reshape(-1, x.shape[-1])
    y = (x2 - x2.mean(0)) / np.sqrt(x2.var(0) + eps) * scale + bias
    return float(np.sum(y.reshape(x.shape) * np.asarray(g, np.float64)))

  def loss(x, s, b):
    return jnp.sum(batchnorm.batch_norm_train(x, s, b, eps, None, jnp.float32)[0] * g)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
  args = [np.asarray(a, np.float64) for a in (x, scale, bias)]
  h = 1e-6
  for i, got in enumerate(grads):
    ref = np.zeros_like(args[i])
    for idx in np.ndindex(args[i].shape):
      plus = [a.copy() for a in args]
      minus = [a.copy() for a in args]
      plus[i][idx] += h
      minus[i][idx] -= h
      ref[idx] = (loss64(*plus) - loss64(*minus)) / (2 * h)
    assert _max_rel_err(got, ref) < 1e-4, i


def test_large_mean_keeps_precision():
  """Activations with |mean| >> std: the gradient uses x - mean, so it stays accurate in float32."""
  x, scale, bias, g = _data((8, 5, 5, 4), seed=3, offset=100.0)
  def loss(x):
    return jnp.sum(batchnorm.batch_norm_train(x, scale, bias, 1e-3, None, jnp.float32)[0] * g)

  ours = jax.jit(jax.grad(loss))(x)
  x64, g64 = np.asarray(x, np.float64).reshape(-1, 4), np.asarray(g, np.float64).reshape(-1, 4)
  n = x64.shape[0]
  xc = x64 - x64.mean(0)
  inv = 1.0 / np.sqrt(x64.var(0) + 1e-3)
  ref = (np.asarray(scale, np.float64) * inv / n
         * (n * g64 - g64.sum(0) - xc * inv ** 2 * (g64 * xc).sum(0)))
  # float32 itself resolves the mean of ~100 only to ~1e-5 relative: the variance E[x^2] - E[x]^2
  # loses ~|mean|^2 / var * 2^-24 ~ 1e-3 of it; the gradient must not lose more than that
  assert _max_rel_err(np.asarray(ours).reshape(-1, 4), ref) < 5e-3


def test_eval_mode_uses_running_statistics():
  x, scale, bias, _ = _data((4, 3, 3, 6), seed=2)
  variables = _variables(scale, bias, 6)
  ours = batchnorm.BatchNorm(use_running_average=True, epsilon=1e-3).apply(variables, x)
  ref = nn.BatchNorm(use_running_average=True, epsilon=1e-3).apply(variables, x)
  assert _max_rel_err(ours, ref) < 1e-6


def test_init_matches_flax_variables():
  x = jnp.ones((2, 4, 4, 5))
  ours = jax.eval_shape(batchnorm.BatchNorm().init, jax.random.key(0), x)
  ref = jax.eval_shape(nn.BatchNorm(use_running_average=False).init, jax.random.key(0), x)
  def spec(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)

  assert spec(ours) == spec(ref)
  values = batchnorm.BatchNorm().init(jax.random.key(0), x)
  np.testing.assert_array_equal(values["batch_stats"]["var"], np.ones(5))
  np.testing.assert_array_equal(values["params"]["scale"], np.ones(5))


def test_bfloat16_output_with_float32_statistics():
  x, scale, bias, g = _data((4, 6, 6, 8), seed=9)
  xb = x.astype(jnp.bfloat16)
  module = layers.batch_norm(True, dtype=jnp.bfloat16)()  # the models' BatchNorm constructor
  variables = _variables(scale, bias, 8)
  (y, state), pullback = jax.vjp(lambda x: _train_apply(module, variables, x), xb)
  assert y.dtype == jnp.bfloat16 and state["batch_stats"]["mean"].dtype == jnp.float32
  (dx,) = pullback((g.astype(jnp.bfloat16), jax.tree.map(jnp.zeros_like, state)))
  assert dx.dtype == jnp.bfloat16
  ref_y = nn.BatchNorm(use_running_average=False, dtype=jnp.float32).apply(
      variables, xb.astype(jnp.float32), mutable=["batch_stats"])[0]
  assert _max_rel_err(y, ref_y) < 2 ** -7


def test_shard_map_axis_name_matches_flax_and_global_batch():
  """axis_name over the 8 devices: same as nn.BatchNorm(axis_name) under shard_map (values,
  statistics, gradients of x and of the parameters, statistics' cotangents included), and x's
  gradient equals that of the single global batch."""
  x, scale, bias, g = _data((16, 3, 3, 4), seed=4)
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.devices.size == 8
  variables = _variables(scale, bias, 4)

  def local(module, params, x, g):
    def loss(params, x):
      y, state = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
      return jnp.sum(y * g) + jnp.sum(state["batch_stats"]["mean"] * state["batch_stats"]["var"])
    value, (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    return jax.lax.psum(value, "batch"), jax.lax.psum(dparams, "batch"), dx

  results = []
  for module in (batchnorm.BatchNorm(axis_name="batch", momentum=0.9),
                 nn.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.9)):
    fn = jax.shard_map(functools.partial(local, module), mesh=mesh,
                       in_specs=(P(), P("batch"), P("batch")),
                       out_specs=(P(), P(), P("batch")), check_vma=False)
    results.append(jax.jit(fn)(variables["params"], x, g))
  (value, dparams, dx), (ref_value, ref_dparams, ref_dx) = results
  assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
  assert _max_rel_err(dx, ref_dx) < 2e-5
  for name in ("scale", "bias"):
    assert _max_rel_err(dparams[name], ref_dparams[name]) < 2e-5, name

  # the data term alone on the global batch, one device: x's gradient and the summed parameter
  # gradients
  def data_term(axis_name):
    def f(params, x, g):
      y = batchnorm.batch_norm_train(x, params["scale"], params["bias"], 1e-5, axis_name,
                                     jnp.float32)[0]
      return jnp.sum(y * g)
    return jax.grad(f, argnums=(0, 1))

  def summed(p, x, g):
    dp, dx = data_term("batch")(p, x, g)
    return jax.lax.psum(dp, "batch"), dx

  sharded = jax.shard_map(summed, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                          out_specs=(P(), P("batch")), check_vma=False)
  dp, dx = jax.jit(sharded)(variables["params"], x, g)
  ref_dp, ref_dx = jax.jit(data_term(None))(variables["params"], x, g)
  assert _max_rel_err(dx, ref_dx) < 2e-5
  for name in ("scale", "bias"):
    assert _max_rel_err(dp[name], ref_dp[name]) < 2e-5, name


def test_large_activation_sums_run_as_gemm_on_cpu_and_match_float64():
  """Activations of at least GEMM_SUM_MIN_ELEMENTS elements take the CPU's GEMM sums (ones @ x):
  the channel sums, the batch statistics and the gradient against NumPy float64, jitted over
  the 8-device mesh with the batch sharded."""
  shape = (8, 32, 32, 520)  # 4.26M elements >= 2**22
  assert np.prod(shape) >= batchnorm.GEMM_SUM_MIN_ELEMENTS
  rng = np.random.default_rng(3)
  x = rng.normal(1.5, 2.0, shape).astype(np.float32)
  g = rng.normal(0.0, 1.0, shape).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
  bias = rng.normal(0.0, 0.1, shape[-1]).astype(np.float32)
  lowered = jax.jit(lambda v: batchnorm.channel_sums(v, v * v)).lower(x).as_text()
  assert "dot_general" in lowered  # the GEMM branch is in the program (picked on CPU)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))

  def f(x, scale, bias):
    y, mean, var = batchnorm.batch_norm_train(x, scale, bias, 1e-5, None, jnp.float32)
    return jnp.sum(y * g), (mean, var)

  (_, (mean, var)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
      sharded, scale, bias)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  axes = (0, 1, 2)
  mean64, var64 = x64.mean(axes), x64.var(axes)
  np.testing.assert_allclose(mean, mean64, rtol=0, atol=1e-5)
  np.testing.assert_allclose(var, var64, rtol=1e-5)
  inv = 1.0 / np.sqrt(var64 + 1e-5)
  xhat = (x64 - mean64) * inv
  dscale64, dbias64 = (g64 * xhat).sum(axes), g64.sum(axes)
  n = x64.size // shape[-1]
  dx64 = scale * inv / n * (n * g64 - dbias64 - xhat * dscale64)
  np.testing.assert_allclose(grads[1], dscale64, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(grads[2], dbias64, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(np.asarray(grads[0]), dx64, rtol=0, atol=1e-5)
