"""Trainable modules that exist only for distillation: FitNets' hint regressor and the LSTM state
encoder of the "temporal" feature distillation.

Neither is part of a student network. The train step keeps their variables apart from the
student's, trains the student-side modules together with the student, and leaves them out of the
evaluated and exported student. Feature maps are NHWC, as `model.apply(...,
return_features=True)` returns them (stage1..stage4).

- `HintRegressor` (Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin
  Deep Nets", ICLR 2015): maps a student feature map to the teacher's channels (1x1 convolution,
  BatchNorm) and, if asked, to the teacher's spatial size (bilinear resize), for
  `jaxkd.losses.hint_loss`.
- `LSTMStateEncoder` (KAKAKA, "An innovative image classification scheme based on LSTM knowledge
  distillation", 2025 developer article, in Chinese): reads windows of consecutive rows of a
  feature map as short sequences and returns a bidirectional LSTM's final hidden and cell
  states, for `jaxkd.losses.lstm_state_loss`.

docs/methods.md gives the formulas, which parameters train, and the article's schedule.
"""
from __future__ import annotations

import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkd.models import layers, pointwise

__all__ = ["HintRegressor", "LSTMStateEncoder"]

_BN_MOMENTUM = 0.9  # Flax's convention: PyTorch's default momentum 0.1
_BN_EPS = 1e-5
_CONV_SIZE = 3  # the article's Conv3d(C, 256, kernel_size=3, padding=1)


def _check_nhwc(x: jax.Array, who: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{who} expects an NHWC feature map [batch, H, W, C], got shape {x.shape}")


def _size_pair(target_hw: Any) -> tuple[int, int]:
  """target_hw as a pair of Python ints >= 1, or ValueError naming it."""
  try:
    pair = tuple(operator.index(n) for n in target_hw)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) < 1:
    raise ValueError(f"HintRegressor target_hw must be two positive integers (H, W), got "
                     f"{target_hw!r}")
  return pair


class HintRegressor(nn.Module):
  """FitNets' regressor r (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): maps
  the student's hint-layer feature map onto the teacher's, r(F_s) = resize(BN(W * F_s)).

  - W: 1x1 convolution from the student's channels to `features` (the teacher's channels),
    PyTorch's default Conv2d initialisation (kaiming_uniform_(a=sqrt(5)), U(+-1/sqrt(C_s)),
    `layers.torch_kernel_init`); no bias when BatchNorm follows (BN's shift replaces it),
    otherwise a bias drawn from the same interval, as PyTorch.
  - BN (`use_bn`): BatchNorm over the batch and spatial positions, PyTorch's defaults (momentum
    0.1, i.e. Flax momentum 0.9; eps 1e-5); batch statistics when `train`, the running ones
    otherwise. Parameters `scale`, `bias` ("params"), statistics `mean`, `var` ("batch_stats"),
    as `flax.linen.BatchNorm` (jaxkd's `layers.batch_norm`, with a hand-written gradient).
  - resize: when `target_hw` is given and differs from the feature's (H, W), a bilinear resize
    to `target_hw` (jax.image.resize, 'bilinear', half-pixel centres). jax.image.resize
    antialiases: when downsampling it widens the triangle filter by the scale factor, so every
    output value is a weighted average of all the input positions it covers and every student
    position receives gradient; PyTorch's F.interpolate(mode='bilinear', antialias=False) would
    read only the 2x2 nearest positions and skip the rest. Upsampling is the same either way
    (align_corners=False with edge clamping). The same resize as the attention maps of
    `jaxkd.losses.attention_transfer_loss`.

  Variables: "params" {conv: {kernel [1, 1, C_s, features] (+ bias [features] without BN)},
  bn: {scale, bias [features]}}, "batch_stats" {bn: {mean, var [features]}}: C_s * features +
  2 * features parameters with BN. Call with `mutable=['batch_stats']` when `train`.

  __call__(x [B, H, W, C_s], *, train, target_hw=None) -> float32 [B, H', W', features],
  (H', W') = target_hw or (H, W). The convolution and BN compute in `dtype`.
  """
  features: int
  use_bn: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               target_hw: tuple[int, int] | None = None) -> jax.Array:
    _check_nhwc(x, "HintRegressor")
    if self.features < 1:
      raise ValueError(f"HintRegressor.features must be >= 1, got {self.features}")
    if target_hw is not None:
      target_hw = _size_pair(target_hw)
    fan_in = x.shape[-1]
    y = nn.Conv(self.features, (1, 1), padding="VALID", use_bias=not self.use_bn,
                kernel_init=layers.torch_kernel_init,
                bias_init=layers.torch_uniform_init(fan_in), dtype=self.dtype,
                param_dtype=jnp.float32, conv_general_dilated=pointwise.conv_general_dilated,
                name="conv")(x.astype(self.dtype))
    if self.use_bn:
      norm = layers.batch_norm(train, axis_name=self.bn_axis_name, momentum=_BN_MOMENTUM,
                               epsilon=_BN_EPS, dtype=self.dtype)
      y = norm(name="bn")(y)
    y = y.astype(jnp.float32)
    if target_hw is not None and y.shape[1:3] != target_hw:
      y = jax.image.resize(y, (y.shape[0],) + target_hw + (y.shape[-1],), method="bilinear")
    return y


