"""jaxkd benchmarks: one entry point that runs every benchmark and appends a markdown report.

    python bench/run.py [--quick] [--device-label=...] [--out=BENCHMARKS.md]
                        [--only=student,teacher,input,torch,depthwise]
                        [--torch-python=PATH] [--data-root=DIR]

Runs on whatever backend JAX finds (CPU, GPU, TPU), prints the report and APPENDS it to `--out`
with the date, the machine (CPU model and cores, accelerator), backend, versions and the exact
command line. Sections (each in its own subprocess, so peak memory is per section and a GPU is
held by one process at a time):

* student: one distillation training step of MobileNetV3-Large + ECA (`mobilenet_v3_large_eca`)
  from stored teacher logits (synthetic `teacher_logits` in the batch), for the losses CE, KD
  (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531,
  2015; 0.5 CE + 0.5 T^2 KL, T = 4, the loss of the Food-101 KD + ECA manuscript below), DKD
  (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; alpha 1, beta 8, T 4) and DKD +
  perception reconstruction; step time, images/s, overhead vs CE, XLA compile time. The losses
  run interleaved repeat by repeat (paired ratios to CE), and once more on a one-layer network,
  which isolates the losses' own cost.
* teacher: ResNet-50 inference (the eval step: the teacher-logit precompute) and CE training step.
* input: tf.data preprocessing images/s (bench/bench_input.py), only where TensorFlow and
  `--data-root`/food-101-mini exist (default data root: ../shared/data beside the repository).
* torch: the same model steps in PyTorch eager (bench/torch_baseline.py, run by the interpreter
  of `--torch-python`, else of the JAXKD_TORCH_PYTHON environment variable, else the first of
  this python and the `python3`s on PATH that imports torch), and the ratio JAX / PyTorch.
* depthwise: bench/bench_depthwise.py's `run()`, when that file exists.

Method: synthetic device-resident batches (the step is measured, not the input), the jitted
data-parallel step of `jaxkd.train.step` over all devices with the state donated, compiled ahead
of time (`lower().compile()`, reported as compile time), warm-up steps, then N timed steps with a
single `jax.block_until_ready` after the last. Compute dtype bfloat16 on GPU/TPU and float32 on
CPU unless `--dtype`. Optimizer as the Food-101 KD + ECA manuscript's recipe
(configs/food101_eca.py): Adam (L2 1e-4) + one-cycle (lr 1e-3 student, 3e-4 teacher).

FLOPs: analytic multiply-accumulates of the convolutions and dense layers
(`jaxkd.models.cost.count_macs`, batch 1): inference = 2 x MACs per image, training ~= 3 x 2 x
MACs (forward + two backward products). MFU = achieved FLOP/s / the device's dense bf16 peak
(`PEAK_BF16_TFLOPS` in bench/machine.py; only for bfloat16 compute on a known device).

Modules: bench/machine.py (CPU, versions, memory, peak FLOP/s), bench/timing.py (how a step is
timed), bench/sections.py (what each section measures, in its child process), bench/render.py
(the markdown report); this file is the command line and runs the child processes.

The Food-101 KD + ECA manuscript: "A lightweight food image classification model based on
knowledge distillation and the ECA attention mechanism" (in Chinese; it names no authors, venue
or year): ResNet-50 teacher, MobileNetV3-Large + ECA student, KD with Adam (weight decay 1e-4)
and a one-cycle schedule, batch 32.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

from bench.machine import GLIBC_NO_RELEASE, PEAK_BF16_TFLOPS, peak_bf16_tflops  # noqa: E402
from bench.render import append_report, render  # noqa: E402
from bench.sections import SECTION_FNS, STUDENT_LOSSES, STUDENT_MODEL, TEACHER_MODEL  # noqa: E402

__all__ = ["main", "parse_args", "append_report", "render", "peak_bf16_tflops",
           "PEAK_BF16_TFLOPS", "find_torch_python", "SECTIONS", "TORCH_PYTHON_ENV"]

SECTIONS = ("student", "teacher", "input", "torch", "depthwise")
# Where the real Food-101 JPEGs of the input section are by default: ../shared/data beside the
# repository (`--data-root` overrides; the section is skipped, with a note, when it is absent).
DEFAULT_DATA_ROOT = _REPO.parent / "shared" / "data"
# Interpreter with torch for the PyTorch baseline when `--torch-python` is not given.
TORCH_PYTHON_ENV = "JAXKD_TORCH_PYTHON"


# ----------------------------------------------------------------------------------------------
# Child processes (this process never imports jax or TensorFlow itself).


def _child_args(args: argparse.Namespace) -> list[str]:
  out = ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
         "--num-classes", str(args.num_classes), "--dtype", args.dtype,
         "--losses", ",".join(args.losses), "--data-root", str(args.data_root),
         "--student-model", args.student_model, "--teacher-model", args.teacher_model]
  if args.steps is not None:
    out += ["--steps", str(args.steps)]
  if args.warmup is not None:
    out += ["--warmup", str(args.warmup)]
  if args.repeats is not None:
    out += ["--repeats", str(args.repeats)]
  if args.quick:
    out.append("--quick")
  return out


def child_env(args: argparse.Namespace) -> dict:
  """Environment of the section and PyTorch child processes (--malloc)."""
  env = dict(os.environ)
  if args.malloc == "no-release":
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), GLIBC_NO_RELEASE)
                                     if t)
  return env


def run_section(name: str, args: argparse.Namespace) -> dict:
  """Runs one section in a child process of this interpreter; its output streams to the
  console."""
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "result.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_section", name,
           "--_result", str(result), *_child_args(args)]
    proc = subprocess.run(cmd, cwd=_REPO, env=child_env(args))
    if proc.returncode != 0:
      raise RuntimeError(f"benchmark section {name!r} failed (exit code {proc.returncode}); its "
                         f"output is above. Command: {shlex.join(cmd)}")
    return json.loads(result.read_text())


def _imports_torch(python: str) -> bool:
  try:
    return subprocess.run([python, "-c", "import torch"], capture_output=True,
                          timeout=300).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def _path_pythons() -> list[str]:
  """Every `python3` on PATH, in PATH order, one per real file."""
  found, seen = [], set()
  for folder in os.environ.get("PATH", "").split(os.pathsep):
    python = os.path.join(folder, "python3")
    if folder and os.path.isfile(python) and os.access(python, os.X_OK):
      real = os.path.realpath(python)
      if real not in seen:
        seen.add(real)
        found.append(python)
  return found


def find_torch_python(requested: str | None) -> tuple[str | None, str]:
  """(interpreter, how it was chosen) for the PyTorch baseline; (None, why) when none has torch.

  `requested` (--torch-python), else the JAXKD_TORCH_PYTHON environment variable, must import
  torch (RuntimeError otherwise); without either, the first of this python and the `python3`s on
  PATH that imports torch.
  """
  for python, source in ((requested, "--torch-python"),
                         (os.environ.get(TORCH_PYTHON_ENV), TORCH_PYTHON_ENV)):
    if python:
      if not _imports_torch(python):
        raise RuntimeError(f"{source}={python!r} cannot import torch; give an interpreter that "
                           "has torch (and torchvision), or neither --torch-python nor "
                           f"{TORCH_PYTHON_ENV} to auto-detect one")
      return python, source
  candidates = [sys.executable] + [p for p in _path_pythons()
                                   if os.path.realpath(p) != os.path.realpath(sys.executable)]
  for python in candidates:
    if _imports_torch(python):
      return python, "auto-detected"
  return None, (f"no Python interpreter with torch found (tried {candidates}); pass "
                f"--torch-python=PATH or set {TORCH_PYTHON_ENV}=PATH to one that has torch and "
                "torchvision (bench/README.md shows how to make one)")


def run_torch(args: argparse.Namespace) -> dict:
  """Runs bench/torch_baseline.py with the interpreter of `find_torch_python`; {'skipped': why}
  when there is none."""
  python, how = find_torch_python(args.torch_python)
  if python is None:
    print(f"== torch skipped: {how}", flush=True)
    return {"skipped": f"PyTorch baseline skipped: {how}"}
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "torch.json"
    cmd = [python, str(_REPO / "bench" / "torch_baseline.py"),
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--num-classes", str(args.num_classes), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--precision", args.dtype_requested, "--json-out", str(result)]
    print(f"== torch ({python}, {how})", flush=True)
    proc = subprocess.run(cmd, cwd=_REPO, env=child_env(args))
    if proc.returncode != 0:
      raise RuntimeError(f"PyTorch baseline failed (exit code {proc.returncode}); its output is "
                         f"above. Command: {shlex.join(cmd)}")
    out = json.loads(result.read_text())
  out["chosen"] = how
  return out


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: batch 8, 64 px, 1 warm-up + 2 timed steps (explicit flags "
                           "still win)")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {SECTIONS} (default: all; depthwise, a CPU "
                           "benchmark, only on the CPU backend unless named here)")
  parser.add_argument("--out", default=str(_REPO / "BENCHMARKS.md"),
                      help="markdown file the report is appended to (default: the repository's "
                           "BENCHMARKS.md)")
  parser.add_argument("--device-label", default=None,
                      help="title of the report (default: the device name)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="global batch (default 32; 8 with --quick)")
  parser.add_argument("--image-size", type=int, default=None, help="default 224; 64 with --quick")
  parser.add_argument("--num-classes", type=int, default=101)
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps (default: 2 with --quick, 3 on CPU, 50 on GPU/TPU)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps after compiling (default: 1 with --quick or on CPU, 10 "
                           "on GPU/TPU)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats of --steps steps; the median is reported (default: 1 "
                           "with --quick, else 3)")
  parser.add_argument("--malloc", default="default", choices=("default", "no-release"),
                      help="glibc malloc of the JAX and PyTorch child processes: default, or "
                           "no-release (GLIBC_TUNABLES that keep freed memory in the process "
                           "instead of returning it to the kernel and page-faulting it in again "
                           "every step; applied to both frameworks)")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="model compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); also "
                           "the PyTorch precision (bfloat16 = autocast)")
  parser.add_argument("--student-model", default=STUDENT_MODEL,
                      help="jaxkd.models name of the student (the PyTorch comparison needs the "
                           "default)")
  parser.add_argument("--teacher-model", default=TEACHER_MODEL,
                      help="jaxkd.models name of the teacher (the PyTorch comparison needs the "
                           "default)")
  parser.add_argument("--losses", default=",".join(STUDENT_LOSSES),
                      help=f"student losses, comma-separated subset of {tuple(STUDENT_LOSSES)}")
  parser.add_argument("--torch-python", default=None,
                      help="interpreter with torch (and torchvision) for the PyTorch baseline "
                           f"(default: ${TORCH_PYTHON_ENV} when set, else the first of this "
                           "python and the python3s on PATH that imports torch; the section is "
                           "skipped, with a note, when none does)")
  parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                      help="folder holding food-101-mini/ for the input section (default: "
                           "../shared/data beside the repository; the section is skipped, with a "
                           "note, when it is absent)")
  parser.add_argument("--_section", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  args.only_given = args.only is not None
  args.only = list(SECTIONS) if args.only is None else [s for s in args.only.split(",") if s]
  bad = [s for s in args.only if s not in SECTIONS]
  if bad or not args.only:
    parser.error(f"--only: unknown section(s) {bad or args.only}; choose from {','.join(SECTIONS)}")
  args.losses = [s for s in args.losses.split(",") if s]
  bad = [s for s in args.losses if s not in STUDENT_LOSSES]
  if bad or not args.losses:
    parser.error(f"--losses: unknown loss(es) {bad or args.losses}; choose from "
                 f"{','.join(STUDENT_LOSSES)}")
  if args.batch_size is None:
    args.batch_size = 8 if args.quick else 32
  if args.image_size is None:
    args.image_size = 64 if args.quick else 224
  for name in ("batch_size", "image_size", "num_classes"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  if args.warmup is not None and args.warmup < 0:
    parser.error(f"--warmup must be >= 0, got {args.warmup}")
  if args.repeats is not None and args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  return args


def _skip_note(section: str, args: argparse.Namespace, backend: str) -> str | None:
  """Why `section` is not run on this machine, None when it is."""
  if section == "input":
    data = pathlib.Path(args.data_root) / "food-101-mini"
    if importlib.util.find_spec("tensorflow") is None:
      return "Input pipeline skipped: TensorFlow is not installed in this environment."
    if not data.is_dir():
      return (f"Input pipeline skipped: {data} not found; pass --data-root=DIR, a folder "
              "holding food-101-mini/ (default: ../shared/data beside the repository).")
  if section == "depthwise" and not (_REPO / "bench" / "bench_depthwise.py").exists():
    return "Depthwise benchmark skipped: bench/bench_depthwise.py does not exist yet."
  if section == "depthwise" and backend != "cpu" and not args.only_given:
    return (f"Depthwise benchmark (a CPU micro-benchmark) skipped on the {backend} backend; "
            "--only=...,depthwise runs it anyway.")
  return None


def main(argv: Sequence[str] | None = None) -> str:
  args = parse_args(argv)
  if args._section:  # child process
    if args._section not in SECTION_FNS:
      raise ValueError(f"unknown section {args._section!r}")
    result = SECTION_FNS[args._section](args)
    pathlib.Path(args._result).write_text(json.dumps(result))
    return ""

  started = datetime.datetime.now(datetime.UTC)
  command = shlex.join([sys.executable] + (list(argv) if argv is not None else sys.argv))
  print("== info", flush=True)
  info = run_section("info", args)
  backend = info["backend"]
  accelerated = backend != "cpu"
  args.dtype_requested = args.dtype
  if args.dtype == "auto":
    args.dtype = "bfloat16" if accelerated else "float32"
  if args.steps is None:
    args.steps = 2 if args.quick else (50 if accelerated else 3)
  if args.warmup is None:
    args.warmup = 1 if (args.quick or not accelerated) else 10
  if args.repeats is None:
    args.repeats = 1 if args.quick else 3
  print(f"   backend {backend}, {info['device_count']} x {info['device_kind']}; dtype "
        f"{args.dtype}, batch {args.batch_size}, {args.image_size} px, {args.warmup} warm-up + "
        f"{args.repeats} x {args.steps} timed steps", flush=True)

  results: dict[str, Any] = {}
  notes: list[str] = []
  for section in SECTIONS:
    if section not in args.only:
      continue
    note = _skip_note(section, args, backend)
    if note:
      notes.append(note)
      continue
    if section == "torch":
      results["torch"] = run_torch(args)
      continue
    print(f"== {section}", flush=True)
    results[section] = run_section(section, args)

  if accelerated and any(s in results for s in ("student", "teacher")):
    notes.append("On GPU the first compile in each section process includes XLA's convolution "
                 "autotuning; later compiles in the same process reuse its results.")
  report = render(args, info, results, notes, command, started)
  print("\n" + report)
  out = pathlib.Path(args.out)
  append_report(out, report)
  print(f"appended to {out.resolve()}")
  return report


if __name__ == "__main__":
  main()
