"""Data sources: where examples come from, all with one element structure.

Every source yields ``{'image': tf.string (encoded JPEG/PNG bytes, undecoded),
'label': tf.int32, 'key': tf.string}``, where ``key`` is a stable example id
('apple_pie/1005649' for Food-101, 'cat/0000' for an image folder). Images stay
encoded so the augmentation can use the fused decode-and-crop.

Sources (``get_source(name, ...)``):

* ``food101``: TFDS ``food101`` exactly as TFDS ships it (downloads the archive);
  version 2.1.0 by default, whose ``id`` feature gives the keys (official test
  split = TFDS 'validation').
* ``food101_local``: a local Food-101 copy in the original archive layout (or a
  subset), built once by the TFDS builder in ``food101_local.py`` into
  ``data_dir`` from ``manual_dir``, as the builder config named by the folder's
  fingerprint.
* ``cifar10``, ``cifar100``: TFDS (PNG-encoded 32x32 images; key = TFDS ``id``).
* ``imagenet2012``: TFDS, manual download (``manual_dir`` holds the ILSVRC2012 tars;
  key = ``file_name``; official test = 'validation').
* ``image_folder``: any class-per-folder tree (``manual_dir``): either
  ``<root>/<class>/<img>`` (one official split, 'trainval': splits 'train'/'val' only)
  or ``<root>/train/<class>/...`` plus optional ``<root>/test/<class>/...``. Classes =
  sorted subfolder names (at least two), key = path relative to the split folder
  without extension. Names starting with '.' are skipped.

Sources built from a user's folder (``food101_local``, ``image_folder``) are keyed by
the folder's fingerprint (``user_folders.fingerprint``: relative paths, sizes and
modification times of its images and meta files): ``source.fingerprint`` is it and
``source.version`` contains its first 12 hex digits, so everything cached under
``<data_dir>/<name>/<version>/`` belongs to exactly that folder content. Every image
is decoded once when the source is built (``user_folders.check_images``); undecodable
files refuse the build with one ``DataError`` listing them, unless
``skip_bad_images=True`` (then ``source.skipped_images`` lists them): every user-folder
source decides this with ``user_folders.usable_images``.

Splits ('train', 'val', 'test', 'trainval') follow ``splits.py``: 'train'/'val'
are carved from the official training split by key, 'test' is the official test split;
``source.splits`` / ``source.has_test`` say which exist.
"""
from __future__ import annotations

import abc
import collections
import os
import pathlib
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd.data import splits as splits_lib
from jaxkd.data import user_folders
from jaxkd.data.user_folders import DataError

SOURCE_NAMES = ("food101", "food101_local", "cifar10", "cifar100", "imagenet2012", "image_folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

Shard = tuple[int, int]  # (index, count): the index-th of count contiguous, even slices


def _check_shard(shard: Shard | None) -> Shard | None:
  if shard is None:
    return None
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard={shard}: need 0 <= index < count")
  return (int(index), int(count))


def even_slice(n: int, shard: Shard) -> tuple[int, int]:
  """[start, stop) of the index-th of ``count`` contiguous slices of ``range(n)``.

  The first ``n % count`` slices get one extra element (TFDS ``even_splits`` rule).
  """
  index, count = shard
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)


