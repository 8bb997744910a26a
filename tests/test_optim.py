"""jaxkd.train.optim against PyTorch's published formulas, re-derived here in NumPy float64.

References (formulas only, no PyTorch needed):
- torch.optim.lr_scheduler.OneCycleLR: phases end at float(pct_start*T) - 1 (and
  float(2*pct_start*T) - 2 for three_phase) and T - 1; within a phase
  pct = (step - phase_start) / (phase_end - phase_start) and
  cos anneal: end + (start - end) / 2 * (1 + cos(pi * pct)); linear: start + (end - start) * pct;
  initial_lr = max_lr / div_factor, min_lr = initial_lr / final_div_factor.
- torch.optim.Adam(weight_decay=wd): g += wd * p, then Adam with bias correction,
  p -= lr * m_hat / (sqrt(v_hat) + eps). torch.optim.AdamW: p -= lr * wd * p, then Adam.
- torch.optim.SGD(momentum, weight_decay): g += wd * p; buf = g (first step) else
  momentum * buf + g; p -= lr * buf.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.train import optim


def torch_one_cycle_lr(step, total_steps, max_lr, pct_start=0.3, div_factor=25.0,
                       final_div_factor=1e4, anneal="cos", three_phase=False):
  initial = max_lr / div_factor
  minimum = initial / final_div_factor
  if three_phase:
    phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
              (float(2 * pct_start * total_steps) - 2, max_lr, initial),
              (total_steps - 1, initial, minimum)]
  else:
    phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
              (total_steps - 1, max_lr, minimum)]
  start_step = 0.0
  for i, (end_step, start, end) in enumerate(phases):
    if step <= end_step or i == len(phases) - 1:
      pct = (step - start_step) / (end_step - start_step)
      if anneal == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
      return (end - start) * pct + start
    start_step = end_step
  raise AssertionError("unreachable")


STEPS = [0, 1, 57, 150, 298, 299, 300, 500, 998, 999]


def test_one_cycle_matches_pytorch_formula():
  sched = optim.one_cycle(1000, 1e-3)
  got = np.array([float(sched(s)) for s in STEPS])
  want = np.array([torch_one_cycle_lr(s, 1000, 1e-3) for s in STEPS])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[5] == pytest.approx(1e-3, rel=1e-6)          # peak at float(0.3 * 1000) - 1 = 299
  assert got[-1] == pytest.approx(1e-3 / 25 / 1e4, rel=1e-5)  # min_lr at T - 1
  # jit-able with a traced step, as the optimizer calls it.
  traced = jax.jit(sched)(jnp.asarray(STEPS, jnp.int32))
  np.testing.assert_allclose(np.asarray(traced), want, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(three_phase=True), dict(anneal="linear"),
                                    dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0)])
def test_one_cycle_variants(kwargs):
  total = 137  # pct_start * T not an integer: the float boundary matters
  sched = optim.one_cycle(total, 0.05, **kwargs)
  steps = list(range(0, total, 7)) + [total - 1]
  got = np.array([float(sched(s)) for s in steps])
  want = np.array([torch_one_cycle_lr(s, total, 0.05, **kwargs) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5])
def test_one_cycle_short_runs_match_pytorch_formula(total, three_phase):
  """Smoke runs (max_steps of 1-5) with one-cycle: PyTorch's phases then start before step 0."""
  sched = optim.one_cycle(total, 0.01, three_phase=three_phase)
  got = np.array([float(sched(s)) for s in range(total)])
  want = np.array([torch_one_cycle_lr(s, total, 0.01, three_phase=three_phase)
                   for s in range(total)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  assert np.all(np.isfinite(got))


def test_optax_onecycle_is_not_pytorch():
  """Why jaxkd has its own: optax's boundaries are int(pct*T) and T, one step off PyTorch's."""
  ours = optim.one_cycle(1000, 1e-3)
  theirs = optax.cosine_onecycle_schedule(1000, 1e-3)
  assert float(ours(299)) == pytest.approx(1e-3, rel=1e-6)
  assert float(theirs(299)) < 1e-3 * (1 - 1e-5)
  assert float(theirs(999)) > 2 * float(ours(999))


def test_one_cycle_momentum():
  """PyTorch cycles momentum max -> base -> max over the learning rate's phases (cos anneal)."""
  sched = optim.one_cycle_momentum(1000)
  np.testing.assert_allclose(float(sched(0)), 0.95, rtol=1e-6)
  np.testing.assert_allclose(float(sched(299)), 0.85, rtol=1e-6)
  np.testing.assert_allclose(float(sched(999)), 0.95, rtol=1e-6)
  pct = (650 - 299) / (999 - 299)
  want = 0.95 + (0.85 - 0.95) / 2 * (math.cos(math.pi * pct) + 1)
  np.testing.assert_allclose(float(sched(650)), want, rtol=1e-6)


def test_multistep_boundaries():
  spe = 10
  sched = optim.multistep(0.05, [150 * spe, 180 * spe, 210 * spe], 0.1)
  cases = {0: 0.05, 1499: 0.05, 1500: 0.005, 1501: 0.005, 1799: 0.005, 1800: 5e-4,
           2099: 5e-4, 2100: 5e-5, 2399: 5e-5}
  for step, want in cases.items():
    assert float(sched(step)) == pytest.approx(want, rel=1e-6), step
  with pytest.raises(ValueError):
    optim.multistep(0.1, [20, 10])
  via_config = optim.make_schedule({"schedule": "multistep", "learning_rate": 0.05,
                                    "milestones": [150, 180, 210]},
                                   total_steps=2400, steps_per_epoch=spe)
  for step, want in cases.items():
    assert float(via_config(step)) == pytest.approx(want, rel=1e-6)


# --- optimizers on a toy quadratic f(p) = 0.5 * sum(a * p^2), grad = a * p ---------------------

A = np.array([1.0, 3.0, -0.5])
P0 = np.array([0.7, -1.2, 2.0])


def _run_optax(tx, steps):
  p = {"w": jnp.asarray(P0, jnp.float32)}
  state = tx.init(p)
  for _ in range(steps):
    g = {"w": jnp.asarray(A, jnp.float32) * p["w"]}
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  return np.asarray(p["w"], np.float64)


def _numpy_adam(steps, lr, wd, decoupled, b1=0.9, b2=0.999, eps=1e-8):
  p = P0.copy()
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t in range(1, steps + 1):
    g = A * p
    if decoupled:
      p = p - lr * wd * p
    else:
      g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


def test_adam_one_step_by_hand():
  """Step 1 by hand: m_hat = g, v_hat = g^2, so Adam moves each coordinate by
  lr * g / (|g| + eps)."""
  lr, wd = 0.1, 0.5
  g_l2 = A * P0 + wd * P0
  want_adam = P0 - lr * g_l2 / (np.abs(g_l2) + 1e-8)             # L2: decay folded into g
  want_adamw = P0 - lr * wd * P0 - lr * (A * P0) / (np.abs(A * P0) + 1e-8)  # decoupled
  got_adam = _run_optax(optim.make_optimizer({"optimizer": "adam", "weight_decay": wd}, lr), 1)
  got_adamw = _run_optax(optim.make_optimizer({"optimizer": "adamw", "weight_decay": wd}, lr), 1)
  # float32 optimizer arithmetic: ~1e-6 absolute on |p| ~ 1.
  np.testing.assert_allclose(got_adam, want_adam, rtol=0, atol=3e-6)
  np.testing.assert_allclose(got_adamw, want_adamw, rtol=0, atol=3e-6)
  assert not np.allclose(got_adam, got_adamw, rtol=1e-3)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_three_steps(name):
  lr, wd = 0.05, 0.1
  got = _run_optax(optim.make_optimizer({"optimizer": name, "weight_decay": wd}, lr), 3)
  want = _numpy_adam(3, lr, wd, decoupled=(name == "adamw"))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adam_default_weight_decay_is_1e4():
  got = _run_optax(optim.make_optimizer({"optimizer": "adam"}, 0.05), 3)
  np.testing.assert_allclose(got, _numpy_adam(3, 0.05, 1e-4, decoupled=False), rtol=1e-5)


def test_sgd_momentum_l2_like_pytorch():
  lr, wd, mom = 0.1, 5e-4, 0.9
  p = P0.copy()
  buf = None
  for _ in range(3):
    g = A * p + wd * p
    buf = g if buf is None else mom * buf + g
    p = p - lr * buf
  got = _run_optax(optim.make_optimizer({"optimizer": "sgd", "weight_decay": wd}, lr), 3)
  np.testing.assert_allclose(got, p, rtol=1e-6)


def test_grad_clipping_happens_before_decay():
  lr, clip = 0.1, 0.5
  g = A * P0
  g_clipped = g * min(1.0, clip / np.linalg.norm(g))
  want = P0 - lr * (g_clipped + 5e-4 * P0)
  got = _run_optax(optim.make_optimizer({"optimizer": "sgd", "weight_decay": 5e-4,
                                         "grad_clip_norm": clip}, lr), 1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_decay_1d_params_false_skips_vectors():
  tx = optim.make_optimizer({"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.1,
                             "decay_1d_params": False}, 1.0)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["bias"]), np.zeros(2))


def test_missing_keys_take_the_schema_defaults():
  """One table of defaults (jaxkd.config's schema): adam, weight decay 1e-4, momentum 0.9,
  one_cycle from learning rate 1e-3."""
  got = _run_optax(optim.make_optimizer({}, 0.05), 3)
  np.testing.assert_allclose(got, _numpy_adam(3, 0.05, 1e-4, decoupled=False), rtol=1e-5)
  lr, mom, wd = 0.1, 0.9, 1e-4
  p = P0.copy()
  buf = None
  for _ in range(3):
    g = A * p + wd * p
    buf = g if buf is None else mom * buf + g
    p = p - lr * buf
  got = _run_optax(optim.make_optimizer({"optimizer": "sgd"}, lr), 3)
  np.testing.assert_allclose(got, p, rtol=1e-6)
  sched = optim.make_schedule({}, total_steps=50, steps_per_epoch=5)
  for s in (0, 14, 30, 49):
    assert float(sched(s)) == pytest.approx(torch_one_cycle_lr(s, 50, 1e-3), rel=1e-5)


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer({"optimizer": "lamb"}, 0.1)


def test_build_optimizer_one_cycle_cycles_beta1_like_pytorch():
  """OneCycleLR(cycle_momentum=True) sets Adam's beta1 = 0.95 at step 0, 0.85 at the peak."""
  total, max_lr = 20, 0.01
  cfg = {"optimizer": "adam", "weight_decay": 0.0, "schedule": "one_cycle", "learning_rate": max_lr}
  tx, sched = optim.build_optimizer(cfg, total_steps=total, steps_per_epoch=5)
  got = _run_optax(tx, 3)
  p = P0.copy()
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t in range(1, 4):
    s = t - 1
    lr = torch_one_cycle_lr(s, total, max_lr)
    pct = s / (float(0.3 * total) - 1)
    b1 = 0.85 + (0.95 - 0.85) / 2 * (math.cos(math.pi * pct) + 1)   # max -> base in phase 1
    g = A * p
    m = b1 * m + (1 - b1) * g
    v = 0.999 * v + 0.001 * g * g
    p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
  np.testing.assert_allclose(got, p, rtol=1e-5)
  assert float(sched(0)) == pytest.approx(max_lr / 25, rel=1e-6)
