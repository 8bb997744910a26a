"""jaxkd command line: run an experiment's stages (teacher, logits, student, evaluate, report).

  python main.py --config=configs/food101_eca.py --workdir=runs/food101_eca
  jaxkd --config=configs/food101_mini.py --workdir=/tmp/mini --config.student.epochs=5
  jaxkd --config=configs/food101_mini.py --print_config      # every key, its value, unit, meaning

Stages already finished in --workdir are skipped; a killed run resumes from its
last checkpoint; SIGTERM saves a checkpoint and exits cleanly. Multi-process jobs
(TPU pods, SLURM, JAX_COORDINATOR_ADDRESS set, or --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on each process) start with
jax.distributed.initialize() (jaxkd.distributed).

Errors in the command line, the config or the data print one line
(``config error: ...``, ``data error: ...``, ``usage error: ...``) and exit
with code 2; Ctrl-C exits with code 130; a training loss that became NaN or
infinite prints ``training error: ...`` and exits with code 1. Only this module
decides exit codes: the library raises.
"""
from __future__ import annotations

import ast
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from jaxkd import config as schema
from jaxkd.config import ConfigError

__all__ = ["main", "console_main", "parse_args", "exit_on_error", "UsageError"]

_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpfull", "--helpshort")
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)

_OVERRIDES_HELP = """\
Config keys are overridden with --config.KEY=VALUE (KEY a dotted path; after --config):
  --config.student.epochs=5  --config.student.loss.temperature=2  --config.augment.flip=false
  --config.evaluate.splits="('val',)"               (tuples: a quoted Python tuple)
  --config.student.model_kwargs.width_mult=0.75    (model options; None = the model's default)
  --config.teacher.pretrained=None                 (None resets an optional key)
List every key with its value, unit and meaning (no compute, no --workdir):
  --config=CONFIG.py --print_config
"""


class _LoadFailed(Exception):
  """A config file that cannot be loaded (not a ValueError, so absl does not rewrap it)."""


class UsageError(Exception):
  """A command-line mistake outside the config (unknown flag, missing --config or --workdir)."""


class _ConfigFileParser(flags.ArgumentParser):
  """Parser of --config: jaxkd.config.load_config_file (one-line errors), then lock.

  The loaded config gets every schema key (fill_defaults) before it is locked, so overrides
  reach keys a config file left out (e.g. a model option after `model_kwargs = {...}`).
  Whole-group overrides (--config.student.model_kwargs={}) are applied here, before the
  key overrides, so `model_kwargs={}` resets every option and keys given after it still apply.
  """

  def __init__(self, groups: Sequence[tuple[str, dict]] = ()):
    self.groups = list(groups)

  def parse(self, path):
    try:
      config = schema.load_config_file(path)
      for name, values in self.groups:
        _set(config, name, schema.group(name, **values))
    except ConfigError as e:
      raise _LoadFailed(str(e)) from None
    except (TypeError, ValueError) as e:  # a value of the wrong type inside the dict
      raise _LoadFailed(f"--config.{name}: {e}") from None
    config.lock()
    return config

  def flag_type(self):
    return "config object"


