"""Micro-benchmark: the kernel gradient of k x k convolutions on the CPU, XLA's against the
chunked shifted GEMMs and the chunked im2col GEMM of jaxkd/models/spatial_conv.py.

Layers with the shapes of CIFAR ResNets (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Sec. 4.2; batch 64, 32 px) and ResNet-50 (batch 32, 224 px), float32.
For each layer: milliseconds per call of the forward convolution and of each way of computing
dW = d(sum(y * g))/dW for a given cotangent g, the one spatial_conv.py picks marked with *, and
the largest error of each against XLA's relative to XLA's largest entry. Medians over `repeats`
runs after a warm-up run (compile excluded). The machine is shared: compare medians, and rerun.

  python bench/bench_conv_grad.py            # every layer, prints a markdown table
  python bench/bench_conv_grad.py --quick    # three layers, 3 repeats
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from unittest import mock

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench import machine  # noqa: E402
from bench.timing import median_ms  # noqa: E402
from jaxkd.models import spatial_conv  # noqa: E402

# (name, batch, H=W, Cin, Cout, kernel, stride)
LAYERS = (
    ("CIFAR stem 3->16", 64, 32, 3, 16, 3, 1),
    ("CIFAR stage 1, 16", 64, 32, 16, 16, 3, 1),
    ("CIFAR stage 2 in, 16->32 /2", 64, 32, 16, 32, 3, 2),
    ("CIFAR stage 2, 32", 64, 16, 32, 32, 3, 1),
    ("CIFAR stage 3, 64", 64, 8, 64, 64, 3, 1),
    ("CIFAR x4 stage 1, 64", 64, 32, 64, 64, 3, 1),
    ("CIFAR x4 stage 2, 128", 64, 16, 128, 128, 3, 1),
    ("CIFAR x4 stage 3, 256", 64, 8, 256, 256, 3, 1),
    ("ResNet-50 stem 7x7/2 3->64", 32, 224, 3, 64, 7, 2),
    ("ResNet-50 stage 1, 64", 32, 56, 64, 64, 3, 1),
    ("ResNet-50 stage 2 in, 128 /2", 32, 56, 128, 128, 3, 2),
    ("ResNet-50 stage 2, 128", 32, 28, 128, 128, 3, 1),
    ("ResNet-50 stage 3, 256", 32, 14, 256, 256, 3, 1),
    ("ResNet-50 stage 4, 512", 32, 7, 512, 512, 3, 1),
)
METHODS = ("xla", "shift", "im2col")



def run(layers: Sequence | None = None, *, quick: bool = False, repeats: int | None = None,
        verbose: bool = True) -> list[dict]:
  """One row per layer: name, fwd_ms, <method>_ms and <method>_err per method, chosen."""
  layers = layers or (LAYERS[1::6] if quick else LAYERS)
  repeats = repeats or (3 if quick else 5)
  rows = []
  for name, batch, size, cin, cout, k, s in layers:
    pad = ((k // 2, k // 2),) * 2
    out = (size + 2 * (k // 2) - k) // s + 1
    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, size, size, cin))
    g = jax.random.normal(kg, (batch, out, out, cout))
    w = jnp.zeros((k, k, cin, cout))
    fwd = jax.jit(lambda x, w, s=s, pad=pad: lax.conv_general_dilated(
        x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    row = {"layer": name, "fwd_ms": median_ms(fwd, (x, w), repeats),
           "chosen": spatial_conv.kernel_grad_method(cin, (k, k), (out, out))}
    ref = None
    for method in METHODS:
      fn = jax.jit(lambda x, g, k=k, s=s, pad=pad: spatial_conv._kernel_grad(
          x, g, (k, k), (s, s), pad))
      # traced on the first call, under the patch; jit's cache keeps that trace
      with mock.patch.object(spatial_conv, "kernel_grad_method", lambda *a, m=method: m):
        value = jax.block_until_ready(fn(x, g))
        row[f"{method}_ms"] = median_ms(fn, (x, g), repeats)
      ref = value if ref is None else ref
      row[f"{method}_err"] = float(jnp.max(jnp.abs(value - ref)) / jnp.max(jnp.abs(ref)))
    rows.append(row)
    if verbose:
      print(f"  {name:30s} fwd {row['fwd_ms']:7.1f}  " + "  ".join(
          f"{m} {row[m + '_ms']:7.1f}" for m in METHODS), flush=True)
  if verbose:
    print(markdown_table(rows))
  return rows


def markdown_table(rows: Sequence[dict]) -> str:
  lines = [f"{machine.cpu_model()}, float32, milliseconds per call (median); * = the method "
           "spatial_conv.py picks",
           "",
           "| layer | forward | XLA dW | shifted GEMMs dW | im2col dW | max rel. error vs XLA |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    cells = [f"{r[m + '_ms']:.1f}{' *' if r['chosen'] == m else ''}" for m in METHODS]
    err = max(r["shift_err"], r["im2col_err"])
    lines.append(f"| {r['layer']} | {r['fwd_ms']:.1f} | " + " | ".join(cells) + f" | {err:.0e} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="three layers, 3 repeats")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5)")
  args = parser.parse_args(argv)
  run(quick=args.quick, repeats=args.repeats)


if __name__ == "__main__":
  main()
