"""Batch normalization (Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015) with a hand-written gradient.

Training mode, per channel c over the N = B*H*W (global) positions of x [..., C]:

    mean = E[x],   var = max(E[x^2] - mean^2, 0)   (biased, as Flax's use_fast_variance)
    k = scale * rsqrt(var + eps),   y = (x - mean) * k + bias

Gradient, with g = dL/dy, sg = sum(g), sgx = sum(g * (x - mean)) (one pass over g and x),
and the cotangents dmean, dvar of the returned batch statistics:

    dbias = sg,   dscale = sgx * rsqrt(var + eps)
    dx = k * g + (2 dvar / N - k rsqrt(var + eps)^2 sgx / N) * (x - mean) + (dmean - k sg) / N

`nn.BatchNorm`'s gradient is left to autodiff, which XLA:CPU computes in about
five passes over the activation (three reductions and two elementwise fusions);
the formula above needs one reduction pass and one elementwise pass. The
forward is Flax's computation (float32 statistics, output in the compute dtype),
so values, parameter names (`scale`, `bias`) and running statistics
(`batch_stats` `mean`, `var`, updated as m * running + (1 - m) * batch) are
those of `nn.BatchNorm`, and a checkpoint of either loads into the other.
Under shard_map/pmap, `axis_name` averages the statistics over devices and the
gradients follow autodiff of that: x's gradient sums the reductions (and the
statistics' cotangents) over devices, the parameter gradients stay per device
(sum or average them as for any replicated parameter). Under jax.jit over a
Mesh the batch axis is global and XLA inserts the collectives.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _count(x: jax.Array, axis_name: str | None) -> jax.Array:
  n = jnp.asarray(x.size // x.shape[-1], jnp.float32)
  return n if axis_name is None else lax.psum(n, axis_name)


def _reduce_sums(*values: jax.Array) -> jax.Array:
  """[len(values), C]: each float32 [..., C] value summed over every axis but the last."""
  axes = _axes(values[0])
  return jnp.stack([jnp.sum(v, axes) for v in values])


def _gemm_sums(*values: jax.Array) -> jax.Array:
  """`_reduce_sums` as products ones[1, N] @ v[N, C] (XLA:CPU's fast path, see `channel_sums`)."""
  n = values[0].size // values[0].shape[-1]
  ones = jnp.ones((1, n), jnp.float32)
  return jnp.concatenate([jnp.dot(ones, v.reshape(n, v.shape[-1]),
                                  precision=lax.Precision.HIGHEST) for v in values])


# Smallest activation (elements, as traced) whose CPU channel sums run as GEMMs; see channel_sums.
GEMM_SUM_MIN_ELEMENTS = 1 << 22


def channel_sums(*values: jax.Array) -> jax.Array:
  """Per-channel sums [len(values), C] of float32 arrays [..., C] (over batch and space).

  On CPU, activations of at least `GEMM_SUM_MIN_ELEMENTS` elements are summed as
  matrix products with a vector of ones. XLA:CPU lowers a sum over the B*H*W rows of
  a large NHWC activation to a column reduction (a reduce-window tree) that ran at
  0.4-1 GB/s: in a float32 ResNet-50 training step at batch 32 the batch-norm sums
  took 4.6 s of 10.7 s, and with them as GEMMs the step took 7.4 s. Below the threshold
  XLA's reduction, which fuses the product it sums, was faster: MobileNetV3-Large's
  step at batch 32 was 6-12% slower with every sum as a GEMM and 5-13% faster with
  the threshold than with none (two runs each on a 2-core Intel Xeon with AVX-512,
  jaxlib 0.10.1).
  Elsewhere (GPU, TPU) XLA's own reduction.
  """
  if values[0].size < GEMM_SUM_MIN_ELEMENTS:
    return _reduce_sums(*values)
  return lax.platform_dependent(*values, cpu=_gemm_sums, default=_reduce_sums)


def _stats(xf: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  moments = channel_sums(xf, xf * xf) / (xf.size // xf.shape[-1])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean, mean_sq = moments[0], moments[1]
  return mean, jnp.maximum(mean_sq - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None,
                     dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalizes x [..., C] with its batch statistics; returns (y in `dtype`, batch mean,
  batch variance)."""
  return _forward(x, scale, bias, epsilon, axis_name, dtype)[0]


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
  """y = (x - mean) * k + bias in float32, rounded to `dtype`; also returns rsqrt(var + eps)
  and k."""
  inv = lax.rsqrt(var + epsilon)
  k = scale.astype(jnp.float32) * inv
  return ((x.astype(jnp.float32) - mean) * k + bias.astype(jnp.float32)).astype(dtype), inv, k


def _forward(x, scale, bias, epsilon, axis_name, dtype):
  mean, var = _stats(x.astype(jnp.float32), axis_name)
  y, inv, k = _normalize(x, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, inv, k)


def _fwd(x, scale, bias, epsilon, axis_name, dtype):
  out, residuals = _forward(x, scale, bias, epsilon, axis_name, dtype)
  return out, (residuals, scale, bias)


def _bwd(epsilon, axis_name, dtype, saved, cotangents):
  (x, mean, inv, k), scale, bias = saved
  g, dmean, dvar = cotangents
  gf = g.astype(jnp.float32)
  centered = x.astype(jnp.float32) - mean
  local = channel_sums(gf, gf * centered)
  # parameter gradients are this device's (as autodiff of nn.BatchNorm gives them); x's gradient
  # sees every device's outputs and statistics' cotangents through the shared statistics
  dscale, dbias = (local[1] * inv).astype(scale.dtype), local[0].astype(bias.dtype)
  sg, sgx = local[0], local[1]
  if axis_name is not None:
    sg, sgx, dmean, dvar = lax.psum(jnp.concatenate([local, jnp.stack([dmean, dvar])]), axis_name)
  n = _count(x, axis_name)
  slope = 2.0 * dvar / n - k * inv * inv * sgx / n
  offset = (dmean - k * sg) / n
  dx = (k * gf + slope * centered + offset).astype(x.dtype)
  return dx, dscale, dbias


batch_norm_train.defvjp(_fwd, _bwd)


class BatchNorm(nn.Module):
  """Drop-in for `nn.BatchNorm` over the last axis (the subset of options the models use).

  use_running_average: normalise with the running statistics (eval) instead of the batch's.
  momentum: Flax's (running = momentum * running + (1 - momentum) * batch).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    if self.use_running_average:
      return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)[0]
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name, dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y
