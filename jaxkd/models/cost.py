"""Model size and compute: parameter count, multiply-accumulates and XLA's FLOP count.

`cost(name, image_size=..., num_classes=...)` returns

- `params`: number of trainable parameters (the `params` collection; BatchNorm running statistics
  excluded, as in PyTorch's `sum(p.numel() for p in model.parameters())`), from `jax.eval_shape`
  of `init` (no compute).
- `macs`: multiply-accumulates of the convolutions and dense layers for one image (batch 1),
  counted analytically the way published tables (torchvision, ptflops, fvcore, the papers) count
  them: conv = output elements x kernel taps x input channels per group (padded taps included),
  dense = output elements x input features; BatchNorm, activations, pooling, residual adds are
  not counted. Every `nn.Conv`, `nn.Dense` and `layers.DepthwiseConv` call is intercepted under
  `jax.eval_shape` (no compute), so the count does not depend on how DepthwiseConv is implemented.
- `flops` (only with `xla=True`, the default): XLA's own count for the compiled float32 forward
  pass (eval mode, batch 1), with depthwise convolutions lowered as XLA's grouped convolution on
  every backend (the CPU fast path's shifted-slice sums would otherwise be counted as +9% on
  MobileNetV3-Large), `jax.jit(apply).lower(...).compile().cost_analysis()['flops']` (on jax
  0.10.2 / XLA:CPU a dict; older versions return a list of dicts, which are summed).
- `xla_macs` = flops / 2 (with `xla=True`).

`cost(..., xla=False)` gives `params` and `macs` only, without compiling anything (what the
report shows): the same two numbers as with `xla=True`.

Why `macs` is not flops / 2: XLA's count differs from the convention in two ways. (1) It counts
every floating-point op of the fused program: BatchNorm's scale/shift, activations (hard-swish is
several ops per element), pooling, residual adds -- which adds a few percent on MobileNets. (2)
For convolutions it counts 2 flops per multiply-add but only for kernel taps that fall inside the
unpadded input, so padded borders are not counted -- a few percent less on ResNets whose late
stages are 7x7 maps. Measured at 224 px, 1000 classes: ResNet-50 xla_macs 3.999 G (published
4.09 G, -2.2%), analytic 4.089 G; MobileNetV3-Large xla_macs 0.2273 G (+3.3% over the published
0.22 G), analytic 0.2166 G; MobileNetV3-Small xla_macs 0.0598 G, analytic 0.0565 G.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import registry
from jaxkd.models.depthwise import xla_depthwise_conv2d
from jaxkd.models.layers import DepthwiseConv


def _image_shape(image_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  if len(image_size) != 2:
    raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
  return int(image_size[0]), int(image_size[1])


def layer_macs(module: nn.Module, inputs: jax.Array, outputs: jax.Array) -> int:
  """MACs of one Conv / Dense / DepthwiseConv call from its input and output shapes (0 for other
  modules)."""
  out_elements = math.prod(outputs.shape)
  if isinstance(module, DepthwiseConv):
    return out_elements * module.kernel_size * module.kernel_size
  if isinstance(module, nn.Conv):
    kernel = (module.kernel_size if isinstance(module.kernel_size, Sequence)
              else (module.kernel_size,))
    groups = module.feature_group_count
    return out_elements * math.prod(kernel) * (inputs.shape[-1] // groups)
  if isinstance(module, nn.Dense):
    return out_elements * inputs.shape[-1]
  return 0


def count_macs(module: nn.Module, variables: Any, images: Any, **apply_kwargs) -> int:
  """Analytic conv + dense MACs of `module.apply(variables, images, **apply_kwargs)` (shapes only,
  no compute).

  `variables` and `images` may be arrays or `jax.ShapeDtypeStruct`s. Layers nested inside a
  counted layer are not counted again.
  """
  total = [0]
  depth = [0]
  counted = (nn.Conv, nn.Dense, DepthwiseConv)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not isinstance(context.module, counted):
      return next_fun(*args, **kwargs)
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    if depth[0] == 0:
      total[0] += layer_macs(context.module, args[0], out)
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return module.apply(v, x, **apply_kwargs)

  jax.eval_shape(run, variables, images)
  return total[0]


def _canonical_depthwise(next_fun, args, kwargs, context):
  """Runs DepthwiseConv as XLA's grouped convolution, whatever the backend's implementation.

  On CPU `depthwise_conv2d` computes shifted-slice sums (jaxkd.models.depthwise), which XLA's
  cost analysis counts differently from a convolution (pads and per-tap elementwise ops); the FLOP
  count reported by `cost` is that of the model as a convolutional network on every backend.
  """
  module = context.module
  if not isinstance(module, DepthwiseConv) or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  x = args[0]
  kernel = module.get_variable("params", "kernel")
  y = xla_depthwise_conv2d(x.astype(module.dtype), kernel.astype(module.dtype),
                           strides=module.strides, padding=(module.kernel_size - 1) // 2)
  if module.use_bias:
    y = y + module.get_variable("params", "bias").astype(module.dtype)
  return y


def xla_flops(compiled: Any) -> float:
  """'flops' from a compiled executable's cost analysis (dict, or list of dicts summed)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, dict):
    analysis = [analysis]
  if not analysis or any("flops" not in a for a in analysis):
    raise RuntimeError(f"XLA cost analysis has no 'flops' entry: {analysis!r}")
  return float(sum(a["flops"] for a in analysis))


def cost(name: str, *, image_size: int | Sequence[int], num_classes: int, xla: bool = True,
         **kwargs) -> dict:
  """{'params': int, 'macs': float, 'flops': float, 'xla_macs': float} of model `name` at batch 1.

  With `xla=False` only {'params', 'macs'} (shapes only: nothing is compiled). `kwargs` go to
  `registry.create` (e.g. width_mult, attention). See the module docstring for definitions.
  """
  height, width = _image_shape(image_size)
  model = registry.create(name, num_classes=num_classes, dtype=jnp.float32, **kwargs)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables.get("params", {})))
  macs = count_macs(model, variables, images, train=False)
  if not xla:
    return {"params": int(params), "macs": float(macs)}

  def forward(v, x):
    with nn.intercept_methods(_canonical_depthwise):
      return model.apply(v, x, train=False)

  compiled = jax.jit(forward).lower(variables, images).compile()
  flops = xla_flops(compiled)
  return {"params": int(params), "macs": float(macs), "flops": flops, "xla_macs": flops / 2.0}
