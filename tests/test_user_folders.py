"""Data sets from a user's own folder: keyed by content, bad layouts refused, bad images found.

Every folder here is generated in tmp_path from real image files written by Pillow
(the independent reference for the pixels); each test gets its own TFDS data_dir.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import jaxkd.data as data
from jaxkd.data import augment, food101_local

H, W = 30, 40


def _pixels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kw)
  return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
  return _encode(Image.fromarray(_pixels(seed)), "JPEG", quality=90)


def _write(path: pathlib.Path, payload: bytes, mtime_ns: int | None = None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(payload)
  if mtime_ns is not None:
    os.utime(path, ns=(mtime_ns, mtime_ns))
  return path


def _class_tree(root: pathlib.Path, classes=("cat", "dog", "fox"), per_class: int = 6,
                seed: int = 0) -> pathlib.Path:
  for c, name in enumerate(classes):
    for i in range(per_class):
      _write(root / name / f"{i:04d}.jpg", _jpeg(seed + 100 * c + i))
  return root


def _food_folder(parent: pathlib.Path, classes=("apple_pie", "bibimbap"), n_train: int = 5,
                 n_test: int = 2, seed: int = 0) -> pathlib.Path:
  """A Food-101-layout folder (images/<class>/<id>.jpg + meta/) below ``parent``."""
  root = parent / "food-101"
  train, test = {}, {}
  for c, name in enumerate(classes):
    keys = [f"{name}/{1000 + seed * 50 + i}" for i in range(n_train + n_test)]
    for i, key in enumerate(keys):
      _write(root / "images" / f"{key}.jpg", _jpeg(seed + 100 * c + i))
    train[name], test[name] = keys[:n_train], keys[n_train:]
  _write(root / "meta" / "classes.txt", "\n".join(classes).encode() + b"\n")
  _write(root / "meta" / "train.json", json.dumps(train).encode())
  _write(root / "meta" / "test.json", json.dumps(test).encode())
  return parent


def _keys(source, split: str) -> set[str]:
  return {k.decode() for k in source.index(split)[0]}


def _no_work(monkeypatch):
  """Makes decoding images (the check) or building the TFDS copy fail the test."""
  from jaxkd.data import user_folders

  def fail(*args, **kwargs):
    raise AssertionError("the folder was checked or built again although it did not change")
  monkeypatch.setattr(user_folders, "_decoded_indices", fail)
  monkeypatch.setattr(food101_local.Food101Local, "_split_generators", fail)


# ------------------------------------------------------------- 1. keyed by the folder's content


def test_image_folder_keyed_by_content_not_path(tmp_path, monkeypatch):
  tfds_dir = tmp_path / "tfds"
  root = _class_tree(tmp_path / "photos")
  first = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root)
  assert first.num_classes == 3 and first.num_examples("trainval") == 18
  assert len(first.fingerprint) == 64 and first.version == f"folder-{first.fingerprint[:12]}"
  # The fingerprint is the documented formula: sorted (path, size, mtime_ns) lines.
  lines = sorted(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}\n"
                 for p in root.rglob("*.jpg"))
  assert first.fingerprint == hashlib.sha256("".join(lines).encode()).hexdigest()

  # Same folder by a symlink, a relative path, a trailing slash: same data set, nothing redone.
  (tmp_path / "link").symlink_to(root, target_is_directory=True)
  monkeypatch.chdir(tmp_path)
  with monkeypatch.context() as m:
    _no_work(m)
    for alias in (tmp_path / "link", "photos", str(root) + "/", "./link/"):
      again = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=alias)
      assert again.fingerprint == first.fingerprint and again.version == first.version

  # One photo replaced by another of the same name (and size class): a different data set.
  stat = (root / "dog" / "0003.jpg").stat()
  _write(root / "dog" / "0003.jpg", _jpeg(999), mtime_ns=stat.st_mtime_ns + 1_000_000_000)
  changed = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root)
  assert changed.version != first.version
  # An 11th-class-style change: one more class folder is a different data set with more classes.
  _class_tree(root, classes=("owl",), per_class=6, seed=500)
  grown = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root)
  assert grown.num_classes == 4 and grown.class_names[-1] == "owl"
  assert len({first.version, changed.version, grown.version}) == 3


def test_food101_local_other_or_changed_folder_is_built_anew(tmp_path, monkeypatch):
  tfds_dir = tmp_path / "tfds"
  a = _food_folder(tmp_path / "a", classes=("apple_pie", "bibimbap"), seed=0)
  b = _food_folder(tmp_path / "b", classes=("apple_pie", "baklava", "bibimbap"), seed=7)
  src_a = data.get_source("food101_local", data_dir=tfds_dir, manual_dir=a)
  with pytest.warns(UserWarning, match="beside 1 earlier build"):
    src_b = data.get_source("food101_local", data_dir=tfds_dir, manual_dir=b)
  assert src_a.class_names == ["apple_pie", "bibimbap"]
  assert src_b.class_names == ["apple_pie", "baklava", "bibimbap"]
  assert _keys(src_b, "test") == {f"{c}/{1355 + i}" for c in src_b.class_names for i in range(2)}
  assert src_a.version != src_b.version
  assert src_a.version == f"1.0.0-{src_a.fingerprint[:12]}"
  # The images themselves come from B's folder, byte for byte.
  for ex in src_b.as_dataset("trainval").as_numpy_iterator():
    path = b / "food-101" / "images" / f"{ex['key'].decode()}.jpg"
    assert ex["image"] == path.read_bytes()

  # A again, by the food-101/ folder itself with a trailing slash: reused, not rebuilt.
  with monkeypatch.context() as m:
    _no_work(m)
    again = data.get_source("food101_local", data_dir=tfds_dir,
                            manual_dir=str(a / "food-101") + "/")
    assert again.version == src_a.version and _keys(again, "trainval") == _keys(src_a, "trainval")

  # A changed (one image replaced): built anew, from the new bytes.
  img = a / "food-101" / "images" / "apple_pie" / "1001.jpg"
  _write(img, _jpeg(4242), mtime_ns=img.stat().st_mtime_ns + 1_000_000_000)
  with pytest.warns(UserWarning, match="beside 2 earlier build"):
    changed = data.get_source("food101_local", data_dir=tfds_dir, manual_dir=a)
  assert changed.version != src_a.version
  [raw] = [ex["image"] for ex in changed.as_dataset("trainval").as_numpy_iterator()
           if ex["key"] == b"apple_pie/1001"]
  assert raw == img.read_bytes()


def test_missing_folder_is_refused_before_any_work(tmp_path):
  tfds_dir = tmp_path / "tfds"
  data.get_source("food101_local", data_dir=tfds_dir, manual_dir=_food_folder(tmp_path / "a"))
  before = sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*"))
  nowhere = tmp_path / "nowhere"
  for name in ("food101_local", "image_folder"):
    with pytest.raises(data.DataError, match=re.escape(str(nowhere))):
      data.get_source(name, data_dir=tfds_dir, manual_dir=nowhere)
  assert sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*")) == before


# ------------------------------------------------------------- 2. layouts and splits


def test_plain_tree_has_no_test_split_and_trains_end_to_end(tmp_path):
  tfds_dir = tmp_path / "tfds"
  root = _class_tree(tmp_path / "plain")
  plain = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root)
  assert plain.has_test is False and plain.splits == ("train", "val", "trainval")
  assert plain.num_examples("train") + plain.num_examples("val") == 18
  kw = dict(global_batch_size=8, image_size=16, num_devices=8)
  batch = next(iter(data.eval_dataset(plain, "val", **kw)))
  assert batch["image"].shape == (8, 16, 16, 3)
  assert batch["weight"].numpy().sum() == 3  # floor(0.2 * 6 + 0.5) = 1 val image per class
  train = next(iter(data.train_dataset(plain, "train", **kw)))
  assert train["image"].shape == (8, 16, 16, 3)

  both = tmp_path / "both"
  _class_tree(both / "train")
  _class_tree(both / "test", per_class=2, seed=50)
  split = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=both)
  assert split.has_test is True and split.splits == ("train", "val", "test", "trainval")
  assert split.num_examples("test") == 6


def test_parent_folder_or_one_class_is_refused(tmp_path):
  tfds_dir = tmp_path / "tfds"
  _class_tree(tmp_path / "above" / "photos")
  with pytest.raises(data.DataError, match=r"did you mean manual_dir='.*above/photos'"):
    data.get_source("image_folder", data_dir=tfds_dir, manual_dir=tmp_path / "above")
  _class_tree(tmp_path / "one", classes=("cat",))
  with pytest.raises(data.DataError, match="only one class folder"):
    data.get_source("image_folder", data_dir=tfds_dir, manual_dir=tmp_path / "one")
  # Split folders that are not named train/test look like classes holding the same classes.
  _class_tree(tmp_path / "splits" / "training")
  _class_tree(tmp_path / "splits" / "testing", seed=50)
  with pytest.raises(data.DataError, match="look like split folders"):
    data.get_source("image_folder", data_dir=tfds_dir, manual_dir=tmp_path / "splits")
  # An empty class folder, and one holding only non-images.
  empty = _class_tree(tmp_path / "empty", classes=("cat", "dog"))
  (empty / "eel").mkdir()
  with pytest.raises(data.DataError, match="eel.*has no images"):
    data.get_source("image_folder", data_dir=tfds_dir, manual_dir=empty)
  _write(empty / "eel" / "notes.txt", b"to do")
  with pytest.raises(data.DataError, match="eel.*has no images.*notes.txt"):
    data.get_source("image_folder", data_dir=tfds_dir, manual_dir=empty)


# ------------------------------------------------------------- 3. every image checked at build


def _odd_but_valid(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """Valid images in formats/modes the pipeline must read; {file name: Pillow's RGB pixels}."""
  rgb = Image.fromarray(_pixels(1))
  rgba = Image.fromarray(np.dstack([_pixels(2), _pixels(3)[..., :1]]), "RGBA")
  files = {
      "gray.jpg": _encode(rgb.convert("L"), "JPEG", quality=95),
      "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
      "png_named.jpg": _encode(rgb, "PNG"),
      "rgba.png": _encode(rgba, "PNG"),
      "palette.gif": _encode(rgb.convert("P"), "GIF"),
      "plain.bmp": _encode(rgb, "BMP"),
      "onebit.bmp": _encode(rgb.convert("1"), "BMP"),  # TensorFlow's BMP decoder rejects 1-bit
  }
  expected = {}
  for name, payload in files.items():
    _write(folder / name, payload)
    with Image.open(io.BytesIO(payload)) as im:
      expected[name] = np.asarray(im.convert("RGB"))
  return expected


def test_valid_formats_come_out_rgb_uint8(tmp_path):
  root = _class_tree(tmp_path / "photos", classes=("a", "b"), per_class=3)
  expected = _odd_but_valid(root / "a")
  src = data.get_source("image_folder", data_dir=tmp_path / "tfds", manual_dir=root)
  assert src.skipped_images == []
  assert [os.path.basename(p) for p, _ in src.converted_images] == ["onebit.bmp"]
  assert "TensorFlow cannot decode" in src.converted_images[0][1]
  images = {ex["key"].decode(): ex["image"]
            for ex in src.as_dataset("trainval").as_numpy_iterator()}
  assert len(images) == 6 + len(expected)
  cfg = augment.AugmentConfig(image_size=16)
  for name, ref in expected.items():
    raw = tf.constant(images[f"a/{os.path.splitext(name)[0]}"])
    out = augment.decode_image(raw).numpy()
    assert out.dtype == np.uint8 and out.shape == (H, W, 3), name
    if name in ("gray.jpg", "cmyk.jpg"):
      # Pillow's libjpeg decode is the reference; TensorFlow's default fast integer IDCT
      # differs by a few levels on these noise images (measured mean 1.2 and 1.7).
      assert np.abs(out.astype(int) - ref.astype(int)).mean() <= 3, name
    else:
      np.testing.assert_array_equal(out, ref, err_msg=name)
    assert augment.eval_preprocess(raw, cfg).shape == (16, 16, 3)
    assert augment.train_preprocess(raw, tf.constant([1, 2], tf.int64), cfg).shape == (16, 16, 3)
  gray = augment.decode_image(tf.constant(images["a/gray"])).numpy()
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def _with_bad_images(root: pathlib.Path) -> dict[str, str]:
  """Adds 4 undecodable files to classes 'a' and 'b'; {absolute path: expected reason}."""
  good = _jpeg(77)
  bad = {
      root / "b" / "truncated.jpg": (good[:len(good) // 2], "truncated or corrupt JPEG"),
      root / "b" / "empty.jpg": (b"", "empty file (0 bytes)"),
      root / "b" / "notes.jpg": (b"eggs, flour\n", "not a JPEG, PNG, GIF, BMP or WebP"),
      root / "a" / "cut.png": (_encode(Image.fromarray(_pixels(5)), "PNG")[:-30],
                               "truncated or corrupt PNG"),
  }
  for path, (payload, _) in bad.items():
    _write(path, payload)
  return {os.fspath(p): reason for p, (_, reason) in bad.items()}


def test_bad_images_refuse_the_build_in_one_error(tmp_path):
  root = _class_tree(tmp_path / "photos", classes=("a", "b"), per_class=4)
  bad = _with_bad_images(root)
  with pytest.raises(data.DataError) as info:
    data.get_source("image_folder", data_dir=tmp_path / "tfds", manual_dir=root)
  message = str(info.value)
  assert message.startswith("4 of 12 image files") and "skip_bad_images=True" in message
  for path, reason in bad.items():
    [line] = [m for m in message.splitlines() if m.strip().startswith(path + ":")]
    assert reason in line, line


def test_skip_bad_images_leaves_them_out_and_lists_them(tmp_path, monkeypatch):
  tfds_dir = tmp_path / "tfds"
  root = _class_tree(tmp_path / "photos", classes=("a", "b"), per_class=4)
  bad = _with_bad_images(root)
  src = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root, skip_bad_images=True)
  assert sorted(p for p, _ in src.skipped_images) == sorted(bad)
  for path, reason in src.skipped_images:
    assert bad[path] in reason
  assert src.num_examples("trainval") == 8
  # Everything left decodes, through the whole pipeline.
  for ex in src.as_dataset("trainval").as_numpy_iterator():
    assert augment.decode_image(tf.constant(ex["image"])).shape == (H, W, 3)
  # The check is cached with the fingerprint: a rerun decodes nothing, refusing or skipping alike.
  with monkeypatch.context() as m:
    _no_work(m)
    again = data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root,
                            skip_bad_images=True)
    assert again.skipped_images == src.skipped_images
    with pytest.raises(data.DataError, match="4 of 12"):
      data.get_source("image_folder", data_dir=tfds_dir, manual_dir=root)


def test_food101_local_bad_image_refused_or_skipped(tmp_path):
  tfds_dir = tmp_path / "tfds"
  parent = _food_folder(tmp_path / "f", n_train=4, n_test=2)
  broken = parent / "food-101" / "images" / "bibimbap" / "1001.jpg"
  broken.write_bytes(broken.read_bytes()[:200])
  onebit = _encode(Image.fromarray(_pixels(9)).convert("1"), "BMP")  # only Pillow decodes it
  _write(parent / "food-101" / "images" / "apple_pie" / "1002.jpg", onebit)
  with pytest.raises(data.DataError, match=re.escape(f"{broken}: truncated or corrupt JPEG")):
    data.get_source("food101_local", data_dir=tfds_dir, manual_dir=parent)
  assert not list((tfds_dir / "food101_local").glob("folder-*"))  # nothing was built
  src = data.get_source("food101_local", data_dir=tfds_dir, manual_dir=parent, skip_bad_images=True)
  assert [p for p, _ in src.skipped_images] == [os.fspath(broken)]
  assert "bibimbap/1001" not in _keys(src, "trainval") and src.num_examples("trainval") == 7
  images = {ex["key"]: ex["image"] for ex in src.as_dataset("trainval").as_numpy_iterator()}
  for raw in images.values():
    assert augment.decode_image(tf.constant(raw)).shape == (H, W, 3)
  assert [os.path.basename(p) for p, _ in src.converted_images] == ["1002.jpg"]
  with Image.open(io.BytesIO(onebit)) as im:
    np.testing.assert_array_equal(augment.decode_image(tf.constant(images[b"apple_pie/1002"])),
                                  np.asarray(im.convert("RGB")))
  # Without the flag the same folder is still refused (the build left the image out).
  with pytest.raises(data.DataError, match="1 of 12"):
    data.get_source("food101_local", data_dir=tfds_dir, manual_dir=parent)
  # Without manual_dir the one build in data_dir is used, and its recorded check decides alike.
  with pytest.raises(data.DataError, match=re.escape(f"{broken}: truncated or corrupt JPEG")):
    data.get_source("food101_local", data_dir=tfds_dir)
  found = data.get_source("food101_local", data_dir=tfds_dir, skip_bad_images=True)
  assert found.version == src.version and found.skipped_images == src.skipped_images
  assert found.converted_images == src.converted_images
