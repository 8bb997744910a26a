"""MobileNetV3-Large / -Small (Howard, Sandler, Chu, Chen, Chen, Tan, Wang, Zhu, Pang, Vasudevan,
Le and Adam, "Searching for MobileNetV3", ICCV 2019) as torchvision builds them.

Architecture (torchvision `mobilenet_v3_large` / `mobilenet_v3_small`, dilation 1):
  features.0   3x3/2 conv -> BN -> hard-swish (16 channels x width)
  features.1.. InvertedResidual blocks from the config tables below:
               [1x1 expand conv-BN-act if expanded != input] -> kxk depthwise conv-BN-act
               (stride) -> [SE if the table says so] -> 1x1 project conv-BN; residual when
               stride 1 and in == out. act = ReLU ('RE') or hard-swish ('HS');
               SE squeeze = make_divisible(expanded // 4, 8), hard-sigmoid gate.
  features.L   1x1 conv -> BN -> hard-swish to 6 x the last block's channels (960 large, 576 small)
  avgpool -> classifier.0 Linear(960 -> 1280 | 576 -> 1024) -> hard-swish -> classifier.2
          Dropout(0.2) -> classifier.3 Linear(-> num_classes)
Channel counts are make_divisible(c * width_mult, 8), the classifier width too.
BatchNorm eps 1e-3, PyTorch momentum 0.01 (Flax momentum 0.99), torchvision's choice for long
ImageNet runs; `bn_momentum` (Flax convention) changes it: with 0.99 the running statistics need
thousands of steps to settle, so a run of a few hundred steps evaluates with stale statistics
(constant predictions); use 0.9 (PyTorch's default 0.1) for short runs. Convs: kaiming-normal
fan-out, no bias (SE 1x1 convs have a zero-initialised bias); Linear: N(0, 0.01), zero bias.
Dropout draws from the 'dropout' rng only when train=True.

Options:
  attention='se' (default, the paper) | 'eca' | 'cbam' | 'simam' | 'none': the module used inside
    the blocks whose table entry has SE (only those blocks).
  stage_attention=None | kind: an extra attention module at the end of every stage.
  A stage is the group of consecutive layers sharing one output resolution: stage s holds the
  layers with output stride 2**s. Large: stage1 = features.0-1 (16 ch, 112 px at 224 input),
  stage2 = features.2-3 (24 ch, 56), stage3 = features.4-6 (40 ch, 28), stage4 = features.7-12
  (112 ch, 14), stage5 = features.13-16 (960 ch, 7) -- the LAST STAGE ENDS WITH (includes) the 1x1
  last conv features.16. Small: stage1 = features.0 (16, 112), stage2 = features.1 (16, 56),
  stage3 = features.2-3 (24, 28), stage4 = features.4-8 (48, 14), stage5 = features.9-12 (576, 7).

One module, `MobileNetV3`, with the block table as a field; the variants are functools.partial of
it (`MobileNetV3Large`, `MobileNetV3Small`, `MobileNetV3LargeECA`). Registered models:
`mobilenet_v3_large`, `mobilenet_v3_small`, and `mobilenet_v3_large_eca`, the student of the
Food-101 distillation paper "A Lightweight Food Image Classification Model Based on Knowledge
Distillation and ECA Attention" (in Chinese: 基于知识蒸馏与 ECA 注意力机制的轻量级食品图像分类模型;
the paper names no authors, venue or year), "MobileNetV3-Large with an ECA module at the end of
each stage": an ECA module (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
Convolutional Neural Networks", CVPR 2020) after each of the five stages (stage_attention='eca')
and the SE of Howard et al. kept inside the blocks (the paper adds ECA; it does not say SE is
removed, and keeping SE keeps every ImageNet-pretrained weight usable). The five ECA modules add
3 + 3 + 3 + 3 + 5 = 17 parameters (kernel sizes for 16, 24, 40, 112, 960 channels).

Features (`return_features=True`): stage1..stage5 (after the stage attention, if any) and
`embedding`, the input of the last Linear: hard-swish(classifier.0(pooled)), 1280-d (large) /
1024-d (small), before dropout. Stage maps are in the compute dtype, the embedding and the logits
in float32.

Parameter naming (one-to-one with torchvision's state dict, '.' -> '_' for module indices):

  torchvision key                              Flax path
  features.0.0.weight                          features_0/conv/kernel
  features.0.1.{weight,bias}                   features_0/bn/{scale,bias}
  features.0.1.{running_mean,running_var}      batch_stats features_0/bn/{mean,var}
  features.N.block.M.0.weight                  features_N/block_M/conv/kernel
                                               (expand, depthwise or project)
  features.N.block.M.1.*                       features_N/block_M/bn/*
  features.N.block.M.fc1.{weight,bias}         features_N/block_M/fc1/{kernel,bias}   (SE)
  features.N.block.M.fc2.{weight,bias}         features_N/block_M/fc2/{kernel,bias}
  features.L.0.weight / features.L.1.*         features_L/conv/kernel / features_L/bn/*
                                               (L = 16 large, 12 small)
  classifier.0.{weight,bias}                   classifier_0/{kernel,bias}
  classifier.3.{weight,bias}                   classifier_3/{kernel,bias}
  *.num_batches_tracked                        (dropped)

Tensor layouts: conv weight [O, I/groups, kh, kw] -> kernel [kh, kw, I/groups, O] = transpose
(2, 3, 1, 0); this also maps a depthwise weight [C, 1, kh, kw] to DepthwiseConv's [kh, kw, 1, C]
and an SE 1x1 weight [S, C, 1, 1] to [1, 1, C, S]. Linear weight [O, I] -> kernel [I, O].
BN weight -> scale. Block-internal indices M are torchvision's: M counts expand (if any),
depthwise, SE (if the table has SE), project. With attention != 'se' the module in the SE slot
keeps the name block_M (ECA: block_M/conv/kernel; CBAM: block_M/mlp_fc1, mlp_fc2, spatial_conv;
SimAM and 'none' hold no parameters) and the projection keeps its torchvision index, so all non-SE
weights load unchanged. Stage attention modules are named stage{s}_attention (e.g.
stage3_attention/conv/kernel for ECA) and have no torchvision counterpart.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxkd.models import layers
from jaxkd.models.attention import ATTENTION_KINDS, hard_swish, make_attention, make_divisible
from jaxkd.models.layers import DepthwiseConv, ModuleDef
from jaxkd.models.registry import register

_BN_MOMENTUM = 0.99  # PyTorch momentum 0.01
_BN_EPS = 1e-3


class BlockConfig(NamedTuple):
  """One InvertedResidual row of torchvision's table (channels before width scaling)."""
  input_channels: int
  kernel: int
  expanded_channels: int
  out_channels: int
  use_se: bool
  activation: str  # 'RE' (ReLU) or 'HS' (hard-swish)
  stride: int


