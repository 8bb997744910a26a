"""ONNX export: jax2onnx, checked and quantised with ONNX Runtime's tools.

``jax2onnx.to_onnx`` converts the traced serving function (uint8 images [N, S, S, 3] ->
probabilities [N, C], N symbolic) to an ONNX graph (Conv, Clip, ReduceMean, Softmax, ...),
which ``onnx.checker`` validates. Quantisation:

* ``none``: float32;
* ``float16``: float16 weights and activations (``onnxruntime.transformers.float16``,
  input and output types kept: uint8 in, float32 out);
* ``int8``: static post-training quantisation (``onnxruntime.quantization.quantize_static``,
  QDQ format, per-channel int8 weights, uint8 activations with ranges calibrated on a
  representative set of training images; Jacob et al., "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018).

The exported file is run with ONNX Runtime (``onnxruntime``, CPU execution provider).
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable

import numpy as np

from jaxkd.export.extra import require

QUANTIZATIONS = ("none", "float16", "int8")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def convert(fn: Callable, image_size: int, *, quantize: str = "none",
            representative: Iterable[np.ndarray] | None = None, opset: int = 18) -> bytes:
  """The serialised ONNX model of `fn` (uint8 [N, S, S, 3] -> float32 [N, C]).

  `representative`: uint8 images [S, S, 3] (int8 only). `opset`: the ONNX operator set
  (18: ReduceMean takes its axes as an input; ONNX Runtime runs it since 1.14).
  """
  import jax
  import jax.numpy as jnp
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize={quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
  if quantize == "int8" and representative is None:
    raise ValueError("quantize='int8' needs representative images (uint8 [S, S, 3] each)")
  jax2onnx = require("jax2onnx", "export ONNX")
  onnx = require("onnx", "export ONNX")
  size = int(image_size)
  with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debugging lines
    spec = jax.ShapeDtypeStruct(("N", size, size, 3), jnp.uint8)
    model = jax2onnx.to_onnx(_flax_pooling_adapted(fn), [spec],
                             model_name="jaxkd", opset=opset, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  onnx.checker.check_model(model)
  if quantize == "float16":
    require("onnxruntime", "convert ONNX models to float16")
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(model, keep_io_types=True)
  elif quantize == "int8":
    model = _quantize_int8(model, representative)
  return model.SerializeToString()


def _flax_pooling_adapted(fn: Callable) -> Callable:
  """`fn`, traced with Flax's max_pool / avg_pool called the way jax2onnx's replacements expect.

  While it traces, jax2onnx replaces ``flax.linen.max_pool`` / ``avg_pool`` with functions
  that take the window shape by keyword only and know the padding only as 'SAME' or
  'VALID' (Flax's own functions lower to ``lax.reduce_window`` over all four axes, which
  jax2onnx turns into a 4-D MaxPool that ONNX Runtime cannot run). The adapters pad
  explicitly (-inf for max pooling, zeros for average pooling that counts the padding,
  as PyTorch's ``count_include_pad=True``) and call the replacement with 'VALID'.
  """
  import flax.linen
  import flax.linen.pooling
  import jax.numpy as jnp

  def explicit(x, padding, value):
    if isinstance(padding, str):
      return x, padding
    pads = [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)]
    return jnp.pad(x, pads, constant_values=value), "VALID"

  def adapters(max_pool, avg_pool):
    def max_adapter(x, window_shape, strides=None, padding="VALID"):
      x, padding = explicit(x, padding, -jnp.inf)
      return max_pool(x, window_shape=tuple(window_shape), strides=strides, padding=padding)

    def avg_adapter(x, window_shape, strides=None, padding="VALID", count_include_pad=True):
      if not count_include_pad and not isinstance(padding, str):
        raise NotImplementedError("ONNX export of average pooling with explicit padding that "
                                  "does not count the padding (count_include_pad=False)")
      x, padding = explicit(x, padding, 0.0)
      return avg_pool(x, window_shape=tuple(window_shape), strides=strides, padding=padding)

    return {"max_pool": max_adapter, "avg_pool": avg_adapter}

  modules = (flax.linen, flax.linen.pooling)

  def traced(images):
    saved = [(m, name, getattr(m, name)) for m in modules for name in ("max_pool", "avg_pool")]
    replaced = adapters(flax.linen.max_pool, flax.linen.avg_pool)
    try:
      for m, name, _ in saved:
        setattr(m, name, replaced[name])
      return fn(images)
    finally:
      for m, name, value in saved:
        setattr(m, name, value)

  return traced


def _quantize_int8(model, representative: Iterable[np.ndarray]):
  onnx = require("onnx", "export ONNX")
  require("onnxruntime", "quantise ONNX models")
  from onnxruntime import quantization as q
  images = [np.asarray(x, np.uint8)[None] for x in representative]
  if not images:
    raise ValueError("quantize='int8': the representative set is empty")

  class Reader(q.CalibrationDataReader):
    def __init__(self):
      self._it = iter(images)

    def get_next(self):
      x = next(self._it, None)
      return None if x is None else {INPUT_NAME: x}

  with tempfile.TemporaryDirectory(prefix="jaxkd-onnx-int8-") as tmp:
    src, dst = pathlib.Path(tmp) / "float.onnx", pathlib.Path(tmp) / "int8.onnx"
    onnx.save(model, src)
    q.quantize_static(os.fspath(src), os.fspath(dst), Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, weight_type=q.QuantType.QInt8,
                      activation_type=q.QuantType.QUInt8,
                      calibrate_method=q.CalibrationMethod.MinMax)
    return onnx.load(dst)


class Runner:
  """Runs an .onnx file with ONNX Runtime (CPU): `runner(images_uint8) -> probabilities`."""

  def __init__(self, path: str | os.PathLike, *, num_threads: int = 1):
    ort = require("onnxruntime", "run ONNX files")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(num_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    self.session = ort.InferenceSession(os.fspath(path), options,
                                        providers=["CPUExecutionProvider"])
    self._input = self.session.get_inputs()[0].name

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.ascontiguousarray(images, np.uint8)
    return np.asarray(self.session.run(None, {self._input: images})[0], np.float32)
