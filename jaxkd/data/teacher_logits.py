"""Stored teacher logits inside tf.data: `tf_lookup(store)` joins a store's rows by example key;
`stacked_lookup` joins several teachers' stores at once.

`tf_lookup(store)` returns the function `pipeline.train_batches(..., teacher_lookup=...)` takes:
tf.string keys of any shape S -> float32 logits [*S, num_classes]. The store itself
(`jaxkd.teacher_store`) is NumPy only; this module is its TensorFlow side.

Memory cost of backend 'memory' (the default): the whole array is held in host RAM as a
tf.Variable in its stored dtype (float16 stays float16; rows are cast to float32 after the
gather), plus a string hash table. Food-101 train (75,750 x 101, float16): 15 MB. ImageNet-1k
train (1,281,167 x 1000, float16): 2.56 GB of logits plus roughly 0.2 GB of keys per host
process; this is the default because a gather from RAM costs nothing next to JPEG decoding.
Where that RAM is not available, use `backend='mmap'`: rows are then read from the
memory-mapped file through `tf.numpy_function` (no copy in RAM beyond the OS page cache; one
Python call per map call, so map it on *batched* keys).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from jaxkd.teacher_store import DEFAULT_HINT, TeacherStore

BACKENDS = ("memory", "mmap")


def _resources(store: TeacherStore, backend: str):
  """(key -> row StaticHashTable, tf.Variable of the rows or None for 'mmap'), on the CPU."""
  # Lift resource creation out of any tf.data/tf.function trace we are called from.
  with tf.init_scope(), tf.device("/CPU:0"):
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(store.keys, dtype=tf.string),
                                            tf.range(store.num_examples, dtype=tf.int64)),
        default_value=-1)
    values = None
    if backend == "memory":
      n, c = store.logits.shape
      values = tf.Variable(tf.zeros([n, c], dtype=store.logits.dtype), trainable=False,
                           name="teacher_logits")
      chunk = max(1, (64 << 20) // max(1, c * store.logits.dtype.itemsize))  # ~64 MB at a time
      for a in range(0, n, chunk):
        values[a:a + chunk].assign(np.asarray(store.logits[a:a + chunk]))
  return table, values


def tf_lookup(store: TeacherStore, *, backend: str = "memory") -> Callable[[tf.Tensor], tf.Tensor]:
  """The tf.data join of `store`: tf.string keys of any shape S -> float32 [*S, num_classes].

  For use in tf.data `map` (e.g. `train_batches(..., teacher_lookup=tf_lookup(store))`). Unknown
  keys fail loudly (InvalidArgumentError naming the keys), never zeros. Backend 'memory'
  (default): StaticHashTable key -> row and a gather from a tf.Variable holding the array in its
  stored dtype (memory cost in the module docstring). Backend 'mmap': gather from the memmap in
  a tf.numpy_function (map on batched keys). The table and the variable are built on the first
  call and shared by every later call of the returned function: build it once per store.
  """
  if backend not in BACKENDS:
    raise ValueError(f"tf_lookup: backend must be 'memory' or 'mmap', got {backend!r}")
  lock = threading.Lock()
  built = []

  def resources():
    with lock:
      if not built:
        built.append(_resources(store, backend))
      return built[0]

  def lookup(keys):
    table, values = resources()
    keys = tf.convert_to_tensor(keys, dtype=tf.string)
    c = store.num_classes
    if values is None:
      def _np_gather(k):
        flat = [store.index(x) for x in np.asarray(k).reshape(-1)]
        out = np.asarray(store.logits[np.asarray(flat, dtype=np.int64)], dtype=np.float32)
        return out.reshape(np.shape(k) + (c,))

      out = tf.numpy_function(_np_gather, [keys], tf.float32, stateful=False)
      out.set_shape(keys.shape.concatenate([c]))
      return out
    idx = table.lookup(keys)
    missing = idx < 0
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(missing)),
        [f"teacher_lookup: example keys not in the teacher store {store.path} "
         f"({store.manifest['dataset']} {store.manifest['split']}, {store.num_examples} keys); "
         f"the data and the store disagree ({DEFAULT_HINT} for this split). Unknown keys:",
         tf.boolean_mask(tf.reshape(keys, [-1]), tf.reshape(missing, [-1]))],
        summarize=10)
    with tf.control_dependencies([check]):
      idx = tf.identity(idx)
    out = tf.cast(tf.gather(values, idx), tf.float32)
    out.set_shape(keys.shape.concatenate([c]))
    return out

  return lookup


def stacked_lookup(lookups: list[Callable[[tf.Tensor], tf.Tensor]]
                   ) -> Callable[[tf.Tensor], tf.Tensor]:
  """Several teachers' lookups (`tf_lookup` of each store) as one: keys of shape S -> float32
  [*S, K, num_classes], teacher k's logits at index k (the order of `lookups`)."""
  if not lookups:
    raise ValueError("stacked_lookup needs at least one lookup")

  def lookup(keys):
    return tf.stack([one(keys) for one in lookups], axis=-2)

  return lookup
