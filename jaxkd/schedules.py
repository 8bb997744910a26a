"""Schedules for distillation hyper-parameters (temperature, loss weights).

Optax-style: each schedule is a function `step -> value` (jit-able, built from
optax's own schedule pieces), evaluated inside the train step from the
optimizer step count. Steps are optimizer steps; convert epochs with
`steps_per_epoch`.

Sources: temperature decay and progressive transfer are described in the
article "Implementing knowledge distillation in image classification: from
principles to diagrams" (in Chinese, 2025); the accuracy-driven temperature
in KAKAKA, "An innovative image classification scheme based on LSTM
knowledge distillation" (in Chinese, 2025); the warm-up of the distillation
term in Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation",
CVPR 2022 (and its code, mdistiller).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import optax

__all__ = [
    "constant",
    "linear_temperature",
    "progressive_transfer",
    "dkd_warmup",
    "temperature_from_accuracy",
]


def constant(value: float) -> optax.Schedule:
  """A schedule that always returns `value` (so any hyper-parameter may be given as a schedule)."""
  return optax.constant_schedule(value)


def linear_temperature(t_start: float, t_end: float, total_steps: int) -> optax.Schedule:
  """Temperature decay: T falls linearly from `t_start` (e.g. 10) to `t_end` (e.g. 1) over
  `total_steps`, then stays at `t_end` (the knowledge-distillation article of 2025 cited in
  the module docstring)."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  return optax.linear_schedule(init_value=t_start, end_value=t_end, transition_steps=total_steps)


def progressive_transfer(total_steps: int, *, temperatures: Sequence[float] = (8.0, 2.0, 1.0),
                         alphas: Sequence[float] = (0.9, 0.7, 0.5),
                         fractions: Sequence[float] = (0.5, 0.3, 0.2),
                         ) -> tuple[optax.Schedule, optax.Schedule]:
  """Three-phase progressive transfer (the 2025 article cited in the module docstring).

  Phase 1 (first 50% of training): T = 8, alpha = 0.9 (alpha = weight of the KD term).
  Phase 2 (next 30%): T falls linearly from 8 to 2 and alpha from 0.9 to 0.7.
  Phase 3 (last 20%): T = 1, alpha = 0.5.

  Returns `(temperature_schedule, alpha_schedule)`. `temperatures` = (T1, T2_end, T3),
  `alphas` likewise; phase 2 starts from the phase-1 values.
  """
  if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
    raise ValueError("fractions must be three non-negative numbers summing to 1, got "
                     f"{tuple(fractions)}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  b1 = int(round(fractions[0] * total_steps))
  b2 = int(round((fractions[0] + fractions[1]) * total_steps))

  def three_phase(v1, v2_end, v3):
    return optax.join_schedules(
        [optax.constant_schedule(v1),
         optax.linear_schedule(v1, v2_end, transition_steps=max(b2 - b1, 1)),
         optax.constant_schedule(v3)],
        boundaries=[b1, b2])

  return three_phase(*temperatures), three_phase(*alphas)


def dkd_warmup(warmup_steps: int) -> optax.Schedule:
  """DKD's linear warm-up of the distillation weight: w(step) = min(step / warmup_steps, 1).

  Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022): mdistiller uses
  min(epoch / 20, 1) with epochs counted from 1; per step, pass
  `warmup_steps = 20 * steps_per_epoch`. `warmup_steps <= 0` turns the
  warm-up off (w = 1). This is the one definition of the warm-up:
  `jaxkd.train.step.LossConfig.warmup` (an int number of steps) is evaluated
  with it, in float32 as `min(float32(step) / warmup_steps, 1)`.
  """
  if warmup_steps <= 0:
    def off(step):
      del step
      return jnp.ones((), jnp.float32)
    return off
  steps = float(warmup_steps)

  def warmup(step):
    return jnp.minimum(jnp.asarray(step).astype(jnp.float32) / steps, 1.0)

  return warmup


def temperature_from_accuracy(val_accuracy, *, thresholds: Sequence[float] = (0.70, 0.90),
                              temperatures: Sequence[float] = (1.0, 3.0, 5.0)):
  """Accuracy-driven temperature: T = 1 below 70% validation accuracy, 3 below 90%, 5 from 90%
  up (KAKAKA 2025, cited in the module docstring).

  `val_accuracy` is a fraction in [0, 1] (scalar or array; works on traced values).
  A rule applied by the training loop after each evaluation, not a function of the step.
  """
  if len(temperatures) != len(thresholds) + 1:
    raise ValueError(f"need one more temperature than thresholds, got {len(temperatures)} and "
                     f"{len(thresholds)}")
  if list(thresholds) != sorted(thresholds):
    raise ValueError(f"thresholds must be increasing, got {tuple(thresholds)}")
  acc = jnp.asarray(val_accuracy, jnp.float32)
  index = jnp.searchsorted(jnp.asarray(thresholds, jnp.float32), acc, side="right")
  return jnp.asarray(temperatures, jnp.float32)[index]
