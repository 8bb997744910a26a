"""Data sets built from a user's own folder: fingerprints, layout errors, image checks.

* **Fingerprint** (``fingerprint``): SHA-256 over the sorted ``(relative path, size,
  modification time in ns)`` of the files that make up a data set (images and meta
  files), from ``os.scandir`` stats only (no file contents are read; 101,000 files take
  about a second). Everything built or cached from a folder is keyed by it: a changed
  or different folder is a different data set, and the same folder reached by another
  path (symlink, relative path, trailing slash) is the same one. A file rewritten with
  the same size and modification time (``touch -r``, some copies) is not noticed.
* **Image check** (``check_images``): every image is decoded once, when the data set
  is built, by the training pipeline's own decoders (``augment.decode_image`` over the
  whole image and ``augment.decode_and_crop`` over the evaluation centre crop, i.e.
  ``tf.io.decode_jpeg`` / ``tf.image.decode_and_crop_jpeg`` for JPEG content and
  ``tf.io.decode_image(channels=3)`` otherwise), on a tf.data map with one thread per
  CPU; the files that fail are read again in a Python thread pool for the reason. A
  file is

  - *good* when both decode (greyscale, CMYK and alpha come out RGB);
  - *converted* when TensorFlow rejects it, it is not JPEG content, and Pillow decodes
    it completely (e.g. a 1-bit BMP): it is re-encoded once, losslessly, to an RGB PNG;
  - *bad* otherwise (empty, truncated, corrupt, not an image): by default the build is
    refused with one ``DataError`` naming every bad file and why; with
    ``skip_bad_images=True`` they are left out and listed by the source
    (``usable_images`` makes this decision for every source).

  The result is cached in ``<cache_dir>/jaxkd-image-check.json`` with the fingerprint
  and the TensorFlow version, so a rerun does not decode again.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence

import tensorflow as tf

CHECK_FILE = "jaxkd-image-check.json"
_CHECK_FORMAT = 1
# Folders with at least this many images show a progress bar while they are checked.
PROGRESS_MIN_FILES = 1000

OK, CONVERT, BAD = "ok", "convert", "bad"

FileStats = dict[str, tuple[int, int]]  # posix path relative to the root -> (size, mtime_ns)


class DataError(ValueError):
  """A data folder cannot be used as given; the message names the path and the fix."""


class DataFolderNotFoundError(DataError, FileNotFoundError):
  """A data folder (or files it must hold) does not exist."""


def absolute(path: str | os.PathLike) -> pathlib.Path:
  """``~`` expanded, absolute and normalised (symlinks kept, so messages show the user's path)."""
  return pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def require_folder(path: str | os.PathLike, *, what: str, hint: str) -> pathlib.Path:
  """The absolute folder ``path``; ``DataFolderNotFoundError`` naming it when it is not a folder."""
  folder = absolute(path)
  if not folder.is_dir():
    shown = os.fspath(path)
    resolved = "" if shown == os.fspath(folder) else f" (resolved to {os.fspath(folder)!r})"
    state = "is a file, not a folder" if folder.exists() else "does not exist"
    raise DataFolderNotFoundError(f"{what} {shown!r}{resolved} {state}; {hint}")
  return folder


def is_hidden(name: str) -> bool:
  """Names starting with '.' (``.DS_Store``, macOS ``._x.jpg`` resource forks) are not data."""
  return name.startswith(".")


def scan_files(folder: pathlib.Path, prefix: str = "") -> tuple[FileStats, list[str]]:
  """(stats of every non-hidden file below ``folder``, relative folder names that repeat).

  Recurses with ``os.scandir`` and follows symlinked folders (each real folder is
  visited once: a link back up the tree is listed in the second value, not followed).
  Keys are ``prefix + relative posix path``.
  """
  stats: FileStats = {}
  loops: list[str] = []
  seen: set[tuple[int, int]] = set()

  def walk(path: str, rel: str) -> None:
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)
    if ident in seen:
      loops.append(rel or ".")
      return
    seen.add(ident)
    with os.scandir(path) as it:
      entries = list(it)
    for entry in entries:
      if is_hidden(entry.name):
        continue
      child = f"{rel}{entry.name}"
      if entry.is_dir():
        walk(entry.path, child + "/")
      elif entry.is_file():
        st = entry.stat()
        stats[prefix + child] = (st.st_size, st.st_mtime_ns)

  try:
    walk(os.fspath(folder), "")
  except OSError as e:
    raise DataError(f"cannot list the files below {os.fspath(folder)!r}: {e}; check that the "
                    "folder is readable") from e
  return stats, loops


