"""Inference-mode graph of a jaxkd model with BatchNorm folded into the convolutions.

In inference mode a BatchNorm after a convolution is an affine map per output channel,
``y = (conv(x, W) + b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)``
(Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift", ICML 2015), so it folds into the convolution:

    W' = W * k   (per output channel),   b' = (b - mean) * k + beta

as inference engines do (Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018, sec. 3.2). Folding leaves one
convolution with a bias per pair, which is what post-training int8 quantisation then
quantises per channel.

No model code changes: ``fold_batchnorm`` traces ``model.apply(..., train=False)`` with
Flax method interception (``flax.linen.intercept_methods``) and pairs every BatchNorm
whose input is exactly the output of the convolution called just before it (``nn.Conv``
or jaxkd's ``DepthwiseConv``). The folded variables hold ``W'`` in place of the kernel
and ``b'`` as the convolution's bias when it has one, else as the only parameter left
to the BatchNorm. ``FoldedModel.apply`` runs the model under an interceptor that makes
a folded BatchNorm add ``b'`` (or nothing) to its input, and computes each convolution
with ``lax.conv_general_dilated`` (depthwise ones as a grouped convolution) instead of
jaxkd's CPU-specific implementations (``lax.platform_dependent``), so the traced graph
is the same for every platform and exporters see one convolution operation followed by
an addition, which they fuse into the convolution's bias. Keeping ``b'`` at the
BatchNorm's place also keeps the result right when a converter substitutes its own
``nn.Conv`` (jax2onnx does, bypassing Flax's interceptors). A BatchNorm that follows
no convolution (pre-activation blocks) stays the running-statistics affine map.

A pairing is only valid when the BatchNorm is the convolution's only consumer;
``fold_batchnorm`` checks the folded model against the original on random inputs and
raises ``FoldError`` if they disagree.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxkd.models.batchnorm import BatchNorm
from jaxkd.models.layers import DepthwiseConv
from jaxkd.pixels import MEAN_RGB, STD_RGB  # the eval normalisation, run inside the exported model

Path = tuple[str, ...]


class FoldError(ValueError):
  """The folded model does not compute what the model computes."""


def _is_conv(module) -> bool:
  return isinstance(module, (nn.Conv, DepthwiseConv))


def _sub(tree: dict, path: Path) -> dict | None:
  for name in path:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _pop(tree: dict, path: Path) -> None:
  """Removes the leaf dict at `path` and the dicts it leaves empty."""
  parent = _sub(tree, path[:-1])
  if parent is None or path[-1] not in parent:
    return
  del parent[path[-1]]
  if not parent and len(path) > 1:
    _pop(tree, path[:-1])


def _mutable(tree) -> Any:
  """A plain nested dict copy of a variables tree (leaves as numpy arrays)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _mutable(v) for k, v in tree.items()}
  return np.asarray(tree)


@dataclasses.dataclass(frozen=True)
class Pair:
  """A convolution and the BatchNorm that consumes its output."""
  conv: Path
  bn: Path
  epsilon: float


def find_pairs(model: nn.Module, variables, image_size: int) -> list[Pair]:
  """The (convolution, BatchNorm) pairs of `model` in call order (traced, nothing computed)."""
  pairs: list[Pair] = []
  last: list = [None, None]  # path and output of the convolution called last

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if _is_conv(module):
      out = next_fun(*args, **kwargs)
      last[:] = [tuple(module.path), out]
      return out
    if isinstance(module, BatchNorm) and last[1] is not None and args and args[0] is last[1]:
      if not module.use_running_average:
        raise FoldError(f"BatchNorm {'/'.join(module.path)} is in training mode; fold the "
                        "inference model (train=False)")
      pairs.append(Pair(last[0], tuple(module.path), float(module.epsilon)))
    return next_fun(*args, **kwargs)

  def trace(v, x):
    with nn.intercept_methods(record):
      return model.apply(v, x, train=False)

  shape = (1, image_size, image_size, 3)
  jax.eval_shape(trace, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  return pairs


@dataclasses.dataclass
class FoldedModel:
  """A model in inference mode with its BatchNorms folded (see the module docstring).

  `variables` hold the folded kernels; the folded bias b' [out channels] is the
  convolution's `bias` when it has one, else the folded BatchNorm's only parameter `bias`;
  the folded BatchNorms have no statistics.
  """
  model: nn.Module
  variables: dict
  folded: frozenset  # paths of the folded BatchNorms
  convs: frozenset  # paths of the folded convolutions
  image_size: int

  def _interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if isinstance(module, BatchNorm) and path in self.folded:
      params = module.variables.get("params", {})
      return args[0] + params["bias"].astype(args[0].dtype) if "bias" in params else args[0]
    if isinstance(module, DepthwiseConv):
      return _depthwise(module, args[0])
    if isinstance(module, nn.Conv):
      return _conv(module, args[0])
    return next_fun(*args, **kwargs)

  def apply(self, images: jax.Array) -> jax.Array:
    """Logits [N, C] (float32) of normalised float images [N, S, S, 3]."""
    with nn.intercept_methods(self._interceptor):
      return self.model.apply(self.variables, images, train=False).astype(jnp.float32)

  def probabilities(self, images_uint8: jax.Array) -> jax.Array:
    """Softmax probabilities [N, C] of uint8 RGB images [N, S, S, 3] (resized and cropped)."""
    return jax.nn.softmax(self.apply(normalize(images_uint8)), axis=-1)


def _pairs(value, n: int, name: str) -> tuple:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name}={value!r}: expected {n} values")
  return value


def _padding(padding, n: int):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"convolution padding {padding!r} is not supported by export")
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * n
  pads = tuple(padding)
  if len(pads) != n:
    raise ValueError(f"convolution padding {padding!r}: expected {n} entries")
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pads)


