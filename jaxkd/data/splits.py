"""Train / val / test splits as the Food-101 distillation paper defines them.

The paper, "A Lightweight Food Image Classification Model Based on Knowledge Distillation and
ECA Attention" (in Chinese; it names no authors, venue or year), holds out 20 % of each class's
official Food-101 training images (Bossard, Guillaumin and Van Gool, "Food-101 -- Mining
Discriminative Components with Random Forests", ECCV 2014) as validation and tests on the
official test split:

* ``'train'``: ``1 - val_fraction`` of each class's official training images;
* ``'val'``: the other ``val_fraction`` (20 % by default), stratified per class;
* ``'test'``: the official test split (Food-101's 250 test images per class);
* ``'trainval'``: the whole official training split.

Assignment is a pure function of the example keys, the labels, the fraction and
a seed: within a class, keys are ordered by ``sha256(f"{seed}:{key}")`` (a seeded
permutation that does not depend on file order, numpy versions or on which other
keys exist) and the first ``floor(val_fraction * n_c + 0.5)`` go to val. It is
applied inside tf.data by a ``tf.lookup`` table on the 'key' field, so the order in
which files are read never matters.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

TRAIN, VAL, TEST, TRAINVAL = "train", "val", "test", "trainval"
SPLITS = (TRAIN, VAL, TEST, TRAINVAL)
_SPLIT_ID = {TRAIN: 0, VAL: 1}


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; use one of {SPLITS} ('train'/'val' are carved "
                     "from the official training split, 'test' is the official test split, "
                     "'trainval' is the whole official training split)")
  return split


def num_val(n: int, val_fraction: float) -> int:
  """Number of val examples of a class with ``n`` training images: floor(f n + 1/2)."""
  return int(math.floor(val_fraction * n + 0.5))


def _rank_key(seed: int, key: str) -> bytes:
  return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def assign_val(keys: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
               val_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
  """Boolean mask (same order as ``keys``): True where the example belongs to 'val'.

  Stratified: each class c with n_c examples contributes exactly
  ``floor(val_fraction * n_c + 0.5)`` val examples.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}: need 0 <= val_fraction < 1")
  keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in keys]
  labels = np.asarray(labels)
  if len(keys) != len(labels):
    raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
  if len(set(keys)) != len(keys):
    raise ValueError("example keys are not unique; the train/val split needs a unique key per "
                     "example")
  is_val = np.zeros(len(keys), dtype=bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    order = sorted(idx, key=lambda i: _rank_key(seed, keys[i]))
    is_val[order[:num_val(len(idx), val_fraction)]] = True
  return is_val


def split_lookup_table(keys: Sequence[str] | np.ndarray,
                       is_val: np.ndarray) -> tf.lookup.StaticHashTable:
  """tf.lookup table key -> 0 (train) / 1 (val); unknown keys -> -1."""
  keys = np.asarray([k if isinstance(k, bytes) else str(k).encode("utf-8") for k in keys],
                    dtype=object)
  values = np.where(np.asarray(is_val), _SPLIT_ID[VAL], _SPLIT_ID[TRAIN]).astype(np.int64)
  init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string),
                                             tf.constant(values, tf.int64))
  return tf.lookup.StaticHashTable(init, default_value=-1)


def filter_split(ds: tf.data.Dataset, table: tf.lookup.StaticHashTable,
                 split: str) -> tf.data.Dataset:
  """Keeps the elements of ``ds`` whose 'key' the table assigns to ``split`` ('train' or 'val')."""
  if split not in _SPLIT_ID:
    raise ValueError(f"filter_split only handles 'train'/'val', got {split!r}")
  wanted = tf.constant(_SPLIT_ID[split], tf.int64)
  return ds.filter(lambda ex: tf.equal(table.lookup(ex["key"]), wanted))
