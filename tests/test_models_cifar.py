"""CIFAR model families (jaxkd.models.cifar) against the mdistiller/CRD definitions.

Parameter counts are exact figures of the mdistiller PyTorch models; small
blocks are checked against float64 NumPy written from the PyTorch (NCHW)
definitions. Whole-model forwards are compiled only for one small member per
family (the deeper members are the same code with more blocks; their shapes
are checked with jax.eval_shape, which compiles nothing).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.models import cifar, layers  # noqa: F401  (cifar registers the models)
from jaxkd.models.cifar.shufflenetv1 import ShuffleV1Unit
from jaxkd.models.cifar.shufflenetv2 import ShuffleV2BasicUnit
from jaxkd.models.cifar.wrn import WideBasicBlock
from jaxkd.models.registry import create, names

# Trainable parameters at num_classes=100 (BatchNorm running statistics excluded, as
# PyTorch's .parameters()). Source: counted with PyTorch 1.13 on models re-built from
# mdistiller's definitions (megvii-research/mdistiller, mdistiller/models/cifar/*.py at
# commit e8c5bb3: resnet.py, wrn.py, vgg.py with batch_norm=True, mobilenetv2.py
# mobile_half, ShuffleNetv1.py ShuffleV1, ShuffleNetv2.py ShuffleV2). Hand check of
# resnet20: stem 3*16*9 + 32 = 464; stage1 6 * (16*16*9 + 32) = 14,016; stage2
# 4,672 + 5 * 9,280 + projection (16*32 + 64) = 51,648; stage3 18,560 + 5 * 36,992
# + projection (32*64 + 128) = 205,696; fc 64*100 + 100 = 6,500; total 278,324.
# Rounded, these are the figures papers quote (resnet56 0.86M, resnet110 1.74M,
# resnet32x4 7.43M, wrn_40_2 2.26M, vgg13 9.46M, ShuffleV2 1.36M, ...).
MDISTILLER_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}

# Stage shapes (H, W, C) at 32x32 input: mdistiller's feats[1:] (NCHW there), then the embedding
# width.
_R16 = [(32, 32, 16), (16, 16, 32), (8, 8, 64)]
_R64 = [(32, 32, 64), (16, 16, 128), (8, 8, 256)]
_W2 = [(32, 32, 32), (16, 16, 64), (8, 8, 128)]
_VGG = [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]
EXPECTED_FEATURES = {
    **{f"resnet{d}": (_R16, 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (_R64, 256),
    "resnet32x4": (_R64, 256),
    "wrn_16_2": (_W2, 128),
    "wrn_40_1": (_R16, 64),
    "wrn_40_2": (_W2, 128),
    "vgg8": (_VGG, 512),
    "vgg13": (_VGG, 512),
    "mobilenetv2": ([(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], 1280),
    "shufflenetv1": ([(16, 16, 240), (8, 8, 480), (4, 4, 960)], 960),
    "shufflenetv2": ([(16, 16, 116), (8, 8, 232), (4, 4, 464)], 1024),
}

# One small member per family is really compiled and run.
FORWARD_MODELS = ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2"]

_X = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_all_cifar_models_registered():
  assert set(MDISTILLER_PARAMS) <= set(names())


@pytest.mark.parametrize("name", sorted(MDISTILLER_PARAMS))
def test_param_count_and_feature_shapes(name):
  model = create(name, num_classes=100)
  variables = jax.eval_shape(model.init, jax.random.key(0), _X)
  assert _count(variables["params"]) == MDISTILLER_PARAMS[name]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True),
                                 variables, _X)
  stages, width = EXPECTED_FEATURES[name]
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  assert set(feats) == {f"stage{i}" for i in range(1, len(stages) + 1)} | {"embedding"}
  for i, hwc in enumerate(stages, start=1):
    assert feats[f"stage{i}"].shape == (2, *hwc), (i, feats[f"stage{i}"].shape)
  assert feats["embedding"].shape == (2, width)

  # Training mode updates exactly the BatchNorm statistics.
  out, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, _X)
  assert out.shape == (2, 100)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def _random_variables(shapes, seed: int = 0):
  """Host-side random values for every variable (no compiled init): kernels N(0, 1/fan_in),
  BN scale and running variance U(0.5, 1.5), biases and running means N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if leaf in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_features_and_bf16(name):
  model = create(name, num_classes=100)
  model_bf16 = create(name, num_classes=100, dtype=jnp.bfloat16)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), _X))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  @jax.jit
  def run(v, x):
    return (model.apply(v, x), model.apply(v, x, return_features=True), model_bf16.apply(v, x))

  logits, (logits_f, feats), logits_bf16 = run(variables, x)
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(np.asarray(logits)) > 0
  np.testing.assert_array_equal(np.asarray(logits_f), np.asarray(logits))
  for value in feats.values():
    assert np.all(np.isfinite(np.asarray(value, np.float32)))
  assert logits_bf16.dtype == jnp.float32 and logits_bf16.shape == (2, 100)
  assert np.all(np.isfinite(logits_bf16))


# ---------------------------------------------------------------------------------------------
# Block-level checks against float64 NumPy written in PyTorch's NCHW terms.


