"""jaxkd benchmarks: one entry point that runs every benchmark and appends a markdown report.

    python bench/run.py [--quick] [--device-label=...] [--out=BENCHMARKS.md]
                        [--only=student,teacher,input,torch,depthwise]

Runs on whatever backend JAX finds (CPU, GPU, TPU), prints the report and APPENDS it to `--out`
with the date, the machine (CPU model and cores, accelerator), backend, versions and the exact
command line. Sections (each in its own subprocess, so peak memory is per section and a GPU is
held by one process at a time):

* student: one distillation training step of MobileNetV3-Large + ECA (`mobilenet_v3_large_eca`) from
  stored teacher logits (synthetic `teacher_logits` in the batch), for the losses CE, KD (seed 000:
  0.5 CE + 0.5 T^2 KL, T = 4), DKD (alpha 1, beta 8, T 4) and DKD + perception reconstruction;
  step time, images/s, overhead vs CE, XLA compile time. The losses run interleaved repeat by repeat
  (paired ratios to CE), and once more on a one-layer network, which isolates the losses' own cost.
* teacher: ResNet-50 inference (the eval step: the teacher-logit precompute) and CE training step.
* input: tf.data preprocessing images/s (bench/bench_input.py), only where TensorFlow and
  ../shared/data/food-101-mini exist.
* torch: the same model steps in PyTorch eager (bench/torch_baseline.py, run with `--torch-python`),
  and the ratio JAX / PyTorch.
* depthwise: bench/bench_depthwise.py's `run()`, when that file exists.

Method: synthetic device-resident batches (the step is measured, not the input), the jitted
data-parallel step of `jaxkd.train.step` over all devices with the state donated, compiled ahead of
time (`lower().compile()`, reported as compile time), warm-up steps, then N timed steps with a single
`jax.block_until_ready` after the last. Compute dtype bfloat16 on GPU/TPU and float32 on CPU unless
`--dtype`. Optimizer as the seed-000 config: Adam (L2 1e-4) + one-cycle (lr 1e-3 student, 3e-4 teacher).

FLOPs: analytic multiply-accumulates of the convolutions and dense layers
(`jaxkd.models.cost.count_macs`, batch 1): inference = 2 x MACs per image, training ~= 3 x 2 x MACs
(forward + two backward products). MFU = achieved FLOP/s / the device's dense bf16 peak
(`PEAK_BF16_TFLOPS`; only for bfloat16 compute on a known device).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

SECTIONS = ("student", "teacher", "input", "torch", "depthwise")
STUDENT_MODEL = "mobilenet_v3_large_eca"
TEACHER_MODEL = "resnet50"
DEFAULT_DATA_ROOT = _REPO.parent / "shared" / "data"
TORCH_VENV_PYTHON = _REPO.parent / "torchvenv" / "bin" / "python"

# name -> (jaxkd.train.step.LossConfig fields), in table order; CE is the reference for the overhead.
STUDENT_LOSSES = {
    "ce": ("CE", dict(kind="ce")),
    "kd": ("KD", dict(kind="kd", kd_alpha=0.5, temperature=4.0)),
    "dkd": ("DKD", dict(kind="dkd", alpha=1.0, beta=8.0, temperature=4.0)),
    "dkd_pr": ("DKD + perception", dict(kind="dkd", alpha=1.0, beta=8.0, temperature=4.0, perception=True)),
}

# Dense (no sparsity) bfloat16 peak TFLOP/s by jax device_kind (lower-cased substring; first match wins).
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


def peak_bf16_tflops(device_kind: Optional[str]) -> Optional[float]:
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
  """'model name' from /proc/cpuinfo (platform.processor() elsewhere), and the logical CPU count."""
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
  return f"{name} ({logical or os.cpu_count()} logical CPUs, {cores()} available to this process)"


def version(dist: str) -> Optional[str]:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------------------------------
# Sections (run in a child process: `run.py --_section NAME --_result FILE ...`).


def _device_peak_mib() -> Optional[float]:
  import jax
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def section_info(args: argparse.Namespace) -> dict:
  """Backend and devices as JAX sees them."""
  import jax
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_count": len(devices),
          "device_kind": devices[0].device_kind, "platform": devices[0].platform,
          "versions": {"jax": jax.__version__, "jaxlib": version("jaxlib"), "flax": version("flax"),
                       "optax": version("optax"), "numpy": version("numpy")}}


def _no_tensorflow(section: str) -> None:
  if "tensorflow" in sys.modules:
    raise RuntimeError(f"benchmark section {section!r} imported TensorFlow, which the GPU machines do not "
                       "have; jaxkd.train and jaxkd.models must stay TensorFlow-free")


def _jax_setup(args: argparse.Namespace):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxkd.train import step as step_lib

  mesh = step_lib.data_mesh()
  n = mesh.devices.size
  if args.batch_size % n:
    raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {n} devices of the data mesh; "
                     f"use a multiple of {n}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  rng = np.random.default_rng(0)
  b, s, c = args.batch_size, args.image_size, args.num_classes
  host = {"image": rng.standard_normal((b, s, s, 3), np.float32),
          "label": rng.integers(0, c, (b,), dtype=np.int32),
          "weight": np.ones((b,), np.float32),
          "teacher_logits": 3.0 * rng.standard_normal((b, c)).astype(np.float32)}
  batch = jax.device_put(host, step_lib.batch_sharding(mesh))
  return mesh, dtype, batch


def _macs(model, image_size: int) -> float:
  import jax
  import jax.numpy as jnp

  from jaxkd.models.cost import count_macs
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return float(count_macs(model, variables, images, train=False))


def time_steps(step: Callable[[Any], Any], carry: Any, *, steps: int, warmup: int,
               repeats: int) -> tuple[list[float], Any]:
  """Seconds of `steps` calls carry = step(carry), per repeat, after `warmup` untimed calls.

  Dispatch is asynchronous: the only synchronisation is one jax.block_until_ready after the last call
  of each repeat (and after the warm-up), so the host never waits on a step inside a repeat.
  """
  import jax
  for _ in range(warmup):
    carry = step(carry)
  jax.block_until_ready(carry)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      carry = step(carry)
    jax.block_until_ready(carry)
    times.append(time.perf_counter() - start)
  return times, carry


def _train_rows(role: str, model_name: str, model, losses: Sequence[tuple[str, str, dict]], lr: float,
                mesh, dtype, batch, args, macs: float, verbose: bool = True) -> list[dict]:
  import jax

  from jaxkd.train import optim as optim_lib
  from jaxkd.train import state as state_lib
  from jaxkd.train import step as step_lib

  tx, schedule = optim_lib.build_optimizer(
      {"optimizer": "adam", "learning_rate": lr, "weight_decay": 1e-4, "schedule": "one_cycle"},
      total_steps=10_000, steps_per_epoch=100)
  state = state_lib.create_train_state(model, jax.random.key(0), (1, args.image_size, args.image_size, 3), tx,
                                       mesh=mesh)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  arrays = {k: batch[k] for k in step_lib.TRAIN_BATCH_KEYS if k in batch}
  compiled = {}
  for key, label, loss_kwargs in losses:
    train_step = step_lib.make_train_step(model, step_lib.LossConfig(**loss_kwargs), tx, mesh,
                                          learning_rate_fn=schedule)
    start = time.perf_counter()
    compiled[key] = (train_step.jitted.lower(state, arrays, None, None).compile(), time.perf_counter() - start)
  # One state per loss (each step donates its state); the losses run interleaved, repeat by repeat, so a
  # slow phase of the machine hits every loss alike and the paired ratios to CE cancel it.
  carries = {key: (jax.tree.map(lambda a: a.copy(), state), None) for key, _, _ in losses}
  steps = {key: (lambda c, fn=fn: fn(c[0], arrays, None, None)) for key, (fn, _) in compiled.items()}
  for key in steps:  # untimed warm-up
    _, carries[key] = time_steps(steps[key], carries[key], steps=0, warmup=args.warmup, repeats=0)
  times: dict[str, list[float]] = {key: [] for key in steps}
  for _ in range(args.repeats):
    for key in steps:
      seconds, carries[key] = time_steps(steps[key], carries[key], steps=args.steps, warmup=0, repeats=1)
      times[key] += seconds
  rows = []
  for key, label, _ in losses:
    loss = float(carries[key][1]["loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"{model_name} {label}: loss {loss} after {args.warmup + args.steps} steps")
    extra = {}
    if "ce" in times and key != "ce":
      extra["vs_ce"] = statistics.median([t / c - 1.0 for t, c in zip(times[key], times["ce"])])
    rows.append(_row(role, model_name, "train", label, key, params, compiled[key][1], times[key], args,
                     6.0 * macs, dtype_name=args.dtype, final_loss=loss, **extra))
    if verbose:
      print(f"  {model_name} train {label:16s} compile {compiled[key][1]:6.1f} s  {rows[-1]['step_ms']:9.1f} ms/step "
            f"{rows[-1]['images_per_s']:9.1f} img/s" + (f"  vs CE {100 * extra['vs_ce']:+.1f}%" if extra else ""),
            flush=True)
  return rows


def _row(role: str, model: str, step: str, label: str, key: str, params: int, compile_s: float,
         times: list[float], args: argparse.Namespace, flops_per_image: float, dtype_name: str, **extra) -> dict:
  seconds = statistics.median(times)
  images_per_s = args.batch_size * args.steps / seconds
  return {"role": role, "model": model, "step": step, "loss": label, "key": key, "params": int(params),
          "batch_size": args.batch_size, "image_size": args.image_size, "dtype": dtype_name,
          "compile_s": compile_s, "steps": args.steps, "repeats": len(times), "seconds": seconds,
          "repeat_seconds": times, "spread": (max(times) - min(times)) / seconds,
          "step_ms": 1e3 * seconds / args.steps, "images_per_s": images_per_s,
          "flops_per_image": flops_per_image, "achieved_tflops": flops_per_image * images_per_s / 1e12,
          "peak_device_mib": _device_peak_mib(), "peak_rss_mib": peak_rss_mib(), **extra}


def _loss_head_ms(losses: Sequence[tuple[str, str, dict]], mesh, batch, args, steps: int = 50) -> dict:
  """ms per training step of each loss on a one-layer "student" (pooled pixels -> Dense -> logits).

  The step is jaxkd's own training step, loss and optimizer included, with the network reduced to almost
  nothing, so the differences between losses are the losses' own cost, free of the full model's noise.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class LogitHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
      logits = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
      return (logits, {}) if return_features else logits

  small = dict(batch, image=batch["image"][:, :4, :4])
  head_args = argparse.Namespace(**{**vars(args), "image_size": 4, "steps": steps})
  rows = _train_rows("head", "head", LogitHead(args.num_classes), losses, 1e-3, mesh, jnp.float32, small,
                     head_args, macs=0.0, verbose=False)
  return {r["key"]: r["step_ms"] for r in rows}


