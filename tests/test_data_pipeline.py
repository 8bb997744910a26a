"""Input pipeline: exactly-once eval over 8 devices, sharding, augmentation, determinism, resume.

References are independent: key sets from the meta files / source index, NumPy float64
normalisation, the MixUp/CutMix definitions, PIL. Every data test runs on generated images
(tests/imagegen.py) and, when ../shared/data is present, on the real photographs too.
"""
from __future__ import annotations

import collections
import functools
import itertools
import math

import jax
import numpy as np
import pytest
import tensorflow as tf

import jaxkd.data as data
from jaxkd.data import augment


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


@pytest.fixture(scope="module")
def cifar(data_variant, request, tfds_data_dir):
  """An image-folder source without test/: generated, or the real cifar10-small/test."""
  if data_variant == "real":
    root = request.getfixturevalue("shared_data") / "cifar10-small" / "test"
  else:
    root = request.getfixturevalue("generated_image_folder_flat")
  return data.get_source("image_folder", manual_dir=root, data_dir=tfds_data_dir)


def _val_counts(source):
  """{label: val examples}: floor(0.2 n_c + 1/2) of each class's official training images."""
  counts = collections.Counter(source.index("trainval")[1].tolist())
  return {c: math.floor(0.2 * n + 0.5) for c, n in counts.items()}


