"""Import PyTorch checkpoints (torchvision / timm state dicts) into jaxkd's Flax models.

    variables = convert.load_pretrained("resnet50", "resnet50.safetensors", num_classes=101)
    variables = convert.load_pretrained("mobilenet_v3_large_eca", "torchvision", num_classes=101)  # downloads
    logits = models.create("resnet50", num_classes=101).apply(variables, images)

Supported models: `resnet18/34/50/101` (torchvision's ResNet v1.5 naming, which is also timm's naming for its
plain `resnet18/34/50/101`: conv1, bn1, layer{s}.{i}.conv{j}/bn{j}, downsample.0/.1, fc) and
`mobilenet_v3_large` / `mobilenet_v3_small` / `mobilenet_v3_large_eca` (torchvision naming: features.N...,
classifier.0/.3). The key -> Flax path rules are the ones in the docstrings of `resnet.py` and `mobilenetv3.py`;
tensor layouts: conv weight [O, I/g, kh, kw] -> kernel [kh, kw, I/g, O] (transpose (2, 3, 1, 0)), Linear weight
[O, I] -> kernel [I, O], BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var,
num_batches_tracked dropped.

Checkpoints: `.safetensors` (read with safetensors' NumPy API) or a PyTorch pickle written by
`torch.save` (`.pth`, `.pt`, `.pth.tar`, `.bin`, `.ckpt`; the zip format of PyTorch >= 1.6, which
all of torchvision's published weights use). Neither needs torch: PyTorch pickles are read by
`jaxkd.models.torch_pickle`, a restricted unpickler that rebuilds tensors as NumPy arrays and
refuses every Python object other than tensors, OrderedDicts and plain values (so a malicious file
cannot run code). Wrapper dicts ({'state_dict': ...}, {'model': ...}, {'model_state_dict': ...})
and key prefixes shared by every key ('module.' from DataParallel, 'model.', '_orig_mod.' from
torch.compile) are removed.

Rules (what loads, what is kept at the model's init, what is an error):
  * Every checkpoint tensor must have a counterpart of the same shape and every model variable must come from
    the checkpoint, except:
  * the classifier (ResNet `fc`, MobileNetV3 `classifier_3`) when its number of classes differs from
    `num_classes`: it is replaced by the model's fresh initialisation (logged);
  * modules the checkpoint cannot have: stage attention (`stage{s}_attention`, e.g. the ECA modules of
    `mobilenet_v3_large_eca`) and, when the model's in-block attention is not 'se', the attention in the SE slot
    (its SE tensors in the checkpoint are then ignored). These keep the model's init (logged, and listed in
    the `ConversionReport`).
  * Everything else that does not fit (unknown keys, missing keys, wrong shapes) raises ONE
    `CheckpointMismatchError` listing all of them. `strict=False` turns it into a logged warning: unexpected
    keys are ignored and missing / mis-shaped variables keep the model's init.
"Initial values" are exactly `model.init(rng, images)`'s (Flax derives every parameter's random stream from its
module path, so the needed subset is computed alone, in one small jit-compiled program).

`load_pretrained(name, "torchvision")` (or "torchvision:IMAGENET1K_V2") downloads torchvision's official
ImageNet weights (URLs from torchvision's `*_Weights` enums) into ~/.cache/jaxkd with `download_pretrained`.
`check_pretrained_readable(spec, model)` checks a checkpoint spec up front (the file exists, its
format is known and readable with what is installed, the torchvision weights name is known) without
reading tensors or using the network.

JAX and the model code are imported where they are used: `read_checkpoint` needs only NumPy (and
safetensors for .safetensors files).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import tempfile
import urllib.request
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jaxkd.models import torch_pickle

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- reading

_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not fit the model; the message lists every offending key."""


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  """The flat state dict inside `obj`, descending through {'state_dict' | 'model_state_dict' | 'model' | 'module'}."""
  for _ in range(len(_WRAPPER_KEYS) + 1):
    if not isinstance(obj, Mapping):
      raise ValueError(f"checkpoint {source}: expected a state dict (a mapping of names to tensors), "
                       f"found {type(obj).__name__}")
    if any(_is_array(v) for v in obj.values()):
      break
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise ValueError(f"checkpoint {source}: no tensors at the top level and none of the wrapper keys "
                       f"{list(_WRAPPER_KEYS)}; top-level keys: {sorted(map(str, obj))[:20]}")
    obj = inner
  not_arrays = sorted(str(k) for k, v in obj.items() if not _is_array(v))
  if not_arrays:
    raise ValueError(f"checkpoint {source}: entries {not_arrays[:20]} are not tensors; expected a flat state dict, "
                     f"possibly wrapped as {{'state_dict': ...}} or {{'model': ...}}")
  return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat {torch key: NumPy array} of a .safetensors file or a PyTorch pickle (.pth/.pt/.pth.tar/.bin/.ckpt).

  No torch needed: PyTorch pickles are read by `torch_pickle.load` (arrays keep the tensor's dtype,
  except bfloat16, which becomes float32). Wrapper dicts are removed (see `_WRAPPER_KEYS`); key
  prefixes are kept (`convert_state_dict` strips them).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if path.endswith(_TORCH_SUFFIXES):
    return {str(k): v for k, v in _unwrap(torch_pickle.load(path), repr(path)).items()}
  raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors or a PyTorch pickle "
                   f"({', '.join(_TORCH_SUFFIXES)})")