def _define_flags(prog: str, args: list[str], groups: Sequence[tuple[str, dict]] = ()):
  fv = flags.FlagValues()
  holders = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "experiment config file, relative to the current directory "
          "(configs/*.py); override its keys with --config.KEY=VALUE", flag_values=fv,
          lock_config=True, sys_argv=[prog] + args),
      "workdir": flags.DEFINE_string(
          "workdir", None, "folder for checkpoints, metrics, stores' markers and the report",
          flag_values=fv),
      "print_config": flags.DEFINE_bool(
          "print_config", False, "print the effective config (file + overrides), one key per line "
          "with its unit and meaning, and exit without computing", flag_values=fv),
      "distributed": flags.DEFINE_enum(
          "distributed", "auto", ["auto", "yes", "no"], "call jax.distributed.initialize() "
          "('auto': when the environment is multi-host or --coordinator_address is given)",
          flag_values=fv),
      "coordinator_address": flags.DEFINE_string(
          "coordinator_address", None, "HOST:PORT of process 0, where the processes of a "
          "multi-process job meet (the same on every process)", flag_values=fv),
      "num_processes": flags.DEFINE_integer(
          "num_processes", None, "number of processes of the job (with --coordinator_address)",
          flag_values=fv),
      "process_id": flags.DEFINE_integer(
          "process_id", None, "this process's index, 0 .. num_processes-1 (with "
          "--coordinator_address)", flag_values=fv),
      "heartbeat_timeout_seconds": flags.DEFINE_integer(
          "heartbeat_timeout_seconds", 100, "multi-process jobs: a process silent this long "
          "counts as dead and the others stop with an error", flag_values=fv),
      "progress": flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv),
  }
  fv["config"].parser = _ConfigFileParser(groups)
  return fv, holders


def _help(prog: str) -> str:
  fv, holders = _define_flags(prog, [])
  lines = [f"usage: {prog} --config=CONFIG.py --workdir=DIR [--config.KEY=VALUE ...]",
           f"       {prog} --config=CONFIG.py --print_config [--config.KEY=VALUE ...]", "",
           "Runs the stages of an experiment (teacher, teacher_logits, student, evaluate, report)",
           "in --workdir, skipping finished ones; a killed run resumes from its last checkpoint.",
           "Mistakes in the command line, the config or the data print one line and exit with",
           "code 2; Ctrl-C exits with code 130.", "", "flags:"]
  for name in holders:
    flag = fv[name]
    shown = f"--[no]{name}" if flag.boolean else f"--{name}"
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  {shown}: {flag.help}{default}")
  return "\n".join(lines + ["", _OVERRIDES_HELP])


def _split_overrides(args: list[str]):
  """(args for absl, [(group, dict)] to apply at load, [(path, value)] to set after parsing).

  Unknown keys raise ConfigError. Not left to ml_collections: a whole group given as a dict
  (applied first, see _ConfigFileParser), `=None` for a key of the schema (its parsers would
  read 'None' as a string or refuse it) and new entries of a free-form mapping
  (report.reference.NAME=TEXT).
  """
  kept, groups, later = [], [], {}
  for arg in args:
    m = _OVERRIDE.match(arg)
    if not m:
      kept.append(arg)
      continue
    path, value = m.group(2), m.group(3)
    if not schema.is_known(path):
      raise ConfigError(schema.unknown_key_message(path))
    if value is not None and schema.is_free_form(path):
      later[path] = value  # free-form entry: the text as given
    elif value is not None and schema.lookup(path) is None:  # a group
      try:
        values = ast.literal_eval(value)
      except (SyntaxError, ValueError):
        values = None
      if not isinstance(values, dict):
        raise ConfigError(f"--config.{path}={value}: {path} is a group of keys; give a dict such "
                          f"as {{}} (all defaults) or set its keys, --config.{path}.KEY=VALUE")
      groups.append((path, values))
    elif value == "None" and schema.lookup(path) is not None:
      later[path] = None
    else:
      later.pop(path, None)
      kept.append(arg)
  return kept, groups, list(later.items())


def _set(config, path: str, value: Any) -> None:
  node = config
  *parents, leaf = path.split(".")
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def _value_error(message: str) -> str:
  """absl's 'flag --config.a.b=v: <parser error>' as a sentence that names the key's type."""
  m = re.match(r"flag --config\.([^=]+)=(.*?): ", message, re.DOTALL)
  key = schema.lookup(m.group(1)) if m else None
  if key is None:
    return message.splitlines()[0]
  return f"--config.{key.path}={m.group(2)}: {key.path} must be {key.expects} ({key.meaning})"


