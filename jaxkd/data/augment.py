"""Image decoding, augmentation and normalisation (the tf.data side of jaxkd).

Everything here is a pure TensorFlow function of an encoded image (or a batch) and
an explicit stateless seed (``int64 [2]``), so the same seed always gives the same
pixels, whatever thread, host or restart produced them.

Per-example training pipeline (``train_preprocess``), in this order:

1. Decode + crop, one of
   * ``random_resized_crop`` (Szegedy et al. 2015, "Going deeper with
     convolutions"; torchvision's RandomResizedCrop): a box of area
     ``s * H * W`` with ``s ~ U(rrc_scale)`` and aspect ratio
     ``r ~ logU(rrc_ratio)`` from ``tf.image.stateless_sample_distorted_bounding_box``
     (10 attempts, else the whole image), decoded with the fused
     ``tf.image.decode_and_crop_jpeg`` so only the box is decoded, then resized
     to ``image_size``;
   * ``resize_random_crop`` (seed 000): resize so the longest side is
     ``resize_longest`` (Food-101 already is 512), then a random
     ``image_size`` square crop (zero-padded when the image is smaller).
2. Horizontal flip with probability 1/2 (``flip``).
3. Colour jitter ``(brightness, contrast, saturation, hue)`` as torchvision's
   ColorJitter, in that fixed order: factors ``f ~ U(max(0, 1-b), 1+b)`` blend the
   image with black / its mean grey / its greyscale version,
   ``out = other + f * (img - other)``; hue shifts by ``d ~ U(-h, h)`` turns.
4. ``randaugment`` (Cubuk et al. 2020) or ``autoaugment='imagenet'`` (Cubuk et
   al. 2019), see ``RANDAUGMENT_OPS`` / ``AUTOAUGMENT_IMAGENET_POLICY``.
5. Normalise with the ImageNet mean/std (``MEAN_RGB``/``STD_RGB``, the only place
   these constants live): ``x = (pixel/255 - mean) / std``.
6. Random Erasing (Zhong et al. 2020) with probability ``random_erasing``
   (seed 001 uses 0.3): area ``U(0.02, 1/3)`` of the image, aspect ratio
   ``logU(0.3, 1/0.3)``, filled with N(0, 1) noise (``'pixel'``) or zeros
   (``'zero'``), in normalised units.

Batch-level (``mix_batch``): MixUp (Zhang et al. 2018), ``x = lam x_i + (1 - lam) x_j``
with ``lam ~ Beta(a, a)`` or ``U(mixup_lambda_range)`` (seed 001: ``(0.2, 0.4)``),
and CutMix (Yun et al. 2019), which pastes a box of area ``(1 - lam) H W`` from
``x_j`` and recomputes ``lam`` from the box actually pasted. The labels are mixed
with the same ``lam`` (``soft_label``). Stored ``teacher_logits`` (precomputed per
image on its eval view) are NOT mixed here: the batch keeps each example's own
``t_i`` and gains the partner's ``t_j`` as ``mix_teacher_logits``, because the
right mix is of the teacher's probabilities at the loss's temperature, after
logit standardisation / perception reconstruction, which only the train step
knows (``jaxkd.train.step`` mixes ``lam softmax(t_i / T) + (1 - lam) softmax(t_j / T)``;
its module docstring explains why not the logits).

Evaluation (``eval_preprocess``): resize the shorter side to
``image_size / eval_crop_fraction`` (0.875 -> 256 for 224) and take the centre
``image_size`` square; computed as a centre crop of side
``eval_crop_fraction * min(H, W)`` decoded with ``decode_and_crop_jpeg`` and resized.

Non-JPEG inputs (PNG from TFDS cifar, BMP, GIF, PNG files named .jpg in ImageNet)
take the ``tf.io.decode_image(channels=3, expand_animations=False)`` path; every
decode asks for 3 channels, so greyscale images come out RGB.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

# ImageNet statistics (RGB, fraction of 255) used by every torchvision/timm
# ImageNet-pretrained model. The ONLY place these constants live in jaxkd.
MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pixel value used to fill the area uncovered by geometric RandAugment/AutoAugment ops.
_FILL_VALUE = 128.0
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert('L')

TRAIN_CROPS = ("random_resized_crop", "resize_random_crop", "pad_random_crop")
ERASING_MODES = ("pixel", "zero")
_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Preprocessing/augmentation settings (the ``data.augment`` config keys).

  Attributes:
    image_size: output side in pixels (square).
    train_crop: 'random_resized_crop', 'resize_random_crop' (seed 000) or
      'pad_random_crop' (CIFAR: resize to image_size, zero-pad `crop_padding`
      pixels on every side, random image_size crop; torchvision's
      RandomCrop(32, padding=4)).
    crop_padding: padding of 'pad_random_crop' (4 for CIFAR).
    rrc_scale: area fraction range of the random-resized crop.
    rrc_ratio: aspect-ratio range (w/h) of the random-resized crop.
    resize_longest: longest side before the random crop of 'resize_random_crop'
      (0 = do not resize).
    flip: random horizontal flip.
    color_jitter: (brightness, contrast, saturation, hue) strengths, 0 = off.
    randaugment_num_ops: RandAugment N (0 = off).
    randaugment_magnitude: RandAugment M in [0, 10].
    autoaugment: None or 'imagenet'.
    random_erasing: probability of Random Erasing (0 = off).
    random_erasing_mode: 'pixel' (N(0,1) noise) or 'zero'.
    mixup_alpha: Beta(a, a) concentration for MixUp lambda (0 = off, unless
      mixup_lambda_range is set).
    mixup_lambda_range: (lo, hi): draw the MixUp lambda from U(lo, hi) instead.
    cutmix_alpha: Beta(a, a) concentration for CutMix (0 = off).
    mix_prob: probability that a batch is mixed at all.
    mix_switch_prob: probability of CutMix rather than MixUp when both are on.
    eval_crop_fraction: centre-crop fraction for evaluation (0.875).
    antialias: antialiased resizing (better quality when downscaling).
    dtype: 'float32' or 'bfloat16' output images.
  """
  image_size: int = 224
  train_crop: str = "random_resized_crop"
  rrc_scale: tuple[float, float] = (0.08, 1.0)
  rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  resize_longest: int = 512
  crop_padding: int = 4
  flip: bool = True
  color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
  randaugment_num_ops: int = 0
  randaugment_magnitude: float = 9.0
  autoaugment: str | None = None
  random_erasing: float = 0.0
  random_erasing_mode: str = "pixel"
  mixup_alpha: float = 0.0
  mixup_lambda_range: tuple[float, float] | None = None
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  mix_switch_prob: float = 0.5
  eval_crop_fraction: float = 0.875
  antialias: bool = True
  dtype: str = "float32"

  def __post_init__(self):
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}")
    if self.train_crop not in TRAIN_CROPS:
      raise ValueError(f"train_crop={self.train_crop!r}: use one of {TRAIN_CROPS}")
    lo, hi = self.rrc_scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"rrc_scale={self.rrc_scale}: need 0 < lo <= hi <= 1")
    lo, hi = self.rrc_ratio
    if not 0.0 < lo <= hi:
      raise ValueError(f"rrc_ratio={self.rrc_ratio}: need 0 < lo <= hi")
    if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
      raise ValueError(f"color_jitter={self.color_jitter}: give 4 non-negative strengths "
                       "(brightness, contrast, saturation, hue<=0.5)")
    if self.randaugment_num_ops < 0 or not 0.0 <= self.randaugment_magnitude <= 10.0:
      raise ValueError(f"randaugment ({self.randaugment_num_ops}, {self.randaugment_magnitude}): "
                       "need num_ops >= 0 and magnitude in [0, 10]")
    if self.autoaugment not in (None, "imagenet"):
      raise ValueError(f"autoaugment={self.autoaugment!r}: use None or 'imagenet'")
    if self.autoaugment and self.randaugment_num_ops:
      raise ValueError("choose either autoaugment or randaugment, not both")
    if not 0.0 <= self.random_erasing <= 1.0:
      raise ValueError(f"random_erasing={self.random_erasing}: a probability in [0, 1]")
    if self.random_erasing_mode not in ERASING_MODES:
      raise ValueError(f"random_erasing_mode={self.random_erasing_mode!r}: use one of {ERASING_MODES}")
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError(f"mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}: must be >= 0")
    if self.mixup_lambda_range is not None:
      lo, hi = self.mixup_lambda_range
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mixup_lambda_range={self.mixup_lambda_range}: need 0 <= lo <= hi <= 1")
    if not 0.0 < self.eval_crop_fraction <= 1.0:
      raise ValueError(f"eval_crop_fraction={self.eval_crop_fraction}: need a value in (0, 1]")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: use one of {tuple(_DTYPES)}")

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | None = None, **overrides) -> "AugmentConfig":
    """Builds a config from a dict / ml_collections.ConfigDict (unknown keys are an error)."""
    values = dict(cfg or {})
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown augmentation keys {unknown}; known keys: {sorted(names)}")
    for k in ("rrc_scale", "rrc_ratio", "color_jitter", "mixup_lambda_range"):
      if values.get(k) is not None:
        values[k] = tuple(float(x) for x in values[k])
    return cls(**values)

  @property
  def mixing(self) -> bool:
    """Whether batches get MixUp and/or CutMix."""
    return self.mixup_enabled or self.cutmix_alpha > 0

  @property
  def mixup_enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.mixup_lambda_range is not None

  @property
  def tf_dtype(self) -> tf.DType:
    return _DTYPES[self.dtype]


