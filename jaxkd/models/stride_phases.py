"""The input gradient of a strided convolution, one stride phase at a time.

For a convolution with stride s along an axis, padding `lo` before the input and a k-tap kernel
w, the output is y[m] = sum_i xp[s*m + i] w[i] (xp the padded input). Its input gradient at
padded position t = s*u + r (phase r < s) collects only the taps i = r + s*a:

    dxp[s*u + r] = sum_{a < A_r} dy[u - a] * w[r + s*a],   A_r = #{i < k : i = r mod s},

a stride-1 correlation of dy with the flipped taps of phase r. Computing the s*s phases of a 2-D
convolution this way and interleaving them touches each product once, where the transposed
convolution (dy with s - 1 zeros inserted between its elements, correlated with the whole
flipped kernel) multiplies s*s times as many, mostly by zero. XLA:CPU lowers the transposed
convolution that way, so the depthwise convolution (depthwise.py) and the k x k dense
convolution (spatial_conv.py) compute their strided input gradients here on CPU.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

IntPair = tuple[int, int]
PadPair = tuple[IntPair, IntPair]

# correlate(dy_window, rh, rw, (nh, nw)) -> float32 [B, nh, nw, C_in]: the stride-1 correlation of
# a window of the padded dy with the flipped taps kernel[rh::sh, rw::sw][::-1, ::-1].
PhaseCorrelate = Callable[[jax.Array, int, int, IntPair], jax.Array]


def pad_hw(a: jax.Array, ph: tuple[int, int, int], pw: tuple[int, int, int]) -> jax.Array:
  """Zero padding of the two spatial axes of NHWC `a`; each config is (low, high, interior),
  low/high may be negative."""
  return lax.pad(a, jnp.zeros((), a.dtype), ((0, 0, 0), ph, pw, (0, 0, 0)))


def phase_plan(n: int, k: int, s: int, lo: int, n_out: int):
  """Per axis: where each phase of the input gradient reads dy.

  Rows u in [u_lo, u_lo + U) of the phase outputs cover the unpadded input range t in
  [lo, lo + n). Returns (u_lo, U, A, pad_lo, pad_hi, offsets): dy is padded by (pad_lo, pad_hi)
  and phase r reads rows [offsets[r], offsets[r] + U + A_r - 1) of the padded dy.
  """
  u_lo = lo // s
  u_count = -(-(lo + n) // s) - u_lo
  taps = [len(range(r, k, s)) for r in range(s)]
  pad_lo = max(0, max(a - 1 for a in taps) - u_lo)
  offsets = [u_lo - (a - 1) + pad_lo for a in taps]
  pad_hi = max(0, max(u_count + o + a - 1 for o, a in zip(offsets, taps)) - pad_lo - n_out)
  return u_lo, u_count, taps, pad_lo, pad_hi, offsets


def input_grad(dy: jax.Array, kernel_hw: IntPair, strides: IntPair, pad: PadPair,
               in_hw: IntPair, in_channels: int, correlate: PhaseCorrelate) -> jax.Array:
  """Cotangent of the input x [B, H, W, in_channels] of a convolution with output cotangent `dy`,
  kernel size `kernel_hw`, strides and padding ((ph0, ph1), (pw0, pw1)); returned in dy's dtype.

  `correlate` computes one phase (see PhaseCorrelate); this function pads dy, cuts the window
  each phase reads, interleaves the phases and crops the padding.
  """
  b = dy.shape[0]
  (sh, sw), (h, w), (kh, kw) = strides, in_hw, kernel_hw
  uh, nh, ah, plh, phh, offh = phase_plan(h, kh, sh, pad[0][0], dy.shape[1])
  uw, nw, aw, plw, phw, offw = phase_plan(w, kw, sw, pad[1][0], dy.shape[2])
  dyp = pad_hw(dy, (plh, phh, 0), (plw, phw, 0))
  rows = []
  for rh in range(sh):
    cols = []
    for rw in range(sw):
      if ah[rh] == 0 or aw[rw] == 0:  # kernel smaller than the stride: this phase gets no gradient
        cols.append(jnp.zeros((b, nh, nw, in_channels), jnp.float32))
        continue
      window = lax.slice(dyp, (0, offh[rh], offw[rw], 0),
                         (b, offh[rh] + nh + ah[rh] - 1, offw[rw] + nw + aw[rw] - 1, dy.shape[3]))
      cols.append(correlate(window, rh, rw, (nh, nw)))
    rows.append(cols)
  if (sh, sw) == (1, 1):
    full = rows[0][0]
  else:  # interleave the phases: [B, nh, sh, nw, sw, C] -> [B, nh*sh, nw*sw, C]
    full = jnp.stack([jnp.stack(cols, axis=3) for cols in rows], axis=2)
    full = full.reshape(b, nh * sh, nw * sw, in_channels)
  oh, ow = pad[0][0] - sh * uh, pad[1][0] - sw * uw
  return full[:, oh:oh + h, ow:ow + w].astype(dy.dtype)
