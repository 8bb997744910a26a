"""TFLite (LiteRT) export: jax2tf, then TensorFlow's TFLite converter; LiteRT's interpreter runs it.

The serving function (uint8 images [N, S, S, 3] -> probabilities [N, C]) is converted with
``jax.experimental.jax2tf.convert`` (native serialisation: the StableHLO of the jitted
function inside a ``tf.function``) and ``tf.lite.TFLiteConverter.from_concrete_functions``
legalises it to TFLite builtin operations (CONV_2D, DEPTHWISE_CONV_2D, HARD_SWISH, ...).
The batch size is fixed at export (``batch_size``, default 1, what on-device inference
runs): with a symbolic batch, JAX lowers indexing such as ``x[..., :half]`` (ShuffleNetV2's
channel split, ECA's ``y[:, :, 0]``) to a dynamic gather, which the converter cannot
legalise. Quantisation
(the converter's post-training options, https://ai.google.dev/edge/litert/models/post_training_quantization):

* ``none``: float32 weights and activations;
* ``float16``: float16 weights, dequantised to float32 at load time (half the size);
* ``int8``: full-integer post-training quantisation (Jacob et al., "Quantization and Training
  of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018): int8
  weights (per channel) and activations, ranges calibrated on a representative set of
  training images; operations without an int8 kernel stay float32; the uint8 input and the
  float32 probabilities keep their types.

The exported file is run with the interpreter of the ``ai-edge-litert`` package (LiteRT,
the TFLite runtime's current name), not TensorFlow's copy.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from jaxkd.export.extra import require

QUANTIZATIONS = ("none", "float16", "int8")


def convert(fn: Callable, image_size: int, *, quantize: str = "none",
            representative: Iterable[np.ndarray] | None = None, batch_size: int = 1) -> bytes:
  """The .tflite flatbuffer of `fn` (uint8 [B, S, S, 3] -> float32 [B, C], B = `batch_size`).

  `representative`: uint8 images [S, S, 3] (int8 only; a few hundred training images).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from jax.experimental import jax2tf

  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize={quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size}: need at least 1")
  size, batch = int(image_size), int(batch_size)
  spec = tf.TensorSpec([batch, size, size, 3], tf.uint8, name="images")
  tf_fn = tf.function(jax2tf.convert(fn, with_gradient=False), input_signature=[spec],
                      autograph=False)
  concrete = tf_fn.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf_fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantize == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "int8":
    if representative is None:
      raise ValueError("quantize='int8' needs representative images (uint8 [S, S, 3] each)")
    images = [np.asarray(x, np.uint8) for x in representative]
    if not images:
      raise ValueError("quantize='int8': the representative set is empty")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


class Runner:
  """Runs a .tflite file with LiteRT's interpreter: `runner(images_uint8) -> probabilities`."""

  def __init__(self, path: str | os.PathLike, *, num_threads: int = 1):
    require("ai_edge_litert", "run TFLite files with LiteRT")
    from ai_edge_litert.interpreter import Interpreter
    self.interpreter = Interpreter(model_path=os.fspath(path), num_threads=int(num_threads))
    detail = self.interpreter.get_input_details()[0]
    self._input = detail["index"]
    self._output = self.interpreter.get_output_details()[0]["index"]
    self.batch_size = int(detail["shape"][0])
    self.interpreter.allocate_tensors()

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Probabilities [N, C] of uint8 images [N, S, S, 3], run `batch_size` images at a time."""
    images = np.ascontiguousarray(images, np.uint8)
    b, n = self.batch_size, images.shape[0]
    out = []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      if chunk.shape[0] < b:  # the last, partial batch: pad with zero images
        chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0],) + chunk.shape[1:], np.uint8)])
      self.interpreter.set_tensor(self._input, chunk)
      self.interpreter.invoke()
      out.append(np.array(self.interpreter.get_tensor(self._output), np.float32))
    return np.concatenate(out)[:n]
