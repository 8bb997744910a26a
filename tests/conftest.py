"""Test set-up: 8 simulated CPU devices, generated image data, the optional real photographs.

The device flag must be in the environment before jax is first imported, which is why
this happens at the top of conftest (pytest imports it before any test module).

Data fixtures (all session-scoped, built once per test session):

* ``generated_food101``: folder holding ``food-101/`` in the Food-101 archive layout, written by
  ``imagegen.make_food101_tree`` (``generated_food101_tree`` describes it: classes, keys,
  the greyscale and the PNG-named-.jpg keys).
* ``generated_image_folder``: class-per-folder tree with ``train/`` and ``test/``;
  ``generated_image_folder_flat``: ``<root>/<class>/<img>`` (no test split). ``*_tree`` fixtures
  describe them.
* ``tfds_data_dir``: one TFDS data_dir for the whole session (a temporary folder, removed at
  the end, and also exported as $TFDS_DATA_DIR so subprocesses and sources given no data_dir
  use it); pass it to ``get_source(..., data_dir=...)`` / ``--config.data.data_dir`` so each
  data set (keyed by its folder's fingerprint) is built once.
* ``food101_local_source(manual_dir, **kw)``: a ``food101_local`` source in ``tfds_data_dir``,
  one object per (folder, kw).
* ``data_variant``: 'generated', plus 'real' when the real photographs are present; tests that
  take it run on both. ``food_dir`` / ``food``: the variant's ``food-101/`` folder and its
  ``food101_local`` source. ``food_images`` (module scope): three of the variant's image files,
  a colour JPEG, the greyscale JPEG and the PNG named .jpg (None where the variant has none).
* ``shared_data``: ../shared/data (real photographs); skips when absent. Setting
  JAXKD_TEST_NO_SHARED=1 makes the session behave as if it were absent (a user's clone).
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import imagegen  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# Real photographs shared beside the project (never committed into it).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
NO_SHARED_ENV = "JAXKD_TEST_NO_SHARED"

# The generated Food-101 tree: 4 classes x (100 train + 20 test), 40-64 px. With the 80/20
# train/val split that is 320 train (5 steps of 64 per epoch) and 80 val examples.
GENERATED_FOOD101 = dict(classes=4, train_per_class=100, test_per_class=20, size=(40, 64), seed=0)
# Image folders: 3 classes x 30 training images (18 val), 5 test images per class, 24-40 px.
GENERATED_FOLDER = dict(classes=3, per_class=30, test_per_class=5, size=(24, 40), seed=1)


def shared_data_available() -> bool:
  """True when ../shared/data exists and JAXKD_TEST_NO_SHARED is not set."""
  return SHARED_DATA.is_dir() and os.environ.get(NO_SHARED_ENV, "") in ("", "0")


def _shared_absent_reason() -> str:
  if os.environ.get(NO_SHARED_ENV, "") not in ("", "0"):
    return f"real-image test data disabled by {NO_SHARED_ENV}={os.environ[NO_SHARED_ENV]}"
  return (f"real-image test data not found at {SHARED_DATA} "
          "(it lives in ../shared/data beside the repo)")


DATA_VARIANTS = ("generated", "real") if shared_data_available() else ("generated",)


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips the test when it is absent (a user's fresh clone)."""
  if not shared_data_available():
    pytest.skip(_shared_absent_reason())
  return SHARED_DATA


@pytest.fixture(scope="session", params=DATA_VARIANTS)
def data_variant(request):
  """'generated' always; 'real' too when ../shared/data is present (not collected otherwise)."""
  return request.param


@pytest.fixture(scope="session")
def generated_food101_tree(tmp_path_factory) -> imagegen.Food101Tree:
  root = tmp_path_factory.mktemp("generated_food101")
  return imagegen.make_food101_tree(root, **GENERATED_FOOD101)


@pytest.fixture(scope="session")
def generated_food101(generated_food101_tree) -> pathlib.Path:
  """The folder holding ``food-101/`` (a manual_dir for food101_local)."""
  return generated_food101_tree.root


@pytest.fixture(scope="session")
def generated_image_folder_tree(tmp_path_factory) -> imagegen.ImageFolderTree:
  return imagegen.make_image_folder(tmp_path_factory.mktemp("generated_folder"), with_test=True,
                                    **GENERATED_FOLDER)


@pytest.fixture(scope="session")
def generated_image_folder(generated_image_folder_tree) -> pathlib.Path:
  """Root with ``train/<class>/`` and ``test/<class>/``."""
  return generated_image_folder_tree.root


@pytest.fixture(scope="session")
def generated_image_folder_flat_tree(tmp_path_factory) -> imagegen.ImageFolderTree:
  return imagegen.make_image_folder(tmp_path_factory.mktemp("generated_flat"), with_test=False,
                                    **GENERATED_FOLDER)


@pytest.fixture(scope="session")
def generated_image_folder_flat(generated_image_folder_flat_tree) -> pathlib.Path:
  """Root with ``<class>/`` folders only (one official split)."""
  return generated_image_folder_flat_tree.root


