"""Writing a store: the resumable '<split>.partial' folder of one precompute, then the final rename.

`PartialWriter` preallocates `logits.npy` as a memmap, appends to `keys.txt`, and records
`progress.json` {batches_done, rows_done, keys_bytes, signature} after the data it describes is
durable; `finalize` checks the rows, writes checksums and the manifest, and renames the folder
to its final name (atomic), so a half-written store is never taken for a complete one.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxkd.teacher_store import layout
from jaxkd.teacher_store.layout import TeacherStoreError

Batch = Mapping[str, Any]
BatchSource = Callable[[int], Iterable[Batch]] | Iterable[Batch]


class PartialWriter:
  """The resumable state of one precompute in a '<split>.partial' folder."""

  def __init__(self, partial: pathlib.Path, signature: dict, hint: str | None):
    self.dir = partial
    self.signature = signature
    self.hint = hint
    self.n = signature["num_examples"]
    self.c = signature["num_classes"]
    self.dtype = np.dtype(signature["dtype"])
    progress_file = partial / layout.PROGRESS_FILE
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
    self.logits = np.lib.format.open_memmap(self.dir / layout.LOGITS_FILE, mode="w+",
                                            dtype=self.dtype, shape=(self.n, self.c))
    self.keys_f = open(self.dir / layout.KEYS_FILE, "wb")
    self.batches_done = self.rows_done = self.keys_bytes = 0
    self.seen: set[str] = set()
    self.flush()

  def _resume(self) -> None:
    with open(self.dir / layout.PROGRESS_FILE) as f:
      record = json.load(f)
    old = record.get("signature", {})
    for field in sorted(set(old) | set(self.signature)):
      if old.get(field) != self.signature.get(field):
        raise TeacherStoreError(
            f"cannot resume the unfinished precompute in {self.dir}: it was started with "
            f"{field}={old.get(field)!r}, this run has {field}={self.signature.get(field)!r}. To "
            f"fix: delete {self.dir} to start over (or pass overwrite=True), or rerun with the "
            "original arguments.")
    self.batches_done = int(record["batches_done"])
    self.rows_done = int(record["rows_done"])
    self.keys_bytes = int(record["keys_bytes"])
    self.logits = np.lib.format.open_memmap(self.dir / layout.LOGITS_FILE, mode="r+")
    if self.logits.shape != (self.n, self.c) or self.logits.dtype != self.dtype:
      raise layout.store_error(
          self.dir, f"partial logits.npy has shape {self.logits.shape} {self.logits.dtype}, "
          f"expected {(self.n, self.c)} {self.dtype}", self.hint)
    keys_path = self.dir / layout.KEYS_FILE
    if keys_path.stat().st_size < self.keys_bytes:
      raise layout.store_error(
          self.dir, f"partial keys.txt has {keys_path.stat().st_size} bytes, progress.json "
          f"records {self.keys_bytes}", self.hint)
    self.keys_f = open(keys_path, "r+b")
    self.keys_f.truncate(self.keys_bytes)  # drop keys written after the last progress record
    self.keys_f.seek(0)
    done = self.keys_f.read().decode("utf-8").splitlines()
    self.keys_f.seek(self.keys_bytes)
    if len(done) != self.rows_done:
      raise layout.store_error(
          self.dir, f"partial keys.txt holds {len(done)} keys, progress.json records "
          f"{self.rows_done} rows", self.hint)
    self.seen = set(done)

  def flush(self) -> None:
    """Data first (memmap, keys), then the record that says it is there."""
    self.logits.flush()
    self.keys_f.flush()
    os.fsync(self.keys_f.fileno())
    layout.write_json_atomic(self.dir / layout.PROGRESS_FILE, {
        "batches_done": self.batches_done, "rows_done": self.rows_done,
        "keys_bytes": self.keys_bytes, "signature": self.signature})

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
        raise TeacherStoreError(f"precompute: a batch has no {name!r} entry (entries: "
                                f"{sorted(batch)})")
    raw_keys = np.asarray(batch["key"])
    if raw_keys.ndim != 1:
      raise TeacherStoreError(f"precompute: batch['key'] must be 1-D [B], got shape "
                              f"{raw_keys.shape}")
    bsz = raw_keys.shape[0]
    if "weight" in batch:
      weight = np.asarray(batch["weight"])
      if weight.shape != (bsz,):
        raise TeacherStoreError(f"precompute: batch['weight'] has shape {weight.shape}, keys have "
                                f"{(bsz,)}")
      mask = weight > 0
    else:
      mask = np.ones((bsz,), bool)
    keys = [layout.as_key(k) for k in raw_keys[mask]]
    return keys, mask

  def _write(self, keys: list[str], mask: np.ndarray, out) -> None:
    if out is None:
      return
    logits = np.asarray(out)
    if logits.shape != (mask.shape[0], self.c):
      raise TeacherStoreError(
          f"precompute: logits_fn returned logits of shape {logits.shape} for a batch of "
          f"{mask.shape[0]} images; expected {(mask.shape[0], self.c)} (num_classes={self.c})")
    rows = logits[mask].astype(self.dtype)
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
      key = keys[int(np.argmax(bad))]
      raise TeacherStoreError(
          f"precompute: the teacher's logits for example {key!r} are not finite in {self.dtype} "
          f"(max |logit| {np.nanmax(np.abs(logits[mask].astype(np.float64))):.4g}); check the "
          "teacher, or store dtype='float32' if the logits overflow float16 (max 65504)")
    for key in keys:
      if key in self.seen:
        raise TeacherStoreError(
            f"precompute: example key {key!r} arrived twice (batches must be deterministic and "
            f"each example must appear once). Delete {self.dir} and rerun with a batch source "
            "that yields every example exactly once, in the same order on every run")
      self.seen.add(key)
    start, stop = self.rows_done, self.rows_done + len(keys)
    if stop > self.n:
      raise TeacherStoreError(
          f"precompute: the batch source yielded more than num_examples={self.n} real rows; "
          f"check num_examples and the 'weight' of padding rows. Delete {self.dir} and rerun")
    self.logits[start:stop] = rows
    blob = "".join(k + "\n" for k in keys).encode("utf-8")
    self.keys_f.write(blob)
    self.keys_bytes += len(blob)
    self.rows_done = stop

  def run(self, batches: BatchSource, logits_fn: Callable[[Any], Any], *, flush_every: int,
          progress: bool) -> None:
    """Runs `logits_fn` over the batches not done yet and writes their real rows."""
    from tqdm.auto import tqdm

    start = self.batches_done
    if callable(batches) and not hasattr(batches, "__iter__"):
      source: Iterator[Batch] = iter(batches(start))
    else:
      source = itertools.islice(iter(batches), start, None)
    bar = tqdm(total=self.n, initial=self.rows_done, unit="img", disable=not progress,
               desc=f"teacher logits {self.signature['split']}")
    # (keys, mask, un-fetched logits): the teacher runs one batch ahead of the writes
    pending = None
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
          out = logits_fn(batch["image"]) if mask.any() else None
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
          f"precompute: the batch source ended after {self.rows_done} real rows "
          f"({self.batches_done} batches), expected num_examples={self.n}. Check num_examples, "
          f"the split and the padding weights; delete {self.dir} and rerun")

  def finalize(self, final: pathlib.Path) -> None:
    """Checks, checksums, manifest, then the atomic rename '<split>.partial' -> '<split>'."""
    keys = (self.dir / layout.KEYS_FILE).read_bytes().decode("utf-8").splitlines()
    if len(keys) != self.n or len(set(keys)) != self.n:
      raise layout.store_error(
          self.dir, f"{len(keys)} keys ({len(set(keys))} unique) written for "
          f"num_examples={self.n}", self.hint)
    manifest = {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION}
    manifest.update({k: self.signature[k]
                     for k in ("dataset", "version", "split", "num_examples", "num_classes",
                               "class_names", "teacher_id", "teacher_info", "preprocessing",
                               "dtype")})
    manifest["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    logits_path, keys_path = self.dir / layout.LOGITS_FILE, self.dir / layout.KEYS_FILE
    manifest["files"] = {
        "logits": {"name": layout.LOGITS_FILE, "shape": [self.n, self.c],
                   "bytes": logits_path.stat().st_size,
                   "sha256": layout.file_sha256(logits_path)},
        "keys": {"name": layout.KEYS_FILE, "encoding": "utf-8", "count": self.n,
                 "bytes": keys_path.stat().st_size, "sha256": layout.file_sha256(keys_path)},
    }
    manifest["manifest_sha256"] = layout.manifest_digest(manifest)
    layout.write_json_atomic(self.dir / layout.MANIFEST_FILE, manifest)
    # progress.json goes only after the rename: a crash in between leaves a partial folder that
    # a rerun resumes (nothing left to compute) and finalizes again.
    os.rename(self.dir, final)
    layout.fsync_dir(final.parent)
    (final / layout.PROGRESS_FILE).unlink()
