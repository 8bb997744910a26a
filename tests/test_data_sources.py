"""Data sources and splits, checked against the meta files and folder listings read independently.

Every data test runs on generated images (tests/imagegen.py); the 'real' variants run the same
checks, plus the known counts of the real photographs, when ../shared/data is present.
"""
from __future__ import annotations

import collections
import json
import math
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import jaxkd.data as data
from jaxkd.data import augment, food101_local, sources

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
REAL_GRAYSCALE_KEY = "bread_pudding/1375816"  # documented in ../shared/data/README.md


def _meta(food_dir):
  """(classes, {'train'|'test': {key: label}}) read from food-101/meta with json only."""
  meta = food_dir / "meta"
  classes = [line.strip() for line in (meta / "classes.txt").read_text().splitlines()
             if line.strip()]
  label_of = {c: i for i, c in enumerate(classes)}
  splits = {}
  for split in ("train", "test"):
    entries = json.loads((meta / f"{split}.json").read_text())
    splits[split] = {key: label_of[c] for c, keys in entries.items() for key in keys}
  return classes, splits


def _n_val(n):
  """Val examples of a class with n training images at the default 20 %: floor(0.2 n + 1/2)."""
  return math.floor(0.2 * n + 0.5)


def _listing(folder):
  """{class: {key: path}} of a class-per-folder tree, listed with pathlib."""
  out = {}
  for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
    files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in EXTENSIONS)
    out[class_dir.name] = {p.relative_to(folder).with_suffix("").as_posix(): p for p in files}
  return out


@pytest.fixture(scope="module")
def grayscale_key(data_variant, request):
  if data_variant == "real":
    return REAL_GRAYSCALE_KEY
  return request.getfixturevalue("generated_food101_tree").grayscale_key


@pytest.fixture(scope="module")
def folder_flat(data_variant, request):
  """A class-per-folder tree without test/: generated, or the real cifar10-small/test."""
  if data_variant == "real":
    return request.getfixturevalue("shared_data") / "cifar10-small" / "test"
  return request.getfixturevalue("generated_image_folder_flat")


@pytest.fixture(scope="module")
def folder_split(data_variant, request):
  """A tree with train/ and test/: generated, or the real cifar10-small."""
  if data_variant == "real":
    return request.getfixturevalue("shared_data") / "cifar10-small"
  return request.getfixturevalue("generated_image_folder")


def _keys_labels(ds):
  out = {}
  for keys, labels in ds.map(lambda ex: (ex["key"], ex["label"])).batch(1024).as_numpy_iterator():
    out.update({k.decode(): int(label) for k, label in zip(keys, labels)})
  return out


def _raw(food, key):
  ds = food.as_dataset("trainval").concatenate(food.as_dataset("test"))
  [raw] = [ex["image"] for ex in ds.filter(lambda ex: tf.equal(ex["key"], key)).as_numpy_iterator()]
  return raw


def test_food101_local_matches_meta(food, food_dir, data_variant):
  classes, meta = _meta(food_dir)
  assert food.class_names == classes
  assert food.num_classes == len(classes)
  # The build is keyed by the folder's fingerprint (SHA-256 hex).
  assert re.fullmatch(r"[0-9a-f]{64}", food.fingerprint)
  assert food.version == "1.0.0-" + food.fingerprint[:12]
  assert food.num_examples("trainval") == len(meta["train"])
  assert food.num_examples("test") == len(meta["test"])
  if data_variant == "real":
    assert (food.num_classes, len(meta["train"]), len(meta["test"])) == (10, 2000, 800)
  assert _keys_labels(food.as_dataset("trainval")) == meta["train"]
  assert _keys_labels(food.as_dataset("test")) == meta["test"]
  # The element contract: encoded bytes, int32 label, string key.
  spec = food.as_dataset("test").element_spec
  assert spec["image"].dtype == tf.string and spec["label"].dtype == tf.int32
  assert spec["key"].dtype == tf.string


def test_grayscale_image_comes_out_rgb(food, grayscale_key):
  raw = _raw(food, grayscale_key.encode())
  assert tf.io.decode_jpeg(raw).shape[-1] == 1  # the stored JPEG really is greyscale
  rgb = augment.decode_image(tf.constant(raw)).numpy()
  assert rgb.shape[-1] == 3 and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  cfg = augment.AugmentConfig(image_size=32)
  assert augment.eval_preprocess(tf.constant(raw), cfg).shape == (32, 32, 3)
  image = augment.train_preprocess(tf.constant(raw), tf.constant([1, 2], tf.int64), cfg)
  assert image.shape == (32, 32, 3)


