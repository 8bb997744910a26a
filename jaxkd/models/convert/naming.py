"""Naming rules between torch state dicts and jaxkd's Flax variables, and the conversion itself.

One ``_Family`` per architecture (``_RESNET``, ``_MOBILENET``) translates module paths both ways
(torch 'layer1.0.conv1' <-> Flax 'layer1_0/conv1'); leaf names and tensor layouts are shared
(conv weight [O, I/g, kh, kw] -> kernel [kh, kw, I/g, O], Linear weight [O, I] -> kernel [I, O],
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var).
``convert_state_dict`` applies them to a state dict and returns the Flax variables and a
``ConversionReport``; the rules for what loads, what keeps its init and what is an error are in
the docstring of ``jaxkd.models.convert``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd.models.convert.reading import unwrap_state_dict

# One logger for the whole jaxkd.models.convert package (its name as before the split).
logger = logging.getLogger("jaxkd.models.convert")

_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not fit the model; the message lists every offending key."""


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
  """Removes a prefix from `_KEY_PREFIXES` while every key carries it ('module.model.x' -> 'x')."""
  state = dict(state)
  changed = True
  while changed and state:
    changed = False
    for prefix in _KEY_PREFIXES:
      if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        changed = True
  return state

# ------------------------------------------------------------------------------------ key mapping

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _rules(*pairs: tuple[str, Callable[[re.Match], str]]) -> tuple[Rule, ...]:
  return tuple((re.compile(pattern), fn) for pattern, fn in pairs)


@dataclasses.dataclass(frozen=True)
class _Family:
  """Module-path translation for one architecture family ('/'-joined Flax module paths)."""
  to_flax: tuple[Rule, ...]   # torch module path -> Flax module path
  to_torch: tuple[Rule, ...]  # Flax module path -> torch module path (messages on missing keys)
  head: str                   # Flax module path of the classifier

  @staticmethod
  def _apply(rules: tuple[Rule, ...], path: str) -> str | None:
    for pattern, fn in rules:
      m = pattern.fullmatch(path)
      if m:
        return fn(m)
    return None

  def flax_module(self, torch_module: str) -> str | None:
    return self._apply(self.to_flax, torch_module)

  def torch_module(self, flax_module: str) -> str:
    return self._apply(self.to_torch, flax_module) or f"<{flax_module}>"


_RESNET = _Family(
    to_flax=_rules(
        (r"(conv1|bn1|fc)", lambda m: m[1]),
        (r"layer(\d+)\.(\d+)\.(conv\d|bn\d)", lambda m: f"layer{m[1]}_{m[2]}/{m[3]}"),
        (r"layer(\d+)\.(\d+)\.downsample\.([01])",
         lambda m: f"layer{m[1]}_{m[2]}/downsample_{('conv', 'bn')[int(m[3])]}"),
    ),
    to_torch=_rules(
        (r"(conv1|bn1|fc)", lambda m: m[1]),
        (r"layer(\d+)_(\d+)/(conv\d|bn\d)", lambda m: f"layer{m[1]}.{m[2]}.{m[3]}"),
        (r"layer(\d+)_(\d+)/downsample_(conv|bn)",
         lambda m: f"layer{m[1]}.{m[2]}.downsample.{int(m[3] == 'bn')}"),
    ),
    head="fc")

