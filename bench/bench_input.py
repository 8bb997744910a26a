"""Input-pipeline throughput: decoded + augmented images/s on real Food-101 JPEGs.

Reads the 512-px JPEGs of ``food-101-mini`` (../shared/data) once into memory (so
disk speed is not measured), then times the jaxkd preprocessing map (the same
functions the training/eval pipelines use) for several ``num_parallel_calls``:

* ``train``: fused decode-and-crop random-resized crop + flip + colour jitter
  (0.4, 0.4, 0.4, 0.1), normalised float32;
* ``train, colour on device``: the host half of ``augment.color_on_device`` (the same crop and
  flip, rounded to uint8, and the jitter factors; the jitter and the normalisation then run in
  the train step on the accelerator, ``jaxkd.train.color``);
* ``eval``: fused decode of the 0.875 centre crop, resize, normalised float32;
* ``train, op by op`` / ``eval, op by op``: the same images through the same operations, with the
  flip, colour jitter and normalisation run op by op as TensorFlow kernels instead of the
  XLA-compiled function the pipelines use (``augment.compiled_flip_jitter_normalize``), and the
  antialiased resize for every crop: the path before these changes, timed in the same run for the
  before/after ratio.

Usage::

    python bench/bench_input.py [--data-root ../shared/data] [--image-size 224] [--num-images 512]
                                [--num-parallel-calls 1,2,4,autotune]

``run(...)`` returns the rows as a list of dicts (for a single bench entry point).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import tensorflow as tf  # noqa: E402

import jaxkd.data as data  # noqa: E402
from jaxkd.data import augment  # noqa: E402
from jaxkd.data.augment import ops  # noqa: E402

DEFAULT_DATA_ROOT = _REPO.parent / "shared" / "data"
AUTOTUNE_LABEL = "AUTOTUNE"


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _configs(image_size: int) -> dict[str, augment.AugmentConfig]:
  return {
      "train": augment.AugmentConfig(image_size=image_size, color_jitter=(0.4, 0.4, 0.4, 0.1)),
      "train, colour on device": augment.AugmentConfig(
          image_size=image_size, color_jitter=(0.4, 0.4, 0.4, 0.1), color_on_device=True),
      "eval": augment.AugmentConfig(image_size=image_size),
  }


MODES = ("train", "train, colour on device", "train, op by op", "eval", "eval, op by op")


def _resize_always_antialiased(image, cfg: augment.AugmentConfig):
  """``ops.resize`` before it took the bilinear kernel for crops that do not shrink."""
  size = [cfg.image_size, cfg.image_size]
  return tf.clip_by_value(tf.image.resize(image, size, antialias=cfg.antialias), 0.0, 255.0)


def _train_op_by_op(image, seed, cfg: augment.AugmentConfig):
  """``augment.train_preprocess`` for ``cfg``'s operations (random-resized crop, flip, colour
  jitter), every operation a TensorFlow kernel of its own."""
  s_crop, s_flip, s_jitter, _, _ = ops.split_seed(seed, 5)
  image = ops.decode_and_crop(image, lambda shape: ops.random_resized_crop_window(
      shape, s_crop, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio))
  image = _resize_always_antialiased(image, cfg)
  image = tf.image.stateless_random_flip_left_right(image, seed=s_flip)
  return ops.normalize(ops.color_jitter(image, s_jitter, cfg.color_jitter))


def _eval_op_by_op(image, cfg: augment.AugmentConfig):
  image = ops.decode_and_crop(image, lambda shape: ops.center_crop_window(
      shape, cfg.eval_crop_fraction))
  return ops.normalize(_resize_always_antialiased(image, cfg))


def run(*, data_root: str | os.PathLike | None = None, image_size: int = 224,
        num_images: int = 512, passes: int = 2, batch_size: int = 32, rounds: int = 3,
        modes: Sequence[str] = MODES,
        num_parallel_calls: Sequence[int | None] = (1, 2, 4, None),
        verbose: bool = True) -> list[dict]:
  """Times preprocessing; returns rows {mode, num_parallel_calls, images, seconds, images_per_s,
  ...}, the median of `rounds` timings of `passes` passes over `num_images` images.

  ``None`` in ``num_parallel_calls`` means tf.data.AUTOTUNE; "per core" divides by
  min(num_parallel_calls, cores available to this process) (all cores for AUTOTUNE).
  """
  root = pathlib.Path(data_root or DEFAULT_DATA_ROOT) / "food-101-mini" / "food-101" / "images"
  if not root.is_dir():
    raise FileNotFoundError(f"benchmark images not found at {os.fspath(root)!r}; pass "
                            "data_root= (--data-root on the command line), a folder holding "
                            "food-101-mini/ (default: ../shared/data beside the repository)")
  source = data.get_source("image_folder", manual_dir=root)
  encoded = (source.as_dataset("trainval").take(num_images)
             .map(lambda ex: (ex["image"], ex["key"])).cache())
  count = sum(1 for _ in encoded)  # fills the in-memory cache
  cores = _cores()
  configs = _configs(image_size)

  def dataset(mode: str, npc: int | None) -> tf.data.Dataset:
    cfg = configs.get(mode, configs[mode.split(",")[0]])
    calls = tf.data.AUTOTUNE if npc is None else npc
    if mode.startswith("train"):
      train = {"train": augment.train_preprocess, "train, op by op": _train_op_by_op,
               "train, colour on device": augment.train_preprocess_uint8}[mode]

      def fn(image, key):
        seed = tf.stack([tf.constant(0, tf.int64), tf.strings.to_hash_bucket_fast(key, 2**62)])
        return train(image, seed, cfg)
    else:
      evaluate = augment.eval_preprocess if mode == "eval" else _eval_op_by_op

      def fn(image, key):
        del key
        return evaluate(image, cfg)

    ds = (encoded.repeat(passes).map(fn, num_parallel_calls=calls, deterministic=True)
          .batch(batch_size))
    opts = tf.data.Options()
    opts.experimental_optimization.map_parallelization = False
    # one thread per map call, so "per core" is per core (XLA-compiled functions would
    # otherwise also use TensorFlow's intra-op threads)
    opts.threading.max_intra_op_parallelism = 1
    return ds.with_options(opts).prefetch(2)

  def images_per_s(ds: tf.data.Dataset) -> tuple[int, float]:
    it = iter(ds)
    next(it)  # warm-up: tracing and first batch
    seen, start = 0, time.perf_counter()
    for batch in it:
      seen += int(tf.nest.flatten(batch)[0].shape[0])
    return seen, time.perf_counter() - start

  # The modes of one num_parallel_calls are timed one after the other, `rounds` times in turn, and
  # each keeps its median round: a ratio between modes compares neighbouring measurements, so this
  # machine's drift over minutes does not enter it.
  rows = []
  for npc in num_parallel_calls:
    datasets = {mode: dataset(mode, npc) for mode in modes}
    timings: dict[str, list[tuple[int, float]]] = {mode: [] for mode in modes}
    for _ in range(rounds):
      for mode in modes:
        timings[mode].append(images_per_s(datasets[mode]))
    for mode in modes:
      seen, seconds = sorted(timings[mode], key=lambda t: t[0] / t[1])[len(timings[mode]) // 2]
      used = cores if npc is None else min(npc, cores)
      row = {"mode": mode, "num_parallel_calls": AUTOTUNE_LABEL if npc is None else npc,
             "image_size": image_size, "images": seen, "seconds": seconds,
             "images_per_s": seen / seconds, "images_per_s_per_core": seen / seconds / used,
             "cores": cores, "source_images": count, "rounds": rounds}
      rows.append(row)
      if verbose:
        print(f"  {mode:15s} npc={row['num_parallel_calls']!s:8s} "
              f"{row['images_per_s']:8.1f} img/s (median of {rounds})", flush=True)
  order = {mode: i for i, mode in enumerate(modes)}
  return sorted(rows, key=lambda r: order[r["mode"]])  # table order: mode, then npc


def markdown_table(rows: list[dict]) -> str:
  """The rows as markdown; "vs op by op" is a train (eval) mode's images/s over the train (eval)
  op-by-op path's at the same num_parallel_calls (same run)."""
  speed = {(r["mode"], r["num_parallel_calls"]): r["images_per_s"] for r in rows}
  lines = ["| preprocessing | num_parallel_calls | images/s | images/s per core | vs op by op |",
           "|---|---|---:|---:|---:|"]
  for r in rows:
    base = f"{r['mode'].split(',')[0]}, op by op"
    before = speed.get((base, r["num_parallel_calls"])) if r["mode"] != base else None
    ratio = f"{r['images_per_s'] / before:.2f}x" if before else ""
    lines.append(f"| {r['mode']} ({r['image_size']} px) | {r['num_parallel_calls']} | "
                 f"{r['images_per_s']:.1f} | {r['images_per_s_per_core']:.1f} | {ratio} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-root", default=None,
                      help="folder holding food-101-mini/ (default: ../shared/data beside the "
                           "repository)")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--num-images", type=int, default=512)
  parser.add_argument("--passes", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3,
                      help="timings per mode, taken in turn with the other modes (median kept)")
  parser.add_argument("--num-parallel-calls", default="1,2,4,autotune",
                      help="comma-separated tf.data parallelisms to time ('autotune': AUTOTUNE)")
  args = parser.parse_args(argv)
  npcs = tuple(None if v.strip().lower() == "autotune" else int(v)
               for v in args.num_parallel_calls.split(","))
  rows = run(data_root=args.data_root, image_size=args.image_size, num_images=args.num_images,
             passes=args.passes, rounds=args.rounds, num_parallel_calls=npcs)
  print(f"\nFood-101 512-px JPEGs, {rows[0]['source_images']} images x {args.passes} passes, "
        f"median of {args.rounds} rounds, {rows[0]['cores']} CPU cores available\n")
  print(markdown_table(rows))
  return rows


if __name__ == "__main__":
  main()
