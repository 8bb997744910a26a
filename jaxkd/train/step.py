"""One data-parallel train step for every loss, and an eval step.

Data parallelism is `jax.jit` over a device Mesh with a 'data' axis: the batch
is sharded along 'data' (NamedSharding(mesh, P('data'))), the TrainState and
teacher variables are replicated (P()), and the state argument is donated.
Inside the step every array is a *global* array, so:

- every loss is a mean over the global batch (no pmean needed), and gradients
  are the gradients of that global loss;
- BatchNorm statistics in training mode are over the global batch: XLA inserts
  the cross-device reductions (tests/test_train_step.py checks 8 devices == 1);
- perception reconstruction's per-class statistics are over the global batch
  without an `axis_name`.

Loss (`LossConfig`, all weights/temperatures may be floats or schedules
`step -> value`, evaluated at `state.step`):

  total = ce_weight * CE(z_s, y)
        + kd_weight * warmup(step) * D(z_s', z_t')          (kind != 'ce')
        + sum_f weight_f * F_f(features_s, features_t)      (optional)

with D = KD (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
Network", NIPS Deep Learning Workshop 2015) for 'kd'/'lskd' or DKD (Zhao,
Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022) for
'dkd'; z' = z, or logit_standardize(z) (Sun, Ren, Li, Wang, Cao, "Logit
Standardization in Knowledge Distillation", CVPR 2024; kind 'lskd' or
standardize=True), or perception_reconstruct(z) over the global batch (Zhu &
Zhu, "Decoupled knowledge distillation based on perception reconstruction",
Computer Systems & Applications 2025, in Chinese; perception=True). The form
L = (1-a) CE + a KD of the Food-101 recipe ("A lightweight food image
classification model based on knowledge distillation and ECA attention", in
Chinese) is kd_alpha=a (sets ce_weight = 1-a, kd_weight = a).

Padding: rows with batch['weight'] == 0 are excluded from every loss, metric
and the perception statistics, but training-mode BatchNorm statistics *do*
include them. Training batches are therefore never padded (the loaders drop
the remainder); padding is for evaluation, where BatchNorm uses running
statistics and padding is exactly neutral.

MixUp / CutMix batches (Zhang et al., "mixup: Beyond Empirical Risk
Minimization", ICLR 2018; Yun et al., "CutMix", ICCV 2019), as made by
jaxkd.data.augment.mix_batch: image x = mix of x_i and its partner x_j with
weight lam, plus 'soft_label' q = lam onehot(y_i) + (1 - lam) onehot(y_j),
'mix_lambda' lam [B] and, with stored teacher logits, 'mix_teacher_logits'
(the partner's stored logits t_j beside the example's own t_i).

- CE trains against q, never the hard label. Label smoothing eps is applied
  on top: target (1 - eps) q + eps / C, which equals mixing the two smoothed
  one-hot labels with lam (the convention of timm's Mixup).
- metrics['accuracy'] on a training batch is q[argmax z_s], the expected
  top-1 hit against a label drawn from q (lam for y_i, 1 - lam for y_j); for
  hard labels (and unmixed batches, lam = 1) it is the usual top-1.
- Stored teacher: the logits were computed once per image on its eval view,
  so the teacher never saw the mixed image. The target is the same mix as
  the image and the label, taken in probability space at the loss's
  temperature T, after standardisation / perception:
    p_t = lam softmax(z'_i / T) + (1 - lam) softmax(z'_j / T),
  and D = T^2 KL(p_t || softmax(z'_s / T)). The gradient with respect to
  z_s is T (softmax(z_s / T) - p_t), linear in p_t, so it is exactly
  lam * grad KD(p_i) + (1 - lam) * grad KD(p_j): the same split as MixUp's
  CE on the mixed label, and for a one-hot-confident teacher p_t -> q.
  Mixing logits instead (softmax(lam z_i + (1 - lam) z_j)) is a normalised
  geometric mean p_i^lam p_j^(1-lam): for a confident teacher it gives the
  dominant class far more than lam (two classes, logit margin 10, T = 1,
  lam = 0.6: 0.88), contradicting the mixed label, and it changes with T,
  which the pipeline does not know (T may be a schedule or an hparam). So
  the pipeline passes t_i, t_j and lam, and the step mixes. (The exact target,
  the teacher's output on the mixed image, is what the online teacher gives
  and what FKD-Mix stores per mixed crop: Yin, Xing & Shen, "Squeeze, Recover
  and Relabel", NeurIPS 2023; per-image stored logits cannot provide it.)
  The mix is handed to losses.kd_loss as pseudo-logits T log p_t, whose
  softmax at temperature T is exactly p_t. Perception statistics are taken
  over the examples' own rows (weights), and the partner rows are
  transformed with those same per-class statistics.
- Online teacher: it runs on batch['image'], i.e. on the mixed image itself,
  so its output already is the teacher's view of the mixed input
  (consistent teaching, Beyer et al., "Knowledge distillation: A good
  teacher is patient and consistent", CVPR 2022); nothing is mixed, stored
  fields are ignored.
- DKD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) splits
  the distributions at one ground-truth class; a mixed example has two, and
  taking the dominant one would make the partner class "non-target dark
  knowledge" weighted by beta. DKD is therefore refused on batches with
  soft labels (ValueError; `check_mixing_supported` is the same check for
  config validation). Perception reconstruction needs no label (it is a
  per-class standardisation over the batch) and works with mixing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import losses, schedules
from jaxkd.train import color
from jaxkd.train.optim import config_get
from jaxkd.train.state import TrainState

__all__ = [
    "FeatureLoss",
    "LossConfig",
    "make_train_step",
    "make_eval_step",
    "make_logits_fn",
    "data_mesh",
    "batch_sharding",
    "TRAIN_BATCH_KEYS",
    "check_mixing_supported",
]

HParam = float | Callable[[jax.Array], jax.Array]
PyTree = Any

TRAIN_BATCH_KEYS = ("image", "label", "weight", "teacher_logits", "soft_label", "mix_lambda",
                    "mix_teacher_logits", "color_jitter")
_KINDS = ("ce", "kd", "dkd", "lskd")
_FEATURE_KINDS = ("at", "hint", "mmd", "fitnet", "lstm")
HEAD_KINDS = ("fitnet", "lstm")  # feature terms with their own trained modules (jaxkd.train.heads)
HPARAM_NAMES = ("ce_weight", "kd_weight", "kd_alpha", "temperature", "alpha", "beta", "warmup")
# The terms `LossConfig.phases` switches on and off: 'kd' is the logit distillation term (KD or
# DKD), 'features' every feature term but the LSTM one, 'lstm' the LSTM term.
PHASE_TERMS = ("ce", "kd", "features", "lstm")


@dataclasses.dataclass(frozen=True)
class FeatureLoss:
  """A feature-distillation term: `features[student_key]` vs the teacher's `features[teacher_key]`.

  kind: 'at' (attention transfer: Zagoruyko & Komodakis, "Paying More Attention
    to Attention", ICLR 2017), 'mmd' (maximum mean discrepancy: Gretton, Borgwardt,
    Rasch, Schoelkopf, Smola, "A Kernel Two-Sample Test", JMLR 2012), 'hint'
    (FitNets' MSE between features of identical shapes: Romero, Ballas, Kahou,
    Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015),
    'fitnet' (the same MSE after FitNets' learned regressor, a 1x1 convolution +
    BatchNorm from the student's channels to the teacher's, resized to the
    teacher's spatial size) or 'lstm' (LSTM state matching: KAKAKA, "An innovative
    image classification scheme based on LSTM knowledge distillation", 2025, in
    Chinese; see docs/methods.md). 'fitnet' and 'lstm' train their own modules
    with the student (`jaxkd.train.heads`); they are not part of the student.
  weight: a number, a schedule, or a schedule spec (`jaxkd.schedules.parse`).
  channels, hidden: 'lstm' only: the 3-D convolution's output channels (default
    256) and the LSTM's hidden size (default 512).
  """
  kind: str
  student_key: str
  teacher_key: str | None = None
  weight: HParam = 1.0
  channels: int | None = None
  hidden: int | None = None

  def __post_init__(self):
    if self.kind not in _FEATURE_KINDS:
      raise ValueError(f"feature loss kind must be one of {_FEATURE_KINDS}, got {self.kind!r}")
    if self.kind != "lstm" and (self.channels is not None or self.hidden is not None):
      raise ValueError(f"feature loss {self.kind!r} on {self.student_key!r}: channels and hidden "
                       "are options of kind 'lstm' only; remove them")

  @property
  def name(self) -> str:
    return f"{self.kind}_{self.student_key}"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the train step minimises (see module docstring for the formula).

  kind: 'ce' | 'kd' | 'dkd' | 'lskd' ('lskd' = 'kd' with standardize=True).
  label_smoothing: for the CE term (PyTorch convention).
  ce_weight, kd_weight: term weights (mdistiller KD: 0.1 / 0.9; DKD: 1.0 / 1.0;
    LS-KD: 0.1 / 9).
  kd_alpha: if set, overrides both: ce_weight = 1 - kd_alpha, kd_weight = kd_alpha
    (the Food-101 recipe's form, see the module docstring). Ignored for kind 'ce'
    (plain CE, weight ce_weight), so a KD config turned into its CE baseline by
    `kind='ce'` trains with the full CE.
  temperature: T of KD/DKD (KD/DKD CIFAR 4, LS-KD 2, ImageNet DKD 1).
  alpha, beta: DKD's TCKD and NCKD weights (1, 8).
  warmup: multiplies the distillation term: an int number of steps for DKD's
    linear min(step / warmup, 1) (`jaxkd.schedules.dkd_warmup`; 0 = off), or
    any schedule `step -> weight`. The config key `warmup_epochs` (> 0) replaces
    it by round(warmup_epochs * steps_per_epoch) steps (at least 1): see
    `from_config`.
  perception: apply perception reconstruction to student and teacher logits
    before the distillation loss (statistics over the global batch, padding
    excluded); perception_eps its epsilon.
  standardize: logit standardisation before the distillation loss;
    standardize_eps its epsilon. Exclusive with perception.
  feature_losses: FeatureLoss terms (need an online teacher).
  phases: staged distillation: which terms are active in which part of the stage,
    e.g. ('features until 20ep', 'features+lstm until 50ep', 'all') with the terms
    of PHASE_TERMS (`jaxkd.schedules.parse_phases`); () = every term always.

  Every weight and temperature (and each feature term's weight) is a number, a
  schedule `step -> value`, or a spec string such as 'linear(10,1)',
  'progressive', 'warmup(20ep)' or 'from_accuracy' (`jaxkd.schedules.parse`).
  Specs are turned into schedules by `from_config(..., steps_per_epoch=,
  total_steps=)`; a 'from_accuracy' value is an `AccuracyRule`, applied by the
  training loop after each validation and passed to the step as an hparam.
  """
  kind: str = "ce"
  label_smoothing: float = 0.0
  ce_weight: HParam = 1.0
  kd_weight: HParam = 1.0
  kd_alpha: HParam | None = None
  temperature: HParam = 4.0
  alpha: HParam = 1.0
  beta: HParam = 8.0
  warmup: int | Callable[[jax.Array], jax.Array] = 0
  perception: bool = False
  perception_eps: float = 1e-6
  standardize: bool = False
  standardize_eps: float = 1e-7
  feature_losses: tuple[FeatureLoss, ...] = ()
  phases: Any = ()

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"loss kind must be one of {_KINDS}, got {self.kind!r}")
    if self.kind == "lskd":
      object.__setattr__(self, "standardize", True)
    if self.perception and self.standardize:
      raise ValueError("perception and standardize (lskd) are alternatives; set only one")
    if self.kind == "ce" and (self.perception or self.standardize):
      raise ValueError("perception/standardize need a distillation loss, but kind is 'ce'")
    feats = tuple(f if isinstance(f, FeatureLoss) else FeatureLoss(**dict(f))
                  for f in self.feature_losses)
    object.__setattr__(self, "feature_losses", feats)
    names = [f.name for f in feats]
    if len(set(names)) != len(names):
      raise ValueError(f"feature losses {names}: two terms of the same kind on the same student "
                       "feature; give each term its own (kind, student_key)")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

  @property
  def distills(self) -> bool:
    return self.kind != "ce"

  @property
  def needs_teacher(self) -> bool:
    return self.distills or bool(self.feature_losses)

  @property
  def head_losses(self) -> tuple[FeatureLoss, ...]:
    """The feature terms with their own trained modules ('fitnet', 'lstm')."""
    return tuple(f for f in self.feature_losses if f.kind in HEAD_KINDS)

  def specs(self) -> dict[str, Any]:
    """Every hyper-parameter that may be scheduled, by its config name: HPARAM_NAMES plus
    'feature_losses.<kind>_<student_key>.weight' per feature term."""
    out = {name: getattr(self, name) for name in HPARAM_NAMES}
    for f in self.feature_losses:
      out[f"feature_losses.{f.name}.weight"] = f.weight
    return out

  @property
  def unresolved(self) -> list[str]:
    """The names of hyper-parameters still given as spec strings (and 'phases' as strings)."""
    names = [name for name, v in self.specs().items() if isinstance(v, str)]
    if self.phases and not isinstance(self.phases, schedules.Phases):
      names.append("phases")
    return names

  @classmethod
  def from_config(cls, config: Any, *, steps_per_epoch: int | None = None,
                  total_steps: int | None = None, where: str = "loss") -> LossConfig:
    """From a Mapping / ConfigDict / object with the field names above (missing ones default).

    Spec strings (`jaxkd.schedules.parse`) and `phases` are checked here (ValueError
    naming `<where>.<key>`); with `steps_per_epoch` and `total_steps` (the stage's
    optimizer steps) they become schedules, which training needs: without them they
    stay strings (enough for questions such as `kind` or `needs_teacher`), and
    `make_train_step` refuses them.

    The config key `warmup_epochs` (> 0) is DKD's warm-up in epochs: with
    `steps_per_epoch` it replaces `warmup` by max(round(warmup_epochs *
    steps_per_epoch), 1) steps.
    """
    if isinstance(config, LossConfig):
      if not config.unresolved or steps_per_epoch is None or total_steps is None:
        return config
      config = dataclasses.asdict(config)
    kwargs = {}
    for field in dataclasses.fields(cls):
      value = config_get(config, field.name, dataclasses.MISSING)
      if value is not dataclasses.MISSING:
        kwargs[field.name] = value
    if "feature_losses" in kwargs:
      kwargs["feature_losses"] = tuple(kwargs["feature_losses"] or ())
    warmup_epochs = _warmup_epochs(config)
    if warmup_epochs and steps_per_epoch is not None:
      kwargs["warmup"] = max(int(round(warmup_epochs * steps_per_epoch)), 1)
    resolve = steps_per_epoch is not None and total_steps is not None
    steps = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def spec(value, key):
      if not isinstance(value, str):
        return value
      if resolve:  # parse checks what `check` does
        return schedules.parse(value, key=f"{where}.{key}", **steps)
      schedules.check(value, key=f"{where}.{key}")
      return value

    for name in HPARAM_NAMES:
      if name in kwargs:
        kwargs[name] = spec(kwargs[name], name)
    feats = []
    for i, f in enumerate(kwargs.get("feature_losses", ())):
      f = dict(dataclasses.asdict(f) if isinstance(f, FeatureLoss) else f)
      if "weight" in f:
        f["weight"] = spec(f["weight"], f"feature_losses[{i}].weight")
      feats.append(f)
    if feats:
      kwargs["feature_losses"] = tuple(feats)
    phases = kwargs.get("phases") or ()
    if isinstance(phases, str):
      phases = (phases,)
    if phases and not isinstance(phases, schedules.Phases):
      phases = tuple(phases)
      # Only the terms this loss has: a phase naming another one would train nothing.
      kinds = {dict(f)["kind"] for f in kwargs.get("feature_losses", ())}
      present = [t for t, has in zip(PHASE_TERMS, (
          True, kwargs.get("kind", "ce") != "ce", bool(kinds - {"lstm"}), "lstm" in kinds)) if has]
      if resolve:  # parse_phases checks what check_phases does
        phases = schedules.parse_phases(phases, key=f"{where}.phases", terms=present, **steps)
      else:
        schedules.check_phases(phases, key=f"{where}.phases", terms=present)
    kwargs["phases"] = phases
    return cls(**kwargs)