class Source(abc.ABC):
  """A data set with official train (and usually test) splits, keyed examples.

  Public API: ``name``, ``version``, ``class_names``, ``num_classes``,
  ``as_dataset(split, shard=None)``, ``num_examples(split, shard=None)``,
  ``index(split, shard=None)`` (keys and labels without decoding images).

  Internally a source yields small *records* (``records``) that ``load_fn`` turns into
  elements; for an image folder a record is a file path (cheap to shuffle fully) and
  loading reads the file, for TFDS the record already holds the image bytes.
  """

  name: str
  train_split_name: str
  test_split_name: str | None
  # True when records are small (paths): the pipeline may then shuffle a whole epoch.
  records_are_cheap: bool = False

  def __init__(self, *, val_fraction: float = 0.2, split_seed: int = 0):
    if not 0.0 <= val_fraction < 1.0:
      raise ValueError(f"val_fraction={val_fraction}: need 0 <= val_fraction < 1 (0.2 holds out "
                       "20% of each class)")
    self.val_fraction = float(val_fraction)
    self.split_seed = int(split_seed)
    self._assignment: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    self._val_keys: set[bytes] | None = None
    self._table: tf.lookup.StaticHashTable | None = None

  # ------------------------------------------------------------------ to implement

  @property
  @abc.abstractmethod
  def version(self) -> str:
    """Version string of the underlying data (TFDS version or a listing fingerprint)."""

  @property
  @abc.abstractmethod
  def class_names(self) -> list[str]:
    """Class names; label i is class_names[i]."""

  @abc.abstractmethod
  def _records(self, official: str, shard: Shard | None) -> tf.data.Dataset:
    """Records of an official split (deterministic order) with at least 'key' and 'label'."""

  @abc.abstractmethod
  def _official_index(self, official: str, shard: Shard | None) -> tuple[np.ndarray, np.ndarray]:
    """(keys as bytes, int32 labels) of an official split, in record order."""

  @abc.abstractmethod
  def _official_count(self, official: str) -> int:
    """Number of examples of an official split (no image decoding)."""

  @property
  def load_fn(self) -> Callable[[dict], dict] | None:
    """Record -> element {'image','label','key'} (None when records already are elements)."""
    return None

  # ------------------------------------------------------------------ public

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def has_test(self) -> bool:
    """Whether the data set has an official test split (else evaluate on 'val' only)."""
    return self.test_split_name is not None

  @property
  def splits(self) -> tuple[str, ...]:
    """The splits this source can give: ('train', 'val', 'test', 'trainval') or without 'test'."""
    return tuple(s for s in splits_lib.SPLITS if s != splits_lib.TEST or self.has_test)

  # Set by the sources built from a user's folder.
  _fingerprint: str | None = None
  _skipped: Sequence[tuple[str, str]] = ()
  _converted: Sequence[tuple[str, str]] = ()

  @property
  def fingerprint(self) -> str | None:
    """SHA-256 hex of the user folder the data set was built from (None: not a user folder)."""
    return self._fingerprint

  @property
  def skipped_images(self) -> list[tuple[str, str]]:
    """(path, reason) of the undecodable images left out (``skip_bad_images=True``)."""
    return list(self._skipped)

  @property
  def converted_images(self) -> list[tuple[str, str]]:
    """(path, reason) of the images only Pillow decodes, converted once to PNG."""
    return list(self._converted)

  def _official_for(self, split: str) -> str:
    splits_lib.check_split(split)
    if split == splits_lib.TEST:
      if self.test_split_name is None:
        raise ValueError(f"source {self.name!r} has no official test split; use "
                         "'train'/'val'/'trainval' or give a folder with train/ and test/ "
                         "subfolders")
      return self.test_split_name
    return self.train_split_name

  def _ensure_assignment(self) -> None:
    if self._assignment is None:
      keys, labels = self._official_index(self.train_split_name, None)
      is_val = splits_lib.assign_val(keys, labels, val_fraction=self.val_fraction,
                                     seed=self.split_seed)
      self._assignment = (keys, labels, is_val)
      self._val_keys = set(keys[is_val].tolist())

  @property
  def split_table(self) -> tf.lookup.StaticHashTable:
    """tf.lookup table official-train key -> 0 (train) / 1 (val)."""
    if self._table is None:
      self._ensure_assignment()
      keys, _, is_val = self._assignment
      self._table = splits_lib.split_lookup_table(keys, is_val)
    return self._table

  def records(self, split: str, *, shard: Shard | None = None) -> tf.data.Dataset:
    """Records of ``split`` (filtered by key for 'train'/'val'), before loading."""
    shard = _check_shard(shard)
    ds = self._records(self._official_for(split), shard)
    if split in (splits_lib.TRAIN, splits_lib.VAL):
      ds = splits_lib.filter_split(ds, self.split_table, split)
    return ds

  def as_dataset(self, split: str, *, shard: Shard | None = None,
                 num_parallel_calls: int | None = None) -> tf.data.Dataset:
    """Elements {'image': encoded bytes, 'label': int32, 'key': string} of ``split``.

    ``shard=(i, n)`` reads only the i-th of n contiguous slices of the official split
    (then filters), as each host does for training.
    """
    ds = self.records(split, shard=shard)
    if self.load_fn is not None:
      ds = ds.map(self.load_fn, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
                  deterministic=True)
    return ds

  def index(self, split: str, *, shard: Shard | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys as bytes, int32 labels) of ``split`` in record order, without decoding images."""
    shard = _check_shard(shard)
    keys, labels = self._official_index(self._official_for(split), shard)
    if split in (splits_lib.TRAIN, splits_lib.VAL):
      self._ensure_assignment()
      in_val = np.fromiter((k in self._val_keys for k in keys.tolist()), bool, len(keys))
      keep = in_val if split == splits_lib.VAL else ~in_val
      keys, labels = keys[keep], labels[keep]
    return keys, labels

  def num_examples(self, split: str, *, shard: Shard | None = None) -> int:
    """Number of examples of ``split`` (or of one shard of it), without decoding images."""
    if shard is None and split in (splits_lib.TEST, splits_lib.TRAINVAL):
      return self._official_count(self._official_for(split))
    if shard is None and split in (splits_lib.TRAIN, splits_lib.VAL):
      self._ensure_assignment()
      n_val = int(self._assignment[2].sum())
      return n_val if split == splits_lib.VAL else len(self._assignment[0]) - n_val
    return len(self.index(split, shard=shard)[0])

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, "
            f"num_classes={self.num_classes}, val_fraction={self.val_fraction}, "
            f"split_seed={self.split_seed})")


# ============================================================================ TFDS


class TfdsSource(Source):
  """A TFDS data set read with its image feature left encoded (``SkipDecoding``).

  The builder is prepared (downloaded/built) on first use unless ``download=False``.
  The key is the ``id`` or ``file_name`` feature when the data set has one, else
  TFDS's ``tfds_id`` (stable for a given prepared copy). Key/label indexes (one
  pass over the records, images not decoded) are cached in memory and as
  ``jaxkd-index-*.npz`` beside the prepared data.
  """

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder, *, train_split: str,
               test_split: str | None, manual_dir: str | os.PathLike | None = None,
               download: bool = True, val_fraction: float = 0.2, split_seed: int = 0):
    super().__init__(val_fraction=val_fraction, split_seed=split_seed)
    self.name = name
    self.builder = builder
    self.train_split_name = train_split
    self.test_split_name = test_split
    self.manual_dir = manual_dir
    self.download = download
    features = builder.info.features
    for feature in ("image", "label"):
      if feature not in features:
        raise ValueError(f"TFDS data set {builder.name!r} has no {feature!r} feature; it is not an "
                         "image classification data set jaxkd can read")
    self.key_feature = next((k for k in ("id", "file_name") if k in features), "tfds_id")
    self._index_cache: dict[tuple[str, Shard | None], tuple[np.ndarray, np.ndarray]] = {}

  def prepare(self) -> None:
    """Downloads and prepares the data set into data_dir if it is not there yet."""
    if self.builder.is_prepared():
      return
    if not self.download:
      raise FileNotFoundError(
          f"TFDS data set {self.builder.name}:{self.builder.version} is not prepared in "
          f"{os.fspath(self.builder.data_dir)!r}; pass download=True (or run `tfds build "
          f"{self.builder.name}`) or point data_dir at a prepared copy.")
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(self.manual_dir) if self.manual_dir is not None else None,
        compute_stats=tfds.download.ComputeStatsMode.SKIP)
    try:
      self.builder.download_and_prepare(download_config=config)
    except ModuleNotFoundError as e:
      if e.name != "importlib_resources":
        raise
      raise ModuleNotFoundError(
          "TFDS 4.9.x needs the package 'importlib_resources' to prepare data sets but does not "
          "declare it on Python >= 3.9 (tensorflow/datasets#11212); `pip install "
          "importlib_resources`",
          name=e.name) from e

  @property
  def version(self) -> str:
    return str(self.builder.version)

  @property
  def class_names(self) -> list[str]:
    label = self.builder.info.features["label"]
    if label.num_classes is None:
      self.prepare()
      label = self.builder.info.features["label"]
    return list(label.names)

  def _split_arg(self, official: str, shard: Shard | None):
    if official not in self.builder.info.splits and self.builder.is_prepared():
      raise ValueError(f"TFDS data set {self.builder.name!r} has no split {official!r}; it has "
                       f"{sorted(self.builder.info.splits)}")
    if shard is None or shard[1] == 1:
      return official
    return tfds.even_splits(official, n=shard[1])[shard[0]]

  def _records(self, official: str, shard: Shard | None) -> tf.data.Dataset:
    self.prepare()
    read_config = tfds.ReadConfig(add_tfds_id=self.key_feature == "tfds_id", try_autocache=False,
                                  skip_prefetch=True)
    ds = self.builder.as_dataset(split=self._split_arg(official, shard), shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()},
                                 read_config=read_config)
    key = self.key_feature
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32),
                              "key": ex[key]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _index_path(self, official: str, shard: Shard | None) -> pathlib.Path:
    tag = official if shard is None else f"{official}-{shard[0]}of{shard[1]}"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    name = f"jaxkd-index-{tag}-{self.key_feature}.npz"
    return pathlib.Path(os.fspath(self.builder.data_dir)) / name

  def _official_index(self, official: str, shard: Shard | None) -> tuple[np.ndarray, np.ndarray]:
    cache_key = (official, shard)
    if cache_key in self._index_cache:
      return self._index_cache[cache_key]
    self.prepare()
    path = self._index_path(official, shard)
    if path.is_file():
      with np.load(path, allow_pickle=False) as f:
        keys, labels = f["keys"].astype(object), f["labels"].astype(np.int32)
    else:
      keys_list, labels_list = [], []
      ds = self._records(official, shard).map(lambda ex: (ex["key"], ex["label"])).batch(8192)
      for batch_keys, batch_labels in ds.as_numpy_iterator():
        keys_list.extend(batch_keys.tolist())
        labels_list.append(batch_labels)
      keys = np.array(keys_list, dtype=object)
      labels = (np.concatenate(labels_list).astype(np.int32) if labels_list
                else np.zeros([0], np.int32))
      self._write_index(path, keys, labels)
    self._index_cache[cache_key] = (keys, labels)
    return keys, labels

  def _write_index(self, path: pathlib.Path, keys: np.ndarray, labels: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
      with open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys.tolist(), dtype=bytes), labels=labels)
      os.replace(tmp, path)
    except OSError as e:
      warnings.warn(f"could not cache the key index at {os.fspath(path)!r} ({e}); it will be "
                    "rebuilt (one pass over the records) in each new process.", stacklevel=2)

  def _official_count(self, official: str) -> int:
    self.prepare()
    if official not in self.builder.info.splits:
      raise ValueError(f"TFDS data set {self.builder.name!r} has no split {official!r}; it has "
                       f"{sorted(self.builder.info.splits)}")
    return int(self.builder.info.splits[official].num_examples)


class Food101LocalSource(TfdsSource):
  """``food101_local``: the TFDS builder's config for one folder content (its fingerprint).

  ``version`` = the builder's version + '-' + the fingerprint's first 12 hex digits, so
  anything keyed by (name, version) is keyed by the folder's content.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, *, fingerprint: str, folder: str,
               images: user_folders.UsableImages, manual_dir: str | os.PathLike | None,
               download: bool, val_fraction: float = 0.2, split_seed: int = 0):
    super().__init__("food101_local", builder, train_split="train", test_split="test",
                     manual_dir=manual_dir, download=download, val_fraction=val_fraction,
                     split_seed=split_seed)
    self._fingerprint = fingerprint
    self.folder = folder
    self._skipped = images.skipped
    self._converted = images.converted

  @property
  def version(self) -> str:
    return f"{self.builder.version}-{self._fingerprint[:12]}"


