"""The image operations of the augmentation pipeline, each a pure TensorFlow function.

Stateless seeds (``split_seed``), decoding (``decode_image``, the fused ``decode_and_crop``),
crop windows, bilinear resizing, ImageNet normalisation (``MEAN_RGB`` / ``STD_RGB``), colour
jitter, the RandAugment / AutoAugment image operations (``op_*``, ``apply_op``) and Random
Erasing. Which of them run, in which order, is ``jaxkd.data.augment.policies``.

References: AutoAugment (Cubuk, Zoph, Mane, Vasudevan and Le, "AutoAugment: Learning
Augmentation Strategies from Data", CVPR 2019); RandAugment (Cubuk, Zoph, Shlens and Le,
"RandAugment: Practical Automated Data Augmentation with a Reduced Search Space", CVPR
Workshops 2020); Random Erasing (Zhong, Zheng, Kang, Li and Yang, "Random Erasing Data
Augmentation", AAAI 2020).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from jaxkd.pixels import GRAY_WEIGHTS as _GRAY_WEIGHTS
from jaxkd.pixels import MEAN_RGB, STD_RGB

# Pixel value used to fill the area uncovered by geometric RandAugment/AutoAugment ops.
_FILL_VALUE = 128.0

ERASING_MODES = ("pixel", "zero")


# ----------------------------------------------------------------------------- seeds


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """``num`` independent stateless seeds (each int64 [2]) derived from ``seed``."""
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
  return [seeds[i] for i in range(num)]


def uniform(seed, minval=0.0, maxval=1.0, shape=()):
  """float32 ``U(minval, maxval)`` of ``shape`` from a stateless seed."""
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


def resize(image: tf.Tensor, size: Sequence[int] | tf.Tensor, antialias: bool, *,
           clip: bool = True) -> tf.Tensor:
  """Bilinear resize to float32 [h, w, 3], clipped to [0, 255] unless ``clip`` is False.

  ``antialias`` widens the filter along an axis that shrinks (TensorFlow's ScaleAndTranslate);
  along an axis that grows it is plain bilinear interpolation. So when neither axis shrinks the
  faster bilinear kernel runs instead: the same pixels to float32 rounding (4.6e-5 grey levels
  measured), at a quarter of the time for a 180 x 190 crop to 224 px.
  """
  def bilinear():
    return tf.image.resize(image, size, method="bilinear", antialias=False)

  if antialias:
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size, tf.int32))
    out = tf.cond(shrinks, lambda: tf.image.resize(image, size, method="bilinear",
                                                   antialias=True), bilinear)
  else:
    out = bilinear()
  return tf.clip_by_value(out, 0.0, 255.0) if clip else out


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


def color_jitter_factors(seed: tf.Tensor, strengths: Sequence[float]) -> tf.Tensor:
  """float32 [4]: the random (brightness, contrast, saturation, hue) of ``color_jitter``.

  Factors ``U(max(0, 1 - x), 1 + x)`` for the first three, a shift ``U(-h, h)`` for the hue;
  the neutral value (1, 1, 1, 0) for a strength of 0.
  """
  b, c, s, h = strengths
  seeds = split_seed(seed, 4)
  return tf.stack([
      uniform(seeds[0], max(0.0, 1 - b), 1 + b) if b > 0 else tf.constant(1.0),
      uniform(seeds[1], max(0.0, 1 - c), 1 + c) if c > 0 else tf.constant(1.0),
      uniform(seeds[2], max(0.0, 1 - s), 1 + s) if s > 0 else tf.constant(1.0),
      uniform(seeds[3], -h, h) if h > 0 else tf.constant(0.0)])


def apply_color_jitter(image: tf.Tensor, factors: tf.Tensor,
                       strengths: Sequence[float]) -> tf.Tensor:
  """``color_jitter`` with its random ``factors`` given (``color_jitter_factors``); only the
  adjustments whose strength is > 0 run. No random numbers: it can be compiled with XLA."""
  b, c, s, h = strengths
  if b > 0:
    image = _blend(image, tf.zeros_like(image), factors[0])
  if c > 0:
    image = _blend(image, tf.reduce_mean(_grayscale(image)), factors[1])
  if s > 0:
    image = _blend(image, _grayscale(image), factors[2])
  if h > 0:
    image = tf.image.adjust_hue(image / 255.0, factors[3]) * 255.0
    image = tf.clip_by_value(image, 0.0, 255.0)
  return image


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strengths: Sequence[float]) -> tf.Tensor:
  """torchvision ColorJitter(brightness, contrast, saturation, hue), fixed order: factors
  ``f ~ U(max(0, 1-x), 1+x)`` blend the image with black / its mean grey / its greyscale
  version, the hue shifts by ``U(-h, h)`` turns."""
  return apply_color_jitter(image, color_jitter_factors(seed, strengths), strengths)


# ----------------------------------------------------------------------------- RandAugment ops
# The image operations of AutoAugment (Cubuk et al., CVPR 2019) and RandAugment (Cubuk et al.,
# CVPR Workshops 2020); the policies that pick them are in ``policies.py``.
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


def apply_op(name: str, image: tf.Tensor, level: float | tf.Tensor,
             negate: tf.Tensor) -> tf.Tensor:
  """Applies op ``name`` (a key of ``policies.RANDAUGMENT_OPS`` or 'Invert') at ``level`` in
  [0, 1]."""
  if name not in _OPS:
    raise ValueError(f"unknown augmentation op {name!r}; known: {sorted(_OPS)}")
  out = _OPS[name](image, tf.cast(level, tf.float32), negate)
  out.set_shape(image.shape)
  return out


# ----------------------------------------------------------------------------- Random Erasing


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float,
                   mode: str = "pixel", area: Sequence[float] = (0.02, 1.0 / 3.0),
                   ratio: Sequence[float] = (0.3, 1.0 / 0.3), attempts: int = 10) -> tf.Tensor:
  """Random Erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020) on a
  normalised float image [H, W, C].

  With probability ``probability``, erases a box of area ``U(area) * H * W`` and aspect
  ``exp(U(log ratio))``, the first of ``attempts`` candidates that fits, filling it
  with N(0, 1) noise (mode 'pixel') or zeros (mode 'zero').
  """
  if mode not in ERASING_MODES:
    raise ValueError(f"random erasing mode {mode!r}: use one of {ERASING_MODES}")
  s_apply, s_area, s_ratio, s_top, s_left, s_fill = split_seed(seed, 6)
  height, width = image.shape[0], image.shape[1]
  areas = uniform(s_area, area[0], area[1], [attempts]) * float(height * width)
  ratios = tf.exp(uniform(s_ratio, math.log(ratio[0]), math.log(ratio[1]), [attempts]))
  hs = tf.cast(tf.round(tf.sqrt(areas * ratios)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(areas / ratios)), tf.int32)
  valid = (hs < height) & (ws < width) & (hs > 0) & (ws > 0)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)
  do_erase = tf.reduce_any(valid) & (uniform(s_apply) < probability)
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
