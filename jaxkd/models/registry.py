"""Name -> model factory registry behind `jaxkd.models.create`.

Every model file registers its constructors with `@register("name")`. A factory
takes keyword arguments only (`num_classes`, `dtype`, model options) and
returns an unbound Flax linen module.
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator: registers `factory(*, num_classes, dtype, **kwargs) -> nn.Module` under `name`."""

  def decorator(factory):
    if name in _FACTORIES:
      raise ValueError(f"model name {name!r} is registered twice")
    _FACTORIES[name] = factory
    return factory

  return decorator


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_FACTORIES)


def create(name: str, *, num_classes: int, dtype=jnp.float32, **kwargs) -> nn.Module:
  """Returns the Flax module registered as `name`.

  `module.apply(variables, images, train=False)` maps float images
  [batch, H, W, 3] (NHWC) to logits [batch, num_classes]; with
  `return_features=True` it returns `(logits, features)`, features a dict of
  stage outputs (`stage1`, ..., `stageN`) and the pre-logit `embedding`.
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return _FACTORIES[name](num_classes=num_classes, dtype=dtype, **kwargs)