LARGE = (
    BlockConfig(16, 3, 16, 16, False, "RE", 1),
    BlockConfig(16, 3, 64, 24, False, "RE", 2),
    BlockConfig(24, 3, 72, 24, False, "RE", 1),
    BlockConfig(24, 5, 72, 40, True, "RE", 2),
    BlockConfig(40, 5, 120, 40, True, "RE", 1),
    BlockConfig(40, 5, 120, 40, True, "RE", 1),
    BlockConfig(40, 3, 240, 80, False, "HS", 2),
    BlockConfig(80, 3, 200, 80, False, "HS", 1),
    BlockConfig(80, 3, 184, 80, False, "HS", 1),
    BlockConfig(80, 3, 184, 80, False, "HS", 1),
    BlockConfig(80, 3, 480, 112, True, "HS", 1),
    BlockConfig(112, 3, 672, 112, True, "HS", 1),
    BlockConfig(112, 5, 672, 160, True, "HS", 2),
    BlockConfig(160, 5, 960, 160, True, "HS", 1),
    BlockConfig(160, 5, 960, 160, True, "HS", 1),
)
LARGE_LAST_CHANNEL = 1280

SMALL = (
    BlockConfig(16, 3, 16, 16, True, "RE", 2),
    BlockConfig(16, 3, 72, 24, False, "RE", 2),
    BlockConfig(24, 3, 88, 24, False, "RE", 1),
    BlockConfig(24, 5, 96, 40, True, "HS", 2),
    BlockConfig(40, 5, 240, 40, True, "HS", 1),
    BlockConfig(40, 5, 240, 40, True, "HS", 1),
    BlockConfig(40, 5, 120, 48, True, "HS", 1),
    BlockConfig(48, 5, 144, 48, True, "HS", 1),
    BlockConfig(48, 5, 288, 96, True, "HS", 2),
    BlockConfig(96, 5, 576, 96, True, "HS", 1),
    BlockConfig(96, 5, 576, 96, True, "HS", 1),
)
SMALL_LAST_CHANNEL = 1024