def _conv(module: nn.Conv, x: jax.Array) -> jax.Array:
  """nn.Conv as `lax.conv_general_dilated` (channels last), plus the bias when it has one.

  Computed here rather than by nn.Conv itself: jaxkd's convolutions carry a CPU-specific
  implementation, and converters that substitute their own nn.Conv (jax2onnx) must see the
  folded bias.
  """
  params = module.variables["params"]
  kernel = params["kernel"]
  n = kernel.ndim - 2
  if getattr(module, "mask", None) is not None or x.ndim != n + 2:
    raise ValueError(f"convolution {'/'.join(module.path)}: a masked convolution or an input "
                     f"of shape {x.shape} (not [batch, *spatial, channels]) cannot be exported")
  dtype = module.dtype or jnp.result_type(x, kernel)
  spec = (0, n + 1) + tuple(range(1, n + 1))
  numbers = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=(n + 1, n) + tuple(range(n)),
                                     out_spec=spec)
  y = lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype),
      window_strides=_pairs(module.strides, n, "strides"), padding=_padding(module.padding, n),
      lhs_dilation=_pairs(module.input_dilation, n, "input_dilation"),
      rhs_dilation=_pairs(module.kernel_dilation, n, "kernel_dilation"),
      dimension_numbers=numbers, feature_group_count=module.feature_group_count)
  if "bias" in params:
    y = y + params["bias"].astype(y.dtype)
  return y


def _depthwise(module: DepthwiseConv, x: jax.Array) -> jax.Array:
  """DepthwiseConv as XLA's grouped convolution (as `xla_depthwise_conv2d`), plus any bias."""
  params = module.variables["params"]
  kernel = params["kernel"]
  pad = (module.kernel_size - 1) // 2
  y = lax.conv_general_dilated(x.astype(module.dtype), kernel.astype(module.dtype),
                               window_strides=(module.strides, module.strides),
                               padding=((pad, pad), (pad, pad)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               feature_group_count=x.shape[-1])
  if "bias" in params:
    y = y + params["bias"].astype(y.dtype)
  return y


def normalize(images_uint8: jax.Array) -> jax.Array:
  """uint8 pixels -> (x - 255 mean) / (255 std), float32, as the eval preprocessing does."""
  mean = np.asarray([m * 255.0 for m in MEAN_RGB], np.float32)
  std = np.asarray([s * 255.0 for s in STD_RGB], np.float32)
  return (images_uint8.astype(jnp.float32) - mean) / std


def fold_batchnorm(model: nn.Module, variables, image_size: int, *, check: bool = True,
                   atol: float = 1e-4) -> FoldedModel:
  """Folds every (convolution, BatchNorm) pair of `model` (see the module docstring).

  The arithmetic is float64 (NumPy), the result float32. With `check`, the folded model's
  logits on two random images must match the model's within `atol` times the largest
  logit magnitude (plus `atol`), else `FoldError` names the largest difference.
  """
  pairs = find_pairs(model, variables, image_size)
  tree = _mutable(jax.device_get(variables))
  params, stats = tree.get("params", {}), tree.get("batch_stats", {})
  for pair in pairs:
    conv, bn, bn_stats = _sub(params, pair.conv), _sub(params, pair.bn), _sub(stats, pair.bn)
    if conv is None or bn is None or bn_stats is None:
      raise FoldError(f"variables lack the convolution {'/'.join(pair.conv)} or the BatchNorm "
                      f"{'/'.join(pair.bn)} the model calls; are they this model's variables?")
    k = (np.asarray(bn["scale"], np.float64)
         / np.sqrt(np.asarray(bn_stats["var"], np.float64) + pair.epsilon))
    kernel = np.asarray(conv["kernel"], np.float64)
    bias = np.asarray(conv.get("bias", np.zeros(kernel.shape[-1])), np.float64)
    folded_bias = ((bias - np.asarray(bn_stats["mean"], np.float64)) * k
                   + np.asarray(bn["bias"], np.float64)).astype(np.float32)
    conv["kernel"] = (kernel * k).astype(np.float32)
    _pop(stats, pair.bn)
    if "bias" in conv:  # the convolution adds it itself
      conv["bias"] = folded_bias
      _pop(params, pair.bn)
    else:  # the folded BatchNorm adds it
      bn.clear()
      bn["bias"] = folded_bias
  if "batch_stats" in tree and not tree["batch_stats"]:
    del tree["batch_stats"]
  folded = FoldedModel(model=model, variables=tree, folded=frozenset(p.bn for p in pairs),
                       convs=frozenset(p.conv for p in pairs), image_size=int(image_size))
  if check:
    check_folded(folded, variables, atol=atol)
  return folded


def check_folded(folded: FoldedModel, variables, *, atol: float = 1e-4, seed: int = 0) -> float:
  """Largest |logit difference| between the folded and the original model on 2 random images."""
  size = folded.image_size
  x = jax.random.uniform(jax.random.key(seed), (2, size, size, 3), jnp.float32, 0.0, 255.0)
  x = normalize(x.astype(jnp.uint8))
  want = np.asarray(jax.jit(lambda v, x: folded.model.apply(v, x, train=False))(variables, x),
                    np.float64)
  got = np.asarray(jax.jit(lambda v, x: dataclasses.replace(folded, variables=v).apply(x))(
      folded.variables, x), np.float64)
  diff = float(np.max(np.abs(got - want)))
  if not diff <= atol * (1.0 + float(np.max(np.abs(want)))):
    raise FoldError(f"the folded model's logits differ from the model's by {diff:.3g} (largest "
                    f"logit {np.max(np.abs(want)):.3g}): a folded convolution's output is used "
                    "by more than its BatchNorm; export cannot fold this model")
  return diff
