"""The images an exported model takes: the eval preprocessing's resized, centre-cropped pixels.

An exported model takes uint8 RGB [N, S, S, 3]: the image already resized and
centre-cropped as jaxkd's eval preprocessing does (``jaxkd.data.augment.eval_preprocess``:
the centred square of side ``eval_crop_fraction * min(H, W)``, resized bilinearly to S x S,
antialiased unless the run turned it off), rounded to integers. Normalisation is inside the
model. ``eval_crops`` computes exactly those pixels (the eval preprocessing, normalisation
undone, rounded), ``split_crops`` does it for a split of a jaxkd data source.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def crop_rule(image_size: int, crop_fraction: float, antialias: bool) -> str:
  """The resize-and-crop rule in words (written beside every exported file)."""
  return (f"decode as RGB; take the centred square of side round({crop_fraction} * min(H, W)) "
          f"(at least 1 pixel; offsets (H - side + 1) // 2, (W - side + 1) // 2); resize it "
          f"bilinearly{' with antialiasing' if antialias else ''} to {image_size} x {image_size} "
          "(TensorFlow's tf.image.resize), clip to [0, 255], round to uint8")


def _augment_config(image_size: int, crop_fraction: float, antialias: bool):
  from jaxkd.data import augment
  return augment.AugmentConfig(image_size=int(image_size), eval_crop_fraction=float(crop_fraction),
                               antialias=bool(antialias))


def tf_eval_crop(image_bytes, cfg):
  """TensorFlow: encoded image -> uint8 [S, S, 3] (the eval preprocessing before normalisation)."""
  import tensorflow as tf

  from jaxkd.data import augment
  pixels = augment.denormalize(augment.eval_preprocess(image_bytes, cfg, dtype=tf.float32))
  return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 255.0)), tf.uint8)


def eval_crops(encoded: Iterable[bytes], image_size: int, crop_fraction: float = 0.875,
               antialias: bool = True) -> np.ndarray:
  """uint8 [N, S, S, 3] crops of encoded images (JPEG, PNG, BMP, GIF bytes)."""
  import tensorflow as tf
  cfg = _augment_config(image_size, crop_fraction, antialias)
  crops = [tf_eval_crop(tf.constant(b), cfg).numpy() for b in encoded]
  if not crops:
    return np.zeros((0, int(image_size), int(image_size), 3), np.uint8)
  return np.stack(crops)


def split_crops(source, split: str, image_size: int, crop_fraction: float = 0.875,
                antialias: bool = True, *, limit: int | None = None,
                shuffle_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 crops [N, S, S, 3], int32 labels [N]) of `split` of a jaxkd data source.

  `limit`: at most that many examples; `shuffle_seed`: take them from a shuffle of the split
  (a representative set spread over the classes) instead of the split's first records.
  """
  import tensorflow as tf
  if split not in source.splits:
    raise ValueError(f"split {split!r}: the data {source.name!r} has the splits "
                     f"{', '.join(source.splits)}")
  cfg = _augment_config(image_size, crop_fraction, antialias)
  ds = source.records(split)
  n = source.num_examples(split)
  if shuffle_seed is not None:
    ds = ds.shuffle(min(n, 10_000), seed=int(shuffle_seed), reshuffle_each_iteration=False)
  if limit is not None:
    ds = ds.take(int(limit))
  if source.load_fn is not None:
    ds = ds.map(source.load_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(lambda ex: (tf_eval_crop(ex["image"], cfg), tf.cast(ex["label"], tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
  images, labels = [], []
  for x, y in ds.as_numpy_iterator():
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"split {split!r} of {source.name!r} has no examples")
  return np.concatenate(images), np.concatenate(labels)