def _prepared_food101_local(data_dir: pathlib.Path, version: str) -> list[dict]:
  """Image-check records of the food101_local builds prepared in ``data_dir``."""
  from jaxkd.data import food101_local

  found = []
  for record_dir in sorted((data_dir / "food101_local").glob(f"{version}-*")):
    record = user_folders.read_check(record_dir)
    if not record or "fingerprint" not in record:
      continue
    built = data_dir / "food101_local" / food101_local.config_name(record["fingerprint"]) / version
    if (built / "dataset_info.json").is_file():
      found.append(record)
  return found


def _food101_local_source(*, data_dir, manual_dir, version, download, skip_bad_images,
                          **common) -> Food101LocalSource:
  from jaxkd.data import food101_local  # registers the builder with TFDS

  data_dir = user_folders.default_data_dir(data_dir)
  tfds_version = str(version or food101_local.Food101Local.VERSION)
  if manual_dir is None:
    default = data_dir / "downloads" / "manual"  # TFDS's default manual_dir
    if default.is_dir():
      manual_dir = default
    else:
      builds = _prepared_food101_local(data_dir, tfds_version)
      if len(builds) != 1:
        listed = "".join(f"\n  {b['folder']} (fingerprint {b['fingerprint'][:12]})" for b in builds)
        state = (f"holds {len(builds)} food101_local builds, from:{listed}\n" if builds
                 else "holds no food101_local build ")
        raise user_folders.DataFolderNotFoundError(
            f"no manual_dir was given and {os.fspath(data_dir)!r} {state}(TFDS's default "
            f"manual_dir {os.fspath(default)!r} does not exist either); pass "
            "manual_dir=<folder holding food-101/>")
      record = builds[0]
      fp, folder = record["fingerprint"], record["folder"]
      check = user_folders.ImageCheck(fp, record["num_checked"], tuple(map(tuple, record["bad"])),
                                      tuple(map(tuple, record["converted"])))
      images = user_folders.usable_images(pathlib.Path(folder), check,
                                          skip_bad_images=skip_bad_images)
      builder = food101_local.Food101Local(data_dir=os.fspath(data_dir), version=tfds_version,
                                           config=food101_local.make_config(fp, folder))
      return Food101LocalSource(builder, fingerprint=fp, folder=folder, images=images,
                                manual_dir=None, download=False, **common)
  root = food101_local.resolve_food101_root(manual_dir)
  classes, splits = food101_local.read_food101_meta(root)
  stats = food101_local.food101_files(root, splits)
  fp = user_folders.fingerprint(stats)
  root = pathlib.Path(os.fspath(root))
  rels = [food101_local.image_path(key) for examples in splits.values() for key, _ in examples]
  cache_dir = data_dir / "food101_local" / f"{tfds_version}-{fp[:12]}"
  check = user_folders.check_images(root, rels, fp=fp, cache_dir=cache_dir)
  images = user_folders.usable_images(root, check, skip_bad_images=skip_bad_images)
  key_of = {food101_local.image_path(key): key
            for examples in splits.values() for key, _ in examples}
  skip = {key_of[rel] for rel, _ in check.bad}
  left = {label for key, label in splits["train"] if key not in skip}
  emptied = [c for i, c in enumerate(classes) if i not in left]
  if emptied:
    raise DataError(f"classes {emptied[:5]} of {os.fspath(root)!r} have no decodable training "
                    "images left once the undecodable ones are skipped; add images or remove those "
                    "classes from the meta files")
  convert = [key_of[rel] for rel, _ in check.converted]
  config = food101_local.make_config(fp, root, skip=sorted(skip), convert=convert)
  builder = food101_local.Food101Local(data_dir=os.fspath(data_dir), version=tfds_version,
                                       config=config)
  if not builder.is_prepared() and not download:
    raise user_folders.DataFolderNotFoundError(
        f"food101_local for {os.fspath(root)!r} (fingerprint {fp[:12]}) is not built in "
        f"{os.fspath(data_dir)!r}; pass download=True to build it from manual_dir")
  if not builder.is_prepared():
    others = sorted(p.name for p in (data_dir / "food101_local").glob("folder-*")
                    if p.name != config.name)
    if others:
      warnings.warn(f"building food101_local for {os.fspath(root)!r} (fingerprint {fp[:12]}) "
                    f"beside {len(others)} earlier build(s) of other folder contents in "
                    f"{os.fspath(data_dir / 'food101_local')!r} ({', '.join(others[:5])}); delete "
                    "those you no longer need (and their '<version>-<fingerprint>' folders)",
                    stacklevel=2)
  source = Food101LocalSource(builder, fingerprint=fp, folder=os.fspath(root), images=images,
                              manual_dir=root, download=download, **common)
  source.prepare()
  return source


