"""jaxkd input pipeline: data sources, train/val/test splits, augmentation, feeding.

Importing this package imports TensorFlow (for tf.data only) and makes sure it never
takes a GPU away from JAX: ``hide_gpus_from_tensorflow()`` runs at import and is safe
to call again. TensorFlow's C++ logging is kept quiet (TF_CPP_MIN_LOG_LEVEL=2 unless
the user set it) and TFDS progress bars are off.

Main entry points::

    source = get_source("food101_local", manual_dir="~/data/food-101", data_dir=...)
    it = train_batches(source, "train", global_batch_size=256, augment={...}, seed=0,
                       start_step=step, mesh=mesh, teacher_lookup=tf_lookup(store))
    for batch in eval_batches(source, "val", global_batch_size=256, image_size=224, mesh=mesh): ...

``tf_lookup(store)`` (``jaxkd.data.teacher_logits``) joins a ``jaxkd.teacher_store`` store's
logits by example key inside tf.data.

Problems with a user's folder (missing, wrong layout, undecodable images) raise
``DataError`` (a ValueError; ``DataFolderNotFoundError`` is also a FileNotFoundError)
with one message naming the paths and the fix.
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def hide_gpus_from_tensorflow() -> None:
  """Makes TensorFlow see no GPU (tf.data runs on CPU; the accelerators belong to JAX).

  Idempotent. If TensorFlow already initialised its GPUs (someone used TF before
  importing jaxkd.data), they can no longer be hidden: a warning says so.
  """
  if not tf.config.list_physical_devices("GPU"):
    return
  if not tf.config.get_visible_devices("GPU"):
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # raised once TF has initialised its devices
    warnings.warn(f"TensorFlow already initialised its GPUs and may hold GPU memory ({e}); import "
                  "jaxkd.data before any other TensorFlow use.", stacklevel=2)


hide_gpus_from_tensorflow()
tf.get_logger().setLevel("ERROR")

import tensorflow_datasets as tfds  # noqa: E402

tfds.disable_progress_bar()

from jaxkd.data.augment import MEAN_RGB, STD_RGB, AugmentConfig  # noqa: E402
from jaxkd.data.pipeline import (  # noqa: E402
  eval_batches,
  eval_dataset,
  local_batch_size,
  num_eval_batches,
  prefetch_to_device,
  steps_per_epoch,
  to_device,
  train_batches,
  train_dataset,
)
from jaxkd.data.sources import (  # noqa: E402
  SOURCE_NAMES,
  Food101LocalSource,
  ImageFolderSource,
  Source,
  TfdsSource,
  get_source,
)
from jaxkd.data.splits import SPLITS, assign_val  # noqa: E402
from jaxkd.data.teacher_logits import tf_lookup  # noqa: E402
from jaxkd.data.user_folders import DataError, DataFolderNotFoundError  # noqa: E402

__all__ = [
    "AugmentConfig", "DataError", "DataFolderNotFoundError", "MEAN_RGB", "STD_RGB", "SOURCE_NAMES",
    "SPLITS", "Food101LocalSource", "ImageFolderSource", "Source", "TfdsSource", "assign_val",
    "eval_batches", "eval_dataset", "get_source", "hide_gpus_from_tensorflow", "local_batch_size",
    "num_eval_batches", "prefetch_to_device", "steps_per_epoch", "to_device", "train_batches",
    "tf_lookup", "train_dataset",
]
