"""jaxkd.distributed across two real processes (JAX's cross-process CPU collectives).

`jax.distributed.initialize` must run before anything else in a process, so the processes are
subprocesses of the test; each prints what the helpers gave it as one JSON line. (The whole
pipeline on two processes: tests/test_main.py.)
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, signal, sys
port, pid = sys.argv[1], int(sys.argv[2])
from jaxkd import distributed
distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                       heartbeat_timeout_seconds=30, initialization_timeout=60)
import jax, jax.numpy as jnp, numpy as np
from jaxkd.train.checkpoint import PreemptionFlag
from jaxkd.train.step import batch_sharding, data_mesh

quiet = PreemptionFlag()
asked = PreemptionFlag()
if pid == 1:
  asked.set(signal.SIGINT)  # as Ctrl-C on process 1 alone
out = {
    "main": distributed.is_main(),
    "stop_none": distributed.any_stop(quiet),
    "stop_one": distributed.any_stop(asked),
    "broadcast": distributed.broadcast_int(7 + pid),
    "strings": [s.decode() for s in distributed.gather_strings(
        ["a", "", "clé"] if pid == 0 else ["b/1.jpg"])],
    "host_rows": distributed.gather_rows(np.full([2, 3], pid, np.int32)).tolist(),
}
mesh = data_mesh()
local = np.arange(8, dtype=np.float32)[pid * 4:(pid + 1) * 4] * 10  # this process's rows
array = jax.make_array_from_process_local_data(batch_sharding(mesh), local)
out["device_rows"] = distributed.gather_rows(jax.jit(lambda x: x + 1)(array)).tolist()
distributed.barrier("test-done")
print("RESULT " + json.dumps(out), flush=True)
"""


def test_helpers_agree_across_two_processes(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(port), str(i)], env=env,
                            stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
  assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  results = [json.loads(next(x for x in log.splitlines() if x.startswith("RESULT "))[7:])
             for log in logs]
  assert [r["main"] for r in results] == [True, False]
  for r in results:
    assert r["stop_none"] == [False, None]
    assert r["stop_one"] == [True, int(signal.SIGINT)]  # both stop, though one was asked
    assert r["broadcast"] == 7  # process 0's value
    assert r["strings"] == ["a", "", "clé", "b/1.jpg"]
    assert r["host_rows"] == [[0] * 3, [0] * 3, [1] * 3, [1] * 3]
    assert r["device_rows"] == pytest.approx([10 * i + 1 for i in range(8)])
