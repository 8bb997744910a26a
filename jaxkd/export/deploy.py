"""`export`: one trained model to one deployable file, verified with the official runtime.

    figures = export("runs/food101_eca", "tflite", quantize="int8")
    # -> runs/food101_eca/export/student_int8.tflite and student_int8.tflite.json

The exported model is the inference-mode network with BatchNorm folded into the
convolutions (``jaxkd.export.fold``), input uint8 RGB [N, S, S, 3] (resized and
centre-cropped as the eval preprocessing does, ``jaxkd.export.images``), normalisation
inside, output softmax probabilities [N, C]. Beside FILE, FILE.json holds the class names,
S, the resize-and-crop rule, and the figures the export measured itself (both written whole
or not at all, FILE.json last: its presence marks a finished export):

* ``parity``: on the real images of the verification split (val), the largest absolute
  probability difference between the exported file (run by LiteRT's interpreter or ONNX
  Runtime) and jaxkd (the unfolded float32 model, jitted) and their top-1 agreement; a
  float32 export must agree within ``FLOAT32_TOLERANCE`` (1e-4) or ``ExportError`` is raised;
* ``top1``: val top-1 of the exported file and of jaxkd on the same crops;
* ``size_bytes`` and ``latency_ms``: single-thread, batch-1 CPU latency of the file (median
  of ``latency_runs`` runs after warm-up) beside jaxkd's jitted latency (XLA, its default
  threads, the first device).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxkd.export import images as images_lib
from jaxkd.export.extra import MissingExtraError, require

FORMATS = ("tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "int8")
FLOAT32_TOLERANCE = 1e-4
_SUFFIX = {"tflite": ".tflite", "onnx": ".onnx"}


class ExportError(RuntimeError):
  """An export that failed its own verification (the figures are in FILE.json)."""


@dataclasses.dataclass
class Deployable:
  """What an export needs: the model, its variables and how its inputs are made.

  `source`: the jaxkd data source of the run (verification and representative images), or
  None when they are given as arrays.
  """
  model: Any
  variables: Any
  model_name: str
  role: str
  image_size: int
  class_names: list[str]
  eval_crop_fraction: float = 0.875
  antialias: bool = True
  source: Any = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load_run(workdir: str | os.PathLike, role: str = "student", *, dtype: Any = None):
  """(model, variables, config) of a finished run's `role`; the model in `dtype` (default: the
  run's compute dtype, as its evaluation ran).

  The one place that reads a workdir's variables (jaxkd.workdir.load_variables).
  """
  from jaxkd.workdir import load_variables
  return load_variables(workdir, role, dtype=dtype)


def data_source(config):
  """The jaxkd data source a run's config names (as the experiment opens it)."""
  from jaxkd.data import get_source
  data = config.data
  return get_source(data.name, data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"),
                    val_fraction=float(data.get("val_fraction", 0.2)),
                    split_seed=int(data.get("split_seed", 0)),
                    download=bool(data.get("download", True)), version=data.get("version"),
                    skip_bad_images=bool(data.get("skip_bad_images", False)))


def load(workdir: str | os.PathLike, role: str = "student", *, dtype: Any = None,
         open_source: bool = True) -> Deployable:
  """The `role` model of a finished workdir, with its classes and eval preprocessing.

  Class names come from the workdir's dataset.json when it records them, else from the
  run's data source; the source (`Deployable.source`, for verification and calibration
  images) is opened when `open_source` or when the class names need it.
  """
  model, variables, config = load_run(workdir, role, dtype=dtype)
  path = pathlib.Path(os.path.expanduser(os.fspath(workdir)))
  dataset = json.loads((path / "dataset.json").read_text())
  names = dataset.get("class_names")
  source = data_source(config) if open_source or not names else None
  names = names or list(source.class_names)
  aug = config.augment
  return Deployable(model=model, variables=variables, model_name=str(config[role].model), role=role,
                    image_size=int(aug.image_size), class_names=list(names),
                    eval_crop_fraction=float(aug.get("eval_crop_fraction", 0.875)),
                    antialias=bool(aug.get("antialias", True)), source=source)