# ============================================================================ image folder

_FOLDER_HINT = ("pass manual_dir=<folder with one subfolder per class> (or with train/ and test/ "
                "subfolders holding those)")


def _subfolders(folder: pathlib.Path) -> list[str]:
  """Sorted names of the non-hidden folders (or links to folders) directly in ``folder``."""
  with os.scandir(folder) as it:
    return sorted(e.name for e in it if not user_folders.is_hidden(e.name) and e.is_dir())


def _direct_images(folder: pathlib.Path, exts: set[str]) -> list[str]:
  with os.scandir(folder) as it:
    return sorted(e.name for e in it if not user_folders.is_hidden(e.name) and e.is_file()
                  and os.path.splitext(e.name)[1].lower() in exts)


def _example_names(names: Sequence[str], n: int = 5) -> str:
  shown = ", ".join(repr(x) for x in names[:n])
  return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _list_class_tree(folder: pathlib.Path, extensions: Sequence[str],
                     classes: Sequence[str] | None = None
                     ) -> tuple[list[str], list[str], list[int], user_folders.FileStats]:
  """(class names, relative paths, labels, {relative path: (size, mtime_ns)}) of a class tree.

  ``classes`` given (a test folder): those classes in that order; a class may be absent.
  Otherwise the sorted subfolders, of which there must be at least two, each with images.
  Relative paths are posix, relative to ``folder``, sorted.
  """
  exts = {e.lower() for e in extensions}
  found = _subfolders(folder)
  where = os.fspath(folder)
  if not found:
    loose = _direct_images(folder, exts)
    holds = f" holds {len(loose)} images but" if loose else ""
    raise DataError(f"{where!r}{holds} has no class subfolders; expected {where}/<class>/<image> "
                    f"with at least two classes (extensions {tuple(sorted(exts))})")
  if classes is None:
    if len(found) < 2:
      only = folder / found[0]
      inner = _subfolders(only)
      if inner:
        raise DataError(
            f"{where!r} has a single class folder {found[0]!r}, which itself holds the folders "
            f"{_example_names(inner)}: this looks like the folder above your data set; did you "
            f"mean manual_dir={os.fspath(only)!r}? A data set needs at least two class folders.")
      raise DataError(f"{where!r} has only one class folder ({found[0]!r}); a classifier needs at "
                      f"least two: put each class's images in its own subfolder of {where!r}")
    classes = found
    inner = [set(_subfolders(folder / c)) for c in classes]
    shared = set.intersection(*inner)
    if len(shared) >= 2 and not any(_direct_images(folder / c, exts) for c in classes):
      raise DataError(
          f"the class folders of {where!r} ({_example_names(classes)}) all hold the same "
          f"subfolders ({_example_names(sorted(shared))}) and no images of their own: they look "
          "like split folders, not classes. Name them train/ and test/, or point manual_dir at one "
          "of them.")
  else:
    extra = sorted(set(found) - set(classes))
    if extra:
      raise DataError(f"{where!r} has classes {extra[:5]} that the training folder lacks; rename "
                      "or remove them (test classes must be training classes)")
  paths, labels, stats = [], [], {}
  for label, name in enumerate(classes):
    class_dir = folder / name
    if not class_dir.is_dir():
      continue  # a class may be absent from the test folder
    found_stats, loops = user_folders.scan_files(class_dir, prefix=f"{name}/")
    if loops:
      warnings.warn(f"{os.fspath(class_dir)!r}: symbolic links lead back to folders already read "
                    f"({_example_names(loops)}); each folder is read once", stacklevel=2)
    images = {rel: st for rel, st in found_stats.items()
              if os.path.splitext(rel)[1].lower() in exts}
    if not images:
      others = sorted(set(found_stats) - set(images))
      also = f" (it holds only {_example_names(others)})" if others else " (it is empty)"
      raise DataError(f"class folder {os.fspath(class_dir)!r} has no images with extensions "
                      f"{tuple(sorted(exts))}{also}; remove the folder or add images")
    ignored = sorted(set(found_stats) - set(images))
    if ignored:
      warnings.warn(f"{len(ignored)} files in {os.fspath(class_dir)!r} are not images by their "
                    f"extension and are ignored: {_example_names(ignored)} (images: "
                    f"{tuple(sorted(exts))})", stacklevel=2)
    stats.update(images)
    rels = sorted(images)
    paths.extend(rels)
    labels.extend([label] * len(rels))
  return list(classes), paths, labels, stats


