"""jaxkd.losses against independent float64 NumPy references written from the formulas
(Hinton et al. 2015; Zhao et al., CVPR 2022; Sun et al., CVPR 2024; the feature losses'
papers), plus the identities and edge cases the papers imply, and the gradients of the
logit losses against float64 closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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
  return T**2 * np_kl(np_softmax(np.asarray(zt, np.float64) / T),
                      np_softmax(np.asarray(zs, np.float64) / T))


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


# The losses, jitted once for the module: each (shape, static argument) compiles one program,
# reused across tests and parametrisations (temperatures etc. are traced arguments). Called
# eagerly, every primitive would be dispatched (and on first use compiled) on its own, which
# costs far more than the programs. The eager path is still exercised by
# test_losses_are_jittable and test_shape_errors_name_the_shapes.
cross_entropy = jax.jit(losses.cross_entropy, static_argnames="label_smoothing")
kd_loss = jax.jit(losses.kd_loss)
tckd_nckd = jax.jit(losses.tckd_nckd)
dkd_loss = jax.jit(losses.dkd_loss)
perception_reconstruct = jax.jit(losses.perception_reconstruct, static_argnames="axis_name")
logit_standardize = jax.jit(losses.logit_standardize)
mmd_loss = jax.jit(losses.mmd_loss, static_argnames=("kernel", "bandwidths"))


# ---------------------------------------------------------------- values vs references

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(seed, smoothing):
  zs, _, y = random_logits(seed)
  C = zs.shape[1]
  q = np.eye(C)[y] * (1 - smoothing) + smoothing / C
  expected = np.mean(-np.sum(q * np_log_softmax(zs), -1))
  assert_close(cross_entropy(zs, y, label_smoothing=smoothing), expected)


def test_cross_entropy_soft_labels():
  zs, zt, _ = random_logits(3)
  q = np_softmax(zt)
  expected = np.mean(-np.sum(q * np_log_softmax(zs), -1))
  assert_close(cross_entropy(zs, q.astype(np.float32)), expected)


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_kd_matches_reference(T):
  zs, zt, _ = random_logits(int(T))
  assert_close(kd_loss(zs, zt, temperature=T), ref_kd_per_example(zs, zt, T).mean())


@jax.jit  # one program for both temperatures
def tckd_nckd_and_dkd(zs, zt, y, T, alpha, beta):
  return (losses.tckd_nckd(zs, zt, y, temperature=T),
          losses.dkd_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_tckd_nckd_and_dkd_match_reference(T):
  zs, zt, y = random_logits(7, batch=12, classes=20)
  alpha, beta = 1.0, 8.0
  (tckd, nckd), dkd = tckd_nckd_and_dkd(zs, zt, y, T, alpha, beta)
  ref_t, ref_n = ref_tckd_nckd(zs, zt, y, T)
  assert_close(tckd, ref_t)
  assert_close(nckd, ref_n)
  assert_close(dkd, np.mean(alpha * ref_t + beta * ref_n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(seed):
  """Zhao et al. 2022, eq. (1): KD = TCKD + (1 - p_t[y]) * NCKD, per example (T^2 on both sides)."""
  T = 4.0
  zs, zt, y = random_logits(seed, batch=32, classes=100)
  tckd, nckd = tckd_nckd(zs, zt, y, temperature=T)
  pt_y = np_softmax(zt.astype(np.float64) / T)[np.arange(len(y)), y]
  kd = ref_kd_per_example(zs, zt, T)
  assert_close(np.asarray(tckd, np.float64) + (1 - pt_y) * np.asarray(nckd, np.float64), kd,
               rtol=1e-5, atol=1e-6)
  # The identity is sharp: a wrong mask (another class as "target") or a dropped T^2 breaks it.
  tckd_bad, nckd_bad = tckd_nckd(zs, zt, (y + 1) % 100, temperature=T)
  assert not np.allclose(np.asarray(tckd_bad) + (1 - pt_y) * np.asarray(nckd_bad), kd, rtol=1e-3)
  assert not np.allclose((np.asarray(tckd) + (1 - pt_y) * np.asarray(nckd)) / T**2, kd, rtol=1e-3)


def test_perception_reconstruct_matches_reference():
  zs, _, _ = random_logits(11, batch=64, classes=10, scale=5.0)
  zs = zs + 100.0  # a large common offset: the centred variance must not lose precision
  assert_close(perception_reconstruct(zs), ref_perception(zs), rtol=1e-4, atol=1e-5)


def test_logit_standardize_matches_reference():
  zs, _, _ = random_logits(5, classes=30)
  z = zs.astype(np.float64)
  expected = (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)
  assert_close(logit_standardize(zs), expected, atol=1e-6)


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
  assert_close(mmd_loss(s, t, kernel=kernel, bandwidths=bws), expected, atol=1e-6)
  assert abs(float(mmd_loss(s, s, kernel=kernel, bandwidths=bws))) < 1e-6
  if kernel == "linear":  # closed form: ||mean s - mean t||^2 / D
    assert_close(expected, np.sum((s.mean(0).astype(np.float64) - t.mean(0)) ** 2) / D, atol=1e-9)


# ---------------------------------------------------------------- edge cases and numerics

def test_kd_and_dkd_zero_when_student_equals_teacher():
  zs, _, y = random_logits(4, classes=100, scale=10.0)
  # One program; student and teacher are separate arguments, not known to be equal.
  kd, dkd, (tckd, nckd) = jax.jit(lambda s, t, y: (
      losses.kd_loss(s, t, temperature=4.0), losses.dkd_loss(s, t, y),
      losses.tckd_nckd(s, t, y, temperature=4.0)))(zs, zs, y)
  assert abs(float(kd)) < 1e-6
  assert abs(float(dkd)) < 1e-6
  assert np.max(np.abs(tckd)) < 1e-6 and np.max(np.abs(nckd)) < 1e-6


@pytest.mark.parametrize("scale", [1e4])
def test_gradients_finite_at_extreme_logits(scale):
  zs, zt, y = random_logits(9, classes=10, scale=1.0)
  zs, zt = zs * scale, zt * scale

  @jax.jit  # one program for all five losses
  def values_and_grads(zs, zt, y):
    return {name: jax.value_and_grad(fn)(zs) for name, fn in {
        "ce": lambda s: losses.cross_entropy(s, y),
        "kd": lambda s: losses.kd_loss(s, zt, temperature=4.0),
        "dkd": lambda s: losses.dkd_loss(s, zt, y),
        "pr+dkd": lambda s: losses.dkd_loss(losses.perception_reconstruct(s),
                                            losses.perception_reconstruct(zt), y),
        "ls+kd": lambda s: losses.kd_loss(losses.logit_standardize(s),
                                          losses.logit_standardize(zt), temperature=2.0),
    }.items()}

  for name, (value, grad) in values_and_grads(jnp.asarray(zs), zt, y).items():
    assert np.isfinite(float(value)), name
    assert np.all(np.isfinite(np.asarray(grad))), name


def test_bfloat16_inputs_give_float32_finite_results():
  zs, zt, y = random_logits(12, classes=100, scale=4.0)
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)

  @jax.jit  # one program for all four losses
  def values_and_grads(zs16, zt16, y):
    return [jax.value_and_grad(fn)(zs16) for fn in (
        lambda s: losses.kd_loss(s, zt16, temperature=4.0),
        lambda s: losses.dkd_loss(s, zt16, y),
        lambda s: losses.dkd_loss(losses.perception_reconstruct(s),
                                  losses.perception_reconstruct(zt16), y),
        lambda s: losses.cross_entropy(s, y))]

  for value, grad in values_and_grads(zs16, zt16, y):
    assert value.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  # bf16 logits are converted to float32 before the math: same value as the f32 loss on the
  # rounded logits.
  rounded = np.asarray(zs16.astype(jnp.float32))
  assert_close(kd_loss(zs16, zt16, temperature=4.0),
               ref_kd_per_example(rounded, np.asarray(zt16.astype(jnp.float32)), 4.0).mean(),
               rtol=1e-5)


def test_perception_constant_class_is_finite():
  zs, zt, y = random_logits(13, batch=8, classes=5)
  zs[:, 2] = 3.0  # class 2 constant over the batch
  h = perception_reconstruct(zs)
  assert np.all(np.isfinite(np.asarray(h)))
  np.testing.assert_allclose(np.asarray(h)[:, 2], 0.0, atol=1e-6)
  grad = jax.jit(jax.grad(lambda s, t, y: losses.dkd_loss(
      losses.perception_reconstruct(s), losses.perception_reconstruct(t), y)))(
          jnp.asarray(zs), zt, y)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_perception_output_is_standardised():
  zs, _, _ = random_logits(14, batch=64, classes=7, scale=3.0)
  h = np.asarray(perception_reconstruct(zs, eps=0.0), np.float64)
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

  @jax.jit  # one program for all the pairs
  def all_pairs(zs, zt, y, zs_p, zt_p, y_p, w):
    return [
        (losses.cross_entropy(zs, y), losses.cross_entropy(zs_p, y_p, weights=w)),
        (losses.cross_entropy(zs, y, label_smoothing=0.1),
         losses.cross_entropy(zs_p, y_p, label_smoothing=0.1, weights=w)),
        (losses.kd_loss(zs, zt, temperature=4.0),
         losses.kd_loss(zs_p, zt_p, temperature=4.0, weights=w)),
        (losses.dkd_loss(zs, zt, y), losses.dkd_loss(zs_p, zt_p, y_p, weights=w)),
        (losses.dkd_loss(losses.perception_reconstruct(zs), losses.perception_reconstruct(zt), y),
         losses.dkd_loss(losses.perception_reconstruct(zs_p, weights=w),
                         losses.perception_reconstruct(zt_p, weights=w), y_p, weights=w)),
        (losses.mmd_loss(zs, zt), losses.mmd_loss(zs_p, zt_p, weights=w)),
        # Rows of the padded perception output that are real equal the unpadded output.
        (losses.perception_reconstruct(zs), losses.perception_reconstruct(zs_p, weights=w)[:10]),
    ]

  pairs = all_pairs(zs, zt, y, zs_p, zt_p, y_p, w)
  for unpadded, padded in pairs[:-1]:
    assert_close(padded, float(unpadded), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(pairs[-1][1]), np.asarray(pairs[-1][0]),
                             rtol=1e-5, atol=1e-5)


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
    def standardize(zz, ww):
      return losses.perception_reconstruct(zz, axis_name=axis_name, weights=ww)

    fn = jax.shard_map(standardize, mesh=mesh, in_specs=(P("data"), P("data")),
                       out_specs=P("data"))
    return np.asarray(jax.jit(fn)(z, w))

  single = np.asarray(perception_reconstruct(z, weights=w))
  np.testing.assert_allclose(single, ref_perception(z, w), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sharded("data"), single, rtol=1e-5, atol=1e-5)
  # Without the cross-device reduction each device standardises its own 8 rows: clearly different.
  assert np.max(np.abs(sharded(None) - single)) > 0.1


# ---------------------------------------------------------------- gradients vs float64 references
#
# Closed-form gradients in float64 NumPy, written from the definitions (p = softmax(z / T)):
#   KD:   d/dz_s = T (p_s - p_t),  d/dz_t = T p_t,j sum_c p_t,c (d_j - d_c), d = (z_t - z_s) / T;
#   NCKD: the same over the non-target classes (p_hat), 0 at the target;
#   TCKD: d/dz_s = T (p_s,y - p_t,y) (e_y - p_hat_s),
#         d/dz_t = T p_t,y (1 - p_t,y) (logit p_t,y - logit p_s,y) (e_y - p_hat_t);
# each per example, times w_i / sum(w) in a weighted mean. In a difference p_s - p_t the
# entry of the class with the most mass is taken as minus the sum of the others (the
# entries sum to 0), so float64 does not cancel where both are ~1. The references are
# themselves checked against float64 central differences of the reference losses.
#
# Error norms: "row" = max_j |g_ij - ref_ij| / max(max_j |ref_ij|, 1e-30) over rows i
# (the floor: a row whose gradient is below 1e-30 everywhere is beyond float32's normal
# range and is compared absolutely); "batch" = max |g - ref| / max(max |ref|, 1e-30).

GRAD_RTOL = 1e-5
CLASSES = 100


def np_diff_sum_to_zero(ps, pt):
  """ps - pt per row, the entry of the class with the most mass from sum_j (ps - pt)_j = 0."""
  diff = np.asarray(ps, np.float64) - pt
  k = np.argmax(ps + pt, axis=-1)
  rows = np.arange(diff.shape[0])
  others = diff.copy()
  others[rows, k] = 0.0
  diff[rows, k] = -others.sum(-1)
  return diff


def ref_kd_grads(zs, zt, T, w=None):
  """(d/dz_s, d/dz_t) of the weighted-mean KD loss, float64."""
  zs = np.asarray(zs, np.float64)
  zt = np.asarray(zt, np.float64)
  w = np.ones(zs.shape[0]) if w is None else np.asarray(w, np.float64)
  scale = (w / w.sum())[:, None]
  ps, pt = np_softmax(zs / T), np_softmax(zt / T)
  d = (zt - zs) / T
  g_t = T * pt * np.sum(pt[:, None, :] * (d[:, :, None] - d[:, None, :]), axis=-1)
  return T * np_diff_sum_to_zero(ps, pt) * scale, g_t * scale


def ref_dkd_grads(zs, zt, y, T):
  """Per-example gradients of TCKD and NCKD (each times T^2): dict of [B, C] float64 arrays."""
  zs = np.asarray(zs, np.float64)
  zt = np.asarray(zt, np.float64)
  B, C = zs.shape
  out = {k: np.zeros((B, C)) for k in ("tckd_s", "tckd_t", "nckd_s", "nckd_t")}
  for i in range(B):
    keep = np.arange(C) != y[i]
    e_y = (~keep).astype(np.float64)

    def parts(z, keep=keep, i=i):
      a = z / T
      log_p = np_log_softmax(a)
      log_q = np.log(np.sum(np.exp(log_p[keep] - log_p[keep].max()))) + log_p[keep].max()
      p_hat = np.zeros(C)
      p_hat[keep] = np_softmax(a[keep])
      return np.exp(log_p[y[i]]), np.exp(log_q), p_hat, log_p[y[i]] - log_q

    py_s, q_s, ph_s, logit_s = parts(zs[i])
    py_t, q_t, ph_t, logit_t = parts(zt[i])
    # p_s,y - p_t,y = q_t - q_s: take the form whose terms are smaller.
    delta = py_s - py_t if py_s + py_t <= 1 else q_t - q_s
    out["tckd_s"][i] = T * delta * (e_y - ph_s)
    out["tckd_t"][i] = T * py_t * q_t * (logit_t - logit_s) * (e_y - ph_t)
    out["nckd_s"][i, keep] = T * np_diff_sum_to_zero(ph_s[None, keep], ph_t[None, keep])[0]
    d = (zt[i, keep] - zs[i, keep]) / T
    p = ph_t[keep]
    out["nckd_t"][i, keep] = T * p * np.sum(p[None, :] * (d[:, None] - d[None, :]), axis=-1)
  return out


def ref_standardize(z, eps=1e-7):
  z = np.asarray(z, np.float64)
  c = z - z.mean(-1, keepdims=True)
  s = np.sqrt(np.sum(c * c, -1, keepdims=True) / (z.shape[-1] - 1))
  return c / (s + eps), c, s


def ref_standardize_vjp(z, g, eps=1e-7):
  """g^T d standardize(z) / dz, float64 closed form (Bessel-corrected std, as torch.std)."""
  _, c, s = ref_standardize(z, eps)
  a = 1.0 / (s + eps)
  g_c = a * g - a * a * np.sum(c * g, -1, keepdims=True) * c / ((z.shape[-1] - 1) * s)
  return g_c - g_c.mean(-1, keepdims=True)


def grad_error(actual, expected, norm):
  err = np.abs(np.asarray(actual, np.float64) - expected)
  if norm == "row":
    return float(np.max(err.max(-1) / np.maximum(np.abs(expected).max(-1), 1e-30)))
  return float(err.max() / max(np.abs(expected).max(), 1e-30))


GRAD_CASES = ["scale 1e2", "scale 1e3", "scale 1e4", "offset 1e3", "offset 1e4",
              "separate offsets 1e4", "near"]


def grad_case(name, seed=0, batch=16, classes=CLASSES):
  """Logits of large magnitude, with per-row offsets (shared by student and teacher, or
  separate), or a student within 1e-3 of its teacher."""
  rng = np.random.default_rng(seed)

  def normal():
    return rng.normal(size=(batch, classes))

  def offset(size):
    return rng.uniform(-1, 1, size=(batch, 1)) * size

  if name.startswith("scale"):
    scale = float(name.split()[1])
    zs, zt = normal() * scale, normal() * scale
  elif name.startswith("offset"):
    o = offset(float(name.split()[1]))
    zs, zt = normal() * 3 + o, normal() * 3 + o
  elif name.startswith("separate offsets"):
    size = float(name.split()[2])
    zs, zt = normal() * 3 + offset(size), normal() * 3 + offset(size)
  else:
    zt = normal() * 3
    zs = zt + normal() * 1e-3
  y = rng.integers(0, classes, size=batch).astype(np.int32)
  return zs.astype(np.float32), zt.astype(np.float32), y


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_reference_gradients_match_finite_differences(T):
  """The closed forms above against float64 central differences of the reference losses."""
  zs, zt, y = random_logits(40, batch=3, classes=6)
  zs, zt = zs.astype(np.float64), zt.astype(np.float64)
  h = 1e-6

  def numeric(fn, z):
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
      e = np.zeros_like(z)
      e[idx] = h
      g[idx] = (fn(z + e) - fn(z - e)) / (2 * h)
    return g

  w = np.array([1.0, 0.0, 2.0])
  g_s, g_t = ref_kd_grads(zs, zt, T, w)

  def kd(s, t):
    return np.sum(w * ref_kd_per_example(s, t, T)) / w.sum()

  np.testing.assert_allclose(numeric(lambda s: kd(s, zt), zs), g_s, atol=1e-7)
  np.testing.assert_allclose(numeric(lambda t: kd(zs, t), zt), g_t, atol=1e-7)
  ref = ref_dkd_grads(zs, zt, y, T)
  for k, part in (("tckd", 0), ("nckd", 1)):
    def value(s, t, part=part):
      return np.sum(ref_tckd_nckd(s, t, y, T)[part])

    np.testing.assert_allclose(numeric(functools.partial(value, t=zt), zs), ref[k + "_s"],
                               atol=1e-7)
    np.testing.assert_allclose(numeric(functools.partial(value, zs), zt), ref[k + "_t"],
                               atol=1e-7)

  # Logit standardisation composed with KD.
  def ls_kd(s):
    return ref_kd_per_example(ref_standardize(s)[0], ref_standardize(zt)[0], T).mean()

  g_std, _ = ref_kd_grads(ref_standardize(zs)[0], ref_standardize(zt)[0], T)
  np.testing.assert_allclose(numeric(ls_kd, zs), ref_standardize_vjp(zs, g_std), atol=1e-7)


# Jitted once for the module; the parametrised cases share shapes, with T traced, so each
# compiles once.
@jax.jit
def kd_grads(zs, zt, T, w):
  return jax.grad(lambda s, t: losses.kd_loss(s, t, temperature=T, weights=w),
                  argnums=(0, 1))(zs, zt)


@jax.jit
def dkd_grads(zs, zt, y, T, alpha, beta):
  """(d DKD / d z_s, [(d TCKD / d z_s, d TCKD / d z_t), (the same for NCKD)])."""
  g = jax.grad(lambda s: losses.dkd_loss(s, zt, y, alpha=alpha, beta=beta, temperature=T))(zs)
  parts = [jax.grad(
      lambda s, t, part=part: jnp.sum(losses.tckd_nckd(s, t, y, temperature=T)[part]),
      argnums=(0, 1))(zs, zt) for part in (0, 1)]
  return g, parts


@jax.jit
def ls_kd_grads(zs, zt, T):
  def fn(s, t):
    return losses.kd_loss(losses.logit_standardize(s), losses.logit_standardize(t),
                          temperature=T)

  return jax.grad(fn, argnums=(0, 1))(zs, zt)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_kd_gradients_match_float64(case, T):
  """d KD / d z_s within 1e-5 of float64 relative to each row's largest entry (d / d z_t:
  relative to the batch's largest), with a padding row of weight 0."""
  zs, zt, _ = grad_case(case)
  w = np.ones(zs.shape[0], np.float32)
  w[3] = 0.0
  g_s, g_t = kd_grads(zs, zt, T, w)
  ref_s, ref_t = ref_kd_grads(zs, zt, T, w)
  assert grad_error(g_s, ref_s, "row") < GRAD_RTOL
  assert grad_error(g_t, ref_t, "batch") < GRAD_RTOL
  assert not np.any(np.asarray(g_s)[3]) and not np.any(np.asarray(g_t)[3])


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_dkd_gradients_match_float64(case, T):
  """d DKD / d z_s within 1e-5 of float64 per row; TCKD and NCKD separately, for student
  and teacher, relative to the batch's largest entry of each (TCKD's own row can be
  ill-conditioned: logit p_t,y - logit p_s,y may be a small difference of O(10) terms)."""
  zs, zt, y = grad_case(case, seed=1)
  alpha, beta = 1.0, 8.0
  g, parts = dkd_grads(zs, zt, y, T, alpha, beta)
  ref = ref_dkd_grads(zs, zt, y, T)
  batch = zs.shape[0]
  assert grad_error(g, (alpha * ref["tckd_s"] + beta * ref["nckd_s"]) / batch, "row") < GRAD_RTOL
  for k, part in (("tckd", 0), ("nckd", 1)):
    g_s, g_t = parts[part]
    assert grad_error(g_s, ref[k + "_s"], "batch") < GRAD_RTOL, k
    assert grad_error(g_t, ref[k + "_t"], "batch") < GRAD_RTOL, k


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("case", GRAD_CASES[:-1])
def test_logit_standardized_kd_gradients_match_float64(case, T):
  """KD on logit_standardize(z) (Sun et al. 2024): student gradient per row, teacher per batch.

  (Not the near case: there each side's standardised logits carry float32 rounding
  relative to |z'| ~ 1, which the loss then sees against differences of 1e-3.)
  """
  zs, zt, _ = grad_case(case, seed=2)
  g_s, g_t = ls_kd_grads(zs, zt, T)
  std_s, std_t = ref_standardize(zs)[0], ref_standardize(zt)[0]
  ref_s, ref_t = ref_kd_grads(std_s, std_t, T)
  assert grad_error(g_s, ref_standardize_vjp(zs, ref_s), "row") < GRAD_RTOL
  assert grad_error(g_t, ref_standardize_vjp(zt, ref_t), "batch") < GRAD_RTOL