def fingerprint(stats: Mapping[str, tuple[int, int]]) -> str:
  """SHA-256 hex of the sorted ``path \\0 size \\0 mtime_ns`` lines (no contents read)."""
  digest = hashlib.sha256()
  for rel in sorted(stats):
    size, mtime_ns = stats[rel]
    digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
  return digest.hexdigest()


def default_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """``data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's rule)."""
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return absolute(root)


# ============================================================================ image check


def _sniff(data: bytes) -> str | None:
  """Container format from the magic bytes (None when it is none TensorFlow reads)."""
  if data[:3] == b"\xff\xd8\xff":
    return "JPEG"
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "PNG"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "GIF"
  if data[:2] == b"BM":
    return "BMP"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "WebP"
  return None


@functools.cache
def _pipeline_decode():
  """The training pipeline's decoders over one encoded image (full image and eval crop)."""
  from jaxkd.data import augment

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def decode(data):
    full = augment.decode_image(data)
    crop = augment.decode_and_crop(data, lambda shape: augment.center_crop_window(shape, 0.875))
    return tf.shape(full), tf.shape(crop)

  return decode


def tf_error_message(error: tf.errors.OpError) -> str:
  """TensorFlow's error message without the op/function decorations.

  In graph mode the message is 'Graph execution error:', the Python frames of the op, then the
  reason: the last line that is not a decoration is the reason.
  """
  lines = [re.sub(r"\{\{[^}]*\}\}\s*|\s*\[\[.*$|\s*\[Op:[^\]]*\].*$", "", line).strip()
           for line in str(error.message).splitlines()]
  decorations = ("Graph execution error", "Detected at node", "File ")
  reasons = [line for line in lines if line and not line.startswith(decorations)]
  return reasons[-1] if reasons else lines[0]


def pipeline_decodes(data: bytes) -> str | None:
  """None when the training pipeline decodes ``data``, else TensorFlow's error message."""
  try:
    full, crop = _pipeline_decode()(tf.constant(data))
  except tf.errors.OpError as e:
    return tf_error_message(e)
  if int(full[0]) < 1 or int(full[1]) < 1 or int(full[2]) != 3 or int(crop[2]) != 3:
    return f"decoded to shape {full.numpy().tolist()}"
  return None


def _pillow_decode(data: bytes):
  """(RGB PIL image, 'FORMAT mode') when Pillow decodes ``data`` completely; raises otherwise."""
  from PIL import Image  # matplotlib's dependency; only needed for the rare conversions

  with Image.open(io.BytesIO(data)) as image:
    image.load()  # decodes every pixel; truncated data raises (LOAD_TRUNCATED_IMAGES is off)
    described = f"{image.format} {image.mode}"
    return image.convert("RGB"), described


def check_bytes(data: bytes) -> tuple[str, str]:
  """(OK | CONVERT | BAD, reason) for one encoded image."""
  if not data:
    return BAD, "empty file (0 bytes)"
  error = pipeline_decodes(data)
  if error is None:
    return OK, ""
  kind = _sniff(data)
  if kind == "JPEG":
    return BAD, f"truncated or corrupt JPEG (TensorFlow: {error})"
  try:
    _, described = _pillow_decode(data)
  except ImportError as e:
    return BAD, (f"TensorFlow cannot decode it ({error}) and Pillow, needed to convert it, is "
                 f"missing ({e})")
  except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
    e = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # Pillow names its buffer
    if kind is None:
      return BAD, (f"not a JPEG, PNG, GIF, BMP or WebP image (it starts with {data[:12]!r}; "
                   f"TensorFlow: {error}; Pillow: {e})")
    return BAD, f"truncated or corrupt {kind} (TensorFlow: {error}; Pillow: {e})"
  return CONVERT, f"{described} image that TensorFlow cannot decode ({error}); converted to PNG"