def test_png_named_jpg_is_stored_and_decoded(generated_food101_tree, food101_local_source):
  """A PNG file named .jpg: stored as its own bytes, decoded (PNG path) to exactly PIL's pixels."""
  tree = generated_food101_tree
  food = food101_local_source(tree.root)
  path = tree.food_dir / "images" / f"{tree.png_key}.jpg"
  raw = _raw(food, tree.png_key.encode())
  assert raw == path.read_bytes() and raw[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    assert im.format == "PNG"
    ref = np.asarray(im.convert("RGB"))
  np.testing.assert_array_equal(augment.decode_image(tf.constant(raw)).numpy(), ref)
  cfg = augment.AugmentConfig(image_size=24)
  assert augment.eval_preprocess(tf.constant(raw), cfg).shape == (24, 24, 3)
  out = augment.train_preprocess(tf.constant(raw), tf.constant([3, 4], tf.int64), cfg)
  assert out.shape == (24, 24, 3) and np.all(np.isfinite(out.numpy()))


def test_val_split_stratified_deterministic_disjoint(food, food_dir, food101_local_source,
                                                     data_variant):
  classes, meta = _meta(food_dir)
  per_class = collections.Counter(meta["train"].values())
  expected_val = {c: _n_val(per_class[c]) for c in range(len(classes))}
  expected_train = {c: per_class[c] - expected_val[c] for c in range(len(classes))}
  if data_variant == "real":
    assert expected_val == {c: 40 for c in range(10)}
    assert expected_train == {c: 160 for c in range(10)}
  train_keys, train_labels = food.index("train")
  val_keys, val_labels = food.index("val")
  assert collections.Counter(train_labels.tolist()) == expected_train
  assert collections.Counter(val_labels.tolist()) == expected_val
  train_set, val_set = {k.decode() for k in train_keys}, {k.decode() for k in val_keys}
  assert not train_set & val_set
  assert train_set | val_set == set(meta["train"])
  n_val = sum(expected_val.values())
  assert food.num_examples("train") == len(meta["train"]) - n_val
  assert food.num_examples("val") == n_val
  # The tf.data filter (lookup table on the key) selects exactly the indexed keys.
  assert set(_keys_labels(food.as_dataset("val"))) == val_set
  # Same seed -> same split (fresh object, assignment recomputed); other seed -> different.
  same = food101_local_source(food_dir.parent, split_seed=0, val_fraction=0.2)
  other = food101_local_source(food_dir.parent, split_seed=1)
  assert same is not food and other is not food
  assert {k.decode() for k in same.index("val")[0]} == val_set
  other_val = {k.decode() for k in other.index("val")[0]}
  assert other_val != val_set and len(other_val) == n_val


def test_assign_val_fraction_and_rounding():
  keys = [f"c{c}/{i}" for c in range(3) for i in range(7 + c)]
  labels = [c for c in range(3) for _ in range(7 + c)]
  is_val = data.assign_val(keys, labels, val_fraction=0.25, seed=3)
  # floor(0.25 * n + 0.5) for n = 7, 8, 9 -> 2, 2, 2
  assert [int(is_val[np.asarray(labels) == c].sum()) for c in range(3)] == [2, 2, 2]
  # Order of the input does not matter.
  perm = np.random.default_rng(0).permutation(len(keys))
  again = data.assign_val([keys[i] for i in perm], [labels[i] for i in perm], val_fraction=0.25,
                          seed=3)
  assert {keys[i] for i in perm[again]} == {k for k, v in zip(keys, is_val) if v}


def test_food101_root_resolution(food_dir):
  assert pathlib.Path(food101_local.resolve_food101_root(food_dir)) == food_dir
  assert pathlib.Path(food101_local.resolve_food101_root(food_dir.parent)) == food_dir


def test_image_folder_single_tree(folder_flat, data_variant, tfds_data_dir):
  src = data.get_source("image_folder", manual_dir=folder_flat, data_dir=tfds_data_dir)
  listing = _listing(folder_flat)
  names = list(listing)
  counts = {c: len(listing[name]) for c, name in enumerate(names)}
  assert src.class_names == names and src.num_classes == len(names)
  assert src.num_examples("trainval") == sum(counts.values())
  keys, labels = src.index("trainval")
  assert keys[0].decode() == min(listing[names[0]])
  assert collections.Counter(labels.tolist()) == counts
  assert {k.decode(): int(label) for k, label in zip(keys, labels)} == {
      k: c for c, name in enumerate(names) for k in listing[name]}
  n_val = sum(_n_val(n) for n in counts.values())
  assert src.num_examples("val") == n_val
  assert src.num_examples("train") == sum(counts.values()) - n_val
  if data_variant == "real":
    assert (src.num_classes, src.num_examples("trainval"), keys[0]) == (10, 2000, b"airplane/0000")
    assert counts == {c: 200 for c in range(10)} and n_val == 400
  ex = next(iter(src.as_dataset("val")))
  key = ex["key"].numpy().decode()
  with Image.open(listing[key.split("/")[0]][key]) as im:
    assert augment.decode_image(ex["image"]).shape == (im.height, im.width, 3)
  with pytest.raises(ValueError, match="no official test split"):
    src.num_examples("test")


def test_image_folder_train_test_layout(folder_split, data_variant, tfds_data_dir):
  src = data.get_source("image_folder", manual_dir=folder_split, data_dir=tfds_data_dir)
  train, test = _listing(folder_split / "train"), _listing(folder_split / "test")
  n_trainval = sum(len(v) for v in train.values())
  assert src.class_names == list(train)
  assert src.num_examples("trainval") == n_trainval
  assert src.num_examples("test") == sum(len(v) for v in test.values())
  assert src.num_examples("val") == sum(_n_val(len(v)) for v in train.values())
  assert {k.decode() for k in src.index("test")[0]} == {k for v in test.values() for k in v}
  if data_variant == "real":
    assert (src.num_examples("trainval"), src.num_examples("test"), src.num_examples("val")) == (
        10000, 2000, 2000)


def test_image_folder_grayscale_and_png(generated_image_folder_tree, tfds_data_dir):
  """Greyscale JPEG, PNG named .jpg and a real .png from a folder: RGB, PIL's pixels for PNG."""
  tree = generated_image_folder_tree
  src = data.get_source("image_folder", manual_dir=tree.root, data_dir=tfds_data_dir)
  listing = _listing(tree.root / "train")
  elements = src.as_dataset("trainval").as_numpy_iterator()
  by_key = {ex["key"].decode(): ex["image"] for ex in elements}
  assert set(by_key) == {k for v in listing.values() for k in v}
  pngs = [k for v in listing.values() for k, p in v.items() if p.suffix == ".png"]
  assert len(pngs) == 1
  for key in [tree.png_key] + pngs:
    raw = by_key[key]
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(listing[key.split("/")[0]][key]) as im:
      np.testing.assert_array_equal(augment.decode_image(tf.constant(raw)).numpy(),
                                    np.asarray(im.convert("RGB")))
  raw = by_key[tree.grayscale_key]
  assert tf.io.decode_jpeg(raw).shape[-1] == 1
  rgb = augment.decode_image(tf.constant(raw)).numpy()
  assert rgb.shape[-1] == 3
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_clear_errors(tmp_path, generated_image_folder_flat):
  with pytest.raises(ValueError, match="unknown data source 'food-101'.*image_folder"):
    data.get_source("food-101")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source("image_folder", manual_dir=tmp_path / "nowhere")
  with pytest.raises(ValueError, match="needs manual_dir"):
    data.get_source("image_folder")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source("food101_local", data_dir=tmp_path / "d1", manual_dir=tmp_path / "nowhere")
  # Food-101 layout without meta/train.json.
  broken = tmp_path / "broken" / "food-101"
  (broken / "images" / "a").mkdir(parents=True)
  (broken / "meta").mkdir()
  (broken / "meta" / "classes.txt").write_text("a\n")
  (broken / "meta" / "test.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="train.json"):
    data.get_source("food101_local", data_dir=tmp_path / "d2", manual_dir=broken.parent)
  # A Food-101 class with no training images.
  (broken / "meta" / "train.json").write_text('{"a": []}')
  with pytest.raises(ValueError, match="class 'a' has no training images"):
    food101_local.read_food101_meta(food101_local.resolve_food101_root(broken))
  # An image folder with an empty class.
  tree = tmp_path / "tree"
  (tree / "cat").mkdir(parents=True)
  (tree / "dog").mkdir()
  (tree / "cat" / "0.png").write_bytes(tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)).numpy())
  with pytest.raises(ValueError, match="dog.*has no images"):
    data.get_source("image_folder", manual_dir=tree, data_dir=tmp_path / "d3")
  with pytest.raises(ValueError, match="unknown split"):
    data.get_source("image_folder", manual_dir=generated_image_folder_flat,
                    data_dir=tmp_path / "d4").num_examples("valid")


def test_tfds_sources_construct_offline(tmp_path):
  expected = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "food101": 101}
  for name, num_classes in expected.items():
    src = data.get_source(name, data_dir=tmp_path, download=False)
    assert isinstance(src, sources.TfdsSource) and src.num_classes == num_classes
  food = data.get_source("food101", data_dir=tmp_path, download=False)
  assert food.version == "2.1.0" and food.key_feature == "id"
  assert food.test_split_name == "validation"
  imagenet = data.get_source("imagenet2012", data_dir=tmp_path, download=False)
  assert imagenet.key_feature == "file_name"
  with pytest.raises(FileNotFoundError, match="not prepared"):
    food.num_examples("test")
