"""ImageNet-style models (torchvision ResNets, MobileNetV3s) against published sizes and compute.

Parameter counts are torchvision's (`sum(p.numel() for p in model.parameters())`), MACs the
published 4.09 G (ResNet-50) / 0.22 G (MobileNetV3-Large) at 224 px. Forward passes use small images
and NumPy-filled variables (Flax's `init` of a whole network is slow to compile on CPU and not what
is tested).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models
from jaxkd.models.cost import count_macs

IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101",
                   "mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3_large_eca"]
SIZE = 64


def _param_count(name: str, num_classes: int = 1000, **kwargs) -> int:
  model = models.create(name, num_classes=num_classes, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))


def _flat(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def _random_variables(model, images, seed: int = 0):
  """Variables with the model's tree structure, filled from NumPy: He-normal (fan-in) kernels, BN
  scale near 1, small biases, running mean 0 / var 1."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(images.shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) * math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = rng.uniform(0.8, 1.2, size=leaf.shape)
    elif name == "bias":
      value = rng.normal(scale=0.1, size=leaf.shape)
    elif name == "mean":
      value = np.zeros(leaf.shape)
    elif name == "var":
      value = np.ones(leaf.shape)
    else:
      raise AssertionError(f"unexpected variable {path}")
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(batch: int = 2, size: int = SIZE, seed: int = 1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def test_registered():
  assert set(IMAGENET_MODELS) <= set(models.names())


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("mobilenet_v3_large", 5_483_032), ("mobilenet_v3_small", 2_542_856)])
def test_param_counts_match_torchvision(name, expected):
  assert _param_count(name) == expected


def test_mobilenet_v3_large_eca_param_count():
  # Large at 101 classes: 5,483,032 - (1280*1000 + 1000) + (1280*101 + 101) = 4,331,413, plus five
  # ECA kernels (3 + 3 + 3 + 3 + 5 for 16, 24, 40, 112, 960 channels) = 4,331,430. At 1000 classes
  # it is 5,483,049, the Food-101 distillation paper's "5-6 M"; at Food-101's 101 classes 4.33 M.
  assert _param_count("mobilenet_v3_large_eca", num_classes=101) == 4_331_430
  assert _param_count("mobilenet_v3_large_eca") == 5_483_049


def test_mobilenet_v3_factories_take_their_options():
  from jaxkd.models.mobilenetv3 import LARGE, SMALL
  fields = ("config", "last_channel", "num_classes", "width_mult", "dropout", "attention",
            "stage_attention", "bn_momentum", "bn_axis_name", "dtype")
  cases = [
      ("mobilenet_v3_large", {}, (LARGE, 1280, 7, 1.0, 0.2, "se", None, 0.99, None, jnp.float32)),
      ("mobilenet_v3_small", {"width_mult": 0.5, "bn_momentum": 0.9, "stage_attention": "simam"},
       (SMALL, 1024, 7, 0.5, 0.2, "se", "simam", 0.9, None, jnp.float32)),
      ("mobilenet_v3_large_eca", {"attention": "cbam", "dropout": 0.1, "bn_axis_name": "batch"},
       (LARGE, 1280, 7, 1.0, 0.1, "cbam", "eca", 0.99, "batch", jnp.float32)),
  ]
  for name, kwargs, expected in cases:
    model = models.create(name, num_classes=7, **kwargs)
    assert tuple(getattr(model, f) for f in fields) == expected, name
  # mobilenet_v3_large_eca fixes its stage attention; unknown options are refused by every factory
  with pytest.raises(TypeError, match="stage_attention"):
    models.create("mobilenet_v3_large_eca", num_classes=7, stage_attention="se")
  with pytest.raises(TypeError, match="widthmult"):
    models.create("mobilenet_v3_small", num_classes=7, widthmult=0.5)


def test_width_mult_changes_channels():
  # width 0.5: stem 16*0.5 -> 8, last block 160*0.5 = 80 -> last conv 480, classifier 1280*0.5 = 640
  model = models.create("mobilenet_v3_large", num_classes=10, width_mult=0.5)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
  assert flat["params/features_0/conv/kernel"].shape == (3, 3, 3, 8)
  assert flat["params/features_16/conv/kernel"].shape == (1, 1, 80, 480)
  assert flat["params/classifier_0/kernel"].shape == (480, 640)


