"""Schedules for distillation hyper-parameters (temperature, loss weights).

Optax-style: each schedule is a function `step -> value` (jit-able, built from
optax's own schedule pieces), evaluated inside the train step from the
optimizer step count. Steps are optimizer steps; convert epochs with
`steps_per_epoch`.

Sources: temperature decay and progressive transfer are described in the
article "Implementing knowledge distillation in image classification: from
principles to diagrams" (in Chinese, 2025); the accuracy-driven temperature
and the staged distillation (feature terms first, the others added later) in
KAKAKA, "An innovative image classification scheme based on LSTM knowledge
distillation" (in Chinese, 2025); the warm-up of the distillation term in
Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022
(and its code, mdistiller).

Schedule specs in configs
-------------------------
Every loss hyper-parameter of a config (temperature, kd_alpha, ce_weight,
kd_weight, alpha, beta, a feature-loss weight, ...) may be a number or a
string spec; `parse` turns it into what the train step uses, `check` validates
it before the data (and so the number of steps) is known:

  SPEC := NUMBER                  4, 0.9, '4', '1e-3': the number itself (a float)
        | constant(v)             v
        | linear(a, b)            a -> b linearly over the stage's steps, then b
        | linear(a, b, DUR)       a -> b linearly over DUR, then b
        | warmup(DUR)             0 -> 1 linearly over DUR, then 1: DKD's warm-up,
                                  exactly `dkd_warmup(steps)` (float32
                                  min(step / steps, 1)); 0 steps -> 1
        | warmup(DUR, v)          v times warmup(DUR)
        | progressive             keys ending in 'temperature' or 'kd_alpha' only: the
                                  three phases of `progressive_transfer` over the stage
                                  (T 8 / alpha 0.9, then linearly to 2 / 0.7, then 1 / 0.5)
        | from_accuracy           keys ending in 'temperature' only: an `AccuracyRule`
                                  (T 1 below 70% validation top-1, 3 below 90%, 5 above),
                                  applied by the training loop after each validation
  DUR  := X ep | X epoch | X epochs   X epochs (fractional allowed: 0.5ep);
                                      steps = round(X * steps_per_epoch)
        | N steps | N step            N optimizer steps (a whole number)
        | P %                         P percent of the stage's steps;
                                      steps = round(P / 100 * total_steps)

Names are case-sensitive; spaces are allowed anywhere between the parts
('linear( 10 , 1, 20 ep )'). A duration always carries its unit ('20' alone is
refused) and is never negative. An already built schedule (a callable
`step -> value`) passes through unchanged.

Staged distillation: `parse_phases` reads a list of phases, each
'<terms> until <DUR>' with <terms> = names joined by '+' (or 'all'), the last
one optionally without 'until', e.g.
('features until 20ep', 'features+lstm until 50ep', 'all'); `Phases.active`
gives the 0/1 factor of a loss term at a step.

Every error is a ValueError whose message starts with the config key and the
bad value (`student.loss.temperature='linear(10)': ...`) and lists the accepted
forms.
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "constant",
    "linear_temperature",
    "progressive_transfer",
    "dkd_warmup",
    "temperature_from_accuracy",
    "AccuracyRule",
    "Phases",
    "parse",
    "parse_duration",
    "check",
    "is_scheduled",
    "describe",
    "parse_phases",
    "check_phases",
]


def constant(value: float) -> optax.Schedule:
  """A schedule that always returns `value` (so any hyper-parameter may be given as a schedule)."""
  return optax.constant_schedule(value)


def linear_temperature(t_start: float, t_end: float, total_steps: int) -> optax.Schedule:
  """Temperature decay: T falls linearly from `t_start` (e.g. 10) to `t_end` (e.g. 1) over
  `total_steps`, then stays at `t_end` (the knowledge-distillation article of 2025 cited in
  the module docstring)."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  return optax.linear_schedule(init_value=t_start, end_value=t_end, transition_steps=total_steps)