class _WindowConv(nn.Module):
  """The 3x3 convolution over (window, W) of every window, followed by the mean over W, computed
  in the reverse order (both are linear): see `LSTMStateEncoder`. Parameters `kernel` [3, 3, C,
  features] (window offset, column offset, in, out; cross-correlation as nn.Conv) and `bias`
  [features], PyTorch's default Conv2d initialisation (U(+-1/sqrt(9 C)) for both)."""
  features: int
  window: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] float32 -> [B, H - window + 1, window, features] float32."""
    k = _CONV_SIZE
    _, height, width, channels = x.shape
    fan_in = k * k * channels
    kernel = self.param("kernel", layers.torch_kernel_init, (k, k, channels, self.features),
                        jnp.float32)
    bias = self.param("bias", layers.torch_uniform_init(fan_in), (self.features,), jnp.float32)
    # Mean over the W output columns of the column-shifted row (zero padding at the edges):
    # s[b, r, dw] = (1/W) sum_{w : 0 <= w + dw - 1 < W} x[b, r, w + dw - 1].
    # (For W = 1 the shifted sums are exactly 0: only the kernel's middle column sees data.)
    total = jnp.sum(x, axis=2)  # [B, H, C]
    s = jnp.stack([total - x[:, :, -1], total, total - x[:, :, 0]], axis=2) / width
    # q[b, r, dj] = sum_dw s[b, r, dw] @ kernel[dj, dw]: kernel row dj's response to row r.
    q = jnp.einsum("brwc,jwco->brjo", s, kernel, precision=jax.lax.Precision.HIGHEST)
    n = height - self.window + 1
    out = []
    for j in range(self.window):  # position in the window (time step)
      acc = jnp.broadcast_to(bias, (x.shape[0], n, self.features))
      for dj in range(k):
        offset = j + dj - (k - 1) // 2  # row of the window read by kernel row dj
        if 0 <= offset < self.window:  # rows outside the window are the zero padding
          acc = acc + q[:, offset:offset + n, dj]
      out.append(acc)
    return jnp.stack(out, axis=2)


def _torch_lstm_bias_init(hidden: int) -> layers.Initializer:
  """The distribution of PyTorch's nn.LSTM effective bias b_ih + b_hh: the sum of two independent
  U(-1/sqrt(hidden), 1/sqrt(hidden)) draws (Flax's cell has the one bias of the sum)."""
  draw = layers.torch_uniform_init(hidden)

  def init(key, shape, dtype=jnp.float32):
    key_ih, key_hh = jax.random.split(key)
    return draw(key_ih, shape, dtype) + draw(key_hh, shape, dtype)

  return init


class LSTMStateEncoder(nn.Module):
  """LSTM encoder of a feature map's rows (KAKAKA, "An innovative image classification scheme
  based on LSTM knowledge distillation", 2025 developer article, in Chinese), returning the final
  hidden and cell states that `jaxkd.losses.lstm_state_loss` matches between student and teacher.

  For a feature map x [B, H, W, C] and window length K = `window`:

  1. Windows: for n = 0 .. N-1, N = H - K + 1, window n is rows n .. n+K-1, a sequence of K
     steps, each step one row [W, C].
  2. Convolution: each window, a [K, W, C] volume, is convolved with a 3x3 kernel over (K, W)
     (zero padding 1 on both axes, `channels` outputs, with bias): the article's
     Conv3d(C, 256, kernel_size=3, padding=1) applied to the window as a volume of depth K,
     height 1 and width W, whose height padding leaves only the kernel's middle slice in use.
     Each window is convolved on its own (its first and last steps see zero padding, not the
     neighbouring rows): the windows overlap, so a kernel that also ran across windows would read
     the same rows twice and make a sequence depend on rows outside it.
  3. Mean over W: sequences [B, N, K, channels]. No activation in between, so step 2-3 is linear
     and is computed as the kernel applied to column means (exact, and it never builds the
     [B, N, K, W, channels] convolution output).
  4. A `num_layers`-layer bidirectional LSTM (Flax's OptimizedLSTMCell, `hidden` units per
     direction, zero initial state) over the K steps of every window; layer l+1 reads the
     concatenated outputs of both directions of layer l. Initialised as PyTorch's nn.LSTM (the
     article's): every weight U(+-1/sqrt(hidden)); Flax's cell has one bias per gate where
     PyTorch has two (b_ih + b_hh), so it is drawn as the sum of two such uniforms.

  Returns (h, c), each float32 [B, N, num_layers * 2, hidden]: the final carries, index 2 l + d
  for layer l and direction d (0 forward, after step K-1; 1 backward, after step 0), as the h_n,
  c_n of PyTorch's nn.LSTM (there [num_layers * 2, batch, hidden]).

  Variables: "params" only: conv {kernel [3, 3, C, channels], bias [channels]} and, for each
  layer l and direction d in (forward, backward), lstm{l}_{d} {ii, if, ig, io: {kernel [in,
  hidden]}; hi, hf, hg, ho: {kernel [hidden, hidden], bias [hidden]}} (Flax's LSTMCell layout:
  gate i = sigmoid(x @ ii + h @ hi + b_hi), f, o likewise, g with tanh), in = channels for layer
  0, else 2 * hidden. Computes in float32 whatever the input dtype.
  """
  channels: int = 256
  hidden: int = 512
  num_layers: int = 2
  window: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_nhwc(x, "LSTMStateEncoder")
    for name in ("channels", "hidden", "num_layers", "window"):
      if getattr(self, name) < 1:
        raise ValueError(f"LSTMStateEncoder.{name} must be >= 1, got {getattr(self, name)}")
    if x.shape[1] < self.window:
      raise ValueError(f"LSTMStateEncoder needs feature maps with H >= window={self.window} "
                       f"rows, got shape {x.shape} (NHWC); use an earlier stage or a smaller "
                       f"window")
    seq = _WindowConv(self.channels, self.window, name="conv")(x.astype(jnp.float32))
    uniform = layers.torch_uniform_init(self.hidden)  # PyTorch's nn.LSTM initialisation
    bias_init = _torch_lstm_bias_init(self.hidden)
    hs, cs = [], []
    for layer in range(self.num_layers):
      cells = [nn.OptimizedLSTMCell(self.hidden, kernel_init=uniform,
                                    recurrent_kernel_init=uniform, bias_init=bias_init,
                                    param_dtype=jnp.float32, name=f"lstm{layer}_{direction}")
               for direction in ("forward", "backward")]
      rnn = nn.Bidirectional(nn.RNN(cells[0]), nn.RNN(cells[1]), return_carry=True)
      (carry_f, carry_b), seq = rnn(seq)
      for c, h in (carry_f, carry_b):  # Flax's LSTM carry is (c, h)
        hs.append(h)
        cs.append(c)
    return (jnp.stack(hs, axis=2).astype(jnp.float32),
            jnp.stack(cs, axis=2).astype(jnp.float32))
