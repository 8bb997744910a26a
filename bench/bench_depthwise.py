"""Micro-benchmark: depthwise convolution on the CPU, XLA's grouped convolution vs the
shifted-slice path.

Single layers with MobileNetV3-Large's depthwise shapes at 224 px, batch 32, float32
(Howard et al., "Searching for MobileNetV3", ICCV 2019, Table 1): kernel 3 and 5, strides 1 and 2,
112x112x16 down to 7x7x960. For each layer and implementation:

  fwd ms      jit(y = conv(x, w))
  fwd+bwd ms  jit of y = conv(x, w) and both gradients for a given output cotangent g
              (jax.vjp: what one layer costs inside a network's training step)
  GFLOP/s     forward FLOPs / fwd time, with FLOPs = 2 * B * Ho * Wo * C * kh * kw
              (fwd+bwd does three times those FLOPs: forward, input and kernel gradient)

Times are medians over `repeats` runs after one warm-up run (compile excluded).
The machine is shared, so repeat and compare medians, not single numbers.

  python bench/bench_depthwise.py            # the default layer set, prints a markdown table
  python bench/bench_depthwise.py --quick    # three layers, fewer repeats
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import median_ms  # noqa: E402
from jaxkd.models.depthwise import shift_depthwise_conv2d, xla_depthwise_conv2d  # noqa: E402

# (name, H=W, channels, kernel, stride) of MobileNetV3-Large's depthwise layers at 224 px (one per
# distinct shape).
MOBILENETV3_LARGE_LAYERS = (
    ("bneck1 112x112x16 k3 s1", 112, 16, 3, 1),
    ("bneck2 112x112x64 k3 s2", 112, 64, 3, 2),
    ("bneck3 56x56x72 k3 s1", 56, 72, 3, 1),
    ("bneck4 56x56x72 k5 s2", 56, 72, 5, 2),
    ("bneck5 28x28x120 k5 s1", 28, 120, 5, 1),
    ("bneck7 28x28x240 k3 s2", 28, 240, 3, 2),
    ("bneck8 14x14x200 k3 s1", 14, 200, 3, 1),
    ("bneck11 14x14x480 k3 s1", 14, 480, 3, 1),
    ("bneck13 14x14x672 k5 s2", 14, 672, 5, 2),
    ("bneck14 7x7x960 k5 s1", 7, 960, 5, 1),
)

IMPLEMENTATIONS: dict[str, Callable] = {
    "lax grouped conv": xla_depthwise_conv2d,
    "shifted slices": shift_depthwise_conv2d,
}



def run(layers: Sequence | None = None, *, quick: bool = False, verbose: bool = True,
        batch: int = 32, dtype=jnp.float32, repeats: int | None = None,
        bwd_repeats: int | None = None) -> list[dict]:
  """Times every layer with every implementation; returns one row per (layer, implementation).

  `layers`: (name, size, channels, kernel, stride) tuples, default MOBILENETV3_LARGE_LAYERS
  (three of them when `quick`). `repeats` timed runs per forward (default 5, 3 when quick)
  and `bwd_repeats` per forward+backward (default max(3, repeats // 2): XLA's grouped
  backward takes seconds per layer).
  Row keys: shape, impl, fwd_ms, fwd_bwd_ms, gflops (forward GFLOP/s), speedup_fwd and
  speedup_fwd_bwd (lax time / this time), batch, dtype, platform.
  Prints progress and the markdown table when `verbose`.
  """
  if layers is None:
    layers = MOBILENETV3_LARGE_LAYERS
    if quick:
      layers = (layers[0], layers[5], layers[9])
  if repeats is None:
    repeats = 3 if quick else 5
  bwd_repeats = max(3, repeats // 2) if bwd_repeats is None else bwd_repeats
  device = jax.devices()[0]
  platform = f"{device.platform} ({device.device_kind}, {jax.device_count()} device(s))"
  rows = []
  for name, size, channels, k, s in layers:
    pad = (k - 1) // 2
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, size, size, channels), dtype)
    w = jax.random.normal(kw, (k, k, 1, channels), dtype)
    out = (size + 2 * pad - k) // s + 1
    g = jax.random.normal(kg, (batch, out, out, channels), dtype)
    flops = 2 * batch * out * out * channels * k * k
    layer_rows = []
    for impl, conv in IMPLEMENTATIONS.items():
      fwd = jax.jit(lambda x, w, conv=conv, s=s, pad=pad: conv(x, w, strides=s, padding=pad))

      def fwd_bwd(x, w, g, conv=conv, s=s, pad=pad):
        y, pullback = jax.vjp(lambda x, w: conv(x, w, strides=s, padding=pad), x, w)
        return y, pullback(g)

      fwd_bwd = jax.jit(fwd_bwd)
      fwd_ms = median_ms(fwd, (x, w), repeats)
      fwd_bwd_ms = median_ms(fwd_bwd, (x, w, g), bwd_repeats)
      layer_rows.append({"shape": name, "impl": impl, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                         "gflops": flops / fwd_ms / 1e6, "batch": batch,
                         "dtype": jnp.dtype(dtype).name, "platform": platform})
    base = layer_rows[0]
    for row in layer_rows:
      row["speedup_fwd"] = base["fwd_ms"] / row["fwd_ms"]
      row["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    rows.extend(layer_rows)
    if verbose:
      for row in layer_rows:
        print(f"  {row['shape']:26s} {row['impl']:17s} fwd {row['fwd_ms']:9.1f} ms  "
              f"fwd+bwd {row['fwd_bwd_ms']:9.1f} ms", flush=True)
  if verbose:
    print(markdown_table(rows))
  return rows


def markdown_table(rows: Sequence[dict]) -> str:
  """The rows of `run` as a markdown table, with a total line per implementation."""
  first = rows[0]
  lines = [f"batch {first['batch']}, {first['dtype']}, {first['platform']}, median times",
           "",
           "| layer | implementation | fwd ms | fwd+bwd ms | fwd GFLOP/s | speed-up fwd | "
           "speed-up fwd+bwd |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                 f"{r['gflops']:.2f} | {r['speedup_fwd']:.1f}x | {r['speedup_fwd_bwd']:.1f}x |")
  for impl in dict.fromkeys(r["impl"] for r in rows):
    fwd = sum(r["fwd_ms"] for r in rows if r["impl"] == impl)
    both = sum(r["fwd_bwd_ms"] for r in rows if r["impl"] == impl)
    lines.append(f"| **sum of the layers above** | {impl} | {fwd:.1f} | {both:.1f} | | | |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="three layers, 3 repeats")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed forward runs (default 5, quick 3)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--bf16", action="store_true", help="bfloat16 inputs instead of float32")
  args = parser.parse_args(argv)
  run(quick=args.quick, batch=args.batch, dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
      repeats=args.repeats)


if __name__ == "__main__":
  main()
