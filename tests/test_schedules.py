"""Distillation schedules against the rules of their sources (temperature decay, progressive
transfer, accuracy-driven temperature, DKD's warm-up), values worked by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import schedules


def test_linear_temperature():
  sched = schedules.linear_temperature(10.0, 1.0, 100)
  # T(step) = 10 - 9 * step / 100, then constant.
  for step, expected in [(0, 10.0), (25, 7.75), (50, 5.5), (100, 1.0), (150, 1.0)]:
    assert float(sched(step)) == pytest.approx(expected, rel=1e-6)


def test_progressive_transfer_three_phases():
  temp, alpha = schedules.progressive_transfer(1000)
  # Phase 1: [0, 500): T 8, a 0.9. Phase 2: [500, 800): linear to T 2, a 0.7. Phase 3: T 1, a 0.5.
  expected = {0: (8.0, 0.9), 499: (8.0, 0.9), 500: (8.0, 0.9), 650: (5.0, 0.8),
              799: (8.0 - 6.0 * 299 / 300, 0.9 - 0.2 * 299 / 300), 800: (1.0, 0.5), 999: (1.0, 0.5)}
  for step, (t, a) in expected.items():
    assert float(temp(step)) == pytest.approx(t, rel=1e-5), step
    assert float(alpha(step)) == pytest.approx(a, rel=1e-5), step


def test_progressive_transfer_rejects_bad_fractions():
  with pytest.raises(ValueError, match="fractions"):
    schedules.progressive_transfer(100, fractions=(0.5, 0.5, 0.5))


def test_dkd_warmup_matches_mdistiller_rule():
  steps_per_epoch = 10
  sched = schedules.dkd_warmup(20 * steps_per_epoch)
  for step in [0, 1, 55, 199, 200, 1000]:
    assert float(sched(step)) == pytest.approx(min(step / 200, 1.0), abs=1e-7)
  assert float(schedules.dkd_warmup(0)(0)) == 1.0


def test_dkd_warmup_is_the_float32_formula_exactly():
  """min(float32(step) / warmup, 1) in float32, bit for bit, also inside jit on an int32 step
  (the train step's warm-up weight is this function)."""
  sched = schedules.dkd_warmup(300)
  jitted = jax.jit(sched)
  for step in [0, 1, 7, 101, 299, 300, 4000]:
    want = np.minimum(np.float32(step) / np.float32(300), np.float32(1))
    assert np.asarray(sched(step)) == want and np.asarray(jitted(jnp.int32(step))) == want
    assert np.asarray(jitted(jnp.int32(step))).dtype == np.float32


@pytest.mark.parametrize("acc,expected", [(0.0, 1.0), (0.6999, 1.0), (0.70, 3.0), (0.85, 3.0),
                                          (0.8999, 3.0), (0.90, 5.0), (0.99, 5.0)])
def test_temperature_from_accuracy(acc, expected):
  assert float(schedules.temperature_from_accuracy(acc)) == expected


def test_schedules_jit():
  temp, alpha = schedules.progressive_transfer(100)
  f = jax.jit(lambda s: (temp(s), alpha(s), schedules.temperature_from_accuracy(s / 100.0)))
  t, a, acc_t = f(jnp.int32(90))
  assert float(t) == 1.0 and float(a) == pytest.approx(0.5) and float(acc_t) == 5.0
