"""Region store cost: size and precompute time per image for R regions at two image sizes.

Runs the region precompute (``jaxkd.data.regions``: R random-resized crops and flips per image,
the teacher on each, float16 logits written with ``jaxkd.teacher_store.precompute``) over the
first ``--num-images`` photographs of food-101-mini (../shared/data), for every R of
``--regions`` and every size of ``--image-sizes``; reports seconds per image (decode, crop,
resize and teacher together, after one warm-up batch), the store's bytes per image, the
projected store sizes for the full Food-101 (75,750 training images, 101 classes) and ImageNet-1k
(1,281,167, 1000 classes), and how far the float16 logits are from float32 (the largest
difference of the teacher's probabilities at temperature 1 and 4).

Usage::

    python bench/bench_region_store.py [--teacher resnet50] [--regions 1,10,50]
        [--image-sizes 96,224] [--num-images 16] [--out BENCHMARKS.md]

The teacher has random weights unless ``--teacher-workdir`` names a finished jaxkd run (its
teacher is used then); its speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys
import tempfile
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from jaxkd import models  # noqa: E402
from jaxkd import teacher_store as ts  # noqa: E402
from jaxkd.data import augment, regions  # noqa: E402

FOOD101_TRAIN, FOOD101_CLASSES = 75_750, 101
IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000
KEY_BYTES = 24  # a '<class>/<id>#<r>' line of keys.txt, about


def _images(data_root: pathlib.Path, count: int) -> list[tuple[bytes, bytes]]:
  folder = data_root / "food-101-mini" / "food-101" / "images"
  files = sorted(folder.glob("*/*.jpg"))[:count]
  if len(files) < count:
    raise SystemExit(f"bench_region_store: {count} images wanted, {len(files)} found under "
                     f"{folder}; give --data-root (the folder holding food-101-mini)")
  return [(f"{f.parent.name}/{f.stem}".encode(), f.read_bytes()) for f in files]


def _softmax(x: np.ndarray, t: float) -> np.ndarray:
  z = x.astype(np.float64) / t
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def measure(images, apply, num_classes: int, size: int, r: int, batch: int) -> dict:
  spec = regions.RegionSpec(r)
  cfg = augment.AugmentConfig(image_size=size)
  keys = tf.constant([k for k, _ in images])
  encoded = tf.constant([v for _, v in images])

  def view(ex):
    return {"image": regions.teacher_view(ex["image"], ex["key"], ex["_region"], spec, cfg),
            "key": regions.region_key(ex["key"], ex["_region"]),
            "weight": tf.constant(1.0, tf.float32)}

  ds = regions.expand(tf.data.Dataset.from_tensor_slices({"image": encoded, "key": keys}), spec)
  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch)
  exact = []

  def logits_fn(x):
    out = np.asarray(apply(x))
    exact.append(out)
    return out

  apply(np.zeros((batch, size, size, 3), np.float32)).block_until_ready()  # compile
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    store = ts.precompute(lambda start_batch=0: ds.skip(start_batch).as_numpy_iterator(),
                          logits_fn, dataset="food101_mini_bench", version="1", split="train",
                          teacher_id="bench", store_dir=pathlib.Path(tmp) / "train",
                          num_examples=len(images) * r, num_classes=num_classes,
                          preprocessing=spec.record(), progress=False)
    seconds = time.perf_counter() - start
    stored = np.asarray(store.logits, np.float32)
    nbytes = sum(p.stat().st_size for p in store.path.iterdir())
  full = np.concatenate(exact)
  per_row = num_classes * 2 + KEY_BYTES
  return {
      "size": size, "regions": r, "s_per_image": seconds / len(images),
      "bytes_per_image": nbytes / len(images),
      "food101_gb": FOOD101_TRAIN * r * (FOOD101_CLASSES * 2 + KEY_BYTES) / 1e9,
      "imagenet_gb": IMAGENET_TRAIN * r * (IMAGENET_CLASSES * 2 + KEY_BYTES) / 1e9,
      "imagenet_top10_gb": IMAGENET_TRAIN * r * (10 * 4 + 2 + KEY_BYTES) / 1e9,
      "prob_err_t1": float(np.abs(_softmax(stored, 1) - _softmax(full, 1)).max()),
      "prob_err_t4": float(np.abs(_softmax(stored, 4) - _softmax(full, 4)).max()),
      "row_bytes": per_row,
  }


def markdown(rows: list[dict], teacher: str, num_images: int) -> str:
  lines = [f"Teacher {teacher}, {num_images} food-101-mini photographs, float16 logits; seconds "
           "per image = decode, crop, resize and teacher for its R regions, on this machine.", "",
           "| px | R | s / image | store bytes / image | Food-101 train store | ImageNet-1k store "
           "| ImageNet-1k, top-10 instead | max prob. error T=1 / T=4 |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['regions']} | {r['s_per_image']:.3f} | "
                 f"{r['bytes_per_image']:,.0f} | {r['food101_gb']:.2f} GB | "
                 f"{r['imagenet_gb']:.0f} GB | {r['imagenet_top10_gb']:.1f} GB | "
                 f"{r['prob_err_t1']:.1e} / {r['prob_err_t4']:.1e} |")
  lines += ["", "Projected sizes: rows x (classes x 2 bytes + about 24 bytes of key); 'top-10 "
            "instead': ten float16 probabilities and int16 class indices plus the remaining mass "
            "per row (not implemented: it fixes the temperature at storage time and drops the "
            "non-target logits DKD uses)."]
  return "\n".join(lines)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-root", default=str(_REPO.parent / "shared" / "data"))
  parser.add_argument("--teacher", default="resnet50")
  parser.add_argument("--regions", default="1,10,50")
  parser.add_argument("--image-sizes", default="96,224")
  parser.add_argument("--num-images", type=int, default=16)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--out", default=str(_REPO / "BENCHMARKS.md"))
  args = parser.parse_args(argv)
  images = _images(pathlib.Path(args.data_root), args.num_images)
  model = models.create(args.teacher, num_classes=FOOD101_CLASSES)
  rows = []
  for size in (int(s) for s in args.image_sizes.split(",")):
    variables = model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
    apply = jax.jit(lambda x, v=variables: model.apply(v, x, train=False))
    for r in (int(x) for x in args.regions.split(",")):
      if (args.num_images * r) % args.batch_size:
        raise SystemExit("bench_region_store: num_images x R must divide by --batch-size")
      rows.append(measure(images, apply, FOOD101_CLASSES, size, r, args.batch_size))
      print(rows[-1], flush=True)
  text = markdown(rows, args.teacher, args.num_images)
  print(text)
  if args.out:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "bench/bench_region_store.py", *(argv or sys.argv[1:])])
    with open(args.out, "a") as f:
      f.write(f"\n## {stamp} — region store (bench/bench_region_store.py)\n\n- command: "
              f"`{command}`\n\n{text}\n")
  return text


if __name__ == "__main__":
  main()
