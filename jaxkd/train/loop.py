"""The training loop: batches -> train step -> metrics / evaluations / checkpoints, resumable.

One function, `fit`, runs a built train step over a stream of batches for a
stage of an experiment. The caller builds everything (the model's TrainState,
the optimizer, the train step, the input stream and the evaluation) and hands
`fit` the pieces; `fit` owns the order of things. Everything it writes lives in
the stage's folder:

    <stage_dir>/checkpoints/     Orbax: the last N, the best by val top-1, each with
                                 the input position ({'step', 'epoch', 'seed'})
    <stage_dir>/metrics.jsonl    one JSON line per log interval and per evaluation
    <stage_dir>/tensorboard/     TensorBoard event files (process 0 only; optional)

Resuming restores the TrainState (parameters, BatchNorm statistics, optimizer
state, step, RNG) and restarts the input stream at the saved step, so an
interrupted run ends with the same parameters as an uninterrupted one. The
loop reads nothing back from the devices between log intervals (no host sync
per step): the step counter is tracked on the host, and the loss is checked for
NaN/Inf where the metrics are fetched anyway.

Building a stage from its config (what jaxkd.experiment does):

    spec = FitSpec.from_config(stage, steps_per_epoch=spe, seed=seed, desc='student')
    tx, schedule = optim.build_optimizer(stage.optimizer, total_steps=max(spec.total_steps, 1),
                                         steps_per_epoch=spe)
    loss = LossConfig.from_config(stage.loss, steps_per_epoch=spe,
                                  total_steps=max(spec.total_steps, 1))  # schedule specs resolved
    state = create_train_state(model, jax.random.key(seed), (1, size, size, 3), tx)
    # then with_variables(state, pretrained, tx) and heads.add_heads(state, loss, ...), if any
    state = replicate(state, mesh)
    train_step = make_train_step(model, loss, tx, mesh, learning_rate_fn=schedule)
    result = fit(state, train_step, spec, stage_dir=..., train_batches=..., evaluate=...)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxkd import distributed
from jaxkd.train.optim import config_get
from jaxkd.train.state import TrainState, abstract_state

if TYPE_CHECKING:
  from jaxkd.train.checkpoint import PreemptionFlag

__all__ = ["FitSpec", "FitResult", "NonFiniteLossError", "MetricsWriter", "fit"]

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; `fit` stopped (the checkpoints before it are kept)."""

  def __init__(self, desc: str, step: int, value: float, checkpoints: str | None = None):
    self.desc, self.step, self.value = desc, step, value
    kept = f"; the checkpoints before it are in {checkpoints}" if checkpoints else ""
    super().__init__(
        f"{desc} training: the loss is {value} at step {step}{kept}. What to try: a lower "
        "learning rate (optimizer.learning_rate), checking the data (labels, images that "
        "decode to NaN/Inf, teacher logits), and float32 compute (dtype='float32') instead of "
        "bfloat16")