def parse_args(argv: Sequence[str], prog: str = "jaxkd") -> tuple[Any, dict]:
  """(config, options) from command-line arguments (without the program name).

  config: the config file's ConfigDict with the --config.KEY=VALUE overrides applied and
  every schema key present (None when --config is absent); options: workdir,
  print_config, distributed, progress. Raises ConfigError or UsageError (one line each).
  Checks only what parsing needs; `jaxkd.config.validate` checks the values.
  """
  args = list(argv)
  has_config = any(re.match(r"^--?config(=|$)", a) for a in args)
  if not has_config and any(_OVERRIDE.match(a) for a in args):
    raise UsageError("--config.KEY overrides need --config=CONFIG.py first (e.g. "
                     "--config=configs/food101_mini.py)")
  args, groups, later = _split_overrides(args)
  fv, holders = _define_flags(prog, args, groups)
  try:
    rest = fv([prog] + args)
  except _LoadFailed as e:
    raise ConfigError(str(e)) from None
  except flags.IllegalFlagValueError as e:
    text = str(e)
    if text.startswith("flag --config."):
      raise ConfigError(_value_error(text)) from None
    raise UsageError(text.splitlines()[0]) from None
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (KeyError, AttributeError) as e:  # config_flags: an override of a key the config lacks
    raise ConfigError(f"unknown key: {' '.join(str(e).split())}") from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {' '.join(rest[1:])}; flags are --name=value")
  config = holders["config"].value
  if config is not None:
    schema.fill_defaults(config)
    for path, value in later:
      _set(config, path, value)
  return config, {k: h.value for k, h in holders.items() if k != "config"}


def _multihost_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def _process_options(options: dict) -> dict:
  """The --coordinator_address / --num_processes / --process_id given, checked (UsageError)."""
  explicit = {k: options.get(k) for k in ("coordinator_address", "num_processes", "process_id")}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if not explicit:
    return {}
  if options["distributed"] == "no":
    raise UsageError(f"--distributed=no contradicts --{next(iter(explicit))}; drop one of them")
  address = explicit.get("coordinator_address")
  if address is not None and not re.fullmatch(r"\[?[^\s\]]+\]?:\d{1,5}", address):
    raise UsageError(f"--coordinator_address={address!r} is not HOST:PORT (e.g. "
                     "--coordinator_address=node0:1234, the same on every process)")
  n, i = explicit.get("num_processes"), explicit.get("process_id")
  if n is not None and n < 1:
    raise UsageError(f"--num_processes={n} must be at least 1")
  if i is not None and (i < 0 or (n is not None and i >= n)):
    raise UsageError(f"--process_id={i} must be in 0 .. {'num_processes-1' if n is None else n - 1}"
                     " (one distinct index per process)")
  if options["heartbeat_timeout_seconds"] < 1:
    raise UsageError(f"--heartbeat_timeout_seconds={options['heartbeat_timeout_seconds']} must "
                     "be at least 1")
  return explicit


def _loaded_class(module: str, name: str) -> type:
  """`module.name` if the module is imported, else a class nothing is an instance of.

  An exception of a pipeline class can only exist once its module is loaded, so classifying
  an error never imports TensorFlow or Orbax for nothing.
  """
  return getattr(sys.modules.get(module), name, type(None))


