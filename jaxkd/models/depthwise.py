"""Depthwise 2-D convolution, the core of MobileNet blocks (Howard, Zhu, Chen, Kalenichenko,
Wang, Weyand, Andreetto and Adam, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", arXiv:1704.04861, 2017).

`depthwise_conv2d` is numerically `lax.conv_general_dilated` with
`feature_group_count = channels`; the backend decides how it is computed
(measured on XLA:CPU: its grouped convolution runs below 1 GFLOP/s, and its
gradients, which XLA also lowers to grouped convolutions, are slower still).

Definition, NHWC input x [B, H, W, C], kernel w [kh, kw, 1, C], strides (sh, sw),
zero padding ((ph0, ph1), (pw0, pw1)) and xp the padded input:

    y[b, h, w, c] = sum_{i < kh, j < kw} xp[b, sh*h + i, sw*w + j, c] * w[i, j, 0, c]

* On CPU it is computed as that sum of kh*kw strided slices times per-channel
  weights, accumulated in float32, which XLA fuses into one vectorised loop.
  Its derivatives are given by hand (a custom JVP whose two linear parts carry
  their own transposes), so reverse mode never meets a grouped convolution:
  - input gradient: dxp[s*m + r] = sum_a dy[m - a] * w[r + s*a] per axis (one
    phase r < s at a time, a correlation of the padded output gradient with
    the flipped taps of that phase; phases interleaved for s > 1);
  - kernel gradient: dw[i, j, c] = sum_{b,h,w} xp[b, sh*h+i, sw*w+j, c] * dy[b, h, w, c],
    all kh*kw sums in one variadic reduction (one pass over x and dy).
* On every other platform (GPU, TPU) it is `lax.conv_general_dilated`
  (cuDNN / the TPU convolution units).

`jax.vmap` of a gradient and `jax.hessian` do not go through the custom JVP (derivatives.py;
JAXKD_XLA_GRADIENTS=1 uses XLA's grouped convolution everywhere).

The choice is made per lowering platform with `lax.platform_dependent`, so an
ahead-of-time lowering for GPU gets the cuDNN path even on a CPU host. On CPU the
shifted-slice path is used for every shape: it was faster in every case measured
(bench/bench_depthwise.py; also C = 1, k = 7 and 9, 4x4 maps, batch 128 CIFAR
shapes), forward 6-60x and forward+backward 15-90x at MobileNetV3-Large's shapes.

XLA:CPU note: when the output goes straight into a reduction (e.g. sum(y * g)),
XLA may fuse the kh*kw shifted slices into that reduction and materialise each of
them, which is several times slower than this forward alone; inside a network
(BatchNorm, activations) this does not happen.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.models import derivatives, stride_phases

IntPair = tuple[int, int]
PadPair = tuple[IntPair, IntPair]
StridesArg = int | Sequence[int]
PaddingArg = int | Sequence[int] | Sequence[Sequence[int]]

# The kernel gradient reduces over the output width alone when a row holds at
# least this many positions, else over height and width together (measured on
# XLA:CPU: short rows make the per-row loop overhead dominate).
_ROW_REDUCE_MIN_WIDTH = 12


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: StridesArg = 1,
                     padding: PaddingArg = 0) -> jax.Array:
  """Depthwise convolution of NHWC `x` [B, H, W, C] with `kernel` [kh, kw, 1, C].

  `padding` is zero padding: an int p pads p pixels on every side (PyTorch's
  convention, not XLA's 'SAME', which pads stride-2 convolutions asymmetrically),
  a pair (ph, pw) pads symmetrically per axis, ((ph0, ph1), (pw0, pw1)) explicitly.
  `strides` is an int or a pair (sh, sw). Returns [B, Ho, Wo, C] in x's dtype,
  Ho = (H + ph0 + ph1 - kh) // sh + 1.

  Same value and derivatives as `xla_depthwise_conv2d`; on CPU it runs the
  shifted-slice implementation (`shift_depthwise_conv2d`), elsewhere XLA's
  grouped convolution.
  """
  s, pad = _check(x, kernel, strides, padding)
  if derivatives.xla_only():
    return xla_depthwise_conv2d(x, kernel, strides=s, padding=pad)
  return lax.platform_dependent(
      x, kernel,
      cpu=functools.partial(shift_depthwise_conv2d, strides=s, padding=pad),
      default=functools.partial(xla_depthwise_conv2d, strides=s, padding=pad))


def xla_depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: StridesArg = 1,
                         padding: PaddingArg = 0) -> jax.Array:
  """`lax.conv_general_dilated(feature_group_count=C)`: the ground truth, and the GPU/TPU path."""
  s, pad = _check(x, kernel, strides, padding)
  return lax.conv_general_dilated(
      x, kernel, window_strides=s, padding=pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def shift_depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, strides: StridesArg = 1,
                           padding: PaddingArg = 0) -> jax.Array:
  """Depthwise convolution as a sum of shifted slices (the CPU path), hand-written derivatives.

  Forward mode (jvp) and reverse mode (grad) both work; reverse mode uses
  `_input_grad` and `_kernel_grad`, not XLA's transposes.
  """
  s, pad = _check(x, kernel, strides, padding)
  return _shift_conv(x, kernel, s, pad)


# ---------------------------------------------------------------------------
# argument checks


def _pair(value, name: str) -> IntPair:
  """An int, or a pair of ints, as a pair of Python ints."""
  try:
    return (operator.index(value),) * 2
  except TypeError:
    pass
  try:
    pair = tuple(operator.index(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2:
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
  return pair


def _padding(padding) -> PadPair:
  """p -> ((p, p), (p, p)); (ph, pw) -> ((ph, ph), (pw, pw)); ((ph0, ph1), (pw0, pw1)) as is."""
  if isinstance(padding, str):
    raise ValueError(f"padding must be ints (symmetric, PyTorch-style), not {padding!r}")
  try:
    ph, pw = _pair(padding, "padding")
    return ((ph, ph), (pw, pw))
  except ValueError:
    pass
  try:
    pad_h, pad_w = padding
  except (TypeError, ValueError):
    pad_h = pad_w = None
  if pad_h is None or isinstance(pad_h, int) or isinstance(pad_w, int):
    raise ValueError(f"padding must be p, (ph, pw) or ((ph0, ph1), (pw0, pw1)), got {padding!r}")
  return (_pair(pad_h, "padding[0]"), _pair(pad_w, "padding[1]"))


def _check(x, kernel, strides, padding) -> tuple[IntPair, PadPair]:
  """Validates shapes and dtypes; returns strides (sh, sw) and padding ((ph0, ph1), (pw0, pw1))."""
  if x.ndim != 4:
    raise ValueError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
    raise ValueError(f"kernel must be [kh, kw, 1, C] with C = x.shape[-1] = {x.shape[-1]}, "
                     f"got {kernel.shape}")
  if x.dtype != kernel.dtype:
    raise TypeError(f"x ({x.dtype}) and kernel ({kernel.dtype}) must have the same dtype; "
                    "cast one of them")
  s = _pair(strides, "strides")
  if min(s) < 1:
    raise ValueError(f"strides must be >= 1, got {s}")
  pad = _padding(padding)
  if min(min(p) for p in pad) < 0:
    raise ValueError(f"padding must be >= 0, got {pad}")
  for n, k, (lo, hi), name in ((x.shape[1], kernel.shape[0], pad[0], "height"),
                               (x.shape[2], kernel.shape[1], pad[1], "width")):
    if n + lo + hi < k:
      raise ValueError(f"padded {name} {n} + {lo} + {hi} is smaller than the kernel ({k}); "
                       "pad more")
  return s, pad


def _out_size(n: int, k: int, s: int, pad: IntPair) -> int:
  return (n + pad[0] + pad[1] - k) // s + 1


# ---------------------------------------------------------------------------
# the three shift-and-sum computations


def _correlate(xp: jax.Array, w: jax.Array, strides: IntPair, out_hw: IntPair) -> jax.Array:
  """sum_{i,j} xp[:, sh*h + i, sw*w + j, :] * w[i, j, :]  (float32), w [kh, kw, C]."""
  b, _, _, c = xp.shape
  (sh, sw), (ho, wo) = strides, out_hw
  wf = w.astype(jnp.float32)
  total = None
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      tap = lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1))
      term = tap.astype(jnp.float32) * wf[i, j]
      total = term if total is None else total + term
  return total


def _forward(x: jax.Array, kernel: jax.Array, strides: IntPair, pad: PadPair) -> jax.Array:
  """y = sum_{i,j} xp[:, sh*h+i, sw*w+j] * kernel[i, j, 0]."""
  kh, kw = kernel.shape[:2]
  out_hw = (_out_size(x.shape[1], kh, strides[0], pad[0]),
            _out_size(x.shape[2], kw, strides[1], pad[1]))
  xp = stride_phases.pad_hw(x, (*pad[0], 0), (*pad[1], 0))
  return _correlate(xp, kernel[:, :, 0, :], strides, out_hw).astype(x.dtype)


def _input_grad(dy: jax.Array, kernel: jax.Array, strides: IntPair, pad: PadPair,
                in_hw: IntPair) -> jax.Array:
  """Cotangent of x: per stride phase, a stride-1 correlation of the padded dy with the flipped
  phase taps (stride_phases.input_grad)."""
  sh, sw = strides
  taps = kernel[:, :, 0, :]

  def correlate(window, rh, rw, out_hw):
    return _correlate(window, taps[rh::sh, rw::sw][::-1, ::-1], (1, 1), out_hw)

  return stride_phases.input_grad(dy, kernel.shape[:2], strides, pad, in_hw, dy.shape[3],
                                  correlate)


def _kernel_grad_plan(n: int, k: int, s: int, lo: int, n_out: int):
  """Per axis, for the kernel gradient, without padding x.

  Tap i reads x[s*o + i - lo] = x_r[o + d] with x_r[u] = x[s*u + r], r = (i - lo) mod s,
  d = (i - lo - r) / s; so its sum is over u < len(x_r) of x_r[u] * dy[u - d], and dy
  (zero outside [0, n_out)) is padded by (pad_lo, pad_hi) to cover every u - d.
  """
  taps = []
  for i in range(k):
    r = (i - lo) % s
    taps.append((r, (i - lo - r) // s))
  lengths = [len(range(r, n, s)) for r in range(s)]
  pad_lo = max(0, max(d for _, d in taps))
  pad_hi = max(0, max(lengths[r] - d for r, d in taps) - n_out)
  return taps, lengths, pad_lo, pad_hi


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: IntPair,
                 pad: PadPair) -> jax.Array:
  """Cotangent of the kernel:
  dw[i, j, 0, c] = sum_{b,h,w} xp[b, sh*h+i, sw*w+j, c] * dy[b, h, w, c].

  One variadic reduction per group of taps with equal phase shapes (one group
  unless a strided axis has odd length), so x and dy are read once.
  """
  b, h, w, c = x.shape
  kh, kw = kernel_shape[:2]
  (sh, sw), (_, ho, wo, _) = strides, dy.shape
  taps_h, len_h, plh, phh = _kernel_grad_plan(h, kh, sh, pad[0][0], ho)
  taps_w, len_w, plw, phw = _kernel_grad_plan(w, kw, sw, pad[1][0], wo)
  dyp = stride_phases.pad_hw(dy, (plh, phh, 0), (plw, phw, 0))
  groups: dict[IntPair, list] = {}
  for i, (rh, dh) in enumerate(taps_h):
    for j, (rw, dw) in enumerate(taps_w):
      groups.setdefault((len_h[rh], len_w[rw]), []).append((i, j, rh, dh, rw, dw))
  sums = {}
  for (nu, nv), taps in groups.items():
    products = []
    for (_, _, rh, dh, rw, dw) in taps:
      xr = lax.slice(x, (0, rh, rw, 0), (b, rh + sh * (nu - 1) + 1, rw + sw * (nv - 1) + 1, c),
                     (1, sh, sw, 1))
      oh, ow = plh - dh, plw - dw
      dr = lax.slice(dyp, (0, oh, ow, 0), (b, oh + nu, ow + nv, c))
      products.append(xr.astype(jnp.float32) * dr.astype(jnp.float32))
    dims = (2,) if nv >= _ROW_REDUCE_MIN_WIDTH else (1, 2)
    zeros = [jnp.zeros((), jnp.float32)] * len(products)
    partial = lax.reduce(products, zeros, lambda acc, v: [p + q for p, q in zip(acc, v)], dims)
    for (i, j, *_), part in zip(taps, partial):
      sums[(i, j)] = jnp.sum(part, axis=tuple(range(part.ndim - 1)))
  dk = jnp.stack([sums[(i, j)] for i in range(kh) for j in range(kw)])
  return dk.reshape(kh, kw, 1, c).astype(x.dtype)


# ---------------------------------------------------------------------------
# derivatives: y(x, w) is bilinear (derivatives.bilinear_jvp, with the gradients above as
# the transposes).


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _shift_conv(x, kernel, strides, pad):
  return _forward(x, kernel, strides, pad)


def _shift_conv_jvp(strides, pad, primals, tangents):
  x, kernel = primals
  return derivatives.bilinear_jvp(
      lambda a, k: _forward(a, k, strides, pad),
      lambda ct, k: _input_grad(ct, k, strides, pad, x.shape[1:3]),
      lambda a, ct: _kernel_grad(a, ct, kernel.shape, strides, pad),
      primals, tangents)


_shift_conv.defjvp(_shift_conv_jvp, symbolic_zeros=True)