@pytest.mark.parametrize("case", ["separate offsets 1e4", "near"])
def test_gradients_under_jit_with_constant_teacher(case):
  """Under jit, with the teacher a compile-time constant (closed over), XLA may not fold
  the error-free sums away: the gradients keep their precision (T = 3, not a power of 2)."""
  zs, zt, y = grad_case(case, seed=3)
  T = 3.0
  g_kd = jax.jit(jax.grad(lambda s: losses.kd_loss(s, zt, temperature=T)))(zs)
  assert grad_error(g_kd, ref_kd_grads(zs, zt, T)[0], "row") < GRAD_RTOL
  g_dkd = jax.jit(jax.grad(lambda s: losses.dkd_loss(s, zt, y, temperature=T)))(zs)
  ref = ref_dkd_grads(zs, zt, y, T)
  assert grad_error(g_dkd, (ref["tckd_s"] + 8.0 * ref["nckd_s"]) / zs.shape[0], "row") < GRAD_RTOL


@jax.jit
def temperature_grads(zs, zt, y, temp):
  """d/dT of KD, mean TCKD and mean NCKD (one program for the parametrised cases)."""
  fns = {
      "kd": lambda temp: losses.kd_loss(zs, zt, temperature=temp),
      "tckd": lambda temp: jnp.mean(losses.tckd_nckd(zs, zt, y, temperature=temp)[0]),
      "nckd": lambda temp: jnp.mean(losses.tckd_nckd(zs, zt, y, temperature=temp)[1]),
  }
  return {name: jax.grad(fn)(temp) for name, fn in fns.items()}


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("case", ["scale 3", "offset 1e4"])
def test_temperature_gradients_match_float64_differences(case, T):
  """d/dT of KD, TCKD and NCKD (T may be traced) against float64 central differences."""
  if case == "scale 3":
    zs, zt, y = random_logits(41, batch=4, classes=8)
  else:
    zs, zt, y = grad_case(case, seed=4, batch=4, classes=8)
  h = 1e-4 * T
  refs = {
      "kd": lambda temp: ref_kd_per_example(zs, zt, temp).mean(),
      "tckd": lambda temp: ref_tckd_nckd(zs, zt, y, temp)[0].mean(),
      "nckd": lambda temp: ref_tckd_nckd(zs, zt, y, temp)[1].mean(),
  }
  grads = temperature_grads(zs, zt, y, jnp.float32(T))
  for name in refs:
    expected = (refs[name](T + h) - refs[name](T - h)) / (2 * h)
    actual = float(grads[name])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_gradients_finite_at_1e4_and_constant_rows():
  """No NaN or inf in any gradient (student, teacher, temperature) at logits of magnitude
  1e4, for constant rows, and for a student equal to its teacher."""
  zs, zt, y = random_logits(42, batch=6, classes=10, scale=1.0)
  zs, zt = zs * 1e4, zt * 1e4
  zs[0] = 5.0  # constant rows
  zt[1] = -3.0
  zs[2] = zt[2] = 7.0
  zs[3] = zt[3]
  zs[4] = 1e4  # a constant row of large magnitude against a varying teacher

  @jax.jit  # one program for all of them
  def values_and_grads(zs, zt, y):
    fns = {
        "kd": lambda s, t, temp: losses.kd_loss(s, t, temperature=temp),
        "dkd": lambda s, t, temp: losses.dkd_loss(s, t, y, temperature=temp),
        "ls+kd": lambda s, t, temp: losses.kd_loss(losses.logit_standardize(s),
                                                   losses.logit_standardize(t), temperature=temp),
    }
    out = {name: jax.value_and_grad(fn, argnums=(0, 1, 2))(zs, zt, jnp.float32(1.0))
           for name, fn in fns.items()}
    return out, jax.grad(lambda s: losses.kd_loss(s, zt, temperature=4.0))(zs)

  out, g = values_and_grads(zs, zt, y)
  for name, (value, grads) in out.items():
    assert np.isfinite(float(value)), name
    for g_arg in grads:
      assert np.all(np.isfinite(np.asarray(g_arg))), name
  # Equal rows have zero KD gradient.
  g = np.asarray(g)
  assert not np.any(g[2]) and not np.any(g[3])


