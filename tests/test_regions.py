"""Region stores (jaxkd.data.regions): the teacher's logits of R stored crops per image, replayed.

What is checked against an independent recomputation:
- every training row's teacher logits equal the teacher re-run on exactly the region the row
  replays (its box and flip recomputed from the key and region index by `regions.teacher_view`),
  to float16 precision; with no other augmentation the student's image is that view itself;
- the regions replayed differ between epochs, and every region index occurs;
- MixUp mixes two rows' stored regions: 'mix_teacher_logits' is the partner's row;
- a precompute interrupted after two batches resumes to the same bytes as an uninterrupted one;
  a tampered store is refused when opened.
On generated images always, and on the real food-101-mini photographs when present.
"""
from __future__ import annotations

import itertools
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from jaxkd import models
from jaxkd import teacher_store as ts
from jaxkd.data import pipeline
from jaxkd.data import regions as regions_lib
from jaxkd.data.teacher_logits import tf_lookup

R, SIZE, BATCH = 3, 32, 16
PLAIN = {"image_size": SIZE, "color_jitter": (0.0, 0.0, 0.0, 0.0)}  # crop + flip only


@pytest.fixture(scope="module")
def teacher(food):
  model = models.create("resnet8", num_classes=food.num_classes)
  variables = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  return lambda images: np.asarray(apply(np.asarray(images, np.float32)))


def _precompute(food, teacher, store_dir, spec, *, batches=None):
  def source(start_batch=0):
    return pipeline.eval_batches(food, "train", global_batch_size=BATCH, augment=PLAIN,
                                 start_batch=start_batch, regions=spec)

  return ts.precompute(batches or source, teacher, dataset=food.name, version=food.version,
                       split="train", teacher_id="resnet8-test", store_dir=store_dir,
                       num_examples=food.num_examples("train") * R,
                       num_classes=food.num_classes, preprocessing=spec.record(),
                       progress=False)


@pytest.fixture(scope="module")
def store(food, teacher, tmp_path_factory):
  spec = regions_lib.RegionSpec(R)
  return spec, _precompute(food, teacher, tmp_path_factory.mktemp("regions") / "train", spec)


def _encoded_images(food) -> dict[bytes, tf.Tensor]:
  ds = food.records("train")
  if food.load_fn is not None:
    ds = ds.map(food.load_fn)
  return {bytes(ex["key"].numpy()): ex["image"] for ex in ds}


def test_store_has_one_row_per_region(food, store):
  spec, st = store
  assert st.num_examples == food.num_examples("train") * R
  keys = set(st.keys)
  some = next(iter(_encoded_images(food)))
  assert {f"{some.decode()}#{r}" for r in range(R)} <= keys
  assert st.manifest["preprocessing"]["regions_per_image"] == R


def test_teacher_view_is_the_documented_box_and_flip(food):
  """Region r of key k: seed fold_in((0, hash(k)), int64 r) split in two; the box of the
  random-resized crop with the first, tf.image's random flip with the second; the box decoded,
  resized, flipped and normalised by hand."""
  spec = regions_lib.RegionSpec(R)
  cfg = pipeline.augment_lib.as_config(PLAIN)
  mean = np.array(pipeline.augment_lib.MEAN_RGB) * 255
  std = np.array(pipeline.augment_lib.STD_RGB) * 255
  flips = []
  for key, encoded in itertools.islice(_encoded_images(food).items(), 8):
    full = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    for r in range(R):
      seed = tf.random.experimental.stateless_fold_in(
          tf.constant([0, int(tf.strings.to_hash_bucket_fast(key, 2**62))], tf.int64),
          tf.constant(r, tf.int64))
      s_crop, s_flip = pipeline.augment_lib.split_seed(seed, 2)
      window = pipeline.augment_lib.random_resized_crop_window(
          tf.shape(full)[:2], s_crop, scale=spec.rrc_scale, ratio=spec.rrc_ratio)
      # decoding only the box (as training does) differs from slicing the full decode at the
      # box's edges (JPEG chroma upsampling), so the reference decodes the box too
      crop = pipeline.augment_lib.decode_and_crop(encoded, lambda shape, w=window: w)
      assert crop.shape[:2] == tuple(window.numpy()[2:])
      crop = tf.image.resize(crop, [SIZE, SIZE], antialias=True)
      crop = tf.clip_by_value(crop, 0.0, 255.0)
      flipped = tf.image.stateless_random_flip_left_right(crop, seed=s_flip)
      flips.append(not np.array_equal(flipped.numpy(), crop.numpy()))
      expected = (flipped.numpy() - mean) / std
      got = regions_lib.teacher_view(encoded, tf.constant(key), tf.constant(r), spec, cfg)
      np.testing.assert_allclose(got.numpy(), expected, atol=2e-3, err_msg=f"{key} region {r}")
  assert 0 < sum(flips) < len(flips)


