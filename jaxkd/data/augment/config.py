"""The augmentation settings: ``AugmentConfig`` (the ``data.augment`` config keys) and
``as_config``."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from jaxkd.data.augment.ops import ERASING_MODES

TRAIN_CROPS = ("random_resized_crop", "resize_random_crop", "pad_random_crop")
_DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Preprocessing/augmentation settings (the ``data.augment`` config keys).

  Attributes:
    image_size: output side in pixels (square).
    train_crop: 'random_resized_crop', 'resize_random_crop' (the crop of the Food-101
      KD + ECA manuscript cited in ``jaxkd.data.augment``) or 'pad_random_crop' (CIFAR: resize to
      image_size, zero-pad `crop_padding` pixels on every side, random image_size crop;
      torchvision's RandomCrop(32, padding=4)).
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
    color_on_device: training images leave the host as uint8 after the crop, resize and flip,
      with their colour-jitter factors as 'color_jitter' [4]; the train step jitters and
      normalises them (``jaxkd.train.color``). Excludes the augmentations that run after the
      jitter on the host: RandAugment, AutoAugment, Random Erasing, MixUp and CutMix.
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
  color_on_device: bool = False

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
    if (len(self.color_jitter) != 4 or min(self.color_jitter) < 0
        or self.color_jitter[3] > 0.5):
      raise ValueError(f"color_jitter={self.color_jitter}: give 4 non-negative strengths "
                       "(brightness, contrast, saturation, hue<=0.5)")
    if self.randaugment_num_ops < 0 or not 0.0 <= self.randaugment_magnitude <= 10.0:
      raise ValueError(f"randaugment ({self.randaugment_num_ops}, "
                       f"{self.randaugment_magnitude}): "
                       "need num_ops >= 0 and magnitude in [0, 10]")
    if self.autoaugment not in (None, "imagenet"):
      raise ValueError(f"autoaugment={self.autoaugment!r}: use None or 'imagenet'")
    if self.autoaugment and self.randaugment_num_ops:
      raise ValueError("choose either autoaugment or randaugment, not both")
    if not 0.0 <= self.random_erasing <= 1.0:
      raise ValueError(f"random_erasing={self.random_erasing}: a probability in [0, 1]")
    if self.random_erasing_mode not in ERASING_MODES:
      raise ValueError(f"random_erasing_mode={self.random_erasing_mode!r}: "
                       f"use one of {ERASING_MODES}")
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError(f"mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}: "
                       "must be >= 0")
    if self.mixup_lambda_range is not None:
      lo, hi = self.mixup_lambda_range
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mixup_lambda_range={self.mixup_lambda_range}: "
                         "need 0 <= lo <= hi <= 1")
    if not 0.0 < self.eval_crop_fraction <= 1.0:
      raise ValueError(f"eval_crop_fraction={self.eval_crop_fraction}: "
                       "need a value in (0, 1]")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: use one of {tuple(_DTYPES)}")
    if self.color_on_device:
      after_jitter = {"randaugment_num_ops": self.randaugment_num_ops,
                      "autoaugment": self.autoaugment, "random_erasing": self.random_erasing,
                      "mixup_alpha": self.mixup_alpha,
                      "mixup_lambda_range": self.mixup_lambda_range,
                      "cutmix_alpha": self.cutmix_alpha}
      on = {k: v for k, v in after_jitter.items() if v}
      if on:
        raise ValueError(
            f"color_on_device=True with {', '.join(f'{k}={v!r}' for k, v in on.items())}: "
            "these run after the colour jitter on the host, so the jitter cannot move to the "
            "device; set color_on_device=False, or turn them off")

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | None = None, **overrides) -> AugmentConfig:
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