def test_bfloat16_gradients_are_the_float32_gradients_rounded():
  """bf16 logits: float32 math; the gradient is the float32 one at the rounded logits, cast."""
  zs, zt, y = random_logits(43, classes=20, scale=4.0)
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  zs32, zt32 = zs16.astype(jnp.float32), zt16.astype(jnp.float32)
  fns = (lambda s, t: losses.kd_loss(s, t, temperature=4.0),
         lambda s, t: losses.dkd_loss(s, t, y))
  # One program per dtype (separate, so that the compiler cannot share the float32 math).
  both_grads = jax.jit(lambda s, t: [jax.grad(fn)(s, t) for fn in fns])
  for g16, g32 in zip(both_grads(zs16, zt16), both_grads(zs32, zt32)):
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g16, np.float32),
                                  np.asarray(g32.astype(jnp.bfloat16), np.float32))


def test_gradients_compose_with_vmap_jit_and_jvp():
  zs, zt, y = random_logits(44, batch=12, classes=6)
  zs, zt, y = zs.reshape(3, 4, 6), zt.reshape(3, 4, 6), y.reshape(3, 4)

  def fn(s, t, yy, temp):
    return (losses.dkd_loss(s, t, yy, temperature=temp)
            + losses.kd_loss(s, t, temperature=temp))

  grad = jax.grad(fn, argnums=(0, 1, 3))
  batched = jax.jit(jax.vmap(grad, in_axes=(0, 0, 0, None)))(zs, zt, y, jnp.float32(2.0))
  single_grad = jax.jit(grad)  # compiled once for the three examples
  for i in range(3):
    single = single_grad(zs[i], zt[i], y[i], jnp.float32(2.0))
    for b, s in zip(batched, single):
      np.testing.assert_allclose(np.asarray(b)[i], np.asarray(s), rtol=1e-5, atol=1e-8)
  # Forward mode agrees with reverse mode.
  tangent = np.random.default_rng(0).normal(size=zs[0].shape).astype(np.float32)

  def f0(s):
    return fn(s, zt[0], y[0], 2.0)

  _, forward = jax.jit(lambda s, ds: jax.jvp(f0, (s,), (ds,)))(zs[0], tangent)
  # Reverse mode: d f0 / d s, from the reverse-mode program compiled above.
  reverse = np.sum(np.asarray(single_grad(zs[0], zt[0], y[0], jnp.float32(2.0))[0], np.float64)
                   * tangent)
  np.testing.assert_allclose(float(forward), reverse, rtol=1e-5)
