"""Augmentation policies: RandAugment, AutoAugment's ImageNet policy, and the per-example
training and evaluation pipelines (``train_preprocess``, ``eval_preprocess``) that run the
operations of ``jaxkd.data.augment.ops`` in a fixed order (see ``jaxkd.data.augment``).

References: AutoAugment (Cubuk, Zoph, Mane, Vasudevan and Le, "AutoAugment: Learning
Augmentation Strategies from Data", CVPR 2019); RandAugment (Cubuk, Zoph, Shlens and Le,
"RandAugment: Practical Automated Data Augmentation with a Reduced Search Space", CVPR
Workshops 2020); the random-resized crop (Szegedy et al., "Going Deeper with Convolutions",
CVPR 2015); Random Erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

from jaxkd.data.augment.config import AugmentConfig
from jaxkd.data.augment.ops import (
    apply_color_jitter,
    apply_op,
    center_crop_window,
    color_jitter_factors,
    decode_and_crop,
    decode_image,
    normalize,
    random_erasing,
    random_resized_crop_window,
    resize,
    split_seed,
    uniform,
)

# RandAugment's 14 transformations (Cubuk et al., CVPR Workshops 2020, Sec. 3). Magnitude M in
# [0, 10] maps to level = M / 10 of the maxima in ``ops``: rotate 30 deg, shear 0.3,
# translate 150/331 of the side, enhance factor 1 +- 0.9, posterize 8 -> 4 bits,
# solarize threshold 256 -> 0; the sign of signed ops is random.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")

# AutoAugment ImageNet policy (Cubuk et al., CVPR 2019, appendix): 25 sub-policies of
# two (op, probability, magnitude bin 0..9) steps; bin m maps to level = m / 9
# (10 evenly spaced magnitudes over each op's range, as in the paper).
AUTOAUGMENT_IMAGENET_POLICY: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.8, 0), ("Equalize", 0.6, 0)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 0), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 0), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 0)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, 0)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 0), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 0)),
    (("Equalize", 0.0, 0), ("Equalize", 0.8, 0)),
    (("Invert", 0.6, 0), ("Equalize", 1.0, 0)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 0)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 0)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 0)),
    (("Equalize", 0.4, 0), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 0)),
    (("Invert", 0.6, 0), ("Equalize", 1.0, 0)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 0), ("Equalize", 0.6, 0)),
)


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, num_ops: int, magnitude: float) -> tf.Tensor:
  """RandAugment (Cubuk et al., CVPR Workshops 2020): ``num_ops`` ops drawn uniformly (with
  replacement) from RANDAUGMENT_OPS, each at level ``magnitude / 10`` with a random sign."""
  level = magnitude / 10.0
  for s in split_seed(seed, num_ops):
    s_op, s_sign = split_seed(s, 2)
    index = tf.random.stateless_uniform([], s_op, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
    negate = uniform(s_sign) < 0.5
    branches = [(lambda name=name, img=image, negate=negate: apply_op(name, img, level, negate))
                for name in RANDAUGMENT_OPS]
    image = tf.switch_case(index, branches)
  return image


def autoaugment_imagenet(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """AutoAugment (Cubuk et al., CVPR 2019) with the ImageNet policy: one random sub-policy per
  image."""
  s_pick, s1, s2, s3, s4 = split_seed(seed, 5)
  index = tf.random.stateless_uniform([], s_pick, 0, len(AUTOAUGMENT_IMAGENET_POLICY),
                                      dtype=tf.int32)

  def sub_policy(steps, img):
    for (name, prob, mag), s_apply, s_sign in zip(steps, (s1, s2), (s3, s4)):
      negate = uniform(s_sign) < 0.5
      img = tf.cond(uniform(s_apply) < prob,
                    lambda name=name, mag=mag, img=img, negate=negate: apply_op(
                        name, img, mag / 9.0, negate),
                    lambda img=img: img)
    return img

  branches = [(lambda steps=steps: sub_policy(steps, image))
              for steps in AUTOAUGMENT_IMAGENET_POLICY]
  return tf.switch_case(index, branches)


# ----------------------------------------------------------------------------- per-example pipeline


def flip_decision(seed: tf.Tensor) -> tf.Tensor:
  """bool []: whether ``tf.image.stateless_random_flip_left_right(image, seed)`` flips (its own
  draw, U[0, 1) < 1/2), for flipping inside a compiled function."""
  return tf.random.stateless_uniform([], seed, minval=0.0, maxval=1.0) < 0.5


@functools.cache
def compiled_flip_jitter_normalize(strengths: tuple[float, float, float, float],
                                   normalize_too: bool):
  """``(image [S, S, 3] float32, factors [4], flip bool []) -> image``: clip to [0, 255], flip
  left-right if ``flip``, the colour jitter (``apply_color_jitter`` with ``strengths``), then, if
  ``normalize_too``, ``normalize``; as one XLA-compiled TensorFlow function
  (``tf.function(jit_compile=True)``).

  Run op by op, these elementwise passes took 3.1 ms of a 5.3 ms training preprocessing
  per 512-px Food-101 JPEG on one core; compiled, XLA fuses them into a few loops over the
  image, 0.7 ms (``bench/bench_input.py``); taking the resize's clip and the flip in as well
  saved two more passes, 0.2 ms. The random factors and the flip are drawn outside
  (``color_jitter_factors``, ``flip_decision``): XLA's stateless generators are not
  TensorFlow's, so drawing inside would change the augmentation a seed gives. The pixels
  agree with the op-by-op path to float32 rounding (tests/test_data_pipeline.py).
  """
  def flip_jitter_normalize(image, factors, flip):
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.where(flip, tf.reverse(image, [1]), image)
    if any(strengths):
      image = apply_color_jitter(image, factors, strengths)
    return normalize(image) if normalize_too else image

  return tf.function(flip_jitter_normalize, jit_compile=True, reduce_retracing=True)


_NO_JITTER = (0.0, 0.0, 0.0, 0.0)


@functools.cache
def _compiled_flip_to_uint8():
  """``(image [S, S, 3] float32, flip bool []) -> uint8``: clip to [0, 255], round, flip
  left-right if ``flip``; one XLA-compiled pass over the image."""
  def flip_to_uint8(image, flip):
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.where(flip, tf.reverse(image, [1]), image)

  return tf.function(flip_to_uint8, jit_compile=True, reduce_retracing=True)


def _train_crop(image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig,
                region: tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor] | None
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Step 1 and the flip decision of step 2 of the module docstring: (float32 [S, S, 3] crop,
  not yet clipped to [0, 255], flip bool [])."""
  size = cfg.image_size
  s_crop, s_flip = split_seed(seed, 5)[:2]
  if region is not None or cfg.train_crop == "random_resized_crop":
    window_fn = region[0] if region is not None else lambda shape: random_resized_crop_window(
        shape, s_crop, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio)
    image = decode_and_crop(image_bytes, window_fn)
    image = resize(image, [size, size], cfg.antialias, clip=False)
  elif cfg.train_crop == "pad_random_crop":
    image = tf.cast(decode_image(image_bytes), tf.float32)
    image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                    lambda: resize(image, [size, size], cfg.antialias))
    pad = cfg.crop_padding
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=s_crop)
  else:  # resize_random_crop (the Food-101 KD + ECA manuscript's crop)
    image = tf.cast(decode_image(image_bytes), tf.float32)
    if cfg.resize_longest:
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = cfg.resize_longest / tf.reduce_max(shape)
      new = tf.cast(tf.round(shape * scale), tf.int32)
      image = tf.cond(tf.reduce_all(new == tf.shape(image)[:2]), lambda: image,
                      lambda: resize(image, new, cfg.antialias))
    shape = tf.shape(image)
    image = tf.image.pad_to_bounding_box(image, 0, 0, tf.maximum(shape[0], size),
                                         tf.maximum(shape[1], size))
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=s_crop)
  image.set_shape([size, size, 3])
  if region is not None:
    flip = region[1]
  else:
    flip = flip_decision(s_flip) if cfg.flip else tf.constant(False)
  return image, flip


