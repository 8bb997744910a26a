"""Small, real image files for tests that must run without ../shared/data.

Every function writes encoded image files (JPEG through PIL, a few PNG) whose content depends on
the class, so a tiny model can learn something from them: class c has its own base colour (a hue
on the colour wheel), a stripe pattern of its own orientation and period, and per-image noise,
brightness and size. Everything is deterministic from ``seed`` (same files byte for byte, given
the same PIL/libjpeg).

Two layouts:

* ``make_food101_tree``: the extracted Food-101 archive (Bossard et al., "Food-101 -- Mining
  Discriminative Components with Random Forests", ECCV 2014): ``food-101/images/<class>/<id>.jpg``
  plus ``food-101/meta/{classes,labels}.txt``, ``{train,test}.json`` and ``{train,test}.txt``.
* ``make_image_folder``: a class-per-folder tree, ``<root>/<class>/<img>`` or
  ``<root>/train/<class>/...`` plus ``<root>/test/<class>/...``.

Each tree holds one greyscale JPEG (loaders must turn it into RGB) and one PNG-encoded file named
``.jpg`` (loaders must not trust the extension); the returned record names both.
"""
from __future__ import annotations

import colorsys
import dataclasses
import io
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Class names in Food-101's style (lower case, underscores); more classes get 'class_NN'.
FOOD_CLASS_NAMES = ("apple_pie", "bibimbap", "churros", "dumplings", "edamame", "falafel",
                    "gyoza", "hummus", "ice_cream", "jambalaya")
FOLDER_CLASS_NAMES = ("cat", "dog", "frog", "ship", "truck", "bird", "deer", "horse")


