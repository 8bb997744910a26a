"""Test set-up: 8 simulated CPU devices, so data-parallel code is really exercised.

The flag must be in the environment before jax is first imported, which is why
this happens at the top of conftest (pytest imports it before any test module).
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Real photographs shared beside the project (never committed into it).
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips the test when it is absent (a user's fresh clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real-image test data not found at {SHARED_DATA} (it lives in ../shared/data beside the repo)")
  return SHARED_DATA


def pytest_configure(config):
  assert jax.device_count() == 8, (
      f"tests expect 8 simulated CPU devices, got {jax.devices()}; XLA_FLAGS must be set before jax is imported")