def _np_conv(x, w_hwio, stride=1, groups=1):
  """torch.nn.functional.conv2d(x [N,C,H,W], w [O,C/g,k,k], stride, padding=(k-1)//2, groups)."""
  w = np.transpose(w_hwio, (3, 2, 0, 1)).astype(np.float64)  # -> OIHW
  out_c, in_per_group, k, _ = w.shape
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, _, hp, wp = xp.shape
  ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
  out = np.zeros((n, out_c, ho, wo))
  out_per_group = out_c // groups
  for g in range(groups):
    xs = xp[:, g * in_per_group:(g + 1) * in_per_group]
    ws = w[g * out_per_group:(g + 1) * out_per_group]
    for i in range(k):
      for j in range(k):
        patch = xs[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
        out[:, g * out_per_group:(g + 1) * out_per_group] += np.einsum(
            "nchw,oc->nohw", patch, ws[:, :, i, j])
  return out


def _np_bn(x, params, stats):
  """Inference BatchNorm, eps 1e-5: (x - mean) / sqrt(var + eps) * scale + bias over channel
  axis 1."""
  shape = (1, -1, 1, 1)
  mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
  scale = np.asarray(params["scale"], np.float64).reshape(shape)
  bias = np.asarray(params["bias"], np.float64).reshape(shape)
  return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * scale + bias


def _np_shuffle(x, groups):
  """ShuffleNet channel shuffle as PyTorch defines it: [N,g,C/g,H,W] -> swap axes 1,2 ->
  [N,C,H,W]."""
  n, c, h, w = x.shape
  return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _np_avg_pool_3x3_s2_p1(x):
  """AvgPool2d(3, stride=2, padding=1) with PyTorch's default count_include_pad=True (divide
  by 9)."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  ho, wo = (xp.shape[2] - 3) // 2 + 1, (xp.shape[3] - 3) // 2 + 1
  return sum(xp[:, :, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2]
             for i in range(3) for j in range(3)) / 9.0


# The constructors a block receives from its network (eval mode: running statistics).
_CONV = layers.conv
_DEPTHWISE = layers.DepthwiseConv
_NORM = layers.batch_norm(False)


def _run_block(block, x_nhwc):
  variables = _random_variables(jax.eval_shape(block.init, jax.random.key(0), x_nhwc), seed=3)
  y = jax.jit(block.apply)(variables, x_nhwc)
  x = np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2))
  y = np.transpose(np.asarray(y, np.float64), (0, 3, 1, 2))
  return variables["params"], variables["batch_stats"], x, y


def _relu(x):
  return np.maximum(x, 0.0)


def test_wrn_projection_block_matches_numpy():
  """mdistiller WRN block with in != out: a = relu(bn1(x));
  y = conv1x1_s(a) + conv2(relu(bn2(conv1_s(a))))."""
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
  p, s, xn, y = _run_block(WideBasicBlock(8, conv=_CONV, norm=_NORM, strides=2), x)
  a = _relu(_np_bn(xn, p["bn1"], s["bn1"]))
  h = _relu(_np_bn(_np_conv(a, p["conv1"]["kernel"], 2), p["bn2"], s["bn2"]))
  out = _np_conv(h, p["conv2"]["kernel"])
  expected = _np_conv(a, p["shortcut_conv"]["kernel"], 2) + out
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_shufflenetv1_stride2_unit_matches_numpy():
  """ShuffleV1 stride-2 unit: grouped 1x1, shuffle, depthwise 3x3/2, grouped 1x1, concat with
  avg pool."""
  groups, out_planes = 3, 12
  x = jax.random.normal(jax.random.key(4), (2, 6, 6, 12))
  unit = ShuffleV1Unit(out_planes, strides=2, groups=groups, conv=_CONV,
                       depthwise_conv=_DEPTHWISE, norm=_NORM)
  p, s, xn, y = _run_block(unit, x)
  h = _relu(_np_bn(_np_conv(xn, p["conv1"]["kernel"], groups=groups), p["bn1"], s["bn1"]))
  h = _np_shuffle(h, groups)
  h = _relu(_np_bn(_np_conv(h, p["conv2"]["kernel"], 2, groups=h.shape[1]), p["bn2"], s["bn2"]))
  h = _np_bn(_np_conv(h, p["conv3"]["kernel"], groups=groups), p["bn3"], s["bn3"])
  expected = _relu(np.concatenate([h, _np_avg_pool_3x3_s2_p1(xn)], axis=1))
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_shufflenetv2_basic_unit_matches_numpy():
  """ShuffleV2 unit: x1, x2 = first/second half of channels; shuffle_2(concat[x1, branch(x2)])."""
  x = jax.random.normal(jax.random.key(5), (2, 5, 5, 8))
  unit = ShuffleV2BasicUnit(conv=_CONV, depthwise_conv=_DEPTHWISE, norm=_NORM)
  p, s, xn, y = _run_block(unit, x)
  x1, x2 = xn[:, :4], xn[:, 4:]
  b = _relu(_np_bn(_np_conv(x2, p["conv1"]["kernel"]), p["bn1"], s["bn1"]))
  b = _np_bn(_np_conv(b, p["conv2"]["kernel"], groups=4), p["bn2"], s["bn2"])
  b = _relu(_np_bn(_np_conv(b, p["conv3"]["kernel"]), p["bn3"], s["bn3"]))
  expected = _np_shuffle(np.concatenate([x1, b], axis=1), 2)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
