"""Learning-rate schedules and optimizers that match their PyTorch counterparts.

The recipes jaxkd reproduces were published with PyTorch optimizers, so the
optax chains built here follow PyTorch's update rules exactly:

- ``sgd``: ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4, nesterov=False)``
  (the CIFAR recipe of Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
  Distillation", CVPR 2022, and its code mdistiller). PyTorch adds weight
  decay to the gradient (L2): g <- g + wd * p; buf <- m * buf + g;
  p <- p - lr * buf.
- ``adam``: ``torch.optim.Adam(weight_decay=1e-4)`` (the Food-101 recipe of "A
  lightweight food image classification model based on knowledge distillation
  and ECA attention", in Chinese). Again L2 added to the gradient *before* the
  Adam moments: g <- g + wd * p, then Adam.
- ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, "Decoupled Weight
  Decay Regularization", ICLR 2019): decoupled decay,
  p <- p - lr * (adam_update + wd * p).

Defaults: a key a config leaves out takes its default from jaxkd.config's
schema (``<stage>.optimizer.*``: adam, learning rate 1e-3, weight decay 1e-4,
schedule one_cycle, ...), the one table of defaults; so a recipe's values
(such as SGD's 5e-4 above) are set in its config.

Weight decay applies to every parameter by default, BatchNorm scales/biases and
all other biases included, as PyTorch does when a model's ``parameters()`` go
to one parameter group. Set ``decay_1d_params=False`` to skip 1-D parameters
(biases, BatchNorm scale/bias), the common "no decay on norms and biases" rule.

Schedules are optax schedules (``step -> value``), ``step`` the number of
optimizer updates already applied (PyTorch: the scheduler has been stepped
``step`` times), so ``schedule(0)`` is the learning rate of the first update.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "one_cycle",
    "one_cycle_momentum",
    "multistep",
    "make_schedule",
    "make_optimizer",
    "build_optimizer",
    "config_get",
]

ScalarOrSchedule = float | optax.Schedule


def config_get(config: Any, key: str, default: Any = None) -> Any:
  """Reads `key` from a Mapping, an ml_collections ConfigDict or any attribute object."""
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(key, default)
  if hasattr(config, "get") and callable(config.get):  # ConfigDict
    try:
      return config.get(key, default)
    except TypeError:
      pass
  return getattr(config, key, default)


def _config_get(config: Any, key: str) -> Any:
  """`config_get` of optimizer key `key`, defaulting to jaxkd.config's schema default."""
  from jaxkd import config as schema  # ml_collections: not on accelerator hosts without configs
  return config_get(config, key, schema.default(f"student.optimizer.{key}"))


def _one_cycle_phases(total_steps: int, pct_start: float, three_phase: bool, start: float,
                      peak: float, end: float) -> list[tuple[float, float, float]]:
  """(end_step, start_value, end_value) per phase, as in torch.optim.lr_scheduler.OneCycleLR."""
  if three_phase:
    return [(float(pct_start * total_steps) - 1, start, peak),
            (float(2 * pct_start * total_steps) - 2, peak, start),
            (total_steps - 1.0, start, end)]
  return [(float(pct_start * total_steps) - 1, start, peak),
          (total_steps - 1.0, peak, end)]


def _piecewise_anneal(phases: list[tuple[float, float, float]], anneal: str) -> optax.Schedule:
  """Schedule that anneals between phase boundaries exactly like OneCycleLR.get_lr.

  For step s, the phase is the first with s <= end_step (the last phase takes
  everything after); pct = (s - start_step) / (end_step - start_step), clipped to
  [0, 1] (PyTorch raises past total_steps; we hold the final value), and

    cos:    v = end + (start - end) / 2 * (1 + cos(pi * pct))
    linear: v = start + (end - start) * pct
  """
  if anneal not in ("cos", "linear"):
    raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
  starts = [0.0] + [p[0] for p in phases[:-1]]
  # Like PyTorch, a phase may end before step 0 (short runs: pct_start * T < 1); it is then never
  # selected and the next phase starts from its (negative) end. Only an empty phase (end == start,
  # PyTorch's ZeroDivisionError) has no defined value.
  for (end_step, _, _), start_step in zip(phases, starts):
    if end_step == start_step:
      raise ValueError(
          f"one-cycle phase boundaries {[p[0] for p in phases]} leave a phase of zero length; "
          "change pct_start slightly (or the number of steps) so that no two boundaries coincide")

  def anneal_fn(v0, v1, rest):
    """Value at fraction pct = 1 - rest of the way from v0 to v1."""
    if anneal == "cos":
      # (1 + cos(pi pct)) / 2 == sin(pi rest / 2)^2 with rest = 1 - pct computed directly as
      # (end - s) / (end - start): near the end of a phase this keeps float32 precision that
      # 1 + cos(pi pct) loses entirely (the final learning rate is ~1e-9).
      w = jnp.sin(jnp.pi / 2.0 * rest) ** 2
    else:
      w = rest
    # A convex combination is exact at both ends (v0 at pct=0, v1 at pct=1) in float32.
    return v0 * w + v1 * (1.0 - w)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    # Evaluate phases from last to first so the first phase with s <= end wins.
    value = None
    for i in reversed(range(len(phases))):
      end_step, v0, v1 = phases[i]
      rest = jnp.clip((end_step - s) / (end_step - starts[i]), 0.0, 1.0)
      v = anneal_fn(v0, v1, rest)
      if value is None:
        value = v
      else:
        value = jnp.where(s <= end_step, v, value)
    return value

  return schedule