def _warmup_epochs(config: Any) -> float:
  """The config's `warmup_epochs` (0.0 when absent or None)."""
  return float(config_get(config, "warmup_epochs", 0.0) or 0.0)


def _value(h: Any, step: jax.Array) -> jax.Array:
  """A hyper-parameter's value at `step`: schedules are called, numbers returned as float32."""
  if callable(h):
    return jnp.asarray(h(step), jnp.float32)
  return jnp.asarray(h, jnp.float32)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D Mesh with axis 'data' over `devices` (default: all devices).

  The axis is AxisType.Auto (the compiler propagates shardings), which is what
  this module's jit-with-shardings style expects; jax.make_mesh defaults to
  Explicit axes in jax >= 0.7, so it is not used here.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'.

  Use with jax.device_put / jax.make_array_from_process_local_data.
  """
  return NamedSharding(mesh, P("data"))


_DKD_MIXING = (
    "loss kind 'dkd' cannot train on MixUp/CutMix batches: DKD splits the teacher's and the "
    "student's distributions at one ground-truth class, and a mixed example has two labels "
    "(soft_label). Use kind 'kd' or 'lskd' (perception=True works too) with MixUp/CutMix, or "
    "turn mixing off (mixup_alpha=0, mixup_lambda_range=None, cutmix_alpha=0)")


def check_mixing_supported(loss_config: Any) -> None:
  """Raises ValueError when `loss_config` cannot train on MixUp/CutMix batches (soft labels).

  DKD needs one ground-truth class per example to split target from non-target
  classes; a mixed example has two (see the module docstring). Every other loss
  (CE, KD, LS-KD, with or without perception, feature losses) trains on mixed batches.
  """
  if LossConfig.from_config(loss_config).kind == "dkd":
    raise ValueError(_DKD_MIXING)


def _mixed_teacher_logits(own: jax.Array, partner: jax.Array, lam: jax.Array,
                          temperature: jax.Array) -> jax.Array:
  """Pseudo-logits u with softmax(u / T) = lam softmax(own / T) + (1 - lam) softmax(partner / T).

  u = T log p_mix, with log p_mix = logaddexp(log lam + log_softmax(own / T),
  log(1 - lam) + log_softmax(partner / T)): finite for every lam in [0, 1]
  (lam = 1, an unmixed batch, gives own exactly up to a per-row constant).
  """
  lam = lam.astype(jnp.float32)[:, None]
  log_p = jnp.logaddexp(jnp.log(lam) + jax.nn.log_softmax(own / temperature, axis=-1),
                        jnp.log1p(-lam) + jax.nn.log_softmax(partner / temperature, axis=-1))
  return temperature * log_p


def _skip_untouched(grads, params, opt_state, old_params, old_opt_state):
  """Staged distillation: the parameters no active term reaches (their gradient is exactly 0
  everywhere, e.g. the classifier while only feature terms train, or a head before its phase)
  keep their values and optimizer state, as in PyTorch, where a parameter outside the loss's graph
  has no gradient and the optimizer skips it. Without this, weight decay alone would move them
  (Adam normalises a decay-only gradient into steps of the learning rate's size towards 0).
  The optimizer's shared step count still advances."""
  touched = jax.tree.map(lambda g: jnp.any(g != 0), grads)
  treedef = jax.tree.structure(touched)

  def like_params(x) -> bool:
    return not isinstance(x, jax.Array) and jax.tree.structure(x) == treedef

  def keep(new, old):
    return jax.tree.map(lambda t, a, b: jnp.where(t, a, b), touched, new, old)

  opt_state = jax.tree.map(lambda n, o: keep(n, o) if like_params(n) else n, opt_state,
                           old_opt_state, is_leaf=like_params)
  return keep(params, old_params), opt_state


def _split_teachers(logits: jax.Array, name: str) -> list[jax.Array]:
  """Stored logits [B, C] (one teacher) or [B, K, C] (K teachers) -> K float32 [B, C] arrays."""
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  if logits.ndim == 2:
    return [logits]
  if logits.ndim != 3:
    raise ValueError(f"batch[{name!r}] must be [B, C] or [B, K, C] (K teachers), got shape "
                     f"{logits.shape}")
  return [logits[:, k] for k in range(logits.shape[1])]


def _mean_teacher_logits(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """Pseudo-logits u [B, C] of several teachers [B, K, C]: softmax(u / T) is the mean over k of
  softmax(logits_k / T). u = T (logsumexp_k log_softmax(logits_k / T) - log K)."""
  k = logits.shape[1]
  log_p = jax.nn.logsumexp(jax.nn.log_softmax(logits / temperature, axis=-1), axis=1) - np.log(k)
  return temperature * log_p


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  k = min(k, logits.shape[-1])
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == labels[:, None], axis=-1)


def _apply_with_features(model: nn.Module, variables, images, *, train: bool, features: bool,
                         **kwargs):
  """model.apply returning (logits, features or None, mutated)."""
  call_kwargs = {"train": train}
  if features:
    call_kwargs["return_features"] = True
  out = model.apply(variables, images, **call_kwargs, **kwargs)
  if "mutable" in kwargs:
    out, mutated = out
  else:
    mutated = {}
  if features:
    logits, feats = out
  else:
    logits, feats = out, None
  return logits, feats, mutated


def make_train_step(model: nn.Module, loss_config: Any, tx: optax.GradientTransformation,
                    mesh: Mesh, *, teacher_model: nn.Module | Sequence[nn.Module] | None = None,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    donate: bool = True) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, batch, teacher_variables=None, hparams=None) -> (state, metrics)`.

  model: the student (a linen Module following the jaxkd models contract); its
    compute dtype is its own business, logits are cast to float32 for the loss.
  loss_config: LossConfig or a Mapping/ConfigDict with its fields, with every
    spec string resolved (`LossConfig.from_config(config, steps_per_epoch=...,
    total_steps=...)`).
  tx: the optax transformation the state's opt_state was created with (the
    distillation heads in `state.heads`, if any, are updated with it too).
  mesh: a Mesh with a 'data' axis (see `data_mesh`).
  teacher_model: online teacher (run in eval mode on the same augmented batch,
    no gradient), or a sequence of teachers; their variables are the
    `teacher_variables` argument of each call (replicated; a sequence in the
    same order for several teachers). Without it, teacher logits are read from
    batch['teacher_logits'] (stored logits).
  learning_rate_fn: the schedule given to the optimizer; only used to report
    metrics['learning_rate'] (the rate used by this update, schedule(state.step)).
  donate: donate the state argument (its buffers are reused for the new state;
    do not touch the old state after the call).

  batch: dict with 'image' [B,H,W,3], 'label' int32 [B] (or [B,C] soft labels
    for CE/KD), optional 'weight' float32 [B] (default all ones) and
    'teacher_logits' float32 [B,C], or [B,K,C] for K teachers; from MixUp/CutMix
    (jaxkd.data.augment.mix_batch) 'soft_label' float32 [B,C] (then the CE target
    instead of 'label'), 'mix_lambda' float32 [B] and 'mix_teacher_logits'
    float32 like 'teacher_logits' (the partner's stored logits, mixed with
    'teacher_logits' in probability space; see the module docstring); other keys
    are ignored. B must be divisible by the mesh's 'data' size. Kind 'dkd'
    refuses soft labels (ValueError). A uint8 'image' (`augment.color_on_device`) is colour
    jittered with 'color_jitter' [B, 4] (absent: no jitter) and normalised first
    (jaxkd.train.color), and the student and the online teacher both see the result.
  hparams: optional dict overriding config values by name (any of
    HPARAM_NAMES, as floats or float32 scalars) without recompiling; the
    training loop passes the values of 'from_accuracy' rules this way
    (`train_step.adaptive`).

  Several teachers (K > 1): the distillation target is the mean of the
  teachers' probabilities at the loss's temperature, p = mean_k softmax(z'_k / T)
  (z'_k after standardisation / perception / mixing, each teacher on its own),
  handed to KD or DKD as the pseudo-logits T log p, whose softmax at T is p. The
  feature terms use the first teacher's features.

  metrics (float32 scalars, replicated, weighted over the global batch): loss,
  ce, kd or dkd, feat_<kind>_<key> per feature loss, accuracy (with soft labels
  q: mean of q[argmax z], see the module docstring), learning_rate
  (if learning_rate_fn), temperature / kd_weight_eff (when distilling),
  grad_norm (of the student's parameters), num_examples; and the value used by
  this update of every scheduled hyper-parameter under its config name
  ('kd_alpha', 'ce_weight', ..., 'feature_losses.<kind>_<key>.weight') and
  'phase' (the phase index) with phases. `train_step.current_value_keys` names
  the metrics that are values in use rather than per-step measurements (the
  loop logs them as they are at the log step, not averaged).
  """
  if not isinstance(loss_config, LossConfig) and _warmup_epochs(loss_config):
    raise ValueError(
        f"loss config has warmup_epochs={_warmup_epochs(loss_config)}, which needs the number of "
        "steps per epoch: pass LossConfig.from_config(config, steps_per_epoch=...) as loss_config")
  cfg = LossConfig.from_config(loss_config)
  if cfg.unresolved:
    raise ValueError(
        f"loss config has schedule specs {cfg.unresolved} that need the stage's length: pass "
        "LossConfig.from_config(config, steps_per_epoch=..., total_steps=...) as loss_config")
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
  # The warm-up weight: an int number of steps is DKD's linear warm-up, written once in
  # jaxkd.schedules.
  warmup = cfg.warmup if callable(cfg.warmup) else schedules.dkd_warmup(cfg.warmup)
  teachers = (() if teacher_model is None else tuple(teacher_model)
              if isinstance(teacher_model, Sequence) else (teacher_model,))
  if cfg.feature_losses and not teachers:
    raise ValueError("feature losses need an online teacher: pass teacher_model (and "
                     "teacher_variables to each call)")
  need_feats = bool(cfg.feature_losses)
  adaptive = {name: v for name, v in cfg.specs().items()
              if isinstance(v, schedules.AccuracyRule) and cfg.distills}
  if any("." in name for name in adaptive):
    raise ValueError(f"'from_accuracy' is for the temperature only, got {sorted(adaptive)}")
  phases = cfg.phases if isinstance(cfg.phases, schedules.Phases) else None
  scheduled = [name for name, v in cfg.specs().items()
               if (callable(v) or name in adaptive) and (name != "kd_alpha" or cfg.distills)]
  if not isinstance(cfg.warmup, int) or cfg.warmup > 0:
    scheduled = [n for n in scheduled if n != "warmup"] + ["warmup"]
  head_losses = cfg.head_losses
  if head_losses:
    from jaxkd.train import heads as heads_lib

  def step_fn(state: TrainState, batch: dict, teacher_variables: PyTree | None,
              hparams: dict | None) -> tuple[TrainState, dict]:
    step = state.step
    hp = dict(hparams or {})
    unknown = set(hp) - set(HPARAM_NAMES)
    if unknown:
      raise ValueError(f"unknown hparams {sorted(unknown)}; allowed: {HPARAM_NAMES}")

    def get(name):
      if name in hp:
        return jnp.asarray(hp[name], jnp.float32)
      if name == "warmup":
        return _value(warmup, step)
      value = getattr(cfg, name)
      if isinstance(value, schedules.AccuracyRule):
        return jnp.asarray(value.initial, jnp.float32)
      return _value(value, step)

    def on(term):
      """1 while `term` is active (staged distillation), None without phases."""
      return None if phases is None else phases.active(term, step)

    def gated(weight, term):
      gate = on(term)
      return weight if gate is None else weight * gate

    images = batch["image"]
    if images.dtype == jnp.uint8:  # augment.color_on_device: the host stopped before the jitter
      images = color.jitter_and_normalize(images, batch.get("color_jitter"))
    labels = batch["label"]
    weights = batch.get("weight")
    weights = (jnp.ones(labels.shape[:1], jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    # CE target: MixUp/CutMix soft labels when present, else 'label' (int or [B, C]).
    targets = batch["soft_label"].astype(jnp.float32) if "soft_label" in batch else labels
    if targets.ndim != 1 and cfg.kind == "dkd":
      raise ValueError("this batch has soft labels ('soft_label' or a [B, C] 'label'); "
                       + _DKD_MIXING)

    # Teacher outputs (no gradient), one entry per teacher. t_partner: the MixUp/CutMix
    # partner's stored logits.
    t_logits = t_partner = None
    t_feats = t_lambda = None
    if cfg.needs_teacher:
      if teachers:
        if teacher_variables is None:
          raise ValueError("teacher_model was given to make_train_step, so each call needs "
                           "teacher_variables")
        tvars = (tuple(teacher_variables) if len(teachers) > 1 else (teacher_variables,))
        if len(tvars) != len(teachers):
          raise ValueError(f"{len(teachers)} teacher models but {len(tvars)} teacher variables")
        t_logits = []
        for k, (tm, tv) in enumerate(zip(teachers, tvars)):
          z, f, _ = _apply_with_features(tm, tv, images, train=False,
                                         features=need_feats and k == 0)
          t_logits.append(jax.lax.stop_gradient(z.astype(jnp.float32)))
          if k == 0:
            t_feats = jax.lax.stop_gradient(f)
      elif "teacher_logits" in batch:
        t_logits = _split_teachers(batch["teacher_logits"], "teacher_logits")
        if "mix_teacher_logits" in batch:
          if "mix_lambda" not in batch:
            raise ValueError("the batch has 'mix_teacher_logits' but no 'mix_lambda': both "
                             "come from jaxkd.data.augment.mix_batch; pass them together")
          t_partner = _split_teachers(batch["mix_teacher_logits"], "mix_teacher_logits")
          t_lambda = batch["mix_lambda"].astype(jnp.float32)
      else:
        raise ValueError(f"loss kind {cfg.kind!r} needs teacher logits: put 'teacher_logits' "
                         "in the batch or pass teacher_model to make_train_step")

    hparam_values = {}
    if cfg.distills and (cfg.kd_alpha is not None or "kd_alpha" in hp):
      a = get("kd_alpha")
      ce_w, kd_w = 1.0 - a, a
      hparam_values["kd_alpha"] = a
    else:
      ce_w, kd_w = get("ce_weight"), get("kd_weight")
      hparam_values.update(ce_weight=ce_w, kd_weight=kd_w)
    temperature = get("temperature")
    warm = get("warmup")
    hparam_values.update(temperature=temperature, warmup=warm)
    dropout_rng = jax.random.fold_in(state.rng, step)

    # Teacher side of the distillation term (no dependence on params).
    zt = None
    if cfg.distills:
      targets_k = []
      for k, zk in enumerate(t_logits):
        zp = None if t_partner is None else t_partner[k]
        if cfg.standardize:
          zk = losses.logit_standardize(zk, eps=cfg.standardize_eps)
          zp = None if zp is None else losses.logit_standardize(zp, eps=cfg.standardize_eps)
        if cfg.perception:
          if zp is None:
            zk = losses.perception_reconstruct(zk, eps=cfg.perception_eps, weights=weights)
          else:
            # Statistics over the own rows only (partner rows weight 0), applied to both.
            both = losses.perception_reconstruct(
                jnp.concatenate([zk, zp]), eps=cfg.perception_eps,
                weights=jnp.concatenate([weights, jnp.zeros_like(weights)]))
            zk, zp = both[:zk.shape[0]], both[zk.shape[0]:]
        if zp is not None:
          zk = _mixed_teacher_logits(zk, zp, t_lambda, temperature)
        targets_k.append(zk)
      zt = (targets_k[0] if len(targets_k) == 1
            else _mean_teacher_logits(jnp.stack(targets_k, axis=1), temperature))
      zt = jax.lax.stop_gradient(zt)

    head_vars = state.heads

    def loss_fn(trainable):
      params, head_params = trainable
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      logits, feats, mutated = _apply_with_features(
          model, variables, images, train=True, features=need_feats,
          mutable=["batch_stats"], rngs={"dropout": dropout_rng})
      logits = logits.astype(jnp.float32)
      terms = {"ce": losses.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing,
                                          weights=weights)}
      total = gated(ce_w, "ce") * terms["ce"]
      if cfg.distills:
        zs = logits
        if cfg.standardize:
          zs = losses.logit_standardize(zs, eps=cfg.standardize_eps)
        if cfg.perception:
          zs = losses.perception_reconstruct(zs, eps=cfg.perception_eps, weights=weights)
        if cfg.kind == "dkd":  # int labels only (checked above)
          terms["dkd"] = losses.dkd_loss(zs, zt, labels, alpha=get("alpha"), beta=get("beta"),
                                         temperature=temperature, weights=weights)
          total = total + gated(kd_w * warm, "kd") * terms["dkd"]
        else:
          terms["kd"] = losses.kd_loss(zs, zt, temperature=temperature, weights=weights)
          total = total + gated(kd_w * warm, "kd") * terms["kd"]
      head_stats = {}
      for f in cfg.feature_losses:
        fs = feats[f.student_key]
        ft = t_feats[f.teacher_key or f.student_key]
        if f.kind == "at":
          value = losses.attention_transfer_loss(fs, ft, weights=weights)
        elif f.kind == "mmd":
          value = losses.mmd_loss(fs, ft, weights=weights)
        elif f.kind == "hint":
          value = losses.hint_loss(fs, ft, weights=weights)
        else:
          value, stats = heads_lib.head_loss(f, head_params, head_vars, fs, ft, weights=weights)
          if stats is not None:
            head_stats[f.name] = stats
        terms[f"feat_{f.name}"] = value
        total = total + gated(_value(f.weight, step), "lstm" if f.kind == "lstm"
                              else "features") * value
      return total, (terms, logits, mutated, head_stats)

    head_params = head_vars["params"] if head_losses else {}
    (total, (terms, logits, mutated, head_stats)), (grads, head_grads) = jax.value_and_grad(
        loss_fn, has_aux=True)((state.params, head_params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if phases is not None:
      params, opt_state = _skip_untouched(grads, params, opt_state, state.params, state.opt_state)
    new_heads = state.heads
    if head_losses:
      head_updates, head_opt = tx.update(head_grads, head_vars["opt_state"], head_params)
      new_head_params = optax.apply_updates(head_params, head_updates)
      if phases is not None:
        new_head_params, head_opt = _skip_untouched(head_grads, new_head_params, head_opt,
                                                    head_params, head_vars["opt_state"])
      new_heads = {**head_vars, "params": new_head_params, "opt_state": head_opt,
                   "batch_stats": {**head_vars.get("batch_stats", {}), **head_stats}}
    new_state = state.replace(step=step + 1, params=params,
                              batch_stats=mutated.get("batch_stats", state.batch_stats),
                              opt_state=opt_state, heads=new_heads)

    pred = jnp.argmax(logits, axis=-1)
    if targets.ndim == 1:
      correct = (pred == targets).astype(jnp.float32)
    else:  # expected top-1 hit against a label drawn from the soft label
      correct = jnp.take_along_axis(targets.astype(jnp.float32), pred[:, None], axis=-1)[:, 0]
    metrics = {"loss": total, **terms,
               "accuracy": losses.weighted_mean(correct, weights),
               "grad_norm": optax.tree.norm(grads),
               "num_examples": jnp.sum(weights)}
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(step), jnp.float32)
    if cfg.distills:
      metrics["temperature"] = temperature
      metrics["kd_weight_eff"] = kd_w * warm
    for name in scheduled:
      if name in hparam_values:
        metrics[name] = hparam_values[name]
      elif name in HPARAM_NAMES:
        metrics[name] = get(name)
      else:  # a feature term's weight
        f = next(f for f in cfg.feature_losses if name == f"feature_losses.{f.name}.weight")
        metrics[name] = _value(f.weight, step)
    if phases is not None:
      metrics["phase"] = phases.index(step)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(step_fn,
                   in_shardings=(replicated, batch_sharding(mesh), replicated, replicated),
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())

  def train_step(state: TrainState, batch: Mapping[str, Any],
                 teacher_variables: PyTree | None = None,
                 hparams: Mapping[str, Any] | None = None) -> tuple[TrainState, dict]:
    if head_losses and not state.heads:
      raise ValueError(f"the loss has feature terms with trained modules "
                       f"{[f.name for f in head_losses]}, but the state has no heads: add them "
                       "with jaxkd.train.heads.add_heads(state, ...) before training")
    arrays = {k: batch[k] for k in TRAIN_BATCH_KEYS if k in batch}
    hp = None if not hparams else {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
    return jitted(state, arrays, teacher_variables, hp)

  train_step.jitted = jitted  # for .lower(...) / cost analysis
  train_step.loss_config = cfg
  # Hyper-parameters set by the loop after each validation: name -> schedules.AccuracyRule.
  train_step.adaptive = adaptive
  train_step.current_value_keys = tuple(
      dict.fromkeys((["temperature", "kd_weight_eff"] if cfg.distills else []) + scheduled
                    + (["phase"] if phases is not None else [])))
  return train_step


def make_eval_step(model: nn.Module, mesh: Mesh) -> Callable[..., dict[str, jax.Array]]:
  """Builds `eval_step(state_or_variables, batch) -> per-example outputs` (eval mode).

  BatchNorm uses its running statistics.

  `state_or_variables`: a TrainState, or a variables dict ({'params', 'batch_stats'}),
  e.g. a teacher's. `batch`: 'image', 'label' int32 [B], optional 'weight'.
  Returns per-example arrays, sharded along 'data' like the batch (np.asarray
  gathers them), with padding rows zeroed in the counts:

    correct1, correct5: float32 [B], 1 if the label is the arg-max / in the top
      5 (top-min(5, C)) and weight > 0, else 0;
    ce: float32 [B], per-example cross-entropy (0 for padding);
    logits: float32 [B, C] (e.g. to store as teacher logits);
    label: int32 [B]; weight: float32 [B].

  Top-1 = sum(correct1) / sum(weight > 0); per-class accuracy and the confusion
  matrix come from argmax(logits), label and weight.
  """
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")

  def eval_fn(variables: PyTree, batch: dict) -> dict:
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    weights = batch.get("weight")
    weights = (jnp.ones(labels.shape[:1], jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    real = (weights > 0).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return {"correct1": _topk_correct(logits, labels, 1).astype(jnp.float32) * real,
            "correct5": _topk_correct(logits, labels, 5).astype(jnp.float32) * real,
            "ce": jnp.where(real > 0, ce, 0.0),
            "logits": logits, "label": labels.astype(jnp.int32), "weight": weights}

  replicated = NamedSharding(mesh, P())
  sharded = batch_sharding(mesh)
  jitted = jax.jit(eval_fn, in_shardings=(replicated, sharded), out_shardings=sharded)

  def eval_step(state_or_variables: Any, batch: Mapping[str, Any]) -> dict:
    variables = (state_or_variables.variables() if isinstance(state_or_variables, TrainState)
                 else state_or_variables)
    arrays = {k: batch[k] for k in ("image", "label", "weight") if k in batch}
    return jitted(variables, arrays)

  eval_step.jitted = jitted
  return eval_step


def make_logits_fn(model: nn.Module, mesh: Mesh) -> Callable[[PyTree, Any], jax.Array]:
  """Builds `logits_fn(variables, images) -> float32 logits [B, C]` (eval mode, no labels).

  `variables`: the model's variables dict (or a TrainState), replicated on `mesh`
  (`jaxkd.train.state.replicate`; anything else is copied there on every call).
  `images`: host numpy [B, H, W, 3] (this process's rows; they are put on the
  mesh, split along 'data', as `jax.make_array_from_process_local_data` does),
  or a jax.Array already sharded that way. A single process pads B up to a
  multiple of the mesh's 'data' size with zero images and drops their rows
  from the result; with several processes the global batch must divide.
  The logits come back as a jax.Array split along 'data' (with one process
  `np.asarray` gathers them; with several, `jaxkd.distributed.gather_rows`); e.g.
  the teacher's logits for the teacher-logit store.
  """
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
  replicated = NamedSharding(mesh, P())
  sharded = batch_sharding(mesh)
  num_shards = mesh.shape["data"]

  def logits_of(variables: PyTree, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False).astype(jnp.float32)

  jitted = jax.jit(logits_of, in_shardings=(replicated, sharded), out_shardings=sharded)

  def logits_fn(variables: PyTree, images: Any) -> jax.Array:
    if isinstance(variables, TrainState):
      variables = variables.variables()
    if isinstance(images, jax.Array) and images.sharding.is_equivalent_to(sharded, images.ndim):
      return jitted(variables, images)
    images = np.asarray(images)
    rows = images.shape[0]
    pad = (-rows * jax.process_count()) % num_shards
    if pad and jax.process_count() > 1:
      raise ValueError(f"{rows * jax.process_count()} images in total over "
                       f"{jax.process_count()} processes do not divide over the {num_shards} "
                       "devices of mesh axis 'data'; pad the batch")
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    logits = jitted(variables, jax.make_array_from_process_local_data(sharded, images))
    return logits[:rows] if pad else logits

  logits_fn.jitted = jitted
  return logits_fn
