"""Checkpointing for exact resumption: Orbax CheckpointManager + the input position + SIGTERM.

A checkpoint at optimizer step S holds two items:

- 'state': the whole TrainState (step, params, batch_stats, opt_state, rng),
  saved with ocp.args.StandardSave and restored with StandardRestore onto an
  abstract target that carries the mesh shardings (so a restored state is
  already laid out as the train step expects);
- 'position': a small JSON dict describing where the input pipeline is, e.g.
  {'step': 1320, 'epoch': 3, 'seed': 0} (what `jaxkd.train.loop.fit` saves),
  so that the loop can rebuild the data iterator at exactly the next batch.

Retention: the last `keep_last` checkpoints are kept, plus the best
`keep_best` among those saved with metrics (e.g. val accuracy at the end of an
epoch), by `best_metric` and `best_mode`; checkpoints without metrics (periodic
saves) only live through the keep-last rule. The cadence (every N steps, epoch
ends, the last step, after evaluations, on a stop request) is the
Checkpointer's too: see `Checkpointer.maybe_save`.

Saves are asynchronous by default (Orbax copies the arrays to host memory
before `save` returns, so the train step may donate the state afterwards);
each checkpoint is written to a temporary directory and renamed when complete,
so a process killed mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from jaxkd.train.state import TrainState, abstract_state

__all__ = ["Checkpointer", "PreemptionFlag", "StopRequested", "install_sigterm_handler",
           "install_stop_handler"]

PyTree = Any


class _DropMetricWarning(logging.Filter):
  """Orbax warns on every save without metrics once best_fn is set; periodic saves have none."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropMetricWarning())