def one_cycle(total_steps: int, max_lr: float, *, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, anneal: str = "cos",
              three_phase: bool = False) -> optax.Schedule:
  """PyTorch's OneCycleLR learning rate.

  Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks Using
  Large Learning Rates", SPIE Artificial Intelligence and Machine Learning for
  Multi-Domain Operations Applications, 2019.

  initial_lr = max_lr / div_factor, min_lr = initial_lr / final_div_factor.
  Two phases (default): steps [0, pct_start*T - 1] anneal initial_lr -> max_lr,
  then [pct_start*T - 1, T - 1] anneal max_lr -> min_lr (T = total_steps, the
  boundaries are float(pct_start * T) - 1 and T - 1, exactly as PyTorch).
  three_phase=True: initial -> max until pct_start*T - 1, max -> initial until
  2*pct_start*T - 2, initial -> min until T - 1.

  Why not `optax.cosine_onecycle_schedule`: it places the boundaries at
  int(pct_start * T) and T (not float(pct_start * T) - 1 and T - 1), so its
  peak comes one step later, its final value is reached at T instead of T - 1,
  and it has no three-phase or linear variant; its values differ from
  PyTorch's at every step but the first (e.g. 1e-3 peak, T = 1000: PyTorch
  reaches max_lr at step 299, optax at 300; near the end optax's rate is up
  to ~2.7x PyTorch's, ~68x for T = 137). Checked against torch 2.11's
  OneCycleLR over whole runs (cos/linear, two/three phases): max relative
  difference 1.5e-6 (float32).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0.0 < pct_start < 1.0:
    raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
  initial_lr = max_lr / div_factor
  min_lr = initial_lr / final_div_factor
  return _piecewise_anneal(
      _one_cycle_phases(total_steps, pct_start, three_phase, initial_lr, max_lr, min_lr), anneal)


def one_cycle_momentum(total_steps: int, *, base_momentum: float = 0.85, max_momentum: float = 0.95,
                       pct_start: float = 0.3, anneal: str = "cos",
                       three_phase: bool = False) -> optax.Schedule:
  """OneCycleLR's momentum cycle (cycle_momentum=True, PyTorch's default).

  Momentum moves inversely to the learning rate: max_momentum -> base_momentum
  while the rate rises, then back to max_momentum (same phase boundaries as
  `one_cycle`). PyTorch applies it to SGD's momentum or Adam's beta1.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  return _piecewise_anneal(
      _one_cycle_phases(total_steps, pct_start, three_phase, max_momentum, base_momentum,
                        max_momentum), anneal)


def multistep(base_lr: float, boundaries_in_steps: Sequence[int],
              factor: float = 0.1) -> optax.Schedule:
  """Step decay (PyTorch MultiStepLR): lr(s) = base_lr * factor ** #{b in boundaries : s >= b}.

  mdistiller's CIFAR recipe decays x0.1 after epochs 150, 180, 210 (epochs
  counted from 1), i.e. boundaries [150, 180, 210] * steps_per_epoch.
  """
  bounds = [int(b) for b in boundaries_in_steps]
  if sorted(set(bounds)) != bounds:
    raise ValueError("boundaries_in_steps must be strictly increasing, got "
                     f"{list(boundaries_in_steps)}")
  if any(b < 0 for b in bounds):
    raise ValueError(f"boundaries_in_steps must be non-negative, got {bounds}")
  return optax.piecewise_constant_schedule(base_lr, {b: factor for b in bounds})