def _check_safetensors_header(path: str) -> None:
  """Raises ValueError unless `path` starts like a .safetensors file (header length, JSON header)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = f.read(length) if 0 < length <= size - 8 else b""
  try:
    parsed = json.loads(header) if header else None
  except (UnicodeDecodeError, json.JSONDecodeError):
    parsed = None
  if not isinstance(parsed, dict):
    raise ValueError(f"{path!r} is not a .safetensors file (no JSON header after its length)")


def check_pretrained_readable(spec: str | os.PathLike, model: Optional[str] = None) -> None:
  """Raises ValueError, naming `spec` and what to do, when `load_pretrained(model, spec)` could not
  read it.

  Checks without reading tensors or using the network: `model` (when given) must be a registered
  model that checkpoints can be imported into; 'torchvision' / 'torchvision:WEIGHTS' must name
  weights in `TORCHVISION_URLS` (for `model` when given, else for any model); a path ('~' expanded)
  must exist, have a known suffix, and its reader must be installed and recognise the file's
  format (a PyTorch pickle must be in torch.save's zip format: the legacy format is refused here,
  saying how to re-save it).
  """
  spec = os.fspath(spec)
  if model is not None:
    from jaxkd.models.registry import create
    try:
      _family(model, create(model, num_classes=1000))  # constructs the module only: no compute
    except ValueError as e:
      raise ValueError(f"pretrained checkpoint {spec!r}: {e}") from e
  if spec == "torchvision" or spec.startswith("torchvision:"):
    weights = spec.partition(":")[2] or "IMAGENET1K_V1"
    if model is not None:
      try:
        torchvision_url(model, weights)
      except ValueError as e:
        raise ValueError(f"pretrained checkpoint {spec!r}: {e}") from e
    else:
      known = sorted({w for table in TORCHVISION_URLS.values() for w in table})
      if weights not in known:
        raise ValueError(f"pretrained checkpoint {spec!r}: torchvision has no weights {weights!r}; "
                         f"choose one of {known} (as 'torchvision:NAME')")
    return
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise ValueError(f"pretrained checkpoint {spec!r} is not a file: give a .safetensors or PyTorch "
                     f"({', '.join(_TORCH_SUFFIXES)}) checkpoint, or 'torchvision' / "
                     "'torchvision:IMAGENET1K_V2' for torchvision's ImageNet weights (downloaded)")
  try:
    if path.endswith(".safetensors"):
      if importlib.util.find_spec("safetensors") is None:
        raise ValueError("reading .safetensors needs the safetensors package, which is not "
                         "installed: pip install -r requirements.txt (or pip install safetensors)")
      _check_safetensors_header(path)
    elif path.endswith(_TORCH_SUFFIXES):
      torch_pickle.check_format(path)
    else:
      raise ValueError(f"unknown checkpoint format: expected .safetensors or a PyTorch pickle "
                       f"({', '.join(_TORCH_SUFFIXES)})")
  except ValueError as e:
    raise ValueError(f"pretrained checkpoint {spec!r}: {e}") from e


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

# ------------------------------------------------------------------------------------------- key mapping

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def _rules(*pairs: tuple[str, Callable[[re.Match], str]]) -> tuple[Rule, ...]:
  return tuple((re.compile(pattern), fn) for pattern, fn in pairs)


@dataclasses.dataclass(frozen=True)
class _Family:
  """Module-path translation for one architecture family ('/'-joined Flax module paths)."""
  to_flax: tuple[Rule, ...]   # torch module path -> Flax module path
  to_torch: tuple[Rule, ...]  # Flax module path -> torch module path (for messages about missing keys)
  head: str                   # Flax module path of the classifier

  @staticmethod
  def _apply(rules: tuple[Rule, ...], path: str) -> Optional[str]:
    for pattern, fn in rules:
      m = pattern.fullmatch(path)
      if m:
        return fn(m)
    return None

  def flax_module(self, torch_module: str) -> Optional[str]:
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
        (r"layer(\d+)_(\d+)/downsample_(conv|bn)", lambda m: f"layer{m[1]}.{m[2]}.downsample.{int(m[3] == 'bn')}"),
    ),
    head="fc")

_MOBILENET = _Family(
    to_flax=_rules(
        (r"features\.(\d+)\.([01])", lambda m: f"features_{m[1]}/{('conv', 'bn')[int(m[2])]}"),
        (r"features\.(\d+)\.block\.(\d+)\.([01])",
         lambda m: f"features_{m[1]}/block_{m[2]}/{('conv', 'bn')[int(m[3])]}"),
        (r"features\.(\d+)\.block\.(\d+)\.(fc[12])", lambda m: f"features_{m[1]}/block_{m[2]}/{m[3]}"),
        (r"classifier\.([03])", lambda m: f"classifier_{m[1]}"),
    ),
    to_torch=_rules(
        (r"features_(\d+)/(conv|bn)", lambda m: f"features.{m[1]}.{int(m[2] == 'bn')}"),
        (r"features_(\d+)/block_(\d+)/(conv|bn)", lambda m: f"features.{m[1]}.block.{m[2]}.{int(m[3] == 'bn')}"),
        (r"features_(\d+)/block_(\d+)/(fc[12])", lambda m: f"features.{m[1]}.block.{m[2]}.{m[3]}"),
        (r"classifier_([03])", lambda m: f"classifier.{m[1]}"),
    ),
    head="classifier_3")

# Why an unexpected key is there, for the error message.
_HINTS = (
    (re.compile(r"conv1\.\d+\."), "a deep 3x3 stem (timm's resnet*c/d/s/t variants): jaxkd's ResNet has torchvision's "
                                  "7x7 stem (timm's plain resnet18/34/50/101)"),
    (re.compile(r".*downsample\.2\."), "an avg-pool downsample (timm's resnet*d): not jaxkd's ResNet"),
    (re.compile(r".*\.se\."), "SE blocks inside a ResNet (timm's seresnet*): not jaxkd's ResNet"),
    (re.compile(r"(conv_stem|blocks|conv_head)\."), "timm's MobileNetV3 naming (conv_stem/blocks/conv_head): only "
                                                    "torchvision's MobileNetV3 naming is supported"),
)

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_DENSE_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
_TORCH_LEAF = {("params", "scale"): "weight", ("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
  """Conv [O, I, kh, kw] -> [kh, kw, I, O]; Conv1d [O, I, k] -> [k, I, O]; Linear [O, I] -> [I, O]."""
  axes = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0)}.get(weight.ndim)
  return weight if axes is None else np.transpose(weight, axes)


def _torch_shape(target: tuple[str, ...], shape: Sequence[int]) -> tuple[int, ...]:
  """The torch layout of a Flax variable's shape (inverse of `_kernel_from_torch` for kernels)."""
  shape = tuple(shape)
  if target[-1] != "kernel":
    return shape
  axes = {4: (3, 2, 0, 1), 3: (2, 1, 0), 2: (1, 0)}.get(len(shape))
  return shape if axes is None else tuple(shape[a] for a in axes)


