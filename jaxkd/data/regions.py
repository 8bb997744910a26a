"""Stored crop regions: the teacher's view of each training image, replayed for the student.

Stored per-image logits are computed on the eval view while the student trains on random crops,
so teacher and student see different images. Beyer, Zhai, Royer, Markeeva, Anil and Kolesnikov
("Knowledge distillation: A good teacher is patient and consistent", CVPR 2022) show that this
inconsistency costs accuracy. FKD (Shen and Xing, "A Fast Knowledge Distillation Framework for
Visual Recognition", ECCV 2022) keeps the teacher offline and consistent: it stores, for every
training image, R random crops (box and flip) with the teacher's soft label of each, and training
replays one stored crop per image and epoch.

Here region r of an image is a function of the image's key and size alone:

    s_r          = split_seed(fold_in((region_seed, hash(key)), int64 r), 2)
    box, flip    = random_resized_crop_window(shape, s_r[0]), flip_decision(s_r[1])

with TensorFlow's stateless fold_in and to_hash_bucket_fast and jaxkd.data.augment's split_seed

(the training augmentation's own crop distribution, `rrc_scale` / `rrc_ratio`, and flip), so the
store holds only the teacher's logits, one row per region under the key `region_key(key, r)`
('<key>#<r>'), and both the precompute and the training stream recompute the boxes:

* the precompute (`eval_dataset(..., regions=spec)`) feeds the teacher each region's view: the
  box decoded and resized to `image_size`, flipped, normalised (no colour jitter);
* training (`train_dataset(..., regions=spec)`) picks r ~ U{0..R-1} per image and epoch from the
  example's augmentation seed, decodes the same box with the same flip, then applies the rest of
  the training augmentation (colour jitter, RandAugment, erasing, MixUp/CutMix) on top; the
  teacher's row is looked up under '<key>#<r>'. MixUp/CutMix then mix the two examples' stored
  teacher probabilities with the images' lambda: a linear stand-in for the teacher's output on
  the mixed image. FKD-Mix (Yin, Xing and Shen, "Squeezing, Recovering and Relabeling: Dataset
  Condensation at ImageNet Scale From A New Perspective", NeurIPS 2023) instead stores the mixing
  parameters too and the teacher's soft label of the mixed image itself.

A store is only valid for the region parameters it was computed with: `RegionSpec.record()` goes
into the store's manifest (its 'preprocessing'); `check_store(store, spec)` compares the two
(main.py opens its stores with that record expected).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from jaxkd.data import augment as augment_lib

_NEVER = 2**62


@dataclasses.dataclass(frozen=True)
class RegionSpec:
  """R regions per image and how they are drawn (see the module docstring)."""
  regions_per_image: int
  seed: int = 0
  rrc_scale: tuple[float, float] = (0.08, 1.0)
  rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True

  def __post_init__(self):
    if not isinstance(self.regions_per_image, int) or self.regions_per_image < 1:
      raise ValueError(f"regions_per_image must be a positive int, got "
                       f"{self.regions_per_image!r}")

  @classmethod
  def from_augment(cls, regions_per_image: int, augment: augment_lib.AugmentConfig | Any,
                   seed: int = 0) -> RegionSpec:
    """The regions of the training augmentation `augment` (its random-resized crop and flip)."""
    cfg = augment_lib.as_config(augment)
    if cfg.train_crop != "random_resized_crop":
      raise ValueError(f"stored regions replay random-resized crops; augment.train_crop is "
                       f"{cfg.train_crop!r}: set it to 'random_resized_crop' or store per-image "
                       "logits (teacher_logits.mode='image')")
    return cls(int(regions_per_image), int(seed), tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio),
               bool(cfg.flip))

  def record(self) -> dict:
    """The JSON-serialisable description kept in the store's manifest."""
    return {"mode": "regions", "regions_per_image": self.regions_per_image,
            "region_seed": self.seed, "rrc_scale": list(self.rrc_scale),
            "rrc_ratio": list(self.rrc_ratio), "flip": self.flip}


def check_store(store: Any, spec: RegionSpec) -> None:
  """Raises ValueError unless `store` (a jaxkd.teacher_store.TeacherStore) holds the regions of
  `spec`: replaying other crops than the teacher saw would give the student wrong labels."""
  held = store.manifest.get("preprocessing") or {}
  want = spec.record()
  differ = {k: (held.get(k), v) for k, v in want.items() if held.get(k) != v}
  if differ:
    text = ", ".join(f"{k} {a!r} (wanted {b!r})" for k, (a, b) in differ.items())
    raise ValueError(f"teacher store {store.path} does not hold these regions: {text}; compute a "
                     "store for this RegionSpec (its own folder, split_folder(split, "
                     "spec.record()))")


def region_key(key: tf.Tensor, region: tf.Tensor) -> tf.Tensor:
  """'<key>#<region>': the store row of region `region` of the example `key`."""
  return tf.strings.join([key, tf.strings.as_string(tf.cast(region, tf.int64))], separator="#")


def replay(key: tf.Tensor, region: tf.Tensor, spec: RegionSpec):
  """(window function `shape [H, W] -> int32 [y, x, h, w]`, flip bool []): the box and the flip of
  region `region` of the example `key` (what `augment.train_preprocess(region=...)` takes)."""
  key_hash = tf.strings.to_hash_bucket_fast(key, _NEVER)
  seed = tf.random.experimental.stateless_fold_in(
      tf.stack([tf.constant(spec.seed, tf.int64), key_hash]), tf.cast(region, tf.int64))
  s_crop, s_flip = augment_lib.split_seed(seed, 2)

  def window_fn(shape):
    return augment_lib.random_resized_crop_window(shape, s_crop, scale=spec.rrc_scale,
                                                  ratio=spec.rrc_ratio)

  return window_fn, (augment_lib.flip_decision(s_flip) if spec.flip else tf.constant(False))


def pick(example_seed: tf.Tensor, spec: RegionSpec) -> tf.Tensor:
  """int32 []: the region replayed for an example in one epoch, uniform over the R regions, drawn
  from the example's augmentation seed (its key, the run's seed and the epoch)."""
  seed = tf.random.experimental.stateless_fold_in(example_seed, 7919)
  return tf.random.stateless_uniform([], seed, 0, spec.regions_per_image, dtype=tf.int32)


def teacher_view(image_bytes: tf.Tensor, key: tf.Tensor, region: tf.Tensor, spec: RegionSpec,
                 cfg: augment_lib.AugmentConfig, *, dtype: tf.DType | None = None) -> tf.Tensor:
  """The image the teacher sees for region `region`: its box decoded and resized to
  `cfg.image_size`, flipped, normalised; no other augmentation."""
  size = cfg.image_size
  window_fn, flip = replay(key, region, spec)
  image = augment_lib.decode_and_crop(image_bytes, window_fn)
  image = augment_lib.ops.resize(image, [size, size], cfg.antialias, clip=False)
  image.set_shape([size, size, 3])
  image = augment_lib.compiled_flip_jitter_normalize((0.0, 0.0, 0.0, 0.0), True)(
      image, tf.zeros([4], tf.float32), flip)
  return tf.cast(image, dtype or cfg.tf_dtype)


def expand(records: tf.data.Dataset, spec: RegionSpec) -> tf.data.Dataset:
  """Each record R times, with '_region' 0..R-1 (the order of a region store's rows)."""
  regions = tf.data.Dataset.range(spec.regions_per_image)
  return records.flat_map(
      lambda r: regions.map(lambda i: {**r, "_region": tf.cast(i, tf.int32)}))
