"""Checkpoint/restore gives exactly the uninterrupted run; retention; SIGTERM and SIGKILL of a real
process training with `fit`.

Reference: the same tiny training run without interruption (same programs on
the same devices, so the comparison is bitwise).
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

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

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 3)


class Tiny(nn.Module):
  num_classes: int = 5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))  # uses the state's RNG
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32)


def batch_for(seed: int, index: int):
  rng = np.random.default_rng([seed, index])
  return {"image": rng.normal(size=(16,) + SHAPE).astype(np.float32),
          "label": rng.integers(0, 5, 16).astype(np.int32),
          "teacher_logits": rng.normal(size=(16, 5)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
  mesh = step_lib.data_mesh()
  model = Tiny()
  tx = optim.make_optimizer({"optimizer": "adam"}, optim.one_cycle(6, 1e-2))
  train_step = step_lib.make_train_step(model, {"kind": "kd"}, tx, mesh)

  def new_state(seed):
    return state_lib.create_train_state(model, jax.random.PRNGKey(seed), (1,) + SHAPE, tx,
                                        mesh=mesh)

  return mesh, train_step, new_state


def test_restore_continues_exactly(setup, tmp_path):
  mesh, train_step, new_state = setup
  state = new_state(0)
  for i in range(6):
    state, _ = train_step(state, batch_for(0, i))
  uninterrupted = numpy_tree(state)

  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", keep_last=2, keep_best=0, save_every_steps=3)
  state = new_state(0)
  for i in range(3):
    state, _ = train_step(state, batch_for(0, i))
    ckpt.maybe_save(state, {"epoch": 0, "step_in_epoch": i + 1, "data_seed": 0})
  at_3 = numpy_tree(state)
  # Donates the saved buffers while the save may be in flight.
  state, _ = train_step(state, batch_for(0, 3))
  ckpt.close()

  fresh = new_state(123)                          # different values, same structure and layout
  reader = ckpt_lib.Checkpointer(tmp_path / "ckpt", keep_last=2, keep_best=0)
  assert reader.all_steps() == [3]
  restored, position = reader.restore(fresh)
  assert position == {"epoch": 0, "step_in_epoch": 3, "data_seed": 0}
  assert_trees_equal(restored, at_3)              # params, batch_stats, opt_state, step, rng
  assert int(restored.step) == 3
  for leaf in jax.tree.leaves(restored):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
  state = restored
  for i in range(position["step_in_epoch"], 6):
    state, _ = train_step(state, batch_for(0, i))
  assert_trees_equal(numpy_tree(state), uninterrupted)
  reader.close()


def test_keep_last_and_best(setup, tmp_path):
  _, train_step, new_state = setup
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", keep_last=2, keep_best=1,
                               best_metric="val_accuracy", save_every_steps=1)
  val = {2: 0.40, 4: 0.90, 6: 0.55}   # epoch ends every 2 steps; step 4 is the best
  state = new_state(0)
  for i in range(7):
    state, _ = train_step(state, batch_for(1, i))
    step = int(state.step)
    ckpt.maybe_save(state, {"step": step})
    if step in val:                   # same step as the periodic save: rewritten with metrics
      assert ckpt.save(state, {"step": step}, metrics={"val_accuracy": val[step]})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [4, 6, 7]          # last two (6, 7) + best (4)
  assert ckpt.best_step() == 4
  assert ckpt.metrics(4) == {"val_accuracy": 0.90}
  on_disk = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
  assert on_disk == [4, 6, 7]
  _, position = ckpt.restore(new_state(0), step=ckpt.best_step())
  assert position == {"step": 4}
  ckpt.close()


def test_sigterm_sets_the_flag():
  flag = ckpt_lib.install_sigterm_handler()
  try:
    assert not flag.requested
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not flag.requested and time.time() < deadline:
      time.sleep(0.01)
    assert flag.requested and flag.signum == signal.SIGTERM
  finally:
    flag.uninstall()


# --- a real process, killed ---------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import os, sys, time
    import numpy as np
    import jax, jax.numpy as jnp, flax.linen as nn
    from jaxkd.train import checkpoint as ckpt_lib, optim, state as state_lib, step as step_lib
    from jaxkd.train.loop import FitSpec, fit

    workdir, slow = sys.argv[1], sys.argv[2] == "slow"
    EPOCHS, STEPS_PER_EPOCH, SEED = 3, 4, 0

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, x, train=False, return_features=False):
        x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))

    def batch_for(seed, index):
      rng = np.random.default_rng([seed, index // STEPS_PER_EPOCH, index % STEPS_PER_EPOCH])
      return {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
              "label": rng.integers(0, 5, 8).astype(np.int32),
              "teacher_logits": rng.normal(size=(8, 5)).astype(np.float32)}

    mesh = step_lib.data_mesh()
    model = Tiny()
    total = EPOCHS * STEPS_PER_EPOCH
    tx = optim.make_optimizer({"optimizer": "sgd", "weight_decay": 5e-4},
                              optim.one_cycle(total, 0.1))
    state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1, 8, 8, 3), tx, mesh=mesh)
    train_step = step_lib.make_train_step(model, {"kind": "dkd", "warmup": 4}, tx, mesh)
    eval_batch = batch_for(SEED + 1, 0)
    flag = ckpt_lib.install_sigterm_handler()

    def train_batches(start):
      if start:
        print("resumed", start, flush=True)
      for i in range(start, total):
        if i > start:  # step i is done (and saved if the cadence asked for it)
          print("step", i, flush=True)
          if slow:  # leave the test time to signal us after steps 3 and 9 (a SIGTERM cuts the wait)
            end = time.time() + (5.0 if i in (3, 9) else 0.2)
            while time.time() < end and not flag.requested:
              time.sleep(0.02)
        yield batch_for(SEED, i)

    def evaluate(variables):
      logits = np.asarray(model.apply(variables, eval_batch["image"]))
      return {"top1": float(np.mean(logits.argmax(-1) == eval_batch["label"])), "loss": 0.0}

    spec = FitSpec(total_steps=total, steps_per_epoch=STEPS_PER_EPOCH, batch_size=8, seed=SEED,
                   log_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=2,
                   progress=False, tensorboard=False, desc="tiny")
    try:
      result = fit(state, train_step, spec, stage_dir=workdir, train_batches=train_batches,
                   evaluate=evaluate, stop=flag)
    except ckpt_lib.StopRequested as e:  # SIGTERM: saved at the next step boundary
      print("preempted", e.where.split("at step ")[1].split(";")[0], flush=True)
      sys.exit(0)
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(result.state)}
    np.savez(os.path.join(workdir, "final.npz"), **flat)
    print("done", result.steps, flush=True)
''')


def _start(script, workdir, mode):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  if os.environ.get("JAXKD_TEST_JAX_CACHE"):  # the session's compilation cache (tests/conftest.py):
    # the restarted runs load the programs the first ones compiled (the same executables).
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXKD_TEST_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  workdir.mkdir(parents=True, exist_ok=True)
  return subprocess.Popen([sys.executable, str(script), str(workdir), mode], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(proc, prefix, timeout=120):
  lines = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(prefix):
      return lines
  raise AssertionError(f"never saw {prefix!r}; output:\n{''.join(lines)}")


def _finish(proc, timeout=180):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


def test_sigterm_then_sigkill_then_resume(tmp_path):
  """One run is stopped twice: SIGTERM (clean save at the next step boundary, exit 0), then,
  restarted, SIGKILL mid-run (no chance to save; possibly mid-save). Restarted again, it must
  finish with exactly the parameters, statistics, optimizer state and RNG of an uninterrupted
  run, which runs alongside as the reference."""
  script = tmp_path / "train_tiny.py"
  script.write_text(SCRIPT)
  ref = _start(script, tmp_path / "ref", "fast")
  victim = _start(script, tmp_path / "victim", "slow")
  procs = [ref, victim]
  try:
    _read_until(victim, "step 3")
    victim.send_signal(signal.SIGTERM)
    out = _finish(victim)
    assert "preempted" in out, out
    preempted_at = int(out.split("preempted")[1].split()[0])
    assert 3 <= preempted_at < 12

    victim = _start(script, tmp_path / "victim", "slow")
    procs.append(victim)
    lines = _read_until(victim, "step 9")  # saves at 6 and 8 (epoch end) exist or are in flight
    assert f"resumed {preempted_at}\n" in lines, "".join(lines)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert "done 12" in _finish(ref)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  out = _finish(_start(script, tmp_path / "victim", "fast"))
  assert "resumed" in out and "done 12" in out, out
  assert int(out.split("resumed")[1].split()[0]) >= 6

  want = np.load(tmp_path / "ref" / "final.npz")
  got = np.load(tmp_path / "victim" / "final.npz")
  assert sorted(got.files) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
