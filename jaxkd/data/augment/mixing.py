"""Batch-level mixing: MixUp and CutMix over a batch (``mix_batch``).

MixUp (Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
ICLR 2018): ``x = lam x_i + (1 - lam) x_j`` with ``lam ~ Beta(a, a)`` or ``U(mixup_lambda_range)``.
CutMix (Yun, Han, Oh, Chun, Choe and Yoo, "CutMix: Regularization Strategy to Train Strong
Classifiers with Localizable Features", ICCV 2019): pastes a box of area ``(1 - lam) H W`` from
``x_j`` and recomputes ``lam`` from the box actually pasted. Stored teacher logits are not mixed
here (see ``jaxkd.data.augment`` and ``jaxkd.train.step``).
"""
from __future__ import annotations

import tensorflow as tf

from jaxkd.data.augment.config import AugmentConfig
from jaxkd.data.augment.ops import split_seed, uniform


def sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) via two Gamma(alpha) draws: g1 / (g1 + g2)."""
  s1, s2 = split_seed(seed, 2)
  g1 = tf.random.stateless_gamma([], s1, alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha)
  return g1 / tf.maximum(g1 + g2, 1e-12)


def mix_batch(batch: dict[str, tf.Tensor], seed: tf.Tensor, cfg: AugmentConfig,
              *, num_classes: int) -> dict[str, tf.Tensor]:
  """MixUp / CutMix over a batch, each example with a randomly permuted partner.

  Adds 'mix_label' (partner's int32 label), 'mix_lambda' (float32 [B], weight of the
  example's own label; 1 = unmixed) and 'soft_label' (float32 [B, C] =
  lam onehot(label) + (1 - lam) onehot(mix_label)). A 'teacher_logits' field stays
  the example's own row; the partner's row is added as 'mix_teacher_logits'
  (float32 [B, C]) for the train step to mix (see ``jaxkd.data.augment``).
  One lam (and one CutMix box) per batch; with probability 1 - mix_prob the batch is
  left unmixed (lam = 1).
  """
  images = tf.cast(batch["image"], tf.float32)
  labels = batch["label"]
  b = tf.shape(images)[0]
  height, width = images.shape[1], images.shape[2]
  s_perm, s_switch, s_mix, s_cut, s_apply, s_cy, s_cx = split_seed(seed, 7)
  perm = tf.random.experimental.stateless_shuffle(tf.range(b), s_perm)

  def mixup():
    if cfg.mixup_lambda_range is not None:
      lam = uniform(s_mix, cfg.mixup_lambda_range[0], cfg.mixup_lambda_range[1])
    else:
      lam = sample_beta(s_mix, cfg.mixup_alpha)
    return lam * images + (1.0 - lam) * tf.gather(images, perm), lam

  def cutmix():
    lam = sample_beta(s_cut, cfg.cutmix_alpha)
    cut = tf.sqrt(1.0 - lam)
    ch = tf.cast(cut * height, tf.int32)
    cw = tf.cast(cut * width, tf.int32)
    cy = tf.random.stateless_uniform([], s_cy, 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], s_cx, 0, width, dtype=tf.int32)
    y1, y2 = tf.clip_by_value(cy - ch // 2, 0, height), tf.clip_by_value(cy + ch // 2, 0, height)
    x1, x2 = tf.clip_by_value(cx - cw // 2, 0, width), tf.clip_by_value(cx + cw // 2, 0, width)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    mixed = tf.where(box[None, :, :, None], tf.gather(images, perm), images)
    lam = 1.0 - tf.cast((y2 - y1) * (x2 - x1), tf.float32) / float(height * width)
    return mixed, lam

  if cfg.mixup_enabled and cfg.cutmix_alpha > 0:
    mixed, lam = tf.cond(uniform(s_switch) < cfg.mix_switch_prob, cutmix, mixup)
  elif cfg.cutmix_alpha > 0:
    mixed, lam = cutmix()
  elif cfg.mixup_enabled:
    mixed, lam = mixup()
  else:
    raise ValueError("mix_batch called but neither MixUp nor CutMix is enabled in the config")
  apply = uniform(s_apply) < cfg.mix_prob
  lam = tf.where(apply, lam, 1.0)
  mixed = tf.where(apply, mixed, images)

  out = dict(batch)
  out["image"] = tf.cast(mixed, batch["image"].dtype)
  partner = tf.gather(labels, perm)
  out["mix_label"] = partner
  out["mix_lambda"] = tf.fill([b], lam)
  out["soft_label"] = (lam * tf.one_hot(labels, num_classes, dtype=tf.float32)
                       + (1.0 - lam) * tf.one_hot(partner, num_classes, dtype=tf.float32))
  if "teacher_logits" in batch:
    out["mix_teacher_logits"] = tf.gather(tf.cast(batch["teacher_logits"], tf.float32), perm)
  return out
