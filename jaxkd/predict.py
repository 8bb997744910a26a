"""Classify images with a finished run's model.

  python -m jaxkd.predict WORKDIR PATH... [--role=student|teacher] [--top_k=5] [--json]

PATH: image files or folders (searched recursively for .jpg/.jpeg/.png/.bmp/.gif). Each image
goes through the run's eval preprocessing (``jaxkd.data.augment.eval_preprocess``: centre crop,
resize, normalisation), batches of ``--batch_size`` run on every device (sharded over a 1-D
'data' mesh) with the run's compute dtype in eval mode, exactly the forward the experiment
evaluates with. For each image: the top-k class names and softmax probabilities; with --json
one object per line, ``{"path": ..., "top_k": [[name, prob], ...]}``. An image that cannot be
decoded is reported by path (``{"path": ..., "error": ...}``) and the others go on; the exit
code is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def image_paths(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
  """Files as given, folders expanded to their images (sorted, recursive), with the image-folder
  source's rules: its file extensions, hidden files left out."""
  from jaxkd.data.sources import IMAGE_EXTENSIONS
  from jaxkd.data.user_folders import is_hidden
  out = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      out.extend(sorted(f for f in p.rglob("*") if f.is_file()
                        and f.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(f.name)))
    elif p.exists():
      out.append(p)
    else:
      raise FileNotFoundError(f"{p}: no such image file or folder")
  return out


class Predictor:
  """A run's model with its eval preprocessing: `predictor(paths)` yields per-image results."""

  def __init__(self, model, variables, class_names: Sequence[str], augment_config,
               batch_size: int = 64):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxkd.train.step import data_mesh
    self.class_names = list(class_names)
    self.cfg = augment_config
    self.mesh = data_mesh()
    n = self.mesh.devices.size
    self.batch_size = max(n, -(-int(batch_size) // n) * n)  # a multiple of the device count
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
    self._sharding = NamedSharding(self.mesh, P("data"))
    self._fn = jax.jit(lambda v, x: jax.nn.softmax(
        model.apply(v, x, train=False).astype(jnp.float32), axis=-1),
        in_shardings=(NamedSharding(self.mesh, P()), self._sharding))

  def preprocess(self, data: bytes) -> np.ndarray:
    """Normalised float32 [S, S, 3] of an encoded image (the eval preprocessing)."""
    import tensorflow as tf

    from jaxkd.data import augment
    return augment.eval_preprocess(tf.constant(data), self.cfg).numpy()

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] of preprocessed images [N, S, S, 3], padded to whole batches."""
    import jax
    n = len(images)
    pad = -n % self.batch_size if n > self.batch_size else self.batch_size - n
    x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    out = [np.asarray(self._fn(self.variables, jax.device_put(x[i:i + self.batch_size],
                                                              self._sharding)))
           for i in range(0, len(x), self.batch_size)]
    return np.concatenate(out)[:n]

  def __call__(self, paths: Iterable[pathlib.Path], top_k: int = 5) -> Iterator[dict]:
    """{'path', 'top_k': [[name, prob], ...]} per image, or {'path', 'error'} for a bad one."""
    k = max(1, min(int(top_k), len(self.class_names)))
    pending: list[tuple[pathlib.Path, np.ndarray]] = []

    def flush():
      probs = self.probabilities(np.stack([x for _, x in pending]))
      for (path, _), p in zip(pending, probs):
        best = np.argsort(-p, kind="stable")[:k]
        yield {"path": str(path), "top_k": [[self.class_names[i], float(p[i])] for i in best]}
      pending.clear()

    for path in paths:
      try:
        image = self.preprocess(pathlib.Path(path).read_bytes())
      except Exception as e:  # noqa: BLE001 - any undecodable file is reported, the rest go on
        yield {"path": str(path), "error": _reason(e)}
        continue
      pending.append((path, image))
      if len(pending) == self.batch_size:
        yield from flush()
    if pending:
      yield from flush()


def _reason(e: Exception) -> str:
  """TensorFlow's reason (without its op decorations), else the exception's first line."""
  import tensorflow as tf

  from jaxkd.data.user_folders import tf_error_message
  if isinstance(e, tf.errors.OpError):
    line = tf_error_message(e)
  else:
    line = next((t for t in str(e).splitlines() if t.strip()), type(e).__name__)
  return f"cannot decode the image ({line.strip()[:200]})"


def load_predictor(workdir: str | os.PathLike, role: str = "student",
                   batch_size: int = 64) -> Predictor:
  """The Predictor of a finished run's `role` (its compute dtype, eval preprocessing)."""
  from jaxkd.data import augment
  from jaxkd.export.deploy import load
  d = load(workdir, role, open_source=False)  # the run's compute dtype, as its evaluation
  cfg = augment.AugmentConfig(image_size=d.image_size, eval_crop_fraction=d.eval_crop_fraction,
                              antialias=d.antialias)
  return Predictor(d.model, d.variables, d.class_names, cfg, batch_size=batch_size)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxkd.predict", description=__doc__.split("\n")[0])
  p.add_argument("workdir", help="the --workdir of a finished jaxkd run")
  p.add_argument("paths", nargs="+", help="image files or folders of images")
  p.add_argument("--role", default="student", choices=("student", "teacher"))
  p.add_argument("--top_k", type=int, default=5)
  p.add_argument("--json", action="store_true", help="one JSON object per line")
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  from jaxkd.config import ConfigError
  try:
    paths = image_paths(args.paths)
    predictor = load_predictor(args.workdir, args.role, args.batch_size)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f"predict error: {e}", file=sys.stderr)
    return 2
  bad = 0
  for result in predictor(paths, args.top_k):
    if args.json:
      print(json.dumps(result), flush=True)
    elif "error" not in result:
      best = ", ".join(f"{name} {prob:.4f}" for name, prob in result["top_k"])
      print(f"{result['path']}: {best}", flush=True)
    if "error" in result:  # once, on stderr (and in the JSON stream with --json)
      bad += 1
      print(f"predict: {result['path']}: {result['error']}", file=sys.stderr, flush=True)
  if bad:
    print(f"predict: {bad} of {len(paths)} images could not be read (listed above); the others "
          "were classified", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