def test_eval_every_example_exactly_once_on_8_devices(food, mesh, data_variant):
  n = food.num_examples("val")
  val_counts = _val_counts(food)
  assert n == sum(val_counts.values()) and n % 24 != 0  # the last batch is padded
  if data_variant == "real":
    assert n == 400 and val_counts[0] == 40
  num_batches = -(-n // 24)
  batches = list(data.eval_batches(food, "val", global_batch_size=24, image_size=32, mesh=mesh))
  assert len(batches) == num_batches == data.num_eval_batches(food, "val", global_batch_size=24)
  seen, weights, labels = [], [], []
  for b in batches:
    assert b["image"].shape == (24, 32, 32, 3)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert b["image"].sharding == spec
    w = np.asarray(b["weight"])
    seen += [k for k, wi in zip(b["key"], w) if wi == 1.0]
    assert all(k == b"" for k, wi in zip(b["key"], w) if wi == 0.0)
    weights.append(w)
    labels.append(np.asarray(b["label"]))
  assert len(seen) == len(set(seen)) == n
  assert set(seen) == set(food.index("val")[0].tolist())
  # Metric "predict class 0 always": the weighted accuracy ignores the padding (which
  # has label 0); reference = share of class 0 in val (40 / 400 for the real photos).
  w, y = np.concatenate(weights), np.concatenate(labels)
  assert w.sum() == n and (w == 0).sum() == num_batches * 24 - n
  share = val_counts[0] / n
  np.testing.assert_allclose(np.sum(w * (y == 0)) / np.sum(w), share)
  assert np.mean(y == 0) != pytest.approx(share)  # the unweighted mean would be wrong


def test_eval_simulated_hosts_cover_split_once(cifar):
  expected = set(cifar.index("val")[0].tolist())
  per_host = []
  for pi in range(3):
    ds = data.eval_dataset(cifar, "val", global_batch_size=48, image_size=16, process_index=pi,
                           process_count=3, num_devices=8)
    batches = list(ds.as_numpy_iterator())
    assert all(b["image"].shape[0] == 16 for b in batches)
    real = [k for b in batches for k, w in zip(b["key"], b["weight"]) if w == 1]
    per_host.append((len(batches), real))
  assert len({nb for nb, _ in per_host}) == 1  # hosts stay in lock-step
  keys = [k for _, ks in per_host for k in ks]
  assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected


def test_train_batches_sharded_along_data(food, mesh):
  it = data.train_batches(food, "train", global_batch_size=16,
                          augment={"image_size": 32, "dtype": "bfloat16"}, seed=0, mesh=mesh,
                          shuffle_buffer=256)
  batch = next(it)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for name in ("image", "label", "weight"):
    assert batch[name].sharding == spec and batch[name].shape[0] == 16
  assert batch["image"].dtype == jax.numpy.bfloat16 and batch["image"].shape == (16, 32, 32, 3)
  assert [s.data.shape[0] for s in batch["image"].addressable_shards] == [2] * 8
  assert batch["key"].shape == (16,)
  assert set(batch["key"].tolist()) <= set(food.index("train")[0].tolist())
  with pytest.raises(ValueError, match="not a positive multiple of the 8 devices"):
    data.train_batches(food, "train", global_batch_size=12, augment={"image_size": 32}, mesh=mesh)


def test_augment_outputs_shape_dtype_range(food_images):
  lo = (0.0 - np.array(augment.MEAN_RGB)) / np.array(augment.STD_RGB)
  hi = (1.0 - np.array(augment.MEAN_RGB)) / np.array(augment.STD_RGB)
  seed = tf.constant([3, 4], tf.int64)
  configs = [
      dict(image_size=48, color_jitter=(0.4, 0.4, 0.4, 0.1), randaugment_num_ops=2,
           randaugment_magnitude=9),
      dict(image_size=48, train_crop="resize_random_crop", autoaugment="imagenet"),
      dict(image_size=48, dtype="bfloat16"),
  ]
  for path, kw in itertools.product([p for p in food_images if p is not None], configs):
    raw = tf.io.read_file(str(path))  # colour JPEG, greyscale JPEG, PNG named .jpg
    cfg = augment.AugmentConfig.from_mapping(kw)
    out = augment.train_preprocess(raw, seed, cfg)
    assert out.shape == (48, 48, 3) and out.dtype == cfg.tf_dtype, path
    x = out.numpy().astype(np.float32)
    assert np.all(x >= lo - 1e-2) and np.all(x <= hi + 1e-2)
    again = augment.train_preprocess(raw, seed, cfg).numpy().astype(np.float32)
    np.testing.assert_array_equal(x, again)
    assert augment.eval_preprocess(raw, cfg).shape == (48, 48, 3)
  # Eval: normalisation checked in float64 on an image that needs no resizing (PNG input).
  pixels = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
  png = tf.io.encode_png(pixels)
  cfg = augment.AugmentConfig(image_size=40, eval_crop_fraction=1.0)
  out = augment.eval_preprocess(png, cfg).numpy()
  ref = (pixels / 255.0 - np.array(augment.MEAN_RGB)) / np.array(augment.STD_RGB)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Random erasing with p = 1 replaces a box and nothing else.
  img = tf.zeros([32, 32, 3])
  erased = augment.random_erasing(img, seed, probability=1.0, mode="pixel").numpy()
  changed = np.any(erased != 0, axis=-1)
  rows, cols = np.nonzero(changed)
  assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
  assert 0.02 * 1024 * 0.5 <= changed.sum() <= 1024 / 3 * 1.5


def test_mixup_cutmix_mix_labels_and_teacher_logits():
  b, c, s = 8, 5, 16
  labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int32)
  values = np.arange(b, dtype=np.float32)  # example i is the constant image i
  batch = {"image": tf.constant(np.broadcast_to(values[:, None, None, None], (b, s, s, 3))),
           "label": labels, "teacher_logits": tf.one_hot(labels, c) * 3.0}
  seed = tf.constant([7, 8], tf.int64)
  mixup = augment.AugmentConfig(image_size=s, mixup_lambda_range=(0.2, 0.4))
  out = {k: v.numpy() for k, v in augment.mix_batch(batch, seed, mixup, num_classes=c).items()}
  lam = out["mix_lambda"]
  assert np.all(lam == lam[0]) and 0.2 <= lam[0] <= 0.4
  partner = (out["image"][:, 0, 0, 0] - lam * values) / (1 - lam)  # recovers the partner's value
  partner_idx = np.rint(partner).astype(int)
  assert sorted(partner_idx.tolist()) == list(range(b))  # a permutation of the batch
  np.testing.assert_array_equal(out["mix_label"], labels.numpy()[partner_idx])
  onehot = np.eye(c)
  ref_soft = lam[:, None] * onehot[labels.numpy()] + (1 - lam[:, None]) * onehot[out["mix_label"]]
  np.testing.assert_allclose(out["soft_label"], ref_soft, atol=1e-6)
  # Stored teacher logits stay each example's own row; the partner's row comes alongside
  # (the train step mixes the teacher's probabilities with mix_lambda).
  np.testing.assert_array_equal(out["teacher_logits"], 3.0 * onehot[labels.numpy()])
  np.testing.assert_array_equal(out["mix_teacher_logits"], 3.0 * onehot[out["mix_label"]])
  cutmix = augment.AugmentConfig(image_size=s, cutmix_alpha=1.0)
  out = {k: v.numpy() for k, v in augment.mix_batch(batch, seed, cutmix, num_classes=c).items()}
  kept = (out["image"][..., 0] == values[:, None, None]).mean(axis=(1, 2))
  paired = kept < 1.0  # examples whose random partner is another example
  assert paired.sum() >= b - 2 and 0.0 < out["mix_lambda"][0] < 1.0
  np.testing.assert_allclose(kept[paired], out["mix_lambda"][paired], atol=1e-6)  # lam = kept area


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_stream_deterministic_and_resumable(cifar, data_variant):
  # Real: 400 val examples in batches of 64 (an epoch ends inside batch 7); generated: 18 in
  # batches of 8 (inside batch 3). 8 batches always cross an epoch boundary.
  bs = 64 if data_variant == "real" else 8
  kw = dict(global_batch_size=bs, augment={"image_size": 16, "color_jitter": (0.4, 0.4, 0.4, 0.1),
                                           "mixup_alpha": 0.2, "random_erasing": 0.3})
  n = cifar.num_examples("val")
  full = n // bs  # full batches inside epoch 0
  assert n % bs != 0 and 2 <= full and n < 8 * bs
  if data_variant == "real":
    assert (n, full) == (400, 6)
  first = _take(data.train_batches(cifar, "val", seed=5, **kw), 8)
  again = _take(data.train_batches(cifar, "val", seed=5, **kw), 8)
  other = _take(data.train_batches(cifar, "val", seed=6, **kw), 1)
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(first[0]["key"], other[0]["key"])
  # Epoch 0 is a permutation of the split: its first full batches hold distinct split keys.
  epoch0 = np.concatenate([b["key"] for b in first[:full]])
  assert len(set(epoch0.tolist())) == full * bs
  assert set(epoch0.tolist()) <= set(cifar.index("val")[0].tolist())
  keys = np.concatenate([b["key"] for b in first])
  assert collections.Counter(keys[:n].tolist()).most_common(1)[0][1] == 1
  # Resume inside epoch 0 and across the epoch boundary.
  for start in (full // 2, full):
    resumed = _take(data.train_batches(cifar, "val", seed=5, start_step=start, **kw), 8 - start)
    for a, b in zip(first[start:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"start_step={start}, field {k}")


def test_train_stream_is_the_same_for_any_process_count(generated_image_folder_flat,
                                                        tfds_data_dir):
  """The hosts' local batches, concatenated in process order, are the one-host global batches
  (images bit for bit), also resumed, so a run continues exactly on another process count."""
  cifar = data.get_source("image_folder", manual_dir=generated_image_folder_flat,
                          data_dir=tfds_data_dir)
  bs = 8
  kw = dict(global_batch_size=bs, seed=3, num_devices=8,
            augment={"image_size": 16, "color_jitter": (0.4, 0.4, 0.4, 0.1)})
  steps = 5  # crosses the end of epoch 0 (see test_train_stream_deterministic_and_resumable)

  def hosts(count, start_step=0, **extra):
    streams = [data.train_dataset(cifar, "val", process_index=h, process_count=count,
                                  start_step=start_step, **kw, **extra).as_numpy_iterator()
               for h in range(count)]
    return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            for parts in zip(*[[next(s) for _ in range(steps - start_step)] for s in streams])]

  one = hosts(1)
  _assert_same_batches(one, hosts(2), "2 hosts")
  _assert_same_batches(one, hosts(4), "4 hosts")
  _assert_same_batches(one[2:], hosts(2, start_step=2), "2 hosts from step 2")
  # With MixUp the examples are the same; the pairs are drawn within each host's rows.
  mixed = dict(augment={**kw["augment"], "mixup_alpha": 0.2})
  kw.pop("augment")
  for a, b in zip(hosts(1, **mixed), hosts(2, **mixed)):
    np.testing.assert_array_equal(a["key"], b["key"])


def test_teacher_logits_joined_by_key_after_shuffle(food):
  keys, _ = food.index("trainval")
  num_classes = food.num_classes
  logits = np.random.default_rng(1).normal(size=(len(keys), num_classes)).astype(np.float32)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keys.tolist()),
                                          tf.range(len(keys), dtype=tf.int64)), -1)
  store = tf.constant(logits)
  row_of = {k: i for i, k in enumerate(keys.tolist())}

  def lookup(batch_keys):
    return tf.gather(store, table.lookup(batch_keys))

  it = data.train_batches(food, "train", global_batch_size=32, augment={"image_size": 16}, seed=2,
                          teacher_lookup=lookup, shuffle_buffer=512)
  for batch in itertools.islice(it, 2):
    got = batch["teacher_logits"]
    assert got.shape == (32, num_classes) and got.dtype == np.float32
    np.testing.assert_array_equal(got, logits[[row_of[k] for k in batch["key"]]])