@dataclasses.dataclass(frozen=True)
class FitSpec:
  """What `fit` needs to know besides the state, the step and the data.

  total_steps: optimizer steps to train to (a resumed run continues up to it).
  steps_per_epoch: for epoch ends (evaluations, checkpoints, the logged 'epoch').
  batch_size: the global batch (progress bars, images/s).
  seed: the data seed; a checkpoint made with another seed is refused.
  log_every_steps: metrics logging interval (also at epoch ends and the last step);
    the loss is checked for NaN/Inf there.
  eval_every_epochs: evaluate every this many epochs (and at the last step).
  checkpoint_every_steps: periodic checkpoints (also at epoch ends and the last step).
  keep_checkpoints: latest checkpoints kept (plus the best by val top-1).
  desc: the stage's name in messages ('teacher', 'student').
  progress: tqdm bars (False: one line per epoch end, for logs).
  eval_name: the evaluated split's name (metrics kind 'eval_<eval_name>').
  tensorboard: also write TensorBoard event files (imports TensorFlow).
  """
  total_steps: int
  steps_per_epoch: int
  batch_size: int
  seed: int
  log_every_steps: int = 50
  eval_every_epochs: int = 1
  checkpoint_every_steps: int | None = None
  keep_checkpoints: int = 2
  desc: str = "train"
  progress: bool = True
  eval_name: str = "val"
  tensorboard: bool = True

  def __post_init__(self):
    checks = {"total_steps": self.total_steps >= 0, "steps_per_epoch": self.steps_per_epoch >= 1,
              "batch_size": self.batch_size >= 1, "log_every_steps": self.log_every_steps >= 1,
              "eval_every_epochs": self.eval_every_epochs >= 1,
              "keep_checkpoints": self.keep_checkpoints >= 1,
              "checkpoint_every_steps": (self.checkpoint_every_steps is None
                                         or self.checkpoint_every_steps >= 1)}
    for name, ok in checks.items():
      if not ok:
        raise ValueError(f"FitSpec.{name}={getattr(self, name)!r} is out of range: "
                         + ("use >= 0" if name == "total_steps" else "use a positive int"))

  @classmethod
  def from_config(cls, stage_config: Any, *, steps_per_epoch: int, seed: int,
                  desc: str = "train", progress: bool = True, **overrides) -> FitSpec:
    """The spec of a stage config (`<stage>` of jaxkd.config: epochs, batch_size, max_steps,
    log_every_steps, checkpoint_every_steps, keep_checkpoints, eval_every_epochs).

    total_steps = epochs * steps_per_epoch, capped by max_steps when set. Keys the
    config lacks take jaxkd.config's schema defaults, except `epochs` (required).
    `overrides` set other fields (eval_name, tensorboard).
    """
    from jaxkd import config as schema  # ml_collections: only where configs are

    cfg = stage_config
    epochs = config_get(cfg, "epochs", None)
    if epochs is None:
      raise ValueError("the stage config has no epochs; set <stage>.epochs")

    def get(key: str) -> Any:
      return config_get(cfg, key, schema.default(f"student.{key}"))

    total_steps = int(epochs) * int(steps_per_epoch)
    max_steps = get("max_steps")
    if max_steps:
      total_steps = min(total_steps, int(max_steps))
    every = get("checkpoint_every_steps")
    return cls(total_steps=total_steps, steps_per_epoch=int(steps_per_epoch),
               batch_size=int(get("batch_size")), seed=int(seed),
               log_every_steps=int(get("log_every_steps")),
               eval_every_epochs=int(get("eval_every_epochs")),
               checkpoint_every_steps=None if every is None else int(every),
               keep_checkpoints=int(get("keep_checkpoints")), desc=desc, progress=progress,
               **overrides)


def _val_of(metrics: Mapping[str, Any] | None) -> dict | None:
  """The evaluation results saved with a checkpoint ({'val_top1': ...} -> {'top1': ...})."""
  if not metrics:
    return None
  val = {k[len("val_"):]: v for k, v in metrics.items() if k.startswith("val_")}
  if "num_examples" in val:
    val["num_examples"] = int(val["num_examples"])
  return val


@dataclasses.dataclass
class FitResult:
  """What `fit` returns.

  state: the last TrainState.
  steps: its step (the stage's total_steps unless stopped early).
  val: the last evaluation (the evaluate callable's dict; for a stage that had
    already finished, the scalar results saved with its last checkpoint), or None.
  best_val / best_step: the best evaluation by val top-1 and its step, from the
    checkpoints' saved results (top1, top5, loss, num_examples); None without
    evaluations.
  """
  state: TrainState
  steps: int
  val: dict | None
  best_val: dict | None
  best_step: int | None
  checkpoint_dir: pathlib.Path | None = None

  def variables(self, which: str = "last") -> dict:
    """The model variables of the last state ('last') or of the best checkpoint ('best')."""
    if which == "last":
      return self.state.variables()
    if which != "best":
      raise ValueError(f"which={which!r}: use 'last' or 'best'")
    if self.best_step is None:
      raise ValueError("no evaluation ran during this training, so there is no best checkpoint; "
                       "use the last variables ('last'), or evaluate during training")
    if self.best_step == self.steps:
      return self.state.variables()
    from jaxkd.train.checkpoint import Checkpointer
    with Checkpointer(self.checkpoint_dir, keep_last=1, keep_best=1,
                      best_metric="val_top1") as ckpt:
      state, _ = ckpt.restore(abstract_state(self.state), step=self.best_step)
    return state.variables()


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