def section_student(args: argparse.Namespace) -> dict:
  from jaxkd import models
  mesh, dtype, batch = _jax_setup(args)
  model = models.create(args.student_model, num_classes=args.num_classes, dtype=dtype)
  macs = _macs(model, args.image_size)
  losses = [(k, *STUDENT_LOSSES[k]) for k in args.losses]
  rows = _train_rows("student", args.student_model, model, losses, 1e-3, mesh, dtype, batch, args, macs)
  ce = next((r for r in rows if r["key"] == "ce"), None)
  if ce is not None and len(losses) > 1:
    head = _loss_head_ms(losses, mesh, batch, args)
    for r in rows:
      r["head_ms"] = head[r["key"]]
      r["loss_cost"] = (head[r["key"]] - head["ce"]) / ce["step_ms"]
  _no_tensorflow("student")
  return {"rows": rows, "macs": macs, "devices": int(mesh.devices.size)}


def section_teacher(args: argparse.Namespace) -> dict:
  import jax

  from jaxkd import models
  from jaxkd.train import state as state_lib
  from jaxkd.train import step as step_lib
  mesh, dtype, batch = _jax_setup(args)
  model = models.create(args.teacher_model, num_classes=args.num_classes, dtype=dtype)
  macs = _macs(model, args.image_size)

  # Inference: the eval step (the teacher-logit precompute), eval-mode BatchNorm.
  import optax
  state = state_lib.create_train_state(model, jax.random.key(0), (1, args.image_size, args.image_size, 3),
                                       optax.identity(), mesh=mesh)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  variables = state.variables()
  eval_step = step_lib.make_eval_step(model, mesh)
  arrays = {k: batch[k] for k in ("image", "label", "weight")}
  start = time.perf_counter()
  compiled = eval_step.jitted.lower(variables, arrays).compile()
  compile_s = time.perf_counter() - start
  times, out = time_steps(lambda _: compiled(variables, arrays), None, steps=args.steps, warmup=args.warmup,
                          repeats=args.repeats)
  rows = [_row("teacher", args.teacher_model, "inference", "forward (eval step)", "infer", params, compile_s,
               times, args, 2.0 * macs, dtype_name=args.dtype)]
  print(f"  {args.teacher_model} inference          compile {compile_s:6.1f} s  {rows[-1]['step_ms']:9.1f} ms/step "
        f"{rows[-1]['images_per_s']:9.1f} img/s", flush=True)
  del state, variables, compiled, out
  rows += _train_rows("teacher", args.teacher_model, model, [("ce", "CE", dict(kind="ce"))], 3e-4, mesh, dtype,
                      batch, args, macs)
  _no_tensorflow("teacher")
  return {"rows": rows, "macs": macs, "devices": int(mesh.devices.size)}


