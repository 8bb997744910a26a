"""The teacher-logit store's on-disk format: folders, file names, manifest, checksums.

Layout (next to the TFDS data)::

  <data_dir>/<dataset>/<version>/teacher_logits/<teacher_id>/<split>/
    logits.npy      float16 or float32 [N, num_classes], row i <-> keys.txt line i
    keys.txt        UTF-8, one example key per line ('apple_pie/1005649')
    manifest.json   see below; written last
  <...>/<split>.partial/   an unfinished (resumable) precompute: never opened
  <...>/<split>.regions-<R>-<hex>/   a region store (R rows per example, keyed '<key>#<r>'; see
                           jaxkd.data.regions), same files; its manifest's 'preprocessing' says
                           {'mode': 'regions', 'regions_per_image': R, ...}

manifest.json (format_version 1)::

  {"format": "jaxkd.teacher_logits", "format_version": 1,
   "dataset": str, "version": str, "split": str,
   "num_examples": N, "num_classes": C, "class_names": [str] * C | null,
   "teacher_id": "<model>-<12 hex>", "teacher_info": {...} | null,
   "preprocessing": {...}, "dtype": "float16" | "float32",
   "created": ISO-8601 UTC time,
   "files": {"logits": {"name": "logits.npy", "shape": [N, C], "bytes": int,
                        "sha256": hex},
             "keys": {"name": "keys.txt", "encoding": "utf-8", "count": N, "bytes": int,
                      "sha256": hex}},
   "manifest_sha256": sha256 of the canonical JSON (sorted keys, no spaces) of all the other
                      fields}

`manifest_sha256` makes accidental edits of the manifest detectable; it is an
integrity check, not a security measure (anyone can recompute it).

The helpers below (checksums, atomic JSON writes, key checks, error messages) are shared by
the writer (`jaxkd.teacher_store.writer`) and the reader (`jaxkd.teacher_store.reader`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "jaxkd.teacher_logits"
FORMAT_VERSION = 1
LOGITS_FILE = "logits.npy"
KEYS_FILE = "keys.txt"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"
STORE_DTYPES = ("float16", "float32")
# Fields a caller may pin in `TeacherStore.open(expect=...)`.
EXPECTABLE_FIELDS = ("dataset", "version", "split", "num_examples", "num_classes", "class_names",
                     "teacher_id", "preprocessing", "dtype")
DEFAULT_HINT = ("re-run the teacher-logit precompute stage (jaxkd.teacher_store.precompute, i.e. "
                "the pipeline's teacher-logits step) with the intended teacher and data")

PathLike = str | os.PathLike


class TeacherStoreError(ValueError):
  """A teacher-logit store is missing, unfinished, corrupted or not the one the caller expects."""


# ----------------------------------------------------------------------------- paths


def check_component(field: str, value) -> str:
  """`value` when it can be a folder name of the layout; ValueError naming `field` otherwise."""
  if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value
      or "\\" in value or "\x00" in value or value.startswith(".")
      or value.endswith(PARTIAL_SUFFIX)):
    raise ValueError(f"{field} {value!r} cannot be used as a folder name: give a non-empty string "
                     f"without '/', not starting with '.' and not ending in {PARTIAL_SUFFIX!r}")
  return value


def stores_root(data_dir: PathLike, dataset: str, version: str) -> pathlib.Path:
  """<data_dir>/<dataset>/<version>/teacher_logits: the stores of every teacher of one dataset."""
  for field, value in (("dataset", dataset), ("version", version)):
    check_component(field, value)
  return pathlib.Path(data_dir) / dataset / version / "teacher_logits"


def store_path(data_dir: PathLike, dataset: str, version: str, teacher_id: str,
               split: str, preprocessing: Mapping[str, Any] | None = None) -> pathlib.Path:
  """<data_dir>/<dataset>/<version>/teacher_logits/<teacher_id>/<split folder> (the final store
  folder; `split_folder(split, preprocessing)`: the split, or a region store's own folder)."""
  root = stores_root(data_dir, dataset, version)
  check_component("teacher_id", teacher_id)
  return root / teacher_id / split_folder(split, preprocessing)


def split_folder(split: str, preprocessing: Mapping[str, Any] | None = None) -> str:
  """The folder name of a split's store: the split, or '<split>.regions-<R>-<8 hex>' for a region
  store (preprocessing {'mode': 'regions', 'regions_per_image': R, ...}, jaxkd.data.regions),
  which sits beside the split's per-image store; the hex digits are the sha256 of the canonical
  JSON of its preprocessing, so stores of other crops or sizes live side by side."""
  check_component("split", split)
  if preprocessing and preprocessing.get("mode") == "regions":
    digest = hashlib.sha256(canonical_json(dict(preprocessing)).encode()).hexdigest()[:8]
    return f"{split}.regions-{int(preprocessing['regions_per_image'])}-{digest}"
  return split


def partial_path(store_dir: PathLike) -> pathlib.Path:
  """The sibling '<split>.partial' folder an unfinished precompute writes into."""
  store_dir = pathlib.Path(store_dir)
  return store_dir.with_name(store_dir.name + PARTIAL_SUFFIX)


# ----------------------------------------------------------------------------- checksums, files


def file_sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
  """sha256 (hex) of a file's bytes, read in chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        break
      h.update(block)
  return h.hexdigest()


def canonical_json(obj) -> str:
  """The JSON text the manifest hash and the resume signature are taken over."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
  """sha256 (hex) of the canonical JSON of every manifest field but `manifest_sha256`."""
  body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json_atomic(path: pathlib.Path, obj) -> None:
  """Writes `obj` as JSON to `path` durably: a temporary file, fsync, rename, fsync the folder."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(path.parent)


def as_key(value) -> str:
  """An example key as str; TeacherStoreError when it cannot be one line of keys.txt."""
  if isinstance(value, (bytes, np.bytes_)):
    key = bytes(value).decode("utf-8")
  elif isinstance(value, (str, np.str_)):
    key = str(value)
  else:
    raise TeacherStoreError(f"example key {value!r} has type {type(value).__name__}; keys must be "
                            "str or UTF-8 bytes")
  if not key or "\n" in key or "\r" in key:
    raise TeacherStoreError(f"example key {key!r} is empty or contains a line break; keys.txt "
                            "stores one key per line")
  return key


def store_error(store_dir, message: str, hint: str | None) -> TeacherStoreError:
  """The error for a store that cannot be used: what is wrong, then how to fix it."""
  if hint:  # the caller knows the command that recomputes the store
    return TeacherStoreError(f"teacher store {store_dir}: {message}. To fix: {hint}.")
  return TeacherStoreError(f"teacher store {store_dir}: {message}. To fix: {DEFAULT_HINT}, or "
                           f"delete {store_dir} and recompute it.")