def progressive_transfer(total_steps: int, *, temperatures: Sequence[float] = (8.0, 2.0, 1.0),
                         alphas: Sequence[float] = (0.9, 0.7, 0.5),
                         fractions: Sequence[float] = (0.5, 0.3, 0.2),
                         ) -> tuple[optax.Schedule, optax.Schedule]:
  """Three-phase progressive transfer (the 2025 article cited in the module docstring).

  Phase 1 (first 50% of training): T = 8, alpha = 0.9 (alpha = weight of the KD term).
  Phase 2 (next 30%): T falls linearly from 8 to 2 and alpha from 0.9 to 0.7.
  Phase 3 (last 20%): T = 1, alpha = 0.5.

  Returns `(temperature_schedule, alpha_schedule)`. `temperatures` = (T1, T2_end, T3),
  `alphas` likewise; phase 2 starts from the phase-1 values.
  """
  if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
    raise ValueError("fractions must be three non-negative numbers summing to 1, got "
                     f"{tuple(fractions)}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  b1 = int(round(fractions[0] * total_steps))
  b2 = int(round((fractions[0] + fractions[1]) * total_steps))

  def three_phase(v1, v2_end, v3):
    return optax.join_schedules(
        [optax.constant_schedule(v1),
         optax.linear_schedule(v1, v2_end, transition_steps=max(b2 - b1, 1)),
         optax.constant_schedule(v3)],
        boundaries=[b1, b2])

  return three_phase(*temperatures), three_phase(*alphas)


def dkd_warmup(warmup_steps: int) -> optax.Schedule:
  """DKD's linear warm-up of the distillation weight: w(step) = min(step / warmup_steps, 1).

  Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022): mdistiller uses
  min(epoch / 20, 1) with epochs counted from 1; per step, pass
  `warmup_steps = 20 * steps_per_epoch`. `warmup_steps <= 0` turns the
  warm-up off (w = 1). This is the one definition of the warm-up:
  `jaxkd.train.step.LossConfig.warmup` (an int number of steps) is evaluated
  with it, in float32 as `min(float32(step) / warmup_steps, 1)` (inside jit XLA may
  compute the division as a multiplication by 1 / warmup_steps, which can differ from it in
  the last bit of float32).
  """
  if warmup_steps <= 0:
    def off(step):
      del step
      return jnp.ones((), jnp.float32)
    return off
  steps = float(warmup_steps)

  def warmup(step):
    return jnp.minimum(jnp.asarray(step).astype(jnp.float32) / steps, 1.0)

  return warmup


def temperature_from_accuracy(val_accuracy, *, thresholds: Sequence[float] = (0.70, 0.90),
                              temperatures: Sequence[float] = (1.0, 3.0, 5.0)):
  """Accuracy-driven temperature: T = 1 below 70% validation accuracy, 3 below 90%, 5 from 90%
  up (KAKAKA 2025, cited in the module docstring).

  `val_accuracy` is a fraction in [0, 1] (scalar or array; works on traced values).
  A rule applied by the training loop after each evaluation, not a function of the step.
  """
  if len(temperatures) != len(thresholds) + 1:
    raise ValueError(f"need one more temperature than thresholds, got {len(temperatures)} and "
                     f"{len(thresholds)}")
  if list(thresholds) != sorted(thresholds):
    raise ValueError(f"thresholds must be increasing, got {tuple(thresholds)}")
  acc = jnp.asarray(val_accuracy, jnp.float32)
  index = jnp.searchsorted(jnp.asarray(thresholds, jnp.float32), acc, side="right")
  return jnp.asarray(temperatures, jnp.float32)[index]


# ------------------------------------------------------------------------------------------------
# Specs in configs: numbers or strings (grammar in the module docstring).

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(rf"\s*{_NUMBER}\s*")
_DURATION_RE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z%]*)\s*")
_CALL_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.DOTALL)
_WORD_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*")
_UNITS = {"ep": "ep", "epoch": "ep", "epochs": "ep", "step": "steps", "steps": "steps",
          "%": "%"}

DURATION_FORMS = ("DUR is a duration with its unit: 20ep (also epoch, epochs; fractional "
                  "allowed, 0.5ep), 500steps (also step; whole steps) or 50% (of the stage's "
                  "steps)")
SPEC_FORMS = ("accepted: a number (4, 0.9), constant(v), linear(a, b[, DUR]), "
              "warmup(DUR[, v]), progressive (temperature and kd_alpha only), from_accuracy "
              "(temperature only); " + DURATION_FORMS)
_CALLS = {"constant": "constant(v)", "linear": "linear(a, b[, DUR])",
          "warmup": "warmup(DUR[, v])"}