def test_replayed_rows_are_the_teacher_on_the_replayed_crop(food, store, teacher):
  spec, st = store
  encoded = _encoded_images(food)
  cfg = pipeline.augment_lib.as_config(PLAIN)
  n = food.num_examples("train")
  steps = -(-2 * n // BATCH) + 1  # more than two epochs
  it = pipeline.train_batches(food, "train", global_batch_size=BATCH, augment=PLAIN, seed=3,
                              regions=spec, teacher_lookup=tf_lookup(st), shuffle_buffer=64)
  seen: dict[bytes, set] = {}
  for batch in itertools.islice(it, steps):
    views = np.stack([regions_lib.teacher_view(encoded[k], tf.constant(k), tf.constant(r), spec,
                                               cfg).numpy()
                      for k, r in zip(batch["key"], batch["region"])])
    # no colour jitter: the student's image is the teacher's view itself
    np.testing.assert_allclose(batch["image"], views, atol=1e-5)
    expected = teacher(views)
    np.testing.assert_allclose(batch["teacher_logits"], expected.astype(np.float16),
                               rtol=2e-3, atol=2e-3)
    for k, r in zip(batch["key"], batch["region"]):
      seen.setdefault(bytes(k), set()).add(int(r))
  assert set().union(*seen.values()) == set(range(R))
  assert sum(len(v) > 1 for v in seen.values()) > len(seen) // 3  # epochs replay other regions


def test_jitter_applies_on_top_and_mixup_mixes_two_stored_regions(food, store):
  spec, st = store
  augment = {"image_size": SIZE, "color_jitter": (0.4, 0.4, 0.4, 0.1), "mixup_alpha": 0.2,
             "mix_prob": 1.0}
  it = pipeline.train_batches(food, "train", global_batch_size=BATCH, augment=augment, seed=4,
                              regions=spec, teacher_lookup=tf_lookup(st), shuffle_buffer=64)
  batch = next(it)
  own = batch["teacher_logits"]
  rows = {tuple(np.round(row, 3)) for row in own}
  assert all(tuple(np.round(row, 3)) in rows for row in batch["mix_teacher_logits"])
  assert "teacher_key" not in batch


def test_interrupted_precompute_resumes_byte_identically_and_tampering_is_refused(
    food, store, teacher, tmp_path):
  spec, st = store

  def interrupted(start_batch=0):
    source = pipeline.eval_batches(food, "train", global_batch_size=BATCH, augment=PLAIN,
                                   start_batch=start_batch, regions=spec)
    for i, b in enumerate(source, start_batch):
      if i == 2:
        raise KeyboardInterrupt
      yield b

  target = tmp_path / "train"
  with pytest.raises(KeyboardInterrupt):
    _precompute(food, teacher, target, spec, batches=interrupted)
  assert ts.partial_path(target).is_dir() and not target.exists()
  resumed = _precompute(food, teacher, target, spec)
  for name in (ts.LOGITS_FILE, ts.KEYS_FILE):
    assert (resumed.path / name).read_bytes() == (st.path / name).read_bytes(), name

  tampered = tmp_path / "tampered" / "train"
  shutil.copytree(st.path, tampered)
  data = bytearray((tampered / ts.LOGITS_FILE).read_bytes())
  data[-1] ^= 0x01
  (tampered / ts.LOGITS_FILE).write_bytes(bytes(data))
  with pytest.raises(ts.TeacherStoreError, match="sha256|checksum"):
    ts.TeacherStore.open(tampered, verify=True)
  # a store of other regions is not taken for this one
  with pytest.raises(ts.TeacherStoreError, match="preprocessing"):
    ts.TeacherStore.open(st.path, expect={"preprocessing": regions_lib.RegionSpec(R + 1).record()})


def test_data_dir_places_the_store_in_its_region_folder(food, store, teacher, tmp_path):
  """precompute(data_dir=...) names a region store's folder split_folder(split, record), which the
  reader expects; check_store refuses a store of other regions."""
  spec, st = store
  folder = ts.split_folder("train", spec.record())
  assert folder.startswith(f"train.regions-{R}-") and folder != ts.split_folder(
      "train", regions_lib.RegionSpec(R, rrc_scale=(0.5, 1.0)).record())
  small = food.num_examples("train")

  def batches(start_batch=0):  # the first example's regions only: enough to place and reopen
    del start_batch
    b = next(pipeline.eval_batches(food, "train", global_batch_size=BATCH, augment=PLAIN,
                                   regions=spec))
    yield {**b, "weight": (np.arange(BATCH) < R).astype(np.float32)}

  placed = ts.precompute(batches, teacher, dataset=food.name, version=food.version,
                         split="train", teacher_id="resnet8-test", data_dir=tmp_path,
                         num_examples=R, num_classes=food.num_classes,
                         preprocessing=spec.record(), progress=False)
  assert placed.path.name == folder and placed.path.parent.parent.name == "teacher_logits"
  assert ts.TeacherStore.open(placed.path).num_examples == R < small * R
  with pytest.raises(ValueError, match=folder):
    ts.precompute(batches, teacher, dataset=food.name, version=food.version, split="train",
                  teacher_id="resnet8-test", store_dir=placed.path.with_name("train"),
                  num_examples=R, num_classes=food.num_classes, preprocessing=spec.record(),
                  progress=False)
  regions_lib.check_store(st, spec)
  with pytest.raises(ValueError, match="rrc_scale"):
    regions_lib.check_store(st, regions_lib.RegionSpec(R, rrc_scale=(0.5, 1.0)))


def test_region_spec_refuses_other_crops():
  with pytest.raises(ValueError, match="random_resized_crop"):
    regions_lib.RegionSpec.from_augment(4, {"train_crop": "pad_random_crop"})
  with pytest.raises(ValueError, match="regions_per_image"):
    regions_lib.RegionSpec(0)
