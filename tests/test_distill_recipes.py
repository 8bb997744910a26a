"""Distillation recipes through the train step and `fit`: scheduled hyper-parameters (logged values
against the formulas worked in NumPy, also across a stop and resume), the accuracy-driven
temperature, staged distillation, FitNets' regressor and the LSTM encoders as heads kept out of
the student, several teachers, and the recipe configs.
"""
from __future__ import annotations

import json
import pathlib
import re
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import assert_trees_equal, numpy_tree

from jaxkd import config as schema
from jaxkd import losses
from jaxkd.models.distill import HintRegressor, LSTMStateEncoder
from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import heads as heads_lib
from jaxkd.train import optim
from jaxkd.train import state as state_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import FitSpec, fit

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (6, 6, 3)
BATCH = 8
CLASSES = 3
SPE, TOTAL = 4, 12  # steps per epoch, total steps


class Tiny(nn.Module):
  """A student/teacher with one feature map (6x6 x channels)."""
  channels: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    f = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    logits = nn.Dense(CLASSES)(jnp.mean(f, axis=(1, 2)))
    return (logits, {"stage1": f}) if return_features else logits


def batch_for(index: int, teachers: int = 1) -> dict:
  rng = np.random.default_rng([11, index])
  shape = (BATCH, CLASSES) if teachers == 1 else (BATCH, teachers, CLASSES)
  return {"image": rng.normal(size=(BATCH,) + SHAPE).astype(np.float32),
          "label": rng.integers(0, CLASSES, BATCH).astype(np.int32),
          "teacher_logits": (3 * rng.normal(size=shape)).astype(np.float32)}


def spec(**kw) -> FitSpec:
  base = dict(total_steps=TOTAL, steps_per_epoch=SPE, batch_size=BATCH, seed=0,
              log_every_steps=1, checkpoint_every_steps=2, progress=False, tensorboard=False,
              desc="student")
  return FitSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def mesh():
  return step_lib.data_mesh()


def build(mesh, loss: dict, *, teacher=None):
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "adam"}, optim.one_cycle(TOTAL, 1e-2))
  config = step_lib.LossConfig.from_config(loss, steps_per_epoch=SPE, total_steps=TOTAL)
  train_step = step_lib.make_train_step(model, config, tx, mesh, teacher_model=teacher)

  def new_state():
    state = state_lib.create_train_state(model, jax.random.key(0), (1,) + SHAPE, tx)
    if teacher is not None:
      state = heads_lib.add_heads(state, config, model, teacher, image_size=SHAPE[0],
                                  rng=jax.random.key(5), tx=tx)
    return state_lib.replicate(state, mesh)

  return train_step, new_state