def test_torchvision_names_and_shapes():
  # Hand-picked torchvision keys (shape after the documented transposes) -> Flax paths.
  r50 = _flat(jax.eval_shape(models.create("resnet50", num_classes=1000).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)))
  assert r50["params/conv1/kernel"].shape == (7, 7, 3, 64)           # conv1.weight [64, 3, 7, 7]
  assert r50["batch_stats/bn1/var"].shape == (64,)                    # bn1.running_var
  # layer1.0.downsample.0.weight
  assert r50["params/layer1_0/downsample_conv/kernel"].shape == (1, 1, 64, 256)
  assert r50["params/layer2_0/conv2/kernel"].shape == (3, 3, 128, 128)  # layer2.0.conv2.weight
  assert r50["params/layer4_2/bn3/scale"].shape == (2048,)            # layer4.2.bn3.weight
  assert r50["params/fc/kernel"].shape == (2048, 1000)                # fc.weight [1000, 2048]
  assert "params/layer2_1/downsample_conv/kernel" not in r50
  mv3 = _flat(jax.eval_shape(models.create("mobilenet_v3_large", num_classes=1000).init,
                             jax.random.key(0),
                             jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)))
  expected = {
      "params/features_0/conv/kernel": (3, 3, 3, 16),           # features.0.0.weight
      "params/features_0/bn/scale": (16,),                      # features.0.1.weight
      # features.1.block.0.0.weight (depthwise)
      "params/features_1/block_0/conv/kernel": (3, 3, 1, 16),
      # features.1.block.1.0.weight (project)
      "params/features_1/block_1/conv/kernel": (1, 1, 16, 16),
      # features.2.block.0.0.weight (expand)
      "params/features_2/block_0/conv/kernel": (1, 1, 16, 64),
      "params/features_4/block_1/conv/kernel": (5, 5, 1, 72),   # features.4.block.1.0.weight
      "params/features_4/block_2/fc1/kernel": (1, 1, 72, 24),   # features.4.block.2.fc1.weight
      "params/features_4/block_2/fc2/bias": (72,),              # features.4.block.2.fc2.bias
      "params/features_4/block_3/conv/kernel": (1, 1, 72, 40),  # features.4.block.3.0.weight
      "batch_stats/features_15/block_3/bn/mean": (160,),        # features.15.block.3.1.running_mean
      "params/features_16/conv/kernel": (1, 1, 160, 960),       # features.16.0.weight
      "params/classifier_0/kernel": (960, 1280),                # classifier.0.weight [1280, 960]
      "params/classifier_3/kernel": (1280, 1000),               # classifier.3.weight [1000, 1280]
  }
  assert {k: mv3[k].shape for k in expected} == expected
  # no SE in features.7: the projection is block.2
  assert "params/features_7/block_3/conv/kernel" not in mv3


@pytest.mark.parametrize("name,published", [("resnet50", 4.09e9), ("mobilenet_v3_large", 0.22e9)])
def test_macs_match_published(name, published):
  result = models.cost(name, image_size=224, num_classes=1000)
  assert abs(result["macs"] / published - 1) < 0.03, result
  # XLA's own count of the compiled program is of the same size (cost.py says why it is not
  # identical).
  assert abs(result["xla_macs"] / result["macs"] - 1) < 0.06, result
  assert result["params"] == _param_count(name)


def test_count_macs_by_hand():
  import flax.linen as nn

  from jaxkd.models.layers import DepthwiseConv

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x)   # 8x8x8 out, 3*3*3 taps
      x = DepthwiseConv(5, strides=1)(x)                                  # 8x8x8 out, 5*5 taps
      return nn.Dense(10)(x.mean(axis=(1, 2)))                            # 10 out, 8 in

  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(Tiny().init, jax.random.key(0), images)
  assert count_macs(Tiny(), variables, images) == 8 * 8 * 8 * 27 + 8 * 8 * 8 * 25 + 10 * 8


# Every registered ImageNet model plus the attention options (inside blocks and at stage ends).
VARIANTS = [(name, {}) for name in IMAGENET_MODELS] + [
    ("mobilenet_v3_large", {"attention": "eca"}),
    ("mobilenet_v3_large", {"attention": "cbam"}),
    ("mobilenet_v3_large", {"attention": "simam"}),
    ("mobilenet_v3_large", {"attention": "none"}),
    ("mobilenet_v3_large", {"stage_attention": "cbam"}),
    ("mobilenet_v3_large", {"stage_attention": "simam"}),
    ("mobilenet_v3_large", {"stage_attention": "se"}),
    ("mobilenet_v3_small", {"attention": "eca", "stage_attention": "none"}),
]
# Variants actually run (compiling every one would take minutes on 2 cores); the others share their
# code paths and are checked by tracing (shapes) above. mobilenet_v3_large_eca runs in the bfloat16
# test.
COMPUTED = [("resnet18", {}), ("resnet50", {}), ("mobilenet_v3_large", {}),
            ("mobilenet_v3_small", {"attention": "cbam", "stage_attention": "simam"}),
            ("mobilenet_v3_small", {"attention": "simam", "stage_attention": "eca"})]

