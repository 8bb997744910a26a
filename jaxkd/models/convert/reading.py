"""Reading checkpoints: a .safetensors file or a PyTorch pickle (``read_checkpoint``) as a flat
{torch key: NumPy array}, without torch, and checking up front that one can be read
(``check_pretrained_readable``)."""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd.models import torch_pickle
from jaxkd.models.convert.download import TORCHVISION_URLS, torchvision_url

_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(obj: Any, source: str) -> Mapping[str, Any]:
  """The flat state dict inside `obj`, descending through
  {'state_dict' | 'model_state_dict' | 'model' | 'module'}."""
  for _ in range(len(_WRAPPER_KEYS) + 1):
    if not isinstance(obj, Mapping):
      raise ValueError(f"checkpoint {source}: expected a state dict (a mapping of names to "
                       f"tensors), found {type(obj).__name__}")
    if any(_is_array(v) for v in obj.values()):
      break
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise ValueError(f"checkpoint {source}: no tensors at the top level and none of the wrapper "
                       f"keys {list(_WRAPPER_KEYS)}; top-level keys: {sorted(map(str, obj))[:20]}")
    obj = inner
  not_arrays = sorted(str(k) for k, v in obj.items() if not _is_array(v))
  if not_arrays:
    raise ValueError(f"checkpoint {source}: entries {not_arrays[:20]} are not tensors; expected a "
                     "flat state dict, possibly wrapped as {'state_dict': ...} or {'model': ...}")
  return obj


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat {torch key: NumPy array} of a .safetensors file or a PyTorch pickle
  (.pth/.pt/.pth.tar/.bin/.ckpt).

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
    return {str(k): v for k, v in unwrap_state_dict(torch_pickle.load(path), repr(path)).items()}
  raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors or a PyTorch pickle "
                   f"({', '.join(_TORCH_SUFFIXES)})")


def _check_safetensors_header(path: str) -> None:
  """Raises ValueError unless `path` starts like a .safetensors file (header length, JSON
  header)."""
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


def check_pretrained_readable(spec: str | os.PathLike, model: str | None = None) -> None:
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
    from jaxkd.models.convert.naming import family_of  # naming imports this module
    from jaxkd.models.registry import create
    try:
      family_of(model, create(model, num_classes=1000))  # constructs the module only: no compute
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
        raise ValueError(f"pretrained checkpoint {spec!r}: torchvision has no weights "
                         f"{weights!r}; choose one of {known} (as 'torchvision:NAME')")
    return
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise ValueError(f"pretrained checkpoint {spec!r} is not a file: give a .safetensors or "
                     f"PyTorch ({', '.join(_TORCH_SUFFIXES)}) checkpoint, or 'torchvision' / "
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