def _truncate_metrics_after(path: pathlib.Path, step: int) -> None:
  """Drops metric lines logged after `step` (by a run that died before its next checkpoint)."""
  if not path.exists():
    return
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= step]
  if len(kept) != len(lines):
    path.write_text("".join(line + "\n" for line in kept))


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


def _mean_checked(pending: list[dict], step: int, desc: str, checkpoints: str,
                  current: tuple[str, ...] = ()) -> dict:
  """Host means of the metrics of the steps up to `step`; NonFiniteLossError on a NaN/Inf loss.

  The keys in `current` (hyper-parameters in use) are taken from the last step, not averaged.
  """
  host = jax.device_get(pending)
  for i, m in enumerate(host):
    value = float(m["loss"])
    if not math.isfinite(value):
      raise NonFiniteLossError(desc, step - len(host) + 1 + i, value, checkpoints)
  return {k: float(host[-1][k]) if k in current else float(np.mean([m[k] for m in host]))
          for k in host[0]}


def _checked_val(val: Any, desc: str) -> dict:
  if not isinstance(val, Mapping) or "top1" not in val:
    got = sorted(val) if isinstance(val, Mapping) else type(val).__name__
    raise ValueError(f"{desc}: the evaluate callable must return a dict with 'top1' (and "
                     f"'top5', 'loss'), got {got}")
  return dict(val)