def train_records(stage_dir) -> list[dict]:
  lines = (pathlib.Path(stage_dir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == "train"]


# The formulas, in float64, of the value used by the update with optimizer step count s (the
# update logged at step s + 1), written from the published rules, not from jaxkd.schedules.
def linear(a, b, n):
  return lambda s: a + (b - a) * min(s / n, 1.0)


def three_phase(v1, v2, v3, n=TOTAL):
  b1, b2 = round(0.5 * n), round(0.8 * n)
  return lambda s: v1 if s < b1 else (v1 + (v2 - v1) * (s - b1) / (b2 - b1) if s < b2 else v3)


def warmup(n, v=1.0):
  return lambda s: v * min(s / n, 1.0)


# Three losses with every schedule form between them (each key checked against its formula).
SPECS = {
    "kd": ({"kind": "kd", "temperature": "linear(6, 2, 1ep)", "kd_weight": "warmup(2ep)",
            "ce_weight": "linear(1, 0.5, 50%)", "warmup": "warmup(6steps, 0.5)"},
           {"temperature": linear(6.0, 2.0, SPE), "kd_weight": warmup(2 * SPE),
            "ce_weight": linear(1.0, 0.5, TOTAL // 2), "warmup": warmup(6, 0.5)}),
    "progressive": ({"kind": "kd", "temperature": "progressive", "kd_alpha": "progressive"},
                    {"temperature": three_phase(8.0, 2.0, 1.0),
                     "kd_alpha": three_phase(0.9, 0.7, 0.5)}),
    "dkd": ({"kind": "dkd", "temperature": "linear(10,1)", "beta": "linear(8, 2, 50%)",
             "alpha": "constant(2)"},
            {"temperature": linear(10.0, 1.0, TOTAL), "beta": linear(8.0, 2.0, TOTAL // 2)}),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_logged_values_follow_the_specs_across_a_stop_and_resume(mesh, tmp_path, case):
  loss, formulas = SPECS[case]
  train_step, new_state = build(mesh, loss)
  assert set(formulas) <= set(train_step.current_value_keys)

  def batches(start, flag=None):
    for i in range(start, 100):
      if flag is not None and i == 5:
        flag.set(signal.SIGTERM)  # stops after the update of index 5 (logged at step 6)
      yield batch_for(i)

  reference = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "ref",
                  train_batches=batches)
  flag = ckpt_lib.PreemptionFlag()
  with pytest.raises(ckpt_lib.StopRequested):
    fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
        train_batches=lambda s: batches(s, flag), stop=flag)
  resumed = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
                train_batches=batches, stop=ckpt_lib.PreemptionFlag())

  for run in ("ref", "run"):
    records = train_records(tmp_path / run)
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    for name, formula in formulas.items():
      logged = np.array([r[name] for r in records])
      expected = np.array([formula(r["step"] - 1) for r in records])
      np.testing.assert_allclose(logged, expected, rtol=2e-6, atol=1e-7, err_msg=f"{run} {name}")
  assert "alpha" not in train_records(tmp_path / "ref")[0]  # constant(2) is a number, not logged
  assert_trees_equal(numpy_tree(resumed.state), numpy_tree(reference.state))


def test_from_accuracy_sets_the_temperature_after_each_validation_and_resumes(mesh, tmp_path):
  train_step, new_state = build(mesh, {"kind": "kd", "temperature": "from_accuracy"})
  assert set(train_step.adaptive) == {"temperature"}
  # Val top-1 after epochs 1, 2, 3 (steps 4, 8, 12): T = 1 until the first validation, then
  # 1 (0.5 < 0.7), 3 (0.7 <= 0.75 < 0.9), 5 (0.95 >= 0.9); crossing 70% changes T.
  accuracy = {4: 0.5, 8: 0.75, 12: 0.95}
  expected_t = {s: 1.0 if s <= 8 else 3.0 for s in range(1, TOTAL + 1)}

  def evaluator(seen):
    def evaluate(variables):
      step = sorted(accuracy)[len(seen)]
      seen.append(step)
      return {"top1": accuracy[step], "top5": 1.0, "loss": 0.5}
    return evaluate

  def batches(start, flag=None):
    for i in range(start, 100):
      if flag is not None and i == 9:
        flag.set(signal.SIGTERM)  # after the validation at step 8 set T = 3
      yield batch_for(i)

  reference = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "ref",
                  train_batches=batches, evaluate=evaluator([]))
  seen = []
  flag = ckpt_lib.PreemptionFlag()
  with pytest.raises(ckpt_lib.StopRequested, match="at step 10"):
    fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
        train_batches=lambda s: batches(s, flag), evaluate=evaluator(seen), stop=flag)
  resumed = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
                train_batches=batches, evaluate=evaluator(seen), stop=ckpt_lib.PreemptionFlag())
  for run in ("ref", "run"):
    logged = {r["step"]: r["temperature"] for r in train_records(tmp_path / run)}
    assert logged == expected_t, run
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    changes = [json.loads(x) for x in lines if json.loads(x)["kind"] == "hparams"]
    assert [(c["step"], c["temperature"]) for c in changes] == [(8, 3.0), (12, 5.0)]
  assert_trees_equal(numpy_tree(resumed.state), numpy_tree(reference.state))
  with ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
    _, position = ckpt.restore(reference.state, step=12)
  assert position["hparams"] == {"temperature": 5.0}


def test_phases_switch_terms_on_at_their_boundaries(mesh, tmp_path):
  teacher = Tiny(channels=5)
  loss = {"kind": "kd", "kd_alpha": 0.5,
          "feature_losses": ({"kind": "at", "student_key": "stage1", "weight": 10.0},),
          "phases": ("features until 1ep", "features+kd until 2ep", "all")}
  train_step, new_state = build(mesh, loss, teacher=teacher)
  t_vars = teacher.init(jax.random.key(3), jnp.zeros((1,) + SHAPE), train=False)
  fit(new_state(), train_step, spec(), stage_dir=tmp_path, teacher_variables=t_vars,
      train_batches=lambda s: (batch_for(i) for i in range(s, 100)))
  for r in train_records(tmp_path):
    s = r["step"] - 1  # the update's step count
    phase = 0 if s < SPE else 1 if s < 2 * SPE else 2
    assert r["phase"] == phase
    expected = 10.0 * r["feat_at_stage1"] + (0.5 * r["kd"] if phase >= 1 else 0.0) + (
        0.5 * r["ce"] if phase == 2 else 0.0)
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-5)


def test_parameters_no_active_term_reaches_are_not_moved_by_weight_decay(mesh):
  # Phase 0 trains the feature term only: the classifier (Dense) gets no gradient, so, as in
  # PyTorch (no grad -> the optimizer skips the parameter), neither weight decay nor Adam's
  # state may change it; the convolution the feature comes from does train.
  teacher = Tiny(channels=4)
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "adam", "weight_decay": 0.1}, optim.one_cycle(10, 1e-2))
  loss = step_lib.LossConfig.from_config(
      {"kind": "kd", "feature_losses": ({"kind": "hint", "student_key": "stage1"},),
       "phases": ("features until 2steps", "all")}, steps_per_epoch=SPE, total_steps=TOTAL)
  train_step = step_lib.make_train_step(model, loss, tx, mesh, teacher_model=teacher)
  state = state_lib.create_train_state(model, jax.random.key(0), (1,) + SHAPE, tx, mesh=mesh)
  t_vars = teacher.init(jax.random.key(3), jnp.zeros((1,) + SHAPE))
  start = numpy_tree(state.params)
  for i in range(2):
    state, _ = train_step(state, batch_for(i), t_vars)
  phase0 = numpy_tree(state.params)
  assert_trees_equal(phase0["Dense_0"], start["Dense_0"])
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if "Dense_0" in jax.tree_util.keystr(path)]
  assert moments and not any(np.any(np.asarray(m)) for m in moments)  # Adam's mu, nu still 0
  assert not np.array_equal(phase0["Conv_0"]["kernel"], start["Conv_0"]["kernel"])
  state, _ = train_step(state, batch_for(2), t_vars)  # phase 1: every term, Dense trains
  assert not np.array_equal(numpy_tree(state.params)["Dense_0"]["kernel"],
                            start["Dense_0"]["kernel"])


