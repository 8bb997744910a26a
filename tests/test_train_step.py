"""The data-parallel train step: 8 devices == 1 device, global BatchNorm, padding, loss composition.

References: the single-device run of the same global batch (the data-parallel
result must not depend on the device count), NumPy float64 formulas for the
BatchNorm running statistics (Flax: ra <- m * ra + (1 - m) * batch_stat, biased
variance over the global batch) and for CE / KD (Hinton, Vinyals, Dean, "Distilling the
Knowledge in a Neural Network", NIPS Deep Learning Workshop 2015).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.train import optim
from jaxkd.train import state as state_lib
from jaxkd.train import step as step_lib

NUM_CLASSES = 10
SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16


class Tiny(nn.Module):
  """BN on the input (statistics checkable by hand) -> conv -> BN -> relu -> pool -> dense."""
  num_classes: int = NUM_CLASSES
  dtype: jnp.dtype = jnp.float32
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = x.astype(self.dtype)
    def bn(x):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          dtype=self.dtype)(x)

    if self.use_bn:
      x = bn(x)
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)(x)
    if self.use_bn:
      x = bn(x)
    feat = nn.relu(x)
    emb = jnp.mean(feat, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(emb).astype(jnp.float32)
    if return_features:
      return logits, {"stage1": feat, "embedding": emb}
    return logits


def make_batch(seed: int, n: int = GLOBAL_BATCH):
  rng = np.random.default_rng(seed)
  return {"image": (rng.normal(size=(n,) + SHAPE) * 2.0 + 0.5).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
          "weight": np.ones(n, np.float32),
          "teacher_logits": (rng.normal(size=(n, NUM_CLASSES)) * 3.0).astype(np.float32)}


def run(model, loss_config, mesh, batches, *, lr=0.1):
  tx = optim.make_optimizer({"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4}, lr)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh)
  train_step = step_lib.make_train_step(model, loss_config, tx, mesh, learning_rate_fn=lambda s: lr)
  metrics = []
  for b in batches:
    state, m = train_step(state, b)
    metrics.append(jax.tree.map(np.asarray, m))
  return jax.tree.map(np.asarray, state), metrics


@pytest.fixture(scope="module")
def meshes():
  return step_lib.data_mesh(), step_lib.data_mesh(jax.devices()[:1])


MODES = {
    "ce": {"kind": "ce", "label_smoothing": 0.1},
    "kd": {"kind": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "dkd": {"kind": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 4},
    "dkd_perception": {"kind": "dkd", "alpha": 1.0, "beta": 2.0, "temperature": 4.0,
                       "perception": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_eight_devices_equal_one_device(meshes, mode):
  mesh8, mesh1 = meshes
  batches = [make_batch(1), make_batch(2)]
  s8, m8 = run(Tiny(), MODES[mode], mesh8, batches)
  s1, m1 = run(Tiny(), MODES[mode], mesh1, batches)
  for a, b in zip(m8, m1):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
  # Updated params (hence gradients, since the optimizer is the same) and BN statistics.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s8), jax.tree.leaves(s1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert int(s8.step) == 2
  check_global_batchnorm(s8, batches)


def check_global_batchnorm(state, batches):
  """The first BN sees the raw images, so its running statistics are computable in NumPy.

  Flax: ra <- 0.9 * ra + 0.1 * stat, stat the mean / biased variance over the *global* batch
  (all devices' rows together), starting from mean 0 and var 1.
  """
  mean, var = np.zeros(3), np.ones(3)
  for b in batches:
    x = b["image"].astype(np.float64)
    mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 1, 2))
    var = 0.9 * var + 0.1 * x.var(axis=(0, 1, 2))
  bn = state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(bn["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn["var"], var, rtol=1e-5, atol=1e-6)
  # Per-device statistics (2 rows each) would differ clearly from the global ones.
  local = 0.1 * batches[-1]["image"][:2].astype(np.float64).mean(axis=(0, 1, 2))
  first = 0.9 * 0.1 * batches[0]["image"].mean(axis=(0, 1, 2))
  assert np.max(np.abs(first + local - bn["mean"])) > 1e-3


def pad(batch, extra: int, seed: int = 99):
  rng = np.random.default_rng(seed)
  n_cls = batch["teacher_logits"].shape[1]
  noise = rng.normal(size=(extra,) + SHAPE).astype(np.float32) * 50
  labels = rng.integers(0, NUM_CLASSES, extra).astype(np.int32)
  return {"image": np.concatenate([batch["image"], noise]),
          "label": np.concatenate([batch["label"], labels]),
          "weight": np.concatenate([batch["weight"], np.zeros(extra, np.float32)]),
          "teacher_logits": np.concatenate(
              [batch["teacher_logits"], rng.normal(size=(extra, n_cls)).astype(np.float32) * 50])}


@pytest.mark.parametrize("mode", ["kd", "dkd_perception"])
def test_padding_rows_do_not_change_the_step(meshes, mode):
  """Without BatchNorm (training BN statistics would see the padded rows, which is why training
  batches are never padded), weight-0 rows change neither the loss nor the update."""
  mesh8, _ = meshes
  batch = make_batch(4)
  s_plain, m_plain = run(Tiny(use_bn=False), MODES[mode], mesh8, [batch])
  s_pad, m_pad = run(Tiny(use_bn=False), MODES[mode], mesh8, [pad(batch, 8)])
  for k in ("loss", "ce", "accuracy", "num_examples"):
    np.testing.assert_allclose(m_plain[0][k], m_pad[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_pad.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_loss_composition_matches_formula(meshes):
  """L = (1 - a) CE + a T^2 KL(p_t || p_s) (the Food-101 recipe's loss) on the step's own
  train-mode logits."""
  mesh8, _ = meshes
  model = Tiny()
  batch = make_batch(5)
  a, temp = 0.7, 3.0
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  logits, _ = model.apply(state.variables(), batch["image"], train=True, mutable=["batch_stats"])
  zs = np.asarray(logits, np.float64)
  zt = batch["teacher_logits"].astype(np.float64)
  ce = -np.mean(_log_softmax(zs)[np.arange(GLOBAL_BATCH), batch["label"]])
  lpt, lps = _log_softmax(zt / temp), _log_softmax(zs / temp)
  kd = temp ** 2 * np.mean(np.sum(np.exp(lpt) * (lpt - lps), -1))
  train_step = step_lib.make_train_step(model, {"kind": "kd", "kd_alpha": a, "temperature": temp},
                                        tx, mesh8)
  _, m = train_step(state, batch)
  np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["kd"]), kd, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), (1 - a) * ce + a * kd, rtol=1e-5)


def test_schedules_and_hparams_evaluated_at_state_step(meshes):
  mesh8, _ = meshes
  model = Tiny(use_bn=False)
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.01)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  cfg = step_lib.LossConfig(kind="dkd", temperature=lambda s: 4.0 - 0.5 * s, warmup=4)
  train_step = step_lib.make_train_step(model, cfg, tx, mesh8)
  seen = []
  for i in range(3):
    state, m = train_step(state, make_batch(10 + i))
    seen.append((float(m["temperature"]), float(m["kd_weight_eff"])))
  assert seen == [(4.0, 0.0), (3.5, 0.25), (3.0, 0.5)]
  # A run-time override (e.g. an accuracy-driven temperature) needs no recompilation.
  state, m = train_step(state, make_batch(20), hparams={"temperature": 5.0})
  assert float(m["temperature"]) == 5.0
  with pytest.raises(ValueError, match="unknown hparams"):
    train_step(state, make_batch(21), hparams={"temprature": 5.0})


def test_online_teacher_and_feature_loss(meshes):
  """An online teacher (eval mode, same batch) replaces stored logits; AT on 'stage1' adds a
  term."""
  mesh8, _ = meshes
  model, teacher = Tiny(), Tiny()
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  teacher_vars = state_lib.create_train_state(teacher, jax.random.PRNGKey(7), (1,) + SHAPE, tx,
                                              mesh=mesh8).variables()
  cfg = {"kind": "kd", "temperature": 2.0,
         "feature_losses": [{"kind": "at", "student_key": "stage1", "weight": 100.0}]}
  batch = make_batch(6)
  del batch["teacher_logits"]
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  s_logits, _ = model.apply(state.variables(), batch["image"], train=True, mutable=["batch_stats"])
  t_logits = teacher.apply(teacher_vars, batch["image"], train=False)
  train_step = step_lib.make_train_step(model, cfg, tx, mesh8, teacher_model=teacher)
  _, m = train_step(state, batch, teacher_vars)
  lpt = _log_softmax(np.asarray(t_logits, np.float64) / 2.0)
  lps = _log_softmax(np.asarray(s_logits, np.float64) / 2.0)
  kd = 4.0 * np.mean(np.sum(np.exp(lpt) * (lpt - lps), -1))
  np.testing.assert_allclose(float(m["kd"]), kd, rtol=1e-5)
  assert float(m["feat_at_stage1"]) > 0
  np.testing.assert_allclose(float(m["loss"]),
                             float(m["ce"]) + kd + 100.0 * float(m["feat_at_stage1"]),
                             rtol=1e-5)


def test_missing_teacher_is_a_clear_error(meshes):
  mesh8, _ = meshes
  model = Tiny(use_bn=False)
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  batch = make_batch(7)
  del batch["teacher_logits"]
  with pytest.raises(ValueError, match="teacher_logits"):
    step_lib.make_train_step(model, {"kind": "kd"}, tx, mesh8)(state, batch)


def test_bf16_compute_keeps_float32_state(meshes):
  mesh8, _ = meshes
  model = Tiny(dtype=jnp.bfloat16)
  s, m = run(model, MODES["kd"], mesh8, [make_batch(8)])
  for leaf in jax.tree.leaves((s.params, s.batch_stats, s.opt_state)):
    assert leaf.dtype == np.float32
  assert np.isfinite(m[0]["loss"])


def test_eval_step_per_example_outputs(meshes):
  mesh8, _ = meshes
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  batch = pad(make_batch(9, 13), 3)  # 13 real rows + 3 padding = 16
  out = jax.tree.map(np.asarray, step_lib.make_eval_step(model, mesh8)(state, batch))
  logits = np.asarray(model.apply(state.variables(), batch["image"], train=False), np.float64)
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
  real = batch["weight"] > 0
  top1 = (np.argmax(logits, -1) == batch["label"]) & real
  rank = np.sum(logits > logits[np.arange(16), batch["label"]][:, None], axis=-1)
  top5 = (rank < 5) & real
  np.testing.assert_array_equal(out["correct1"], top1.astype(np.float32))
  np.testing.assert_array_equal(out["correct5"], top5.astype(np.float32))
  np.testing.assert_array_equal(out["weight"], batch["weight"])
  np.testing.assert_array_equal(out["label"], batch["label"])
  ce = -_log_softmax(logits)[np.arange(16), batch["label"]]
  np.testing.assert_allclose(out["ce"], np.where(real, ce, 0.0), rtol=1e-5, atol=1e-5)


def test_warmup_epochs_become_steps_only_with_steps_per_epoch(meshes):
  cfg = {"kind": "dkd", "warmup": 3, "warmup_epochs": 2.0}
  assert step_lib.LossConfig.from_config(cfg, steps_per_epoch=7).warmup == 14  # 2 epochs of 7
  assert step_lib.LossConfig.from_config({"kind": "dkd", "warmup_epochs": 0.01},
                                         steps_per_epoch=7).warmup == 1  # at least one step
  assert step_lib.LossConfig.from_config({"kind": "dkd", "warmup": 3},
                                         steps_per_epoch=7).warmup == 3
  assert step_lib.LossConfig.from_config(cfg).warmup == 3  # no steps_per_epoch: unconverted
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  with pytest.raises(ValueError, match="warmup_epochs=2.0.*steps_per_epoch"):
    step_lib.make_train_step(Tiny(), cfg, tx, meshes[0])


def test_logits_fn_pads_and_matches_the_model(meshes):
  mesh8, _ = meshes
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh8)
  logits_fn = step_lib.make_logits_fn(model, mesh8)
  batch = make_batch(11, 13)  # 13 rows on 8 devices: padded to 16, the padding dropped
  got = np.asarray(logits_fn(state.variables(), batch["image"]))
  assert got.shape == (13, NUM_CLASSES) and got.dtype == np.float32
  host_variables = jax.device_get(state.variables())
  want = np.asarray(model.apply(host_variables, batch["image"].astype(np.float64)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The same numbers as the eval step's logits (what the teacher-logit store held before).
  full = make_batch(12)
  eval_logits = step_lib.make_eval_step(model, mesh8)(state, full)["logits"]
  np.testing.assert_array_equal(np.asarray(logits_fn(state, full["image"])),
                                np.asarray(eval_logits))
