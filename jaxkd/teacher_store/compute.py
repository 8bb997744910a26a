"""`precompute`: run the teacher over a split once and store its logits (resumable)."""
from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd.teacher_store import layout
from jaxkd.teacher_store.reader import TeacherStore
from jaxkd.teacher_store.writer import BatchSource, PartialWriter


def _signature(**fields) -> dict:
  """The run configuration a resumed precompute must match."""
  return json.loads(layout.canonical_json(fields))


def precompute(
    batches: BatchSource,
    logits_fn: Callable[[Any], Any],
    *,
    dataset: str,
    version: str,
    split: str,
    teacher_id: str,
    num_examples: int,
    num_classes: int,
    preprocessing: Mapping[str, Any],
    store_dir: layout.PathLike | None = None,
    data_dir: layout.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    teacher_info: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    flush_every: int = 20,
    overwrite: bool = False,
    verify_existing: bool = True,
    progress: bool = True,
    hint: str | None = None,
) -> TeacherStore:
  """Runs the teacher over a split once and stores its logits; resumable; returns the opened store.

  Args:
    batches: the eval batches, numpy dicts {'image': [B, H, W, 3], 'key': [B] str/bytes,
      'weight': [B] (1 real, 0 padding; optional: all real when absent)}, in a deterministic
      order. Either a factory `batches(start_batch) -> iterable` that starts at batch
      `start_batch` (preferred: a resumed run then skips finished batches without decoding their
      images, e.g. with `jaxkd.data.pipeline.eval_batches(..., start_batch=start_batch)`) or a
      plain re-iterable (finished batches are then read again and dropped unseen by the
      teacher).
    logits_fn: `logits_fn(images) -> logits [B, num_classes]`; the caller's jitted
      (data-parallel) teacher forward pass in eval mode, with the teacher's variables bound. It
      is never called on a batch with no real rows.
    dataset, version, split, teacher_id: identify the store (folder names and manifest fields).
    num_examples: N, the number of real examples the source yields; exactly N must arrive.
    num_classes: C. preprocessing: the preprocessing the teacher saw (dict, recorded and checked
      on open): the eval view, or a region record (jaxkd.data.regions.RegionSpec.record()).
    store_dir / data_dir: the final folder, or the TFDS data_dir to place it at
      `store_path(data_dir, dataset, version, teacher_id, split, preprocessing)` (give exactly
      one).
    class_names, teacher_info: optional manifest entries (teacher_info: free-form JSON dict, e.g.
      the checkpoint path and its accuracy).
    dtype: 'float16' (default; halves the size, logits are O(10)) or 'float32'.
    flush_every: progress (memmap, keys, then rows-done record) is made durable every this many
      batches; on an exception (KeyboardInterrupt included) all finished batches are flushed
      first.
    overwrite: an existing complete store (and any partial one) is deleted and recomputed;
      otherwise an existing complete store is opened (checked against these arguments) and
      returned as is.
    verify_existing: verify the array checksum when returning an existing store.
    progress: show a tqdm bar. hint: what error messages tell the user to run.

  Writes into `<split>.partial/` (preallocated `logits.npy` memmap, `keys.txt` appended, and
  `progress.json` {batches_done, rows_done, keys_bytes, signature}); at the end checks that
  exactly N rows with unique keys were written, adds checksums and the manifest, and renames the
  folder to its final name (atomic), so a half-written store is never taken for a complete one.
  """
  if (store_dir is None) == (data_dir is None):
    raise ValueError("precompute: give exactly one of store_dir= or data_dir= (got "
                     f"store_dir={store_dir!r}, data_dir={data_dir!r})")
  for field, value in (("dataset", dataset), ("version", version), ("teacher_id", teacher_id),
                       ("split", split)):
    layout.check_component(field, value)
  if not isinstance(preprocessing, Mapping):
    raise ValueError(f"precompute: preprocessing must be a dict, got "
                     f"{type(preprocessing).__name__}")
  folder = layout.split_folder(split, preprocessing)
  final = (pathlib.Path(store_dir) if store_dir is not None
           else layout.store_path(data_dir, dataset, version, teacher_id, split, preprocessing))
  layout.check_component("store_dir name", final.name)
  if final.parent.parent.name == "teacher_logits" and final.name != folder:
    raise ValueError(f"precompute: store_dir {final} is inside a teacher_logits tree, where this "
                     f"store's folder must be named {folder!r} (split {split!r} and its "
                     "preprocessing); pass data_dir= instead, or store_dir=<...>/" + folder)
  if dtype not in layout.STORE_DTYPES:
    raise ValueError(f"precompute: dtype {dtype!r} is not one of {layout.STORE_DTYPES}")
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"precompute: num_examples must be a positive int, got {num_examples!r}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"precompute: num_classes must be a positive int, got {num_classes!r}")
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
      raise ValueError(f"precompute: {len(class_names)} class_names given for "
                       f"num_classes={num_classes}")
  if flush_every < 1:
    raise ValueError(f"precompute: flush_every must be >= 1, got {flush_every}")
  num_examples, num_classes = int(num_examples), int(num_classes)
  try:
    signature = _signature(dataset=dataset, version=version, split=split, teacher_id=teacher_id,
                           num_examples=num_examples, num_classes=num_classes, dtype=dtype,
                           class_names=class_names, preprocessing=dict(preprocessing),
                           teacher_info=None if teacher_info is None else dict(teacher_info))
  except (TypeError, ValueError) as e:
    raise ValueError(f"precompute: preprocessing/teacher_info must be JSON-serialisable dicts: "
                     f"{e}") from e
  expect = {k: signature[k] for k in layout.EXPECTABLE_FIELDS}

  partial = layout.partial_path(final)
  if overwrite:
    for path in (final, partial):
      if path.exists():
        shutil.rmtree(path)
  elif final.exists():
    return TeacherStore.open(final, expect=expect, verify=verify_existing, hint=hint)

  writer = PartialWriter(partial, signature, hint)
  try:
    writer.run(batches, logits_fn, flush_every=flush_every, progress=progress)
  finally:
    writer.close()
  writer.finalize(final)
  return TeacherStore.open(final, expect=expect, verify=False, hint=hint)