_MOBILENET = _Family(
    to_flax=_rules(
        (r"features\.(\d+)\.([01])", lambda m: f"features_{m[1]}/{('conv', 'bn')[int(m[2])]}"),
        (r"features\.(\d+)\.block\.(\d+)\.([01])",
         lambda m: f"features_{m[1]}/block_{m[2]}/{('conv', 'bn')[int(m[3])]}"),
        (r"features\.(\d+)\.block\.(\d+)\.(fc[12])",
         lambda m: f"features_{m[1]}/block_{m[2]}/{m[3]}"),
        (r"classifier\.([03])", lambda m: f"classifier_{m[1]}"),
    ),
    to_torch=_rules(
        (r"features_(\d+)/(conv|bn)", lambda m: f"features.{m[1]}.{int(m[2] == 'bn')}"),
        (r"features_(\d+)/block_(\d+)/(conv|bn)",
         lambda m: f"features.{m[1]}.block.{m[2]}.{int(m[3] == 'bn')}"),
        (r"features_(\d+)/block_(\d+)/(fc[12])",
         lambda m: f"features.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"classifier_([03])", lambda m: f"classifier.{m[1]}"),
    ),
    head="classifier_3")

# Why an unexpected key is there, for the error message.
_HINTS = (
    (re.compile(r"conv1\.\d+\."),
     "a deep 3x3 stem (timm's resnet*c/d/s/t variants): jaxkd's ResNet has torchvision's "
     "7x7 stem (timm's plain resnet18/34/50/101)"),
    (re.compile(r".*downsample\.2\."),
     "an avg-pool downsample (timm's resnet*d): not jaxkd's ResNet"),
    (re.compile(r".*\.se\."), "SE blocks inside a ResNet (timm's seresnet*): not jaxkd's ResNet"),
    (re.compile(r"(conv_stem|blocks|conv_head)\."),
     "timm's MobileNetV3 naming (conv_stem/blocks/conv_head): only "
     "torchvision's MobileNetV3 naming is supported"),
)

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_DENSE_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
_TORCH_LEAF = {("params", "scale"): "weight", ("params", "kernel"): "weight",
               ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
  """Conv [O, I, kh, kw] -> [kh, kw, I, O]; Conv1d [O, I, k] -> [k, I, O];
  Linear [O, I] -> [I, O]."""
  axes = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0)}.get(weight.ndim)
  return weight if axes is None else np.transpose(weight, axes)


def _torch_shape(target: tuple[str, ...], shape: Sequence[int]) -> tuple[int, ...]:
  """The torch layout of a Flax variable's shape (inverse of `_kernel_from_torch` for kernels)."""
  shape = tuple(shape)
  if target[-1] != "kernel":
    return shape
  axes = {4: (3, 2, 0, 1), 3: (2, 1, 0), 2: (1, 0)}.get(len(shape))
  return shape if axes is None else tuple(shape[a] for a in axes)


def _fmt(shape: Sequence[int] | None) -> str:
  return "[" + ", ".join(map(str, shape)) + "]" if shape is not None else "-"


def _path(target: tuple[str, ...]) -> str:
  return "/".join(target)

# ------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ConversionReport:
  """What `convert_state_dict` did. Paths are Flax paths 'collection/module/.../leaf'; keys are
  torch keys."""
  model: str
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  # modules the checkpoint cannot have
  kept_at_init: list[str] = dataclasses.field(default_factory=list)
  # classifier variables at their fresh init
  head_replaced: list[str] = dataclasses.field(default_factory=list)
  checkpoint_num_classes: int | None = None
  # checkpoint keys not used
  ignored_keys: list[str] = dataclasses.field(default_factory=list)
  # mismatches tolerated with strict=False
  problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Problem:
  kind: str  # 'unexpected' | 'missing' | 'shape'
  key: str
  flax: str | None
  expected: tuple[int, ...] | None  # torch layout
  found: tuple[int, ...] | None

  def line(self) -> str:
    if self.kind == "unexpected":
      where = ("no such variable in the model" if self.flax is None
               else f"Flax {self.flax} does not exist")
      return f"  unexpected key  {self.key}  found {_fmt(self.found)}  ({where})"
    if self.kind == "missing":
      return f"  missing key     {self.key}  expected {_fmt(self.expected)}  (Flax {self.flax})"
    return (f"  wrong shape     {self.key}  expected {_fmt(self.expected)}, "
            f"found {_fmt(self.found)}  (Flax {self.flax})")


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in sorted(flat.items()):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


_INIT_SIZE = 32  # image size for shape inference / init; parameter shapes do not depend on it


def _init_values(model: Any, targets: Sequence[tuple[str, ...]],
                 rng: Any) -> dict[tuple[str, ...], np.ndarray]:
  """`model.init(rng, images)` restricted to `targets`; XLA drops everything else, so this
  compiles quickly."""
  import jax
  import jax.numpy as jnp

  key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng

  def select(k):
    variables = model.init(k, jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32))
    out = []
    for target in targets:
      node = variables
      for part in target:
        node = node[part]
      out.append(node)
    return out

  values = jax.jit(select)(key)
  return {t: np.asarray(v, np.float32) for t, v in zip(targets, values)}


