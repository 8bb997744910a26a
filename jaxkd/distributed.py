"""Several processes, one job: starting `jax.distributed` and keeping the processes in step.

One process per host (per GPU host, per TPU VM, or several on one machine on the CPU) runs the
same command. `initialize` joins them into one JAX runtime: `jax.devices()` is then every
process's devices, a `jax.jit` over a mesh of them runs data parallel across processes (on the
CPU through JAX's cross-process CPU collectives, gloo), and Orbax checkpoints are written and
read by all of them. What is not JAX's happens once, on process 0 (`is_main`): reports, plots,
metrics, the teacher-logit store's files. The helpers here are what the pipeline needs beyond
that:

    any_stop(flag)        the stop request of any process (SIGINT/SIGTERM reach one host only)
    broadcast_int(v)      process 0's value on every process
    gather_rows(x)        every process's rows (a batch-sharded jax.Array, or host numpy) as one
                          host numpy array, on every process
    gather_strings(ss)    every process's list of strings, concatenated in process order
    barrier(name)         wait until every process got here

With one process each of them is the identity (no communication).

A process that dies is noticed by the others through the coordination service's heartbeats:
they stop within `heartbeat_timeout_seconds` (JAX ends them with an error message naming the
missing task) instead of waiting forever in the next collective.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["initialize", "is_main", "any_stop", "broadcast_int", "gather_rows", "gather_strings",
           "barrier"]


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 100,
               initialization_timeout: int = 300) -> None:
  """`jax.distributed.initialize` with jaxkd's settings; must run before any other JAX call.

  With no address (and no counts) JAX finds the job from its environment: SLURM, a TPU pod
  slice, Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  `heartbeat_timeout_seconds`: how long the others wait for a process that stopped answering
  before they stop with an error. `initialization_timeout`: how long to wait for every process
  to join.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
                             initialization_timeout=int(initialization_timeout))


def is_main() -> bool:
  """Whether this is process 0, the one that writes files other than checkpoints."""
  return jax.process_index() == 0


def _allgather(value: np.ndarray) -> np.ndarray:
  """[process_count, *value.shape]: every process's `value` (same shape and dtype on each)."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def any_stop(flag: Any) -> tuple[bool, int | None]:
  """(whether any process's `PreemptionFlag` asks to stop, the signal number that asked).

  Every process must call it at the same point: with several processes it is a collective, so
  they all decide to stop at the same step (a signal usually reaches one host only).
  """
  asked = flag is not None and flag.requested
  signum = flag.signum if asked else None
  if jax.process_count() == 1:
    return asked, signum
  # 0: no request; -1: a request without a signal number; else the signal number.
  local = 0 if not asked else (int(signum) if signum else -1)
  codes = [int(c) for c in _allgather(np.array([local], np.int64)).reshape(-1) if c != 0]
  if not codes:
    return False, None
  return True, (max(codes) if max(codes) > 0 else None)


def broadcast_int(value: int) -> int:
  """Process 0's `value`, on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.array(int(value), np.int64)))


def gather_rows(array: Any) -> np.ndarray:
  """Rows of every process, concatenated in process order, as host numpy on every process.

  `array`: a jax.Array sharded along its first axis over every process's devices (the global
  rows come back in their global order), or this process's own numpy rows (the same shape on
  every process). With one process it is simply fetched.
  """
  if jax.process_count() == 1:
    return np.asarray(array)
  if isinstance(array, jax.Array):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  array = np.asarray(array)
  return _allgather(array).reshape((-1,) + array.shape[1:])


def gather_strings(strings: Sequence[str | bytes]) -> list[bytes]:
  """Every process's `strings` (as UTF-8 bytes), process 0's first, on every process."""
  local = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in strings]
  if any(b"\n" in s for s in local):
    raise ValueError("gather_strings: the strings must not contain a newline")
  if jax.process_count() == 1:
    return local
  blob = np.frombuffer(b"\n".join(local) + b"\n" if local else b"", np.uint8)
  sizes = _allgather(np.array([blob.size], np.int64)).reshape(-1)
  padded = np.zeros([int(sizes.max()) or 1], np.uint8)
  padded[:blob.size] = blob
  gathered = _allgather(padded)
  out: list[bytes] = []
  for row, size in zip(gathered, sizes):
    out.extend(row[:int(size)].tobytes().split(b"\n")[:-1])
  return out


def barrier(name: str) -> None:
  """Returns once every process has called `barrier(name)` (the same name, in the same order)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)