def test_phases_naming_a_term_the_loss_lacks_are_refused():
  with pytest.raises(ValueError, match=r"loss.phases\[0\]=.*unknown term 'lstm'"):
    step_lib.LossConfig.from_config({"kind": "kd", "phases": ("lstm until 2ep", "all")})
  with pytest.raises(ValueError, match="unknown term 'features'"):
    step_lib.LossConfig.from_config({"kind": "kd", "phases": ("features until 2ep", "all")})


def test_fitnet_and_lstm_heads_train_in_the_state_and_stay_out_of_the_student(mesh):
  teacher = Tiny(channels=5)
  loss = {"kind": "kd", "feature_losses": (
      {"kind": "fitnet", "student_key": "stage1", "weight": 1.0},
      {"kind": "lstm", "student_key": "stage1", "weight": 0.5, "channels": 3, "hidden": 4})}
  train_step, new_state = build(mesh, loss, teacher=teacher)
  t_vars = teacher.init(jax.random.key(3), jnp.zeros((1,) + SHAPE), train=False)
  state = new_state()
  before = numpy_tree(state.heads)
  assert set(before["params"]) == {"fitnet_stage1", "lstm_stage1"}
  assert set(before["frozen"]) == {"lstm_stage1"}  # the teacher-side encoder
  # FitNets' regressor: 1x1 conv 4 -> 5 channels + BatchNorm scale and bias.
  assert before["params"]["fitnet_stage1"]["conv"]["kernel"].shape == (1, 1, 4, 5)
  student_keys = set(Tiny().init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"])
  assert set(state.variables()["params"]) == student_keys
  assert set(state.variables()) == {"params"}

  batch = batch_for(0)
  # The step's feature values against the modules applied by hand on the same parameters.
  variables = jax.device_get(state.variables())
  _, fs = Tiny().apply(variables, batch["image"], train=True, return_features=True)
  _, ft = teacher.apply(t_vars, batch["image"], return_features=True)
  fs, ft = fs["stage1"], ft["stage1"]
  regressed, _ = HintRegressor(features=5).apply(
      {"params": before["params"]["fitnet_stage1"],
       "batch_stats": before["batch_stats"]["fitnet_stage1"]}, fs, train=True, target_hw=(6, 6),
      mutable=["batch_stats"])
  fitnet = np.mean(np.sum((np.asarray(regressed, np.float64) - np.asarray(ft, np.float64)) ** 2,
                          axis=(1, 2, 3)) / ft[0].size)
  enc = LSTMStateEncoder(channels=3, hidden=4)
  h_s, c_s = enc.apply({"params": before["params"]["lstm_stage1"]}, fs)
  h_t, c_t = enc.apply({"params": before["frozen"]["lstm_stage1"]}, ft)
  lstm = losses.lstm_state_loss(h_s, c_s, h_t, c_t)

  new, metrics = train_step(state, batch, t_vars)
  np.testing.assert_allclose(float(metrics["feat_fitnet_stage1"]), fitnet, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["feat_lstm_stage1"]), float(lstm), rtol=1e-5)
  after = numpy_tree(new.heads)
  for name in ("fitnet_stage1", "lstm_stage1"):  # trained ...
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"][name],
                           after["params"][name])
    assert all(jax.tree.leaves(changed)), name
  assert_trees_equal(after["frozen"], before["frozen"])  # ... the teacher side is not
  assert set(new.variables()["params"]) == student_keys