def _pipeline_error(e: BaseException, rerun: str = "the same command"
                    ) -> tuple[str, str, int] | None:
  """(label, message, exit code) for the pipeline's own error types, None for any other; a stop
  message tells the user to run `rerun` again."""
  if isinstance(e, _loaded_class("jaxkd.data.user_folders", "DataError")):
    return "data error", str(e), 2
  if isinstance(e, _loaded_class("jaxkd.teacher_store", "TeacherStoreError")):
    return "store error", str(e), 2
  if isinstance(e, _loaded_class("jaxkd.train.checkpoint", "StopRequested")):
    # SIGINT / SIGTERM: the stage saved its work at a safe point. Ctrl-C exits 130 (the shell's
    # convention); SIGTERM (a scheduler's preemption) exits 0 so the job counts as stopped cleanly.
    code = 130 if e.signum == signal.SIGINT else 0
    return "stopped", f"{e}. Rerun {rerun} to resume.", code
  if isinstance(e, _loaded_class("jaxkd.train.loop", "NonFiniteLossError")):
    # The loss diverged: the message names the step, the value and what to try. Not a mistake in
    # the command line (2), a run that failed (1).
    return "training error", str(e), 1
  if isinstance(e, _loaded_class("jaxkd.export.deploy", "ExportError")):
    # An exported file that disagrees with jaxkd (or a converter that failed): the run trained
    # and evaluated, the export did not hold; 1, like a failed training.
    return "export error", str(e), 1
  return None


def _run(config, options: dict) -> None:
  if not flags.FLAGS.is_parsed():  # absl logging reads its own flags; take their defaults
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens at INFO
  explicit = _process_options(options)
  mode = options["distributed"]
  if mode == "yes" or (mode == "auto" and (explicit or _multihost_environment())):
    from jaxkd import distributed
    try:
      distributed.initialize(**explicit,
                             heartbeat_timeout_seconds=options["heartbeat_timeout_seconds"])
    except ValueError as e:  # JAX found no job to join (no address, no cluster environment)
      raise UsageError(f"--distributed={mode}: {' '.join(str(e).split())}; give "
                       "--coordinator_address=HOST:PORT --num_processes=N --process_id=I") from None
  from jaxkd import experiment
  experiment.run(config, options["workdir"], progress=options["progress"])


def _print(text: str) -> None:
  """Prints to stdout; a reader that stops early (`| head`) is not an error."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(kind: str, message: Any, code: int = 2) -> None:
  print(f"{kind}: {message}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the command line `argv` (the arguments after the program name; default sys.argv[1:]).

  Exits with SystemExit(2) after one line on stderr for a usage, config, data or store error,
  SystemExit(130) on Ctrl-C (0 after SIGTERM), SystemExit(1) for a NaN/Inf training loss;
  returns normally on success.
  """
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "jaxkd"
  args = list(sys.argv[1:] if argv is None else argv)
  if any(a in _HELP_FLAGS for a in args):
    _print(_help(prog))
    return
  exit_on_error(lambda: _main(args, prog))


def _main(args: list[str], prog: str) -> None:
  config, options = parse_args(args, prog)
  if options["print_config"]:
    config = config if config is not None else schema.base_config()
    _print(schema.describe(config))
    schema.check_values(config)
    return
  if config is None:
    raise UsageError("--config is required, e.g. --config=configs/food101_mini.py (see --help)")
  schema.check_values(config)
  if not options["workdir"]:
    raise UsageError("--workdir is required: the folder for checkpoints, metrics and the report "
                     "(--print_config shows the config without running)")
  _run(config, options)


def exit_on_error(body: Callable[[], Any], *, rerun: str = "the same command") -> None:
  """Runs `body()`; a usage, config, data, store or training error, a stop request or Ctrl-C
  becomes one line on stderr and SystemExit with its code (see `main`), telling the user to run
  `rerun` again where that resumes. Any other exception propagates with its traceback."""
  try:
    body()
  except UsageError as e:
    _fail("usage error", e)
  except KeyboardInterrupt:
    _fail("interrupted", f"stopped by Ctrl-C; rerun {rerun} to resume from the last checkpoint",
          code=130)
  except ConfigError as e:
    _fail("config error", e)
  except Exception as e:  # noqa: BLE001  (only the pipeline's own error types; the rest re-raised)
    known = _pipeline_error(e, rerun)
    if known is None:
      raise
    label, message, code = known
    _fail(label, message, code=code)


def console_main() -> None:
  """Entry point of the `jaxkd` console script (same flags as main.py)."""
  main()


if __name__ == "__main__":
  main()
