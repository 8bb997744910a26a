"""Guards on the pinned JAX release: known CPU miscompilations of other releases must be absent.

jaxlib 0.10.2 on CPU returns wrong numbers, without any warning, from a jitted vmapped
matrix-vector product followed by a reduction at some array sizes (jax-ml/jax#39103), and crashes
in its fused reduction of an elementwise product of rank 7 or 8 (jax-ml/jax#39257). jaxkd pins
0.10.1 (pyproject.toml says why); these tests fail if a change of pins brings such a release back.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.parametrize("n", [1000, 32_769])
def test_jitted_vmapped_matvec_then_reduction_is_exact(n):
  rows = np.arange(n, dtype=np.float64)
  x = np.stack([rows, np.zeros(n), np.zeros(n)], axis=1)
  m = np.eye(3)
  want = np.sum((x @ m.T) ** 2, axis=1)  # float64; the values are integers below 2^31
  f = jax.jit(lambda xx, mm: jax.vmap(lambda row: jnp.sum((mm @ row) ** 2))(xx))
  got = np.asarray(f(jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_high_rank_product_reduction_neither_crashes_nor_errs():
  """In a subprocess: the faulty release dies with a segmentation fault here."""
  code = (
      "import jax, jax.numpy as jnp, numpy as np\n"
      "r = np.random.default_rng(0)\n"
      "for shape in [(3, 1, 2, 2, 8, 8, 8), (2, 2, 2, 2, 2, 2, 2, 4)]:\n"
      "  a = r.standard_normal(shape).astype(np.float32)\n"
      "  b = r.standard_normal(shape).astype(np.float32)\n"
      "  got = np.asarray(jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(a, b), np.float64)\n"
      "  want = np.sum(a.astype(np.float64) * b.astype(np.float64), axis=3)\n"
      "  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)\n"
      "print('ok')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
      proc.returncode, proc.stderr[-2000:])
