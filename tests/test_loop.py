"""`fit` on a tiny model fed from NumPy (no TensorFlow): NaN stop, stop request + exact resume, best
vs last variables, the checkpoint cadence.

References are independent of `fit`'s own bookkeeping: an uninterrupted run for the resumed one,
the variables the evaluate callable itself saw at each epoch for 'best' and 'last'.
"""
from __future__ import annotations

import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trees import assert_trees_equal, numpy_tree

from jaxkd.train import checkpoint as ckpt_lib
from jaxkd.train import optim
from jaxkd.train import state as state_lib
from jaxkd.train import step as step_lib
from jaxkd.train.loop import FitSpec, NonFiniteLossError, fit

SHAPE = (4, 4, 3)
BATCH = 8


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))  # uses the state's RNG
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def batch_for(index: int, nan: bool = False) -> dict:
  rng = np.random.default_rng([7, index])
  image = rng.normal(size=(BATCH,) + SHAPE).astype(np.float32)
  if nan:
    image[0, 0, 0, 0] = np.nan
  return {"image": image, "label": rng.integers(0, 3, BATCH).astype(np.int32),
          "teacher_logits": rng.normal(size=(BATCH, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
  mesh = step_lib.data_mesh()
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "adam", "weight_decay": 1e-4}, optim.one_cycle(8, 1e-2))
  train_step = step_lib.make_train_step(model, {"kind": "kd", "kd_alpha": 0.5}, tx, mesh)

  def new_state():
    return state_lib.create_train_state(model, jax.random.key(0), (1,) + SHAPE, tx, mesh=mesh)

  return train_step, new_state


def spec(**kw) -> FitSpec:
  base = dict(total_steps=8, steps_per_epoch=4, batch_size=BATCH, seed=0, log_every_steps=2,
              progress=False, tensorboard=False, desc="student")
  return FitSpec(**{**base, **kw})


def test_nan_loss_stops_with_the_step(setup, tmp_path):
  train_step, new_state = setup

  def batches(start):
    for i in range(start, 100):
      yield batch_for(i, nan=(i == 4))  # the batch of step 5

  with pytest.raises(NonFiniteLossError, match="student training: the loss is nan at step 5") as e:
    fit(new_state(), train_step, spec(log_every_steps=3), stage_dir=tmp_path,
        train_batches=batches)
  assert isinstance(e.value, FloatingPointError) and e.value.step == 5
  assert "lower learning rate" in str(e.value) and "float32" in str(e.value)


def test_stop_saves_raises_and_resumes_exactly(setup, tmp_path):
  train_step, new_state = setup
  starts = []

  def batches(start, flag=None, stop_before=None):
    starts.append(start)
    for i in range(start, 100):
      if flag is not None and i == stop_before:
        flag.set(signal.SIGTERM)  # arrives while step i + 1 (index i) is being prepared
      yield batch_for(i)

  reference = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "ref",
                  train_batches=batches)
  assert reference.steps == 8

  flag = ckpt_lib.PreemptionFlag()
  with pytest.raises(ckpt_lib.StopRequested, match="during student training at step 4; "
                     "checkpoint saved") as e:
    fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
        train_batches=lambda s: batches(s, flag, stop_before=3), stop=flag)
  assert e.value.signum == signal.SIGTERM
  with ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 4

  resumed = fit(new_state(), train_step, spec(), stage_dir=tmp_path / "run",
                train_batches=batches, stop=ckpt_lib.PreemptionFlag())
  assert starts == [0, 0, 4] and resumed.steps == 8
  assert_trees_equal(numpy_tree(resumed.state), numpy_tree(reference.state))


def test_best_and_last_variables(setup, tmp_path):
  train_step, new_state = setup
  seen = []
  top1 = [0.5, 0.9, 0.7]  # epochs 1, 2, 3 (steps 2, 4, 6): the best is step 4

  def evaluate(variables):
    seen.append(numpy_tree(variables))
    return {"top1": top1[len(seen) - 1], "top5": 1.0, "loss": 0.25, "num_examples": 16}

  run = spec(total_steps=6, steps_per_epoch=2, keep_checkpoints=1)
  result = fit(new_state(), train_step, run, stage_dir=tmp_path,
               train_batches=lambda s: (batch_for(i) for i in range(s, 100)), evaluate=evaluate)
  assert len(seen) == 3 and result.steps == 6
  assert result.val["top1"] == 0.7 and result.best_step == 4
  assert result.best_val == {"top1": 0.9, "top5": 1.0, "loss": 0.25, "num_examples": 16}
  assert_trees_equal(numpy_tree(result.variables("best")), seen[1])
  assert_trees_equal(numpy_tree(result.variables("last")), seen[2])
  with ckpt_lib.Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.all_steps() == [4, 6]  # the last one and the best

  def no_batches(start):
    raise AssertionError(f"a finished stage asked for batches from step {start}")

  again = fit(new_state(), train_step, run, stage_dir=tmp_path, train_batches=no_batches,
              evaluate=evaluate)
  assert len(seen) == 3 and again.steps == 6
  assert again.best_step == 4 and again.best_val["top1"] == 0.9 and again.val["top1"] == 0.7
  assert_trees_equal(numpy_tree(again.variables("best")), seen[1])
  with pytest.raises(ValueError, match="use 'last' or 'best'"):
    again.variables("first")


def test_checkpoint_cadence(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every_steps=5, steps_per_epoch=3, total_steps=10)
  assert [s for s in range(1, 11) if ckpt.due(s)] == [3, 5, 6, 9, 10]
  ckpt.close()


def test_spec_from_stage_config():
  from jaxkd import config as schema
  stage = schema.stage("student", epochs=3, batch_size=16, max_steps=20)
  got = FitSpec.from_config(stage, steps_per_epoch=9, seed=4, desc="student")
  assert (got.total_steps, got.steps_per_epoch, got.batch_size, got.seed) == (20, 9, 16, 4)
  assert (got.log_every_steps, got.checkpoint_every_steps, got.keep_checkpoints) == (50, 500, 2)
  assert FitSpec.from_config({"epochs": 2}, steps_per_epoch=9, seed=0).total_steps == 18
  with pytest.raises(ValueError, match="steps_per_epoch"):
    FitSpec(total_steps=1, steps_per_epoch=0, batch_size=1, seed=0)