class ImageFolderSource(Source):
  """A class-per-folder image tree (a user's own data). See the module docstring for layouts.

  Keyed by the folder's fingerprint (``fingerprint``; ``version`` = 'folder-' + its first
  12 hex digits). Every image is decoded once at construction by the pipeline's own
  decoders; the result is cached in ``<data_dir>/<name>/<version>/``, which also holds
  PNG conversions of the few images only Pillow can decode. Undecodable images refuse
  the source (``DataError`` listing them all) unless ``skip_bad_images=True``, which
  leaves them out and lists them in ``skipped_images``.
  """

  records_are_cheap = True

  def __init__(self, root: str | os.PathLike, *, name: str = "image_folder",
               extensions: Sequence[str] = IMAGE_EXTENSIONS, val_fraction: float = 0.2,
               split_seed: int = 0, data_dir: str | os.PathLike | None = None,
               skip_bad_images: bool = False):
    super().__init__(val_fraction=val_fraction, split_seed=split_seed)
    self.name = name
    self.root = user_folders.require_folder(root, what="image folder", hint=_FOLDER_HINT)
    self.data_dir = user_folders.default_data_dir(data_dir)
    folders = self._layout()
    self.train_split_name = "trainval"
    self.test_split_name = "test" if "test" in folders else None
    self._folders = folders
    prefixes = {split: "" if folder == self.root else f"{folder.name}/"
                for split, folder in folders.items()}
    classes, rels, labels, stats = _list_class_tree(folders["trainval"], extensions)
    self._classes = classes
    listing = {"trainval": (rels, labels, stats)}
    if "test" in folders:
      _, rels, labels, stats = _list_class_tree(folders["test"], extensions, classes=classes)
      listing["test"] = (rels, labels, stats)
    stats = {prefixes[split] + rel: st
             for split, (_, _, split_stats) in listing.items() for rel, st in split_stats.items()}
    self._fingerprint = user_folders.fingerprint(stats)
    self._version = f"folder-{self._fingerprint[:12]}"
    cache_dir = self.data_dir / name / self._version
    check = user_folders.check_images(self.root, sorted(stats), fp=self._fingerprint,
                                      cache_dir=cache_dir)
    images = user_folders.usable_images(self.root, check, skip_bad_images=skip_bad_images)
    self._skipped, self._converted = images.skipped, images.converted
    png = user_folders.write_converted(self.root, check, cache_dir / "converted")
    bad = {rel for rel, _ in check.bad}
    self._files, self._keys = {}, {}
    for split, (rels, labels, _) in listing.items():
      prefix, folder = prefixes[split], os.fspath(folders[split])
      keep = [i for i, rel in enumerate(rels) if prefix + rel not in bad]
      if split == "trainval":
        left = set(labels[i] for i in keep)
        emptied = [self._classes[c] for c in sorted(set(labels) - left)]
        if emptied:
          raise DataError(f"class folders {_example_names(emptied)} of {folder!r} have no "
                          "decodable images left once the undecodable ones are skipped; add "
                          "images or remove those folders")
      paths = [png.get(prefix + rels[i], os.path.join(folder, *rels[i].split("/"))) for i in keep]
      self._files[split] = (paths, [labels[i] for i in keep])
      keys = [os.path.splitext(rels[i])[0] for i in keep]
      if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
        raise DataError(f"images in {folder!r} share a name up to the extension "
                        f"({_example_names(dup)}); keys must be unique: rename one of each pair")
      self._keys[split] = np.array([k.encode("utf-8") for k in keys], dtype=object)

  def _layout(self) -> dict[str, pathlib.Path]:
    """{'trainval': folder[, 'test': folder]} from the root's layout."""
    train_dir = self.root / "train"
    if not (train_dir.is_dir() and _subfolders(train_dir)):
      return {"trainval": self.root}
    folders = {"trainval": train_dir}
    if (self.root / "test").is_dir():
      folders["test"] = self.root / "test"
    ignored = [n for n in _subfolders(self.root) if n not in ("train", "test")]
    if ignored:
      warnings.warn(f"{os.fspath(self.root)!r} has the train/ and test/ layout; its other folders "
                    f"{_example_names(ignored)} are not used ('val' is carved from train/ by "
                    "val_fraction)", stacklevel=2)
    return folders

  @property
  def version(self) -> str:
    return self._version

  @property
  def class_names(self) -> list[str]:
    return list(self._classes)

  def _slice(self, official: str, shard: Shard | None) -> slice:
    n = len(self._files[official][0])
    if shard is None:
      return slice(0, n)
    start, stop = even_slice(n, shard)
    return slice(start, stop)

  def _records(self, official: str, shard: Shard | None) -> tf.data.Dataset:
    paths, labels = self._files[official]
    sl = self._slice(official, shard)
    full = paths[sl]
    return tf.data.Dataset.from_tensor_slices({
        "path": tf.constant(full, tf.string) if full else tf.zeros([0], tf.string),
        "label": tf.constant(labels[sl], tf.int32) if full else tf.zeros([0], tf.int32),
        "key": (tf.constant(self._keys[official][sl].tolist(), tf.string) if full
                else tf.zeros([0], tf.string)),
    })

  @property
  def load_fn(self) -> Callable[[dict], dict]:
    return lambda r: {"image": tf.io.read_file(r["path"]), "label": r["label"], "key": r["key"]}

  def _official_index(self, official: str, shard: Shard | None) -> tuple[np.ndarray, np.ndarray]:
    sl = self._slice(official, shard)
    return self._keys[official][sl], np.asarray(self._files[official][1][sl], np.int32)

  def _official_count(self, official: str) -> int:
    return len(self._files[official][0])