def _fmt(shape: Optional[Sequence[int]]) -> str:
  return "[" + ", ".join(map(str, shape)) + "]" if shape is not None else "-"


def _path(target: tuple[str, ...]) -> str:
  return "/".join(target)

# ------------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ConversionReport:
  """What `convert_state_dict` did. Paths are Flax paths 'collection/module/.../leaf'; keys are torch keys."""
  model: str
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  kept_at_init: list[str] = dataclasses.field(default_factory=list)  # modules the checkpoint cannot have
  head_replaced: list[str] = dataclasses.field(default_factory=list)  # classifier variables at their fresh init
  checkpoint_num_classes: Optional[int] = None
  ignored_keys: list[str] = dataclasses.field(default_factory=list)  # checkpoint keys not used
  problems: list[str] = dataclasses.field(default_factory=list)  # mismatches tolerated with strict=False


@dataclasses.dataclass(frozen=True)
class _Problem:
  kind: str  # 'unexpected' | 'missing' | 'shape'
  key: str
  flax: Optional[str]
  expected: Optional[tuple[int, ...]]  # torch layout
  found: Optional[tuple[int, ...]]

  def line(self) -> str:
    if self.kind == "unexpected":
      where = "no such variable in the model" if self.flax is None else f"Flax {self.flax} does not exist"
      return f"  unexpected key  {self.key}  found {_fmt(self.found)}  ({where})"
    if self.kind == "missing":
      return f"  missing key     {self.key}  expected {_fmt(self.expected)}  (Flax {self.flax})"
    return f"  wrong shape     {self.key}  expected {_fmt(self.expected)}, found {_fmt(self.found)}  (Flax {self.flax})"


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


