"""jaxkd command line: run an experiment's stages (teacher, teacher logits, student, evaluate, report).

  python main.py --config=configs/food101_eca.py --workdir=runs/food101_eca
  python main.py --config=configs/food101_mini.py --workdir=/tmp/mini --config.student.epochs=5

Stages already finished in --workdir are skipped; a killed run resumes from its
last checkpoint; SIGTERM saves a checkpoint and exits cleanly. Multi-host jobs
(TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS set) start with
jax.distributed.initialize().
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics, stores' markers and the report")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "call jax.distributed.initialize() ('auto': when the environment is multi-host)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")
flags.mark_flags_as_required(["config", "workdir"])


def _multihost_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens at INFO
  import jax
  if _DISTRIBUTED.value == "yes" or (_DISTRIBUTED.value == "auto" and _multihost_environment()):
    jax.distributed.initialize()
  from jaxkd import experiment
  try:
    experiment.run(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
  except experiment.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
