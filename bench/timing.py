"""How a JAX step is timed: synthetic device-resident batches, ahead-of-time compilation, warm-up,
then repeats of N asynchronously dispatched steps with one ``jax.block_until_ready`` after the last
(``time_steps``), summarised as one table row per step (``row``).

jax, flax and jaxkd are imported inside the functions: the parent process of ``bench/run.py``
imports this module (through ``bench.sections``) and must stay free of them.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.machine import device_peak_mib, peak_rss_mib


def median_ms(fn: Callable, args: Sequence, repeats: int) -> float:
  """Milliseconds of ``fn(*args)`` to ``jax.block_until_ready``: the median of ``repeats`` calls
  after one untimed call (compile and warm-up), for the single-layer micro-benchmarks."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def jax_setup(args: argparse.Namespace):
  """(mesh, compute dtype, batch): the data mesh over all devices and a synthetic batch of
  `args.batch_size` images (with teacher logits) already on the devices."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxkd.train import step as step_lib

  mesh = step_lib.data_mesh()
  n = mesh.devices.size
  if args.batch_size % n:
    raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {n} devices of the "
                     f"data mesh; use a multiple of {n}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  rng = np.random.default_rng(0)
  b, s, c = args.batch_size, args.image_size, args.num_classes
  host = {"image": rng.standard_normal((b, s, s, 3), np.float32),
          "label": rng.integers(0, c, (b,), dtype=np.int32),
          "weight": np.ones((b,), np.float32),
          "teacher_logits": 3.0 * rng.standard_normal((b, c)).astype(np.float32)}
  batch = jax.device_put(host, step_lib.batch_sharding(mesh))
  return mesh, dtype, batch


def macs_per_image(model, image_size: int) -> float:
  """Analytic multiply-accumulates of `model`'s convolutions and dense layers for one image."""
  import jax
  import jax.numpy as jnp

  from jaxkd.models.cost import count_macs
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return float(count_macs(model, variables, images, train=False))


def time_steps(step: Callable[[Any], Any], carry: Any, *, steps: int, warmup: int,
               repeats: int) -> tuple[list[float], Any]:
  """Seconds of `steps` calls carry = step(carry), per repeat, after `warmup` untimed calls.

  Dispatch is asynchronous: the only synchronisation is one jax.block_until_ready after the last
  call of each repeat (and after the warm-up), so the host never waits on a step inside a repeat.
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


def row(role: str, model: str, step: str, label: str, key: str, params: int, compile_s: float,
        times: list[float], args: argparse.Namespace, flops_per_image: float, dtype_name: str,
        **extra) -> dict:
  """One table row: the median repeat of `times` as ms/step, images/s and TFLOP/s, with the
  spread over repeats and the peak memory so far."""
  seconds = statistics.median(times)
  images_per_s = args.batch_size * args.steps / seconds
  return {"role": role, "model": model, "step": step, "loss": label, "key": key,
          "params": int(params), "batch_size": args.batch_size, "image_size": args.image_size,
          "dtype": dtype_name, "compile_s": compile_s, "steps": args.steps,
          "repeats": len(times), "seconds": seconds, "repeat_seconds": times,
          "spread": (max(times) - min(times)) / seconds,
          "step_ms": 1e3 * seconds / args.steps, "images_per_s": images_per_s,
          "flops_per_image": flops_per_image,
          "achieved_tflops": flops_per_image * images_per_s / 1e12,
          "peak_device_mib": device_peak_mib(), "peak_rss_mib": peak_rss_mib(), **extra}


def train_rows(role: str, model_name: str, model, losses: Sequence[tuple[str, str, dict]],
               lr: float, mesh, dtype, batch, args, macs: float,
               verbose: bool = True) -> list[dict]:
  """Rows of jaxkd's training step of `model` for each (key, label, LossConfig fields) of
  `losses`, timed interleaved, repeat by repeat; 'vs_ce' is the median paired ratio to CE."""
  import jax

  from jaxkd.train import optim as optim_lib
  from jaxkd.train import state as state_lib
  from jaxkd.train import step as step_lib

  tx, schedule = optim_lib.build_optimizer(
      {"optimizer": "adam", "learning_rate": lr, "weight_decay": 1e-4, "schedule": "one_cycle"},
      total_steps=10_000, steps_per_epoch=100)
  state = state_lib.create_train_state(model, jax.random.key(0),
                                       (1, args.image_size, args.image_size, 3), tx, mesh=mesh)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  arrays = {k: batch[k] for k in step_lib.TRAIN_BATCH_KEYS if k in batch}
  compiled = {}
  for key, _label, loss_kwargs in losses:
    train_step = step_lib.make_train_step(model, step_lib.LossConfig(**loss_kwargs), tx, mesh,
                                          learning_rate_fn=schedule)
    start = time.perf_counter()
    compiled[key] = (train_step.jitted.lower(state, arrays, None, None).compile(),
                     time.perf_counter() - start)
  # One state per loss (each step donates its state); the losses run interleaved, repeat by
  # repeat, so a slow phase of the machine hits every loss alike and the paired ratios to CE
  # cancel it.
  carries = {key: (jax.tree.map(lambda a: a.copy(), state), None) for key, _, _ in losses}
  steps = {key: (lambda c, fn=fn: fn(c[0], arrays, None, None))
           for key, (fn, _) in compiled.items()}
  for key in steps:  # untimed warm-up
    _, carries[key] = time_steps(steps[key], carries[key], steps=0, warmup=args.warmup,
                                 repeats=0)
  times: dict[str, list[float]] = {key: [] for key in steps}
  for _ in range(args.repeats):
    for key in steps:
      seconds, carries[key] = time_steps(steps[key], carries[key], steps=args.steps, warmup=0,
                                         repeats=1)
      times[key] += seconds
  rows = []
  for key, label, _ in losses:
    loss = float(carries[key][1]["loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"{model_name} {label}: loss {loss} after "
                               f"{args.warmup + args.steps} steps")
    extra = {}
    if "ce" in times and key != "ce":
      extra["vs_ce"] = statistics.median([t / c - 1.0 for t, c in zip(times[key], times["ce"])])
    rows.append(row(role, model_name, "train", label, key, params, compiled[key][1], times[key],
                    args, 6.0 * macs, dtype_name=args.dtype, final_loss=loss, **extra))
    if verbose:
      print(f"  {model_name} train {label:16s} compile {compiled[key][1]:6.1f} s  "
            f"{rows[-1]['step_ms']:9.1f} ms/step {rows[-1]['images_per_s']:9.1f} img/s"
            + (f"  vs CE {100 * extra['vs_ce']:+.1f}%" if extra else ""), flush=True)
  return rows


def loss_head_ms(losses: Sequence[tuple[str, str, dict]], mesh, batch, args,
                 steps: int = 50) -> dict:
  """ms per training step of each loss on a one-layer "student" (pooled pixels -> Dense ->
  logits).

  The step is jaxkd's own training step, loss and optimizer included, with the network reduced to
  almost nothing, so the differences between losses are the losses' own cost, free of the full
  model's noise.
  """
  import flax.linen as nn
  import jax.numpy as jnp

  class LogitHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
      logits = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
      return (logits, {}) if return_features else logits

  small = dict(batch, image=batch["image"][:, :4, :4])
  head_args = argparse.Namespace(**{**vars(args), "image_size": 4, "steps": steps})
  rows = train_rows("head", "head", LogitHead(args.num_classes), losses, 1e-3, mesh, jnp.float32,
                    small, head_args, macs=0.0, verbose=False)
  return {r["key"]: r["step_ms"] for r in rows}