def class_names(num_classes: int, names: Sequence[str] = FOOD_CLASS_NAMES) -> list[str]:
  """``num_classes`` distinct class names (``names`` first, then 'class_NN')."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: need at least one class")
  return [names[i] if i < len(names) else f"class_{i:02d}" for i in range(num_classes)]


def class_image(label: int, num_classes: int, size: tuple[int, int],
                rng: np.random.Generator) -> np.ndarray:
  """A uint8 (h, w, 3) image of class ``label``: class colour + class stripes + noise.

  ``size`` is (width, height) as in PIL.
  """
  w, h = size
  hue = label / num_classes
  base = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.85)) * 255.0
  angle = np.pi * label / num_classes + rng.uniform(-0.15, 0.15)
  period = 6.0 + 3.0 * (label % 3)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  phase = rng.uniform(0, 2 * np.pi)
  stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
  brightness = rng.uniform(0.8, 1.2)
  img = base[None, None, :] * brightness * (1.0 + 0.35 * stripes[..., None])
  img += rng.normal(0.0, 12.0, size=(h, w, 3))
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, *, grayscale: bool = False) -> bytes:
  img = Image.fromarray(pixels, "RGB")
  if grayscale:
    img = img.convert("L")
  buf = io.BytesIO()
  if fmt == "JPEG":
    img.save(buf, format="JPEG", quality=90)
  else:
    img.save(buf, format="PNG")
  return buf.getvalue()


def _random_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
  return int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))


@dataclasses.dataclass(frozen=True)
class Food101Tree:
  """What ``make_food101_tree`` wrote. ``root`` holds ``food-101/`` (pass it as manual_dir)."""
  root: pathlib.Path
  classes: list[str]
  train: dict[str, list[str]]  # class -> keys '<class>/<id>', as in meta/train.json
  test: dict[str, list[str]]
  grayscale_key: str  # a training image stored as a 1-channel JPEG
  png_key: str  # a training image stored as PNG bytes under a .jpg name

  @property
  def food_dir(self) -> pathlib.Path:
    return self.root / "food-101"


def make_food101_tree(root: str | pathlib.Path, *, classes: int | Sequence[str] = 4,
                      train_per_class: int = 40, test_per_class: int = 10,
                      size: tuple[int, int] = (40, 64), seed: int = 0) -> Food101Tree:
  """Writes a Food-101-layout tree under ``root/food-101`` and returns its description.

  Args:
    root: the folder that will hold ``food-101/`` (created if needed).
    classes: number of classes or their names.
    train_per_class, test_per_class: images per class in meta/train.json, meta/test.json.
    size: (smallest, largest) side in pixels; width and height are drawn independently.
    seed: everything (ids, pixels, sizes) follows from it.
  """
  names = class_names(classes) if isinstance(classes, int) else list(classes)
  if train_per_class < 1 or test_per_class < 0:
    raise ValueError(f"train_per_class={train_per_class}, test_per_class={test_per_class}: "
                     "need >= 1 training image per class and >= 0 test images")
  rng = np.random.default_rng(seed)
  food = pathlib.Path(root) / "food-101"
  (food / "meta").mkdir(parents=True, exist_ok=True)
  train: dict[str, list[str]] = {}
  test: dict[str, list[str]] = {}
  n = train_per_class + test_per_class
  for name in names:
    (food / "images" / name).mkdir(parents=True, exist_ok=True)
    ids = rng.choice(np.arange(100000, 4000000), size=n, replace=False)  # Food-101-like numeric ids
    keys = [f"{name}/{i}" for i in ids.tolist()]
    train[name] = sorted(keys[:train_per_class])
    test[name] = sorted(keys[train_per_class:])
  grayscale_key = train[names[min(1, len(names) - 1)]][0]
  png_key = train[names[0]][-1]
  for label, name in enumerate(names):
    for key in train[name] + test[name]:
      pixels = class_image(label, len(names), _random_size(rng, *size), rng)
      fmt = "PNG" if key == png_key else "JPEG"
      encoded = _encode(pixels, fmt, grayscale=key == grayscale_key)
      (food / "images" / f"{key}.jpg").write_bytes(encoded)
  meta = food / "meta"
  meta.joinpath("classes.txt").write_text("".join(f"{c}\n" for c in names))
  labels = [c.replace("_", " ").capitalize() for c in names]  # 'apple_pie' -> 'Apple pie'
  meta.joinpath("labels.txt").write_text("".join(f"{label}\n" for label in labels))
  for split, entries in (("train", train), ("test", test)):
    meta.joinpath(f"{split}.json").write_text(json.dumps(entries))
    meta.joinpath(f"{split}.txt").write_text("".join(f"{k}\n" for c in names for k in entries[c]))
  return Food101Tree(root=pathlib.Path(root), classes=names, train=train, test=test,
                     grayscale_key=grayscale_key, png_key=png_key)


@dataclasses.dataclass(frozen=True)
class ImageFolderTree:
  """What ``make_image_folder`` wrote. Keys are paths relative to the split folder, no extension."""
  root: pathlib.Path
  classes: list[str]
  train: dict[str, list[str]]  # class -> file names relative to the (train) split folder
  test: dict[str, list[str]] | None  # None for the single-tree layout
  grayscale_key: str  # in the train tree
  png_key: str  # PNG bytes named .jpg, in the train tree


def make_image_folder(root: str | pathlib.Path, *, classes: int | Sequence[str] = 3,
                      per_class: int = 12, with_test: bool = True,
                      test_per_class: int | None = None,
                      size: tuple[int, int] = (24, 40), seed: int = 0) -> ImageFolderTree:
  """Writes a class-per-folder tree and returns its description.

  With ``with_test`` the layout is ``root/train/<class>/NNNN.jpg`` + ``root/test/<class>/NNNN.jpg``
  (``test_per_class`` test images, default ``max(1, per_class // 4)``), else
  ``root/<class>/NNNN.jpg``.
  Besides JPEGs, the train tree holds one greyscale JPEG, one PNG named ``.jpg``, and in the last
  class one real ``.png`` file.
  """
  names = class_names(classes, FOLDER_CLASS_NAMES) if isinstance(classes, int) else list(classes)
  if per_class < 2:
    raise ValueError(f"per_class={per_class}: need >= 2 images per class")
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  train_dir = root / "train" if with_test else root
  n_test = max(1, per_class // 4) if test_per_class is None else test_per_class
  n_test = n_test if with_test else 0
  grayscale_key = f"{names[min(1, len(names) - 1)]}/0000"
  png_key = f"{names[0]}/{per_class - 1:04d}"
  real_png_key = f"{names[-1]}/{per_class - 2:04d}"
  train: dict[str, list[str]] = {}
  test: dict[str, list[str]] = {}
  for folder, count, record in ((train_dir, per_class, train), (root / "test", n_test, test)):
    if count == 0:
      continue
    for label, name in enumerate(names):
      (folder / name).mkdir(parents=True, exist_ok=True)
      files = []
      for i in range(count):
        key = f"{name}/{i:04d}"
        pixels = class_image(label, len(names), _random_size(rng, *size), rng)
        is_train = folder == train_dir
        real_png = is_train and key == real_png_key and key != png_key and key != grayscale_key
        fname = f"{key}.png" if real_png else f"{key}.jpg"
        fmt = "PNG" if is_train and (key == png_key or real_png) else "JPEG"
        encoded = _encode(pixels, fmt, grayscale=is_train and key == grayscale_key)
        (folder / fname).write_bytes(encoded)
        files.append(fname)
      record[name] = files
  return ImageFolderTree(root=root, classes=names, train=train, test=test if with_test else None,
                         grayscale_key=grayscale_key, png_key=png_key)
