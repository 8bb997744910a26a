"""k x k dense convolutions (k > 1) with their gradients chosen per shape on CPU.

XLA:CPU computes the forward convolution well, but its two gradients less so. Kernel gradient,
float32, milliseconds per call, on a 2-core AMD EPYC (no AVX-512; `python bench/bench_conv_grad.py`
prints this table on any machine):

  kernel gradient                   XLA   chunked shifted GEMMs   chunked im2col   forward
  3x3, 16, 32 px, batch 64           58            10                  60              5
  3x3, 64, 8 px, batch 64            11             8                  19              3
  3x3/2, 16 -> 32, 32 px, batch 64   15             6                  16              3
  3x3, 64, 32 px, batch 64         1679           105                 253             65
  7x7/2, 3 -> 64, 224 px, batch 32 1519           486                 488
  3x3, 64, 56 px, batch 32         1159           244                 432             62
  3x3/2, 128, 56 px, batch 32      1229           159                 288             90
  3x3, 256, 14 px, batch 32         233           125                 134             77
  3x3, 512, 7 px, batch 32          104            93                 178             95

On a 2-core Intel Xeon (AVX-512, AMX) the unchunked shifted GEMMs beat XLA from 64 input
channels and 100 output pixels and lost below (3x3, 16, 32 px: 18 ms against XLA's 12); the
im2col GEMM won the ResNet stem there (223 ms against 546).

Kernel gradient dW[i, j] = sum_{b,h,w} xp[b, s*h + i, s*w + j, :]^T dy[b, h, w, :] (xp the
padded input), summed over chunks of images (`lax.scan`) of about CHUNK_BYTES of input each, so
that a chunk's taps stay in cache (`batch_chunk`):

- "shifted GEMMs": one [Cin, rows] x [rows, Cout] GEMM per tap (i, j) on the strided slice of
  the chunk. Taken everywhere but in a stem.
- "im2col GEMM": all taps at once, [Cin*kh*kw, rows] x [rows, Cout] on the patches
  (`lax.conv_general_dilated_patches`). Taken for kernels of 25 taps or more on fewer than 16
  input channels (a network's stem), where a per-tap GEMM would be only Cin deep.

Input gradient of a stride-2 3x3 convolution on the Xeon (milliseconds, batch 32): 128
channels 56 -> 28 px, XLA 124, stride phases 54; 256 channels 28 -> 14 px, 63 and 29; 512
channels 14 -> 7 px, 34 and 34.

Input gradient of a strided convolution (stride_phases.py): one stride-1 convolution per stride
phase, interleaved, when the output has at least 100 pixels; XLA's transposed convolution
otherwise and for stride 1 (where the two are the same computation).

The forward is always `lax.conv_general_dilated`. The derivatives are a custom JVP whose two
linear parts carry these transposes (as depthwise.py): `jax.grad` and `jax.jvp` work, `jax.vmap`
of a gradient and `jax.hessian` do not (derivatives.py; JAXKD_XLA_GRADIENTS=1 turns this module
off).
On GPU and TPU (cuDNN, the TPU convolution units) every convolution is
`lax.conv_general_dilated` with XLA's gradients; the choice is made per lowering platform with
`lax.platform_dependent`. 1x1 convolutions are pointwise.py's business.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxkd.models import derivatives, pointwise, stride_phases

IntPair = tuple[int, int]
PadPair = tuple[IntPair, IntPair]

_NHWC = ("NHWC", "HWIO", "NHWC")

MIN_OUTPUT_PIXELS = 100  # the phase input gradient from this many output pixels
IM2COL_MAX_CHANNELS = 15  # kernel gradient as one im2col GEMM up to this many input channels ...
IM2COL_MIN_TAPS = 25  # ... for kernels of at least this many taps
CHUNK_BYTES = 1 << 20  # the kernel gradient sums over chunks of images of about this many bytes


def kernel_grad_method(in_channels: int, kernel_hw: IntPair, out_hw: IntPair) -> str:
  """'shift' or 'im2col': how the CPU path computes the kernel gradient (module docstring)."""
  del out_hw  # every output size measured wins with the chunked GEMMs
  if in_channels <= IM2COL_MAX_CHANNELS and kernel_hw[0] * kernel_hw[1] >= IM2COL_MIN_TAPS:
    return "im2col"
  return "shift"


def input_grad_method(strides: IntPair, out_hw: IntPair) -> str:
  """'phases' or 'xla': how the CPU path computes the input gradient (module docstring)."""
  if strides != (1, 1) and out_hw[0] * out_hw[1] >= MIN_OUTPUT_PIXELS:
    return "phases"
  return "xla"


def _xla_conv(x, kernel, strides, pad):
  return lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=_NHWC)


def _gemm_dtype(dtype) -> Any:
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def batch_chunk(batch: int, bytes_per_image: int, budget: int | None = None) -> int:
  """The largest divisor of `batch` whose images' bytes fit in `budget` (default CHUNK_BYTES),
  at least 1."""
  fit = max(1, (CHUNK_BYTES if budget is None else budget) // max(1, bytes_per_image))
  return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fit)


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: IntPair, strides: IntPair,
                 pad: PadPair) -> jax.Array:
  """dW [kh, kw, Cin, Cout] in x's dtype, by the method `kernel_grad_method` picks ('xla', XLA's
  own gradient, is never picked; bench/bench_conv_grad.py times it for comparison)."""
  b, _, _, cin = x.shape
  _, ho, wo, cout = dy.shape
  (kh, kw), (sh, sw) = kernel_hw, strides
  method = kernel_grad_method(cin, kernel_hw, (ho, wo))
  if method == "xla":
    _, transpose = jax.vjp(lambda k: _xla_conv(x, k, strides, pad),
                           jnp.zeros((kh, kw, cin, cout), x.dtype))
    return transpose(dy)[0]
  acc = _gemm_dtype(x.dtype)
  per_image = ho * wo * cin * jnp.dtype(x.dtype).itemsize * (kh * kw if method == "im2col" else 1)
  chunk = batch_chunk(b, per_image)
  xp = stride_phases.pad_hw(x, (*pad[0], 0), (*pad[1], 0))
  rows = chunk * ho * wo

  def chunk_grad(xc, dyc):
    """[kh * kw, Cin, Cout] summed over one chunk of images."""
    if method == "im2col":
      # features ordered (Cin, kh, kw)
      patches = lax.conv_general_dilated_patches(xc, (kh, kw), strides, "VALID",
                                                 dimension_numbers=_NHWC,
                                                 precision=lax.Precision.HIGHEST)
      dk = jnp.dot(patches.reshape(rows, cin * kh * kw).T, dyc, preferred_element_type=acc)
      return dk.reshape(cin, kh * kw, cout).swapaxes(0, 1)
    taps = []
    for i in range(kh):
      for j in range(kw):
        tap = lax.slice(xc, (0, i, j, 0),
                        (chunk, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
        taps.append(jnp.dot(tap.reshape(rows, cin).T, dyc, preferred_element_type=acc))
    return jnp.stack(taps)

  def step(total, chunk_in):
    return total + chunk_grad(*chunk_in), None

  chunks = (xp.reshape(b // chunk, chunk, *xp.shape[1:]), dy.reshape(b // chunk, rows, cout))
  total, _ = lax.scan(step, jnp.zeros((kh * kw, cin, cout), acc), chunks)
  return total.reshape(kh, kw, cin, cout).astype(x.dtype)


def _input_grad(dy: jax.Array, kernel: jax.Array, strides: IntPair, pad: PadPair,
                in_shape: Sequence[int]) -> jax.Array:
  """dx [B, H, W, Cin] in dy's dtype, by the method `input_grad_method` picks."""
  if input_grad_method(strides, dy.shape[1:3]) == "xla":
    _, transpose = jax.vjp(lambda t: _xla_conv(t, kernel, strides, pad),
                           jnp.zeros(in_shape, dy.dtype))
    return transpose(dy)[0]
  sh, sw = strides
  acc = _gemm_dtype(dy.dtype)

  def correlate(window, rh, rw, out_hw):
    taps = kernel[rh::sh, rw::sw][::-1, ::-1].swapaxes(2, 3)  # [a_h, a_w, Cout, Cin]
    del out_hw  # the window is exactly as large as the VALID correlation needs
    return lax.conv_general_dilated(window, taps, (1, 1), "VALID", dimension_numbers=_NHWC,
                                    preferred_element_type=acc)

  return stride_phases.input_grad(dy, kernel.shape[:2], strides, pad, in_shape[1:3],
                                  in_shape[3], correlate)


