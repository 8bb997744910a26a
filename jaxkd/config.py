"""The experiment config: every key once, with its default, type, unit and meaning.

An experiment config is an ``ml_collections.ConfigDict`` (``configs/*.py``:
``get_config()`` edits a copy of `base_config()`). This module is its single
definition: each key is declared once below (`Key`: default, type, unit, one-line
meaning, allowed choices / range, whether it can change a run's numbers), and
everything else is derived from that table:

    base_config()            the defaults, as a ConfigDict
    optimizer(name, **kw)    an optimizer group (``<stage>.optimizer``)
    loss(kind, **kw)         a loss group (``<stage>.loss``)
    validate(config, num_devices=...)   every check that needs no compute (ConfigError)
    describe(config)         the effective config, one ``key = value  # [unit] meaning`` per line
    changes_result(path)     False for keys that cannot change a number of the report
    model_kwargs(stage)      the options set in ``<stage>.model_kwargs`` (None = model default)

Model options (``<stage>.model_kwargs.*``) are all present as ``None``
placeholders, so ``--config.student.model_kwargs.width_mult=0.75`` works from the
command line; ``None`` means "the model's default" and is never passed to
``jaxkd.models.create``. An option the chosen model does not take is refused by
`validate`, naming the key and the model.

Config files load their siblings by path (`sibling`), not as a Python package, so
a config file works from any directory and when jaxkd is installed.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import pathlib
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

__all__ = [
    "ConfigError", "Key", "SCHEMA", "base_config", "group", "optimizer", "loss", "stage",
    "fill_defaults", "flatten",
    "validate", "check_values", "describe", "changes_result", "default", "lookup", "is_known",
    "is_free_form", "suggest", "unknown_key_message", "model_kwargs", "model_options",
    "compute_dtype", "load_config_file", "sibling", "ROLES", "export_entries",
]


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what to do."""


# ----------------------------------------------------------------------------- the key table

