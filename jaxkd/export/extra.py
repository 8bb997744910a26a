"""The optional export dependencies (the ``export`` extra) and the error that names it."""
from __future__ import annotations

import importlib
import importlib.util

# import name -> distribution (what `pip install -e .[export]` installs)
PACKAGES = {"ai_edge_litert": "ai-edge-litert", "jax2onnx": "jax2onnx", "onnx": "onnx",
            "onnxruntime": "onnxruntime"}


class MissingExtraError(ImportError):
  """An export dependency is not installed."""


def available(module: str) -> bool:
  """Whether the export dependency `module` (an import name of PACKAGES) can be imported."""
  return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str):
  """Imports `module`, or raises MissingExtraError naming the extra that installs it."""
  if not available(module):
    raise MissingExtraError(
        f"{PACKAGES.get(module, module)} is not installed; it is needed to {purpose}. Install "
        "the export dependencies with `pip install -e .[export]` (from the jaxkd folder)")
  return importlib.import_module(module)