# y(x, w) is bilinear: derivatives.bilinear_jvp, with the gradients above as the transposes.


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _cpu_conv(x, kernel, strides, pad):
  return _xla_conv(x, kernel, strides, pad)


def _cpu_conv_jvp(strides, pad, primals, tangents):
  x, kernel = primals
  return derivatives.bilinear_jvp(
      lambda a, k: _xla_conv(a, k, strides, pad),
      lambda ct, k: _input_grad(ct, k, strides, pad, x.shape),
      lambda a, ct: _kernel_grad(a, ct, kernel.shape[:2], strides, pad),
      primals, tangents)


_cpu_conv.defjvp(_cpu_conv_jvp, symbolic_zeros=True)


def cpu_conv2d(x: jax.Array, kernel: jax.Array, strides: IntPair, pad: PadPair) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, pad, dimension_numbers=('NHWC', 'HWIO',
  'NHWC'))` with the CPU gradients of the module docstring, on any platform (for tests and
  benchmarks; models go through `conv_general_dilated`)."""
  return _cpu_conv(x, kernel, tuple(strides), tuple(tuple(p) for p in pad))


def _explicit_padding(padding) -> PadPair | None:
  if isinstance(padding, str):
    return ((0, 0), (0, 0)) if padding.upper() == "VALID" else None
  try:
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    return None
  return pad if len(pad) == 2 and min(min(p) for p in pad) >= 0 else None


def _is_spatial(lhs, rhs, pad, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, precision,
                preferred_element_type) -> bool:
  """True for an ungrouped, undilated NHWC/HWIO convolution with a kernel larger than 1x1 and
  explicit non-negative padding, in the input's own dtype."""
  if (pad is None or feature_group_count != 1 or batch_group_count != 1 or lhs.ndim != 4
      or rhs.ndim != 4 or rhs.shape[:2] == (1, 1) or lhs.dtype != rhs.dtype
      or precision is not None or preferred_element_type is not None):
    return False
  if not pointwise.is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape):
    return False
  return all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, a drop-in for Flax's `nn.Conv(conv_general_dilated=...)`: on CPU,
  k x k convolutions get the gradients of the module docstring and 1x1 ones run as a GEMM
  (pointwise.py); everything else, and everything on GPU/TPU, is XLA's."""
  kwargs = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  pad = _explicit_padding(padding)
  if derivatives.xla_only() or not _is_spatial(
      lhs, rhs, pad, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, precision, preferred_element_type):
    return pointwise.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  return lax.platform_dependent(
      lhs, rhs,
      cpu=functools.partial(cpu_conv2d, strides=strides, pad=pad),
      default=functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pad,
                                **kwargs))
