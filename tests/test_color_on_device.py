"""augment.color_on_device: uint8 crops from the host, colour jitter and normalisation in the
train step. References: TensorFlow's own kernels (the host path), NumPy float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import jaxkd.data as data
from jaxkd.data import augment
from jaxkd.train import color, optim
from jaxkd.train import state as state_lib
from jaxkd.train import step as step_lib
from tests.test_train_step import SHAPE, Tiny, make_batch

STRENGTHS = [(0.4, 0.4, 0.4, 0.1), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 0.0, 0.5),
             (0.0, 0.0, 0.0, 0.0)]


@pytest.mark.parametrize("strengths", STRENGTHS)
def test_device_jitter_matches_the_tensorflow_kernels(strengths):
  """color.jitter == augment.apply_color_jitter (TensorFlow's kernels, tf.image.adjust_hue) per
  image, including grey pixels (hue undefined) and ties between channels."""
  rng = np.random.default_rng(sum(strengths).__hash__() % 1000)
  images = rng.integers(0, 256, (6, 12, 10, 3)).astype(np.float32)
  images[0, :4] = 77.0  # grey
  images[1, ..., 0] = images[1, ..., 1]  # red == green
  images[2, ..., 2] = 255.0
  factors = np.stack([
      augment.color_jitter_factors(tf.constant([i, 3], tf.int64), strengths).numpy()
      for i in range(6)])
  expected = np.stack([augment.apply_color_jitter(tf.constant(x), tf.constant(f), strengths)
                       .numpy() for x, f in zip(images, factors)])
  got = np.asarray(jax.jit(color.jitter)(images, factors))
  np.testing.assert_allclose(got, expected, atol=2e-3, err_msg=str(strengths))
  normalized = np.asarray(color.normalize(jnp.asarray(expected)))
  np.testing.assert_allclose(normalized, augment.normalize(tf.constant(expected)).numpy(),
                             atol=1e-5)


def test_hue_rotation_against_float64_hsv():
  """adjust_hue against colorsys (Python's float64 RGB <-> HSV) on random pixels."""
  import colorsys
  rng = np.random.default_rng(4)
  rgb = rng.uniform(0, 1, (200, 3))
  delta = rng.uniform(-0.5, 0.5, 200)
  expected = []
  for p, d in zip(rgb, delta):
    h, s, v = colorsys.rgb_to_hsv(*p)
    expected.append(colorsys.hsv_to_rgb((h + d) % 1.0, s, v))
  got = color.adjust_hue(jnp.asarray(rgb, jnp.float32), jnp.asarray(delta, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6)


def test_uint8_path_has_the_pixels_of_the_host_path(food_images):
  """The same seed gives the same crop, flip and factors; the only difference is the rounding of
  the resized crop to uint8 (half a grey level, grown by at most the product of the jitter
  factors). Stated tolerance, in normalised units (1 grey level ~ 0.017): every pixel within
  0.05, the mean absolute difference below 0.01, and each channel's mean and standard deviation
  over the image within 0.005."""
  for path in [p for p in food_images if p is not None]:
    raw = tf.io.read_file(str(path))
    cfg = augment.AugmentConfig(image_size=48, color_jitter=(0.4, 0.4, 0.4, 0.1))
    for i in range(4):
      seed = tf.constant([i, 5], tf.int64)
      host = augment.train_preprocess(raw, seed, cfg).numpy()
      pixels, factors = augment.train_preprocess_uint8(raw, seed, cfg)
      assert pixels.dtype == tf.uint8 and factors.shape == (4,)
      np.testing.assert_array_equal(
          factors.numpy(), augment.color_jitter_factors(augment.split_seed(seed, 5)[2],
                                                        cfg.color_jitter).numpy())
      device = np.asarray(color.jitter_and_normalize(pixels.numpy()[None],
                                                     factors.numpy()[None]))[0]
      diff = np.abs(device - host)
      assert diff.max() < 0.05 and diff.mean() < 0.01, (path, i, diff.max(), diff.mean())
      np.testing.assert_allclose(device.mean((0, 1)), host.mean((0, 1)), atol=5e-3)
      np.testing.assert_allclose(device.std((0, 1)), host.std((0, 1)), atol=5e-3)


def test_train_stream_hands_over_uint8_and_factors(generated_image_folder_flat, tfds_data_dir):
  """Same examples in the same order as the host path, uint8 images and [B, 4] factors."""
  source = data.get_source("image_folder", manual_dir=generated_image_folder_flat,
                           data_dir=tfds_data_dir)
  aug = {"image_size": 24, "color_jitter": (0.4, 0.4, 0.4, 0.1)}

  def first(on_device):
    ds = data.train_dataset(source, "train", global_batch_size=8, seed=3,
                            augment={**aug, "color_on_device": on_device}, num_devices=1)
    return next(iter(ds.take(1).as_numpy_iterator()))

  host, device = first(False), first(True)
  assert device["image"].dtype == np.uint8 and device["image"].shape == (8, 24, 24, 3)
  assert device["color_jitter"].shape == (8, 4) and "color_jitter" not in host
  np.testing.assert_array_equal(device["key"], host["key"])
  finished = np.asarray(color.jitter_and_normalize(device["image"], device["color_jitter"]))
  assert np.abs(finished - host["image"]).mean() < 0.01


@pytest.mark.parametrize("key,value", [("random_erasing", 0.3), ("randaugment_num_ops", 2),
                                       ("autoaugment", "imagenet"), ("mixup_alpha", 0.2),
                                       ("cutmix_alpha", 1.0)])
def test_augmentations_after_the_jitter_are_refused(key, value):
  with pytest.raises(ValueError, match=f"color_on_device=True with {key}=.*color_on_device=False"):
    augment.AugmentConfig(color_on_device=True, **{key: value})


def test_train_step_finishes_uint8_batches(meshes8):
  """A uint8 batch with factors trains exactly as the float batch the device half makes of it,
  for the student and the online teacher; without factors, normalisation only."""
  mesh = meshes8
  model, teacher = Tiny(), Tiny()
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  rng = np.random.default_rng(0)
  batch = make_batch(3)
  del batch["teacher_logits"]
  pixels = rng.integers(0, 256, (len(batch["label"]),) + SHAPE).astype(np.uint8)
  factors = np.stack([augment.color_jitter_factors(tf.constant([i, 1], tf.int64),
                                                   (0.4, 0.4, 0.4, 0.1)).numpy()
                      for i in range(len(pixels))])
  teacher_vars = state_lib.create_train_state(teacher, jax.random.PRNGKey(7), (1,) + SHAPE, tx,
                                              mesh=mesh).variables()
  train_step = step_lib.make_train_step(model, {"kind": "kd", "temperature": 2.0}, tx, mesh,
                                        teacher_model=teacher, donate=False)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1,) + SHAPE, tx, mesh=mesh)
  for f in (factors, None):
    finished = np.asarray(color.jitter_and_normalize(pixels, f))
    _, want = train_step(state, {**batch, "image": finished}, teacher_vars)
    given = {**batch, "image": pixels} | ({} if f is None else {"color_jitter": f})
    _, got = train_step(state, given, teacher_vars)
    for k in ("loss", "ce", "kd", "accuracy"):
      np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def meshes8():
  return step_lib.data_mesh()
