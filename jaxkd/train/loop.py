"""The training loop: data -> train step -> metrics / checkpoints, resumable and preemptible.

One function, `fit`, trains a teacher or a student for a stage of an
experiment. Everything it writes lives in the stage's folder:

    <stage_dir>/checkpoints/     Orbax: the last N, the best by val top-1, each with
                                 the input position ({'step', 'epoch', 'seed'})
    <stage_dir>/metrics.jsonl    one JSON line per log interval and per evaluation
    <stage_dir>/tensorboard/     TensorBoard event files (process 0 only)

Resuming restores the TrainState (parameters, BatchNorm statistics, optimizer
state, step, RNG) and restarts the input stream at the saved step, so an
interrupted run ends with the same parameters as an uninterrupted one. The
loop reads nothing back from the devices between log intervals (no host sync
per step): the step counter is tracked on the host.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxkd.train import evaluate as evaluate_lib
from jaxkd.train import optim
from jaxkd.train.checkpoint import Checkpointer, PreemptionFlag
from jaxkd.train.state import TrainState, create_train_state, replicate
from jaxkd.train.step import make_eval_step, make_train_step

__all__ = ["FitResult", "MetricsWriter", "fit", "read_metrics"]


@dataclasses.dataclass
class FitResult:
  state: TrainState
  steps: int
  preempted: bool
  val: Optional[dict]  # last evaluation (top1, top5, ...) or None


class MetricsWriter:
  """Appends metrics to <dir>/metrics.jsonl and TensorBoard event files (on process 0 only)."""

  def __init__(self, directory: pathlib.Path, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(directory) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from flax.metrics import tensorboard as tb  # imports TensorFlow: only when asked
        self._tb = tb.SummaryWriter(str(pathlib.Path(directory) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], *, kind: str) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "time": time.time(),
              **{k: float(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(f"{kind}/{k}", float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(stage_dir: pathlib.Path) -> list[dict]:
  """The records of <stage_dir>/metrics.jsonl (empty list if none)."""
  path = pathlib.Path(stage_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics_after(path: pathlib.Path, step: int) -> None:
  """Drops metric lines logged after `step` (written by a run that died before its next checkpoint)."""
  if not path.exists():
    return
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  kept = [l for l in lines if json.loads(l)["step"] <= step]
  if len(kept) != len(lines):
    path.write_text("".join(l + "\n" for l in kept))


class _QuietProgress:
  """With progress bars off (--progress=false, logs, batch jobs): one line per epoch end, and at
  least every `every_s` seconds, with loss, accuracy, images/s and the time left."""

  def __init__(self, desc: str, total_steps: int, steps_per_epoch: int, batch_size: int, *,
               enabled: bool, start_step: int, every_s: float = 60.0):
    self.desc, self.total, self.spe, self.bs = desc, total_steps, steps_per_epoch, batch_size
    self.enabled, self.every_s = enabled, every_s
    self.t0 = self.last = time.time()
    self.step0 = start_step

  def update(self, step: int, mean: Mapping[str, float], *, force: bool) -> None:
    now = time.time()
    if not self.enabled or not (force or now - self.last >= self.every_s):
      return
    self.last = now
    rate = (step - self.step0) * self.bs / max(now - self.t0, 1e-9)
    left = (self.total - step) * self.bs / max(rate, 1e-9)
    print(f"[{self.desc}] step {step}/{self.total} (epoch {step / self.spe:.2f}) "
          f"loss {mean['loss']:.4f} acc {mean['accuracy']:.3f} {rate:.1f} img/s, "
          f"{left / 60:.1f} min left", flush=True)


def fit(*, model, stage_config: Any, source, augment: Mapping[str, Any], mesh, stage_dir: pathlib.Path,
        seed: int, image_size: int, teacher_model=None, teacher_variables=None,
        teacher_lookup: Optional[Callable] = None, init_variables: Optional[Mapping[str, Any]] = None,
        eval_split: Optional[str] = "val", eval_batch_size: Optional[int] = None,
        preemption: Optional[PreemptionFlag] = None, num_parallel_calls: Optional[int] = None,
        progress: bool = True, desc: str = "train") -> FitResult:
  """Trains `model` for `stage_config.epochs` epochs (or `stage_config.max_steps`) and returns the state.

  stage_config fields: epochs, batch_size (global), optimizer (see
  jaxkd.train.optim.make_optimizer/make_schedule), loss (jaxkd.train.step.LossConfig
  fields), log_every_steps, checkpoint_every_steps, keep_checkpoints, max_steps
  (optional cap, for smoke runs), eval_every_epochs.
  """
  from jaxkd.data import pipeline  # TensorFlow only when training

  cfg = stage_config
  stage_dir = pathlib.Path(stage_dir)
  batch_size = int(cfg.batch_size)
  steps_per_epoch = pipeline.steps_per_epoch(source, "train", global_batch_size=batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the training split "
                     f"({source.num_examples('train')} examples); lower batch_size")
  total_steps = int(cfg.epochs) * steps_per_epoch
  max_steps = optim.config_get(cfg, "max_steps", None)
  if max_steps:
    total_steps = min(total_steps, int(max_steps))
  tx, schedule = optim.build_optimizer(cfg.optimizer, total_steps=max(total_steps, 1),
                                       steps_per_epoch=steps_per_epoch)

  state = create_train_state(model, jax.random.key(seed), (1, image_size, image_size, 3), tx)
  if init_variables is not None:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_variables["params"])
    stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_variables.get("batch_stats", {}))
    state = state.replace(params=params, batch_stats=stats, opt_state=tx.init(params))
  state = replicate(state, mesh)

  log_every = int(optim.config_get(cfg, "log_every_steps", 50))
  ckpt_every = optim.config_get(cfg, "checkpoint_every_steps", None)
  eval_every = int(optim.config_get(cfg, "eval_every_epochs", 1))
  ckpt = Checkpointer(stage_dir / "checkpoints", keep_last=int(optim.config_get(cfg, "keep_checkpoints", 2)),
                      keep_best=1, best_metric="val_top1", save_every_steps=ckpt_every)
  writer = None
  try:
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, position = restored
      if int(position.get("seed", seed)) != seed:
        raise ValueError(f"checkpoint in {ckpt.directory} was made with seed {position['seed']}, "
                         f"the config says {seed}; use the same seed or a new workdir")
    step = int(jax.device_get(state.step))
    if restored is not None and jax.process_index() == 0:
      print(f"[{desc}] resuming from the checkpoint at step {step} of {total_steps}", flush=True)
    _truncate_metrics_after(stage_dir / "metrics.jsonl", step)
    writer = MetricsWriter(stage_dir)

    loss_config = dict(cfg.loss)
    warmup_epochs = float(loss_config.pop("warmup_epochs", 0.0) or 0.0)
    if warmup_epochs:
      loss_config["warmup"] = max(int(round(warmup_epochs * steps_per_epoch)), 1)
    train_step = make_train_step(model, loss_config, tx, mesh, learning_rate_fn=schedule,
                                 teacher_model=teacher_model)
    eval_step = make_eval_step(model, mesh)
    needs_teacher = train_step.loss_config.needs_teacher
    if needs_teacher and teacher_model is None and teacher_lookup is None:
      raise ValueError(f"loss {train_step.loss_config.kind!r} needs a teacher: stored logits "
                       "(teacher_lookup) or an online teacher (teacher_model)")

    def run_eval(split):
      batches = pipeline.eval_batches(source, split, global_batch_size=eval_batch_size or batch_size,
                                      augment=augment, image_size=image_size, mesh=mesh,
                                      num_parallel_calls=num_parallel_calls)
      total = pipeline.num_eval_batches(source, split, global_batch_size=eval_batch_size or batch_size)
      return evaluate_lib.evaluate(eval_step, state.variables(), batches, num_classes=source.num_classes,
                                   total=total, desc=f"{desc} eval {split}", progress=progress)

    last_val = None
    if step >= total_steps:
      return FitResult(state=state, steps=step, preempted=False, val=None)

    batches = pipeline.train_batches(
        source, "train", global_batch_size=batch_size, mesh=mesh, augment=augment, image_size=image_size,
        seed=seed, start_step=step, num_parallel_calls=num_parallel_calls,
        teacher_lookup=teacher_lookup if (needs_teacher and teacher_model is None) else None)
    t_vars = replicate(teacher_variables, mesh) if teacher_model is not None else None

    bar = tqdm(total=total_steps * batch_size, initial=step * batch_size, unit="img", unit_scale=True,
               desc=desc, disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    pending: list[dict] = []
    preempted = False
    quiet_log = _QuietProgress(desc, total_steps, steps_per_epoch, batch_size,
                               enabled=not progress and jax.process_index() == 0, start_step=step)
    while step < total_steps:
      batch = next(batches)
      state, metrics = train_step(state, batch, t_vars)
      step += 1
      pending.append(metrics)
      bar.update(batch_size)
      epoch_end = step % steps_per_epoch == 0
      if step % log_every == 0 or epoch_end or step == total_steps:
        host = jax.device_get(pending)
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        mean["epoch"] = step / steps_per_epoch
        writer.write(step, mean, kind="train")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}", refresh=False)
        quiet_log.update(step, mean, force=epoch_end or step == total_steps)
        pending = []
      position = {"step": step, "epoch": step // steps_per_epoch, "seed": seed}
      if preemption is not None and preemption.requested:
        ckpt.save(state, position)
        preempted = True
        break
      epoch = step // steps_per_epoch
      if eval_split and ((epoch_end and epoch % eval_every == 0) or step == total_steps):
        last_val = run_eval(eval_split)
        writer.write(step, {"top1": last_val["top1"], "top5": last_val["top5"], "loss": last_val["loss"],
                            "epoch": step / steps_per_epoch}, kind=f"eval_{eval_split}")
        bar.write(f"{desc}: step {step} epoch {step / steps_per_epoch:.2f} {eval_split} top-1 "
                  f"{last_val['top1']:.4f} top-5 {last_val['top5']:.4f}")
        ckpt.save(state, position, metrics={"val_top1": last_val["top1"]})
      elif epoch_end or step == total_steps:
        ckpt.save(state, position)
      elif ckpt_every and step % int(ckpt_every) == 0:
        ckpt.save(state, position)
    bar.close()
    ckpt.wait_until_finished()
    return FitResult(state=state, steps=step, preempted=preempted, val=last_val)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