STAGES = {
    "resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048],
    "mobilenet_v3_large": [16, 24, 40, 112, 960], "mobilenet_v3_large_eca": [16, 24, 40, 112, 960],
    "mobilenet_v3_small": [16, 16, 24, 48, 576],
}
EMBEDDING = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
             "mobilenet_v3_large": 1280, "mobilenet_v3_large_eca": 1280, "mobilenet_v3_small": 1024}


def _expected_features(name: str, batch: int = 2) -> dict:
  strides = [4, 8, 16, 32] if name.startswith("resnet") else [2, 4, 8, 16, 32]
  expected = {f"stage{s + 1}": (batch, SIZE // stride, SIZE // stride, c)
              for s, (stride, c) in enumerate(zip(strides, STAGES[name]))}
  expected["embedding"] = (batch, EMBEDDING[name])
  return expected


def _both_outputs(model):
  """One program computing the plain call and the return_features call."""
  return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=lambda v: str(v))
def test_output_and_feature_shapes(name, kwargs):
  model = models.create(name, num_classes=7, **kwargs)
  images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits, (feat_logits, feats) = jax.eval_shape(_both_outputs(model), variables, images)
  assert logits.shape == feat_logits.shape == (2, 7)
  assert logits.dtype == feat_logits.dtype == jnp.float32
  assert {k: v.shape for k, v in feats.items()} == _expected_features(name)


def test_stage_attention_parameters():
  # ECA at the end of the five stages of the large model: kernels 3, 3, 3, 3, 5 (16, 24, 40, 112,
  # 960 channels).
  model = models.create("mobilenet_v3_large_eca", num_classes=10)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)))
  assert {k: v.shape for k, v in flat.items() if "attention" in k} == {
      f"params/stage{s}_attention/conv/kernel": (k, 1, 1)
      for s, k in zip(range(1, 6), (3, 3, 3, 3, 5))}


@pytest.mark.parametrize("name,kwargs", COMPUTED, ids=lambda v: str(v))
def test_forward_finite_and_features_consistent(name, kwargs):
  model = models.create(name, num_classes=7, **kwargs)
  images = _images()
  variables = _random_variables(model, images)
  logits, (feat_logits, feats) = _both_outputs(model)(variables, images)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert np.std(np.asarray(logits)) > 1e-3
  np.testing.assert_array_equal(np.asarray(feat_logits), np.asarray(logits))
  assert {k: v.shape for k, v in feats.items()} == _expected_features(name)
  assert all(np.isfinite(np.asarray(v)).all() for v in feats.values())


def test_dropout_only_in_train_mode():
  model = models.create("mobilenet_v3_small", num_classes=5)
  images = _images(size=32)
  variables = _random_variables(model, images)
  with pytest.raises(Exception, match="dropout"):  # train mode needs the 'dropout' rng (traced)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   variables, images)
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": key})[0])
  a = train(variables, images, jax.random.key(1))
  b = train(variables, images, jax.random.key(2))
  assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large_eca"])
def test_bfloat16_close_to_float32(name):
  """Eval mode with running statistics mean 0 / var 1 and He-normal (fan-in) random kernels:
  activations stay O(1)-O(100) and logits are far from 0, so the relative error measures bf16
  rounding through the whole net. (Calibrating the BN statistics to a 2-image batch is not used:
  random normalised nets are chaotic, any perturbation -- bf16 or not -- grows with depth.) Bound:
  with bf16 rounding after every op (XLA_FLAGS=--xla_allow_excess_precision=false) XLA's own
  convolutions give 2.7% (MobileNetV3) and 0.8% (ResNet-50); XLA keeps some intermediates in
  float32 by default, so measured errors are at most that; a layer computed wrongly in bf16 gives
  O(1)."""
  images = _images(seed=3)
  f32 = models.create(name, num_classes=10)
  b16 = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  variables = _random_variables(f32, images, seed=4)
  ref, out = jax.jit(lambda v, x: (f32.apply(v, x), b16.apply(v, x)))(variables, images)
  assert out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
  assert np.std(ref) > 0.5  # meaningful logits, not all ~0
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 4e-2