def _init_values(model: Any, targets: Sequence[tuple[str, ...]], rng: Any) -> dict[tuple[str, ...], np.ndarray]:
  """`model.init(rng, images)` restricted to `targets`; XLA drops everything else, so this compiles quickly."""
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
  """Whether Flax module features_N/block_M is MobileNetV3's SE slot: not a conv-BN (no 'bn'), or absent
  (parameter-free attention) while features_N exists."""
  layer = params.get(features)
  if not isinstance(layer, Mapping):
    return False
  return "bn" not in layer.get(block, {})


def _family(name: str, model: Any) -> _Family:
  """The key-mapping family of Flax module `model` (registered as `name`); ValueError if none."""
  from jaxkd.models.mobilenetv3 import MobileNetV3
  from jaxkd.models.resnet import ResNet

  if isinstance(model, ResNet):
    return _RESNET
  if isinstance(model, MobileNetV3):
    return _MOBILENET
  raise ValueError(f"no PyTorch checkpoint import for model {name!r} ({type(model).__name__}); "
                   "supported: resnet18/34/50/101 and mobilenet_v3_* (torchvision naming)")


def convert_state_dict(name: str, state_dict: Mapping[str, Any], *, num_classes: int, strict: bool = True,
                       rng: Any = 0, source: str = "<state dict>",
                       model_kwargs: Optional[Mapping[str, Any]] = None) -> tuple[dict, ConversionReport]:
  """Flax variables {'params', 'batch_stats'} (NumPy float32) of model `name` from a torch-named state dict.

  Returns (variables, report). See the module docstring for the rules; `rng` (int seed or JAX key) is the
  `model.init` key for variables kept at (or replaced by) their initialisation.
  """
  import jax
  import jax.numpy as jnp

  from jaxkd.models.registry import create

  model_kwargs = dict(model_kwargs or {})
  model = create(name, num_classes=num_classes, **model_kwargs)
  family = _family(name, model)
  in_block_attention = getattr(model, "attention", "se")
  described = f"model {name!r} (num_classes={num_classes}{''.join(f', {k}={v!r}' for k, v in model_kwargs.items())})"

  shapes_tree = jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, _INIT_SIZE, _INIT_SIZE, 3), jnp.float32))
  shapes_tree = {c: dict(v) for c, v in shapes_tree.items()}
  expected = {t: tuple(v.shape) for t, v in _flatten(shapes_tree).items()}
  params_tree = shapes_tree.get("params", {})

  state = _strip_prefixes(_unwrap(state_dict, source))
  report = ConversionReport(model=name, source=source)
  problems: list[_Problem] = []
  loaded: dict[tuple[str, ...], np.ndarray] = {}
  head_found: dict[tuple[str, ...], tuple[int, ...]] = {}
  mis_shaped: set[tuple[str, ...]] = set()
  se_ignored: list[str] = []  # SE tensors of the checkpoint when the model's in-block attention is not 'se'

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
    is_bn = ("params",) + module_path + ("scale",) in expected or ("batch_stats",) + module_path + ("mean",) in expected
    leaf_target = (_BN_LEAVES if is_bn else _DENSE_LEAVES).get(leaf)
    target = None if leaf_target is None else (leaf_target[0],) + module_path + (leaf_target[1],)
    if target is None or target not in expected:
      se_slot = (family is _MOBILENET and len(module_path) == 3 and module_path[2] in ("fc1", "fc2")
                 and in_block_attention != "se" and _attention_slot(params_tree, module_path[0], module_path[1]))
      if se_slot:
        se_ignored.append(key)
      else:
        problems.append(_Problem("unexpected", key, None if target is None else _path(target), None, array.shape))
      continue
    if target in loaded:
      problems.append(_Problem("unexpected", key, _path(target), None, array.shape))  # duplicate after prefix strip
      continue
    value = _kernel_from_torch(array) if target[-1] == "kernel" else array
    want = expected[target]
    if value.shape == want:
      loaded[target] = np.ascontiguousarray(value, dtype=np.float32)
    elif flax_module == family.head and value.shape[:-1] == want[:-1]:
      head_found[target] = value.shape  # a classifier for another number of classes
    else:
      mis_shaped.add(target)
      problems.append(_Problem("shape", key, _path(target), _torch_shape(target, want), array.shape))

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
      problems.append(_Problem("missing", torch_key, _path(target), _torch_shape(target, expected[target]), None))

  order = {"unexpected": 0, "missing": 1, "shape": 2}
  problems.sort(key=lambda p: (order[p.kind], p.key))
  if problems:
    counts = {k: sum(p.kind == k for p in problems) for k in order}
    hints = sorted({hint for p in problems if p.kind == "unexpected" for pattern, hint in _HINTS
                    if pattern.match(p.key)})
    message = "\n".join(
        [f"checkpoint {source} does not fit {described}: {counts['unexpected']} unexpected key(s), "
         f"{counts['missing']} missing key(s), {counts['shape']} wrong shape(s) (torch layout [O, I, kh, kw] / "
         "[O, I]):"] + [p.line() for p in problems] + [f"hint: the checkpoint has {h}" for h in hints]
        + ["Use the torchvision (or timm) checkpoint of this architecture, or pass strict=False to ignore "
           "unexpected keys and keep the model's initial values for missing / mis-shaped ones."])
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
    logger.warning("%s: the checkpoint's classifier %s has %d classes, the model %d: the classifier is replaced "
                   "by the model's fresh initialisation (%s)", source, family.torch_module(family.head),
                   report.checkpoint_num_classes, num_classes,
                   ", ".join(f"{_path(t)} {_fmt(expected[t])}" for t in head_targets))
  if kept:
    logger.warning("%s: %d variable(s) of %s have no counterpart in the checkpoint and keep their initial values: %s",
                   source, len(kept), name, ", ".join(report.kept_at_init))
  if se_ignored:
    logger.warning("%s: %d SE tensor(s) of the checkpoint are not used, %s's in-block attention is %r: %s", source,
                   len(se_ignored), name, in_block_attention, ", ".join(se_ignored))
  logger.info("%s: loaded %d tensors into %s", source, len(loaded), name)
  return _unflatten(values), report