def to_png(data: bytes) -> bytes:
  """Lossless RGB PNG of an image only Pillow decodes; checked to decode in the pipeline."""
  image, _ = _pillow_decode(data)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  png = buffer.getvalue()
  error = pipeline_decodes(png)
  if error is not None:
    raise DataError(f"re-encoded PNG still fails to decode in TensorFlow: {error}")
  return png


def _decoded_indices(paths: Sequence[str], num_threads: int, desc: str) -> set[int]:
  """Indices of the files the pipeline's decoders read, decoded on ``num_threads`` tf.data threads.

  A file that fails (unreadable, undecodable) is simply absent from the result.
  """
  from tqdm.auto import tqdm

  decode = _pipeline_decode()
  names = tf.constant(list(paths), tf.string) if paths else tf.zeros([0], tf.string)
  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), names))
  ds = ds.map(lambda i, path: (i, decode(tf.io.read_file(path))), num_parallel_calls=num_threads,
              deterministic=False)
  ds = ds.ignore_errors().map(lambda i, shapes: i).batch(256)
  options = tf.data.Options()
  options.threading.private_threadpool_size = num_threads
  ds = ds.with_options(options)
  decoded: set[int] = set()
  with tqdm(total=len(paths), unit="img", mininterval=1.0, desc=desc,
            disable=True if len(paths) < PROGRESS_MIN_FILES else None) as bar:  # None: TTY only
    for indices in ds.as_numpy_iterator():
      decoded.update(indices.tolist())
      bar.update(len(indices))
  return decoded


def _check_file(path: str) -> tuple[str, str]:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return BAD, f"cannot be read ({e.strerror or e})"
  return check_bytes(data)


@dataclasses.dataclass(frozen=True)
class ImageCheck:
  """Outcome of checking a folder's images (paths relative to the folder root)."""

  fingerprint: str
  num_checked: int
  bad: tuple[tuple[str, str], ...]  # (relative path, reason)
  converted: tuple[tuple[str, str], ...]  # (relative path, reason)


def _read_cache(cache_file: pathlib.Path, fp: str, n: int) -> ImageCheck | None:
  try:
    cached = json.loads(cache_file.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    warnings.warn(f"ignoring unreadable image-check cache {os.fspath(cache_file)!r} ({e}); "
                  "checking again", stacklevel=2)
    return None
  if (cached.get("format") != _CHECK_FORMAT or cached.get("fingerprint") != fp
      or cached.get("tensorflow") != tf.__version__ or cached.get("num_checked") != n):
    return None
  return ImageCheck(fp, n, tuple(map(tuple, cached["bad"])), tuple(map(tuple, cached["converted"])))


def read_check(cache_dir: pathlib.Path) -> dict | None:
  """The raw image-check record stored in ``cache_dir`` (None when there is none)."""
  try:
    return json.loads((cache_dir / CHECK_FILE).read_text())
  except FileNotFoundError:
    return None


def _write_json(path: pathlib.Path, record: dict) -> None:
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
  except OSError as e:
    warnings.warn(f"could not cache the image check at {os.fspath(path)!r} ({e}); the images "
                  "will be decoded again in the next run.", stacklevel=2)


def check_images(root: pathlib.Path, rels: Sequence[str], *, fp: str,
                 cache_dir: pathlib.Path | None, folder_note: str = "",
                 num_threads: int | None = None) -> ImageCheck:
  """Decodes every ``root/rel`` with the pipeline's decoders (cached by fingerprint ``fp``).

  Args:
    root: the folder the relative paths start from.
    rels: posix paths relative to ``root`` of the images to check.
    fp: the folder's fingerprint; the cache is used only when it matches (and TensorFlow's version).
    cache_dir: where ``jaxkd-image-check.json`` is kept (None: no cache).
    folder_note: extra text stored with the result (the folder the user gave).
    num_threads: decode threads (default: the CPUs this process may use).
  """
  cache_file = cache_dir / CHECK_FILE if cache_dir is not None else None
  if cache_file is not None:
    cached = _read_cache(cache_file, fp, len(rels))
    if cached is not None:
      return cached
  if num_threads is None:
    num_threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count())
  num_threads = max(1, min(int(num_threads or 1), 64))
  paths = [os.path.join(root, *rel.split("/")) for rel in rels]
  decoded = _decoded_indices(paths, num_threads, desc=f"checking images in {os.fspath(root)}")
  failed = [i for i in range(len(paths)) if i not in decoded]
  # The few files that failed: read again in Python for the reason (and Pillow's opinion).
  results = {}
  if failed:
    with concurrent.futures.ThreadPoolExecutor(num_threads,
                                               thread_name_prefix="jaxkd-image-check") as pool:
      results = dict(zip(failed, pool.map(_check_file, [paths[i] for i in failed])))
  results = [results.get(i, (OK, "")) for i in range(len(paths))]
  by_status = {BAD: [], CONVERT: [], OK: []}
  for rel, (status, reason) in zip(rels, results):
    by_status[status].append((rel, reason))
  bad, converted = tuple(by_status[BAD]), tuple(by_status[CONVERT])
  result = ImageCheck(fp, len(rels), bad, converted)
  if cache_file is not None:
    _write_json(cache_file, {
        "format": _CHECK_FORMAT, "fingerprint": fp, "tensorflow": tf.__version__,
        "folder": folder_note or os.fspath(root), "num_checked": len(rels),
        "bad": [list(b) for b in bad], "converted": [list(c) for c in converted]})
  return result