def _identity(x):
  return x


_ACTIVATIONS = {"RE": nn.relu, "HS": hard_swish, None: _identity}


class ConvBNAct(nn.Module):
  """conv (submodule `conv`) -> BN (`bn`) -> activation ('RE' | 'HS' | None).

  `conv` builds the convolution when called with `name` alone (a functools.partial with the
  features, kernel size and stride bound; a depthwise convolution for the depthwise layers).
  """
  conv: ModuleDef
  norm: ModuleDef
  activation: str | None = None

  @nn.compact
  def __call__(self, x):
    x = self.norm(name="bn")(self.conv(name="conv")(x))
    return _ACTIVATIONS[self.activation](x)


def _attention(kind: str, name: str, squeeze_channels: int | None = None) -> nn.Module:
  """Attention module; SE gets torchvision's squeeze width and MobileNetV3's init (kaiming
  fan-out, zero bias)."""
  if kind == "se":
    return make_attention("se", name=name, squeeze_channels=squeeze_channels,
                          kernel_init=layers.conv_kernel_init, bias_init=nn.initializers.zeros)
  return make_attention(kind, name=name)


class InvertedResidual(nn.Module):
  """MobileNetV3 bottleneck; submodules block_0.. follow torchvision's indices (module docstring).

  `conv`, `depthwise_conv` and `norm` are the network's constructors: `conv(features, kernel,
  strides=..., name=...)`, `depthwise_conv(kernel, strides=..., name=...)`, `norm(name=...)`.
  """
  config: BlockConfig  # already width-scaled
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef
  attention: str = "se"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    index = 0
    y = x
    if cfg.expanded_channels != cfg.input_channels:
      expand = functools.partial(self.conv, cfg.expanded_channels, 1)
      y = ConvBNAct(expand, self.norm, cfg.activation, name=f"block_{index}")(y)
      index += 1
    depthwise = functools.partial(self.depthwise_conv, cfg.kernel, strides=cfg.stride)
    y = ConvBNAct(depthwise, self.norm, cfg.activation, name=f"block_{index}")(y)
    index += 1
    if cfg.use_se:
      squeeze = make_divisible(cfg.expanded_channels // 4, 8)
      y = _attention(self.attention, f"block_{index}", squeeze)(y)
      index += 1
    project = functools.partial(self.conv, cfg.out_channels, 1)
    y = ConvBNAct(project, self.norm, None, name=f"block_{index}")(y)
    if cfg.stride == 1 and cfg.input_channels == cfg.out_channels:
      y = y + x
    return y


class MobileNetV3(nn.Module):
  """torchvision MobileNetV3 with optional attention swaps; see the module docstring.

  `config` is the block table (BlockConfig rows, unscaled: LARGE or SMALL), `last_channel` the
  classifier's hidden width (LARGE_LAST_CHANNEL or SMALL_LAST_CHANNEL), both before `width_mult`.
  """
  config: tuple  # tuple of BlockConfig (unscaled)
  last_channel: int
  num_classes: int = 1000
  width_mult: float = 1.0
  dropout: float = 0.2
  attention: str = "se"
  stage_attention: str | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = _BN_MOMENTUM

  def _scale(self, channels: float) -> int:
    return make_divisible(channels * self.width_mult, 8)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.stage_attention is not None and self.stage_attention not in ATTENTION_KINDS:
      raise ValueError(f"stage_attention must be None or one of {ATTENTION_KINDS}, "
                       f"got {self.stage_attention!r}")
    conv = functools.partial(layers.conv, dtype=self.dtype)
    depthwise_conv = functools.partial(DepthwiseConv, dtype=self.dtype)
    norm = layers.batch_norm(train, axis_name=self.bn_axis_name, momentum=self.bn_momentum,
                             epsilon=_BN_EPS, dtype=self.dtype)
    blocks = [BlockConfig(self._scale(c.input_channels), c.kernel,
                          self._scale(c.expanded_channels), self._scale(c.out_channels),
                          c.use_se, c.activation, c.stride) for c in self.config]
    # Layers in order as (stride, module); stages are derived from the cumulative stride.
    stem = functools.partial(conv, blocks[0].input_channels, 3, strides=2)
    layers_ = [(2, ConvBNAct(stem, norm, "HS", name="features_0"))]
    for i, cfg in enumerate(blocks, start=1):
      block = InvertedResidual(cfg, conv=conv, depthwise_conv=depthwise_conv, norm=norm,
                               attention=self.attention, name=f"features_{i}")
      layers_.append((cfg.stride, block))
    last_conv = functools.partial(conv, 6 * blocks[-1].out_channels, 1)
    layers_.append((1, ConvBNAct(last_conv, norm, "HS", name=f"features_{len(blocks) + 1}")))

    x = x.astype(self.dtype)
    features = {}
    stage = 0
    for position, (_, layer) in enumerate(layers_):
      x = layer(x)
      next_stride = layers_[position + 1][0] if position + 1 < len(layers_) else None
      if next_stride != 1:  # last layer at this resolution: the stage ends here
        stage += 1
        if self.stage_attention is not None:
          x = _attention(self.stage_attention, f"stage{stage}_attention")(x)
        features[f"stage{stage}"] = x

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, kernel_init=layers.linear_normal_init,
                      bias_init=nn.initializers.zeros, dtype=self.dtype,
                      param_dtype=jnp.float32, name=name)

    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    hidden = dense(self._scale(self.last_channel), "classifier_0")
    embedding = hard_swish(hidden(pooled.astype(self.dtype)))
    y = nn.Dropout(self.dropout, deterministic=not train)(embedding)
    logits = dense(self.num_classes, "classifier_3")(y).astype(jnp.float32)
    if return_features:
      features["embedding"] = embedding.astype(jnp.float32)
      return logits, features
    return logits