def test_compiled_flip_and_colour_jitter_match_the_tensorflow_kernels():
  """The XLA-compiled clip + flip + colour jitter + normalisation of the training path equals the
  same operations run as TensorFlow kernels, to float32 rounding, for every jitter strength set."""
  rng = np.random.default_rng(0)
  for strengths in [(0.4, 0.4, 0.4, 0.1), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)]:
    compiled = augment.compiled_flip_jitter_normalize(strengths, True)
    for i in range(4):
      image = tf.constant(rng.uniform(-3, 258, (24, 20, 3)), tf.float32)
      factors = augment.color_jitter_factors(tf.constant([i, 7], tf.int64), strengths)
      flip = tf.constant(i % 2 == 1)
      expected = tf.clip_by_value(image, 0.0, 255.0)
      if i % 2:
        expected = tf.image.flip_left_right(expected)
      expected = augment.normalize(augment.apply_color_jitter(expected, factors, strengths))
      np.testing.assert_allclose(compiled(image, factors, flip).numpy(), expected.numpy(),
                                 atol=1e-4, err_msg=str(strengths))
  # flip_decision is the draw of tf.image.stateless_random_flip_left_right
  image = tf.reshape(tf.range(6, dtype=tf.float32), [1, 6, 1])
  for i in range(16):
    seed = tf.constant([i, 3], tf.int64)
    flipped = tf.image.stateless_random_flip_left_right(image, seed=seed)
    assert bool(augment.flip_decision(seed)) == bool(flipped[0, 0, 0] == 5.0)
  # the seeded factors are the op-by-op jitter's: colour_jitter(image, seed) is unchanged
  image = tf.constant(rng.uniform(0, 255, (16, 16, 3)), tf.float32)
  seed = tf.constant([5, 6], tf.int64)
  strengths = (0.4, 0.4, 0.4, 0.1)
  np.testing.assert_array_equal(
      augment.color_jitter(image, seed, strengths).numpy(),
      augment.apply_color_jitter(image, augment.color_jitter_factors(seed, strengths),
                                 strengths).numpy())