def train_preprocess(image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig,
                     *, dtype: tf.DType | None = None,
                     region: tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor] | None = None
                     ) -> tf.Tensor:
  """Encoded image + stateless seed -> augmented, normalised [S, S, 3] image.

  ``dtype`` overrides ``cfg.dtype`` (the pipeline keeps float32 until MixUp/CutMix).
  ``region`` = (window function ``[H, W] -> [y, x, h, w]``, flip bool) replays a stored crop
  (``jaxkd.data.regions``): that box and flip replace the random-resized crop's random ones; the
  rest of the augmentation is drawn from ``seed`` as usual.
  """
  _, _, s_jitter, s_policy, s_erase = split_seed(seed, 5)
  image, flip = _train_crop(image_bytes, seed, cfg, region)
  strengths = tuple(float(x) for x in cfg.color_jitter)
  factors = color_jitter_factors(s_jitter, strengths)
  if cfg.randaugment_num_ops or cfg.autoaugment == "imagenet":
    # the policy runs between the jitter and the normalisation
    image = compiled_flip_jitter_normalize(strengths, False)(image, factors, flip)
    if cfg.randaugment_num_ops:
      image = randaugment(image, s_policy, num_ops=cfg.randaugment_num_ops,
                          magnitude=cfg.randaugment_magnitude)
    else:
      image = autoaugment_imagenet(image, s_policy)
    strengths, flip = _NO_JITTER, tf.constant(False)
  image = compiled_flip_jitter_normalize(strengths, True)(image, factors, flip)
  if cfg.random_erasing > 0:
    image = random_erasing(image, s_erase, probability=cfg.random_erasing,
                           mode=cfg.random_erasing_mode)
  return tf.cast(image, dtype or cfg.tf_dtype)


def train_preprocess_uint8(image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig, *,
                           region: tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor] | None = None
                           ) -> tuple[tf.Tensor, tf.Tensor]:
  """The host half of ``train_preprocess`` for ``cfg.color_on_device``: (uint8 [S, S, 3] crop,
  resized, rounded and flipped; float32 [4] colour-jitter factors). The same seed gives the same
  crop, flip and factors as ``train_preprocess``; ``jaxkd.train.color.jitter_and_normalize``
  finishes the image in the train step."""
  image, flip = _train_crop(image_bytes, seed, cfg, region)
  image = _compiled_flip_to_uint8()(image, flip)
  factors = color_jitter_factors(split_seed(seed, 5)[2], tuple(float(x) for x in cfg.color_jitter))
  return image, factors


def eval_preprocess(image_bytes: tf.Tensor, cfg: AugmentConfig,
                    *, dtype: tf.DType | None = None) -> tf.Tensor:
  """Centre crop (resize shorter side to S / crop_fraction, crop S), normalised [S, S, 3]."""
  size = cfg.image_size
  image = decode_and_crop(image_bytes,
                          lambda shape: center_crop_window(shape, cfg.eval_crop_fraction))
  image = resize(image, [size, size], cfg.antialias, clip=False)
  image.set_shape([size, size, 3])
  image = compiled_flip_jitter_normalize(_NO_JITTER, True)(image, tf.zeros([4], tf.float32),
                                                           tf.constant(False))
  return tf.cast(image, dtype or cfg.tf_dtype)


