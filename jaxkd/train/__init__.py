"""The training core: optimizers and schedules, the TrainState, the data-parallel steps, checkpoints.

  from jaxkd.train import optim, state, step, checkpoint

- optim: one_cycle / one_cycle_momentum / multistep / make_schedule / make_optimizer
  (PyTorch-equivalent OneCycleLR, MultiStepLR, SGD, Adam with L2, AdamW).
- state: TrainState (step, params, batch_stats, opt_state, rng), create_train_state.
- step: LossConfig, make_train_step, make_eval_step, data_mesh, batch_sharding.
- checkpoint: Checkpointer (Orbax, keep-last + best, input position), install_sigterm_handler.

The names below are re-exported; `checkpoint` (which imports Orbax) loads on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from jaxkd.train import optim, state, step
from jaxkd.train.optim import make_optimizer, make_schedule, multistep, one_cycle, one_cycle_momentum
from jaxkd.train.state import TrainState, abstract_state, create_train_state, replicate
from jaxkd.train.step import (FeatureLoss, LossConfig, batch_sharding, data_mesh, make_eval_step,
                              make_train_step)

_LAZY = {"checkpoint": None, "Checkpointer": "Checkpointer", "PreemptionFlag": "PreemptionFlag",
         "install_sigterm_handler": "install_sigterm_handler"}

__all__ = [
    "optim", "state", "step", "checkpoint",
    "one_cycle", "one_cycle_momentum", "multistep", "make_schedule", "make_optimizer",
    "TrainState", "create_train_state", "replicate", "abstract_state",
    "LossConfig", "FeatureLoss", "make_train_step", "make_eval_step", "data_mesh", "batch_sharding",
    "Checkpointer", "PreemptionFlag", "install_sigterm_handler",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module = importlib.import_module("jaxkd.train.checkpoint")
    return module if _LAZY[name] is None else getattr(module, _LAZY[name])
  raise AttributeError(f"module 'jaxkd.train' has no attribute {name!r}")