# ============================================================================ factory

_TFDS_SPECS = {
    # name: (builder name, default version, official train, official test)
    "food101": ("food101", "2.1.0", "train", "validation"),
    "cifar10": ("cifar10", None, "train", "test"),
    "cifar100": ("cifar100", None, "train", "test"),
    "imagenet2012": ("imagenet2012", None, "train", "validation"),
}


def get_source(name: str, *, data_dir: str | os.PathLike | None = None,
               manual_dir: str | os.PathLike | None = None, val_fraction: float = 0.2,
               split_seed: int = 0, download: bool = True, version: str | None = None,
               skip_bad_images: bool = False) -> Source:
  """Builds a data source from plain keyword arguments (the ``data`` config keys).

  Args:
    name: one of SOURCE_NAMES.
    data_dir: TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: food101_local: the extracted archive (folder holding food-101/, or
      food-101/ itself); imagenet2012: folder with the ILSVRC2012 tars;
      image_folder: the class-per-folder root.
    val_fraction: fraction of each class's official training images held out as 'val'.
    split_seed: seed of the train/val assignment.
    download: prepare TFDS data sets that are not in data_dir yet (network or manual_dir).
    version: TFDS version to use (default: the builder's, or 2.1.0 for food101).
    skip_bad_images: food101_local / image_folder: leave out the images the training
      pipeline cannot decode (listed by ``source.skipped_images``) instead of refusing
      the folder with a ``DataError`` that lists them.

  Raises:
    DataError: a user folder (food101_local, image_folder) cannot be used as given;
      ``DataFolderNotFoundError`` (also a FileNotFoundError) when it does not exist.
  """
  if name not in SOURCE_NAMES:
    raise ValueError(f"unknown data source {name!r}; use one of {SOURCE_NAMES} (for your own "
                     "images in class subfolders use 'image_folder' with manual_dir=<root>)")
  common = dict(val_fraction=val_fraction, split_seed=split_seed)
  if name == "image_folder":
    if manual_dir is None:
      raise DataError("source 'image_folder' needs manual_dir=<folder with one subfolder per class "
                      "(or with train/ and test/ subfolders)>")
    return ImageFolderSource(manual_dir, data_dir=data_dir, skip_bad_images=skip_bad_images,
                             **common)
  if name == "food101_local":
    return _food101_local_source(data_dir=data_dir, manual_dir=manual_dir, version=version,
                                 download=download, skip_bad_images=skip_bad_images, **common)
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None
  builder_name, default_version, train_split, test_split = _TFDS_SPECS[name]
  version = version or default_version
  builder = tfds.builder(f"{builder_name}:{version}" if version else builder_name,
                         data_dir=data_dir)
  return TfdsSource(name, builder, train_split=train_split, test_split=test_split,
                    manual_dir=manual_dir, download=download, **common)