# ------------------------------------------------------------------------------------------- downloading

# torchvision's official ImageNet-1k weights (torchvision.models.*_Weights, torchvision 0.14+). The file names
# carry the first hex digits of the file's sha256.
TORCHVISION_URLS: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": "https://download.pytorch.org/models/resnet18-f37072fd.pth"},
    "resnet34": {"IMAGENET1K_V1": "https://download.pytorch.org/models/resnet34-b627a593.pth"},
    "resnet50": {"IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                 "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"},
    "resnet101": {"IMAGENET1K_V1": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
                  "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet101-cd907fc2.pth"},
    "mobilenet_v3_large": {"IMAGENET1K_V1": "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
                           "IMAGENET1K_V2": "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth"},
    "mobilenet_v3_small": {"IMAGENET1K_V1": "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth"},
}
# jaxkd models whose torchvision weights are another model's (the extra modules keep their init).
_TORCHVISION_BASE = {"mobilenet_v3_large_eca": "mobilenet_v3_large"}
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxkd")


def torchvision_url(name: str, weights: str = "IMAGENET1K_V1") -> str:
  """URL of torchvision's `weights` (e.g. 'IMAGENET1K_V1') for jaxkd model `name`."""
  base = _TORCHVISION_BASE.get(name, name)
  if base not in TORCHVISION_URLS:
    raise ValueError(f"no torchvision weights for model {name!r}; available for {sorted(TORCHVISION_URLS)} "
                     f"and {sorted(_TORCHVISION_BASE)}")
  if weights not in TORCHVISION_URLS[base]:
    raise ValueError(f"torchvision has no weights {weights!r} for {base}; "
                     f"choose one of {sorted(TORCHVISION_URLS[base])}")
  return TORCHVISION_URLS[base][weights]


