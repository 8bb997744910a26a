"""TFDS builder ``food101_local``: a local Food-101 copy in the original archive layout.

Food-101 (Bossard, Guillaumin and Van Gool, "Food-101 -- Mining Discriminative Components
with Random Forests", ECCV 2014) ships as ``food-101.tar.gz``; once extracted::

    food-101/
      images/<class>/<image_id>.jpg
      meta/classes.txt            one class name per line (label = line index)
      meta/labels.txt             human-readable names (optional here)
      meta/train.json             {"apple_pie": ["apple_pie/1005649", ...], ...}
      meta/test.json

Any subset in the same layout (fewer classes, fewer images) works too. The folder is
given as TFDS's ``manual_dir`` (either the folder holding ``food-101/`` or
``food-101/`` itself) and the dataset is written once into ``data_dir``. Images
are stored as the original JPEG bytes (no re-encoding); decode them with
``channels=3`` (TFDS's own decoder does, as the feature is declared RGB), which
turns the few greyscale images into RGB. Each example carries ``id`` =
``'<class>/<image_id>'`` (the same ids as TFDS ``food101:2.1.0``).

One folder content is one builder config (``Food101LocalConfig``), named
``folder-<first 16 hex digits of the fingerprint>`` (``user_folders.fingerprint`` of the
meta files and the listed images), so the build lands in
``<data_dir>/food101_local/folder-<fp16>/1.0.0/`` and another or a changed folder is
another build. The config also carries the keys of the images to leave out
(undecodable, ``skip``) and of those stored as PNG (``convert``: only Pillow decodes
them); ``jaxkd.data.get_source`` fills them in from its image check. At build time the
fingerprint is computed again and must match. Without a config the builder reads the
folder as it is (no check).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from jaxkd.data import user_folders
from jaxkd.data.user_folders import DataError, DataFolderNotFoundError

META_FILES = ("classes.txt", "train.json", "test.json")

_CITATION = """\
@inproceedings{bossard14,
  title = {Food-101 -- Mining Discriminative Components with Random Forests},
  author = {Bossard, Lukas and Guillaumin, Matthieu and Van Gool, Luc},
  booktitle = {European Conference on Computer Vision},
  year = {2014}
}
"""


def resolve_food101_root(path: str | os.PathLike) -> epath.Path:
  """The ``food-101/`` folder, given it or its parent; else a ``DataError`` naming the path."""
  p = user_folders.absolute(path)
  if not p.is_dir():
    state = "is a file, not a folder" if p.exists() else "does not exist"
    raise DataFolderNotFoundError(
        f"Food-101 folder {os.fspath(path)!r} {state}. Download "
        "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz, extract it, and pass the folder that "
        "contains 'food-101/' (or 'food-101/' itself) as manual_dir.")
  root = None
  for candidate in (p / "food-101", p):
    if (candidate / "meta").is_dir() or (candidate / "images").is_dir():
      root = candidate
      break
  if root is None:
    raise DataFolderNotFoundError(
        f"{os.fspath(p)!r} is not a Food-101 folder: expected 'food-101/images' and "
        "'food-101/meta' below it (or 'images/' and 'meta/' directly in it), as in the extracted "
        "food-101.tar.gz.")
  missing = [f"meta/{name}" for name in META_FILES if not (root / "meta" / name).is_file()]
  if not (root / "images").is_dir():
    missing.append("images/")
  if missing:
    raise DataFolderNotFoundError(
        f"Food-101 folder {os.fspath(root)!r} lacks {missing}; it must keep the archive layout "
        "(images/<class>/<id>.jpg, meta/classes.txt, meta/train.json, meta/test.json).")
  return epath.Path(root)


def read_food101_meta(root: epath.Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """(class names, {'train'|'test': [(key, label), ...]}) from ``meta/``, validated."""
  classes = [line.strip() for line in (root / "meta" / "classes.txt").read_text().splitlines()
             if line.strip()]
  if not classes:
    raise DataError(f"{os.fspath(root / 'meta' / 'classes.txt')!r} lists no classes")
  if len(set(classes)) != len(classes):
    raise DataError(f"{os.fspath(root / 'meta' / 'classes.txt')!r} lists a class twice")
  index = {c: i for i, c in enumerate(classes)}
  splits: dict[str, list[tuple[str, int]]] = {}
  for split in ("train", "test"):
    path = root / "meta" / f"{split}.json"
    try:
      entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise DataError(f"{os.fspath(path)!r} is not valid JSON: {e}") from e
    unknown = sorted(set(entries) - set(index))
    if unknown:
      raise DataError(f"{os.fspath(path)!r} names classes missing from meta/classes.txt: "
                      f"{unknown[:5]}")
    examples = []
    for name in classes:
      keys = entries.get(name, [])
      if split == "train" and not keys:
        raise DataError(f"class {name!r} has no training images in {os.fspath(path)!r}; remove it "
                        "from meta/classes.txt or add its images")
      for key in keys:
        if key.split("/", 1)[0] != name:
          raise DataError(f"{os.fspath(path)!r}: entry {key!r} listed under class {name!r}")
        examples.append((key, index[name]))
    splits[split] = examples
  return classes, splits


def image_path(key: str) -> str:
  """Path of an example's image relative to the ``food-101/`` folder."""
  return f"images/{key}.jpg"