_PY_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}
_ARTICLE = {"int": "an int", "float": "a number", "bool": "a bool (True/False)", "str": "a string",
            "tuple": "a tuple", "dict": "a mapping"}


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  path: dotted path below the config root ('student.epochs').
  type: 'int' | 'float' (ints accepted) | 'bool' | 'str' | 'tuple' | 'dict'.
  default: the value of `base_config()`.
  meaning: one line.
  unit: 'epochs', 'steps', 'px', 'images', ... or '' (none).
  choices: allowed values (for tuples: of each item).
  bounds: a range such as '> 0', '>= 0', '(0, 1)', '[0, 1)' (for tuples: of each item).
  optional: None is allowed (its meaning is in `meaning`).
  schedule: a schedule spec string ('linear(10,1)', 'progressive', 'warmup(20ep)', ...;
    `jaxkd.schedules.parse`) or a callable `step -> value` is allowed too (loss
    hyper-parameters).
  item, length: a tuple's item type and length (None: any).
  result: whether the key can change a number of the report (False: parallelism, logging,
    checkpoint cadence, locations, presentation).
  strict: False when `choices` lists the known values only (models: `validate` asks the
    registry, so a model registered by the user's own code is accepted).
  """
  path: str
  type: str
  default: Any
  meaning: str
  unit: str = ""
  choices: tuple = ()
  bounds: str = ""
  optional: bool = False
  schedule: bool = False
  item: str | None = None
  length: int | None = None
  result: bool = True
  strict: bool = True

  @property
  def name(self) -> str:
    return self.path.rsplit(".", 1)[-1]

  @property
  def expects(self) -> str:
    """'an int [epochs]', 'a number', 'a tuple' ... (for messages)."""
    return _ARTICLE.get(self.type, self.type) + (f" [{self.unit}]" if self.unit else "")


def _k(name, type_, default, meaning, unit="", **kw) -> Key:
  return Key(name, type_, default, meaning, unit, **kw)


# Documentation copies of lists that live elsewhere; tests/test_config.py checks they agree, and
# `validate` asks the authoritative module (jaxkd.models.names(), jaxkd.data.SOURCE_NAMES).
DATASETS = ("food101", "food101_local", "cifar10", "cifar100", "imagenet2012", "image_folder")
MODELS = ("mobilenet_v3_large", "mobilenet_v3_large_eca", "mobilenet_v3_small", "mobilenetv2",
          "resnet101", "resnet110", "resnet14", "resnet18", "resnet20", "resnet32", "resnet32x4",
          "resnet34", "resnet44", "resnet50", "resnet56", "resnet8", "resnet8x4", "shufflenetv1",
          "shufflenetv2", "vgg13", "vgg8", "wrn_16_2", "wrn_40_1", "wrn_40_2")
ATTENTION_KINDS = ("se", "eca", "cbam", "simam", "none")
ROLES = ("teacher", "student")
_MOBILENETS = "mobilenet_v3_large/_small/_large_eca"

_TOP = [
    _k("name", "str", "jaxkd experiment", "title of the report", result=False),
    _k("seed", "int", 0, "seed of parameter initialisation, data order and augmentation"),
    _k("dtype", "str", "auto",
       "compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); parameters stay float32",
       choices=("auto", "float32", "bfloat16")),
]

_DATA = [
    _k("name", "str", "food101", "dataset (TFDS name, or a local folder source)", choices=DATASETS),
    _k("data_dir", "str", None,
       "TFDS data folder (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
       optional=True, result=False),
    _k("manual_dir", "str", None,
       "folder of downloaded/extracted data (food101_local, image_folder, TFDS manual_dir)",
       optional=True, result=False),  # the run compares the data it holds, not the path
    _k("val_fraction", "float", 0.2, "fraction of the official training images held out as val",
       bounds="(0, 1)"),
    _k("split_seed", "int", 0, "seed of the train/val split"),
    _k("download", "bool", True, "let TFDS download the dataset when it is absent", result=False),
    _k("version", "str", None, "TFDS dataset version (None: the newest installed)", optional=True),
    _k("num_parallel_calls", "int", None, "tf.data decode/augment threads (None: autotune)",
       optional=True, bounds="> 0", result=False),
    # Either every image decodes (False: refuses to build) or the bad ones are left out, so a
    # rerun that flips it sees the same images or stops with an error: no number can change.
    _k("skip_bad_images", "bool", False,
       "leave out images that fail to decode instead of refusing to build the dataset",
       result=False),
]

_AUGMENT = [
    _k("image_size", "int", 224, "side of the square model input", "px", bounds="> 0"),
    _k("train_crop", "str", "random_resized_crop",
       "training crop (resize_random_crop: resize the longest side, random crop; "
       "pad_random_crop: CIFAR pad + crop)",
       choices=("random_resized_crop", "resize_random_crop", "pad_random_crop")),
    _k("rrc_scale", "tuple", (0.08, 1.0), "area fraction range of random_resized_crop",
       item="float", length=2, bounds="(0, 1]"),
    _k("rrc_ratio", "tuple", (3 / 4, 4 / 3), "aspect-ratio (w/h) range of random_resized_crop",
       item="float", length=2, bounds="> 0"),
    _k("resize_longest", "int", 512, "longest side before resize_random_crop's crop (0: none)",
       "px", bounds=">= 0"),
    _k("crop_padding", "int", 4, "zero padding of pad_random_crop on every side", "px",
       bounds=">= 0"),
    _k("flip", "bool", True, "random horizontal flip"),
    _k("color_jitter", "tuple", (0.0, 0.0, 0.0, 0.0),
       "(brightness, contrast, saturation, hue) strengths as torchvision ColorJitter; 0 = off",
       item="float", length=4, bounds=">= 0"),
    _k("randaugment_num_ops", "int", 0, "RandAugment N (0: off)", "ops", bounds=">= 0"),
    _k("randaugment_magnitude", "float", 9.0, "RandAugment M", bounds="[0, 10]"),
    _k("autoaugment", "str", None, "AutoAugment policy (None: off)", optional=True,
       choices=("imagenet",)),
    _k("random_erasing", "float", 0.0, "probability of Random Erasing (0: off)", bounds="[0, 1]"),
    _k("random_erasing_mode", "str", "pixel", "Random Erasing fill: N(0, 1) noise or zeros",
       choices=("pixel", "zero")),
    _k("mixup_alpha", "float", 0.0, "MixUp Beta(a, a) concentration (0: off)", bounds=">= 0"),
    _k("mixup_lambda_range", "tuple", None,
       "(lo, hi): MixUp lambda ~ U(lo, hi) instead of Beta (None: off)",
       optional=True, item="float", length=2, bounds="[0, 1]"),
    _k("cutmix_alpha", "float", 0.0, "CutMix Beta(a, a) concentration (0: off)", bounds=">= 0"),
    _k("mix_prob", "float", 1.0, "probability that a batch is mixed at all", bounds="[0, 1]"),
    _k("mix_switch_prob", "float", 0.5, "probability of CutMix rather than MixUp when both are on",
       bounds="[0, 1]"),
    _k("eval_crop_fraction", "float", 0.875, "evaluation centre-crop fraction (0.875: 256 -> 224)",
       bounds="(0, 1]"),
    _k("antialias", "bool", True, "antialiased resizing"),
    _k("dtype", "str", "float32", "dtype of the images fed to the model",
       choices=("float32", "bfloat16")),
    _k("color_on_device", "bool", False,
       "hand the train step uint8 crops and run the colour jitter and the normalisation there "
       "(less host CPU per image; not with RandAugment, AutoAugment, Random Erasing, MixUp or "
       "CutMix)"),
]

_OPTIMIZER = [
    _k("optimizer", "str", "adam",
       "update rule as PyTorch's (adam/sgd: L2 added to the gradient; adamw: decoupled)",
       choices=("sgd", "adam", "adamw")),
    _k("learning_rate", "float", 1e-3, "base learning rate (one_cycle: the peak)", bounds="> 0"),
    _k("weight_decay", "float", 1e-4, "weight decay", bounds=">= 0"),
    _k("decay_1d_params", "bool", True,
       "decay biases and BatchNorm scale/bias too (PyTorch's default)"),
    _k("momentum", "float", 0.9, "SGD momentum", bounds="[0, 1)"),
    _k("nesterov", "bool", False, "SGD Nesterov momentum"),
    _k("b1", "float", 0.9, "Adam beta1", bounds="[0, 1)"),
    _k("b2", "float", 0.999, "Adam beta2", bounds="[0, 1)"),
    _k("eps", "float", 1e-8, "Adam epsilon (outside the square root, as PyTorch)", bounds="> 0"),
    _k("grad_clip_norm", "float", None,
       "clip the gradient's global L2 norm to this (None: no clipping)",
       optional=True, bounds="> 0"),
    _k("schedule", "str", "one_cycle", "learning-rate schedule",
       choices=("constant", "one_cycle", "multistep", "cosine")),
    _k("pct_start", "float", 0.3, "one_cycle: fraction of the steps spent rising",
       bounds="(0, 1)"),
    _k("div_factor", "float", 25.0, "one_cycle: initial rate = learning_rate / div_factor",
       bounds="> 0"),
    _k("final_div_factor", "float", 1e4,
       "one_cycle: final rate = initial rate / final_div_factor", bounds="> 0"),
    _k("anneal", "str", "cos", "one_cycle annealing shape", choices=("cos", "linear")),
    _k("three_phase", "bool", False,
       "one_cycle: three phases (up, down to initial, down to final)"),
    _k("cycle_momentum", "bool", True,
       "one_cycle: cycle SGD momentum / Adam beta1 inversely to the rate"),
    _k("base_momentum", "float", 0.85, "one_cycle: momentum at the peak rate", bounds="[0, 1)"),
    _k("max_momentum", "float", 0.95, "one_cycle: momentum at the lowest rates", bounds="[0, 1)"),
    _k("milestones", "tuple", (),
       "multistep: epochs after which the rate is multiplied by lr_decay", "epochs",
       item="int", bounds=">= 0"),
    _k("milestone_steps", "tuple", None,
       "multistep: the same in optimizer steps (None: use milestones)", "steps",
       optional=True, item="int", bounds=">= 0"),
    _k("lr_decay", "float", 0.1, "multistep: factor applied at each milestone", bounds="> 0"),
    _k("warmup_steps", "int", 0, "cosine: linear warm-up length", "steps", bounds=">= 0"),
]

_LOSS = [
    _k("kind", "str", "ce", "training loss: cross-entropy only, or CE + a distillation term",
       choices=("ce", "kd", "dkd", "lskd")),
    _k("label_smoothing", "float", 0.0, "label smoothing of the CE term", bounds="[0, 1)"),
    _k("ce_weight", "float", 1.0, "weight of the CE term", schedule=True),
    _k("kd_weight", "float", 1.0, "weight of the distillation term", schedule=True),
    _k("kd_alpha", "float", None,
       "a: sets ce_weight = 1 - a and kd_weight = a (None: use the two weights)",
       optional=True, schedule=True),
    _k("temperature", "float", 4.0, "softmax temperature T of KD/DKD", bounds="> 0",
       schedule=True),
    _k("alpha", "float", 1.0, "DKD weight of the target-class term (TCKD)", schedule=True),
    _k("beta", "float", 8.0, "DKD weight of the non-target-class term (NCKD)", schedule=True),
    _k("warmup", "int", 0,
       "weight of the distillation term: an int is DKD's linear warm-up over that many steps "
       "(0: off)", "steps", bounds=">= 0", schedule=True),
    _k("warmup_epochs", "float", 0.0, "the same warm-up in epochs (replaces warmup when > 0)",
       "epochs", bounds=">= 0"),
    _k("perception", "bool", False, "perception reconstruction of both logits before distilling"),
    _k("perception_eps", "float", 1e-6, "epsilon of perception reconstruction", bounds="> 0"),
    _k("standardize", "bool", False,
       "logit standardisation before distilling (kind 'lskd' sets it)"),
    _k("standardize_eps", "float", 1e-7, "epsilon of logit standardisation", bounds="> 0"),
    _k("feature_losses", "tuple", (),
       "feature terms: dicts of kind ('at'/'hint'/'mmd'/'fitnet'/'lstm'), student_key, "
       "teacher_key, weight (a number or a schedule spec); 'lstm' also channels, hidden "
       "(need student.teacher='online')", item="any"),
    _k("phases", "tuple", (),
       "staged distillation: which terms (ce, kd, features, lstm, all) are active when, e.g. "
       "('features until 20ep', 'features+lstm until 50ep', 'all'); (): all terms throughout",
       item="str"),
]

# Every option a model factory in jaxkd.models takes; None = the model's own default. Which model
# takes which is asked of the factory itself (`model_options`).
_MODEL_OPTIONS = [
    _k("width_mult", "float", None, f"channel width multiplier ({_MOBILENETS}; None: 1.0)",
       optional=True, bounds="> 0"),
    _k("dropout", "float", None, f"dropout before the classifier ({_MOBILENETS}; None: 0.2)",
       optional=True, bounds="[0, 1)"),
    _k("attention", "str", None,
       f"attention module inside the blocks ({_MOBILENETS}; None: 'se')",
       optional=True, choices=ATTENTION_KINDS),
    _k("stage_attention", "str", None,
       "attention module at the end of every stage (mobilenet_v3_large/_small; None: no module)",
       optional=True, choices=ATTENTION_KINDS),
    _k("bn_momentum", "float", None,
       f"BatchNorm running-average decay, Flax convention ({_MOBILENETS}; None: 0.99, "
       "PyTorch's 0.01)", optional=True, bounds="[0, 1)"),
    _k("groups", "int", None, "groups of the grouped 1x1 convolutions (shufflenetv1; None: 3)",
       optional=True, bounds="> 0"),
    _k("out_planes", "tuple", None, "stage widths (shufflenetv1; None: (240, 480, 960))",
       optional=True, item="int", length=3, bounds="> 0"),
    _k("out_channels", "tuple", None,
       "three stage widths + head width (shufflenetv2; None: (116, 232, 464, 1024))",
       optional=True, item="int", length=4, bounds="> 0"),
    _k("num_blocks", "tuple", None,
       "units per stage (shufflenetv1/v2; None: (4, 8, 4) / (3, 7, 3))",
       optional=True, item="int", length=3, bounds="> 0"),
]

_STAGE = [
    _k("enabled", "bool", True, "run this stage"),
    _k("model", "str", None, "model registered in jaxkd.models", choices=MODELS, strict=False),
    ("model_kwargs", _MODEL_OPTIONS),
    _k("pretrained", "str", None,
       "initial weights: PyTorch checkpoint (.safetensors/.pth), 'torchvision[:WEIGHTS]' or a "
       "finished workdir (None: random init)", optional=True),
    _k("epochs", "int", None, "passes over the train split", "epochs", bounds=">= 0"),
    _k("batch_size", "int", 32, "global batch, split over all devices", "images", bounds="> 0"),
    ("optimizer", _OPTIMIZER),
    ("loss", _LOSS),
    _k("log_every_steps", "int", 50, "metrics logging interval", "steps", bounds="> 0",
       result=False),
    _k("checkpoint_every_steps", "int", 500, "checkpoint interval (also at every epoch end)",
       "steps", bounds="> 0", result=False),
    _k("keep_checkpoints", "int", 2, "latest checkpoints kept (plus the best by val top-1)",
       bounds="> 0", result=False),
    _k("max_steps", "int", None,
       "stop after this many optimizer steps (None: all epochs; for smoke runs)", "steps",
       optional=True, bounds="> 0"),
    _k("eval_every_epochs", "int", 1,
       "validation interval during training (the curves in the report)", "epochs",
       bounds="> 0"),
    _k("handoff", "str", "last",
       "the variables the stage hands on (next stage, evaluation, report): the last step's, or "
       "those of the checkpoint with the best val top-1", choices=("last", "best")),
]
_STAGE_DEFAULTS = {"teacher": {"model": "resnet50", "epochs": 3},
                   "student": {"model": "mobilenet_v3_large", "epochs": 20}}
_STUDENT_ONLY = [
    _k("teacher", "str", "stored",
       "the teacher's logits: precomputed store, teacher run on the same augmented batch, or "
       "none (CE only)", choices=("stored", "online", "none")),
    _k("extra_teachers", "tuple", (),
       "more teachers beside config.teacher: finished jaxkd workdirs (their teacher; "
       "'WORKDIR:student' for their student); the student distils from the mean of all the "
       "teachers' probabilities", item="str"),
]

_TEACHER_LOGITS = [
    _k("mode", "str", "image",
       "what the store holds: one row per image on the eval view ('image'), or one per stored "
       "crop region, replayed for the student with the same crop and flip ('regions')",
       choices=("image", "regions")),
    _k("regions_per_image", "int", 10,
       "regions stored per training image with mode='regions' (random-resized crops and flips "
       "of the training augmentation, drawn per image)", bounds="> 0"),
    _k("dtype", "str", "float16", "dtype of the stored teacher logits",
       choices=("float16", "float32")),
    _k("batch_size", "int", 64, "batch of the precompute pass", "images", bounds="> 0",
       result=False),
    _k("store_dir", "str", None,
       "folder of the teacher-logit stores (None: beside the data, "
       "<data_dir>/<dataset>/<version>/teacher_logits)", optional=True, result=False),
]

_EVALUATE = [
    _k("splits", "tuple", ("val", "test"), "splits evaluated and reported", item="str",
       choices=("train", "val", "test")),
    _k("batch_size", "int", 64, "evaluation batch (also for validation during training)",
       "images", bounds="> 0", result=False),
]

# Deployable files of the finished model (jaxkd.export); they change no number of the training.
EXPORT_FORMATS = ("tflite", "onnx")
EXPORT_QUANTIZATIONS = ("none", "float16", "int8")
_EXPORT_ENTRIES = tuple(f for f in EXPORT_FORMATS) + tuple(
    f"{f}:{q}" for f in EXPORT_FORMATS for q in EXPORT_QUANTIZATIONS)

_EXPORT = [
    _k("formats", "tuple", (),
       "files the export stage writes into <workdir>/export/, 'FORMAT' or 'FORMAT:QUANTIZE' "
       "('tflite' = 'tflite:none', float32); () = no export stage", item="str",
       choices=_EXPORT_ENTRIES, result=False),
    _k("role", "str", "student", "the model exported", choices=ROLES, result=False),
    _k("latency_runs", "int", 50, "batch-1 CPU runs timed for each latency median (0: none)",
       bounds=">= 0", result=False),
    _k("num_representative", "int", 200, "int8 calibration images (from the train split)",
       "images", bounds="> 0", result=False),
    _k("max_verify_images", "int", None,
       "val images the exported file is verified on (None: all of val)", "images",
       optional=True, bounds="> 0", result=False),
]

_REPORT = [
    _k("reference", "dict", {},
       "published numbers shown beside the results (free-form: name -> text)", result=False),
]


def _build() -> dict[str, Key]:
  table: dict[str, Key] = {}

  def add(prefix: str, entries: Iterable, defaults: Mapping[str, Any] = {}) -> None:
    for e in entries:
      if isinstance(e, tuple):
        name, sub = e
        add(f"{prefix}{name}.", sub)
      else:
        path = prefix + e.path
        key = dataclasses.replace(e, path=path)
        if e.path in defaults:
          key = dataclasses.replace(key, default=defaults[e.path])
        table[path] = key

  add("", _TOP)
  add("data.", _DATA)
  add("augment.", _AUGMENT)
  for role in ROLES:
    add(f"{role}.", _STAGE + (_STUDENT_ONLY if role == "student" else []), _STAGE_DEFAULTS[role])
  add("teacher_logits.", _TEACHER_LOGITS)
  add("evaluate.", _EVALUATE)
  add("export.", _EXPORT)
  add("report.", _REPORT)
  # Order of base_config(): the stages' teacher_logits sits between teacher and student.
  order = ["name", "seed", "dtype", "data.", "augment.", "teacher.", "teacher_logits.", "student.",
           "evaluate.", "export.", "report."]
  def rank(path: str) -> int:
    return next(i for i, o in enumerate(order)
                if path == o or (o.endswith(".") and path.startswith(o)))

  return dict(sorted(table.items(), key=lambda kv: rank(kv[0])))


SCHEMA: dict[str, Key] = _build()
_GROUPS = frozenset(p.rsplit(".", i)[0] for p in SCHEMA for i in range(1, p.count(".") + 1))
_FREE_FORM = ("report.reference",)  # mappings whose own keys are the user's


def _strip(path: str) -> str:
  return path[len("config."):] if path.startswith("config.") else path


def lookup(path: str) -> Key | None:
  """The Key at `path` ('student.epochs' or 'config.student.epochs'), or None for groups/unknown."""
  return SCHEMA.get(_strip(path))


def is_known(path: str) -> bool:
  """Whether `path` is a key or a group of the schema (or inside a free-form mapping)."""
  path = _strip(path)
  return path in SCHEMA or path in _GROUPS or is_free_form(path)


def is_free_form(path: str) -> bool:
  """Whether `path` is an entry of a free-form mapping (report.reference.NAME)."""
  return any(_strip(path).startswith(f + ".") for f in _FREE_FORM)


def default(path: str) -> Any:
  """The schema default of a key (KeyError for groups and unknown paths)."""
  key = lookup(path)
  if key is None:
    raise KeyError(unknown_key_message(path))
  return key.default


def suggest(path: str) -> str | None:
  """The known key closest to a misspelled `path`, or None."""
  path = _strip(path)
  candidates = sorted(set(SCHEMA) | _GROUPS)
  parent, _, leaf = path.rpartition(".")
  # Same group first (student.epochz -> student.epochs), then anywhere, then the same last name.
  siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
  initials = [c for c in siblings if "".join(w[0] for w in c.rpartition(".")[2].split("_")) == leaf]
  if len(leaf) > 1 and len(initials) == 1:  # lr -> learning_rate, bs -> batch_size
    return initials[0]
  for pool, cutoff in ((siblings, 0.6), (candidates, 0.75)):
    best = difflib.get_close_matches(path, pool, n=1, cutoff=cutoff)
    if best:
      return best[0]
  leaves = [c for c in candidates if c.rpartition(".")[2] == leaf]
  return leaves[0] if len(leaves) == 1 else None


def unknown_key_message(path: str) -> str:
  """'unknown key student.epochz (did you mean student.epochs?)'."""
  path = _strip(path)
  hint = suggest(path)
  more = f"did you mean {hint}?" if hint else "--print_config lists every key"
  return f"unknown key {path} ({more})"


def changes_result(path: str) -> bool:
  """Whether a different value of `path` can change a number of the report.

  False for parallelism, logging, checkpoint cadence, locations and presentation
  keys (a rerun of the same workdir may change them); True otherwise, for groups
  holding any such key, and for unknown paths.
  """
  path = _strip(path)
  if path in SCHEMA:
    return SCHEMA[path].result
  if any(path == f or path.startswith(f + ".") for f in _FREE_FORM):
    return False
  if path in _GROUPS:
    return any(k.result for p, k in SCHEMA.items() if p.startswith(path + "."))
  return True


# ----------------------------------------------------------------------------- building configs


def _field(key: Key) -> Any:
  value = key.default
  if key.schedule:  # a number or a schedule spec string: a field of any type
    return ml_collections.FieldReference(value, field_type=object)
  if value is None:
    return placeholder(_PY_TYPES.get(key.type, object))
  if key.type == "dict":
    return ml_collections.ConfigDict(dict(value))
  return value


def _group(prefix: str, overrides: Mapping[str, Any] = {},
           where: str = "") -> ml_collections.ConfigDict:
  """The ConfigDict of the keys below `prefix` (e.g. 'student.optimizer.'), with `overrides`."""
  root = ml_collections.ConfigDict()
  for path, key in SCHEMA.items():
    if not path.startswith(prefix):
      continue
    node = root
    parts = path[len(prefix):].split(".")
    for part in parts[:-1]:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[parts[-1]] = _field(key)
  for name, value in overrides.items():
    if name not in root:  # named as the caller knows the group ('loss.temprature')
      raise ConfigError(unknown_key_message(prefix + name).replace(prefix, where or prefix))
    root[name] = value
  return root


def group(path: str, **overrides) -> ml_collections.ConfigDict:
  """The keys below group `path` (e.g. 'student.model_kwargs') at their defaults, with overrides."""
  path = _strip(path)
  if path not in _GROUPS:
    raise ConfigError(unknown_key_message(path))
  return _group(path + ".", overrides)


def optimizer(name: str = "adam", **overrides) -> ml_collections.ConfigDict:
  """An optimizer + learning-rate schedule group (jaxkd.train.optim.build_optimizer's fields)."""
  return _group("student.optimizer.", dict(optimizer=name, **overrides), "optimizer.")


def loss(kind: str = "ce", **overrides) -> ml_collections.ConfigDict:
  """A loss group (jaxkd.train.step.LossConfig's fields; `warmup_epochs` becomes `warmup` steps)."""
  return _group("student.loss.", dict(kind=kind, **overrides), "loss.")


def stage(role: str, **overrides) -> ml_collections.ConfigDict:
  """The defaults of stage `role` ('teacher' or 'student'), with `overrides`."""
  if role not in ROLES:
    raise ConfigError(f"stage role {role!r}: use one of {ROLES}")
  return _group(f"{role}.", overrides, f"{role}.")


def base_config() -> ml_collections.ConfigDict:
  """Every key at its default; configs/<name>.py edit a copy."""
  return _group("")


def fill_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds (in place) every schema key `config` lacks, at its default; returns `config`.

  A config written before a key existed, or one that replaced a group by a plain dict
  (``c.student.model_kwargs = {'attention': 'eca'}``), gets the missing keys (the
  other model options as None placeholders) so that command-line overrides reach them.
  """
  with config.ignore_type(), config.unlocked():
    for path, key in SCHEMA.items():
      node = config
      parts = path.split(".")
      for part in parts[:-1]:
        if part not in node or node[part] is None:
          node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
          break
      else:
        if parts[-1] not in node:
          node[parts[-1]] = _field(key)
  return config


# ----------------------------------------------------------------------------- loading config files

_MODULES: dict[str, Any] = {}


def _load_module(path: pathlib.Path):
  resolved = str(path.resolve())
  if resolved in _MODULES:
    return _MODULES[resolved]
  name = "jaxkd_config_" + "".join(c if c.isalnum() else "_" for c in resolved)
  spec = importlib.util.spec_from_file_location(name, resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _MODULES[resolved] = module
  return module


def sibling(file: str, name: str):
  """The config module `name` from the folder of `file`: ``sibling(__file__, 'food101_eca')``.

  Config files use this instead of ``from configs import ...`` so they work from any
  directory, when run through the ``jaxkd`` console script, and when jaxkd is installed.
  """
  path = pathlib.Path(file).resolve().parent / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"config module {name!r} not found: {path} does not exist")
  return _load_module(path)


def _where_in(tb, files: set[str]) -> str:
  frames = [f for f in traceback.extract_tb(tb) if str(pathlib.Path(f.filename).resolve()) in files]
  return f" (line {frames[-1].lineno} of {frames[-1].filename})" if frames else ""


def _one_line(e: BaseException) -> str:
  """'AttributeError: ...' in one line (ConfigDict wraps a KeyError with a did-you-mean)."""
  name = type(e).__name__
  while isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(e.args[0],
                                                                        BaseException):
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
  return f"{name}: {' '.join(text.split())}"


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, the path relative to the current directory.

  `spec` is 'path/to/config.py' or 'path/to/config.py:ARG' (ARG goes to get_config, as
  ml_collections' config_flags does). The result has every schema key (`fill_defaults`).
  Raises ConfigError with one line for a missing file, a syntax error, a file without
  get_config(), or an exception inside it (naming the file and line).
  """
  file, _, arg = spec.partition(":")
  path = pathlib.Path(os.path.expanduser(file))
  if not file:
    raise ConfigError("the config path is empty; give e.g. --config=configs/food101_mini.py")
  if not path.is_file():
    raise ConfigError(f"config file {file} not found (looked at {path.resolve()}); give a path "
                      f"relative to the current directory {os.getcwd()}, e.g. "
                      "--config=configs/food101_mini.py")
  try:
    module = _load_module(path)
  except SyntaxError as e:
    raise ConfigError(f"config file {file} line {e.lineno}: syntax error: {e.msg}") from None
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001  (any error of the user's file, reported in one line)
    files = {str(p.resolve()) for p in path.parent.glob("*.py")}
    raise ConfigError(f"config file {file} failed to load{_where_in(e.__traceback__, files)}: "
                      f"{_one_line(e)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {file} has no get_config() function; see "
                      "configs/food101_mini.py")
  try:
    config = get_config(arg) if arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001
    files = {str(p.resolve()) for p in path.parent.glob("*.py")}
    where = _where_in(e.__traceback__, files)
    raise ConfigError(f"config file {file}: get_config() failed{where}: {_one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {file}: get_config() returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from jaxkd.config.base_config()")
  return fill_defaults(config)


# ----------------------------------------------------------------------------- values


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  """{path: value} of every leaf; free-form mappings (report.reference) stay one value."""
  out = {}
  for name in config.keys():
    value = config[name]
    path = f"{prefix}{name}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and path not in SCHEMA:
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def model_kwargs(stage_config: Any) -> dict:
  """The model options set in ``<stage>.model_kwargs`` (None entries, "model default", dropped)."""
  kwargs = stage_config.get("model_kwargs", None) if stage_config is not None else None
  return {k: v for k, v in dict(kwargs or {}).items() if v is not None}


@functools.cache
def model_options(model: str) -> tuple[str, ...]:
  """The model_kwargs options `jaxkd.models.create(model, ...)` takes (asked of its factory)."""
  from jaxkd import models
  base = models.create(model, num_classes=2)
  accepted = []
  for key in _MODEL_OPTIONS:
    if not hasattr(base, key.path):
      continue
    try:  # the module's own value: a factory that fixes the field refuses it (TypeError)
      models.create(model, num_classes=2, **{key.path: getattr(base, key.path)})
    except TypeError:
      continue
    accepted.append(key.path)
  return tuple(accepted)


def _type_ok(kind: str, value: Any) -> bool:
  if kind == "int":
    return isinstance(value, int) and not isinstance(value, bool)
  if kind == "float":
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind == "bool":
    return isinstance(value, bool)
  if kind == "str":
    return isinstance(value, str)
  if kind == "tuple":
    return isinstance(value, (tuple, list))
  if kind == "dict":
    return isinstance(value, (Mapping, ml_collections.ConfigDict))
  return True


def _in_bounds(bounds: str, x: float) -> bool:
  if bounds.startswith(">="):
    return x >= float(bounds[2:])
  if bounds.startswith(">"):
    return x > float(bounds[1:])
  lo, hi = (float(s) for s in bounds[1:-1].split(","))
  above = (lo <= x) if bounds[0] == "[" else (lo < x)
  return above and ((x <= hi) if bounds[-1] == "]" else (x < hi))


def _bounds_text(bounds: str) -> str:
  return f"must be {bounds}" if bounds[0] in "<>" else f"must be in {bounds}"


def _check_value(key: Key, value: Any) -> None:
  where = f"config.{key.path}={value!r}"
  if value is None:
    if not key.optional:
      raise ConfigError(f"config.{key.path} is None; it needs {_ARTICLE[key.type]} ({key.meaning})")
    return
  if key.schedule and callable(value):
    return
  if key.schedule and isinstance(value, str):
    _check_spec(key, value)
    return
  unit = f" [{key.unit}]" if key.unit else ""
  if not _type_ok(key.type, value):
    raise ConfigError(f"{where} must be {_ARTICLE[key.type]}{unit}: {key.meaning}")
  items = list(value) if key.type == "tuple" else [value]
  if key.type == "tuple":
    if key.length is not None and len(items) != key.length:
      raise ConfigError(f"{where} must have {key.length} items: {key.meaning}")
    if key.item and key.item != "any":
      for x in items:
        if not _type_ok(key.item, x):
          raise ConfigError(f"{where}: item {x!r} must be {_ARTICLE[key.item]}{unit}: "
                            f"{key.meaning}")
  if key.choices and key.strict:
    for x in items:
      if x not in key.choices:
        got = f"{where}" if key.type != "tuple" else f"{where}: {x!r}"
        raise ConfigError(f"{got}: use one of {', '.join(repr(c) for c in key.choices)}")
  if key.bounds:
    for x in items:
      if isinstance(x, (int, float)) and not isinstance(x, bool):
        if not math.isfinite(x) or not _in_bounds(key.bounds, x):
          raise ConfigError(f"{where} {_bounds_text(key.bounds)}" +
                            (f" (item {x!r})" if key.type == "tuple" else ""))


def _check_spec(key: Key, spec: str) -> None:
  """A schedule spec string: its syntax (jaxkd.schedules, the one parser), then the key's bounds
  at the values the schedule takes (its start, end and the values between: every spec is
  piecewise linear, so those bound it)."""
  from jaxkd import schedules
  where = f"config.{key.path}"
  total, per_epoch = 1000, 10  # any stage: the values a spec takes do not depend on its length
  try:
    schedule = schedules.parse(spec, key=where, total_steps=total, steps_per_epoch=per_epoch)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not key.bounds:
    return
  if isinstance(schedule, schedules.AccuracyRule):
    values = [(v, "after a validation") for v in schedule.values]
  elif callable(schedule):
    steps = (0, 1, total // 2, total, 10**9)
    values = [(float(schedule(s)), "at the start" if s == 0 else "at the end" if s >= total
               else "during the stage") for s in steps]
  else:
    values = [(float(schedule), "")]
  for v, when in values:
    if not _in_bounds(key.bounds, v):
      raise ConfigError(f"{where}={spec!r} takes the value {v:g}{' ' + when if when else ''}; "
                        f"{key.name} {_bounds_text(key.bounds)}")


def check_values(config: Any) -> None:
  """Unknown keys, types, choices and ranges from the schema; imports neither JAX nor TensorFlow.

  Raises ConfigError naming the key. `validate` runs this first.
  """
  flat = flatten(config)
  unknown = [p for p in flat if not is_known(p)]
  if unknown:
    raise ConfigError(", ".join(unknown_key_message(p) for p in unknown))
  for path, value in flat.items():
    key = SCHEMA.get(path)
    if key is None:
      if path in _GROUPS:
        raise ConfigError(f"config.{path}={value!r} must be a group of keys, e.g. config.{path}."
                          f"{next(p for p in SCHEMA if p.startswith(path + '.'))[len(path) + 1:]}")
      continue
    _check_value(key, value)


# ----------------------------------------------------------------------------- validate


def compute_dtype(config) -> Any:
  """config.dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'."""
  import jax
  import jax.numpy as jnp
  name = config.get("dtype", "auto")
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _finished_workdir(path: str) -> bool:
  """Whether `path` is a workdir with a finished teacher (jaxkd.workdir defines the layout)."""
  if not pathlib.Path(os.path.expanduser(path)).is_dir():
    return False
  from jaxkd.workdir import finished_workdir_teacher
  return finished_workdir_teacher(path) is not None


def _validate_model(stage_config, where: str) -> None:
  from jaxkd import models
  if stage_config.model not in models.names():
    raise ConfigError(f"{where}.model={stage_config.model!r} is not a registered model; choose one "
                      f"of {', '.join(models.names())}")
  options = model_options(stage_config.model)
  for name, value in model_kwargs(stage_config).items():
    if name not in options:
      takes = f"it takes {', '.join(options)}" if options else "it takes no model options"
      raise ConfigError(f"{where}.model_kwargs.{name}={value!r}: model {stage_config.model!r} "
                        f"does not take {name} ({takes}); set it to None or choose another model")


def _validate_stage(stage_config, where: str, num_devices: int) -> None:
  from jaxkd.train.step import LossConfig
  _validate_model(stage_config, where)
  if int(stage_config.epochs) < 0:
    raise ConfigError(f"{where}.epochs={stage_config.epochs} must be >= 0")
  bs = int(stage_config.batch_size)
  if bs <= 0 or bs % num_devices:
    raise ConfigError(f"{where}.batch_size={bs} must be a positive multiple of the {num_devices} "
                      f"devices (global batch, split over the 'data' mesh axis)")
  if stage_config.get("handoff") == "best" and int(stage_config.epochs) == 0:
    raise ConfigError(f"{where}.handoff='best' with {where}.epochs=0: the stage trains no "
                      "checkpoint to choose from; use 'last' (the imported weights as they are)")
  try:
    loss_config = LossConfig.from_config(stage_config.loss, where=f"{where}.loss")
  except (ValueError, TypeError) as e:
    text = str(e)
    raise ConfigError(text if text.startswith(f"{where}.loss.") else f"{where}.loss: {text}"
                      ) from e
  t = loss_config.temperature
  if isinstance(t, (int, float)) and float(t) <= 0:
    raise ConfigError(f"{where}.loss.temperature={t} must be > 0")


def validate(config, *, num_devices: int | None = None) -> None:
  """Checks everything that can be checked without compute; raises ConfigError naming the key.

  `check_values` (unknown keys with a did-you-mean, types, choices, ranges), then the
  checks across keys: registered model and the options it takes, batch sizes divisible
  by `num_devices` (default: jax.device_count()), a teacher for a distilling student,
  files that must exist, the export packages when config.export.formats asks for files.
  """
  import jax

  from jaxkd.train.step import LossConfig
  check_values(config)
  num_devices = num_devices or jax.device_count()
  from jaxkd.data import SOURCE_NAMES, AugmentConfig
  data = config.data
  if data.name not in SOURCE_NAMES:
    raise ConfigError(f"config.data.name={data.name!r}: use one of {', '.join(SOURCE_NAMES)}")
  if data.get("manual_dir") and data.name in ("food101_local", "image_folder"):
    path = pathlib.Path(os.path.expanduser(data.manual_dir))
    if not path.is_dir():
      raise ConfigError(f"config.data.manual_dir={data.manual_dir!r} does not exist (resolved to "
                        f"{path.resolve()}); point it at your extracted data")
  try:
    AugmentConfig.from_mapping(config.augment)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.augment: {e}") from e
  if not config.teacher.enabled and not config.student.enabled:
    raise ConfigError("config.teacher.enabled and config.student.enabled are both False: nothing "
                      "to do")
  if config.teacher.enabled:
    _validate_stage(config.teacher, "config.teacher", num_devices)
  if config.student.enabled:
    _validate_stage(config.student, "config.student", num_devices)
    source = config.student.teacher
    loss_config = LossConfig.from_config(config.student.loss)
    if loss_config.needs_teacher:
      if source == "none":
        raise ConfigError(f"config.student.loss.kind={loss_config.kind!r} distills, but "
                          "config.student.teacher='none'; use 'stored' or 'online', or kind='ce'")
      if not config.teacher.enabled:
        raise ConfigError("config.student.loss distills but config.teacher.enabled=False; enable "
                          "the teacher stage (epochs=0 with a pretrained checkpoint to use "
                          "imported weights as they are)")
      if loss_config.feature_losses and source != "online":
        raise ConfigError("feature losses need the teacher's features: set "
                          "config.student.teacher='online'")
    extra = tuple(config.student.get("extra_teachers") or ())
    if extra:
      from jaxkd.workdir import check_teacher_entry
      if not loss_config.distills:
        raise ConfigError(f"config.student.extra_teachers={extra!r}: the student's loss "
                          f"(kind={loss_config.kind!r}) has no logit distillation term to average "
                          "the teachers into; use kind 'kd', 'dkd' or 'lskd', or remove them")
      for entry in extra:
        check_teacher_entry(entry, "config.student.extra_teachers")
    if config.teacher_logits.mode == "regions" and source != "stored":
      raise ConfigError(f"config.teacher_logits.mode='regions' stores the teacher's logits for a "
                        f"student that reads them, but config.student.teacher={source!r}; use "
                        "--config.student.teacher=stored, or drop the mode (an online teacher "
                        "already sees the student's crops)")
    if (config.teacher_logits.mode == "regions" and source == "stored"
        and AugmentConfig.from_mapping(config.augment).train_crop != "random_resized_crop"):
      raise ConfigError(f"config.teacher_logits.mode='regions' replays random-resized crops, but "
                        f"config.augment.train_crop={config.augment.train_crop!r}; set "
                        "--config.augment.train_crop=random_resized_crop or use "
                        "--config.teacher_logits.mode=image")
    if AugmentConfig.from_mapping(config.augment).mixing:
      from jaxkd.train.step import check_mixing_supported
      try:
        check_mixing_supported(loss_config)
      except ValueError as e:
        raise ConfigError(f"config.student.loss.kind={loss_config.kind!r} with MixUp/CutMix in "
                          "config.augment (mixup_alpha / mixup_lambda_range / cutmix_alpha): "
                          f"{e}") from e
  teacher = config.teacher
  if teacher.enabled and int(teacher.epochs) == 0 and not teacher.get("pretrained"):
    raise ConfigError("config.teacher.epochs=0 needs config.teacher.pretrained=<checkpoint path>")
  from jaxkd.models import convert
  for role in ROLES:
    path = config[role].get("pretrained")
    if not path or (role == "teacher" and _finished_workdir(path)):
      continue
    if pathlib.Path(os.path.expanduser(path)).is_dir():
      raise ConfigError(f"config.{role}.pretrained={path!r} is a folder but not a jaxkd workdir "
                        "with a finished teacher (<workdir>/stages/teacher.json); give a "
                        "checkpoint file, 'torchvision[:WEIGHTS]', or a finished workdir for the "
                        "teacher")
    try:
      convert.check_pretrained_readable(path, config[role].model)
    except ValueError as e:
      raise ConfigError(f"config.{role}.pretrained: {e}") from e
  if int(config.evaluate.batch_size) % num_devices:
    raise ConfigError(f"config.evaluate.batch_size={config.evaluate.batch_size} must be a multiple "
                      f"of the {num_devices} devices")
  _validate_export(config)


def export_entries(config) -> list[tuple[str, str]]:
  """(format, quantize) of each config.export.formats entry ('tflite' reads ('tflite', 'none'))."""
  export = config.get("export", None)
  entries = tuple(export.get("formats", ()) or ()) if export is not None else ()
  return [(e.partition(":")[0], e.partition(":")[2] or "none") for e in entries]


def _validate_export(config) -> None:
  """config.export: no entry twice; the export packages present when the stage will run."""
  entries = export_entries(config)
  if not entries:
    return
  formats = tuple(config.export.formats)
  seen = set()
  for entry, pair in zip(formats, entries):
    if pair in seen:
      raise ConfigError(f"config.export.formats={formats!r}: {entry!r} names the same file as an "
                        "earlier entry ('tflite' is 'tflite:none'); list each file once")
    seen.add(pair)
  role = config.export.role
  if not config[role].enabled:
    return  # the stage is skipped, saying why
  from jaxkd.export import extra
  needed = {"tflite": ("ai_edge_litert",), "onnx": ("onnxruntime", "jax2onnx", "onnx")}
  missing = sorted({extra.PACKAGES[m] for f, _ in entries for m in needed[f]
                    if not extra.available(m)})
  if missing:
    raise ConfigError(f"config.export.formats={formats!r} needs the export extra ("
                      f"{', '.join(missing)} not installed): install it with "
                      "`pip install -e \".[export]\"` from the jaxkd folder, or turn the export "
                      "stage off with --config.export.formats=\"()\"")


# ----------------------------------------------------------------------------- describe


def _show(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, list):
    value = tuple(value)
  if callable(value) and not isinstance(value, type):
    return f"<schedule {getattr(value, '__name__', type(value).__name__)}>"
  return repr(value)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, ml_collections.ConfigDict):
    a = a.to_dict()
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
    return a is b
  if callable(a):
    return False
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  return type(a) is type(b) and a == b


def _explain(key: Key) -> str:
  text = key.meaning
  if key.choices:
    text += f"; {'one of' if key.strict else 'built in:'} {', '.join(repr(c) for c in key.choices)}"
  if key.bounds:
    text += f"; {key.bounds}" if key.bounds[0] in "<>" else f"; in {key.bounds}"
  if key.schedule:
    text += "; or a schedule: 'linear(a,b[,DUR])', 'warmup(DUR[,v])'" + (
        ", 'progressive'" if key.name in ("temperature", "kd_alpha") else "") + (
        ", 'from_accuracy'" if key.name == "temperature" else "") + " (DUR: 20ep, 500steps, 50%)"
  return text


def describe(config: Any) -> str:
  """The effective config, one line per key: ``key = value  # [unit] meaning``.

  Keys whose value differs from the schema default have ``(default: X)`` after the ``#``;
  keys the schema does not know are listed with ``# UNKNOWN KEY``.
  """
  flat = flatten(config)
  lines = ["# key = value  # [unit] meaning; '(default: X)' marks a value that is not the default",
           "# Override any key with --config.KEY=VALUE; None resets an optional key."]
  width = max(len(f"{p} = {_show(v)}") for p, v in flat.items()) if flat else 0
  width = min(width, 44)
  seen = set()
  for path, key in SCHEMA.items():
    if path not in flat:
      continue
    seen.add(path)
    value = flat[path]
    left = f"{path} = {_show(value)}"
    unit = f"[{key.unit}] " if key.unit else ""
    changed = "" if _same(value, key.default) else f"(default: {_show(key.default)}) "
    lines.append(f"{left:<{width}}  # {changed}{unit}{_explain(key)}")
  for path, value in flat.items():
    if path not in seen and path not in SCHEMA:
      lines.append(f"{path} = {_show(value)}  # UNKNOWN KEY: {unknown_key_message(path)}")
  return "\n".join(lines)
