"""Data sources and splits, checked against the meta files read independently (json)."""
from __future__ import annotations

import collections
import json
import pathlib

import numpy as np
import pytest

import jaxkd.data as data
from jaxkd.data import augment, food101_local, sources
import tensorflow as tf


def _meta(shared_data):
  meta = shared_data / "food-101-mini" / "food-101" / "meta"
  classes = [l.strip() for l in (meta / "classes.txt").read_text().splitlines() if l.strip()]
  label_of = {c: i for i, c in enumerate(classes)}
  splits = {}
  for split in ("train", "test"):
    entries = json.loads((meta / f"{split}.json").read_text())
    splits[split] = {key: label_of[c] for c, keys in entries.items() for key in keys}
  return classes, splits


@pytest.fixture(scope="module")
def food(shared_data, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return data.get_source("food101_local", data_dir=data_dir, manual_dir=shared_data / "food-101-mini")


def _keys_labels(ds):
  out = {}
  for k, l in ds.map(lambda ex: (ex["key"], ex["label"])).batch(1024).as_numpy_iterator():
    out.update({kk.decode(): int(ll) for kk, ll in zip(k, l)})
  return out


def test_food101_local_matches_meta(food, shared_data):
  classes, meta = _meta(shared_data)
  assert food.class_names == classes
  assert food.num_classes == 10
  assert food.version == "1.0.0"
  assert food.num_examples("trainval") == 2000
  assert food.num_examples("test") == 800
  assert _keys_labels(food.as_dataset("trainval")) == meta["train"]
  assert _keys_labels(food.as_dataset("test")) == meta["test"]
  # The element contract: encoded bytes, int32 label, string key.
  spec = food.as_dataset("test").element_spec
  assert spec["image"].dtype == tf.string and spec["label"].dtype == tf.int32 and spec["key"].dtype == tf.string


def test_grayscale_image_comes_out_rgb(food):
  key = b"bread_pudding/1375816"
  ds = food.as_dataset("trainval").concatenate(food.as_dataset("test"))
  [raw] = [ex["image"] for ex in ds.filter(lambda ex: tf.equal(ex["key"], key)).as_numpy_iterator()]
  assert tf.io.decode_jpeg(raw).shape[-1] == 1  # the stored JPEG really is greyscale
  rgb = augment.decode_image(tf.constant(raw)).numpy()
  assert rgb.shape[-1] == 3 and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
  cfg = augment.AugmentConfig(image_size=32)
  assert augment.eval_preprocess(tf.constant(raw), cfg).shape == (32, 32, 3)
  assert augment.train_preprocess(tf.constant(raw), tf.constant([1, 2], tf.int64), cfg).shape == (32, 32, 3)


def test_val_split_stratified_deterministic_disjoint(food, shared_data):
  _, meta = _meta(shared_data)
  train_keys, train_labels = food.index("train")
  val_keys, val_labels = food.index("val")
  assert collections.Counter(train_labels.tolist()) == {c: 160 for c in range(10)}
  assert collections.Counter(val_labels.tolist()) == {c: 40 for c in range(10)}
  train_set, val_set = {k.decode() for k in train_keys}, {k.decode() for k in val_keys}
  assert not train_set & val_set
  assert train_set | val_set == set(meta["train"])
  assert food.num_examples("train") == 1600 and food.num_examples("val") == 400
  # The tf.data filter (lookup table on the key) selects exactly the indexed keys.
  assert set(_keys_labels(food.as_dataset("val"))) == val_set
  # Same seed -> same split (fresh object, assignment recomputed); other seed -> different.
  same = data.get_source("food101_local", data_dir=food.builder.data_dir_root, split_seed=0)
  other = data.get_source("food101_local", data_dir=food.builder.data_dir_root, split_seed=1)
  assert {k.decode() for k in same.index("val")[0]} == val_set
  other_val = {k.decode() for k in other.index("val")[0]}
  assert other_val != val_set and len(other_val) == 400


def test_assign_val_fraction_and_rounding():
  keys = [f"c{c}/{i}" for c in range(3) for i in range(7 + c)]
  labels = [c for c in range(3) for _ in range(7 + c)]
  is_val = data.assign_val(keys, labels, val_fraction=0.25, seed=3)
  # floor(0.25 * n + 0.5) for n = 7, 8, 9 -> 2, 2, 2
  assert [int(is_val[np.asarray(labels) == c].sum()) for c in range(3)] == [2, 2, 2]
  # Order of the input does not matter.
  perm = np.random.default_rng(0).permutation(len(keys))
  again = data.assign_val([keys[i] for i in perm], [labels[i] for i in perm], val_fraction=0.25, seed=3)
  assert {keys[i] for i in perm[again]} == {k for k, v in zip(keys, is_val) if v}


def test_food101_root_resolution(shared_data):
  root = shared_data / "food-101-mini" / "food-101"
  assert pathlib.Path(food101_local.resolve_food101_root(root)) == root
  assert pathlib.Path(food101_local.resolve_food101_root(root.parent)) == root


def test_image_folder_single_tree(shared_data):
  src = data.get_source("image_folder", manual_dir=shared_data / "cifar10-small" / "test")
  names = sorted(p.name for p in (shared_data / "cifar10-small" / "test").iterdir() if p.is_dir())
  assert src.class_names == names and src.num_classes == 10
  assert src.num_examples("trainval") == 2000
  keys, labels = src.index("trainval")
  assert keys[0] == b"airplane/0000" and collections.Counter(labels.tolist()) == {c: 200 for c in range(10)}
  assert src.num_examples("val") == 400 and src.num_examples("train") == 1600
  ex = next(iter(src.as_dataset("val")))
  assert augment.decode_image(ex["image"]).shape == (32, 32, 3)
  with pytest.raises(ValueError, match="no official test split"):
    src.num_examples("test")


def test_image_folder_train_test_layout(shared_data):
  src = data.get_source("image_folder", manual_dir=shared_data / "cifar10-small")
  assert src.num_examples("trainval") == 10000 and src.num_examples("test") == 2000
  assert src.num_examples("val") == 2000


def test_clear_errors(tmp_path, shared_data):
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
    data.get_source("image_folder", manual_dir=tree)
  with pytest.raises(ValueError, match="unknown split"):
    data.get_source("image_folder", manual_dir=shared_data / "cifar10-small" / "test").num_examples("valid")


def test_tfds_sources_construct_offline(tmp_path):
  expected = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "food101": 101}
  for name, num_classes in expected.items():
    src = data.get_source(name, data_dir=tmp_path, download=False)
    assert isinstance(src, sources.TfdsSource) and src.num_classes == num_classes
  food = data.get_source("food101", data_dir=tmp_path, download=False)
  assert food.version == "2.1.0" and food.key_feature == "id" and food.test_split_name == "validation"
  assert data.get_source("imagenet2012", data_dir=tmp_path, download=False).key_feature == "file_name"
  with pytest.raises(FileNotFoundError, match="not prepared"):
    food.num_examples("test")
