"""The training core: optimizers and schedules, the TrainState, the data-parallel steps,
checkpoints, the training loop.

  from jaxkd.train import optim, state, step, checkpoint, loop

- optim: one_cycle / one_cycle_momentum / multistep / make_schedule / make_optimizer /
  build_optimizer (PyTorch-equivalent OneCycleLR, MultiStepLR, SGD, Adam with L2, AdamW).
- state: TrainState (step, params, batch_stats, opt_state, rng), create_train_state,
  with_variables (pretrained weights), replicate.
- step: LossConfig, make_train_step, make_eval_step, make_logits_fn, data_mesh, batch_sharding.
- checkpoint: Checkpointer (Orbax, keep-last + best, input position, save cadence),
  install_stop_handler, StopRequested.
- loop: fit, FitSpec, FitResult, NonFiniteLossError.

The names below are re-exported; `checkpoint` (which imports Orbax) and `loop` load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from jaxkd.train import optim, state, step
from jaxkd.train.optim import (
  build_optimizer,
  make_optimizer,
  make_schedule,
  multistep,
  one_cycle,
  one_cycle_momentum,
)
from jaxkd.train.state import (
  TrainState,
  abstract_state,
  create_train_state,
  replicate,
  with_variables,
)
from jaxkd.train.step import (
  FeatureLoss,
  LossConfig,
  batch_sharding,
  data_mesh,
  make_eval_step,
  make_logits_fn,
  make_train_step,
)

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "checkpoint": ("checkpoint", None), "Checkpointer": ("checkpoint", "Checkpointer"),
    "PreemptionFlag": ("checkpoint", "PreemptionFlag"),
    "StopRequested": ("checkpoint", "StopRequested"),
    "install_sigterm_handler": ("checkpoint", "install_sigterm_handler"),
    "install_stop_handler": ("checkpoint", "install_stop_handler"),
    "loop": ("loop", None), "fit": ("loop", "fit"), "FitSpec": ("loop", "FitSpec"),
    "FitResult": ("loop", "FitResult"), "NonFiniteLossError": ("loop", "NonFiniteLossError"),
}

__all__ = [
    "optim", "state", "step", "checkpoint", "loop",
    "one_cycle", "one_cycle_momentum", "multistep", "make_schedule", "make_optimizer",
    "build_optimizer",
    "TrainState", "create_train_state", "with_variables", "replicate", "abstract_state",
    "LossConfig", "FeatureLoss", "make_train_step", "make_eval_step", "make_logits_fn",
    "data_mesh", "batch_sharding",
    "Checkpointer", "PreemptionFlag", "StopRequested", "install_sigterm_handler",
    "install_stop_handler",
    "fit", "FitSpec", "FitResult", "NonFiniteLossError",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(f"jaxkd.train.{module_name}")
    return module if attribute is None else getattr(module, attribute)
  raise AttributeError(f"module 'jaxkd.train' has no attribute {name!r}")