class Checkpointer:
  """Periodic / end-of-epoch / best checkpoints of a TrainState and the input position.

  The Checkpointer owns the save cadence: `maybe_save`, called after every step,
  saves every `save_every_steps` steps, at each epoch end (`steps_per_epoch`),
  at the last step (`total_steps`), whenever evaluation `metrics` come with the
  step (they make it a candidate for best) and when forced (a stop request).

  Usage (the loop):

    ckpt = Checkpointer(workdir / 'checkpoints', keep_last=2, keep_best=1,
                        best_metric='val_top1', save_every_steps=500,
                        steps_per_epoch=spe, total_steps=total)
    restored = ckpt.restore_latest(state)          # or None on a fresh start
    if restored is not None:
      state, position = restored
    ...
    ckpt.maybe_save(state, position, step=step)    # after each step
    ckpt.maybe_save(state, position, step=step, metrics={'val_top1': acc})  # after an eval
    ckpt.maybe_save(state, position, step=step, force=True)  # stop requested
    ckpt.close()

  `position` must be JSON-serialisable.
  """

  def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, keep_best: int = 1,
               best_metric: str = "val_accuracy", best_mode: str = "max",
               save_every_steps: int | None = None, steps_per_epoch: int | None = None,
               total_steps: int | None = None, async_save: bool = True):
    if keep_last < 1:
      raise ValueError("keep_last must be >= 1 (the latest checkpoint is needed to resume), got "
                       f"{keep_last}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    for name, value in (("save_every_steps", save_every_steps),
                        ("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
      if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive or None, got {value}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    self.save_every_steps = save_every_steps
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps

    def metric_of(metrics: Mapping[str, Any]) -> float:
      if best_metric not in metrics:
        raise KeyError(f"checkpoint metrics {sorted(metrics)} lack best_metric {best_metric!r}")
      return float(metrics[best_metric])

    policies = [ocm.LatestN(n=keep_last)]
    if keep_best:
      policies.append(ocm.BestN(get_metric_fn=metric_of, reverse=(best_mode == "min"), n=keep_best,
                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=metric_of, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "position"))

  # -- queries ---------------------------------------------------------------------------------
  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best_metric` among checkpoints saved with metrics (None if none)."""
    with_metrics = [s for s in self._manager.all_steps() if self._manager.metrics(s) is not None]
    if not with_metrics:
      return None
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    return self._manager.metrics(step)

  # -- saving ----------------------------------------------------------------------------------
  def save(self, state: PyTree, position: Mapping[str, Any], *,
           metrics: Mapping[str, float] | None = None) -> bool:
    """Saves now (at step int(state.step)); returns True if a checkpoint was written.

    If this step is already saved, it is left as is, except when `metrics` are
    given and the existing one has none (a periodic save at an epoch's last
    step): then it is rewritten with the metrics so it can count as best.
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      if metrics is None or self._manager.metrics(step) is not None:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                position=ocp.args.JsonSave(dict(position))),
        metrics=metrics, force=True)

  def due(self, step: int) -> bool:
    """Whether the cadence asks for a checkpoint at `step`: every `save_every_steps` steps,
    an epoch end (`steps_per_epoch`) or the last step (`total_steps`)."""
    return ((self.save_every_steps is not None and step % self.save_every_steps == 0)
            or (self.steps_per_epoch is not None and step % self.steps_per_epoch == 0)
            or (self.total_steps is not None and step == self.total_steps))

  def maybe_save(self, state: PyTree, position: Mapping[str, Any], *, step: int | None = None,
                 metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Saves if the cadence asks for it (`due`), if `metrics` are given or if `force`d.

    step: the state's step as the caller counts it on the host; without it,
      it is read from `state.step` (a device-to-host transfer, i.e. a sync
      with the device every call).
    metrics: evaluation metrics of this step (they may make it the best).
    force: save whatever the cadence (e.g. a stop request).
    Returns True if a checkpoint was written.
    """
    if not (force or metrics is not None):
      if step is None:
        step = int(jax.device_get(state.step))
      if not self.due(step):
        return False
    return self.save(state, position, metrics=metrics)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restoring -------------------------------------------------------------------------------
  def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Restores (state, position) at `step` (default: latest) onto `target`'s layout.

    The restored arrays take `target`'s structure and shardings.

    `target` is a TrainState laid out as training needs it (e.g. the freshly
    created, replicated state; its values are not used), or a pytree of
    jax.ShapeDtypeStruct with shardings (`jaxkd.train.state.abstract_state`).
    """
    self._manager.wait_until_finished()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else abstract_state(x), target)
    # A checkpoint from before TrainState had `heads` (the distillation heads) restores onto a
    # target without them, when the target has none either.
    legacy = (isinstance(target, TrainState) and not target.heads
              and "heads" not in self._saved_fields(step))
    if legacy:
      abstract = {f: getattr(abstract, f) for f in ("step", "params", "batch_stats", "opt_state",
                                                    "rng")}
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      position=ocp.args.JsonRestore()))
    state = restored["state"]
    if legacy:
      state = target.replace(**state, heads={})
    return state, dict(restored["position"])

  def _saved_fields(self, step: int) -> set[str]:
    """The top-level names of the state saved at `step` (TrainState's fields)."""
    path = os.path.join(self.directory, str(step), "state")
    return set(ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree)

  def restore_latest(self, target: PyTree) -> tuple[PyTree, dict] | None:
    """(state, position) from the latest checkpoint, or None if there is none (fresh start)."""
    if self._manager.latest_step() is None:
      return None
    return self.restore(target)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionFlag:
  """Set by SIGTERM (and optionally SIGINT); the loop checks it at each step boundary.

    flag = install_stop_handler()
    for batch in data:
      state, metrics = train_step(state, batch)
      if flag.requested:
        ckpt.maybe_save(state, position, force=True)
        raise StopRequested(flag.signum, f"during training at step {step}; checkpoint saved")

  (`jaxkd.train.loop.fit` does exactly this; the command line turns StopRequested into a
  message and an exit code.)
  """

  def __init__(self):
    self._event = threading.Event()
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def __bool__(self) -> bool:
    return self.requested

  def set(self, signum: int | None = None) -> None:
    self.signum = signum
    self._event.set()

  def uninstall(self) -> None:
    """Restores the handlers that were installed before."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()


class StopRequested(Exception):
  """Raised by a stage that stopped at a safe point after SIGINT/SIGTERM, its work saved.

  The command line turns it into one message and an exit code; library code never exits.
  """

  def __init__(self, signum: int | None, where: str):
    self.signum = signum
    self.where = where
    name = signal.Signals(signum).name if signum else "a stop request"
    super().__init__(f"{name} {where}")  # the command line prints "stopped: SIGINT during ..."


def install_stop_handler() -> PreemptionFlag:
  """SIGTERM and SIGINT (Ctrl-C) both set the flag: stop at the next safe point, keep the work.

  A second Ctrl-C while the flag is set raises KeyboardInterrupt as usual (a stuck process can still
  be stopped); a second SIGTERM kills the process.
  """
  return install_sigterm_handler(also_sigint=True)


def install_sigterm_handler(*, also_sigint: bool = False) -> PreemptionFlag:
  """Installs a handler that only sets a flag on SIGTERM (and SIGINT if asked); returns the flag.

  The handler does no I/O: the loop notices `flag.requested` after the current
  step, saves a checkpoint and raises StopRequested. A second signal while the flag is
  already set falls back to the previous handler's behaviour (default: die), so
  a stuck process can still be stopped. Must be called from the main thread.
  """
  flag = PreemptionFlag()
  signums = [signal.SIGTERM] + ([signal.SIGINT] if also_sigint else [])

  for signum in signums:
    previous = signal.getsignal(signum)
    flag._previous[signum] = previous

    def handler(sig, frame, _previous=previous):
      if flag.requested:
        if callable(_previous):
          _previous(sig, frame)
        elif _previous == signal.SIG_DFL:
          signal.signal(sig, signal.SIG_DFL)
          os.kill(os.getpid(), sig)
        return
      flag.set(sig)

    signal.signal(signum, handler)
  return flag