# ----------------------------------------------------------------------------- TFDS builds

_BUILDS = []  # (builder name, data_dir, seconds) of every TFDS build in this process
_SESSION_DATA_DIR = []  # the session's TFDS data_dir (made in pytest_configure)


def _count_builds():
  """Wraps DatasetBuilder.download_and_prepare to record the builds that really happen."""
  import tensorflow_datasets as tfds
  cls = tfds.core.DatasetBuilder
  if getattr(cls.download_and_prepare, "_jaxkd_counted", False):
    return
  original = cls.download_and_prepare

  def download_and_prepare(self, *args, **kwargs):
    if self.is_prepared():
      return original(self, *args, **kwargs)
    start = time.perf_counter()
    result = original(self, *args, **kwargs)
    _BUILDS.append((self.name, os.fspath(self.data_dir), time.perf_counter() - start))
    return result

  download_and_prepare._jaxkd_counted = True
  cls.download_and_prepare = download_and_prepare


@pytest.fixture(scope="session")
def tfds_data_dir() -> pathlib.Path:
  """The session's TFDS data_dir (also $TFDS_DATA_DIR): a data set built there once is reused."""
  _count_builds()
  return _SESSION_DATA_DIR[0]


@pytest.fixture(scope="session")
def food101_local_source(tfds_data_dir):
  """``get(manual_dir, **kw)``: the food101_local source of a folder, built in ``tfds_data_dir``.

  One object per (folder, kw); builds are keyed by the folder's fingerprint, so every folder
  shares the one data_dir.
  """
  from jaxkd import data
  cache = {}

  def get(manual_dir, **kw):
    key = (os.fspath(manual_dir), tuple(sorted(kw.items())))
    if key not in cache:
      cache[key] = data.get_source("food101_local", data_dir=tfds_data_dir, manual_dir=manual_dir,
                                   **kw)
    return cache[key]

  return get


@pytest.fixture(scope="module")
def food_dir(data_variant, request):
  """The food-101/ folder of the variant (generated, or the real food-101-mini)."""
  if data_variant == "real":
    return request.getfixturevalue("shared_data") / "food-101-mini" / "food-101"
  return request.getfixturevalue("generated_food101") / "food-101"


@pytest.fixture(scope="module")
def food(food_dir, food101_local_source):
  """The food101_local source of `food_dir` (built once per session)."""
  return food101_local_source(food_dir.parent)


def pytest_configure(config):
  # One TFDS data_dir per session, also as $TFDS_DATA_DIR so that nothing a test (or main.py in a
  # subprocess) builds without an explicit data_dir lands in the user's ~/tensorflow_datasets.
  path = pathlib.Path(tempfile.mkdtemp(prefix="jaxkd-tests-tfds-"))
  _SESSION_DATA_DIR.append(path)
  os.environ["TFDS_DATA_DIR"] = os.fspath(path)
  # A JAX compilation cache shared by the main.py subprocesses of this session (tests/test_main.py):
  # they compile the same small programs again and again; the cache halves each run's time.
  os.environ["JAXKD_TEST_JAX_CACHE"] = os.fspath(path / "jax-compilation-cache")
  assert jax.device_count() == 8, (
      f"tests expect 8 simulated CPU devices, got {jax.devices()}; "
      "XLA_FLAGS must be set before jax is imported")


def pytest_collection_finish(session):
  # Count every in-process TFDS build (any test module that builds imports TFDS when collected).
  if "tensorflow_datasets" in sys.modules:
    _count_builds()


def pytest_unconfigure(config):
  for path in _SESSION_DATA_DIR:
    shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
  if not shared_data_available():
    terminalreporter.write_line("jaxkd: real-photo variants not collected: "
                                + _shared_absent_reason())
  if _BUILDS:
    total = sum(s for _, _, s in _BUILDS)
    where = ", ".join(f"{n} in {d}" for n, d, _ in _BUILDS)
    terminalreporter.write_line(f"jaxkd: {len(_BUILDS)} TFDS data set builds in the test process "
                                f"({total:.1f} s): {where}")
  for path in _SESSION_DATA_DIR:  # builds by subprocesses (main.py) show up here too
    prepared = sorted(os.fspath(p.parent.relative_to(path))
                      for p in path.rglob("dataset_info.json"))
    if prepared:
      terminalreporter.write_line(f"jaxkd: {len(prepared)} data sets prepared in the session "
                                  f"data_dir {path}: {prepared}")


@pytest.fixture(scope="module")
def food_images(food_dir, data_variant, request):
  """(a colour JPEG, the greyscale JPEG or None, the PNG named .jpg or None) of the food tree."""
  if data_variant == "real":
    images = food_dir / "images"
    return images / "apple_pie/1005649.jpg", images / "bread_pudding/1375816.jpg", None
  tree = request.getfixturevalue("generated_food101_tree")
  special = (tree.grayscale_key, tree.png_key)
  colour = next(k for k in tree.train[tree.classes[0]] if k not in special)
  return tuple(food_dir / "images" / f"{k}.jpg" for k in (colour, tree.grayscale_key, tree.png_key))
