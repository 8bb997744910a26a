"""The food101_mini experiment on an accelerator whose Python has no TensorFlow.

GPU machines lent to this project have JAX with CUDA but no TensorFlow (and its
wheel is too large to carry), so tf.data cannot run there. This script keeps
everything else of `configs/food101_mini.py` — models, optimizer, one-cycle
schedule, epochs, batch size, loss, seed, the 80/20 split — and feeds the
train step from pre-decoded uint8 arrays:

  # here (PIL):
  python bench/gpu_mini.py pack --manual-dir=../shared/data/food-101-mini --out=.devcache/mini.npz
  # on the GPU:
  python bench/gpu_mini.py run --data=.devcache/mini.npz --dtype=bfloat16

Training runs through jaxkd's `fit` (checkpoints, logged metrics, NaN check), as in
main.py; the stages are evaluated once, after training.

Differences from main.py's pipeline, on purpose and stated in the output:
64-px images (the config's 96 px works around an XLA:CPU slowdown that GPUs
don't have, and 96-px arrays would not fit the 64 MiB a device call carries);
train augmentation is a random 64-px crop of a 72-px centre crop plus a flip
(done on the device), not a random-resized crop with colour jitter; eval
images are the 64-px centre crop of the 73-px resize. Stored teacher logits are
the teacher's eval-mode logits on the train images' centre crops.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pack(manual_dir: str, out: str, *, val_fraction: float = 0.2, split_seed: int = 0) -> None:
  from PIL import Image

  from jaxkd.data import MEAN_RGB, STD_RGB
  from jaxkd.data.food101_local import resolve_food101_root
  from jaxkd.data.splits import assign_val

  root = pathlib.Path(str(resolve_food101_root(manual_dir)))
  classes = (root / "meta" / "classes.txt").read_text().split()

  def load(key, side, crop):
    img = Image.open(root / "images" / f"{key}.jpg").convert("RGB")
    w, h = img.size
    s = side / min(w, h)
    img = img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)), np.uint8)

  arrays = {}
  for official in ("train", "test"):
    listing = json.loads((root / "meta" / f"{official}.json").read_text())
    keys = [k for c in classes for k in listing[c]]
    labels = np.array([classes.index(k.split("/")[0]) for k in keys], np.int32)
    if official == "train":
      is_val = assign_val(keys, labels, val_fraction=val_fraction, seed=split_seed)
      parts = {"train": ~is_val, "val": is_val}
    else:
      parts = {"test": np.ones(len(keys), bool)}
    for split, mask in parts.items():
      sel = [k for k, m in zip(keys, mask) if m]
      side, crop = (72, 72) if split == "train" else (73, 64)
      arrays[f"{split}_images"] = np.stack([load(k, side, crop) for k in sel])
      arrays[f"{split}_labels"] = labels[mask]
      print(f"{split}: {len(sel)} images", flush=True)
  np.savez(out, mean=np.asarray(MEAN_RGB, np.float32), std=np.asarray(STD_RGB, np.float32),
           classes=np.array(classes), **arrays)


def run(data: str, dtype_name: str, out: str | None, epochs: int | None = None,
        workdir: str | None = None) -> dict:
  """Trains and evaluates the three models; checkpoints go to `workdir` (default: a temporary
  folder, removed at the end; an existing workdir resumes its unfinished stages)."""
  if workdir is None:
    with tempfile.TemporaryDirectory(prefix="gpu_mini-") as tmp:
      return run(data, dtype_name, out, epochs, tmp)
  import jax
  import jax.numpy as jnp

  from configs import food101_mini
  from jaxkd import config as schema
  from jaxkd import models
  from jaxkd.train import optim
  from jaxkd.train.loop import FitSpec, fit
  from jaxkd.train.state import create_train_state, replicate
  from jaxkd.train.step import (
    LossConfig,
    data_mesh,
    make_eval_step,
    make_logits_fn,
    make_train_step,
  )

  config = food101_mini.get_config()
  if epochs is not None:  # smoke runs
    config.teacher.epochs = config.student.epochs = epochs
  arrays = dict(np.load(data))
  mean, std = jnp.asarray(arrays["mean"]), jnp.asarray(arrays["std"])
  num_classes = len(arrays["classes"])
  # The packed resolution (64 px), not the config's CPU-tuned 96 px.
  size = int(arrays["val_images"].shape[1])
  config.augment.image_size = size
  dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype_name]
  mesh = data_mesh()
  seed = int(config.seed)

  def normalize(x):
    return (x.astype(jnp.float32) - mean) / std

  @jax.jit
  def augment(images, key):
    n = images.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    oy = jax.random.randint(k1, (n,), 0, images.shape[1] - size + 1)
    ox = jax.random.randint(k2, (n,), 0, images.shape[2] - size + 1)
    crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (size, size, 3)))(
        images, oy, ox)
    flip = jax.random.bernoulli(k3, 0.5, (n,))
    crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
    return normalize(crops)

  def center(images):
    off = (images.shape[1] - size) // 2
    return normalize(jnp.asarray(images[:, off:off + size, off:off + size]))

  def evaluate(model, variables, split):
    step = make_eval_step(model, mesh)
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    correct = 0
    for i in range(0, len(labels), 200):
      chunk = images[i:i + 200]
      x = center(chunk) if images.shape[1] != size else normalize(jnp.asarray(chunk))
      n = x.shape[0]
      pad = (-n) % jax.device_count()
      batch = {"image": jnp.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))),
               "label": jnp.pad(jnp.asarray(labels[i:i + 200]), (0, pad)),
               "weight": jnp.pad(jnp.ones((n,), jnp.float32), (0, pad))}
      correct += float(jnp.sum(step(variables, batch)["correct1"]))
    return correct / len(labels)

  def train(stage, role, teacher_logits=None):
    """Trains one stage with jaxkd's `fit` (checkpoints in <workdir>/<role>), evaluation after."""
    model = models.create(stage.model, num_classes=num_classes, dtype=dtype,
                          **schema.model_kwargs(stage))
    bs = int(stage.batch_size)
    n = len(arrays["train_labels"])
    spe = n // bs
    epochs = int(stage.epochs)
    total = epochs * spe
    spec = FitSpec(total_steps=total, steps_per_epoch=spe, batch_size=bs, seed=seed,
                   log_every_steps=int(stage.log_every_steps), keep_checkpoints=1, desc=role,
                   progress=False, tensorboard=False)
    tx, schedule = optim.build_optimizer(stage.optimizer, total_steps=total, steps_per_epoch=spe)
    state = replicate(create_train_state(model, jax.random.key(seed), (1, size, size, 3), tx), mesh)
    loss = LossConfig.from_config(stage.loss, steps_per_epoch=spe)
    step_fn = make_train_step(model, loss, tx, mesh, learning_rate_fn=schedule)
    images = jnp.asarray(arrays["train_images"])
    labels = jnp.asarray(arrays["train_labels"])
    logits = None if teacher_logits is None else jnp.asarray(teacher_logits)

    def train_batches(start_step):
      # Every step's permutation and key from the first: a resumed run sees the same batches.
      rng = np.random.default_rng(seed)
      key = jax.random.key(seed)
      for epoch in range(epochs):
        order = rng.permutation(n)
        for b in range(spe):
          key, sub = jax.random.split(key)
          if epoch * spe + b < start_step:
            continue
          idx = jnp.asarray(order[b * bs:(b + 1) * bs])
          batch = {"image": augment(images[idx], sub), "label": labels[idx],
                   "weight": jnp.ones((bs,), jnp.float32)}
          if logits is not None:
            batch["teacher_logits"] = logits[idx]
          yield batch

    compiled_at = []

    def timed_step(state, batch, teacher_variables=None):
      out = step_fn(state, batch, teacher_variables)
      if not compiled_at:
        jax.block_until_ready(out[1])
        compiled_at.append(time.perf_counter())
      return out

    start = time.perf_counter()
    result = fit(state, timed_step, spec, stage_dir=pathlib.Path(workdir) / role,
                 train_batches=train_batches)
    jax.block_until_ready(result.state.params)
    end = time.perf_counter()
    info = {"steps": total, "seconds": end - start}
    if compiled_at:  # trained in this call (not a finished stage of an earlier run)
      info["compile_and_first_step_s"] = compiled_at[0] - start
      info["train_images_per_s"] = (total - 1) * bs / (end - compiled_at[0])
    return model, result.variables(), info

  def accuracy(model, variables):
    return {"val_top1": evaluate(model, variables, "val"),
            "test_top1": evaluate(model, variables, "test")}

  results = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
             "dtype": dtype_name}
  t_model, t_vars, t_info = train(config.teacher, "teacher")
  results["teacher"] = {"model": config.teacher.model, **t_info, **accuracy(t_model, t_vars)}
  # Stored teacher logits: eval-mode logits on the train images' centre crops.
  t_logits = make_logits_fn(t_model, mesh)
  train_images = arrays["train_images"]
  stored = []
  for i in range(0, len(train_images), 200):
    stored.append(np.asarray(t_logits(t_vars, np.asarray(center(train_images[i:i + 200])))))
  stored = np.concatenate(stored)
  s_model, s_vars, s_info = train(config.student, "student_kd", stored)
  results["student_kd"] = {"model": config.student.model, **s_info, **accuracy(s_model, s_vars)}
  baseline = config.student
  baseline.loss.kind = "ce"
  baseline.loss.kd_alpha = None
  b_model, b_vars, b_info = train(baseline, "student_ce")
  results["student_ce"] = {"model": config.student.model, **b_info, **accuracy(b_model, b_vars)}
  print(json.dumps(results, indent=2))
  if out:
    pathlib.Path(out).write_text(json.dumps(results, indent=2))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("pack")
  p.add_argument("--manual-dir", default=str(ROOT.parent / "shared" / "data" / "food-101-mini"))
  p.add_argument("--out", required=True)
  r = sub.add_parser("run")
  r.add_argument("--data", required=True)
  r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  r.add_argument("--out", default=None)
  r.add_argument("--epochs", type=int, default=None,
                 help="override the config's epochs (smoke runs)")
  r.add_argument("--workdir", default=None,
                 help="checkpoints (default: a temporary folder; an existing one resumes)")
  args = parser.parse_args()
  if args.command == "pack":
    pack(args.manual_dir, args.out)
  else:
    run(args.data, args.dtype, args.out, args.epochs, args.workdir)


if __name__ == "__main__":
  main()
