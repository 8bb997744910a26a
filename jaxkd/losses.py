"""Distillation losses: pure, jit-able functions, float32 math whatever the input dtype.

Conventions shared by every loss here:

- Logits are [batch, classes]; feature maps are NHWC [batch, H, W, C].
- `weights` is an optional per-example weight vector [batch] (0 for padding rows).
  A loss is the weighted mean over examples, sum_i w_i l_i / sum_i w_i, so a
  padded last batch gives the same value as the unpadded batch. Rows with weight
  0 never contribute, not even NaN or inf.
- Inputs are cast to float32 before any arithmetic (bfloat16 logits from a
  mixed-precision model are fine); results are float32 scalars.
- Under `jax.jit` over a device Mesh the batch axis is global, so every mean is
  over the global batch. Inside `shard_map`/`pmap`, `perception_reconstruct`
  takes an `axis_name` to reduce its batch statistics across devices.

- KD, TCKD and NCKD have analytic gradients (custom JVPs) computed from each
  side's own softmax: float32 precision relative to the largest gradient entry
  for logits of any magnitude and per-row offsets; see the comment above
  `_two_sum`.

docs/methods.md gives every formula in full, with the config keys that select
each loss, their defaults, and the published numbers the configs target.

References:

- KD: G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural
  Network", NIPS 2014 Deep Learning Workshop, arXiv:1503.02531 (2015).
- DKD (TCKD, NCKD): B. Zhao, Q. Cui, R. Song, Y. Qiu and J. Liang, "Decoupled
  Knowledge Distillation", CVPR 2022.
- Perception reconstruction: Zhu Yingce and Zhu Ziqi, "Decoupled Knowledge
  Distillation Based on Perception Reconstruction", Computer Systems &
  Applications 34(2):11-18, 2025 (in Chinese).
- Logit standardisation: S. Sun, W. Ren, J. Li, R. Wang and X. Cao, "Logit
  Standardization in Knowledge Distillation", CVPR 2024.
- Attention transfer: S. Zagoruyko and N. Komodakis, "Paying More Attention to
  Attention: Improving the Performance of Convolutional Neural Networks via
  Attention Transfer", ICLR 2017.
- Hint loss: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta and
  Y. Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
- MMD: A. Gretton, K. M. Borgwardt, M. J. Rasch, B. Schoelkopf and A. Smola,
  "A Kernel Two-Sample Test", JMLR 13, 2012.
- Label smoothing: C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens and Z. Wojna,
  "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "cross_entropy",
    "kd_loss",
    "tckd_nckd",
    "dkd_loss",
    "perception_reconstruct",
    "logit_standardize",
    "attention_transfer_loss",
    "hint_loss",
    "mmd_loss",
    "lstm_state_loss",
    "weighted_mean",
]


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _check_pair(student: Array, teacher: Array, what: str = "logits") -> None:
  if student.shape != teacher.shape:
    raise ValueError(f"student and teacher {what} must have the same shape, got "
                     f"{student.shape} and {teacher.shape}")


def weighted_mean(per_example: Array, weights: Array | None = None) -> Array:
  """sum_i w_i x_i / sum_i w_i over the leading axis (plain mean when `weights` is None).

  Rows with zero weight are masked out (their value is ignored even if NaN).
  If every weight is zero the result is 0.
  """
  per_example = _f32(per_example)
  if weights is None:
    return jnp.mean(per_example)
  w = _f32(weights)
  if w.shape != per_example.shape[:1]:
    raise ValueError(f"weights must have shape [batch]={per_example.shape[:1]}, got {w.shape}")
  w = w.reshape(w.shape + (1,) * (per_example.ndim - 1))
  w = jnp.broadcast_to(w, per_example.shape)
  masked = jnp.where(w > 0, per_example, 0.0)
  return jnp.sum(masked * w) / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def cross_entropy(logits: Array, labels: Array, *, label_smoothing: float = 0.0,
                  weights: Array | None = None) -> Array:
  """Softmax cross-entropy, weighted mean over the batch.

  CE = -sum_c q_c log softmax(z)_c, with q the one-hot label smoothed as in
  PyTorch's CrossEntropyLoss: q = (1 - eps) * onehot(y) + eps / C (label
  smoothing: Szegedy et al., "Rethinking the Inception Architecture for Computer
  Vision", CVPR 2016).
  `labels` is int [batch], or a probability vector [batch, C] (soft labels,
  e.g. after MixUp/CutMix; smoothing is then applied to it the same way).
  """
  logits = _f32(logits)
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:
    targets = _f32(labels)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  per_example = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return weighted_mean(per_example, weights)


def _exp_minus_one_plus(y: Array) -> Array:
  """g(y) = exp(-y) - 1 + y >= 0, accurate to float32 precision also for tiny |y|.

  Direct evaluation cancels for small |y| (g ~ y^2 / 2); there the Taylor series
  (terms up to y^8, truncation below 1e-7 relative for |y| < 0.5) is used.
  """
  small = jnp.abs(y) < 0.5
  ys = jnp.where(small, y, 0.0)
  series = ys * ys * (1 / 2 + ys * (-1 / 6 + ys * (1 / 24 + ys * (-1 / 120 + ys * (
      1 / 720 + ys * (-1 / 5040 + ys * (1 / 40320)))))))
  yl = jnp.where(small, 1.0, y)
  return jnp.where(small, series, jnp.expm1(-yl) + yl)


def _log_mean_exp_neg(log_p: Array, d: Array, mask: Array | None = None):
  """log E_p[exp(-d)] over the last axis, split for precision: returns (c, m, L) with

    c = E_p[d] (rounded),  y = d - c,  m = E_p[y] (zero up to rounding),
    L = log E_p[exp(-y)] = log1p(G - m),  G = E_p[g(y)] >= 0,

  so log E_p[exp(-d)] = -c + L. Because g(y) = exp(-y) - 1 + y is summed
  without cancellation, L keeps full relative precision when d is nearly
  constant. When some exp(-y) could overflow (distributions far apart) L is
  taken as logsumexp(log p - y) instead. `mask` marks classes excluded from
  the distribution (p = 0 and d ignored there).
  """
  if mask is not None:
    log_p = jnp.where(mask, -jnp.inf, log_p)
    d = jnp.where(mask, 0.0, d)
  p = jnp.exp(log_p)
  c = jnp.sum(p * d, axis=-1)
  y = d - c[..., None]
  if mask is not None:
    y = jnp.where(mask, 0.0, y)
  m = jnp.sum(p * y, axis=-1)
  far = jnp.max(-y, axis=-1) > 40.0  # exp(40) ~ 2e17, far from float32 overflow
  y_near = jnp.where(far[..., None], 0.0, y)
  near = jnp.log1p(jnp.sum(p * _exp_minus_one_plus(y_near), axis=-1) - m)
  return c, m, jnp.where(far, jax.nn.logsumexp(log_p - y, axis=-1), near)


def _kl_from_log_ratio(log_p: Array, log_ratio: Array, mask: Array | None = None) -> Array:
  """KL(p || q) over the last axis, given log p and d = log p - log q + const (any constant).

  KL = E_p[d] + log E_p[exp(-d)] = m + L (see `_log_mean_exp_neg`): exact for
  any constant in d, and with full relative precision for nearly equal
  distributions, where the naive sum_c p_c (log p_c - log q_c) cancels.
  """
  _, m, log_mean = _log_mean_exp_neg(log_p, log_ratio, mask)
  return m + log_mean


# ---------------------------------------------------------------- KD / DKD gradients
#
# The values above derive the student's distribution from the teacher's (through
# d = z_t / T - z_s / T), which is what makes them cancellation-free; but float32
# rounding of d (relative to |z|, not to d) would become gradient error if the
# gradients were taken by differentiating those formulas. So KD, TCKD and NCKD carry
# custom JVPs with the analytic gradients, computed as follows:
#
# - Softmaxes are taken of (z - max z) / T: the shift is exact for nearby values,
#   so a large per-row offset or |z| ~ 1e4 costs no precision, and dividing by a
#   T that is not a power of 2 rounds only the (small) shifted logits.
# - Where student and teacher probabilities differ by more than a factor e, the
#   difference p_s - p_t is taken from the two softmaxes directly (no
#   cancellation). Where they are close, it is p_t * expm1(-r), r = log p_t -
#   log p_s obtained from delta = (d - d_ref) / T with d = z_t - z_s summed
#   error-free (`_two_sum`), so r keeps relative precision even when z_t and z_s
#   carry different offsets of 1e4.
# - The temperature derivative follows from homogeneity: l(a z_s, a z_t, a T) =
#   a^2 l, so T dl/dT = 2 l - <z_s, dl/dz_s> - <z_t, dl/dz_t> (row-centred z).


def _is_zero(tangent) -> bool:
  return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
  """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum).

  The optimization barriers keep XLA's algebraic simplifier from rewriting
  (a + b) - a into b, which it does when a is a compile-time constant (a teacher
  array closed over by a jitted function), and which would cancel e to 0.
  """
  s = jax.lax.optimization_barrier(a + b)
  b_virtual = jax.lax.optimization_barrier(s - a)
  return s, (a - (s - b_virtual)) + (b - b_virtual)


def _log_softmax_t(z: Array, t: Array, mask: Array | None = None) -> Array:
  """log softmax(z / T) over the last axis, the row max subtracted before dividing by T.

  `mask` marks excluded classes (-inf, probability 0).
  """
  if mask is not None:
    z = jnp.where(mask, -jnp.inf, z)
  a = (z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))) / t
  return a - jax.nn.logsumexp(a, axis=-1, keepdims=True)


def _relative_log_ratio(zs: Array, zt: Array, t: Array, ref: Array) -> Array:
  """delta_c = (d_c - d_ref) / T, d = z_t - z_s, with one rounding before the division.

  (z_t,c - z_t,ref) - (z_s,c - z_s,ref) is summed with error-free transformations,
  so its error is relative to delta, not to |z| or to the offsets of z_t and z_s.
  `ref` is a class index per row, [..., 1].
  """
  s1, e1 = _two_sum(zt, -jnp.take_along_axis(zt, ref, axis=-1))
  s2, e2 = _two_sum(zs, -jnp.take_along_axis(zs, ref, axis=-1))
  s3, e3 = _two_sum(s1, -s2)
  return (s3 + (e3 + (e1 - e2))) / t


def _log_ratio_gap(log_pt: Array, log_ps: Array, delta: Array, mask: Array | None = None):
  """(L, ok) with log p_t - log p_s = delta + L, i.e. L = log E_pt[exp(-delta)].

  delta must be 0 at a class the teacher supports (its argmax), so that delta is
  small wherever the two distributions are close. Classes where they are not
  (|delta| > 8, or p_t < exp(-60), which may underflow) enter through their
  probabilities: p_t exp(-delta) = p_s exp(L) there, hence

    L = log1p(sum_near p_t expm1(-delta) - P_t,far) - log1p(-P_s,far),

  each sum over classes without cancellation between large terms, so L has full
  relative precision even when it is tiny. `ok` is False where P_s,far > 1/2
  (distributions far apart); L is then logsumexp(log p_t - delta), precise to
  float32 rounding of its (large) terms.
  """
  if mask is not None:
    log_pt = jnp.where(mask, -jnp.inf, log_pt)
    delta = jnp.where(mask, 0.0, delta)
  pt, ps = jnp.exp(log_pt), jnp.exp(log_ps)
  far = (jnp.abs(delta) > 8.0) | (log_pt < -60.0)
  if mask is not None:
    far = far & ~mask
  near = jnp.sum(jnp.where(far, 0.0, pt * jnp.expm1(-jnp.where(far, 0.0, delta))), axis=-1)
  pt_far = jnp.sum(jnp.where(far, pt, 0.0), axis=-1)
  ps_far = jnp.sum(jnp.where(far, ps, 0.0), axis=-1)
  ok = ps_far <= 0.5
  gap = jnp.log1p(near - pt_far) - jnp.log1p(-jnp.minimum(ps_far, 0.5))
  return jnp.where(ok, gap, jax.nn.logsumexp(log_pt - delta, axis=-1)), ok


def _softmax_grads(zs: Array, zt: Array, t: Array, mask: Array | None = None):
  """Per-row gradients of T^2 KL(softmax(z_t/T) || softmax(z_s/T)) over the unmasked classes.

  Returns (d/dz_s, d/dz_t, delta, (L, ok)), the gradients [batch, C], 0 on masked
  classes, and the log-ratio parts (`_log_ratio_gap`) for `_binary_grads`:

    d/dz_s = T (p_s - p_t),    d/dz_t = T p_t (r - E_pt[r]) = T p_t (delta - E_pt[delta]),

  r = log p_t - log p_s = delta + L, delta = (d - d_ref) / T, d = z_t - z_s, ref the
  teacher's most likely (unmasked) class. p_s - p_t is p_t expm1(-r) where |r| <= 1
  and r is accurate (no cancellation), else the difference of the two softmaxes.
  """
  log_ps = _log_softmax_t(zs, t, mask)
  log_pt = _log_softmax_t(zt, t, mask)
  ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
  ref = jnp.argmax(log_pt, axis=-1)[..., None]
  delta = _relative_log_ratio(zs, zt, t, ref)
  gap, ok = _log_ratio_gap(log_pt, log_ps, delta, mask)
  r = delta + gap[..., None]
  close = (jnp.abs(r) <= 1.0) & (jnp.abs(delta) <= 16.0) & ok[..., None]
  diff = jnp.where(close, pt * jnp.expm1(-jnp.where(close, r, 0.0)), ps - pt)
  masked_delta = delta if mask is None else jnp.where(mask, 0.0, delta)
  g_t = pt * (masked_delta - jnp.sum(pt * masked_delta, axis=-1, keepdims=True))
  if mask is not None:
    diff = jnp.where(mask, 0.0, diff)
    g_t = jnp.where(mask, 0.0, g_t)
  return t * diff, t * g_t, delta, (gap, ok)


def _binary_grads(zs: Array, zt: Array, t: Array, target: Array, delta_hat: Array, gap_hat):
  """Per-row gradients of TCKD = T^2 KL(b_t || b_s), b = [p_y, 1 - p_y] (Zhao et al., CVPR 2022).

  With P = p_t,y, Q = 1 - P, p_hat the non-target softmax and
  Lam = logit(p_t,y) - logit(p_s,y):

    d/dz_s = T (p_s,y - p_t,y) (e_y - p_hat_s),   d/dz_t = T P Q Lam (e_y - p_hat_t).

  Lam = delta_hat_y + L_hat from the non-target log-ratio (`_softmax_grads` with the
  target masked: delta_hat relative to the teacher's top non-target class), precise
  when student and teacher are close; otherwise the difference of the two log-odds.
  p_s,y - p_t,y = -P Q expm1(Lam) / (P + Q exp(Lam)) when |Lam| <= 1 (no
  cancellation), else the difference of p_y (or of 1 - p_y when both are above 1/2).
  """
  log_ps = _log_softmax_t(zs, t)
  log_pt = _log_softmax_t(zt, t)

  def split(log_p):
    log_py = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    log_q = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
    return log_py, log_q

  log_ps_y, log_qs = split(log_ps)
  log_pt_y, log_qt = split(log_pt)
  ps_y, qs, pt_y, qt = jnp.exp(log_ps_y), jnp.exp(log_qs), jnp.exp(log_pt_y), jnp.exp(log_qt)
  direct = jnp.where(ps_y + pt_y <= 1.0, ps_y - pt_y, qt - qs)

  gap, ok = gap_hat
  delta_y = jnp.sum(jnp.where(target, delta_hat, 0.0), axis=-1)
  precise = ok & (jnp.abs(delta_y) <= 16.0) & (jnp.abs(gap) <= 16.0)
  lam = jnp.where(precise, gap + delta_y, (log_pt_y - log_qt) - (log_ps_y - log_qs))
  small = jnp.abs(lam) <= 1.0
  neg = jnp.where(small, jnp.minimum(lam, 0.0), 0.0)
  pos = jnp.where(small, jnp.maximum(lam, 0.0), 0.0)
  pq = pt_y * qt
  ratio = jnp.where(lam <= 0.0,
                    -pq * jnp.expm1(neg) / (pt_y + qt * jnp.exp(neg)),
                    pq * jnp.expm1(-pos) / (pt_y * jnp.exp(-pos) + qt))
  diff = jnp.where(small, ratio, direct)

  e_y = target.astype(jnp.float32)
  ps_hat = jnp.exp(_log_softmax_t(zs, t, target))
  pt_hat = jnp.exp(_log_softmax_t(zt, t, target))
  g_s = (t * diff)[..., None] * (e_y - ps_hat)
  g_t = (t * pq * lam)[..., None] * (e_y - pt_hat)
  return g_s, g_t


def _tangent(value, zs, zt, t, g_s, g_t, dzs, dzt, dt):
  """sum_c g_s dz_s + g_t dz_t + dl/dT dT per row; dl/dT from homogeneity of degree 2."""
  out = jnp.zeros_like(value)
  if not _is_zero(dzs):
    out = out + jnp.sum(g_s * dzs, axis=-1)
  if not _is_zero(dzt):
    out = out + jnp.sum(g_t * dzt, axis=-1)
  if not _is_zero(dt):
    centred_s = zs - jax.lax.stop_gradient(jnp.max(zs, axis=-1, keepdims=True))
    centred_t = zt - jax.lax.stop_gradient(jnp.max(zt, axis=-1, keepdims=True))
    euler = jnp.sum(centred_s * g_s, axis=-1) + jnp.sum(centred_t * g_t, axis=-1)
    out = out + (2.0 * value - euler) / t * dt
  return out


@jax.custom_jvp
def _kd_per_example(zs: Array, zt: Array, t: Array) -> Array:
  """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) per example, [batch] (float32 inputs)."""
  zs = zs / t
  zt = zt / t
  return _kl_from_log_ratio(jax.nn.log_softmax(zt, axis=-1), zt - zs) * t * t


@functools.partial(_kd_per_example.defjvp, symbolic_zeros=True)
def _kd_per_example_jvp(primals, tangents):
  zs, zt, t = primals
  dzs, dzt, dt = tangents
  value = _kd_per_example(zs, zt, t)
  g_s, g_t, _, _ = _softmax_grads(zs, zt, t)
  return value, _tangent(value, zs, zt, t, g_s, g_t, dzs, dzt, dt)


def kd_loss(student_logits: Array, teacher_logits: Array, *, temperature,
            weights: Array | None = None) -> Array:
  """Hinton knowledge-distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge
  in a Neural Network", NIPS 2014 Deep Learning Workshop, arXiv:1503.02531, 2015).

  KD = T^2 * KL(p_t || p_s) = T^2 * sum_c p_t,c (log p_t,c - log p_s,c),
  p = softmax(z / T); weighted mean over the batch. The T^2 factor keeps the
  gradient scale independent of T. `temperature` may be a traced scalar (a
  schedule's value).

  Gradients (custom JVP, analytic): per example, d KD / d z_s = T (p_s - p_t) and
  d KD / d z_t = T p_t (r - E_pt[r]), r = log p_t - log p_s, each times
  w_i / sum(w) in the weighted mean (0 for padding rows); d KD / d T as well. They
  are computed from each side's own softmax, so they keep float32 precision
  relative to the largest entry of each row's gradient for logits of any
  magnitude and any per-row offset (see the comment above `_two_sum`).
  """
  _check_pair(student_logits, teacher_logits)
  t = jnp.asarray(temperature, jnp.float32)
  per_example = _kd_per_example(_f32(student_logits), _f32(teacher_logits), t)
  return weighted_mean(per_example, weights)


@jax.custom_jvp
def _tckd_nckd_per_example(zs: Array, zt: Array, target: Array, t: Array):
  """(TCKD, NCKD) per example, each times T^2, [batch] (float32 logits, bool target mask)."""
  zs = zs / t
  zt = zt / t
  d = zt - zs

  def lse_gap(log_p, mask):
    # lse(zs) - lse(zt) over the unmasked classes = log E_pt[exp(-d)], without subtracting
    # two large log-sum-exps.
    c, _, log_mean = _log_mean_exp_neg(log_p, d, mask)
    return -c + log_mean

  # Non-target part: p_hat = softmax over classes != y (target masked, not shifted by -1000).
  log_pt_hat = jax.nn.log_softmax(jnp.where(target, -jnp.inf, zt), axis=-1)
  nckd = _kl_from_log_ratio(log_pt_hat, d, mask=target)

  # Target part: b = [p_y, 1 - p_y]. log b_t - log b_s, each entry without cancellation:
  #   log p_y,t - log p_y,s = d_y + gap_all,  log(1-p_y,t) - log(1-p_y,s) = gap_all - gap_rest,
  # gap_* = lse(zs) - lse(zt) over all / non-target classes.
  log_pt = jax.nn.log_softmax(zt, axis=-1)
  no_mask = jnp.zeros_like(target)
  gap_all = lse_gap(log_pt, no_mask)
  gap_rest = lse_gap(log_pt_hat, target)  # needs a normalised distribution: p_hat
  log_bt = jnp.stack([jnp.sum(jnp.where(target, log_pt, 0.0), axis=-1),
                      jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_pt), axis=-1)], axis=-1)
  d_b = jnp.stack([jnp.sum(jnp.where(target, d, 0.0), axis=-1) + gap_all, gap_all - gap_rest],
                  axis=-1)
  tckd = _kl_from_log_ratio(log_bt, d_b)
  return tckd * t * t, nckd * t * t


@functools.partial(_tckd_nckd_per_example.defjvp, symbolic_zeros=True)
def _tckd_nckd_per_example_jvp(primals, tangents):
  zs, zt, target, t = primals
  dzs, dzt, _, dt = tangents
  tckd, nckd = _tckd_nckd_per_example(zs, zt, target, t)
  gs_n, gt_n, delta_hat, gap_hat = _softmax_grads(zs, zt, t, target)
  gs_t, gt_t = _binary_grads(zs, zt, t, target, delta_hat, gap_hat)
  return (tckd, nckd), (_tangent(tckd, zs, zt, t, gs_t, gt_t, dzs, dzt, dt),
                        _tangent(nckd, zs, zt, t, gs_n, gt_n, dzs, dzt, dt))


def tckd_nckd(student_logits: Array, teacher_logits: Array, labels: Array, *,
              temperature=4.0) -> tuple[Array, Array]:
  """The two terms of decoupled KD (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
  Distillation", CVPR 2022), per example, each times T^2.

  With p = softmax(z / T), b = [p_y, 1 - p_y] and p_hat the softmax over the
  non-target classes only:

    TCKD = T^2 * KL(b_t || b_s),     NCKD = T^2 * KL(p_hat_t || p_hat_s),

  so that, per example, KD = TCKD + (1 - p_t[y]) * NCKD exactly (the paper's
  decomposition; docs/methods.md derives it). The target class is masked out
  with -inf (not by subtracting 1000 as the authors' code, mdistiller, does,
  which fails for logits of large magnitude), and both KL terms are computed
  from log-ratios without first-order cancellation, so small per-example values
  keep full float32 relative precision.

  Gradients (custom JVP, analytic, each side from its own softmax):
  d TCKD / d z_s = T (p_s,y - p_t,y) (e_y - p_hat_s), d NCKD / d z_s = T (p_hat_s -
  p_hat_t) (0 at y); with respect to z_t and T as well (see `_binary_grads`,
  `_softmax_grads`). Float32 precision relative to the largest gradient entry for
  logits of any magnitude and any per-row offset.

  Returns (tckd, nckd), each float32 [batch].
  """
  _check_pair(student_logits, teacher_logits)
  t = jnp.asarray(temperature, jnp.float32)
  zs = _f32(student_logits)
  target = jax.nn.one_hot(labels, zs.shape[-1], dtype=jnp.bool_)
  return _tckd_nckd_per_example(zs, _f32(teacher_logits), target, t)


def dkd_loss(student_logits: Array, teacher_logits: Array, labels: Array, *, alpha=1.0,
             beta=8.0, temperature=4.0, weights: Array | None = None) -> Array:
  """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
  Distillation", CVPR 2022).

  DKD = alpha * TCKD + beta * NCKD, each times T^2 (see `tckd_nckd`, also for the
  gradients), weighted mean over the batch. The authors' CIFAR-100 defaults
  (mdistiller): alpha 1, beta 8, T 4; their per-pair betas and the linear warm-up
  of this term (`jaxkd.schedules.dkd_warmup`, config key `loss.warmup_epochs`)
  are in docs/methods.md.
  """
  tckd, nckd = tckd_nckd(student_logits, teacher_logits, labels, temperature=temperature)
  return weighted_mean(alpha * tckd + beta * nckd, weights)


def perception_reconstruct(logits: Array, *, eps: float = 1e-6, axis_name: str | None = None,
                           weights: Array | None = None) -> Array:
  """Perception reconstruction (Zhu & Zhu, "Decoupled Knowledge Distillation Based on
  Perception Reconstruction", Computer Systems & Applications 34(2), 2025, eq. 5):
  per-class standardisation over the batch.

    h_ij = (z_ij - U_j) / sqrt(V_j + eps),

  U_j and V_j the (weighted) mean and population variance of class j's logits
  over the batch. Apply it to teacher and student logits separately, then KD or
  DKD on h instead of z. `eps` keeps a class whose logits are constant over the
  batch finite (h = 0 there).

  The statistics are over the global batch. Under `jax.jit` over a Mesh that is
  automatic; inside `shard_map`/`pmap` pass the mapped `axis_name`, and the
  weighted sums (weight, sum of z, then sum of squared deviations) are `psum`-ed
  across devices, so the result equals the single-device result on the same
  global batch. The variance is computed as a mean of squared deviations from
  the global mean (two reductions) rather than E[z^2] - E[z]^2, which loses
  all precision in float32 when |z| is large compared with its spread.

  `weights` [batch] (0 for padding) excludes rows from the statistics; the
  output has a row for every input row.
  """
  z = _f32(logits)
  if z.ndim != 2:
    raise ValueError(f"perception_reconstruct expects logits [batch, classes], got shape {z.shape}")
  w = jnp.ones(z.shape[:1], jnp.float32) if weights is None else _f32(weights)
  if w.shape != z.shape[:1]:
    raise ValueError(f"weights must have shape [batch]={z.shape[:1]}, got {w.shape}")
  w = w[:, None]
  z_masked = jnp.where(w > 0, z, 0.0)

  def total(x):
    s = jnp.sum(x, axis=0)
    return jax.lax.psum(s, axis_name) if axis_name is not None else s

  count = jnp.maximum(total(w), jnp.finfo(jnp.float32).tiny)
  mean = total(w * z_masked) / count
  centered = z - mean
  var = total(w * jnp.where(w > 0, centered, 0.0) ** 2) / count
  return centered * jax.lax.rsqrt(var + eps)


def logit_standardize(logits: Array, *, eps: float = 1e-7) -> Array:
  """Logit standardisation (Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
  Distillation", CVPR 2024): per-sample z-score over classes.

    z' = (z - mean_c z) / (std_c z + eps),

  std the sample standard deviation over classes with Bessel's correction
  (divides by C - 1), as torch.std in the authors' code. Used with KD at base
  temperature 2 and KD weight 9.

  Gradient: plain autodiff, except that for a constant row (std 0, where the
  derivative of sqrt is infinite and torch.std's backward gives NaN) the std
  term contributes nothing, its limit: d z' = (dz - mean_c dz) / eps there,
  finite (but as large as 1 / eps).
  """
  z = _f32(logits)
  mean = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.var(z, axis=-1, keepdims=True, ddof=1)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return (z - mean) / (std + eps)


def _attention_map(feat: Array, p: float, out_hw: tuple[int, int] | None = None) -> Array:
  """a(F) = normalize(sum_c |F_c|^p), flattened over space, L2-normalised per example."""
  a = jnp.sum(jnp.abs(_f32(feat)) ** p, axis=-1)  # [B, H, W]
  if out_hw is not None and a.shape[1:] != tuple(out_hw):
    a = jax.image.resize(a, (a.shape[0],) + tuple(out_hw), method="bilinear")
  a = a.reshape(a.shape[0], -1)
  return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def attention_transfer_loss(student_feat: Array, teacher_feat: Array, *, p: float = 2,
                            weights: Array | None = None) -> Array:
  """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention:
  Improving the Performance of Convolutional Neural Networks via Attention Transfer",
  ICLR 2017).

    a(F) = vec(sum_c |F_c|^p) / ||vec(sum_c |F_c|^p)||_2,
    AT = mean over positions of (a(F_s) - a(F_t))^2, weighted mean over the batch

  (the mean over B*H*W of the authors' code). Feature maps are NHWC; channel
  counts may differ. When spatial sizes differ, the student's attention map is
  bilinearly resized to the teacher's.
  """
  if student_feat.ndim != 4 or teacher_feat.ndim != 4:
    raise ValueError(f"attention_transfer_loss expects NHWC feature maps, got shapes "
                     f"{student_feat.shape} and {teacher_feat.shape}")
  a_t = _attention_map(teacher_feat, p)
  a_s = _attention_map(student_feat, p, out_hw=teacher_feat.shape[1:3])
  return weighted_mean(jnp.mean((a_s - a_t) ** 2, axis=-1), weights)


def hint_loss(regressed_student_feat: Array, teacher_feat: Array, *,
              weights: Array | None = None) -> Array:
  """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015):
  mean squared error.

  The student feature must already be mapped to the teacher's shape by a
  learned regressor (e.g. a 1x1 conv, part of the student's parameters; jaxkd's
  models have none yet, so the train step uses this loss only for features of
  identical shapes).
  Loss = mean over elements of (r(F_s) - F_t)^2, weighted mean over the batch.
  """
  _check_pair(regressed_student_feat, teacher_feat, "features")
  diff = _f32(regressed_student_feat) - _f32(teacher_feat)
  per_example = jnp.mean(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)
  return weighted_mean(per_example, weights)


def mmd_loss(student_feat: Array, teacher_feat: Array, *, kernel: str = "rbf",
             bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
             weights: Array | None = None) -> Array:
  """Squared maximum mean discrepancy between student and teacher feature distributions.

  Biased (V-statistic) estimate over the batch (Gretton, Borgwardt, Rasch, Schoelkopf
  & Smola, "A Kernel Two-Sample Test", JMLR 2012):

    MMD^2 = E[k(s, s')] + E[k(t, t')] - 2 E[k(s, t)],

  features flattened to [batch, D] (student and teacher D must match: map them
  first if needed). kernel='rbf': k(x, y) = mean_b exp(-||x - y||^2 / (2 D sigma_b^2))
  over `bandwidths` sigma_b (distances scaled by D so the bandwidths are per
  feature dimension); kernel='linear': k(x, y) = <x, y> / D, for which MMD^2 =
  ||mean(s) - mean(t)||^2 / D. `weights` weight each pair by w_i w_j.
  """
  s = _f32(student_feat).reshape(student_feat.shape[0], -1)
  t = _f32(teacher_feat).reshape(teacher_feat.shape[0], -1)
  if s.shape[1] != t.shape[1]:
    raise ValueError(f"mmd_loss needs features of the same dimension, got {s.shape[1]} and "
                     f"{t.shape[1]}")
  dim = s.shape[1]
  n = s.shape[0]
  w = jnp.ones((n,), jnp.float32) if weights is None else _f32(weights)
  w = w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)

  if kernel == "linear":
    def k(x, y):
      return (x @ y.T) / dim
  elif kernel == "rbf":
    sig2 = jnp.asarray(bandwidths, jnp.float32) ** 2

    def k(x, y):
      d2 = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T)
      d2 = jnp.maximum(d2, 0.0) / dim
      return jnp.mean(jnp.exp(-d2[..., None] / (2.0 * sig2)), axis=-1)
  else:
    raise ValueError(f"unknown MMD kernel {kernel!r}; use 'rbf' or 'linear'")

  def expect(x, y):
    return jnp.sum(w[:, None] * w[None, :] * k(x, y))

  return expect(s, s) + expect(t, t) - 2.0 * expect(s, t)


def _safe_norm(x: Array) -> Array:
  """Euclidean norm over every axis but the first, with gradient 0 (not NaN) where it is 0.

  d sqrt(q) / dq is infinite at q = 0, which autodiff turns into 0 * inf = NaN; the
  double `where` keeps sqrt's argument positive on that branch, so the gradient there is 0
  (a subgradient of the norm at 0).
  """
  q = jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1)
  positive = q > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, q, 1.0)), 0.0)


def lstm_state_loss(h_s: Array, c_s: Array, h_t: Array, c_t: Array, *,
                    weights: Array | None = None) -> Array:
  """LSTM state matching (KAKAKA, "An innovative image classification scheme based on LSTM
  knowledge distillation", 2025 developer article, in Chinese).

    L_i = ||h_s,i - h_t,i||_2 + ||c_s,i - c_t,i||_2,

  per example i, each norm over every axis but the batch axis (the Euclidean norm of the
  flattened state, not squared), then the weighted mean over the batch. `h_*`, `c_*` are the
  final hidden and cell states of the student's and the teacher's LSTM encoders
  (`jaxkd.models.distill.LSTMStateEncoder`, [batch, ...], all four of one shape). Computed
  in float32. Where a difference is exactly 0 its norm's gradient is 0, not NaN.
  """
  _check_pair(h_s, h_t, "LSTM hidden states")
  _check_pair(c_s, c_t, "LSTM cell states")
  if h_s.shape != c_s.shape or h_s.ndim < 1:
    raise ValueError(f"lstm_state_loss expects hidden and cell states of one shape [batch, ...], "
                     f"got h {h_s.shape} and c {c_s.shape}")
  per_example = _safe_norm(_f32(h_s) - _f32(h_t)) + _safe_norm(_f32(c_s) - _f32(c_t))
  return weighted_mean(per_example, weights)