def section_input(args: argparse.Namespace) -> dict:
  from bench import bench_input
  if args.quick:
    rows = bench_input.run(data_root=args.data_root, image_size=args.image_size, num_images=64, passes=1,
                           num_parallel_calls=(1, None))
  else:
    rows = bench_input.run(data_root=args.data_root, image_size=args.image_size)
  return {"rows": rows, "markdown": bench_input.markdown_table(rows),
          "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
          "note": (f"Food-101 512-px JPEGs held in memory, {rows[0]['source_images']} images, "
                   f"{rows[0]['cores']} CPU cores available")}


def _generic_table(rows: list[dict]) -> str:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def section_depthwise(args: argparse.Namespace) -> dict:
  from bench import bench_depthwise
  wanted = {"quick": args.quick, "verbose": True}
  accepted = inspect.signature(bench_depthwise.run).parameters
  rows = bench_depthwise.run(**{k: v for k, v in wanted.items() if k in accepted})
  table = getattr(bench_depthwise, "markdown_table", None)
  markdown = table(rows) if table is not None else _generic_table(rows)
  return {"rows": rows, "markdown": markdown}


_SECTION_FNS = {"info": section_info, "student": section_student, "teacher": section_teacher,
                "input": section_input, "depthwise": section_depthwise}


# ----------------------------------------------------------------------------------------------------
# Orchestration (parent process: never imports jax or TensorFlow itself).