def default_out(workdir: str | os.PathLike, role: str, format: str, quantize: str) -> pathlib.Path:
  """<workdir>/export/<role>_<quantize>.<tflite|onnx> (quantize 'none' reads float32)."""
  name = "float32" if quantize == "none" else quantize
  return pathlib.Path(workdir) / "export" / f"{role}_{name}{_SUFFIX[format]}"


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it): an interrupted export
  leaves no truncated file."""
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _runner(format: str, path: pathlib.Path, num_threads: int = 1):
  if format == "tflite":
    from jaxkd.export import tflite
    return tflite.Runner(path, num_threads=num_threads)
  from jaxkd.export import onnx
  return onnx.Runner(path, num_threads=num_threads)


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(int(runs)):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def _jaxkd_probabilities(d: Deployable, batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
  """The reference: the unfolded model in eval mode (float32), jitted, on uint8 crops."""
  import jax
  import jax.numpy as jnp

  from jaxkd.export.fold import normalize
  model = d.model.clone(dtype=jnp.float32) if hasattr(d.model, "dtype") else d.model
  fn = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, normalize(x), train=False)
                                           .astype(jnp.float32), axis=-1))
  device = jax.devices()[0]
  variables = jax.device_put(d.variables, device)

  def run(images: np.ndarray) -> np.ndarray:
    out = [np.asarray(fn(variables, jax.device_put(images[i:i + batch], device)))
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, d.num_classes), np.float32)

  run.single = lambda image: fn(variables, image).block_until_ready()  # noqa: E731
  run.device = device
  run.variables = variables
  return run


def _arrays(data, what: str) -> tuple[np.ndarray, np.ndarray | None]:
  images, labels = (data, None) if isinstance(data, np.ndarray) else data
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{what}: expected uint8 images [N, S, S, 3], got {images.dtype} "
                     f"{images.shape}")
  return images, None if labels is None else np.asarray(labels)


def export(target, format: str, quantize: str = "none", out: str | os.PathLike | None = None, *,
           role: str = "student", verify_source: Any = None, verify_split: str = "val",
           max_verify_images: int | None = None, representative: Any = None,
           num_representative: int = 200, latency_runs: int = 50, tflite_batch_size: int = 1,
           progress: Callable[[str], None] | None = None) -> dict:
  """Exports, verifies and measures one model; returns the figures (also in FILE.json).

  Args:
    target: a workdir (its finished `role` stage) or a `Deployable`.
    format: 'tflite' or 'onnx'.
    quantize: 'none' (float32), 'float16' or 'int8' (post-training, calibrated on
      `num_representative` training images).
    out: the file to write (default <workdir>/export/<role>_<float32|float16|int8>.<ext>).
    verify_source: the verification images: a jaxkd data source (its `verify_split`), or
      (uint8 images [N, S, S, 3], labels [N] or None); default the run's source.
    max_verify_images: at most that many verification images (default all of the split).
    representative: int8 calibration images (a source, whose train split is sampled, or uint8
      images [N, S, S, 3]); default the run's source.
    latency_runs: batch-1 runs timed for each latency median (0: no latency figures).
    tflite_batch_size: the fixed batch size of a TFLite file.
    progress: called with one line per step (e.g. print).
  """
  import jax
  import jax.numpy as jnp

  from jaxkd.export import fold
  say = progress or (lambda line: None)
  if format not in FORMATS:
    raise ValueError(f"format={format!r}: use one of {', '.join(FORMATS)}")
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize={quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
  require("ai_edge_litert" if format == "tflite" else "onnxruntime",
          f"verify {format} exports")
  if format == "onnx":
    require("jax2onnx", "export ONNX")
  workdir = None
  if isinstance(target, Deployable):
    d = target
  else:
    workdir = pathlib.Path(target)
    d = load(workdir, role)
  if out is None:
    if workdir is None:
      raise ValueError("out= is needed when exporting a Deployable (no workdir to write into)")
    out = default_out(workdir, d.role, format, quantize)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  size = d.image_size
  crop = (size, d.eval_crop_fraction, d.antialias)

  say(f"export: {d.model_name} ({d.role}) -> {out} [{format}, {quantize}]")
  verify_source = d.source if verify_source is None else verify_source
  if verify_source is None:
    raise ValueError("no verification images: give verify_source= (a data source or arrays)")
  if isinstance(verify_source, (tuple, np.ndarray)):
    val_images, val_labels = _arrays(verify_source, "verify_source")
    if max_verify_images is not None:
      val_images = val_images[:max_verify_images]
      val_labels = None if val_labels is None else val_labels[:max_verify_images]
    verify_name = "given images"
  else:
    val_images, val_labels = images_lib.split_crops(verify_source, verify_split, *crop,
                                                    limit=max_verify_images)
    verify_name = f"{verify_source.name}/{verify_split}"

  calibration = None
  if quantize == "int8":
    rep = d.source if representative is None else representative
    if rep is None:
      raise ValueError("quantize='int8' needs representative= (a data source or uint8 images)")
    if isinstance(rep, (tuple, np.ndarray)):
      calibration = _arrays(rep, "representative")[0][:num_representative]
    else:
      calibration = images_lib.split_crops(rep, "train", *crop, limit=num_representative,
                                           shuffle_seed=0)[0]

  model = d.model.clone(dtype=jnp.float32) if hasattr(d.model, "dtype") else d.model
  folded = fold.fold_batchnorm(model, d.variables, size, check=False)
  start = time.perf_counter()
  if format == "tflite":
    from jaxkd.export import tflite
    blob = tflite.convert(folded.probabilities, size, quantize=quantize,
                          representative=calibration, batch_size=tflite_batch_size)
  else:
    from jaxkd.export import onnx
    blob = onnx.convert(folded.probabilities, size, quantize=quantize, representative=calibration)
  convert_s = time.perf_counter() - start
  _write_atomic(out, blob)
  say(f"export: wrote {out} ({len(blob)} bytes) in {convert_s:.1f} s; verifying on "
      f"{len(val_images)} images of {verify_name}")

  runner = _runner(format, out, num_threads=1)
  reference = _jaxkd_probabilities(d)
  got, want = runner(val_images), reference(val_images)
  diff = float(np.max(np.abs(got - want))) if len(got) else float("nan")
  agreement = float(np.mean(got.argmax(-1) == want.argmax(-1))) if len(got) else float("nan")
  top1 = None
  if val_labels is not None and len(val_labels):
    top1 = {"exported": float(np.mean(got.argmax(-1) == val_labels)),
            "jaxkd": float(np.mean(want.argmax(-1) == val_labels))}
  latency = None
  if latency_runs:
    one = val_images[:1]
    batch_one = (np.concatenate([one] * runner.batch_size) if format == "tflite" else one)
    device_one = jax.device_put(one, reference.device)
    latency = {"runs": int(latency_runs), "batch": 1, "exported_median": _median_ms(
                   lambda: runner(batch_one), latency_runs),
               "exported_threads": 1,
               "jaxkd_jit_median": _median_ms(lambda: reference.single(device_one), latency_runs),
               "jaxkd_device": f"{reference.device.platform}:{reference.device.id} "
                               f"({reference.device.device_kind})"}
  ok = quantize != "none" or diff <= FLOAT32_TOLERANCE
  figures = {
      "format": format, "quantize": quantize, "file": out.name, "size_bytes": len(blob),
      "model": d.model_name, "role": d.role, "num_classes": d.num_classes,
      "class_names": list(d.class_names), "image_size": size,
      "input": {"dtype": "uint8", "layout": "NHWC, RGB",
                "shape": [tflite_batch_size if format == "tflite" else "N", size, size, 3]},
      "output": {"dtype": "float32", "shape": ["N", d.num_classes], "meaning": "softmax "
                 "probabilities over class_names"},
      "preprocessing": {"resize_and_crop": images_lib.crop_rule(*crop),
                        "eval_crop_fraction": d.eval_crop_fraction, "antialias": d.antialias,
                        "normalization": "inside the model: (x - 255 * mean) / (255 * std), "
                                         f"mean {list(fold.MEAN_RGB)}, std {list(fold.STD_RGB)}"},
      "batchnorm_folded": len(folded.folded),
      "parity": {"images": int(len(val_images)), "split": verify_name,
                 "max_abs_prob_diff": diff, "top1_agreement": agreement,
                 "tolerance": FLOAT32_TOLERANCE if quantize == "none" else None, "ok": ok},
      "top1": top1, "latency_ms": latency, "convert_seconds": convert_s,
      "runtime": "ai-edge-litert (LiteRT interpreter)" if format == "tflite"
                 else "onnxruntime (CPUExecutionProvider)",
  }
  meta = out.with_name(out.name + ".json")
  _write_atomic(meta, json.dumps(figures, indent=2, sort_keys=True).encode())
  say(f"export: max |p - p_jaxkd| {diff:.3g}, top-1 agreement {agreement:.4f}"
      + (f", val top-1 {top1['exported']:.4f} (jaxkd {top1['jaxkd']:.4f})" if top1 else "")
      + (f", latency {latency['exported_median']:.2f} ms (jaxkd {latency['jaxkd_jit_median']:.2f}"
         " ms)" if latency else ""))
  if not ok:
    raise ExportError(f"{out}: the float32 export differs from jaxkd by {diff:.3g} in probability "
                      f"(more than {FLOAT32_TOLERANCE}) on {len(val_images)} images of "
                      f"{verify_name}; the figures are in {meta}")
  return figures


__all__ = ["FORMATS", "QUANTIZATIONS", "FLOAT32_TOLERANCE", "Deployable", "ExportError",
           "MissingExtraError", "export", "load", "load_run", "data_source", "default_out"]