MobileNetV3Large = functools.partial(MobileNetV3, config=LARGE, last_channel=LARGE_LAST_CHANNEL)
MobileNetV3Small = functools.partial(MobileNetV3, config=SMALL, last_channel=SMALL_LAST_CHANNEL)
MobileNetV3LargeECA = functools.partial(MobileNetV3Large, stage_attention="eca")

# The options a registered factory passes on to MobileNetV3 (those its variant does not fix).
_OPTIONS = ("bn_axis_name", "width_mult", "dropout", "attention", "stage_attention", "bn_momentum")


def _register(name: str, variant: Callable[..., MobileNetV3], doc: str):
  """Registers `name` as a keyword-only factory of `variant` (a functools.partial of MobileNetV3)
  taking num_classes, dtype and the `_OPTIONS` the variant does not set itself."""
  options = tuple(o for o in _OPTIONS if o not in variant.keywords)

  def factory(*, num_classes: int, dtype: Any = jnp.float32, **kwargs: Any) -> MobileNetV3:
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
      raise TypeError(f"{name}() got unexpected keyword argument(s) {unknown}; it takes "
                      f"num_classes, dtype and {', '.join(options)}")
    return variant(num_classes=num_classes, dtype=dtype, **kwargs)

  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = f"{doc}\n\nKeyword arguments: num_classes, dtype, {', '.join(options)}."
  return register(name)(factory)


mobilenet_v3_large = _register(
    "mobilenet_v3_large", MobileNetV3Large,
    "MobileNetV3-Large (torchvision); 5,483,032 parameters at 1000 classes, width 1.")
mobilenet_v3_small = _register(
    "mobilenet_v3_small", MobileNetV3Small,
    "MobileNetV3-Small (torchvision); 2,542,856 parameters at 1000 classes, width 1.")
mobilenet_v3_large_eca = _register(
    "mobilenet_v3_large_eca", MobileNetV3LargeECA,
    "The Food-101 distillation paper's student: MobileNetV3-Large, SE inside the blocks, ECA at "
    "the end of each of the 5 stages (stage_attention fixed to 'eca').")
