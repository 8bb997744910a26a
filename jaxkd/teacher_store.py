"""Precomputed teacher logits, stored beside the data set and read back by key.

Offline distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"; the Food-101 pipeline of REFERENCE.md section 1) runs the teacher once
over the training images and lets the student read the stored logits instead
of running the teacher every step. Beyer et al. (CVPR 2022, "Knowledge
distillation: A good teacher is patient and consistent") show that fixed
logits are inconsistent with random crops, so these logits are computed with
*eval* preprocessing (recorded in the manifest) and are the cheap baseline, not
the strongest recipe.

Layout (next to the TFDS data)::

  <data_dir>/<dataset>/<version>/teacher_logits/<teacher_id>/<split>/
    logits.npy      float16 or float32 [N, num_classes], row i <-> keys.txt line i
    keys.txt        UTF-8, one example key per line ('apple_pie/1005649')
    manifest.json   see below; written last
  <...>/<split>.partial/   an unfinished (resumable) precompute: never opened

manifest.json (format_version 1)::

  {"format": "jaxkd.teacher_logits", "format_version": 1,
   "dataset": str, "version": str, "split": str,
   "num_examples": N, "num_classes": C, "class_names": [str] * C | null,
   "teacher_id": "<model>-<12 hex>", "teacher_info": {...} | null,
   "preprocessing": {...}, "dtype": "float16" | "float32",
   "created": ISO-8601 UTC time,
   "files": {"logits": {"name": "logits.npy", "shape": [N, C], "bytes": int, "sha256": hex},
             "keys": {"name": "keys.txt", "encoding": "utf-8", "count": N, "bytes": int, "sha256": hex}},
   "manifest_sha256": sha256 of the canonical JSON (sorted keys, no spaces) of all the other fields}

`manifest_sha256` makes accidental edits of the manifest detectable; it is an
integrity check, not a security measure (anyone can recompute it).

Memory cost of `TeacherStore.tf_lookup` (default backend 'memory'): the whole
array is held in host RAM as a tf.Variable in its stored dtype (float16 stays
float16; rows are cast to float32 after the gather), plus a string hash table.
Food-101 train (75,750 x 101, float16): 15 MB. ImageNet-1k train
(1,281,167 x 1000, float16): 2.56 GB of logits plus roughly 0.2 GB of keys per
host process; this is the default because a gather from RAM costs nothing next
to JPEG decoding. Where that RAM is not available, open the store with
`tf_backend='mmap'`: rows are then read from the memory-mapped file through
`tf.numpy_function` (no copy in RAM beyond the OS page cache; one Python call per
map call, so map it on *batched* keys).
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import jax
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
DEFAULT_HINT = ("re-run the teacher-logit precompute stage (jaxkd.teacher_store.precompute, i.e. the "
                "pipeline's teacher-logits step) with the intended teacher and data")

Batch = Mapping[str, Any]
BatchSource = Union[Callable[[int], Iterable[Batch]], Iterable[Batch]]
PathLike = Union[str, os.PathLike]


class TeacherStoreError(ValueError):
  """A teacher-logit store is missing, unfinished, corrupted or not the one the caller expects."""


# ----------------------------------------------------------------------------- teacher identity


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
    raise ValueError("params_sha256: the variables pytree has no leaves; pass the teacher's variables "
                     "({'params': ..., 'batch_stats': ...})")
  items = []
  for path, leaf in leaves:
    items.append(("/".join(_path_entry(e) for e in path), np.asarray(leaf)))
  items.sort(key=lambda kv: kv[0])
  paths = [p for p, _ in items]
  if len(set(paths)) != len(paths):
    raise ValueError("params_sha256: two leaves share a path; cannot hash the pytree unambiguously")
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
  """'<model_name>-<first `digits` hex of params_sha256(variables)>', e.g. 'resnet50-3fa2c9d01b7e'."""
  if not isinstance(model_name, str) or not _NAME_RE.match(model_name):
    raise ValueError(f"teacher_id: model_name {model_name!r} must be a non-empty name of letters, digits, "
                     "'_', '.', '+', '-' (it becomes a folder name)")
  if not 4 <= digits <= 64:
    raise ValueError(f"teacher_id: digits must be in [4, 64], got {digits}")
  return f"{model_name}-{params_sha256(variables)[:digits]}"


# ----------------------------------------------------------------------------- paths and helpers


def _check_component(field: str, value) -> str:
  if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value
      or "\x00" in value or value.startswith(".") or value.endswith(PARTIAL_SUFFIX)):
    raise ValueError(f"{field} {value!r} cannot be used as a folder name: give a non-empty string without "
                     f"'/', not starting with '.' and not ending in {PARTIAL_SUFFIX!r}")
  return value


def stores_root(data_dir: PathLike, dataset: str, version: str) -> pathlib.Path:
  """<data_dir>/<dataset>/<version>/teacher_logits: the stores of every teacher of one dataset."""
  for field, value in (("dataset", dataset), ("version", version)):
    _check_component(field, value)
  return pathlib.Path(data_dir) / dataset / version / "teacher_logits"


def store_path(data_dir: PathLike, dataset: str, version: str, teacher_id: str, split: str) -> pathlib.Path:
  """<data_dir>/<dataset>/<version>/teacher_logits/<teacher_id>/<split> (the final store folder)."""
  root = stores_root(data_dir, dataset, version)
  for field, value in (("teacher_id", teacher_id), ("split", split)):
    _check_component(field, value)
  return root / teacher_id / split


def partial_path(store_dir: PathLike) -> pathlib.Path:
  """The sibling '<split>.partial' folder an unfinished precompute writes into."""
  store_dir = pathlib.Path(store_dir)
  return store_dir.with_name(store_dir.name + PARTIAL_SUFFIX)


def _file_sha256(path: pathlib.Path, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        break
      h.update(block)
  return h.hexdigest()


def _canonical(obj) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
  body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_json_atomic(path: pathlib.Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(path.parent)


def _as_key(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    key = bytes(value).decode("utf-8")
  elif isinstance(value, (str, np.str_)):
    key = str(value)
  else:
    raise TeacherStoreError(f"example key {value!r} has type {type(value).__name__}; keys must be str or "
                            "UTF-8 bytes")
  if not key or "\n" in key or "\r" in key:
    raise TeacherStoreError(f"example key {key!r} is empty or contains a line break; keys.txt stores one "
                            "key per line")
  return key


def _fail(store_dir, message: str, hint: str | None) -> TeacherStoreError:
  if hint:  # the caller knows the command that recomputes the store
    return TeacherStoreError(f"teacher store {store_dir}: {message}. To fix: {hint}.")
  return TeacherStoreError(f"teacher store {store_dir}: {message}. To fix: {DEFAULT_HINT}, or delete "
                           f"{store_dir} and recompute it.")


# ----------------------------------------------------------------------------- precompute


def _signature(**fields) -> dict:
  """The run configuration a resumed precompute must match."""
  return json.loads(_canonical(fields))


def precompute(
    batches: BatchSource,
    apply_fn: Callable[[Any], Any],
    *,
    dataset: str,
    version: str,
    split: str,
    teacher_id: str,
    num_examples: int,
    num_classes: int,
    preprocessing: Mapping[str, Any],
    store_dir: PathLike | None = None,
    data_dir: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    teacher_info: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    flush_every: int = 20,
    overwrite: bool = False,
    verify_existing: bool = True,
    progress: bool = True,
    hint: str | None = None,
) -> "TeacherStore":
  """Runs the teacher over a split once and stores its logits; resumable; returns the opened store.

  Args:
    batches: the eval batches, numpy dicts {'image': [B, H, W, 3], 'key': [B] str/bytes, 'weight': [B]
      (1 real, 0 padding; optional: all real when absent)}, in a deterministic order. Either a factory
      `batches(start_batch) -> iterable` that starts at batch `start_batch` (preferred: a resumed run
      then skips finished batches without decoding their images) or a plain re-iterable (finished
      batches are then read again and dropped unseen by the teacher).
    apply_fn: `apply_fn(images) -> logits [B, num_classes]`; the caller's jitted (data-parallel)
      teacher forward pass in eval mode. It is never called on a batch with no real rows.
    dataset, version, split, teacher_id: identify the store (folder names and manifest fields).
    num_examples: N, the number of real examples the source yields; exactly N must arrive.
    num_classes: C. preprocessing: the eval preprocessing used (dict, recorded and checked on open).
    store_dir / data_dir: the final folder, or the TFDS data_dir to place it at
      `store_path(data_dir, dataset, version, teacher_id, split)` (give exactly one).
    class_names, teacher_info: optional manifest entries (teacher_info: free-form JSON dict, e.g.
      the checkpoint path and its accuracy).
    dtype: 'float16' (default; halves the size, logits are O(10)) or 'float32'.
    flush_every: progress (memmap, keys, then rows-done record) is made durable every this many
      batches; on an exception (KeyboardInterrupt included) all finished batches are flushed first.
    overwrite: an existing complete store (and any partial one) is deleted and recomputed; otherwise
      an existing complete store is opened (checked against these arguments) and returned as is.
    verify_existing: verify the array checksum when returning an existing store.
    progress: show a tqdm bar. hint: what error messages tell the user to run.

  Writes into `<split>.partial/` (preallocated `logits.npy` memmap, `keys.txt` appended, and
  `progress.json` {batches_done, rows_done, keys_bytes, signature}); at the end checks that exactly
  N rows with unique keys were written, adds checksums and the manifest, and renames the folder to
  its final name (atomic), so a half-written store is never taken for a complete one.
  """
  if (store_dir is None) == (data_dir is None):
    raise ValueError("precompute: give exactly one of store_dir= or data_dir= (got "
                     f"store_dir={store_dir!r}, data_dir={data_dir!r})")
  for field, value in (("dataset", dataset), ("version", version), ("teacher_id", teacher_id), ("split", split)):
    _check_component(field, value)
  final = pathlib.Path(store_dir) if store_dir is not None else store_path(data_dir, dataset, version,
                                                                            teacher_id, split)
  _check_component("store_dir name", final.name)
  if dtype not in STORE_DTYPES:
    raise ValueError(f"precompute: dtype {dtype!r} is not one of {STORE_DTYPES}")
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"precompute: num_examples must be a positive int, got {num_examples!r}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"precompute: num_classes must be a positive int, got {num_classes!r}")
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
      raise ValueError(f"precompute: {len(class_names)} class_names given for num_classes={num_classes}")
  if not isinstance(preprocessing, Mapping):
    raise ValueError(f"precompute: preprocessing must be a dict, got {type(preprocessing).__name__}")
  if flush_every < 1:
    raise ValueError(f"precompute: flush_every must be >= 1, got {flush_every}")
  num_examples, num_classes = int(num_examples), int(num_classes)
  try:
    signature = _signature(dataset=dataset, version=version, split=split, teacher_id=teacher_id,
                           num_examples=num_examples, num_classes=num_classes, dtype=dtype,
                           class_names=class_names, preprocessing=dict(preprocessing),
                           teacher_info=None if teacher_info is None else dict(teacher_info))
  except (TypeError, ValueError) as e:
    raise ValueError(f"precompute: preprocessing/teacher_info must be JSON-serialisable dicts: {e}") from e
  expect = {k: signature[k] for k in EXPECTABLE_FIELDS}

  partial = partial_path(final)
  if overwrite:
    for path in (final, partial):
      if path.exists():
        shutil.rmtree(path)
  elif final.exists():
    return TeacherStore.open(final, expect=expect, verify=verify_existing, hint=hint)

  writer = _PartialWriter(partial, signature, hint)
  try:
    writer.run(batches, apply_fn, flush_every=flush_every, progress=progress)
  finally:
    writer.close()
  writer.finalize(final)
  return TeacherStore.open(final, expect=expect, verify=False, hint=hint)


class _PartialWriter:
  """The resumable state of one precompute in a '<split>.partial' folder."""

  def __init__(self, partial: pathlib.Path, signature: dict, hint: str | None):
    self.dir = partial
    self.signature = signature
    self.hint = hint
    self.n = signature["num_examples"]
    self.c = signature["num_classes"]
    self.dtype = np.dtype(signature["dtype"])
    progress_file = partial / PROGRESS_FILE
    if partial.exists() and not progress_file.exists():
      # Died before its first progress record: nothing in it is usable.
      shutil.rmtree(partial)
    if partial.exists():
      self._resume()
    else:
      self._create()

  def _create(self) -> None:
    self.dir.parent.mkdir(parents=True, exist_ok=True)
    self.dir.mkdir()
    self.logits = np.lib.format.open_memmap(self.dir / LOGITS_FILE, mode="w+", dtype=self.dtype,
                                            shape=(self.n, self.c))
    self.keys_f = open(self.dir / KEYS_FILE, "wb")
    self.batches_done = self.rows_done = self.keys_bytes = 0
    self.seen: set[str] = set()
    self.flush()

  def _resume(self) -> None:
    with open(self.dir / PROGRESS_FILE) as f:
      record = json.load(f)
    old = record.get("signature", {})
    for field in sorted(set(old) | set(self.signature)):
      if old.get(field) != self.signature.get(field):
        raise TeacherStoreError(
            f"cannot resume the unfinished precompute in {self.dir}: it was started with {field}="
            f"{old.get(field)!r}, this run has {field}={self.signature.get(field)!r}. To fix: delete "
            f"{self.dir} to start over (or pass overwrite=True), or rerun with the original arguments.")
    self.batches_done = int(record["batches_done"])
    self.rows_done = int(record["rows_done"])
    self.keys_bytes = int(record["keys_bytes"])
    self.logits = np.lib.format.open_memmap(self.dir / LOGITS_FILE, mode="r+")
    if self.logits.shape != (self.n, self.c) or self.logits.dtype != self.dtype:
      raise _fail(self.dir, f"partial logits.npy has shape {self.logits.shape} {self.logits.dtype}, expected "
                  f"{(self.n, self.c)} {self.dtype}", self.hint)
    keys_path = self.dir / KEYS_FILE
    if keys_path.stat().st_size < self.keys_bytes:
      raise _fail(self.dir, f"partial keys.txt has {keys_path.stat().st_size} bytes, progress.json records "
                  f"{self.keys_bytes}", self.hint)
    self.keys_f = open(keys_path, "r+b")
    self.keys_f.truncate(self.keys_bytes)  # drop keys written after the last progress record
    self.keys_f.seek(0)
    done = self.keys_f.read().decode("utf-8").splitlines()
    self.keys_f.seek(self.keys_bytes)
    if len(done) != self.rows_done:
      raise _fail(self.dir, f"partial keys.txt holds {len(done)} keys, progress.json records {self.rows_done} "
                  "rows", self.hint)
    self.seen = set(done)

  def flush(self) -> None:
    """Data first (memmap, keys), then the record that says it is there."""
    self.logits.flush()
    self.keys_f.flush()
    os.fsync(self.keys_f.fileno())
    _write_json_atomic(self.dir / PROGRESS_FILE, {
        "batches_done": self.batches_done, "rows_done": self.rows_done, "keys_bytes": self.keys_bytes,
        "signature": self.signature})

  def close(self) -> None:
    if getattr(self, "keys_f", None) is not None and not self.keys_f.closed:
      self.keys_f.close()
    if getattr(self, "logits", None) is not None:
      self.logits.flush()
      del self.logits
      self.logits = None

  def _prepare(self, batch: Batch):
    for name in ("image", "key"):
      if name not in batch:
        raise TeacherStoreError(f"precompute: a batch has no {name!r} entry (entries: {sorted(batch)})")
    raw_keys = np.asarray(batch["key"])
    if raw_keys.ndim != 1:
      raise TeacherStoreError(f"precompute: batch['key'] must be 1-D [B], got shape {raw_keys.shape}")
    bsz = raw_keys.shape[0]
    if "weight" in batch:
      weight = np.asarray(batch["weight"])
      if weight.shape != (bsz,):
        raise TeacherStoreError(f"precompute: batch['weight'] has shape {weight.shape}, keys have {(bsz,)}")
      mask = weight > 0
    else:
      mask = np.ones((bsz,), bool)
    keys = [_as_key(k) for k in raw_keys[mask]]
    return keys, mask

  def _write(self, keys: list[str], mask: np.ndarray, out) -> None:
    if out is None:
      return
    logits = np.asarray(out)
    if logits.shape != (mask.shape[0], self.c):
      raise TeacherStoreError(f"precompute: apply_fn returned logits of shape {logits.shape} for a batch of "
                              f"{mask.shape[0]} images; expected {(mask.shape[0], self.c)} (num_classes={self.c})")
    rows = logits[mask].astype(self.dtype)
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
      key = keys[int(np.argmax(bad))]
      raise TeacherStoreError(
          f"precompute: the teacher's logits for example {key!r} are not finite in {self.dtype} (max |logit| "
          f"{np.nanmax(np.abs(logits[mask].astype(np.float64))):.4g}); check the teacher, or store "
          "dtype='float32' if the logits overflow float16 (max 65504)")
    for key in keys:
      if key in self.seen:
        raise TeacherStoreError(
            f"precompute: example key {key!r} arrived twice (batches must be deterministic and each example "
            f"must appear once). Delete {self.dir} and rerun with a batch source that yields every example "
            "exactly once, in the same order on every run")
      self.seen.add(key)
    start, stop = self.rows_done, self.rows_done + len(keys)
    if stop > self.n:
      raise TeacherStoreError(f"precompute: the batch source yielded more than num_examples={self.n} real "
                              f"rows; check num_examples and the 'weight' of padding rows. Delete {self.dir} "
                              "and rerun")
    self.logits[start:stop] = rows
    blob = "".join(k + "\n" for k in keys).encode("utf-8")
    self.keys_f.write(blob)
    self.keys_bytes += len(blob)
    self.rows_done = stop

  def run(self, batches: BatchSource, apply_fn, *, flush_every: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    start = self.batches_done
    if callable(batches) and not hasattr(batches, "__iter__"):
      source: Iterator[Batch] = iter(batches(start))
    else:
      source = itertools.islice(iter(batches), start, None)
    bar = tqdm(total=self.n, initial=self.rows_done, unit="img", disable=not progress,
               desc=f"teacher logits {self.signature['split']}")
    pending = None  # (keys, mask, un-fetched logits): the teacher runs one batch ahead of the writes
    since_flush = 0

    def drain():
      nonlocal pending, since_flush
      item, pending = pending, None
      before = self.rows_done
      self._write(*item)
      self.batches_done += 1
      since_flush += 1
      bar.update(self.rows_done - before)
      if since_flush >= flush_every:
        self.flush()
        since_flush = 0

    try:
      try:
        for batch in source:
          keys, mask = self._prepare(batch)
          out = apply_fn(batch["image"]) if mask.any() else None
          if pending is not None:
            drain()
          pending = (keys, mask, out)
        if pending is not None:
          drain()
      except BaseException:
        try:
          if pending is not None:  # the batch ahead was computed fine; keep it
            drain()
        finally:
          self.flush()
        raise
      self.flush()
    finally:
      bar.close()

    if self.rows_done != self.n:
      raise TeacherStoreError(
          f"precompute: the batch source ended after {self.rows_done} real rows ({self.batches_done} batches), "
          f"expected num_examples={self.n}. Check num_examples, the split and the padding weights; delete "
          f"{self.dir} and rerun")

  def finalize(self, final: pathlib.Path) -> None:
    """Checks, checksums, manifest, then the atomic rename '<split>.partial' -> '<split>'."""
    keys = (self.dir / KEYS_FILE).read_bytes().decode("utf-8").splitlines()
    if len(keys) != self.n or len(set(keys)) != self.n:
      raise _fail(self.dir, f"{len(keys)} keys ({len(set(keys))} unique) written for num_examples={self.n}",
                  self.hint)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION}
    manifest.update({k: self.signature[k] for k in ("dataset", "version", "split", "num_examples",
                                                    "num_classes", "class_names", "teacher_id",
                                                    "teacher_info", "preprocessing", "dtype")})
    manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    logits_path, keys_path = self.dir / LOGITS_FILE, self.dir / KEYS_FILE
    manifest["files"] = {
        "logits": {"name": LOGITS_FILE, "shape": [self.n, self.c], "bytes": logits_path.stat().st_size,
                   "sha256": _file_sha256(logits_path)},
        "keys": {"name": KEYS_FILE, "encoding": "utf-8", "count": self.n, "bytes": keys_path.stat().st_size,
                 "sha256": _file_sha256(keys_path)},
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    _write_json_atomic(self.dir / MANIFEST_FILE, manifest)
    # progress.json goes only after the rename: a crash in between leaves a partial folder that a
    # rerun resumes (nothing left to compute) and finalizes again.
    os.rename(self.dir, final)
    _fsync_dir(final.parent)
    (final / PROGRESS_FILE).unlink()


# ----------------------------------------------------------------------------- reading


_REQUIRED = {
    "format": str, "format_version": int, "dataset": str, "version": str, "split": str, "num_examples": int,
    "num_classes": int, "teacher_id": str, "preprocessing": dict, "dtype": str, "created": str, "files": dict,
    "manifest_sha256": str,
}


class TeacherStore:
  """A complete, validated teacher-logit store (open it with `TeacherStore.open`).

  Attributes:
    path: the store folder. manifest: the parsed manifest.json.
    logits: read-only np.memmap [N, C] in the stored dtype (row i belongs to keys[i]).
    keys: list of N example keys (str) in row order.
  """

  def __init__(self, path: pathlib.Path, manifest: dict, logits: np.ndarray, keys: list[str],
               tf_backend: str = "memory"):
    if tf_backend not in ("memory", "mmap"):
      raise ValueError(f"tf_backend must be 'memory' or 'mmap', got {tf_backend!r}")
    self.path = path
    self.manifest = manifest
    self.logits = logits
    self.keys = keys
    self.tf_backend = tf_backend
    self._index: dict[str, int] | None = None
    self._tf = None
    self._lock = threading.Lock()

  # -- opening and validation

  @classmethod
  def open(cls, store_dir: PathLike, *, expect: Mapping[str, Any] | None = None, verify: bool = True,
           tf_backend: str = "memory", hint: str | None = None) -> "TeacherStore":
    """Opens a complete store, refusing anything unfinished, inconsistent or unexpected.

    Checks, in order: the folder is final (not '*.partial', not missing, has manifest.json); the
    manifest parses and has every field; the folder names (when laid out as
    <dataset>/<version>/teacher_logits/<teacher_id>/<split>) match the manifest; logits.npy's shape
    and dtype match num_examples/num_classes/dtype; the manifest's own hash (edits); the `expect`ed
    fields (any of EXPECTABLE_FIELDS: dataset, version, split, num_examples, num_classes,
    class_names, teacher_id, preprocessing, dtype); keys.txt's sha256, count and uniqueness; and,
    when `verify` (default; O(file size) read), logits.npy's sha256. Every refusal is a
    TeacherStoreError naming the field or file, both values, and what to do.
    """
    path = pathlib.Path(store_dir)
    if path.name.endswith(PARTIAL_SUFFIX):
      raise TeacherStoreError(
          f"teacher store {path}: this is an unfinished precompute (a '{PARTIAL_SUFFIX}' folder), not a "
          f"store. To fix: rerun precompute with the same arguments to resume and finish it, or delete {path}.")
    if not path.is_dir():
      if partial_path(path).exists():
        raise TeacherStoreError(
            f"teacher store {path}: not complete, an interrupted precompute left {partial_path(path)}. To "
            f"fix: rerun precompute with the same arguments to resume it, or delete {partial_path(path)} "
            "and recompute.")
      raise TeacherStoreError(f"teacher store {path}: no such folder. To fix: {hint or DEFAULT_HINT}.")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
      raise _fail(path, "has no manifest.json, so it is unfinished or not a teacher store", hint)
    try:
      manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise _fail(path, f"manifest.json is not valid JSON ({e})", hint) from e
    if not isinstance(manifest, dict):
      raise _fail(path, "manifest.json is not a JSON object", hint)

    for field, kind in _REQUIRED.items():
      if field not in manifest:
        raise _fail(path, f"manifest.json lacks the field {field!r}", hint)
      value = manifest[field]
      if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(path, f"manifest field {field!r} is {value!r}, expected a {kind.__name__}", hint)
    if manifest["format"] != FORMAT:
      raise _fail(path, f"manifest field 'format' is {manifest['format']!r}, expected {FORMAT!r}", hint)
    if manifest["format_version"] != FORMAT_VERSION:
      raise _fail(path, f"manifest field 'format_version' is {manifest['format_version']!r}, this jaxkd reads "
                  f"{FORMAT_VERSION}", hint)
    if manifest["dtype"] not in STORE_DTYPES:
      raise _fail(path, f"manifest field 'dtype' is {manifest['dtype']!r}, expected one of {STORE_DTYPES}", hint)
    n, c = manifest["num_examples"], manifest["num_classes"]

    # Folder names are a second record of the identity fields.
    parents = path.resolve().parents
    if len(parents) >= 4 and parents[1].name == "teacher_logits":
      for field, folder in (("split", path.resolve().name), ("teacher_id", parents[0].name),
                            ("version", parents[2].name), ("dataset", parents[3].name)):
        if manifest[field] != folder:
          raise _fail(path, f"manifest field {field!r} is {manifest[field]!r} but the store's folder says "
                      f"{folder!r} (the manifest was edited or the folder moved)", hint)

    files = manifest["files"]
    for name, default in (("logits", LOGITS_FILE), ("keys", KEYS_FILE)):
      entry = files.get(name)
      if not isinstance(entry, dict) or entry.get("name") != default or not isinstance(entry.get("sha256"), str):
        raise _fail(path, f"manifest field 'files.{name}' is {entry!r}, expected name {default!r} and a sha256",
                    hint)
    logits_path, keys_path = path / LOGITS_FILE, path / KEYS_FILE
    for p in (logits_path, keys_path):
      if not p.is_file():
        raise _fail(path, f"{p.name} is missing", hint)
    try:
      logits = np.load(logits_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
      raise _fail(path, f"logits.npy cannot be read as a .npy array ({e}); it is truncated or corrupted",
                  hint) from e
    if logits.ndim != 2 or logits.shape[0] != n:
      raise _fail(path, f"manifest field 'num_examples' is {n} but logits.npy has shape {logits.shape}", hint)
    if logits.shape[1] != c:
      raise _fail(path, f"manifest field 'num_classes' is {c} but logits.npy has shape {logits.shape}", hint)
    if logits.dtype != np.dtype(manifest["dtype"]):
      raise _fail(path, f"manifest field 'dtype' is {manifest['dtype']!r} but logits.npy holds {logits.dtype}",
                  hint)
    if files["logits"].get("shape") != [n, c]:
      raise _fail(path, f"manifest field 'files.logits.shape' is {files['logits'].get('shape')!r}, expected "
                  f"{[n, c]}", hint)
    class_names = manifest.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or len(class_names) != c):
      raise _fail(path, f"manifest field 'class_names' is {class_names!r}, expected a list of num_classes={c} "
                  "names or null", hint)

    digest = _manifest_digest(manifest)
    if digest != manifest["manifest_sha256"]:
      raise _fail(path, f"manifest.json was modified after it was written: its content hash is {digest[:16]}..., "
                  f"the recorded manifest_sha256 is {manifest['manifest_sha256'][:16]}...", hint)

    if expect:
      unknown = sorted(set(expect) - set(EXPECTABLE_FIELDS))
      if unknown:
        raise ValueError(f"TeacherStore.open: cannot check expect fields {unknown}; known: {EXPECTABLE_FIELDS}")
      for field in EXPECTABLE_FIELDS:
        if field not in expect:
          continue
        want = expect[field]
        if field in ("preprocessing", "class_names") and want is not None:
          want = json.loads(_canonical(want if field == "preprocessing" else list(want)))
        have = manifest.get(field)
        if have != want:
          detail = ""
          if isinstance(have, dict) and isinstance(want, dict):
            diff = [f"{k}: store {have.get(k, '<absent>')!r} vs expected {want.get(k, '<absent>')!r}"
                    for k in sorted(set(have) | set(want)) if have.get(k, ...) != want.get(k, ...)]
            detail = f" ({'; '.join(diff)})"
          raise _fail(path, f"field {field!r} differs{detail}: the store has {have!r}, the caller expects "
                      f"{want!r}", hint)

    keys_blob = keys_path.read_bytes()
    keys_sha = hashlib.sha256(keys_blob).hexdigest()
    if keys_sha != files["keys"]["sha256"]:
      raise _fail(path, f"keys.txt checksum mismatch: sha256 is {keys_sha[:16]}..., the manifest records "
                  f"{files['keys']['sha256'][:16]}... (the keys file was modified or corrupted)", hint)
    try:
      keys = keys_blob.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
      raise _fail(path, f"keys.txt is not UTF-8 ({e})", hint) from e
    if len(keys) != n:
      raise _fail(path, f"keys.txt has {len(keys)} keys, manifest field 'num_examples' is {n}", hint)
    if len(set(keys)) != n:
      raise _fail(path, f"keys.txt has {n - len(set(keys))} duplicate keys", hint)

    if verify:
      logits_sha = _file_sha256(logits_path)
      if logits_sha != files["logits"]["sha256"]:
        raise _fail(path, f"logits.npy checksum mismatch: sha256 is {logits_sha[:16]}..., the manifest records "
                    f"{files['logits']['sha256'][:16]}... (the array was modified or corrupted)", hint)
    return cls(path, manifest, logits, keys, tf_backend=tf_backend)

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
            f"teacher_id={m['teacher_id']!r}, shape={tuple(self.logits.shape)}, dtype={m['dtype']})")

  def index(self, key: str | bytes) -> int:
    """Row of `key`; KeyError (naming the key and the store) when it is not stored."""
    if self._index is None:
      self._index = {k: i for i, k in enumerate(self.keys)}
    k = key.decode("utf-8") if isinstance(key, (bytes, np.bytes_)) else str(key)
    try:
      return self._index[k]
    except KeyError:
      raise KeyError(f"example key {k!r} is not in the teacher store {self.path} ({self.manifest['dataset']} "
                     f"{self.manifest['split']}, {self.num_examples} keys); the data and the store disagree: "
                     f"{DEFAULT_HINT} for this split") from None

  def row(self, key: str | bytes) -> np.ndarray:
    """float32 [num_classes] logits of `key`."""
    return np.asarray(self.logits[self.index(key)], dtype=np.float32)

  def rows(self, keys: Iterable[str | bytes]) -> np.ndarray:
    """float32 [len(keys), num_classes]."""
    idx = np.asarray([self.index(k) for k in keys], dtype=np.int64)
    return np.asarray(self.logits[idx], dtype=np.float32).reshape(len(idx), self.num_classes)

  # -- TensorFlow access (tf.data)

  def _tf_resources(self):
    import tensorflow as tf

    with self._lock:
      if self._tf is None:
        # Lift resource creation out of any tf.data/tf.function trace we are called from.
        with tf.init_scope(), tf.device("/CPU:0"):
          table = tf.lookup.StaticHashTable(
              tf.lookup.KeyValueTensorInitializer(tf.constant(self.keys, dtype=tf.string),
                                                  tf.range(self.num_examples, dtype=tf.int64)),
              default_value=-1)
          values = None
          if self.tf_backend == "memory":
            n, c = self.logits.shape
            values = tf.Variable(tf.zeros([n, c], dtype=self.logits.dtype), trainable=False,
                                 name="teacher_logits")
            chunk = max(1, (64 << 20) // max(1, c * self.logits.dtype.itemsize))  # ~64 MB at a time
            for a in range(0, n, chunk):
              values[a:a + chunk].assign(np.asarray(self.logits[a:a + chunk]))
          self._tf = (table, values)
      return self._tf

  def tf_lookup(self, keys):
    """tf.string keys of any shape S -> float32 logits [*S, num_classes]; for use in tf.data `map`.

    Unknown keys fail loudly (InvalidArgumentError naming the keys), never zeros. Backend 'memory'
    (default): StaticHashTable key -> row and a gather from a tf.Variable holding the array in its
    stored dtype (memory cost in the module docstring). Backend 'mmap': gather from the memmap in
    a tf.numpy_function (map on batched keys).
    """
    import tensorflow as tf

    table, values = self._tf_resources()
    keys = tf.convert_to_tensor(keys, dtype=tf.string)
    c = self.num_classes
    if values is None:
      def _np_gather(k):
        flat = [self.index(x) for x in np.asarray(k).reshape(-1)]
        out = np.asarray(self.logits[np.asarray(flat, dtype=np.int64)], dtype=np.float32)
        return out.reshape(np.shape(k) + (c,))

      out = tf.numpy_function(_np_gather, [keys], tf.float32, stateful=False)
      out.set_shape(keys.shape.concatenate([c]))
      return out
    idx = table.lookup(keys)
    missing = idx < 0
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(missing)),
        [f"teacher_lookup: example keys not in the teacher store {self.path} "
         f"({self.manifest['dataset']} {self.manifest['split']}, {self.num_examples} keys); the data and the "
         f"store disagree ({DEFAULT_HINT} for this split). Unknown keys:",
         tf.boolean_mask(tf.reshape(keys, [-1]), tf.reshape(missing, [-1]))],
        summarize=10)
    with tf.control_dependencies([check]):
      idx = tf.identity(idx)
    out = tf.cast(tf.gather(values, idx), tf.float32)
    out.set_shape(keys.shape.concatenate([c]))
    return out
