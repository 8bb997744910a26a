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
  ``data_dir`` from ``manual_dir``.
* ``cifar10``, ``cifar100``: TFDS (PNG-encoded 32x32 images; key = TFDS ``id``).
* ``imagenet2012``: TFDS, manual download (``manual_dir`` holds the ILSVRC2012 tars;
  key = ``file_name``; official test = 'validation').
* ``image_folder``: any class-per-folder tree (``manual_dir``): either
  ``<root>/<class>/<img>`` (one official split, 'trainval') or ``<root>/train/<class>/...``
  plus optional ``<root>/test/<class>/...``. Classes = sorted subfolder names,
  key = path relative to the split folder without extension.

Splits ('train', 'val', 'test', 'trainval') follow ``splits.py``: 'train'/'val'
are carved from the official training split by key, 'test' is the official test split.
"""
from __future__ import annotations

import abc
import hashlib
import os
import pathlib
import re
import warnings
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jaxkd.data import splits as splits_lib

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
      raise ValueError(f"val_fraction={val_fraction}: need 0 <= val_fraction < 1 (0.2 = seed 000's 20 %)")
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

  def _official_for(self, split: str) -> str:
    splits_lib.check_split(split)
    if split == splits_lib.TEST:
      if self.test_split_name is None:
        raise ValueError(f"source {self.name!r} has no official test split; use 'train'/'val'/'trainval' "
                         "or give a folder with train/ and test/ subfolders")
      return self.test_split_name
    return self.train_split_name

  def _ensure_assignment(self) -> None:
    if self._assignment is None:
      keys, labels = self._official_index(self.train_split_name, None)
      is_val = splits_lib.assign_val(keys, labels, val_fraction=self.val_fraction, seed=self.split_seed)
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
            f"num_classes={self.num_classes}, val_fraction={self.val_fraction}, split_seed={self.split_seed})")


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
        raise ValueError(f"TFDS data set {builder.name!r} has no {feature!r} feature; it is not an image "
                         "classification data set jaxkd can read")
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
          "TFDS 4.9.x needs the package 'importlib_resources' to prepare data sets but does not declare it "
          "on Python >= 3.9 (tensorflow/datasets#11212); `pip install importlib_resources`",
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
                                 decoders={"image": tfds.decode.SkipDecoding()}, read_config=read_config)
    key = self.key_feature
    return ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32), "key": ex[key]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def _index_path(self, official: str, shard: Shard | None) -> pathlib.Path:
    tag = official if shard is None else f"{official}-{shard[0]}of{shard[1]}"
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return pathlib.Path(os.fspath(self.builder.data_dir)) / f"jaxkd-index-{tag}-{self.key_feature}.npz"

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
      for k, l in ds.as_numpy_iterator():
        keys_list.extend(k.tolist())
        labels_list.append(l)
      keys = np.array(keys_list, dtype=object)
      labels = np.concatenate(labels_list).astype(np.int32) if labels_list else np.zeros([0], np.int32)
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
      warnings.warn(f"could not cache the key index at {os.fspath(path)!r} ({e}); it will be rebuilt "
                    "(one pass over the records) in each new process.")

  def _official_count(self, official: str) -> int:
    self.prepare()
    if official not in self.builder.info.splits:
      raise ValueError(f"TFDS data set {self.builder.name!r} has no split {official!r}; it has "
                       f"{sorted(self.builder.info.splits)}")
    return int(self.builder.info.splits[official].num_examples)


# ============================================================================ image folder


def _list_class_tree(folder: pathlib.Path, extensions: Sequence[str],
                     classes: Sequence[str] | None = None) -> tuple[list[str], list[str], list[int]]:
  """(class names, relative paths, labels) of a class-per-folder tree, sorted."""
  found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not found:
    raise ValueError(f"{os.fspath(folder)!r} has no class subfolders; expected <folder>/<class>/<image> "
                     f"(extensions {tuple(extensions)})")
  if classes is None:
    classes = found
  else:
    extra = sorted(set(found) - set(classes))
    if extra:
      raise ValueError(f"{os.fspath(folder)!r} has classes {extra[:5]} that the training folder lacks")
  exts = {e.lower() for e in extensions}
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = folder / name
    if not class_dir.is_dir():
      continue  # a class may be absent from the test folder
    files = sorted(os.path.relpath(os.path.join(dirpath, f), folder)
                   for dirpath, _, filenames in os.walk(class_dir) for f in filenames
                   if os.path.splitext(f)[1].lower() in exts)
    if not files:
      raise ValueError(f"class folder {os.fspath(class_dir)!r} has no images with extensions "
                       f"{tuple(sorted(exts))}; remove the folder or add images")
    paths.extend(files)
    labels.extend([label] * len(files))
  return list(classes), paths, labels


class ImageFolderSource(Source):
  """A class-per-folder image tree (a user's own data). See the module docstring for layouts."""

  records_are_cheap = True

  def __init__(self, root: str | os.PathLike, *, name: str = "image_folder",
               extensions: Sequence[str] = IMAGE_EXTENSIONS, val_fraction: float = 0.2, split_seed: int = 0):
    super().__init__(val_fraction=val_fraction, split_seed=split_seed)
    self.name = name
    self.root = pathlib.Path(os.path.expanduser(os.fspath(root)))
    if not self.root.is_dir():
      raise FileNotFoundError(
          f"image folder {os.fspath(self.root)!r} does not exist; pass manual_dir=<folder with one "
          "subfolder per class> (or with train/ and test/ subfolders holding those)")
    train_dir = self.root / "train"
    if train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir()):
      folders = {"trainval": train_dir}
      if (self.root / "test").is_dir():
        folders["test"] = self.root / "test"
    else:
      folders = {"trainval": self.root}
    self.train_split_name = "trainval"
    self.test_split_name = "test" if "test" in folders else None
    self._folders = folders
    self._classes, paths, labels = _list_class_tree(folders["trainval"], extensions)
    self._files = {"trainval": (paths, labels)}
    if "test" in folders:
      _, paths, labels = _list_class_tree(folders["test"], extensions, classes=self._classes)
      self._files["test"] = (paths, labels)
    self._keys = {}
    for split, (paths, _) in self._files.items():
      keys = [os.path.splitext(p)[0].replace(os.sep, "/") for p in paths]
      if len(set(keys)) != len(keys):
        raise ValueError(f"two images in {os.fspath(folders[split])!r} share a name up to the extension; "
                         "keys must be unique")
      self._keys[split] = np.array([k.encode("utf-8") for k in keys], dtype=object)
    digest = hashlib.sha1()
    for split in sorted(self._files):
      digest.update(split.encode())
      digest.update("\n".join(self._files[split][0]).encode("utf-8"))
    self._version = f"folder-{digest.hexdigest()[:12]}"

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
    folder = os.fspath(self._folders[official])
    full = [os.path.join(folder, p) for p in paths[sl]]
    return tf.data.Dataset.from_tensor_slices({
        "path": tf.constant(full, tf.string) if full else tf.zeros([0], tf.string),
        "label": tf.constant(labels[sl], tf.int32) if full else tf.zeros([0], tf.int32),
        "key": tf.constant(self._keys[official][sl].tolist(), tf.string) if full else tf.zeros([0], tf.string),
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
               split_seed: int = 0, download: bool = True, version: str | None = None) -> Source:
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
  """
  if name not in SOURCE_NAMES:
    raise ValueError(f"unknown data source {name!r}; use one of {SOURCE_NAMES} (for your own images in "
                     "class subfolders use 'image_folder' with manual_dir=<root>)")
  common = dict(val_fraction=val_fraction, split_seed=split_seed)
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else None
  if name == "image_folder":
    if manual_dir is None:
      raise ValueError("source 'image_folder' needs manual_dir=<folder with one subfolder per class "
                       "(or with train/ and test/ subfolders)>")
    return ImageFolderSource(manual_dir, **common)
  if name == "food101_local":
    from jaxkd.data import food101_local  # registers the builder with TFDS
    builder = food101_local.Food101Local(data_dir=data_dir, version=version)
    if not builder.is_prepared():
      if manual_dir is None:
        manual_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")  # TFDS default
        if not os.path.isdir(manual_dir):
          raise FileNotFoundError(
              f"food101_local is not built in {os.fspath(builder.data_dir)!r} and no manual_dir was given "
              f"(TFDS's default {manual_dir!r} does not exist); pass manual_dir=<folder holding food-101/>")
      food101_local.resolve_food101_root(manual_dir)  # clear errors before TFDS starts
      if not download:
        raise FileNotFoundError(f"food101_local is not built in {os.fspath(builder.data_dir)!r}; "
                                "pass download=True to build it from manual_dir")
    source = TfdsSource(name, builder, train_split="train", test_split="test", manual_dir=manual_dir,
                        download=download, **common)
    source.prepare()
    return source
  builder_name, default_version, train_split, test_split = _TFDS_SPECS[name]
  version = version or default_version
  builder = tfds.builder(f"{builder_name}:{version}" if version else builder_name, data_dir=data_dir)
  return TfdsSource(name, builder, train_split=train_split, test_split=test_split, manual_dir=manual_dir,
                    download=download, **common)