def bad_images_error(root: pathlib.Path, check: ImageCheck) -> DataError:
  """One error naming every bad file (absolute path) and why, and how to go on."""
  lines = "\n".join(f"  {path}: {reason}" for path, reason in absolute_pairs(root, check.bad))
  return DataError(
      f"{len(check.bad)} of {check.num_checked} image files in {os.fspath(root)!r} cannot be "
      f"decoded by the training pipeline:\n{lines}\nReplace or delete them, or leave them out "
      "with --config.data.skip_bad_images=true (jaxkd.data.get_source(..., "
      "skip_bad_images=True)); the run's report then lists them.")


@dataclasses.dataclass(frozen=True)
class UsableImages:
  """The images of a checked folder that a source leaves out or converts.

  Both lists hold (absolute path, reason); ``skipped`` is empty unless the source was built
  with ``skip_bad_images=True``.
  """

  skipped: list[tuple[str, str]]
  converted: list[tuple[str, str]]


def usable_images(root: pathlib.Path, check: ImageCheck, *,
                  skip_bad_images: bool) -> UsableImages:
  """A source's decision on a folder's image check: refuse the folder or skip its bad images.

  Raises ``bad_images_error`` (one ``DataError`` naming every undecodable file) when the check
  found any and ``skip_bad_images`` is False; otherwise returns the images left out (only with
  ``skip_bad_images``) and those converted to PNG, as absolute paths under ``root``.
  """
  if check.bad and not skip_bad_images:
    raise bad_images_error(root, check)
  skipped = absolute_pairs(root, check.bad) if skip_bad_images else []
  return UsableImages(skipped, absolute_pairs(root, check.converted))


def absolute_pairs(root: pathlib.Path, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
  """[(absolute path, reason)] from [(path relative to root, reason)]."""
  return [(os.path.join(root, *rel.split("/")), reason) for rel, reason in pairs]


def write_converted(root: pathlib.Path, check: ImageCheck, out_dir: pathlib.Path) -> dict[str, str]:
  """Writes each converted image as ``out_dir/<rel>.png`` (once); {rel: absolute png path}."""
  written = {}
  for rel, _ in check.converted:
    target = out_dir / f"{rel}.png"
    if not target.is_file():
      src = os.path.join(root, *rel.split("/"))
      with open(src, "rb") as f:
        png = to_png(f.read())
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(png)
        os.replace(tmp, target)
      except OSError as e:
        raise DataError(f"could not write the PNG conversion of {src!r} to "
                        f"{os.fspath(target)!r} ({e}); make data_dir writable or convert the "
                        "file to JPEG/PNG yourself") from e
    written[rel] = os.fspath(target)
  return written
