"""Reading a store: `TeacherStore.open` validates a complete store; rows are read by key.

NumPy only: the tf.data join of the stored logits is `jaxkd.data.teacher_logits.tf_lookup`.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxkd.teacher_store import layout
from jaxkd.teacher_store.layout import TeacherStoreError

_REQUIRED = {
    "format": str, "format_version": int, "dataset": str, "version": str, "split": str,
    "num_examples": int, "num_classes": int, "teacher_id": str, "preprocessing": dict,
    "dtype": str, "created": str, "files": dict, "manifest_sha256": str,
}


class TeacherStore:
  """A complete, validated teacher-logit store (open it with `TeacherStore.open`).

  Attributes:
    path: the store folder. manifest: the parsed manifest.json.
    logits: read-only np.memmap [N, C] in the stored dtype (row i belongs to keys[i]).
    keys: list of N example keys (str) in row order.
  """

  def __init__(self, path: pathlib.Path, manifest: dict, logits: np.ndarray, keys: list[str]):
    self.path = path
    self.manifest = manifest
    self.logits = logits
    self.keys = keys
    self._index: dict[str, int] | None = None

  # -- opening and validation

  @classmethod
  def open(cls, store_dir: layout.PathLike, *, expect: Mapping[str, Any] | None = None,
           verify: bool = True, hint: str | None = None) -> TeacherStore:
    """Opens a complete store, refusing anything unfinished, inconsistent or unexpected.

    Checks, in order: the folder is final (not '*.partial', not missing, has manifest.json); the
    manifest parses and has every field; the folder names (when laid out as
    <dataset>/<version>/teacher_logits/<teacher_id>/<split>) match the manifest; logits.npy's
    shape and dtype match num_examples/num_classes/dtype; the manifest's own hash (edits); the
    `expect`ed fields (any of EXPECTABLE_FIELDS: dataset, version, split, num_examples,
    num_classes, class_names, teacher_id, preprocessing, dtype); keys.txt's sha256, count and
    uniqueness; and, when `verify` (default; O(file size) read), logits.npy's sha256. Every
    refusal is a TeacherStoreError naming the field or file, both values, and what to do.
    """
    path = pathlib.Path(store_dir)
    fail = layout.store_error
    if path.name.endswith(layout.PARTIAL_SUFFIX):
      raise TeacherStoreError(
          f"teacher store {path}: this is an unfinished precompute (a "
          f"'{layout.PARTIAL_SUFFIX}' folder), not a store. To fix: rerun precompute with the "
          f"same arguments to resume and finish it, or delete {path}.")
    if not path.is_dir():
      partial = layout.partial_path(path)
      if partial.exists():
        raise TeacherStoreError(
            f"teacher store {path}: not complete, an interrupted precompute left {partial}. To "
            f"fix: rerun precompute with the same arguments to resume it, or delete {partial} "
            "and recompute.")
      raise TeacherStoreError(f"teacher store {path}: no such folder. To fix: "
                              f"{hint or layout.DEFAULT_HINT}.")
    manifest_path = path / layout.MANIFEST_FILE
    if not manifest_path.is_file():
      raise fail(path, "has no manifest.json, so it is unfinished or not a teacher store", hint)
    try:
      manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise fail(path, f"manifest.json is not valid JSON ({e})", hint) from e
    if not isinstance(manifest, dict):
      raise fail(path, "manifest.json is not a JSON object", hint)

    for field, kind in _REQUIRED.items():
      if field not in manifest:
        raise fail(path, f"manifest.json lacks the field {field!r}", hint)
      value = manifest[field]
      if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(path, f"manifest field {field!r} is {value!r}, expected a {kind.__name__}",
                   hint)
    if manifest["format"] != layout.FORMAT:
      raise fail(path, f"manifest field 'format' is {manifest['format']!r}, expected "
                 f"{layout.FORMAT!r}", hint)
    if manifest["format_version"] != layout.FORMAT_VERSION:
      raise fail(path, f"manifest field 'format_version' is {manifest['format_version']!r}, "
                 f"this jaxkd reads {layout.FORMAT_VERSION}", hint)
    if manifest["dtype"] not in layout.STORE_DTYPES:
      raise fail(path, f"manifest field 'dtype' is {manifest['dtype']!r}, expected one of "
                 f"{layout.STORE_DTYPES}", hint)
    n, c = manifest["num_examples"], manifest["num_classes"]

    # Folder names are a second record of the identity fields.
    parents = path.resolve().parents
    if len(parents) >= 4 and parents[1].name == "teacher_logits":
      try:
        expected_split_folder = layout.split_folder(
            manifest["split"], manifest["preprocessing"]
            if isinstance(manifest["preprocessing"], dict) else None)
      except (ValueError, TypeError, KeyError) as e:
        raise fail(path, f"manifest fields 'split' / 'preprocessing' do not name a store folder "
                   f"({e})", hint) from None
      for field, folder, want in (
          ("split", path.resolve().name, expected_split_folder),
          ("teacher_id", parents[0].name, manifest["teacher_id"]),
          ("version", parents[2].name, manifest["version"]),
          ("dataset", parents[3].name, manifest["dataset"])):
        if want != folder:
          raise fail(path, f"manifest field {field!r} is {manifest[field]!r} but the store's "
                     f"folder says {folder!r}, not {want!r} (the manifest was edited or the "
                     "folder moved)", hint)

    files = manifest["files"]
    for name, default in (("logits", layout.LOGITS_FILE), ("keys", layout.KEYS_FILE)):
      entry = files.get(name)
      if (not isinstance(entry, dict) or entry.get("name") != default
          or not isinstance(entry.get("sha256"), str)):
        raise fail(path, f"manifest field 'files.{name}' is {entry!r}, expected name "
                   f"{default!r} and a sha256", hint)
    logits_path, keys_path = path / layout.LOGITS_FILE, path / layout.KEYS_FILE
    for p in (logits_path, keys_path):
      if not p.is_file():
        raise fail(path, f"{p.name} is missing", hint)
    try:
      logits = np.load(logits_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise fail(path, f"logits.npy cannot be read as a .npy array ({e}); it is truncated or "
                 "corrupted", hint) from e
    if logits.ndim != 2 or logits.shape[0] != n:
      raise fail(path, f"manifest field 'num_examples' is {n} but logits.npy has shape "
                 f"{logits.shape}", hint)
    if logits.shape[1] != c:
      raise fail(path, f"manifest field 'num_classes' is {c} but logits.npy has shape "
                 f"{logits.shape}", hint)
    if logits.dtype != np.dtype(manifest["dtype"]):
      raise fail(path, f"manifest field 'dtype' is {manifest['dtype']!r} but logits.npy holds "
                 f"{logits.dtype}", hint)
    if files["logits"].get("shape") != [n, c]:
      raise fail(path, f"manifest field 'files.logits.shape' is "
                 f"{files['logits'].get('shape')!r}, expected {[n, c]}", hint)
    class_names = manifest.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != c):
      raise fail(path, f"manifest field 'class_names' is {class_names!r}, expected a list of "
                 f"num_classes={c} names or null", hint)

    digest = layout.manifest_digest(manifest)
    if digest != manifest["manifest_sha256"]:
      raise fail(path, f"manifest.json was modified after it was written: its content hash is "
                 f"{digest[:16]}..., the recorded manifest_sha256 is "
                 f"{manifest['manifest_sha256'][:16]}...", hint)

    if expect:
      _check_expected(path, manifest, expect, hint)

    keys_blob = keys_path.read_bytes()
    keys_sha = hashlib.sha256(keys_blob).hexdigest()
    if keys_sha != files["keys"]["sha256"]:
      raise fail(path, f"keys.txt checksum mismatch: sha256 is {keys_sha[:16]}..., the manifest "
                 f"records {files['keys']['sha256'][:16]}... (the keys file was modified or "
                 "corrupted)", hint)
    try:
      keys = keys_blob.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
      raise fail(path, f"keys.txt is not UTF-8 ({e})", hint) from e
    if len(keys) != n:
      raise fail(path, f"keys.txt has {len(keys)} keys, manifest field 'num_examples' is {n}",
                 hint)
    if len(set(keys)) != n:
      raise fail(path, f"keys.txt has {n - len(set(keys))} duplicate keys", hint)

    if verify:
      logits_sha = layout.file_sha256(logits_path)
      if logits_sha != files["logits"]["sha256"]:
        raise fail(path, f"logits.npy checksum mismatch: sha256 is {logits_sha[:16]}..., the "
                   f"manifest records {files['logits']['sha256'][:16]}... (the array was "
                   "modified or corrupted)", hint)
    return cls(path, manifest, logits, keys)

  # -- numpy access

  @property
  def num_examples(self) -> int:
    return int(self.manifest["num_examples"])

  @property
  def num_classes(self) -> int:
    return int(self.manifest["num_classes"])

  @property
  def teacher_id(self) -> str:
    return self.manifest["teacher_id"]

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    m = self.manifest
    return (f"TeacherStore({str(self.path)!r}, dataset={m['dataset']!r}, split={m['split']!r}, "
            f"teacher_id={m['teacher_id']!r}, shape={tuple(self.logits.shape)}, "
            f"dtype={m['dtype']})")

  def index(self, key: str | bytes) -> int:
    """Row of `key`; KeyError (naming the key and the store) when it is not stored."""
    if self._index is None:
      self._index = {k: i for i, k in enumerate(self.keys)}
    k = key.decode("utf-8") if isinstance(key, (bytes, np.bytes_)) else str(key)
    try:
      return self._index[k]
    except KeyError:
      raise KeyError(
          f"example key {k!r} is not in the teacher store {self.path} "
          f"({self.manifest['dataset']} {self.manifest['split']}, {self.num_examples} keys); the "
          f"data and the store disagree: {layout.DEFAULT_HINT} for this split") from None

  def row(self, key: str | bytes) -> np.ndarray:
    """float32 [num_classes] logits of `key`."""
    return np.asarray(self.logits[self.index(key)], dtype=np.float32)

  def rows(self, keys: Iterable[str | bytes]) -> np.ndarray:
    """float32 [len(keys), num_classes]."""
    idx = np.asarray([self.index(k) for k in keys], dtype=np.int64)
    return np.asarray(self.logits[idx], dtype=np.float32).reshape(len(idx), self.num_classes)


def _check_expected(path: pathlib.Path, manifest: dict, expect: Mapping[str, Any],
                    hint: str | None) -> None:
  """Refuses a store whose manifest differs from the caller's `expect`ed fields."""
  unknown = sorted(set(expect) - set(layout.EXPECTABLE_FIELDS))
  if unknown:
    raise ValueError(f"TeacherStore.open: cannot check expect fields {unknown}; known: "
                     f"{layout.EXPECTABLE_FIELDS}")
  for field in layout.EXPECTABLE_FIELDS:
    if field not in expect:
      continue
    want = expect[field]
    if field in ("preprocessing", "class_names") and want is not None:
      want = json.loads(layout.canonical_json(want if field == "preprocessing" else list(want)))
    have = manifest.get(field)
    if have != want:
      detail = ""
      if isinstance(have, dict) and isinstance(want, dict):
        diff = [f"{k}: store {have.get(k, '<absent>')!r} vs expected {want.get(k, '<absent>')!r}"
                for k in sorted(set(have) | set(want)) if have.get(k, ...) != want.get(k, ...)]
        detail = f" ({'; '.join(diff)})"
      raise layout.store_error(path, f"field {field!r} differs{detail}: the store has {have!r}, "
                               f"the caller expects {want!r}", hint)