def food101_files(root: epath.Path,
                  splits: dict[str, list[tuple[str, int]]]) -> user_folders.FileStats:
  """{relative path: (size, mtime_ns)} of the meta files and of every listed image.

  Raises ``DataFolderNotFoundError`` naming the listed images that are missing.
  """
  root = pathlib.Path(os.fspath(root))
  found, _ = user_folders.scan_files(root / "images", prefix="images/")
  stats = {}
  for name in META_FILES:
    st = (root / "meta" / name).stat()
    stats[f"meta/{name}"] = (st.st_size, st.st_mtime_ns)
  missing = []
  for examples in splits.values():
    for key, _ in examples:
      rel = image_path(key)
      if rel in found:
        stats[rel] = found[rel]
      else:
        missing.append(key)
  if missing:
    raise DataFolderNotFoundError(
        f"{len(missing)} images listed in meta/*.json are missing under "
        f"{os.fspath(root / 'images')!r}, e.g. {missing[:3]}; extract the whole archive or remove "
        "them from the meta files.")
  return stats


def config_name(fingerprint: str) -> str:
  """Builder config name of a folder with this fingerprint."""
  return f"folder-{fingerprint[:16]}"


@dataclasses.dataclass(eq=False)
class Food101LocalConfig(tfds.core.BuilderConfig):
  """One folder's content: its fingerprint and the listed images left out or converted.

  ``skip``: keys of the undecodable images left out; ``convert``: keys of the images
  only Pillow decodes, stored as PNG (see ``user_folders.check_images``).
  """

  fingerprint: str = ""
  skip: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  convert: tuple[str, ...] = dataclasses.field(default=(), repr=False)


def make_config(fingerprint: str, folder: str | os.PathLike, *, skip: Sequence[str] = (),
                convert: Sequence[str] = ()) -> Food101LocalConfig:
  return Food101LocalConfig(
      name=config_name(fingerprint), fingerprint=fingerprint, skip=tuple(skip),
      convert=tuple(convert),
      description=f"Food-101 layout folder {os.fspath(folder)} (fingerprint {fingerprint[:16]})")


class Food101Local(tfds.core.GeneratorBasedBuilder):
  """Food-101 (or a subset) read from a local copy of the extracted archive."""

  # TFDS 4.9.10 finds a builder's source file through `importlib_resources`, which it
  # does not install on Python >= 3.9 (tensorflow/datasets#11212); ours is this file.
  code_path = epath.Path(__file__)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEG bytes, 'id' = '<class>/<image_id>', labels from "
                            "meta/classes.txt."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz and extract it; pass the
  folder that contains `food-101/` (or `food-101/` itself) as manual_dir, e.g.
  `jaxkd.data.get_source('food101_local', manual_dir='/data/food-101')`. A subset in
  the same layout (images/<class>/<id>.jpg, meta/classes.txt, meta/{train,test}.json)
  works as well.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Food-101 from a local copy of the original archive layout (101 classes, "
                    "750 train + 250 test images per class in the full set; any subset works).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = resolve_food101_root(dl_manager.manual_dir)
    classes, splits = read_food101_meta(root)
    stats = food101_files(root, splits)
    config = self.builder_config
    skip, convert = set(), set()
    if isinstance(config, Food101LocalConfig) and config.fingerprint:
      if user_folders.fingerprint(stats) != config.fingerprint:
        raise DataError(f"Food-101 folder {os.fspath(root)!r} changed after it was checked (files "
                        "added, removed or modified); run again once it stays unchanged")
      skip, convert = set(config.skip), set(config.convert)
    self.info.features["label"].names = classes
    return {split: self._generate_examples(root, [(key, label) for key, label in examples
                                                  if key not in skip], convert)
            for split, examples in splits.items()}

  def _generate_examples(self, root: epath.Path, examples: list[tuple[str, int]],
                         convert: frozenset[str] | set[str] = frozenset()
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, label in examples:
      path = root / image_path(key)
      image = user_folders.to_png(path.read_bytes()) if key in convert else path
      yield key, {"image": image, "label": label, "id": key}
