"""PyTorch as a reference, run in the system Python (Debian's python3-torchvision; see .ci/run).

torch is not a dependency of jaxkd: tests that compare against torch's own results run a script
in /usr/bin/python3 and skip, saying why, where that interpreter has no torch.
"""
from __future__ import annotations

import subprocess
import textwrap

SYSTEM_PYTHON = "/usr/bin/python3"


def problem() -> str | None:
  """Why the system Python cannot import torch and torchvision, or None when it can."""
  try:
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import torch, torchvision"],
                            capture_output=True, text=True, timeout=120)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{SYSTEM_PYTHON} not usable: {e}"
  if result.returncode != 0:
    err = result.stderr.strip()
    last = err.splitlines()[-1] if err else f"exit status {result.returncode}"
    return (f"`{SYSTEM_PYTHON} -c 'import torch, torchvision'` failed (install Debian's "
            f"python3-torchvision): {last}")
  return None


def run(script: str, *args: str, what: str = "reference script") -> str:
  """Runs `script` (dedented) with `args` in the system Python; its stdout. Fails the test on error.
  """
  result = subprocess.run([SYSTEM_PYTHON, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"
  return result.stdout
