"""Attention modules against NumPy float64 computations written from the papers' formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd.models import attention

RTOL = 1e-5
ATOL = 1e-6


def _input(channels: int, seed: int = 0, height: int = 7, width: int = 5) -> np.ndarray:
  """[2, H, W, C] with per-channel offsets and scales (non-square so H/W mix-ups show)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, height, width, channels))
  return (x * rng.uniform(0.5, 2.0, size=channels) + rng.normal(size=channels)).astype(np.float32)


def _randomize(variables, seed: int, scale: float = 0.5):
  """Replaces every parameter by N(0, scale^2) so gates leave their near-constant init regime."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=scale, size=p.shape), jnp.float32),
                      variables)


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def test_eca_kernel_size_hand_worked():
  # t = int(|log2(C) + 1| / 2); k = t if odd else t + 1
  # C=16: (4+1)/2 = 2.5 -> 2 -> 3      C=64: (6+1)/2 = 3.5 -> 3 -> 3
  # C=128: (7+1)/2 = 4 -> 5            C=256: (8+1)/2 = 4.5 -> 4 -> 5
  # C=512: (9+1)/2 = 5 -> 5            C=960: (9.907+1)/2 = 5.45 -> 5 -> 5
  expected = {16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 960: 5}
  assert {c: attention.eca_kernel_size(c) for c in expected} == expected
  # gamma/b change it: C=256, gamma=1 -> t = 9 -> 9
  assert attention.eca_kernel_size(256, gamma=1) == 9


def test_make_divisible_matches_mobilenet_se_widths():
  # torchvision's SE widths in MobileNetV3-Large: expanded 72 -> 24, 120 -> 32, 480 -> 120,
  # 672 -> 168, 960 -> 240
  # (72 // 4 = 18 rounds down to 16, which is < 0.9 * 18, so it goes up to 24).
  widths = [attention.make_divisible(c // 4, 8) for c in (72, 120, 480, 672, 960)]
  assert widths == [24, 32, 120, 168, 240]
  assert attention.make_divisible(4, 8) == 8  # minimum is the divisor


def test_eca_matches_numpy():
  x = _input(64)
  module = attention.ECA()
  variables = _randomize(module.init(jax.random.key(0), x), seed=1)
  w = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
  assert w.shape == (3, 1, 1)  # k = 3 for C = 64
  w = w[:, 0, 0]
  k = len(w)
  pooled = x.astype(np.float64).mean(axis=(1, 2))  # [B, C]
  padded = np.pad(pooled, ((0, 0), ((k - 1) // 2, (k - 1) // 2)))
  # cross-correlation along channels
  y = sum(w[j] * padded[:, j:j + pooled.shape[1]] for j in range(k))
  expected = x * _sigmoid(y)[:, None, None, :]
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=RTOL, atol=ATOL)


def test_se_matches_numpy():
  x = _input(40, seed=2)
  module = attention.SE()
  variables = _randomize(module.init(jax.random.key(0), x), seed=3, scale=1.0)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  assert p["fc1"]["kernel"].shape == (1, 1, 40, 16)  # make_divisible(40 / 4 = 10) -> 8 < 9 -> 16
  s = x.astype(np.float64).mean(axis=(1, 2))
  h = np.maximum(s @ p["fc1"]["kernel"][0, 0] + p["fc1"]["bias"], 0.0)
  z = h @ p["fc2"]["kernel"][0, 0] + p["fc2"]["bias"]
  gate = np.clip(z + 3.0, 0.0, 6.0) / 6.0
  assert (gate == 0).any() or (gate == 1).any() or np.ptp(gate) > 0.3  # the gate is not constant
  np.testing.assert_allclose(module.apply(variables, x), x * gate[:, None, None, :], rtol=RTOL,
                             atol=ATOL)


def test_cbam_matches_numpy():
  x = _input(48, seed=4, height=9, width=8)
  module = attention.CBAM()
  variables = _randomize(module.init(jax.random.key(0), x), seed=5)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  assert p["mlp_fc1"]["kernel"].shape == (48, 3)  # reduction 16
  assert p["spatial_conv"]["kernel"].shape == (7, 7, 2, 1)
  xd = x.astype(np.float64)

  def mlp(v):
    hidden = np.maximum(v @ p["mlp_fc1"]["kernel"] + p["mlp_fc1"]["bias"], 0.0)
    return hidden @ p["mlp_fc2"]["kernel"] + p["mlp_fc2"]["bias"]

  xc = xd * _sigmoid(mlp(xd.mean(axis=(1, 2))) + mlp(xd.max(axis=(1, 2))))[:, None, None, :]
  desc = np.stack([xc.max(axis=-1), xc.mean(axis=-1)], axis=-1)  # [B, H, W, 2]: max, mean
  padded = np.pad(desc, ((0, 0), (3, 3), (3, 3), (0, 0)))
  kernel = p["spatial_conv"]["kernel"][:, :, :, 0]  # [7, 7, 2]
  b, h, w, _ = desc.shape
  s = np.zeros((b, h, w))
  for i in range(h):
    for j in range(w):
      s[:, i, j] = np.einsum("bklc,klc->b", padded[:, i:i + 7, j:j + 7, :], kernel)
  expected = xc * _sigmoid(s)[..., None]
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=RTOL, atol=ATOL)


def test_simam_matches_numpy():
  x = _input(12, seed=6)
  module = attention.SimAM()
  variables = module.init(jax.random.key(0), x)
  assert not jax.tree.leaves(variables)  # parameter-free
  xd = x.astype(np.float64)
  n = x.shape[1] * x.shape[2]
  d = (xd - xd.mean(axis=(1, 2), keepdims=True)) ** 2
  var = d.sum(axis=(1, 2), keepdims=True) / (n - 1)  # sample variance, as the authors' code
  energy = d / (4.0 * (var + 1e-4)) + 0.5
  np.testing.assert_allclose(module.apply(variables, x), xd * _sigmoid(energy), rtol=RTOL,
                             atol=ATOL)
  # 1x1 maps: x - mu = 0 everywhere, so the gate is sigmoid(0.5) (no 0/0).
  one = _input(5, seed=7, height=1, width=1)
  np.testing.assert_allclose(module.apply({}, one), one * _sigmoid(0.5), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["se", "eca", "cbam", "simam"])
def test_bfloat16_input_keeps_dtype_and_float32_gate(kind):
  x = _input(32, seed=8)
  module = attention.make_attention(kind)
  variables = module.init(jax.random.key(0), x)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = module.apply(variables, xb)
  assert out.dtype == jnp.bfloat16
  # same rounded input, float32 path
  ref = np.asarray(module.apply(variables, xb.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_make_attention_kinds():
  x = _input(16, seed=9)
  assert isinstance(attention.make_attention("none"), attention.Identity)
  assert isinstance(attention.make_attention(None), attention.Identity)
  np.testing.assert_array_equal(attention.make_attention("none").apply({}, x), x)
  assert isinstance(attention.make_attention("eca", kernel_size=5), attention.ECA)
  with pytest.raises(ValueError, match="unknown attention kind 'bam'"):
    attention.make_attention("bam")
