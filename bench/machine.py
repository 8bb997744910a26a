"""What the benchmarks run on: CPU model and cores, package versions, peak memory, and the dense
bfloat16 peak of known accelerators (for MFU).

Standard library only, except ``device_peak_mib`` (imports jax when called): the parent process
of ``bench/run.py`` imports this module and must stay free of jax and TensorFlow.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import resource

# Dense (no sparsity) bfloat16 peak TFLOP/s by jax device_kind (lower-cased substring; first match
# wins).
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),        # H100 SXM: device_kind 'NVIDIA H100 80GB HBM3'
    ("h200", 989.0),        # 'NVIDIA H200' (also GH200)
    ("a100", 312.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5", 459.0),       # v5p
    ("tpu v6 lite", 918.0),  # v6e
)


def peak_bf16_tflops(device_kind: str | None) -> float | None:
  """Dense bf16 peak of a device from PEAK_BF16_TFLOPS, None when unknown."""
  kind = (device_kind or "").lower()
  for key, value in PEAK_BF16_TFLOPS:
    if key in kind:
      return value
  return None


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  """'model name' from /proc/cpuinfo (platform.processor() elsewhere), and the logical CPU
  count."""
  name, logical = None, 0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and name is None:
          name = line.split(":", 1)[1].strip()
        if line.startswith("processor"):
          logical += 1
  except OSError:
    pass
  name = name or platform.processor() or platform.machine()
  return (f"{name} ({logical or os.cpu_count()} logical CPUs, {cores()} available to this "
          "process)")


def version(dist: str) -> str | None:
  """Installed version of distribution `dist`, None when it is not installed."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def peak_rss_mib() -> float:
  """Peak resident memory of this process in MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def device_peak_mib() -> float | None:
  """Peak memory in use on the first JAX device in MiB (None when the backend does not say)."""
  import jax
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


# glibc's malloc returns every freed block over 32 MiB (and worker threads' large blocks) to the
# kernel, so a CPU training step that allocates GBs of fresh buffers page-faults them in again on
# every step (the JAX student step at batch 32: ~400k faults, 1.6 GB of zeroed pages). These
# tunables keep freed memory in the process (`bench/run.py --malloc=no-release`).
GLIBC_NO_RELEASE = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                    "glibc.malloc.trim_threshold=1099511627776")