def _np_kd(zs, p_teacher, t):
  """T^2 KL(p_teacher || softmax(zs / T)), mean over the batch, float64."""
  zs = np.asarray(zs, np.float64) / t
  log_q = zs - zs.max(-1, keepdims=True)
  log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
  return t * t * np.mean(np.sum(p_teacher * (np.log(p_teacher) - log_q), axis=-1))


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_two_teachers_distil_the_mean_of_their_probabilities(mesh):
  t = 3.0
  train_step, new_state = build(mesh, {"kind": "kd", "temperature": t})
  batch = batch_for(1, teachers=2)
  state = new_state()
  zs = Tiny().apply(jax.device_get(state.variables()), batch["image"])
  z = batch["teacher_logits"]
  p_mean = 0.5 * (_np_softmax(z[:, 0] / t) + _np_softmax(z[:, 1] / t))
  _, metrics = train_step(state, batch)
  np.testing.assert_allclose(float(metrics["kd"]), _np_kd(zs, p_mean, t), rtol=1e-5)

  # Online: two teacher models on the batch give the same target as their stored logits.
  teachers = [Tiny(channels=5), Tiny(channels=6)]
  t_vars = tuple(m.init(jax.random.key(k), jnp.zeros((1,) + SHAPE)) for k, m in
                 enumerate(teachers))
  online_step, new_online = build(mesh, {"kind": "kd", "temperature": t}, teacher=teachers)
  stored = np.stack([m.apply(v, batch["image"]) for m, v in zip(teachers, t_vars)], axis=1)
  _, m_online = online_step(new_online(), batch, t_vars)
  _, m_stored = train_step(new_state(), {**batch, "teacher_logits": stored})
  np.testing.assert_allclose(float(m_online["kd"]), float(m_stored["kd"]), rtol=1e-5)


@pytest.mark.parametrize("spec_text,message", [
    ("linear(10)", "linear takes 2 or 3 arguments"),
    ("warmup(20)", "unit"),
    ("from_accuracy", "temperature"),
])
def test_a_bad_spec_is_refused_before_compute_naming_the_key(spec_text, message):
  config = schema.base_config()
  config.student.loss.kind = "kd"
  config.student.loss.kd_weight = spec_text
  with pytest.raises(schema.ConfigError, match=message) as e:
    schema.check_values(config)
  assert str(e.value).startswith(f"config.student.loss.kd_weight={spec_text!r}")


@pytest.mark.parametrize("key,spec_text,message", [
    ("temperature", "linear(4, 0)", "'linear(4, 0)' takes the value 0 at the end; temperature "
                                    "must be > 0"),
    ("temperature", "warmup(2ep)", "takes the value 0 at the start"),
    ("temperature", "constant(-1)", "takes the value -1; temperature must be > 0"),
])
def test_a_spec_outside_the_keys_bounds_is_refused(key, spec_text, message):
  config = schema.base_config()
  config.student.loss[key] = spec_text
  with pytest.raises(schema.ConfigError, match=re.escape(message)):
    schema.check_values(config)


RECIPES = ("progressive", "temperature_decay", "accuracy_temperature", "staged", "two_teachers")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arg", ["", ":mini"])
def test_recipe_configs_parse_and_resolve(recipe, arg):
  config = schema.load_config_file(str(ROOT / "configs" / f"food101_{recipe}.py{arg}"))
  schema.fill_defaults(config)
  schema.check_values(config)
  loss = step_lib.LossConfig.from_config(config.student.loss, steps_per_epoch=10,
                                         total_steps=10 * int(config.student.epochs))
  assert not loss.unresolved and loss.distills
  if recipe == "staged":
    assert config.student.teacher == "online"
    assert {f.kind for f in loss.head_losses} == {"fitnet", "lstm"}


@pytest.mark.parametrize("spec_text", ["from_accuracy", " from_accuracy "])
def test_from_accuracy_without_a_val_split_is_refused_before_compute(tmp_path, spec_text):
  from jaxkd import experiment
  from jaxkd.workdir import Workdir

  class NoVal:  # the two facts the check reads of a data source
    splits = ("train", "test")

    def num_examples(self, split):
      return 640

  config = schema.base_config()
  config.student.loss.kind = "kd"
  config.student.loss.temperature = spec_text
  with pytest.raises(schema.ConfigError, match=r"config.student.loss.temperature='from_accuracy' "
                     r"is set from the val top-1, but the data has no val split \(train, test\)"):
    experiment._check_training(config, Workdir(tmp_path), NoVal())
  config.student.loss.temperature = "linear(10, 1)"
  experiment._check_training(config, Workdir(tmp_path), NoVal())  # a schedule of the step: fine