_WORDS = ("progressive", "from_accuracy")


@dataclasses.dataclass(frozen=True)
class _Duration:
  amount: float
  unit: str  # 'ep' | 'steps' | '%'


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A checked spec, before the numbers of steps are known."""
  kind: str  # 'number' | 'callable' | 'none' | 'constant' | 'linear' | 'warmup' | word
  numbers: tuple[float, ...] = ()
  duration: _Duration | None = None
  value: Any = None  # the callable


def _last_component(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def _is_number_string(spec: Any) -> bool:
  return isinstance(spec, str) and _NUMBER_RE.fullmatch(spec) is not None


def _duration_syntax(text: Any, where: str) -> _Duration:
  """The duration `text` checked (its unit known, not negative); `where` starts each message."""
  if not isinstance(text, str):
    raise ValueError(f"{where}: a duration is a string with a unit, got {text!r} "
                     f"({type(text).__name__}); {DURATION_FORMS}")
  match = _DURATION_RE.fullmatch(text)
  if match is None:
    raise ValueError(f"{where}: {text.strip()!r} is not a duration; {DURATION_FORMS}")
  number, unit = match.group(1), match.group(2)
  if not unit:
    raise ValueError(f"{where}: the duration {text.strip()!r} has no unit; add one, e.g. "
                     f"{number}ep (epochs), {number}steps (optimizer steps) or {number}% "
                     "(of the stage's steps)")
  if unit not in _UNITS:
    raise ValueError(f"{where}: unknown duration unit {unit!r} in {text.strip()!r}; "
                     f"{DURATION_FORMS}")
  amount = float(number)
  if amount < 0:
    raise ValueError(f"{where}: the duration {text.strip()!r} is negative; durations are "
                     f">= 0; {DURATION_FORMS}")
  unit = _UNITS[unit]
  if unit == "steps" and re.fullmatch(r"\+?\d+", number) is None:
    raise ValueError(f"{where}: {text.strip()!r} is not a whole number of steps; write an "
                     f"integer number of steps, or epochs, or a percentage; {DURATION_FORMS}")
  return _Duration(amount, unit)


def _positive_int(value: Any, name: str, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
  return int(value)


def _duration_steps(duration: _Duration, where: str, total_steps: int | None,
                    steps_per_epoch: int | None) -> int:
  if duration.unit == "steps":
    return int(duration.amount)
  if duration.unit == "ep":
    if steps_per_epoch is None:
      raise ValueError(f"{where}: a duration in epochs needs steps_per_epoch (the number of "
                       "optimizer steps per epoch), which the caller passes when building the "
                       "train step; none was given")
    spe = _positive_int(steps_per_epoch, "steps_per_epoch", where)
    return int(round(duration.amount * spe))
  if total_steps is None:
    raise ValueError(f"{where}: a duration in % needs total_steps (the stage's optimizer "
                     "steps), which the caller passes when building the train step; none was "
                     "given")
  total = _positive_int(total_steps, "total_steps", where)
  return int(round(duration.amount / 100.0 * total))


def parse_duration(text: str, *, key: str, total_steps: int | None = None,
                   steps_per_epoch: int | None = None) -> int:
  """A duration ('20ep', '0.5epochs', '500steps', '50%') as a number of optimizer steps.

  Epochs: round(X * steps_per_epoch); percent: round(P / 100 * total_steps) of
  the stage's steps; steps: N itself. A bare number ('20') or a negative
  duration is refused. `steps_per_epoch` / `total_steps` are needed only by
  the units that use them (ValueError when such a one is None; `check` and
  `check_phases` check the syntax without them). Errors start with
  `key=text`.
  """
  where = f"{key}={text!r}"
  return _duration_steps(_duration_syntax(text, where), where, total_steps, steps_per_epoch)


def _number_arg(text: str, name: str, where: str) -> float:
  if _NUMBER_RE.fullmatch(text) is None:
    raise ValueError(f"{where}: {name} must be a number, got {text!r}; {SPEC_FORMS}")
  return float(text)


def _syntax(spec: Any, key: str) -> _Spec:
  """`spec` checked against the grammar (no numbers of steps needed)."""
  where = f"{key}={spec!r}"
  if spec is None:
    return _Spec("none")
  if isinstance(spec, bool):
    raise ValueError(f"{where}: a boolean is not a hyper-parameter value; {SPEC_FORMS}")
  if isinstance(spec, numbers.Real):
    return _Spec("number", (float(spec),))
  if isinstance(spec, (np.ndarray, jax.Array)) and spec.shape == () and not isinstance(
      spec, jax.core.Tracer):
    return _Spec("number", (float(spec),))
  if callable(spec):
    return _Spec("callable", value=spec)
  if not isinstance(spec, str):
    raise ValueError(f"{where}: expected a number or a string spec, got a "
                     f"{type(spec).__name__}; {SPEC_FORMS}")
  if _NUMBER_RE.fullmatch(spec):
    return _Spec("number", (float(spec),))
  word = _WORD_RE.fullmatch(spec)
  if word is not None and word.group(1) in _WORDS:
    name, last = word.group(1), _last_component(key)
    if name == "progressive" and last not in ("temperature", "kd_alpha"):
      raise ValueError(f"{where}: 'progressive' is for temperature and kd_alpha only (the "
                       f"three-phase progressive transfer), not for {last!r}; {SPEC_FORMS}")
    if name == "from_accuracy" and last != "temperature":
      raise ValueError(f"{where}: 'from_accuracy' is for temperature only (set from the "
                       f"validation accuracy), not for {last!r}; {SPEC_FORMS}")
    return _Spec(name)
  call = _CALL_RE.fullmatch(spec)
  if call is None:
    hint = ""
    if word is not None and word.group(1) in _CALLS:
      hint = f" ({word.group(1)} needs its arguments: {_CALLS[word.group(1)]})"
    raise ValueError(f"{where}: not a schedule spec{hint}; {SPEC_FORMS}")
  name, body = call.group(1), call.group(2)
  if name in _WORDS:
    raise ValueError(f"{where}: {name} takes no arguments; write {name!r}; {SPEC_FORMS}")
  if name not in _CALLS:
    hint = ("; names are lower case" if name.lower() in _CALLS or name.lower() in _WORDS
            else "")
    raise ValueError(f"{where}: unknown schedule {name!r}{hint}; {SPEC_FORMS}")
  args = [a.strip() for a in body.split(",")] if body.strip() else []
  if any(not a for a in args):
    raise ValueError(f"{where}: empty argument in {name}(...); write {_CALLS[name]}; "
                     f"{SPEC_FORMS}")
  if name == "constant":
    if len(args) != 1:
      raise ValueError(f"{where}: constant takes one argument, constant(v), got {len(args)}; "
                       f"{SPEC_FORMS}")
    return _Spec("constant", (_number_arg(args[0], "v", where),))
  if name == "linear":
    if len(args) not in (2, 3):
      raise ValueError(f"{where}: linear takes 2 or 3 arguments, linear(a, b[, DUR]), got "
                       f"{len(args)}; {SPEC_FORMS}")
    a, b = _number_arg(args[0], "a", where), _number_arg(args[1], "b", where)
    duration = _duration_syntax(args[2], where) if len(args) == 3 else None
    return _Spec("linear", (a, b), duration)
  if len(args) not in (1, 2):  # warmup
    raise ValueError(f"{where}: warmup takes 1 or 2 arguments, warmup(DUR[, v]), got "
                     f"{len(args)}; {SPEC_FORMS}")
  duration = _duration_syntax(args[0], where)
  scale = (_number_arg(args[1], "v", where),) if len(args) == 2 else ()
  return _Spec("warmup", scale, duration)


def check(spec: Any, *, key: str) -> None:
  """Raises ValueError when `spec` is not a valid hyper-parameter spec for `key`.

  The full check of `parse` without the numbers of steps (for config
  validation before the data is known): malformed specs, unknown names,
  durations without a unit / with an unknown unit / negative, 'progressive'
  or 'from_accuracy' on a key they do not apply to. Numbers, None and
  callables pass.
  """
  _syntax(spec, key)


def parse(spec: Any, *, key: str, total_steps: int | None = None,
          steps_per_epoch: int | None = None) -> Any:
  """The hyper-parameter `spec` of config key `key` as the train step uses it.

  Returns a Python float for a number (an int/float, or a string that is a
  plain number such as '4' or '0.9') and for 'constant(v)', so a plain
  number behaves exactly as a float constant; the callable itself for a
  callable (an optax-style schedule `step -> value`); None for None (an unset
  optional hyper-parameter such as kd_alpha); a jit-able schedule
  `step -> float32 scalar` for 'linear(...)', 'warmup(...)' and
  'progressive'; an `AccuracyRule` for 'from_accuracy' (not a function of the
  step: the training loop applies it, see `AccuracyRule`). Grammar: the
  module docstring.

  `total_steps` (the stage's optimizer steps) and `steps_per_epoch` are needed
  by 'linear(a, b)', 'progressive' and durations in % (total_steps) or in
  epochs (steps_per_epoch); ValueError if such a one is None.
  """
  parsed = _syntax(spec, key)
  where = f"{key}={spec!r}"
  kind = parsed.kind
  if kind == "none":
    return None
  if kind in ("number", "constant"):
    return parsed.numbers[0]
  if kind == "callable":
    return parsed.value
  if kind == "from_accuracy":
    return AccuracyRule()

  def need_total(what: str) -> int:
    if total_steps is None:
      raise ValueError(f"{where}: {what} needs total_steps (the stage's optimizer steps), "
                       "which the caller passes when building the train step; none was given")
    return _positive_int(total_steps, "total_steps", where)

  if kind == "progressive":
    temperature, alpha = progressive_transfer(need_total("progressive"))
    return temperature if _last_component(key) == "temperature" else alpha
  if kind == "linear":
    a, b = parsed.numbers
    if parsed.duration is None:
      steps = need_total("linear(a, b) without a duration")
    else:
      steps = _duration_steps(parsed.duration, where, total_steps, steps_per_epoch)
    return optax.linear_schedule(init_value=a, end_value=b, transition_steps=max(steps, 1))
  # warmup
  base = dkd_warmup(_duration_steps(parsed.duration, where, total_steps, steps_per_epoch))
  if not parsed.numbers:
    return base
  scale = np.float32(parsed.numbers[0])

  def scaled_warmup(step):
    return scale * base(step)

  return scaled_warmup


def is_scheduled(spec: Any) -> bool:
  """True when `spec`'s value may change during training: a string that is not a plain number
  (including 'constant(v)'), or a callable (a schedule, an `AccuracyRule`); False for numbers
  and None. For deciding which hyper-parameters to log."""
  if isinstance(spec, str):
    return not _is_number_string(spec)
  return callable(spec)


def describe(spec: Any) -> str:
  """One line describing `spec` for messages and logs, e.g. '4', 'linear(10, 1, 20ep)',
  'from_accuracy', or a callable's name."""
  if spec is None:
    return "None"
  if isinstance(spec, AccuracyRule):
    return spec.describe()
  if isinstance(spec, str):
    if _is_number_string(spec):
      return f"{float(spec):g}"
    text = re.sub(r"\s+", "", spec)
    return text.replace(",", ", ")
  if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
    return f"{float(spec):g}"
  if callable(spec):
    return f"schedule {getattr(spec, '__name__', type(spec).__name__)}"
  return repr(spec)


@dataclasses.dataclass(frozen=True)
class AccuracyRule:
  """Accuracy-driven temperature: values[i] where i = the number of thresholds <= top-1.

  With the defaults, T = 1 below 70% validation top-1 accuracy, 3 from 70% to
  below 90%, 5 from 90% up (KAKAKA 2025, cited in the module docstring); the
  same rule as `temperature_from_accuracy` (thresholds compared in float32,
  searchsorted side='right', so 0.70 exactly gives 3).

  Not a function of the step: the training loop applies it after each
  validation (`rule(top1)`, on the host) and saves the current value with the
  checkpoints; before the first validation the value is `initial`
  (accuracy below every threshold).
  """
  thresholds: tuple[float, ...] = (0.70, 0.90)
  values: tuple[float, ...] = (1.0, 3.0, 5.0)

  def __post_init__(self):
    thresholds = tuple(float(t) for t in self.thresholds)
    values = tuple(float(v) for v in self.values)
    if len(values) != len(thresholds) + 1:
      raise ValueError(f"AccuracyRule needs one more value than thresholds, got values "
                       f"{values} and thresholds {thresholds}")
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
      raise ValueError(f"AccuracyRule thresholds must be increasing, got {thresholds}")
    object.__setattr__(self, "thresholds", thresholds)
    object.__setattr__(self, "values", values)

  @property
  def initial(self) -> float:
    """The value before the first validation (accuracy below every threshold)."""
    return self.values[0]

  def __call__(self, top1: float) -> float:
    """The value for validation top-1 accuracy `top1`, a fraction in [0, 1] (host Python)."""
    if isinstance(top1, jax.core.Tracer):
      raise TypeError("AccuracyRule is applied on the host to a validation accuracy, not "
                      "inside jit to a step: use rule.initial in the train step and pass "
                      "rule(top1) as an hparams override after each validation")
    acc = float(top1)
    if not 0.0 <= acc <= 1.0:
      raise ValueError(f"AccuracyRule takes the validation top-1 accuracy as a fraction in "
                       f"[0, 1] (not a percentage, not a step), got {top1!r}")
    return float(temperature_from_accuracy(acc, thresholds=self.thresholds,
                                           temperatures=self.values))

  def describe(self) -> str:
    """E.g. 'from_accuracy (1 below 0.7, 3 below 0.9, 5 from 0.9)'."""
    parts = [f"{v:g} below {t:g}" for v, t in zip(self.values, self.thresholds)]
    parts.append(f"{self.values[-1]:g} from {self.thresholds[-1]:g}" if self.thresholds
                 else f"{self.values[-1]:g}")
    return f"from_accuracy ({', '.join(parts)})"


# ------------------------------------------------------------------------------------------------
# Staged distillation phases.

_UNTIL_RE = re.compile(r"(.*?)\s+until\s+(.*)", re.DOTALL)

PHASE_FORMS = ("each phase is '<terms> until <DUR>' (the last one may omit 'until <DUR>': it "
               "runs to the end of the stage), <terms> being names joined by '+' or 'all', e.g. "
               "('features until 20ep', 'features+lstm until 50ep', 'all'); " + DURATION_FORMS)


@dataclasses.dataclass(frozen=True)
class Phases:
  """Which loss terms are active at each optimizer step (staged distillation).

  Phase i covers the steps [boundaries[i-1], boundaries[i]) (from 0, to the
  end of training for the last one); `active_terms[i]` are its terms, so
  len(active_terms) = len(boundaries) + 1, or both are empty: no phases,
  every term always active (`Phases.always()`). `terms`: the known term
  names (when given, `active` refuses others).
  """
  boundaries: tuple[int, ...] = ()
  active_terms: tuple[frozenset[str], ...] = ()
  terms: tuple[str, ...] = ()

  def __post_init__(self):
    boundaries = tuple(int(b) for b in self.boundaries)
    active = tuple(frozenset(s) for s in self.active_terms)
    if (boundaries or active) and len(active) != len(boundaries) + 1:
      raise ValueError(f"Phases needs one more set of active terms than boundaries, got "
                       f"{len(active)} and boundaries {boundaries}")
    if any(b <= a for a, b in zip((0,) + boundaries, boundaries)):
      raise ValueError(f"Phases boundaries must be positive and increasing, got {boundaries}")
    object.__setattr__(self, "boundaries", boundaries)
    object.__setattr__(self, "active_terms", active)
    object.__setattr__(self, "terms", tuple(self.terms))

  @classmethod
  def always(cls, terms: Sequence[str] = ()) -> Phases:
    """No phases: every term is active at every step."""
    return cls((), (), tuple(terms))

  def index(self, step) -> jax.Array:
    """The phase number at optimizer step `step` (int32 scalar; jit-able), for logging."""
    step = jnp.asarray(step, jnp.int32)
    index = jnp.zeros((), jnp.int32)
    for boundary in self.boundaries:
      index = index + (step >= boundary).astype(jnp.int32)
    return index

  def active(self, term: str, step) -> jax.Array:
    """1.0 when `term` is active at optimizer step `step`, else 0.0 (float32 scalar; jit-able)."""
    if self.terms and term not in self.terms:
      raise ValueError(f"unknown loss term {term!r}; the phases know {list(self.terms)}")
    mask = [term in s for s in self.active_terms]
    if all(mask):
      return jnp.ones((), jnp.float32)
    return jnp.asarray(np.asarray(mask, np.float32))[self.index(step)]


def _phases_syntax(phases: Any, key: str, terms: Sequence[str]
                   ) -> list[tuple[frozenset[str], _Duration | None, str]]:
  """Each phase as (its terms, its 'until' duration or None, where for messages)."""
  if isinstance(phases, str) or not isinstance(phases, Sequence):
    raise ValueError(f"{key}={phases!r}: phases are a list of strings, not a "
                     f"{type(phases).__name__}; {PHASE_FORMS}")
  known = tuple(terms)
  out = []
  for i, item in enumerate(phases):
    where = f"{key}[{i}]={item!r}"
    if not isinstance(item, str):
      raise ValueError(f"{where}: a phase is a string; {PHASE_FORMS}")
    match = _UNTIL_RE.fullmatch(item.strip())
    names_text, until = (match.group(1), match.group(2)) if match else (item, None)
    if until is None and re.search(r"\buntil\b", item):
      raise ValueError(f"{where}: 'until' needs terms before it and a duration after it; "
                       f"{PHASE_FORMS}")
    if until is None and i != len(phases) - 1:
      raise ValueError(f"{where}: only the last phase may omit 'until <DUR>'; {PHASE_FORMS}")
    names = [n.strip() for n in names_text.split("+")]
    if not names_text.strip() or any(not n for n in names):
      raise ValueError(f"{where}: empty term name; {PHASE_FORMS}")
    active = set()
    for name in names:
      if name == "all":
        active.update(known)
      elif name in known:
        active.add(name)
      else:
        raise ValueError(f"{where}: unknown term {name!r}; known terms: {list(known)} or "
                         "'all'")
    duration = None if until is None else _duration_syntax(until, where)
    if duration is not None and duration.amount == 0:
      raise ValueError(f"{where}: a phase boundary at {until.strip()!r} is at step 0, so the "
                       "phase would never run; give a positive duration")
    out.append((frozenset(active), duration, where))
  previous = {}
  for (_, duration, where), item in zip(out, phases):  # same unit: must increase
    if duration is None:
      continue
    if duration.unit in previous and duration.amount <= previous[duration.unit][0]:
      raise ValueError(f"{where}: phase boundaries must be increasing, but this one is not "
                       f"after the previous one, {previous[duration.unit][1]!r}")
    previous[duration.unit] = (duration.amount, item)
  return out


def check_phases(phases: Sequence[str], *, key: str, terms: Sequence[str]) -> None:
  """Raises ValueError when `phases` is not a valid phase list for `terms` (syntax only; see
  `parse_phases`). Boundaries given in the same unit must increase; the others are compared by
  `parse_phases` once the steps are known."""
  _phases_syntax(phases, key, terms)


def parse_phases(phases: Sequence[str], *, key: str, terms: Sequence[str],
                 total_steps: int | None = None, steps_per_epoch: int | None = None) -> Phases:
  """Staged distillation: which loss terms train in which part of the stage.

  `phases`: a list of '<terms> until <DUR>', the last one may omit
  'until <DUR>' (it then runs to the end of the stage); <terms> are names from
  `terms` (e.g. ('ce', 'kd', 'features', 'lstm')) joined by '+', or 'all'.
  E.g. ('features until 20ep', 'features+lstm until 50ep', 'all'): the feature
  terms alone for 20 epochs, then with the LSTM term until epoch 50, then all
  of them (feature losses first, the others added later: KAKAKA 2025, cited
  in the module docstring). If the last phase has an 'until', every term is
  active after it. Boundaries (DUR as in the module docstring, converted with
  `total_steps` / `steps_per_epoch`) must increase and be after step 0. An
  empty list: no phases, every term always active (`Phases.always(terms)`).
  Errors start with `key[i]=item`.
  """
  parsed = _phases_syntax(phases, key, terms)
  if not parsed:
    return Phases.always(terms)
  boundaries, active = [], []
  previous = 0
  for terms_i, duration, where in parsed:
    active.append(terms_i)
    if duration is None:
      break
    steps = _duration_steps(duration, where, total_steps, steps_per_epoch)
    if steps <= previous:
      raise ValueError(f"{where}: phase boundaries must be increasing and after step 0, but "
                       f"this one is at step {steps} and the previous at step {previous}")
    boundaries.append(steps)
    previous = steps
  if parsed[-1][1] is not None:  # every term after the last 'until'
    active.append(frozenset(terms))
  return Phases(tuple(boundaries), tuple(active), tuple(terms))
