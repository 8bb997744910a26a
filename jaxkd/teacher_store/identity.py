"""A teacher's identity: a hash of its variables, and the id its stores are filed under."""
from __future__ import annotations

import hashlib
import re

import jax
import numpy as np


def _path_entry(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def params_sha256(variables) -> str:
  """sha256 (hex) of a parameter pytree, independent of dict ordering and container types.

  Leaves are sorted by their path ('params/Dense_0/kernel'); for each leaf the
  hash absorbs the path, dtype name, shape and the C-order little-endian bytes.
  Every collection passed in counts (pass `{'params': ..., 'batch_stats': ...}`:
  BatchNorm statistics change eval outputs, so they belong to the teacher's identity).
  """
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  if not leaves:
    raise ValueError("params_sha256: the variables pytree has no leaves; pass the teacher's "
                     "variables ({'params': ..., 'batch_stats': ...})")
  items = []
  for path, leaf in leaves:
    items.append(("/".join(_path_entry(e) for e in path), np.asarray(leaf)))
  items.sort(key=lambda kv: kv[0])
  paths = [p for p, _ in items]
  if len(set(paths)) != len(paths):
    raise ValueError("params_sha256: two leaves share a path; cannot hash the pytree "
                     "unambiguously")
  h = hashlib.sha256()
  for path, arr in items:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    h.update(f"{path}|{arr.dtype.name}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def teacher_id(model_name: str, variables, *, digits: int = 12) -> str:
  """'<model_name>-<first `digits` hex of params_sha256(variables)>'.

  For example 'resnet50-3fa2c9d01b7e'; the id names the teacher's store folder.
  """
  if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
    raise ValueError(f"teacher_id: model_name {model_name!r} must be a non-empty name of letters, "
                     "digits, '_', '.', '+', '-' (it becomes a folder name)")
  if not 4 <= digits <= 64:
    raise ValueError(f"teacher_id: digits must be in [4, 64], got {digits}")
  return f"{model_name}-{params_sha256(variables)[:digits]}"