def download_pretrained(name: str, *, weights: str = "IMAGENET1K_V1",
                        cache_dir: Optional[str | os.PathLike] = None) -> pathlib.Path:
  """Path of torchvision's `weights` for `name` in `cache_dir` (default ~/.cache/jaxkd), downloading it first
  when absent: streamed to a temporary file in the cache, sha256-checked against the hash prefix in
  torchvision's file name, then renamed into place (a failed download leaves nothing behind)."""
  url = torchvision_url(name, weights)
  cache = pathlib.Path(os.path.expanduser(os.fspath(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)))
  target = cache / url.rsplit("/", 1)[-1]
  if target.is_file():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  hash_prefix = re.search(r"-([0-9a-f]{8,})\.", target.name)
  logger.warning("downloading %s to %s", url, target)
  fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name + ".", suffix=".partial")
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
    if hash_prefix and not digest.hexdigest().startswith(hash_prefix[1]):
      raise OSError(f"download of {url} is corrupt: its sha256 is {digest.hexdigest()}, the file name says it "
                    f"starts with {hash_prefix[1]}; nothing was saved, try again")
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return target

# ------------------------------------------------------------------------------------------- entry point


def load_pretrained(name: str, path: str | os.PathLike, *, num_classes: int, strict: bool = True, rng: Any = 0,
                    model_kwargs: Optional[Mapping[str, Any]] = None, cache_dir: Optional[str | os.PathLike] = None,
                    return_report: bool = False) -> Any:
  """Flax variables {'params', 'batch_stats'} (NumPy float32) of model `name` from a PyTorch checkpoint.

  `path`: a .safetensors / .pth / .pt file, or 'torchvision' ('torchvision:IMAGENET1K_V2') for torchvision's
  official ImageNet weights, downloaded into `cache_dir` (a .pth, read without torch).
  `model_kwargs` go to `jaxkd.models.create` (e.g. {'attention': 'eca'}). Returns the variables, or
  (variables, ConversionReport) with `return_report=True`. Raises CheckpointMismatchError (listing every
  unexpected, missing or mis-shaped key) unless `strict=False`.
  """
  spec = os.fspath(path)
  if spec == "torchvision" or spec.startswith("torchvision:"):
    weights = spec.partition(":")[2] or "IMAGENET1K_V1"
    spec = os.fspath(download_pretrained(name, weights=weights, cache_dir=cache_dir))
  variables, report = convert_state_dict(name, read_checkpoint(spec), num_classes=num_classes, strict=strict,
                                         rng=rng, source=repr(spec), model_kwargs=model_kwargs)
  return (variables, report) if return_report else variables