def _child_args(args: argparse.Namespace) -> list[str]:
  out = ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
         "--num-classes", str(args.num_classes), "--dtype", args.dtype, "--losses", ",".join(args.losses),
         "--data-root", str(args.data_root), "--student-model", args.student_model,
         "--teacher-model", args.teacher_model]
  if args.steps is not None:
    out += ["--steps", str(args.steps)]
  if args.warmup is not None:
    out += ["--warmup", str(args.warmup)]
  if args.repeats is not None:
    out += ["--repeats", str(args.repeats)]
  if args.quick:
    out.append("--quick")
  return out


# glibc's malloc returns every freed block over 32 MiB (and worker threads' large blocks) to the kernel, so a
# CPU training step that allocates GBs of fresh buffers page-faults them in again on every step (the JAX student
# step at batch 32: ~400k faults, 1.6 GB of zeroed pages). These tunables keep freed memory in the process.
GLIBC_NO_RELEASE = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                    "glibc.malloc.trim_threshold=1099511627776")


def child_env(args: argparse.Namespace) -> dict:
  """Environment of the section and PyTorch child processes (--malloc)."""
  env = dict(os.environ)
  if args.malloc == "no-release":
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), GLIBC_NO_RELEASE) if t)
  return env


def run_section(name: str, args: argparse.Namespace) -> dict:
  """Runs one section in a child process of this interpreter; its output streams to the console."""
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "result.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_section", name, "--_result", str(result),
           *_child_args(args)]
    proc = subprocess.run(cmd, cwd=_REPO, env=child_env(args))
    if proc.returncode != 0:
      raise RuntimeError(f"benchmark section {name!r} failed (exit code {proc.returncode}); its output is "
                         f"above. Command: {shlex.join(cmd)}")
    return json.loads(result.read_text())