def as_config(cfg: AugmentConfig | Mapping[str, Any] | None, **overrides) -> AugmentConfig:
  """Accepts an AugmentConfig, a mapping of its keys, or None (defaults)."""
  if isinstance(cfg, AugmentConfig):
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
  return AugmentConfig.from_mapping(cfg, **overrides)


# ----------------------------------------------------------------------------- seeds


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """``num`` independent stateless seeds (each int64 [2]) derived from ``seed``."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
  return [seeds[i] for i in range(num)]


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


# ----------------------------------------------------------------------------- decoding


def _decode_non_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/BMP/GIF bytes to uint8 [H, W, 3] (greyscale -> RGB)."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.io.decode_jpeg(image_bytes, channels=3),
                 lambda: _decode_non_jpeg(image_bytes))


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
  """int32 [H, W] of an encoded image (JPEG: header only, others: decoded)."""
  return tf.cond(tf.io.is_jpeg(image_bytes),
                 lambda: tf.io.extract_jpeg_shape(image_bytes)[:2],
                 lambda: tf.shape(_decode_non_jpeg(image_bytes))[:2])


def decode_and_crop(image_bytes: tf.Tensor,
                    window_fn: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
  """Decodes only the window ``window_fn([H, W]) -> int32 [y, x, h, w]``.

  JPEG uses the fused ``tf.image.decode_and_crop_jpeg`` (only the needed DCT
  blocks are decoded); other formats are fully decoded, then sliced.
  """
  def jpeg():
    window = window_fn(tf.io.extract_jpeg_shape(image_bytes)[:2])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = _decode_non_jpeg(image_bytes)
    window = window_fn(tf.shape(image)[:2])
    return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def random_resized_crop_window(shape: tf.Tensor, seed: tf.Tensor, *,
                               scale: Sequence[float], ratio: Sequence[float]) -> tf.Tensor:
  """[y, x, h, w] of a random box with area fraction ~U(scale) and aspect ~ratio."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size=tf.concat([tf.cast(shape, tf.int32), [3]], axis=0),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=tuple(ratio),
      area_range=tuple(scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(shape: tf.Tensor, fraction: float) -> tf.Tensor:
  """[y, x, s, s]: the centred square of side ``round(fraction * min(H, W))``."""
  h, w = shape[0], shape[1]
  side = tf.cast(tf.round(fraction * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def _resize(image: tf.Tensor, size: Sequence[int] | tf.Tensor, antialias: bool) -> tf.Tensor:
  """Bilinear resize to float32 [h, w, 3] in [0, 255]."""
  out = tf.image.resize(image, size, method="bilinear", antialias=antialias)
  return tf.clip_by_value(out, 0.0, 255.0)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """float pixels in [0, 255] -> (x/255 - MEAN_RGB) / STD_RGB."""
  mean = tf.constant([m * 255.0 for m in MEAN_RGB], tf.float32)
  std = tf.constant([s * 255.0 for s in STD_RGB], tf.float32)
  return (tf.cast(image, tf.float32) - mean) / std


def denormalize(image: tf.Tensor) -> tf.Tensor:
  """Inverse of ``normalize`` (back to [0, 255] floats)."""
  mean = tf.constant([m * 255.0 for m in MEAN_RGB], tf.float32)
  std = tf.constant([s * 255.0 for s in STD_RGB], tf.float32)
  return tf.cast(image, tf.float32) * std + mean


# ----------------------------------------------------------------------------- colour


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: ``other + factor * (image - other)``, clipped to [0, 255]."""
  return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(image * tf.constant(_GRAY_WEIGHTS, tf.float32), axis=-1, keepdims=True)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strengths: Sequence[float]) -> tf.Tensor:
  """torchvision ColorJitter(brightness, contrast, saturation, hue), fixed order."""
  b, c, s, h = strengths
  seeds = split_seed(seed, 4)
  if b > 0:
    image = _blend(image, tf.zeros_like(image), _uniform(seeds[0], max(0.0, 1 - b), 1 + b))
  if c > 0:
    mean = tf.reduce_mean(_grayscale(image))
    image = _blend(image, mean, _uniform(seeds[1], max(0.0, 1 - c), 1 + c))
  if s > 0:
    image = _blend(image, _grayscale(image), _uniform(seeds[2], max(0.0, 1 - s), 1 + s))
  if h > 0:
    image = tf.image.adjust_hue(image / 255.0, _uniform(seeds[3], -h, h)) * 255.0
    image = tf.clip_by_value(image, 0.0, 255.0)
  return image


# ----------------------------------------------------------------------------- RandAugment / AutoAugment ops
# Images are float32 [H, W, 3] with values in [0, 255]; ``level`` is the fraction
# of the op's maximum strength, in [0, 1].

_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE_FRAC = 150.0 / 331.0  # AutoAugment's 150 px on 331 px images
_MAX_ENHANCE = 0.9                   # factor 1 +- 0.9
_MAX_POSTERIZE_DROP = 4.0            # 8 -> 4 bits


def _transform(image: tf.Tensor, transform: Sequence[tf.Tensor]) -> tf.Tensor:
  """Projective warp: output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
  t = tf.cast(tf.stack(transform), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=t, output_shape=tf.shape(image)[:2],
      fill_value=_FILL_VALUE, interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


def _signed(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.where(negate, -value, value)


def op_identity(image, level, negate):
  del level, negate
  return image


def op_autocontrast(image, level, negate):
  """Per channel, stretch [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
  del level, negate
  lo = tf.reduce_min(image, axis=[0, 1])
  hi = tf.reduce_max(image, axis=[0, 1])
  ok = hi > lo
  scale = tf.where(ok, 255.0 / tf.where(ok, hi - lo, 1.0), 1.0)
  offset = tf.where(ok, lo, 0.0)
  return tf.clip_by_value((image - offset) * scale, 0.0, 255.0)


def op_equalize(image, level, negate):
  """Per-channel histogram equalisation with PIL's ImageOps.equalize rule.

  ``step = (N - h[last non-empty bin]) // 255``; ``lut[i] = (step // 2 + sum_{j<i} h[j]) // step``;
  identity when ``step == 0``.
  """
  del level, negate
  pix = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)
  channels = []
  for c in range(3):
    ch = pix[..., c]
    hist = tf.math.bincount(tf.reshape(ch, [-1]), minlength=256, maxlength=256, dtype=tf.int32)
    nonzero = tf.where(hist > 0)[:, 0]
    last = tf.gather(hist, nonzero[-1])
    step = (tf.reduce_sum(hist) - last) // 255
    safe = tf.maximum(step, 1)
    lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // safe
    lut = tf.clip_by_value(lut, 0, 255)
    channels.append(tf.where(step > 0, tf.gather(lut, ch), ch))
  return tf.cast(tf.stack(channels, axis=-1), tf.float32)


def op_invert(image, level, negate):
  del level, negate
  return 255.0 - image


def op_rotate(image, level, negate):
  """Rotate about the centre by up to +-30 degrees."""
  angle = _signed(level * _MAX_ROTATE_DEG, negate) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def op_shear_x(image, level, negate):
  s = _signed(level * _MAX_SHEAR, negate)
  return _transform(image, [1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def op_shear_y(image, level, negate):
  s = _signed(level * _MAX_SHEAR, negate)
  return _transform(image, [1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0])


def op_translate_x(image, level, negate):
  t = _signed(level * _MAX_TRANSLATE_FRAC * tf.cast(tf.shape(image)[1], tf.float32), negate)
  return _transform(image, [1.0, 0.0, t, 0.0, 1.0, 0.0, 0.0, 0.0])


def op_translate_y(image, level, negate):
  t = _signed(level * _MAX_TRANSLATE_FRAC * tf.cast(tf.shape(image)[0], tf.float32), negate)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, t, 0.0, 0.0])


def op_solarize(image, level, negate):
  """Invert pixels >= threshold, threshold = 256 * (1 - level)."""
  del negate
  threshold = 256.0 * (1.0 - level)
  return tf.where(image < threshold, image, 255.0 - image)


def op_posterize(image, level, negate):
  """Keep the top ``round(8 - 4 level)`` bits of each channel."""
  del negate
  shift = tf.cast(tf.round(level * _MAX_POSTERIZE_DROP), tf.int32)
  pix = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pix, shift), shift), tf.float32)


def _enhance_factor(level, negate):
  return 1.0 + _signed(level * _MAX_ENHANCE, negate)


def op_color(image, level, negate):
  return _blend(image, _grayscale(image), _enhance_factor(level, negate))


def op_contrast(image, level, negate):
  return _blend(image, tf.reduce_mean(_grayscale(image)), _enhance_factor(level, negate))


def op_brightness(image, level, negate):
  return _blend(image, tf.zeros_like(image), _enhance_factor(level, negate))


def op_sharpness(image, level, negate):
  """Blend with PIL's SMOOTH-filtered image (kernel [[1,1,1],[1,5,1],[1,1,1]]/13, borders kept)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  blurred = tf.pad(blurred, [[1, 1], [1, 1], [0, 0]])
  inner = tf.pad(tf.ones(tf.shape(image)[:2] - 2, tf.float32), [[1, 1], [1, 1]])[..., None]
  degenerate = inner * blurred + (1.0 - inner) * image
  return _blend(image, degenerate, _enhance_factor(level, negate))


_OPS: dict[str, Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]] = {
    "Identity": op_identity, "AutoContrast": op_autocontrast, "Equalize": op_equalize,
    "Invert": op_invert, "Rotate": op_rotate, "ShearX": op_shear_x, "ShearY": op_shear_y,
    "TranslateX": op_translate_x, "TranslateY": op_translate_y, "Solarize": op_solarize,
    "Posterize": op_posterize, "Color": op_color, "Contrast": op_contrast,
    "Brightness": op_brightness, "Sharpness": op_sharpness,
}

# RandAugment's 14 transformations (Cubuk et al. 2020, Sec. 3). Magnitude M in
# [0, 10] maps to level = M / 10 of the maxima above: rotate 30 deg, shear 0.3,
# translate 150/331 of the side, enhance factor 1 +- 0.9, posterize 8 -> 4 bits,
# solarize threshold 256 -> 0; the sign of signed ops is random.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")

# AutoAugment ImageNet policy (Cubuk et al. 2019, appendix): 25 sub-policies of
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


def apply_op(name: str, image: tf.Tensor, level: float | tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  """Applies op ``name`` (a key of ``RANDAUGMENT_OPS`` or 'Invert') at ``level`` in [0, 1]."""
  if name not in _OPS:
    raise ValueError(f"unknown augmentation op {name!r}; known: {sorted(_OPS)}")
  out = _OPS[name](image, tf.cast(level, tf.float32), negate)
  out.set_shape(image.shape)
  return out


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, num_ops: int, magnitude: float) -> tf.Tensor:
  """RandAugment: ``num_ops`` ops drawn uniformly (with replacement) from RANDAUGMENT_OPS."""
  level = magnitude / 10.0
  for s in split_seed(seed, num_ops):
    s_op, s_sign = split_seed(s, 2)
    index = tf.random.stateless_uniform([], s_op, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
    negate = _uniform(s_sign) < 0.5
    branches = [(lambda name=name, img=image: apply_op(name, img, level, negate))
                for name in RANDAUGMENT_OPS]
    image = tf.switch_case(index, branches)
  return image


def autoaugment_imagenet(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """AutoAugment with the ImageNet policy: one random sub-policy per image."""
  s_pick, s1, s2, s3, s4 = split_seed(seed, 5)
  index = tf.random.stateless_uniform([], s_pick, 0, len(AUTOAUGMENT_IMAGENET_POLICY), dtype=tf.int32)

  def sub_policy(steps, img):
    for (name, prob, mag), s_apply, s_sign in zip(steps, (s1, s2), (s3, s4)):
      negate = _uniform(s_sign) < 0.5
      img = tf.cond(_uniform(s_apply) < prob,
                    lambda name=name, mag=mag, img=img, negate=negate: apply_op(name, img, mag / 9.0, negate),
                    lambda img=img: img)
    return img

  branches = [(lambda steps=steps: sub_policy(steps, image)) for steps in AUTOAUGMENT_IMAGENET_POLICY]
  return tf.switch_case(index, branches)


# ----------------------------------------------------------------------------- Random Erasing


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float, mode: str = "pixel",
                   area: Sequence[float] = (0.02, 1.0 / 3.0),
                   ratio: Sequence[float] = (0.3, 1.0 / 0.3), attempts: int = 10) -> tf.Tensor:
  """Random Erasing (Zhong et al. 2020) on a normalised float image [H, W, C].

  With probability ``probability``, erases a box of area ``U(area) * H * W`` and aspect
  ``exp(U(log ratio))``, the first of ``attempts`` candidates that fits, filling it
  with N(0, 1) noise (mode 'pixel') or zeros (mode 'zero').
  """
  if mode not in ERASING_MODES:
    raise ValueError(f"random erasing mode {mode!r}: use one of {ERASING_MODES}")
  s_apply, s_area, s_ratio, s_top, s_left, s_fill = split_seed(seed, 6)
  height, width = image.shape[0], image.shape[1]
  areas = _uniform(s_area, area[0], area[1], [attempts]) * float(height * width)
  ratios = tf.exp(_uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), [attempts]))
  hs = tf.cast(tf.round(tf.sqrt(areas * ratios)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(areas / ratios)), tf.int32)
  valid = (hs < height) & (ws < width) & (hs > 0) & (ws > 0)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
  do_erase = tf.reduce_any(valid) & (_uniform(s_apply) < probability)
  h, w = hs[first], ws[first]
  top = tf.random.stateless_uniform([], s_top, 0, tf.maximum(height - h + 1, 1), dtype=tf.int32)
  left = tf.random.stateless_uniform([], s_left, 0, tf.maximum(width - w + 1, 1), dtype=tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & do_erase
  if mode == "pixel":
    fill = tf.random.stateless_normal(tf.shape(image), s_fill, dtype=image.dtype)
  else:
    fill = tf.zeros_like(image)
  return tf.where(box[..., None], fill, image)


# ----------------------------------------------------------------------------- per-example pipelines


def train_preprocess(image_bytes: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig,
                     *, dtype: tf.DType | None = None) -> tf.Tensor:
  """Encoded image + stateless seed -> augmented, normalised [S, S, 3] image.

  ``dtype`` overrides ``cfg.dtype`` (the pipeline keeps float32 until MixUp/CutMix).
  """
  size = cfg.image_size
  s_crop, s_flip, s_jitter, s_policy, s_erase = split_seed(seed, 5)
  if cfg.train_crop == "random_resized_crop":
    image = decode_and_crop(image_bytes, lambda shape: random_resized_crop_window(
        shape, s_crop, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio))
    image = _resize(image, [size, size], cfg.antialias)
  elif cfg.train_crop == "pad_random_crop":
    image = tf.cast(decode_image(image_bytes), tf.float32)
    image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                    lambda: _resize(image, [size, size], cfg.antialias))
    pad = cfg.crop_padding
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=s_crop)
  else:  # resize_random_crop (seed 000)
    image = tf.cast(decode_image(image_bytes), tf.float32)
    if cfg.resize_longest:
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = cfg.resize_longest / tf.reduce_max(shape)
      new = tf.cast(tf.round(shape * scale), tf.int32)
      image = tf.cond(tf.reduce_all(new == tf.shape(image)[:2]), lambda: image,
                      lambda: _resize(image, new, cfg.antialias))
    shape = tf.shape(image)
    image = tf.image.pad_to_bounding_box(image, 0, 0, tf.maximum(shape[0], size), tf.maximum(shape[1], size))
    image = tf.image.stateless_random_crop(image, [size, size, 3], seed=s_crop)
  image.set_shape([size, size, 3])
  if cfg.flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=s_flip)
  if any(cfg.color_jitter):
    image = color_jitter(image, s_jitter, cfg.color_jitter)
  if cfg.randaugment_num_ops:
    image = randaugment(image, s_policy, num_ops=cfg.randaugment_num_ops,
                        magnitude=cfg.randaugment_magnitude)
  elif cfg.autoaugment == "imagenet":
    image = autoaugment_imagenet(image, s_policy)
  image = normalize(image)
  if cfg.random_erasing > 0:
    image = random_erasing(image, s_erase, probability=cfg.random_erasing, mode=cfg.random_erasing_mode)
  return tf.cast(image, dtype or cfg.tf_dtype)


def eval_preprocess(image_bytes: tf.Tensor, cfg: AugmentConfig,
                    *, dtype: tf.DType | None = None) -> tf.Tensor:
  """Centre crop (resize shorter side to S / crop_fraction, crop S), normalised [S, S, 3]."""
  size = cfg.image_size
  image = decode_and_crop(image_bytes, lambda shape: center_crop_window(shape, cfg.eval_crop_fraction))
  image = _resize(image, [size, size], cfg.antialias)
  image.set_shape([size, size, 3])
  return tf.cast(normalize(image), dtype or cfg.tf_dtype)


# ----------------------------------------------------------------------------- batch-level mixing


def _sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) via two Gamma(alpha) draws: g1 / (g1 + g2)."""
  s1, s2 = split_seed(seed, 2)
  g1 = tf.random.stateless_gamma([], s1, alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha)
  return g1 / tf.maximum(g1 + g2, 1e-12)


def mix_batch(batch: dict[str, tf.Tensor], seed: tf.Tensor, cfg: AugmentConfig,
              *, num_classes: int) -> dict[str, tf.Tensor]:
  """MixUp / CutMix over a batch, each example with a randomly permuted partner.

  Adds 'mix_label' (partner's int32 label), 'mix_lambda' (float32 [B], weight of the
  example's own label; 1 = unmixed) and 'soft_label' (float32 [B, C] =
  lam onehot(label) + (1 - lam) onehot(mix_label)). A 'teacher_logits' field stays
  the example's own row; the partner's row is added as 'mix_teacher_logits'
  (float32 [B, C]) for the train step to mix (see module docstring).
  One lam (and one CutMix box) per batch; with probability 1 - mix_prob the batch is
  left unmixed (lam = 1).
  """
  images = tf.cast(batch["image"], tf.float32)
  labels = batch["label"]
  b = tf.shape(images)[0]
  height, width = images.shape[1], images.shape[2]
  s_perm, s_switch, s_mix, s_cut, s_apply, s_cy, s_cx = split_seed(seed, 7)
  perm = tf.random.experimental.stateless_shuffle(tf.range(b), s_perm)

  def mixup():
    if cfg.mixup_lambda_range is not None:
      lam = _uniform(s_mix, cfg.mixup_lambda_range[0], cfg.mixup_lambda_range[1])
    else:
      lam = _sample_beta(s_mix, cfg.mixup_alpha)
    return lam * images + (1.0 - lam) * tf.gather(images, perm), lam

  def cutmix():
    lam = _sample_beta(s_cut, cfg.cutmix_alpha)
    cut = tf.sqrt(1.0 - lam)
    ch = tf.cast(cut * height, tf.int32)
    cw = tf.cast(cut * width, tf.int32)
    cy = tf.random.stateless_uniform([], s_cy, 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], s_cx, 0, width, dtype=tf.int32)
    y1, y2 = tf.clip_by_value(cy - ch // 2, 0, height), tf.clip_by_value(cy + ch // 2, 0, height)
    x1, x2 = tf.clip_by_value(cx - cw // 2, 0, width), tf.clip_by_value(cx + cw // 2, 0, width)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    mixed = tf.where(box[None, :, :, None], tf.gather(images, perm), images)
    lam = 1.0 - tf.cast((y2 - y1) * (x2 - x1), tf.float32) / float(height * width)
    return mixed, lam

  if cfg.mixup_enabled and cfg.cutmix_alpha > 0:
    mixed, lam = tf.cond(_uniform(s_switch) < cfg.mix_switch_prob, cutmix, mixup)
  elif cfg.cutmix_alpha > 0:
    mixed, lam = cutmix()
  elif cfg.mixup_enabled:
    mixed, lam = mixup()
  else:
    raise ValueError("mix_batch called but neither MixUp nor CutMix is enabled in the config")
  apply = _uniform(s_apply) < cfg.mix_prob
  lam = tf.where(apply, lam, 1.0)
  mixed = tf.where(apply, mixed, images)

  out = dict(batch)
  out["image"] = tf.cast(mixed, batch["image"].dtype)
  partner = tf.gather(labels, perm)
  out["mix_label"] = partner
  out["mix_lambda"] = tf.fill([b], lam)
  out["soft_label"] = (lam * tf.one_hot(labels, num_classes, dtype=tf.float32)
                       + (1.0 - lam) * tf.one_hot(partner, num_classes, dtype=tf.float32))
  if "teacher_logits" in batch:
    out["mix_teacher_logits"] = tf.gather(tf.cast(batch["teacher_logits"], tf.float32), perm)
  return out