def _is_stage_attention(target: tuple[str, ...]) -> bool:
  return re.fullmatch(r"stage\d+_attention", target[1]) is not None


def _attention_slot(params: Mapping, features: str, block: str) -> bool:
  """Whether Flax module features_N/block_M is MobileNetV3's SE slot: not a conv-BN (no 'bn'), or
  absent (parameter-free attention) while features_N exists."""
  layer = params.get(features)
  if not isinstance(layer, Mapping):
    return False
  return "bn" not in layer.get(block, {})


def family_of(name: str, model: Any) -> _Family:
  """The key-mapping family of Flax module `model` (registered as `name`); ValueError if none."""
  from jaxkd.models.mobilenetv3 import MobileNetV3
  from jaxkd.models.resnet import ResNet

  if isinstance(model, ResNet):
    return _RESNET
  if isinstance(model, MobileNetV3):
    return _MOBILENET
  raise ValueError(f"no PyTorch checkpoint import for model {name!r} ({type(model).__name__}); "
                   "supported: resnet18/34/50/101 and mobilenet_v3_* (torchvision naming)")


def convert_state_dict(name: str, state_dict: Mapping[str, Any], *, num_classes: int,
                       strict: bool = True, rng: Any = 0, source: str = "<state dict>",
                       model_kwargs: Mapping[str, Any] | None = None
                       ) -> tuple[dict, ConversionReport]:
  """Flax variables {'params', 'batch_stats'} (NumPy float32) of model `name` from a torch-named
  state dict.

  Returns (variables, report). See the docstring of `jaxkd.models.convert` for the rules; `rng`
  (int seed or JAX key) is the `model.init` key for variables kept at (or replaced by) their
  initialisation.
  """
  import jax
  import jax.numpy as jnp

  from jaxkd.models.registry import create

  model_kwargs = dict(model_kwargs or {})
  model = create(name, num_classes=num_classes, **model_kwargs)
  family = family_of(name, model)
  in_block_attention = getattr(model, "attention", "se")
  kwargs_text = "".join(f", {k}={v!r}" for k, v in model_kwargs.items())
  described = f"model {name!r} (num_classes={num_classes}{kwargs_text})"

  shapes_tree = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32))
  shapes_tree = {c: dict(v) for c, v in shapes_tree.items()}
  expected = {t: tuple(v.shape) for t, v in _flatten(shapes_tree).items()}
  params_tree = shapes_tree.get("params", {})

  state = _strip_prefixes(unwrap_state_dict(state_dict, source))
  report = ConversionReport(model=name, source=source)
  problems: list[_Problem] = []
  loaded: dict[tuple[str, ...], np.ndarray] = {}
  head_found: dict[tuple[str, ...], tuple[int, ...]] = {}
  mis_shaped: set[tuple[str, ...]] = set()
  se_ignored: list[str] = []  # checkpoint SE tensors when the in-block attention is not 'se'

  for key in sorted(state):
    array = np.asarray(state[key])
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    flax_module = family.flax_module(module)
    if flax_module is None:
      problems.append(_Problem("unexpected", key, None, None, array.shape))
      continue
    module_path = tuple(flax_module.split("/"))
    is_bn = (("params",) + module_path + ("scale",) in expected
             or ("batch_stats",) + module_path + ("mean",) in expected)
    leaf_target = (_BN_LEAVES if is_bn else _DENSE_LEAVES).get(leaf)
    target = None if leaf_target is None else (leaf_target[0],) + module_path + (leaf_target[1],)
    if target is None or target not in expected:
      se_slot = (family is _MOBILENET and len(module_path) == 3
                 and module_path[2] in ("fc1", "fc2") and in_block_attention != "se"
                 and _attention_slot(params_tree, module_path[0], module_path[1]))
      if se_slot:
        se_ignored.append(key)
      else:
        problems.append(_Problem("unexpected", key, None if target is None else _path(target),
                                 None, array.shape))
      continue
    if target in loaded:  # a duplicate after the prefix strip
      problems.append(_Problem("unexpected", key, _path(target), None, array.shape))
      continue
    value = _kernel_from_torch(array) if target[-1] == "kernel" else array
    want = expected[target]
    if value.shape == want:
      loaded[target] = np.ascontiguousarray(value, dtype=np.float32)
    elif flax_module == family.head and value.shape[:-1] == want[:-1]:
      head_found[target] = value.shape  # a classifier for another number of classes
    else:
      mis_shaped.add(target)
      problems.append(_Problem("shape", key, _path(target), _torch_shape(target, want),
                               array.shape))

  # Classifier for another number of classes: all of it is replaced by the fresh init.
  head = tuple(family.head.split("/"))
  head_targets = sorted(t for t in expected if t[1:1 + len(head)] == head)
  if head_found:
    report.checkpoint_num_classes = int(next(iter(head_found.values()))[-1])
    report.head_replaced = [_path(t) for t in head_targets]
    for t in head_targets:
      loaded.pop(t, None)

  kept = []
  for target in sorted(expected):
    if target in loaded or target in mis_shaped or (head_found and target in head_targets):
      continue
    in_block_slot = (family is _MOBILENET and in_block_attention != "se" and len(target) >= 4
                     and target[1].startswith("features_") and target[2].startswith("block_")
                     and _attention_slot(params_tree, target[1], target[2]))
    if _is_stage_attention(target) or in_block_slot:
      kept.append(target)
    else:
      torch_leaf = _TORCH_LEAF.get((target[0], target[-1]), target[-1])
      torch_key = f"{family.torch_module('/'.join(target[1:-1]))}.{torch_leaf}"
      problems.append(_Problem("missing", torch_key, _path(target),
                               _torch_shape(target, expected[target]), None))

  order = {"unexpected": 0, "missing": 1, "shape": 2}
  problems.sort(key=lambda p: (order[p.kind], p.key))
  if problems:
    counts = {k: sum(p.kind == k for p in problems) for k in order}
    hints = sorted({hint for p in problems if p.kind == "unexpected"
                    for pattern, hint in _HINTS if pattern.match(p.key)})
    message = "\n".join(
        [f"checkpoint {source} does not fit {described}: {counts['unexpected']} unexpected "
         f"key(s), {counts['missing']} missing key(s), {counts['shape']} wrong shape(s) (torch "
         "layout [O, I, kh, kw] / [O, I]):"]
        + [p.line() for p in problems] + [f"hint: the checkpoint has {h}" for h in hints]
        + ["Use the torchvision (or timm) checkpoint of this architecture, or pass strict=False to "
           "ignore unexpected keys and keep the model's initial values for missing / mis-shaped "
           "ones."])
    if strict:
      raise CheckpointMismatchError(message)
    logger.warning("%s\n(strict=False: continuing)", message)
    report.problems = [p.line().strip() for p in problems]
    report.ignored_keys += [p.key for p in problems if p.kind == "unexpected"]

  need_init = [t for t in sorted(expected) if t not in loaded]
  values = dict(loaded)
  if need_init:
    values.update(_init_values(model, need_init, rng))

  report.ignored_keys = se_ignored + report.ignored_keys
  report.loaded = [_path(t) for t in sorted(loaded)]
  report.kept_at_init = [_path(t) for t in kept]
  if head_found:
    logger.warning("%s: the checkpoint's classifier %s has %d classes, the model %d: the "
                   "classifier is replaced by the model's fresh initialisation (%s)", source,
                   family.torch_module(family.head), report.checkpoint_num_classes, num_classes,
                   ", ".join(f"{_path(t)} {_fmt(expected[t])}" for t in head_targets))
  if kept:
    logger.warning("%s: %d variable(s) of %s have no counterpart in the checkpoint and keep their "
                   "initial values: %s", source, len(kept), name, ", ".join(report.kept_at_init))
  if se_ignored:
    logger.warning("%s: %d SE tensor(s) of the checkpoint are not used, %s's in-block attention "
                   "is %r: %s", source, len(se_ignored), name, in_block_attention,
                   ", ".join(se_ignored))
  logger.info("%s: loaded %d tensors into %s", source, len(loaded), name)
  return _unflatten(values), report
