"""The benchmark sections, each run in its own child process of ``bench/run.py``
(``run.py --_section NAME``): ``info`` (backend and devices), ``student`` (the distillation
training step for each loss), ``teacher`` (inference and CE training step), ``input`` (tf.data
preprocessing, ``bench/bench_input.py``) and ``depthwise`` (``bench/bench_depthwise.py``).

Each returns a JSON-serialisable dict. jax, TensorFlow and jaxkd are imported inside the
functions: the parent process imports this module for ``STUDENT_LOSSES`` and the model names.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

from bench.machine import version
from bench.timing import jax_setup, loss_head_ms, macs_per_image, row, time_steps, train_rows

STUDENT_MODEL = "mobilenet_v3_large_eca"
TEACHER_MODEL = "resnet50"

# name -> (table label, jaxkd.train.step.LossConfig fields), in table order; CE is the reference
# for the overhead.
STUDENT_LOSSES = {
    "ce": ("CE", dict(kind="ce")),
    "kd": ("KD", dict(kind="kd", kd_alpha=0.5, temperature=4.0)),
    "dkd": ("DKD", dict(kind="dkd", alpha=1.0, beta=8.0, temperature=4.0)),
    "dkd_pr": ("DKD + perception",
               dict(kind="dkd", alpha=1.0, beta=8.0, temperature=4.0, perception=True)),
}


def section_info(args: argparse.Namespace) -> dict:
  """Backend and devices as JAX sees them."""
  import jax
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_count": len(devices),
          "device_kind": devices[0].device_kind, "platform": devices[0].platform,
          "versions": {"jax": jax.__version__, "jaxlib": version("jaxlib"),
                       "flax": version("flax"), "optax": version("optax"),
                       "numpy": version("numpy")}}


def _no_tensorflow(section: str) -> None:
  if "tensorflow" in sys.modules:
    raise RuntimeError(f"benchmark section {section!r} imported TensorFlow, which the GPU machines "
                       "do not have; jaxkd.train and jaxkd.models must stay TensorFlow-free")


def section_student(args: argparse.Namespace) -> dict:
  """The student's training step for each of `args.losses`, plus the losses' own cost measured
  on a one-layer network (`timing.loss_head_ms`)."""
  from jaxkd import models
  mesh, dtype, batch = jax_setup(args)
  model = models.create(args.student_model, num_classes=args.num_classes, dtype=dtype)
  macs = macs_per_image(model, args.image_size)
  losses = [(k, *STUDENT_LOSSES[k]) for k in args.losses]
  rows = train_rows("student", args.student_model, model, losses, 1e-3, mesh, dtype, batch, args,
                    macs)
  ce = next((r for r in rows if r["key"] == "ce"), None)
  if ce is not None and len(losses) > 1:
    head = loss_head_ms(losses, mesh, batch, args)
    for r in rows:
      r["head_ms"] = head[r["key"]]
      r["loss_cost"] = (head[r["key"]] - head["ce"]) / ce["step_ms"]
  _no_tensorflow("student")
  return {"rows": rows, "macs": macs, "devices": int(mesh.devices.size)}


def _teacher_inference_row(model, mesh, batch, args: argparse.Namespace, macs: float) -> dict:
  """The eval step (the teacher-logit precompute, eval-mode BatchNorm), timed. Its state and
  compiled program are freed on return, before the training step is built."""
  import jax
  import optax

  from jaxkd.train import state as state_lib
  from jaxkd.train import step as step_lib

  state = state_lib.create_train_state(model, jax.random.key(0),
                                       (1, args.image_size, args.image_size, 3),
                                       optax.identity(), mesh=mesh)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  variables = state.variables()
  eval_step = step_lib.make_eval_step(model, mesh)
  arrays = {k: batch[k] for k in ("image", "label", "weight")}
  start = time.perf_counter()
  compiled = eval_step.jitted.lower(variables, arrays).compile()
  compile_s = time.perf_counter() - start
  times, _ = time_steps(lambda _: compiled(variables, arrays), None, steps=args.steps,
                        warmup=args.warmup, repeats=args.repeats)
  out = row("teacher", args.teacher_model, "inference", "forward (eval step)", "infer", params,
            compile_s, times, args, 2.0 * macs, dtype_name=args.dtype)
  print(f"  {args.teacher_model} inference          compile {compile_s:6.1f} s  "
        f"{out['step_ms']:9.1f} ms/step {out['images_per_s']:9.1f} img/s", flush=True)
  return out


def section_teacher(args: argparse.Namespace) -> dict:
  """The teacher's inference (eval step) and its CE training step."""
  from jaxkd import models
  mesh, dtype, batch = jax_setup(args)
  model = models.create(args.teacher_model, num_classes=args.num_classes, dtype=dtype)
  macs = macs_per_image(model, args.image_size)
  rows = [_teacher_inference_row(model, mesh, batch, args, macs)]
  rows += train_rows("teacher", args.teacher_model, model, [("ce", "CE", dict(kind="ce"))], 3e-4,
                     mesh, dtype, batch, args, macs)
  _no_tensorflow("teacher")
  return {"rows": rows, "macs": macs, "devices": int(mesh.devices.size)}


def section_input(args: argparse.Namespace) -> dict:
  """tf.data preprocessing images/s on the Food-101 JPEGs under `args.data_root`."""
  from bench import bench_input
  if args.quick:
    rows = bench_input.run(data_root=args.data_root, image_size=args.image_size, num_images=64,
                           passes=1, rounds=1, num_parallel_calls=(1, None))
  else:
    rows = bench_input.run(data_root=args.data_root, image_size=args.image_size)
  return {"rows": rows, "markdown": bench_input.markdown_table(rows),
          "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
          "note": (f"Food-101 512-px JPEGs held in memory, {rows[0]['source_images']} images, "
                   f"median of {rows[0]['rounds']} rounds with the modes timed in turn, "
                   f"{rows[0]['cores']} CPU cores available")}


def section_depthwise(args: argparse.Namespace) -> dict:
  """bench/bench_depthwise.py's `run()`, with its own markdown table when it has one."""
  from bench import bench_depthwise
  from bench.render import generic_table
  wanted = {"quick": args.quick, "verbose": True}
  accepted = inspect.signature(bench_depthwise.run).parameters
  rows = bench_depthwise.run(**{k: v for k, v in wanted.items() if k in accepted})
  table = getattr(bench_depthwise, "markdown_table", None)
  markdown = table(rows) if table is not None else generic_table(rows)
  return {"rows": rows, "markdown": markdown}


SECTION_FNS = {"info": section_info, "student": section_student, "teacher": section_teacher,
               "input": section_input, "depthwise": section_depthwise}
