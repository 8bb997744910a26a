"""Colour jitter and normalisation of uint8 training batches inside the jitted train step.

With ``data.augment.color_on_device`` the host's tf.data pipeline stops after the crop, the
resize and the flip, and hands over uint8 pixels with each example's colour-jitter factors
(``batch['color_jitter']``, float32 [B, 4], drawn by the host from the example's seed exactly as
the host-side jitter draws them). The train step then runs ``jitter_and_normalize`` on the
device: the same four adjustments as the host's ``jaxkd.data.augment.apply_color_jitter``
(torchvision's ColorJitter, fixed order), then the ImageNet normalisation. On a GPU host this
moves about a third of the per-image CPU work onto the accelerator and sends a quarter of the
bytes.

Per image, with factors (fb, fc, fs, dh) and x in [0, 255] (each step clipped to [0, 255]):

- brightness: x <- fb x;
- contrast: x <- m + fc (x - m), m the mean of the image's greyscale;
- saturation: x <- g + fs (x - g), g the pixel's greyscale (ITU-R BT.601 luma);
- hue: rotate the HSV hue by dh turns (TensorFlow's ``tf.image.adjust_hue``);
- normalise: (x / 255 - MEAN_RGB) / STD_RGB.

Neutral factors (1, 1, 1, 0), a strength of 0 on the host, leave the pixels as they are, so the
function needs no configuration; the hue conversion is skipped when no example of the batch
shifts its hue.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.pixels import GRAY_WEIGHTS, MEAN_RGB, STD_RGB

NEUTRAL = (1.0, 1.0, 1.0, 0.0)


def _blend(x: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(other + factor * (x - other), 0.0, 255.0)


def _gray(x: jax.Array) -> jax.Array:
  return jnp.sum(x * jnp.asarray(GRAY_WEIGHTS, x.dtype), axis=-1, keepdims=True)


def adjust_hue(rgb: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue of float RGB pixels in [0, 1] (last axis) by ``delta`` turns
  (broadcast against the pixels' leading axes), as ``tf.image.adjust_hue``."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(r == value, (g - b) / safe,
                  jnp.where(g == value, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
  hue = jnp.where(chroma > 0, hue, 0.0) + delta
  hue = hue - jnp.floor(hue)
  # back to RGB: the hue's sextant picks which of (c, x, 0) goes to which channel
  h6 = hue * 6.0
  sextant = jnp.floor(h6)
  x = chroma * (1.0 - jnp.abs(h6 - 2.0 * jnp.floor(h6 / 2.0) - 1.0))
  zero = jnp.zeros_like(x)
  choices = [(chroma, x, zero), (x, chroma, zero), (zero, chroma, x), (zero, x, chroma),
             (x, zero, chroma), (chroma, zero, x)]
  conditions = [sextant == i for i in range(6)]
  base = value - chroma
  return jnp.stack([base + jnp.select(conditions, [c[i] for c in choices], zero)
                    for i in range(3)], axis=-1)


def jitter(images: jax.Array, factors: jax.Array) -> jax.Array:
  """float32 [B, H, W, 3] in [0, 255]: ``images`` (any dtype, [0, 255]) with each example's
  colour jitter ``factors`` [B, 4] = (brightness, contrast, saturation, hue)."""
  x = images.astype(jnp.float32)
  f = factors.astype(jnp.float32)[:, None, None, :]
  x = jnp.clip(f[..., 0:1] * x, 0.0, 255.0)
  x = _blend(x, jnp.mean(_gray(x), axis=(1, 2, 3), keepdims=True), f[..., 1:2])
  x = _blend(x, _gray(x), f[..., 2:3])
  shift = f[..., 3]  # [B, 1, 1]
  return lax.cond(jnp.any(shift != 0),
                  lambda x: jnp.clip(adjust_hue(x / 255.0, shift) * 255.0, 0.0, 255.0),
                  lambda x: x, x)


def normalize(images: jax.Array) -> jax.Array:
  """float32 pixels in [0, 255] -> (x / 255 - MEAN_RGB) / STD_RGB."""
  mean = jnp.asarray([m * 255.0 for m in MEAN_RGB], jnp.float32)
  std = jnp.asarray([s * 255.0 for s in STD_RGB], jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def jitter_and_normalize(images: jax.Array, factors: jax.Array | None) -> jax.Array:
  """uint8 [B, H, W, 3] (+ factors [B, 4], None for no jitter) -> normalised float32."""
  return normalize(images if factors is None else jitter(images, factors))