def make_schedule(config: Any, *, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Learning-rate schedule from a config.

  Fields (missing ones take jaxkd.config's schema defaults, in parentheses):
  ``schedule`` ('constant' | 'one_cycle' | 'multistep' | 'cosine'; 'one_cycle'),
  ``learning_rate`` (base / max lr; 1e-3), for one_cycle ``pct_start`` (0.3),
  ``div_factor`` (25), ``final_div_factor`` (1e4), ``anneal`` ('cos'),
  ``three_phase`` (False); for multistep ``milestones`` (epochs, PyTorch
  MultiStepLR epochs) or ``milestone_steps`` and ``lr_decay`` (0.1); for cosine
  ``warmup_steps`` (0).
  """
  kind = _config_get(config, "schedule")
  lr = float(_config_get(config, "learning_rate"))
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "one_cycle":
    return one_cycle(total_steps, lr, pct_start=_config_get(config, "pct_start"),
                     div_factor=_config_get(config, "div_factor"),
                     final_div_factor=_config_get(config, "final_div_factor"),
                     anneal=_config_get(config, "anneal"),
                     three_phase=_config_get(config, "three_phase"))
  if kind == "multistep":
    steps = _config_get(config, "milestone_steps")
    if steps is None:
      steps = [int(e) * steps_per_epoch for e in _config_get(config, "milestones")]
    return multistep(lr, steps, _config_get(config, "lr_decay"))
  if kind == "cosine":
    warmup = int(_config_get(config, "warmup_steps"))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
  raise ValueError(f"unknown schedule {kind!r}; use 'constant', 'one_cycle', 'multistep' or "
                   "'cosine'")


def _decay_mask(decay_1d_params: bool) -> Callable[[Any], Any] | None:
  if decay_1d_params:
    return None
  return lambda params: jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Any, learning_rate: ScalarOrSchedule | None = None, *,
                   momentum_schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """An optax optimizer following PyTorch's update rules (see module docstring).

  Config fields (Mapping, ConfigDict or attributes; a missing one takes its
  default from jaxkd.config's schema, shown in parentheses):
    optimizer: 'sgd' | 'adam' | 'adamw' ('adam').
    learning_rate: float (1e-3), used when the `learning_rate` argument is None
      (pass a schedule from `make_schedule`/`one_cycle`/`multistep` instead).
    weight_decay (1e-4; None also means the default): 'sgd'/'adam': L2
      added to the gradient (PyTorch weight_decay); 'adamw': decoupled.
    decay_1d_params: True (default, PyTorch) decays every parameter; False
      skips parameters with ndim <= 1 (biases, BatchNorm scale/bias).
    momentum (0.9), nesterov (False): sgd.
    b1 (0.9), b2 (0.999), eps (1e-8): adam/adamw (PyTorch defaults).
    grad_clip_norm: None or max global L2 norm; clipping happens first, on the
      raw gradient (torch.nn.utils.clip_grad_norm_ before optimizer.step()).

  `momentum_schedule` (e.g. `one_cycle_momentum`) replaces sgd's momentum or
  Adam's beta1 by a schedule, as OneCycleLR's cycle_momentum does in PyTorch.
  """
  name = _config_get(config, "optimizer")
  if learning_rate is None:
    learning_rate = float(_config_get(config, "learning_rate"))
  wd = _config_get(config, "weight_decay")
  if wd is None:
    from jaxkd import config as schema
    wd = schema.default("student.optimizer.weight_decay")
  wd = float(wd)
  mask = _decay_mask(bool(_config_get(config, "decay_1d_params")))
  clip = _config_get(config, "grad_clip_norm")

  chain: list[optax.GradientTransformation] = []
  if clip is not None:
    if clip <= 0:
      raise ValueError(f"grad_clip_norm must be positive or None, got {clip}")
    chain.append(optax.clip_by_global_norm(float(clip)))

  if name == "sgd":
    if wd:
      chain.append(optax.add_decayed_weights(wd, mask))
    m = _config_get(config, "momentum")
    nesterov = bool(_config_get(config, "nesterov"))
    if momentum_schedule is not None:
      chain.append(optax.inject_hyperparams(optax.trace, static_args=("nesterov",))(
          decay=momentum_schedule, nesterov=nesterov))
    elif m:
      # optax.trace: t <- g + m * t, starting from 0, so the first step uses g, like torch's buffer.
      chain.append(optax.trace(decay=float(m), nesterov=nesterov))
  elif name in ("adam", "adamw"):
    b1 = _config_get(config, "b1")
    b2 = float(_config_get(config, "b2"))
    eps = float(_config_get(config, "eps"))
    if name == "adam" and wd:
      chain.append(optax.add_decayed_weights(wd, mask))
    if momentum_schedule is not None:
      chain.append(optax.inject_hyperparams(optax.scale_by_adam)(b1=momentum_schedule, b2=b2,
                                                                 eps=eps))
    else:
      # m_hat / (sqrt(v_hat) + eps): the same as torch.optim.Adam (eps outside the sqrt).
      chain.append(optax.scale_by_adam(b1=float(b1), b2=b2, eps=eps))
    if name == "adamw" and wd:
      chain.append(optax.add_decayed_weights(wd, mask))
  else:
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd', 'adam' or 'adamw'")

  chain.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*chain)


def build_optimizer(config: Any, *, total_steps: int,
                    steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, learning-rate schedule) from one config: `make_schedule` + `make_optimizer`.

  With schedule='one_cycle', ``cycle_momentum`` (default True, as PyTorch's
  OneCycleLR) cycles sgd's momentum / Adam's beta1 between ``base_momentum``
  (0.85) and ``max_momentum`` (0.95) with `one_cycle_momentum`. Give the
  schedule to `make_train_step(learning_rate_fn=...)` to log the rate.
  """
  schedule = make_schedule(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  momentum_schedule = None
  if _config_get(config, "schedule") == "one_cycle" and _config_get(config, "cycle_momentum"):
    momentum_schedule = one_cycle_momentum(
        total_steps, base_momentum=_config_get(config, "base_momentum"),
        max_momentum=_config_get(config, "max_momentum"),
        pct_start=_config_get(config, "pct_start"), anneal=_config_get(config, "anneal"),
        three_phase=_config_get(config, "three_phase"))
  return make_optimizer(config, schedule, momentum_schedule=momentum_schedule), schedule
