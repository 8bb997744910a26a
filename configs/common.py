"""Compatibility helpers for config files that do `from configs import common` (from the repo root).

Every key, its default, unit and meaning is defined once, in jaxkd/config.py; the configs in this
folder use it directly (`from jaxkd import config as schema`), which works from any directory and
with jaxkd installed. List every key:
`python main.py --config=configs/food101_mini.py --print_config`.
"""
from __future__ import annotations

import ml_collections

from jaxkd.config import base_config, loss, optimizer

__all__ = ["base_config", "loss", "optimizer", "stage"]


def stage(model: str, *, epochs: int, batch_size: int, opt=None, loss_config=None,
          **overrides) -> ml_collections.ConfigDict:
  """A stage group (the student's keys when `teacher=` is given, else the teacher's)."""
  from jaxkd import config as schema
  role = "student" if "teacher" in overrides else "teacher"
  values = dict(model=model, epochs=epochs, batch_size=batch_size, **overrides)
  if opt is not None:
    values["optimizer"] = opt
  if loss_config is not None:
    values["loss"] = loss_config
  return schema.stage(role, **values)