def test_training_preprocessing_equals_the_operations_run_one_by_one(food_images):
  """train_preprocess (bilinear kernel for crops that do not shrink, clip + flip + jitter +
  normalisation compiled) gives the pixels of the documented operations run one TensorFlow kernel
  at a time with the antialiased resize for every crop, to float32 rounding; crops that grow and
  crops that shrink both occur."""
  grew = shrank = 0
  for path in [p for p in food_images if p is not None]:
    raw = tf.io.read_file(str(path))
    size = int(min(augment.image_shape(raw))) // 2  # random crops both above and below it
    cfg = augment.AugmentConfig(image_size=size, color_jitter=(0.4, 0.4, 0.4, 0.1))
    for i in range(12):
      seed = tf.constant([i, 11], tf.int64)
      s_crop, s_flip, s_jitter, _, _ = augment.split_seed(seed, 5)
      crop = augment.decode_and_crop(raw, functools.partial(
          augment.random_resized_crop_window, seed=s_crop, scale=cfg.rrc_scale,
          ratio=cfg.rrc_ratio))
      if max(crop.shape[:2]) <= size:
        grew += 1
      else:
        shrank += 1
      image = tf.clip_by_value(tf.image.resize(crop, [size, size], antialias=True), 0.0, 255.0)
      image = tf.image.stateless_random_flip_left_right(image, seed=s_flip)
      expected = augment.normalize(augment.color_jitter(image, s_jitter, cfg.color_jitter))
      got = augment.train_preprocess(raw, seed, cfg)
      np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=2e-4, err_msg=str(path))
  assert grew and shrank, (grew, shrank)


