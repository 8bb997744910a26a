"""jaxkd.losses against independent float64 NumPy references written from the formulas
(REFERENCE.md sections 4 and 5), plus the identities and edge cases the papers imply."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from jaxkd import losses

RTOL = 1e-5


# ---------------------------------------------------------------- references (float64 NumPy)

def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_kl(p, q):
  """KL(p || q) over the last axis for probability vectors."""
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), -1)


def ref_kd_per_example(zs, zt, T):
  return T**2 * np_kl(np_softmax(np.asarray(zt, np.float64) / T), np_softmax(np.asarray(zs, np.float64) / T))


def ref_tckd_nckd(zs, zt, y, T):
  """Written from Zhao et al. 2022: b = [p_y, 1 - p_y], p_hat over non-target classes."""
  tckd, nckd = [], []
  for i in range(zs.shape[0]):
    ps = np_softmax(zs[i].astype(np.float64) / T)
    pt = np_softmax(zt[i].astype(np.float64) / T)
    bs = np.array([ps[y[i]], 1 - ps[y[i]]])
    bt = np.array([pt[y[i]], 1 - pt[y[i]]])
    keep = np.arange(zs.shape[1]) != y[i]
    ps_hat = ps[keep] / ps[keep].sum()
    pt_hat = pt[keep] / pt[keep].sum()
    tckd.append(T**2 * np_kl(bt, bs))
    nckd.append(T**2 * np_kl(pt_hat, ps_hat))
  return np.array(tckd), np.array(nckd)


def ref_perception(z, w=None, eps=1e-6):
  z = np.asarray(z, np.float64)
  w = np.ones(z.shape[0]) if w is None else np.asarray(w, np.float64)
  sel = w > 0
  zz = z[sel]
  ww = w[sel][:, None]
  mean = (ww * zz).sum(0) / ww.sum()
  var = (ww * (zz - mean) ** 2).sum(0) / ww.sum()
  return (z - mean) / np.sqrt(var + eps)


def random_logits(seed, batch=16, classes=10, scale=3.0):
  rng = np.random.default_rng(seed)
  zs = (rng.normal(size=(batch, classes)) * scale).astype(np.float32)
  zt = (rng.normal(size=(batch, classes)) * scale).astype(np.float32)
  y = rng.integers(0, classes, size=batch).astype(np.int32)
  return zs, zt, y


def assert_close(actual, expected, rtol=RTOL, atol=1e-7):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values vs references

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(seed, smoothing):
  zs, _, y = random_logits(seed)
  C = zs.shape[1]
  q = np.eye(C)[y] * (1 - smoothing) + smoothing / C
  expected = np.mean(-np.sum(q * np_log_softmax(zs), -1))
  assert_close(losses.cross_entropy(zs, y, label_smoothing=smoothing), expected)


def test_cross_entropy_soft_labels():
  zs, zt, _ = random_logits(3)
  q = np_softmax(zt)
  expected = np.mean(-np.sum(q * np_log_softmax(zs), -1))
  assert_close(losses.cross_entropy(zs, q.astype(np.float32)), expected)


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_kd_matches_reference(T):
  zs, zt, _ = random_logits(int(T))
  assert_close(losses.kd_loss(zs, zt, temperature=T), ref_kd_per_example(zs, zt, T).mean())


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_tckd_nckd_and_dkd_match_reference(T):
  zs, zt, y = random_logits(7, batch=12, classes=20)
  tckd, nckd = losses.tckd_nckd(zs, zt, y, temperature=T)
  ref_t, ref_n = ref_tckd_nckd(zs, zt, y, T)
  assert_close(tckd, ref_t)
  assert_close(nckd, ref_n)
  alpha, beta = 1.0, 8.0
  assert_close(losses.dkd_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T),
               np.mean(alpha * ref_t + beta * ref_n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(seed):
  """Zhao et al. 2022, eq. (1): KD = TCKD + (1 - p_t[y]) * NCKD, per example (T^2 on both sides)."""
  T = 4.0
  zs, zt, y = random_logits(seed, batch=32, classes=100)
  tckd, nckd = losses.tckd_nckd(zs, zt, y, temperature=T)
  pt_y = np_softmax(zt.astype(np.float64) / T)[np.arange(len(y)), y]
  kd = ref_kd_per_example(zs, zt, T)
  assert_close(np.asarray(tckd, np.float64) + (1 - pt_y) * np.asarray(nckd, np.float64), kd, rtol=1e-5, atol=1e-6)
  # The identity is sharp: a wrong mask (another class as "target") or a dropped T^2 breaks it.
  tckd_bad, nckd_bad = losses.tckd_nckd(zs, zt, (y + 1) % 100, temperature=T)
  assert not np.allclose(np.asarray(tckd_bad) + (1 - pt_y) * np.asarray(nckd_bad), kd, rtol=1e-3)
  assert not np.allclose((np.asarray(tckd) + (1 - pt_y) * np.asarray(nckd)) / T**2, kd, rtol=1e-3)


def test_perception_reconstruct_matches_reference():
  zs, _, _ = random_logits(11, batch=64, classes=10, scale=5.0)
  zs = zs + 100.0  # a large common offset: the centred variance must not lose precision
  assert_close(losses.perception_reconstruct(zs), ref_perception(zs), rtol=1e-4, atol=1e-5)


def test_logit_standardize_matches_reference():
  zs, _, _ = random_logits(5, classes=30)
  z = zs.astype(np.float64)
  expected = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)
  assert_close(losses.logit_standardize(zs), expected, atol=1e-6)


def test_attention_transfer_matches_reference():
  rng = np.random.default_rng(0)
  fs = rng.normal(size=(4, 8, 8, 16)).astype(np.float32)
  ft = rng.normal(size=(4, 8, 8, 32)).astype(np.float32)

  def att(f):
    a = (np.abs(f.astype(np.float64)) ** 2).sum(-1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  expected = np.mean((att(fs) - att(ft)) ** 2)
  assert_close(losses.attention_transfer_loss(fs, ft), expected)
  # Different spatial sizes are resized (student map to the teacher's), giving a finite value.
  small = rng.normal(size=(4, 4, 4, 16)).astype(np.float32)
  assert np.isfinite(float(losses.attention_transfer_loss(small, ft)))


def test_hint_loss_matches_reference():
  rng = np.random.default_rng(1)
  fs = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
  ft = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
  assert_close(losses.hint_loss(fs, ft), np.mean((fs.astype(np.float64) - ft) ** 2))


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_mmd_matches_reference(kernel):
  rng = np.random.default_rng(2)
  s = rng.normal(size=(10, 6)).astype(np.float32)
  t = (rng.normal(size=(10, 6)) + 0.5).astype(np.float32)
  bws = (0.5, 1.0, 2.0)
  D = 6

  def k(x, y):
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    if kernel == "linear":
      return x @ y.T / D
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / D
    return np.mean([np.exp(-d2 / (2 * b * b)) for b in bws], axis=0)

  expected = k(s, s).mean() + k(t, t).mean() - 2 * k(s, t).mean()
  assert_close(losses.mmd_loss(s, t, kernel=kernel, bandwidths=bws), expected, atol=1e-6)
  assert abs(float(losses.mmd_loss(s, s, kernel=kernel, bandwidths=bws))) < 1e-6
  if kernel == "linear":  # closed form: ||mean s - mean t||^2 / D
    assert_close(expected, np.sum((s.mean(0).astype(np.float64) - t.mean(0)) ** 2) / D, atol=1e-9)


# ---------------------------------------------------------------- edge cases and numerics

def test_kd_and_dkd_zero_when_student_equals_teacher():
  zs, _, y = random_logits(4, classes=100, scale=10.0)
  assert abs(float(losses.kd_loss(zs, zs, temperature=4.0))) < 1e-6
  assert abs(float(losses.dkd_loss(zs, zs, y))) < 1e-6
  tckd, nckd = losses.tckd_nckd(zs, zs, y, temperature=4.0)
  assert np.max(np.abs(tckd)) < 1e-6 and np.max(np.abs(nckd)) < 1e-6


@pytest.mark.parametrize("scale", [1e4])
def test_gradients_finite_at_extreme_logits(scale):
  zs, zt, y = random_logits(9, classes=10, scale=1.0)
  zs, zt = zs * scale, zt * scale
  for name, fn in {
      "ce": lambda s: losses.cross_entropy(s, y),
      "kd": lambda s: losses.kd_loss(s, zt, temperature=4.0),
      "dkd": lambda s: losses.dkd_loss(s, zt, y),
      "pr+dkd": lambda s: losses.dkd_loss(losses.perception_reconstruct(s),
                                          losses.perception_reconstruct(zt), y),
      "ls+kd": lambda s: losses.kd_loss(losses.logit_standardize(s), losses.logit_standardize(zt),
                                        temperature=2.0),
  }.items():
    value, grad = jax.value_and_grad(fn)(jnp.asarray(zs))
    assert np.isfinite(float(value)), name
    assert np.all(np.isfinite(np.asarray(grad))), name


def test_bfloat16_inputs_give_float32_finite_results():
  zs, zt, y = random_logits(12, classes=100, scale=4.0)
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  for fn in (lambda s: losses.kd_loss(s, zt16, temperature=4.0),
             lambda s: losses.dkd_loss(s, zt16, y),
             lambda s: losses.dkd_loss(losses.perception_reconstruct(s), losses.perception_reconstruct(zt16), y),
             lambda s: losses.cross_entropy(s, y)):
    value, grad = jax.value_and_grad(fn)(zs16)
    assert value.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  # bf16 logits are converted to float32 before the math: same value as the f32 loss on the rounded logits.
  rounded = np.asarray(zs16.astype(jnp.float32))
  assert_close(losses.kd_loss(zs16, zt16, temperature=4.0),
               ref_kd_per_example(rounded, np.asarray(zt16.astype(jnp.float32)), 4.0).mean(), rtol=1e-5)


def test_perception_constant_class_is_finite():
  zs, zt, y = random_logits(13, batch=8, classes=5)
  zs[:, 2] = 3.0  # class 2 constant over the batch
  h = losses.perception_reconstruct(zs)
  assert np.all(np.isfinite(np.asarray(h)))
  np.testing.assert_allclose(np.asarray(h)[:, 2], 0.0, atol=1e-6)
  grad = jax.grad(lambda s: losses.dkd_loss(losses.perception_reconstruct(s),
                                            losses.perception_reconstruct(zt), y))(jnp.asarray(zs))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_perception_output_is_standardised():
  zs, _, _ = random_logits(14, batch=64, classes=7, scale=3.0)
  h = np.asarray(losses.perception_reconstruct(zs, eps=0.0), np.float64)
  np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(h.var(0), 1.0, rtol=1e-4)


# ---------------------------------------------------------------- padding (weights)

def test_padding_rows_do_not_change_losses():
  zs, zt, y = random_logits(21, batch=10, classes=12)
  pad = 6
  rng = np.random.default_rng(0)
  zs_p = np.concatenate([zs, rng.normal(size=(pad, 12)).astype(np.float32) * 50])
  zt_p = np.concatenate([zt, rng.normal(size=(pad, 12)).astype(np.float32) * 50])
  y_p = np.concatenate([y, np.zeros(pad, np.int32)])
  w = np.concatenate([np.ones(10), np.zeros(pad)]).astype(np.float32)

  pairs = [
      (losses.cross_entropy(zs, y), losses.cross_entropy(zs_p, y_p, weights=w)),
      (losses.cross_entropy(zs, y, label_smoothing=0.1),
       losses.cross_entropy(zs_p, y_p, label_smoothing=0.1, weights=w)),
      (losses.kd_loss(zs, zt, temperature=4.0), losses.kd_loss(zs_p, zt_p, temperature=4.0, weights=w)),
      (losses.dkd_loss(zs, zt, y), losses.dkd_loss(zs_p, zt_p, y_p, weights=w)),
      (losses.dkd_loss(losses.perception_reconstruct(zs), losses.perception_reconstruct(zt), y),
       losses.dkd_loss(losses.perception_reconstruct(zs_p, weights=w),
                       losses.perception_reconstruct(zt_p, weights=w), y_p, weights=w)),
      (losses.mmd_loss(zs, zt), losses.mmd_loss(zs_p, zt_p, weights=w)),
  ]
  for unpadded, padded in pairs:
    assert_close(padded, float(unpadded), rtol=1e-5, atol=1e-6)
  # Rows of the padded perception output that are real equal the unpadded output.
  np.testing.assert_allclose(np.asarray(losses.perception_reconstruct(zs_p, weights=w))[:10],
                             np.asarray(losses.perception_reconstruct(zs)), rtol=1e-5, atol=1e-5)


def test_weighted_mean_ignores_nan_in_padding():
  x = jnp.array([1.0, 3.0, jnp.nan])
  assert float(losses.weighted_mean(x, jnp.array([1.0, 1.0, 0.0]))) == 2.0


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
    losses.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), temperature=1.0)
  with pytest.raises(ValueError, match="weights"):
    losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), weights=jnp.ones(3))
  with pytest.raises(ValueError, match="kernel"):
    losses.mmd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), kernel="poly")


def test_losses_are_jittable():
  zs, zt, y = random_logits(30)
  f = jax.jit(functools.partial(losses.dkd_loss, alpha=1.0, beta=8.0))
  assert_close(f(zs, zt, y, temperature=jnp.float32(4.0)), float(losses.dkd_loss(zs, zt, y)))


# ---------------------------------------------------------------- cross-device statistics

def test_perception_reconstruct_across_8_devices_equals_single_device():
  """Under shard_map over 8 devices with axis_name, the statistics are those of the global batch."""
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rng = np.random.default_rng(42)
  # Different devices see differently distributed logits, so per-device statistics differ clearly.
  z = (rng.normal(size=(64, 10)) * np.repeat(np.arange(1, 9), 8)[:, None]
       + np.repeat(np.arange(8), 8)[:, None]).astype(np.float32)
  w = np.ones(64, np.float32)
  w[-5:] = 0.0  # padding on the last device is excluded globally too

  def sharded(axis_name):
    fn = jax.shard_map(lambda zz, ww: losses.perception_reconstruct(zz, axis_name=axis_name, weights=ww),
                       mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    return np.asarray(jax.jit(fn)(z, w))

  single = np.asarray(losses.perception_reconstruct(z, weights=w))
  np.testing.assert_allclose(single, ref_perception(z, w), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sharded("data"), single, rtol=1e-5, atol=1e-5)
  # Without the cross-device reduction each device standardises its own 8 rows: clearly different.
  assert np.max(np.abs(sharded(None) - single)) > 0.1