def fit(state: TrainState, train_step: Callable[..., tuple[TrainState, dict]], spec: FitSpec, *,
        stage_dir: str | pathlib.Path, train_batches: Callable[[int], Iterator[Mapping[str, Any]]],
        evaluate: Callable[[PyTree], Mapping[str, Any]] | None = None,
        teacher_variables: PyTree | None = None,
        stop: PreemptionFlag | None = None) -> FitResult:
  """Trains `state` with `train_step` up to `spec.total_steps`, resuming from `stage_dir`.

  state: the freshly created TrainState (pretrained variables already in, replicated
    on the mesh); when `<stage_dir>/checkpoints` holds a checkpoint, it is restored
    over this state (its layout is the target) and training continues from its step.
  train_step: `jaxkd.train.step.make_train_step`'s function (donates its state). Its
    `adaptive` rules (hyper-parameters set from the validation top-1, such as the
    'from_accuracy' temperature) are applied after every evaluation and passed to each
    call as `hparams`; their values in use are saved with every checkpoint (in the
    position) and restored with it, so a resumed run continues with the same values.
    Its `current_value_keys` metrics are logged as they are at the log step.
  train_batches: `start_step -> iterator` of on-device batches, the first being the
    batch of step `start_step` (called once, only if there is training left).
  evaluate: `variables -> {'top1', 'top5', 'loss', ...}`, called at the end of every
    `eval_every_epochs`-th epoch and at the last step; its results go to
    metrics.jsonl and with the checkpoint (which makes the best one by top-1 kept).
    None: no evaluation (then there is no best checkpoint).
  teacher_variables: passed to every train_step call (an online teacher's variables,
    replicated on the mesh); None for stored logits or no teacher.
  stop: a `jaxkd.train.checkpoint.PreemptionFlag`; when it is set, fit saves a
    checkpoint after the current step and raises `StopRequested`.

  Raises NonFiniteLossError (a FloatingPointError) when a logged loss is NaN/Inf,
  StopRequested on a stop request (checkpoint saved), ValueError when the
  checkpoint was made with another seed.
  """
  from jaxkd.train.checkpoint import Checkpointer, StopRequested  # Orbax: only when training

  desc, spe, total = spec.desc, spec.steps_per_epoch, spec.total_steps
  stage_dir = pathlib.Path(stage_dir)
  ckpt = Checkpointer(stage_dir / "checkpoints", keep_last=spec.keep_checkpoints, keep_best=1,
                      best_metric="val_top1", save_every_steps=spec.checkpoint_every_steps,
                      steps_per_epoch=spe, total_steps=total)
  writer = bar = None
  try:
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, position = restored
      if int(position.get("seed", spec.seed)) != spec.seed:
        raise ValueError(f"checkpoint in {ckpt.directory} was made with seed {position['seed']}, "
                         f"the config says {spec.seed}; use the same seed or a new workdir")
    step = int(jax.device_get(state.step))
    if restored is not None and distributed.is_main():
      print(f"[{desc}] resuming from the checkpoint at step {step} of {total}", flush=True)
    adaptive = dict(getattr(train_step, "adaptive", None) or {})
    current = tuple(getattr(train_step, "current_value_keys", ()))
    hparams = {name: float(rule.initial) for name, rule in adaptive.items()}
    if restored is not None:
      saved = position.get("hparams", {})
      hparams.update({k: float(v) for k, v in saved.items() if k in hparams})

    def result(val: dict | None) -> FitResult:
      ckpt.wait_until_finished()
      best_step = ckpt.best_step()
      best_val = None if best_step is None else _val_of(ckpt.metrics(best_step))
      return FitResult(state=state, steps=step, val=val, best_val=best_val, best_step=best_step,
                       checkpoint_dir=pathlib.Path(ckpt.directory))

    if step >= total:  # finished before (e.g. killed after training, before the next stage)
      latest = ckpt.latest_step()
      return result(None if latest is None else _val_of(ckpt.metrics(latest)))

    if distributed.is_main():
      _truncate_metrics_after(stage_dir / "metrics.jsonl", step)
    writer = MetricsWriter(stage_dir, tensorboard=spec.tensorboard)
    batches = train_batches(step)
    bar = tqdm(total=total * spec.batch_size, initial=step * spec.batch_size, unit="img",
               unit_scale=True, desc=desc, dynamic_ncols=True,
               disable=not spec.progress or jax.process_index() != 0)
    quiet_log = _QuietProgress(desc, total, spe, spec.batch_size, start_step=step,
                               enabled=not spec.progress and jax.process_index() == 0)
    pending: list[dict] = []
    last_val = None

    def say(line: str) -> None:  # process 0 prints
      if distributed.is_main():
        bar.write(line)

    while step < total:
      batch = next(batches)
      state, metrics = train_step(state, batch, teacher_variables, hparams or None)
      step += 1
      pending.append(metrics)
      bar.update(spec.batch_size)
      epoch_end = step % spe == 0
      if step % spec.log_every_steps == 0 or epoch_end or step == total:
        mean = _mean_checked(pending, step, desc, ckpt.directory, current)
        mean["epoch"] = step / spe
        writer.write(step, mean, kind="train")
        bar.set_postfix(loss=f"{mean['loss']:.4f}", acc=f"{mean['accuracy']:.3f}", refresh=False)
        quiet_log.update(step, mean, force=epoch_end or step == total)
        pending = []
      saved_metrics = None
      if evaluate is not None and ((epoch_end and (step // spe) % spec.eval_every_epochs == 0)
                                   or step == total):
        last_val = _checked_val(evaluate(state.variables()), desc)
        scalars = {k: last_val[k] for k in ("top1", "top5", "loss") if k in last_val}
        writer.write(step, {**scalars, "epoch": step / spe}, kind=f"eval_{spec.eval_name}")
        say(f"{desc}: step {step} epoch {step / spe:.2f} {spec.eval_name} "
                  + " ".join(f"{k.replace('top', 'top-')} {v:.4f}" for k, v in scalars.items()
                             if k != "loss"))
        saved_metrics = {f"val_{k}": v for k, v in scalars.items()}
        if "num_examples" in last_val:
          saved_metrics["val_num_examples"] = last_val["num_examples"]
        for name, rule in adaptive.items():
          value = float(rule(float(last_val["top1"])))
          if value != hparams[name]:
            say(f"{desc}: step {step}: {name} {hparams[name]:g} -> {value:g} (val top-1 "
                      f"{float(last_val['top1']):.4f}; rule {rule.describe()})")
            writer.write(step, {name: value, "epoch": step / spe}, kind="hparams")
          hparams[name] = value
      position = {"step": step, "epoch": step // spe, "seed": spec.seed}
      if hparams:
        position["hparams"] = dict(hparams)
      ckpt.maybe_save(state, position, step=step, metrics=saved_metrics)
      # A stop request is served after this step's evaluation, so the checkpoint carries the
      # values an evaluation sets (the 'from_accuracy' temperature). Every process stops at the
      # same step when any of them was asked to (a signal reaches one host).
      stopping, signum = distributed.any_stop(stop)
      if stopping:
        ckpt.maybe_save(state, position, step=step, force=True)
        raise StopRequested(signum, f"during {desc} training at step {step}; checkpoint saved")
    return result(last_val)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    if writer is not None:
      writer.close()