def test_pixel_ops_match_pil(food_images):
  pil_image = pytest.importorskip("PIL.Image")
  pil_ops = pytest.importorskip("PIL.ImageOps")
  path = food_images[0]
  img = pil_image.open(path).convert("RGB").resize((64, 48))
  x = tf.constant(np.asarray(img), tf.float32)
  no = tf.constant(False)
  cases = [
      (augment.op_equalize(x, 0.0, no), pil_ops.equalize(img)),
      (augment.op_autocontrast(x, 0.0, no), pil_ops.autocontrast(img)),
      (augment.op_solarize(x, 0.5, no), pil_ops.solarize(img, threshold=128)),
      (augment.op_posterize(x, 0.5, no), pil_ops.posterize(img, 6)),
      (augment.op_invert(x, 0.0, no), pil_ops.invert(img)),
  ]
  for ours, ref in cases:
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref, np.float32), atol=1.0)
  for op in (augment.op_rotate, augment.op_shear_x, augment.op_translate_y, augment.op_color):
    np.testing.assert_allclose(op(x, 0.0, no).numpy(), x.numpy(), atol=1e-3)  # level 0 = identity


def _assert_same_batches(expected, got, what):
  assert len(got) == len(expected), what
  for i, (a, b) in enumerate(zip(expected, got)):
    assert sorted(a) == sorted(b), what
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}, batch {i}, field {k}")


def test_eval_start_batch_is_the_tail_and_skips_decoding(generated_image_folder_flat, tmp_path):
  """eval_batches(start_batch=k) == batches k.. of the whole pass, and batches < k are not read.

  18 val examples in global batches of 8: 3 batches, the last with 2 real rows and 6 padding
  rows. On two simulated hosts (local batches of 4, 9 examples each) start_batch=3 skips into
  the padding. Then the files of batches 0 and 1 are overwritten with bytes no decoder reads:
  the pass from batch 2 is unchanged, while the passes that include them fail.
  """
  import shutil

  root = tmp_path / "folder"
  shutil.copytree(generated_image_folder_flat, root)
  source = data.get_source("image_folder", manual_dir=root, data_dir=tmp_path / "tfds")
  assert source.num_examples("val") == 18
  kw = dict(global_batch_size=8, image_size=16)
  full = list(data.eval_batches(source, "val", **kw))
  assert len(full) == 3 and [int(b["weight"].sum()) for b in full] == [8, 8, 2]
  for start in range(4):
    tail = list(data.eval_batches(source, "val", start_batch=start, **kw))
    _assert_same_batches(full[start:], tail, f"start_batch={start}")
  for pi in range(2):
    host = dict(process_index=pi, process_count=2, num_devices=8, **kw)
    whole = list(data.eval_dataset(source, "val", **host).as_numpy_iterator())
    assert len(whole) == 3 and [int(b["weight"].sum()) for b in whole] == [4, 4, 1]
    for start in range(4):
      tail = list(data.eval_dataset(source, "val", start_batch=start, **host).as_numpy_iterator())
      _assert_same_batches(whole[start:], tail, f"host {pi}, start_batch={start}")
  with pytest.raises(ValueError, match=r"start_batch=4 must be in \[0, 3\]"):
    data.eval_batches(source, "val", start_batch=4, **kw)

  skipped = [k.decode() for b in full[:2] for k, w in zip(b["key"], b["weight"]) if w == 1]
  assert len(skipped) == 16
  for key in skipped:
    (path,) = root.glob(key + ".*")
    path.write_bytes(b"not an image at all")
  _assert_same_batches(full[2:], list(data.eval_batches(source, "val", start_batch=2, **kw)),
                       "start_batch=2 over undecodable skipped files")
  for start in (0, 1):
    with pytest.raises(tf.errors.InvalidArgumentError):
      list(data.eval_batches(source, "val", start_batch=start, **kw))