def _imports_torch(python: str) -> bool:
  try:
    return subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=300).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def find_torch_python(requested: Optional[str], backend: str) -> tuple[Optional[str], str]:
  """(interpreter, how it was chosen); None when no candidate imports torch."""
  if requested:
    if not _imports_torch(requested):
      raise RuntimeError(f"--torch-python={requested!r} cannot import torch; pass an interpreter that has "
                         "torch (and torchvision), or leave the flag out to auto-detect")
    return requested, "--torch-python"
  candidates = [str(TORCH_VENV_PYTHON), "/usr/bin/python3", sys.executable]
  if backend != "cpu":  # the GPU machines hold torch + torchvision next to a CUDA jax
    candidates = [sys.executable] + candidates[:2]
  for python in candidates:
    if os.path.exists(python) and _imports_torch(python):
      return python, "auto-detected"
  return None, f"none of {candidates} imports torch"


def run_torch(args: argparse.Namespace, backend: str) -> dict:
  python, how = find_torch_python(args.torch_python, backend)
  if python is None:
    return {"skipped": f"PyTorch baseline skipped: {how}"}
  with tempfile.TemporaryDirectory() as tmp:
    result = pathlib.Path(tmp) / "torch.json"
    cmd = [python, str(_REPO / "bench" / "torch_baseline.py"), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--precision", args.dtype_requested, "--json-out", str(result)]
    print(f"== torch ({python}, {how})", flush=True)
    proc = subprocess.run(cmd, cwd=_REPO, env=child_env(args))
    if proc.returncode != 0:
      raise RuntimeError(f"PyTorch baseline failed (exit code {proc.returncode}); its output is above. "
                         f"Command: {shlex.join(cmd)}")
    out = json.loads(result.read_text())
  out["chosen"] = how
  return out


# ----------------------------------------------------------------------------------------------------
# Report.


def _fmt(v: Optional[float], spec: str = ".1f", missing: str = "n/a") -> str:
  return missing if v is None else format(v, spec)


def jax_table(rows: list[dict], peak: Optional[float]) -> str:
  lines = ["| model | step | loss | params | compile s | ms/step | spread | images/s | vs CE | loss cost vs CE | "
           "GFLOP/image | achieved TFLOP/s | MFU | peak device MiB | peak RSS MiB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    vs_ce = loss_cost = ""
    if r["role"] == "student":
      vs_ce = "—" if r["key"] == "ce" else (f"{100.0 * r['vs_ce']:+.1f}%" if "vs_ce" in r else "")
      if "loss_cost" in r:
        loss_cost = "—" if r["key"] == "ce" else f"{100.0 * r['loss_cost']:+.2f}%"
    mfu = (f"{100.0 * r['achieved_tflops'] / peak:.2g}%" if peak and r["dtype"] == "bfloat16" else "—")
    spread = f"{100.0 * r['spread']:.0f}%" if r["repeats"] > 1 else "—"
    lines.append(
        f"| {r['model']} | {r['step']} | {r['loss']} | {r['params']:,} | {r['compile_s']:.1f} | "
        f"{r['step_ms']:.1f} | {spread} | {r['images_per_s']:.1f} | {vs_ce} | {loss_cost} | "
        f"{r['flops_per_image'] / 1e9:.2f} | {r['achieved_tflops']:.3g} | {mfu} | "
        f"{_fmt(r['peak_device_mib'], '.0f')} | {r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


_TORCH_MATCH = {"student_kd": (STUDENT_MODEL, "train", "kd"),
                "teacher_infer": (TEACHER_MODEL, "inference", "infer"),
                "teacher_train": (TEACHER_MODEL, "train", "ce")}
_TORCH_LABEL = {"student_kd": "MobileNetV3-Large + ECA, KD train step",
                "teacher_infer": "ResNet-50 inference", "teacher_train": "ResNet-50 CE train step"}


def torch_table(torch_out: dict, jax_rows: list[dict]) -> str:
  by_key = {(r["model"], r["step"], r["key"]): r for r in jax_rows}
  lines = ["| step | params (torch) | PyTorch ms/step | spread | PyTorch images/s | JAX images/s | JAX / PyTorch | "
           "PyTorch peak device MiB | PyTorch peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in torch_out["rows"]:
    j = by_key.get(_TORCH_MATCH[r["row"]])
    jax_ips = f"{j['images_per_s']:.1f}" if j else "not run"
    ratio = f"{j['images_per_s'] / r['images_per_s']:.2f}x" if j else "—"
    spread = f"{100.0 * r['spread']:.0f}%" if r["repeats"] > 1 else "—"
    lines.append(f"| {_TORCH_LABEL[r['row']]} | {r['params']:,} | {r['step_ms']:.1f} | {spread} | "
                 f"{r['images_per_s']:.1f} | {jax_ips} | {ratio} | {_fmt(r['peak_device_mib'], '.0f')} | "
                 f"{r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


def render(args: argparse.Namespace, info: dict, results: dict, notes: list[str], command: str,
           started: datetime.datetime) -> str:
  backend = info["backend"]
  accel = "none" if backend == "cpu" else f"{info['device_kind']} x {info['device_count']}"
  label = args.device_label or (info["device_kind"] if backend != "cpu" else cpu_model().split(" (")[0])
  versions = {"python": platform.python_version(), **info["versions"]}
  if "input" in results:
    versions["tensorflow"] = results["input"].get("tensorflow")
  torch_out = results.get("torch")
  if torch_out and "rows" in torch_out:
    versions["torch"] = torch_out["torch"]
    versions["torchvision"] = torch_out["torchvision"].split(" model definitions")[0].split(" (")[0].replace(
        "torchvision ", "")
  peak = peak_bf16_tflops(info["device_kind"]) if backend != "cpu" else None
  out = [f"## {started:%Y-%m-%d %H:%M} UTC — {label}{' (--quick)' if args.quick else ''}", "",
         f"- command: `{command}`",
         f"- machine: CPU {cpu_model()}; accelerator: {accel}",
         f"- JAX backend: {backend}, {info['device_count']} device(s) ({info['device_kind']}); data parallel over "
         f"all devices",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
         f"- settings: global batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, compute "
         f"dtype {args.dtype} (params float32), synthetic device-resident data, {args.warmup} warm-up step(s), then "
         f"{args.repeats} repeat(s) of {args.steps} timed steps with one block_until_ready after the last step of "
         f"each (median repeat reported; spread = (max - min) / median); the losses of one model run interleaved, "
         f"repeat by repeat, and 'vs CE' is the median over repeats of the paired step-time ratio to CE; Adam "
         f"(L2 1e-4) + one-cycle",
         "- glibc malloc of every benchmarked process (JAX and PyTorch): " + (
             "default" if args.malloc == "default" else f"no-release (GLIBC_TUNABLES={GLIBC_NO_RELEASE})"),
         ""]
  jax_rows = results.get("student", {}).get("rows", []) + results.get("teacher", {}).get("rows", [])
  if jax_rows:
    out += ["### JAX model steps", "", jax_table(jax_rows, peak), "",
            "GFLOP/image: analytic conv + dense MACs x 2 (inference) or x 6 (training: forward + two backward "
            "products). " + (f"MFU = achieved / {peak:.0f} TFLOP/s dense bf16 peak of {info['device_kind']}."
                             if peak else "MFU only for bfloat16 compute on a device with a known peak "
                             "(bench/run.py PEAK_BF16_TFLOPS).") +
            " Peak memory: per section process, so a row shows the peak so far within its model's section."
            " vs CE: median over repeats of the paired step-time ratio to CE (whole step, so machine noise"
            " included). Loss cost vs CE: the same training step with the network cut to one Dense layer over"
            " pooled pixels (50 steps per repeat, same losses, batch and optimizer), its extra ms over CE as a"
            " share of the full CE step: the losses' own cost.", ""]
  if torch_out:
    if "rows" in torch_out:
      out += ["### PyTorch eager baseline", "", torch_table(torch_out, jax_rows), "",
              f"PyTorch {torch_out['torch']} eager ({torch_out['python']}, Python {torch_out['python_version']}, "
              f"{torch_out['chosen']}), {torch_out['torchvision']}; device {torch_out['device']}, precision "
              f"{torch_out['precision']}. The student is torchvision's mobilenet_v3_large (SE inside the blocks) "
              f"with an ECA module added in bench/torch_baseline.py after each stage (channels "
              f"{next((r['eca_channels'] for r in torch_out['rows'] if 'eca_channels' in r), 'n/a')}), as "
              "jaxkd's mobilenet_v3_large_eca; KD loss 0.5 CE + 0.5 T^2 KL (T 4); Adam + OneCycleLR.", ""]
    else:
      notes.append(torch_out["skipped"])
  if "input" in results:
    out += ["### Input pipeline (tf.data preprocessing)", "", results["input"]["markdown"], "",
            results["input"]["note"] + ".", ""]
  if "depthwise" in results:
    out += ["### Depthwise convolution (bench/bench_depthwise.py)", "", results["depthwise"]["markdown"], ""]
  if notes:
    out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(out)


def append_report(path: pathlib.Path, text: str) -> None:
  new = not path.exists() or path.stat().st_size == 0
  with open(path, "a") as f:
    if new:
      f.write("# jaxkd benchmarks\n\nEach section is appended by `python bench/run.py` (see bench/README.md).\n\n")
    f.write(text.rstrip("\n") + "\n\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: batch 8, 64 px, 1 warm-up + 2 timed steps (explicit flags still win)")
  parser.add_argument("--only", default=None,
                      help=f"comma-separated subset of {SECTIONS} (default: all; depthwise, a CPU benchmark, "
                           "only on the CPU backend unless named here)")
  parser.add_argument("--out", default=str(_REPO / "BENCHMARKS.md"),
                      help="markdown file the report is appended to (default: the repository's BENCHMARKS.md)")
  parser.add_argument("--device-label", default=None, help="title of the report (default: the device name)")
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 32; 8 with --quick)")
  parser.add_argument("--image-size", type=int, default=None, help="default 224; 64 with --quick")
  parser.add_argument("--num-classes", type=int, default=101)
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps (default: 2 with --quick, 3 on CPU, 50 on GPU/TPU)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps after compiling (default: 1 with --quick or on CPU, 10 on GPU/TPU)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats of --steps steps; the median is reported (default: 1 with --quick, "
                           "else 3)")
  parser.add_argument("--malloc", default="default", choices=("default", "no-release"),
                      help="glibc malloc of the JAX and PyTorch child processes: default, or no-release "
                           "(GLIBC_TUNABLES that keep freed memory in the process instead of returning it to the "
                           "kernel and page-faulting it in again every step; applied to both frameworks)")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="model compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); also the "
                           "PyTorch precision (bfloat16 = autocast)")
  parser.add_argument("--student-model", default=STUDENT_MODEL,
                      help="jaxkd.models name of the student (the PyTorch comparison needs the default)")
  parser.add_argument("--teacher-model", default=TEACHER_MODEL,
                      help="jaxkd.models name of the teacher (the PyTorch comparison needs the default)")
  parser.add_argument("--losses", default=",".join(STUDENT_LOSSES),
                      help=f"student losses, comma-separated subset of {tuple(STUDENT_LOSSES)}")
  parser.add_argument("--torch-python", default=None,
                      help="interpreter with torch for the PyTorch baseline (default: auto-detect "
                           f"{TORCH_VENV_PYTHON}, /usr/bin/python3, this python; this python first on GPU)")
  parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding food-101-mini/")
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
    parser.error(f"--losses: unknown loss(es) {bad or args.losses}; choose from {','.join(STUDENT_LOSSES)}")
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


def main(argv: Optional[Sequence[str]] = None) -> str:
  args = parse_args(argv)
  if args._section:  # child process
    if args._section not in _SECTION_FNS:
      raise ValueError(f"unknown section {args._section!r}")
    result = _SECTION_FNS[args._section](args)
    pathlib.Path(args._result).write_text(json.dumps(result))
    return ""

  started = datetime.datetime.now(datetime.timezone.utc)
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
  print(f"   backend {backend}, {info['device_count']} x {info['device_kind']}; dtype {args.dtype}, batch "
        f"{args.batch_size}, {args.image_size} px, {args.warmup} warm-up + {args.repeats} x {args.steps} timed "
        "steps", flush=True)

  results: dict[str, Any] = {}
  notes: list[str] = []
  for section in SECTIONS:
    if section not in args.only:
      continue
    if section == "input":
      data = pathlib.Path(args.data_root) / "food-101-mini"
      if importlib.util.find_spec("tensorflow") is None:
        notes.append("Input pipeline skipped: TensorFlow is not installed in this environment.")
        continue
      if not data.is_dir():
        notes.append(f"Input pipeline skipped: {data} not found (the real JPEGs live in ../shared/data).")
        continue
    if section == "depthwise" and not (_REPO / "bench" / "bench_depthwise.py").exists():
      notes.append("Depthwise benchmark skipped: bench/bench_depthwise.py does not exist yet.")
      continue
    if section == "depthwise" and accelerated and not args.only_given:
      notes.append(f"Depthwise benchmark (a CPU micro-benchmark) skipped on the {backend} backend; "
                   "--only=...,depthwise runs it anyway.")
      continue
    if section == "torch":
      results["torch"] = run_torch(args, backend)
      continue
    print(f"== {section}", flush=True)
    results[section] = run_section(section, args)

  if accelerated and any(s in results for s in ("student", "teacher")):
    notes.append("On GPU the first compile in each section process includes XLA's convolution autotuning; "
                 "later compiles in the same process reuse its results.")
  report = render(args, info, results, notes, command, started)
  print("\n" + report)
  out = pathlib.Path(args.out)
  append_report(out, report)
  print(f"appended to {out.resolve()}")
  return report


if __name__ == "__main__":
  main()
