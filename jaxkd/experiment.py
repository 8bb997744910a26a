"""An experiment = the stages of the distillation pipeline, run in order inside one workdir.

The stages are functions, in the order the data flows through them:

    _teacher          train or fine-tune the teacher (from imported weights or another
                      workdir's teacher), or take imported weights as they are (epochs=0)
    _teacher_logits   precompute the teacher's logits into the store (beside the data, or
                      config.teacher_logits.store_dir) when the student learns from stored logits
    _student          distill the student (from stored logits, an online teacher, or CE only)
    _evaluate         teacher and student on val and test (val only when the data has no test
                      split)
    _export           the deployable files of config.export.formats (TFLite / ONNX, float32,
                      float16 or int8) in <workdir>/export/, each verified against jaxkd on val
                      and timed (jaxkd.export); skipped when formats is ()
    _report           report.md / report.json (parameters, MACs, accuracy, the deployment
                      table) and plots

Each hands its result to the next: the teacher's (model, variables), the teacher-logit store, the
student's (model, variables), the evaluation results. A training stage hands on the variables of
its last step or, with ``<role>.handoff='best'``, those of its checkpoint with the best val top-1.

`run(config, workdir)` runs the stages not yet done and skips finished ones (each leaves
``<workdir>/stages/<stage>.json``; the layout is jaxkd.workdir's), so a rerun of a finished
experiment only prints its report, and a killed run resumes where it stopped. The config is
checked before any compute (`validate`); the config of the first run is kept in
``<workdir>/config.json``, and a rerun whose config would change a result is refused, naming the
keys (keys that change no result, such as batch sizes of evaluation or logging, are accepted;
config.export.* is one of them, so adding an export to a finished run runs the export stage);
the data's identity (its folder fingerprint) is kept in ``dataset.json`` and must not change
either. SIGINT and SIGTERM stop at the next safe point with the work saved (`StopRequested`).
Each model is built once per run.

With several processes (`jaxkd.distributed`) every process runs the same stages in step: they
train and evaluate together, write and restore checkpoints together, and compute the teacher's
logits together; process 0 alone writes the other files (markers, store, evaluations, exports,
report) and prints, and the others wait for it at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxkd import config as schema
from jaxkd import distributed, models, schedules
from jaxkd.config import ConfigError, compute_dtype, validate
from jaxkd.train.state import replicate
from jaxkd.train.step import LossConfig
from jaxkd.workdir import (
  Workdir,
  check_reusable_teacher,
  data_splits,
  finished_workdir_teacher,
  restore_variables,
  variables_dir,
  write_json,
)

__all__ = ["STAGES", "Trained", "run", "validate", "compute_dtype", "ConfigError"]

STAGES = ("teacher", "teacher_logits", "student", "evaluate", "export", "report")
_HEADS_SEED = 0x68656164  # folded into the seed's key for the distillation heads' initialisation


class Trained(NamedTuple):
  """What a model stage hands on: the model (built once per run), its variables and its registered
  name (config.<role>.model)."""
  model: Any
  variables: Any
  name: str = ""


@dataclasses.dataclass
class _Context:
  config: Any
  workdir: Workdir
  source: Any
  mesh: Any
  models: dict  # role -> the model, built once per run
  stop: Any  # PreemptionFlag: SIGINT / SIGTERM asked to stop at the next safe point
  progress: bool

  @property
  def image_size(self) -> int:
    return int(self.config.augment.image_size)

  def check_stop(self, where: str) -> None:
    """Raises StopRequested when any process was asked to stop (every process calls it at the
    same point: with several processes it is a collective)."""
    from jaxkd.train.checkpoint import StopRequested
    stopping, signum = distributed.any_stop(self.stop)
    if stopping:
      raise StopRequested(signum, where)

  def check_stop_here(self, where: str) -> None:
    """check_stop for work that runs on this process alone (no collective)."""
    from jaxkd.train.checkpoint import StopRequested
    if self.stop is not None and self.stop.requested:
      raise StopRequested(self.stop.signum, where)

  def eval_splits(self) -> list[str]:
    return [s for s in self.config.evaluate.splits if s in self.source.splits]


def _log(msg: str) -> None:
  if distributed.is_main():
    print(f"[jaxkd] {msg}", flush=True)


def _skip(wd: Workdir, stage: str, why: str) -> None:
  if not wd.done(stage):
    wd.mark(stage, {"skipped": why})


def _teacher_source(config) -> str:
  """Where the student's teacher logits come from: 'stored', 'online', or 'none' (CE only)."""
  loss = LossConfig.from_config(config.student.loss)
  return config.student.teacher if loss.needs_teacher else "none"


def _eval_split(source) -> str | None:
  """The split evaluated during training (the curves and the best checkpoint)."""
  return "val" if "val" in source.splits else None


def _steps_per_epoch(source, stage) -> int:
  from jaxkd.data import pipeline
  return pipeline.steps_per_epoch(source, "train", global_batch_size=int(stage.batch_size))


def _steps_text(source, stage) -> str:
  spe = _steps_per_epoch(source, stage)
  total = int(stage.epochs) * spe
  cap = stage.max_steps
  if cap and int(cap) < total:
    return (f"{int(cap)} steps (max_steps; {stage.epochs} epochs would be {total} steps of {spe} "
            "per epoch)")
  return f"{stage.epochs} epochs ({total} steps of batch {stage.batch_size})"


def _pretrained_variables(ctx: _Context, role: str, model):
  """Variables from config.<role>.pretrained (a checkpoint file, 'torchvision[:WEIGHTS]' or, for
  the teacher, a finished jaxkd workdir), or None."""
  stage = ctx.config[role]
  path = stage.pretrained
  if not path:
    return None
  old = finished_workdir_teacher(path)
  if old is not None:
    if role != "teacher":
      raise ConfigError(f"config.{role}.pretrained={path!r} is a workdir: only the teacher can be "
                        "reused that way")
    check_reusable_teacher(old, stage, ctx.source.num_classes)
    _log(f"teacher: reusing the finished teacher of {old}")
    return restore_variables(variables_dir(old, "teacher"), model, ctx.image_size)
  _log(f"{role}: importing pretrained weights from {path}")
  return models.load_pretrained(
      stage.model, path if path.startswith("torchvision") else os.path.expanduser(path),
      num_classes=ctx.source.num_classes, model_kwargs=schema.model_kwargs(stage))


def _summary(result: dict | None) -> dict | None:
  """top1, top5, loss, num_examples of an evaluation, for a stage marker."""
  from jaxkd.train.report import SUMMARY_FIELDS
  if result is None:
    return None
  return {k: int(result[k]) if k == "num_examples" else float(result[k])
          for k in SUMMARY_FIELDS if k in result}


def _train(ctx: _Context, role: str, model, *, init_variables=None,
           online_teachers: list[Trained] | None = None, stores: list | None = None):
  """Trains `model` as stage `role`, saves the variables it hands on and marks the stage; returns
  those variables.

  Builds what jaxkd.train.loop.fit runs: the train state (initialised from `seed`, then the
  pretrained variables, plus the distillation heads of 'fitnet' / 'lstm' feature terms,
  replicated on the mesh), the optimizer and its schedule, the loss with its schedules resolved
  for this stage's length, the train step, the training batches from any step (tf.data; the
  stored teacher logits of every teacher joined by key), and the evaluation on val.
  `online_teachers` / `stores`: the teachers run on each batch, or their stored logits (one
  store per teacher), in the order config.teacher, then config.student.extra_teachers.
  """
  from jaxkd.data import pipeline
  from jaxkd.train import evaluate as evaluate_lib
  from jaxkd.train import heads, optim
  from jaxkd.train.loop import FitSpec, fit
  from jaxkd.train.state import create_train_state, with_variables
  from jaxkd.train.step import make_eval_step, make_train_step

  config, source, mesh = ctx.config, ctx.source, ctx.mesh
  stage = config[role]
  seed = int(config.seed)
  batch_size = int(stage.batch_size)
  steps_per_epoch = _steps_per_epoch(source, stage)
  spec = FitSpec.from_config(stage, steps_per_epoch=steps_per_epoch, seed=seed, desc=role,
                             progress=ctx.progress)
  tx, schedule = optim.build_optimizer(stage.optimizer, total_steps=max(spec.total_steps, 1),
                                       steps_per_epoch=steps_per_epoch)

  # Schedule specs and warmup_epochs become schedules over this stage's steps.
  loss_config = LossConfig.from_config(stage.loss, steps_per_epoch=steps_per_epoch,
                                       total_steps=max(spec.total_steps, 1),
                                       where=f"config.{role}.loss")
  size = ctx.image_size
  state = create_train_state(model, jax.random.key(seed), (1, size, size, 3), tx)
  if init_variables is not None:
    state = with_variables(state, init_variables, tx)
  if loss_config.head_losses:
    state = heads.add_heads(state, loss_config, model, online_teachers[0].model, image_size=size,
                            rng=jax.random.fold_in(jax.random.key(seed), _HEADS_SEED), tx=tx)
    sizes = heads.count_parameters(state)
    _log(f"{role}: distillation heads {[f.name for f in loss_config.head_losses]}: "
         f"{sizes['trained']:,} trained and {sizes['frozen']:,} frozen parameters (not part of "
         "the student)")
  state = replicate(state, mesh)

  train_step = make_train_step(model, loss_config, tx, mesh, learning_rate_fn=schedule,
                               teacher_model=None if not online_teachers
                               else [t.model for t in online_teachers])
  needs_teacher = train_step.loss_config.needs_teacher
  if needs_teacher and not online_teachers and not stores:
    raise ValueError(f"{role}: loss {train_step.loss_config.kind!r} needs a teacher: stored "
                     "logits or an online teacher")
  lookup = regions = None
  if needs_teacher and not online_teachers:
    from jaxkd.data.teacher_logits import stacked_lookup
    lookup = (_lookup(stores[0]) if len(stores) == 1
              else stacked_lookup([_lookup(s) for s in stores]))
    regions = _regions(config)
  augment = dict(config.augment)
  num_parallel_calls = config.data.num_parallel_calls

  def train_batches(start_step: int):
    return pipeline.train_batches(
        source, "train", global_batch_size=batch_size, mesh=mesh, augment=augment,
        image_size=size, seed=seed, start_step=start_step, num_parallel_calls=num_parallel_calls,
        teacher_lookup=lookup, regions=regions)

  evaluate = None
  split = _eval_split(source)
  if split is not None:
    eval_step = make_eval_step(model, mesh)
    eval_batch_size = int(config.evaluate.batch_size)

    def evaluate(variables):
      batches = pipeline.eval_batches(source, split, global_batch_size=eval_batch_size,
                                      augment=augment, image_size=size, mesh=mesh,
                                      num_parallel_calls=num_parallel_calls)
      total = pipeline.num_eval_batches(source, split, global_batch_size=eval_batch_size)
      return evaluate_lib.evaluate(eval_step, variables, batches, num_classes=source.num_classes,
                                   total=total, desc=f"{role} eval {split}",
                                   progress=ctx.progress)

  teacher_variables = None
  if online_teachers:
    teacher_variables = [replicate(t.variables, mesh) for t in online_teachers]
    teacher_variables = (teacher_variables[0] if len(teacher_variables) == 1
                         else tuple(teacher_variables))
  result = fit(state, train_step, spec, stage_dir=ctx.workdir.path / role,
               train_batches=train_batches, evaluate=evaluate,
               teacher_variables=teacher_variables, stop=ctx.stop)
  which = stage.handoff
  variables = result.variables(which)
  ctx.workdir.save_variables(role, variables)
  ctx.workdir.mark(role, {"steps": result.steps, "val": _summary(result.val),
                          "best_val": _summary(result.best_val), "best_step": result.best_step,
                          "handoff": which})
  return variables


# ----------------------------------------------------------------------------- the stages


def _teacher(ctx: _Context) -> Trained | None:
  """Stage 1: the teacher, trained or fine-tuned, imported as it is (epochs=0), or loaded when
  finished; None when config.teacher.enabled is False."""
  wd, stage = ctx.workdir, ctx.config.teacher
  if not stage.enabled:
    _skip(wd, "teacher", "config.teacher.enabled is False")
    return None
  model = ctx.models["teacher"]
  if wd.done("teacher"):
    return Trained(model, wd.load_variables("teacher", model, ctx.image_size), stage.model)
  init = _pretrained_variables(ctx, "teacher", model)
  if int(stage.epochs) == 0:
    wd.save_variables("teacher", init)
    wd.mark("teacher", {"steps": 0, "val": None, "pretrained": stage.pretrained})
    return Trained(model, init, stage.model)
  _log(f"teacher: training {stage.model} for {_steps_text(ctx.source, stage)}")
  return Trained(model, _train(ctx, "teacher", model, init_variables=init), stage.model)


def _store_root(ctx: _Context) -> pathlib.Path:
  """Where teacher-logit stores live: config.teacher_logits.store_dir, else next to the data."""
  chosen = ctx.config.teacher_logits.store_dir
  if chosen:
    return pathlib.Path(os.path.expanduser(chosen))
  builder = getattr(ctx.source, "builder", None)
  if builder is not None:
    return pathlib.Path(os.fspath(builder.data_dir_root))
  from jaxkd.data.user_folders import default_data_dir
  return default_data_dir(ctx.config.data.data_dir)


def _preprocessing(config) -> dict:
  from jaxkd.data import AugmentConfig
  aug = AugmentConfig.from_mapping(config.augment)
  return {"image_size": aug.image_size, "eval_crop_fraction": aug.eval_crop_fraction,
          "antialias": aug.antialias, "normalization": "imagenet_mean_std"}


# A store up to this size is held in host RAM while training (a gather costs nothing); a larger
# one (an ImageNet region store: R x 2.6 GB) is read from its memory-mapped file.
LOOKUP_IN_RAM_MAX_BYTES = 4 << 30


def _lookup(store):
  """The tf.data join of `store` (jaxkd.data.teacher_logits.tf_lookup), held in RAM or mapped."""
  from jaxkd.data.teacher_logits import tf_lookup
  backend = "memory" if store.logits.nbytes <= LOOKUP_IN_RAM_MAX_BYTES else "mmap"
  if backend == "mmap":
    _log(f"teacher logits: {store.logits.nbytes / 2**30:.1f} GiB, read from the memory-mapped "
         f"{store.path} (over {LOOKUP_IN_RAM_MAX_BYTES >> 30} GiB, not held in RAM)")
  return tf_lookup(store, backend=backend)


def _regions(config):
  """The stored regions (jaxkd.data.regions.RegionSpec) with config.teacher_logits.mode='regions',
  else None. The region seed is fixed (0), so one store serves the student runs of every seed."""
  if config.teacher_logits.mode != "regions":
    return None
  from jaxkd.data.regions import RegionSpec
  return RegionSpec.from_augment(int(config.teacher_logits.regions_per_image), config.augment)


def _store_preprocessing(config) -> dict:
  """What a store's rows were computed from (its manifest's 'preprocessing', checked on open);
  a region store's views do not depend on the eval crop."""
  regions = _regions(config)
  if regions is None:
    return _preprocessing(config)
  view = {k: v for k, v in _preprocessing(config).items() if k != "eval_crop_fraction"}
  return {**view, **regions.record()}


def _needs_store(config) -> bool:
  return config.student.enabled and config.teacher.enabled and _teacher_source(config) == "stored"


def _check_store_writable(ctx: _Context) -> None:
  """Refuses, before any training, a store location the logit precompute could not write to."""
  import tempfile

  from jaxkd import teacher_store
  base = teacher_store.stores_root(_store_root(ctx), ctx.source.name, ctx.source.version)
  key = ("config.teacher_logits.store_dir" if ctx.config.teacher_logits.store_dir
         else "the default store location (beside the data; config.teacher_logits.store_dir)")
  try:
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=base, prefix=".write-check-"):
      pass
  except OSError as e:
    raise ConfigError(f"{key}: cannot write the teacher-logit store under {base} "
                      f"({e.strerror or e}); set --config.teacher_logits.store_dir to a writable "
                      "folder") from None


def _extra_teachers(ctx: _Context) -> list[Trained]:
  """The finished teachers of config.student.extra_teachers (other workdirs), built and loaded in
  this run's compute dtype; [] when there are none or the student is done or disabled."""
  from jaxkd.workdir import load_variables, split_teacher_entry
  config = ctx.config
  entries = tuple(config.student.get("extra_teachers") or ())
  if not (config.student.enabled and entries) or ctx.workdir.done("student"):
    return []
  out = []
  for entry in entries:
    path, role = split_teacher_entry(entry)
    model, variables, old = load_variables(path, role, dtype=compute_dtype(config))
    classes = json.loads((path / "dataset.json").read_text())["num_classes"]
    if classes != ctx.source.num_classes:
      raise ConfigError(f"config.student.extra_teachers: {entry!r} has {classes} classes, the "
                        f"data has {ctx.source.num_classes}; use teachers trained on the same "
                        "classes")
    _log(f"student: extra teacher {old[role].model} ({role} of {path})")
    out.append(Trained(model, variables, old[role].model))
  return out


def _store(ctx: _Context, teacher: Trained):
  """The store of `teacher`'s logits of the training split: opened when present, else
  precomputed (resumable)."""
  from jaxkd import teacher_store
  from jaxkd.data import pipeline
  from jaxkd.train.step import make_logits_fn

  config, source = ctx.config, ctx.source
  tid = teacher_store.teacher_id(teacher.name, teacher.variables)
  split = "train"
  preprocessing = _store_preprocessing(config)
  # a region store has its own folder beside the per-image store: train.regions-<R>-<hex>
  store_dir = teacher_store.store_path(_store_root(ctx), source.name, source.version, tid, split,
                                       preprocessing)
  regions = _regions(config)
  rows = source.num_examples(split) * (regions.regions_per_image if regions else 1)
  expect = dict(dataset=source.name, version=source.version, split=split,
                num_classes=source.num_classes, teacher_id=tid, preprocessing=preprocessing)
  hint = (f"delete the folder {store_dir} (and {teacher_store.partial_path(store_dir).name} "
          "beside it, if present) and rerun the same command: the next run recomputes it")
  if store_dir.exists():
    return teacher_store.TeacherStore.open(store_dir, expect=expect, hint=hint)
  what = (f" ({regions.regions_per_image} regions per image, {rows:,} rows)" if regions else "")
  _log(f"teacher_logits: precomputing {tid} on {source.name}/{split}{what} into {store_dir}")
  logits_fn = make_logits_fn(teacher.model, ctx.mesh)
  variables = replicate(teacher.variables, ctx.mesh)
  batch_size = int(config.teacher_logits.batch_size)
  several = jax.process_count() > 1

  def batches(start_batch: int = 0):
    # Every process computes its rows of each global batch; process 0 writes the whole batch
    # (keys and weights of every process, the logits gathered), from where it stopped before.
    start_batch = distributed.broadcast_int(start_batch)
    it = pipeline.eval_batches(source, split, global_batch_size=batch_size,
                               augment=dict(config.augment), image_size=ctx.image_size,
                               num_parallel_calls=config.data.num_parallel_calls,
                               start_batch=start_batch, regions=regions)
    for i, b in enumerate(it, start_batch):
      ctx.check_stop(f"during the teacher-logit precompute (batch {i}); the finished batches "
                     "are kept")
      if several:
        b = {"image": b["image"], "key": np.array(distributed.gather_strings(b["key"])),
             "weight": distributed.gather_rows(b["weight"])}
      yield b

  def teacher_logits(images):
    logits = logits_fn(variables, images)
    return distributed.gather_rows(logits) if several else logits  # one process: fetched later

  if not distributed.is_main():  # the same batches and teacher calls as process 0's writer
    for b in batches():
      if (b["weight"] > 0).any():
        teacher_logits(b["image"])
    distributed.barrier(f"jaxkd-teacher-logits-{tid}")
    return teacher_store.TeacherStore.open(store_dir, expect=expect, verify=False, hint=hint)
  store = teacher_store.precompute(
      batches, teacher_logits, dataset=source.name,
      version=source.version, split=split, teacher_id=tid,
      num_examples=rows, num_classes=source.num_classes,
      class_names=list(source.class_names), preprocessing=preprocessing,
      teacher_info={"model": teacher.name}, store_dir=store_dir,
      dtype=config.teacher_logits.dtype, progress=ctx.progress, hint=hint)
  distributed.barrier(f"jaxkd-teacher-logits-{tid}")
  return store


def _teacher_logits(ctx: _Context, teachers: list[Trained]):
  """Stage 2: each teacher's logits of the training split in its store (precomputed, or opened
  when present), when the student learns from stored logits: the list of stores, in the order of
  `teachers`; else None."""
  config, wd = ctx.config, ctx.workdir
  if not config.student.enabled:
    _skip(wd, "teacher_logits", "config.student.enabled is False")
    return None
  teacher_source = _teacher_source(config)
  if teacher_source != "stored":
    _skip(wd, "teacher_logits", f"the student's teacher is {teacher_source!r}")
    return None
  if wd.done("student"):
    return None  # the student that reads them has finished
  stores = [_store(ctx, teacher) for teacher in teachers]
  if not wd.done("teacher_logits"):
    info = {"store": str(stores[0].path), "teacher_id": stores[0].teacher_id}
    if len(stores) > 1:
      info["stores"] = [{"store": str(s.path), "teacher_id": s.teacher_id} for s in stores]
    wd.mark("teacher_logits", info)
  return stores


def _student(ctx: _Context, teachers: list[Trained], stores) -> Trained | None:
  """Stage 3: the student, distilled from the stored logits (`stores`), the online `teachers`
  (config.teacher, then config.student.extra_teachers), or CE only; loaded when finished; None
  when config.student.enabled is False."""
  wd, stage = ctx.workdir, ctx.config.student
  if not stage.enabled:
    _skip(wd, "student", "config.student.enabled is False")
    return None
  model = ctx.models["student"]
  if wd.done("student"):
    return Trained(model, wd.load_variables("student", model, ctx.image_size), stage.model)
  loss = LossConfig.from_config(stage.loss)
  teacher_source = _teacher_source(ctx.config)
  several = f", {len(teachers)} teachers" if len(teachers) > 1 and loss.distills else ""
  _log(f"student: training {stage.model} with loss {loss.kind}"
       f"{' + perception' if loss.perception else ''} (teacher: {teacher_source}{several}) for "
       f"{_steps_text(ctx.source, stage)}")
  init = _pretrained_variables(ctx, "student", model)
  online = teachers if teacher_source == "online" else None
  return Trained(model, _train(ctx, "student", model, init_variables=init,
                               online_teachers=online, stores=stores), stage.model)


def _evaluate(ctx: _Context, trained: dict[str, Trained]) -> dict:
  """Stage 4: every model on the evaluation splits ({(role, split): results}); a finished
  evaluation (<workdir>/eval/<role>_<split>.json) is read, not run again."""
  from jaxkd.data import pipeline
  from jaxkd.train import evaluate as evaluate_lib
  from jaxkd.train.step import make_eval_step
  results = {}
  out_dir = ctx.workdir.path / "eval"
  out_dir.mkdir(exist_ok=True)
  bs = int(ctx.config.evaluate.batch_size)
  for role, (model, variables, _) in trained.items():
    eval_step = make_eval_step(model, ctx.mesh)
    on_mesh = replicate(variables, ctx.mesh)
    for split in ctx.eval_splits():
      path = out_dir / f"{role}_{split}.json"
      if path.exists():
        results[(role, split)] = json.loads(path.read_text())
        continue
      batches = pipeline.eval_batches(ctx.source, split, global_batch_size=bs,
                                      augment=dict(ctx.config.augment), image_size=ctx.image_size,
                                      mesh=ctx.mesh,
                                      num_parallel_calls=ctx.config.data.num_parallel_calls)

      def checked(batches=batches, role=role, split=split):
        for b in batches:
          ctx.check_stop(f"while evaluating the {role} on {split}; finished evaluations are kept")
          yield b

      res = evaluate_lib.evaluate(
          eval_step, on_mesh, checked(), num_classes=ctx.source.num_classes,
          total=pipeline.num_eval_batches(ctx.source, split, global_batch_size=bs),
          desc=f"evaluate {role} {split}", progress=ctx.progress)
      _log(f"evaluate: {role} {split} top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} "
           f"({res['num_examples']} examples)")
      if distributed.is_main():
        write_json(path, res)
      results[(role, split)] = res
  ctx.workdir.mark("evaluate", {"results": {f"{r}/{s}": {"top1": v["top1"], "top5": v["top5"]}
                                            for (r, s), v in results.items()}})
  return results


def _export_wanted(config) -> tuple[list[tuple[str, str]], str]:
  """((format, quantize) of each file config.export.formats asks for, why the stage is skipped
  ('' when it runs))."""
  entries = schema.export_entries(config)
  role = config.export.role
  if not entries:
    return [], "config.export.formats is ()"
  if not config[role].enabled:
    return [], f"config.export.role={role!r} but config.{role}.enabled is False"
  return entries, ""


def _entry(format: str, quantize: str) -> str:
  return f"{format}:{quantize}"


def _export_done(wd: Workdir, config) -> bool:
  """Whether the export stage has nothing left to do for `config`: its marker holds every file
  config.export.formats asks for (or the stage is skipped and marked)."""
  marker = wd.done("export")
  if marker is None:
    return False
  entries, why = _export_wanted(config)
  return bool(why) or all(_entry(*e) in marker.get("files", {}) for e in entries)


def _export(ctx: _Context, trained: dict[str, Trained]) -> list[dict]:
  """Stage 5: the files of config.export.formats in <workdir>/export/ (jaxkd.export.export: the
  finished model as it is, verified on val against jaxkd, int8 calibrated on train images);
  returns their figures. A file whose figures (FILE.json, written last) exist is kept, not
  exported again."""
  from jaxkd import export as export_lib
  config, wd = ctx.config, ctx.workdir
  entries, why = _export_wanted(config)
  if why:
    _skip(wd, "export", why)
    return []
  if not distributed.is_main():  # process 0 exports; the others wait for it at the end of run
    return []
  role = config.export.role
  model, variables = trained[role].model, trained[role].variables
  aug = config.augment
  deployable = export_lib.Deployable(
      model=model, variables=jax.device_get(variables), model_name=str(config[role].model),
      role=role, image_size=ctx.image_size, class_names=[str(n) for n in ctx.source.class_names],
      eval_crop_fraction=float(aug.eval_crop_fraction), antialias=bool(aug.antialias),
      source=ctx.source)
  split = _eval_split(ctx.source) or ctx.eval_splits()[0]
  previous = (wd.done("export") or {}).get("files", {})
  files, figures = dict(previous), []
  for format, quantize in entries:
    out = export_lib.default_out(wd.path, role, format, quantize)
    meta = out.with_name(out.name + ".json")
    where = f"while exporting {out.name}; the finished exports are kept"
    if out.exists() and meta.exists():
      _log(f"export: keeping the finished {out}")
      result = json.loads(meta.read_text())
    else:
      ctx.check_stop_here(where)

      def say(line, where=where):
        _log(line)
        ctx.check_stop_here(where)

      result = export_lib.export(
          deployable, format, quantize, out, verify_source=ctx.source, verify_split=split,
          max_verify_images=config.export.max_verify_images,
          num_representative=int(config.export.num_representative),
          latency_runs=int(config.export.latency_runs), progress=say)
    figures.append(result)
    files[_entry(format, quantize)] = {
        "file": str(out.relative_to(wd.path)), "size_bytes": result["size_bytes"],
        "max_abs_prob_diff": result["parity"]["max_abs_prob_diff"],
        "top1_agreement": result["parity"]["top1_agreement"], "top1": result["top1"]}
  wd.mark("export", {"role": role, "files": files})
  return figures


def _report(ctx: _Context, results: dict, exports: list[dict]) -> dict:
  """Stage 6: report.md / report.json and the plots; prints report.md."""
  from jaxkd.train import report as report_lib
  wd = ctx.workdir
  if not distributed.is_main():  # process 0 writes the report and plots
    return {}
  training = {role: wd.done(role) for role in schema.ROLES if ctx.config[role].enabled}
  report = report_lib.write_report(ctx.config, wd.path, source=ctx.source, results=results,
                                   splits=ctx.eval_splits(), data_splits=data_splits(ctx.source),
                                   training=training, exports=exports)
  wd.mark("report", {"report": str(wd.path / "report.md")})
  print((wd.path / "report.md").read_text())
  return report


def _run_stages(ctx: _Context) -> dict:
  teacher = _teacher(ctx)
  ctx.check_stop("after the teacher stage")
  teachers = ([] if teacher is None else [teacher]) + _extra_teachers(ctx)
  stores = _teacher_logits(ctx, teachers)
  ctx.check_stop("after the teacher-logit precompute")
  student = _student(ctx, teachers, stores)
  ctx.check_stop("after the student stage")
  trained = {role: t for role, t in (("teacher", teacher), ("student", student)) if t is not None}
  results = _evaluate(ctx, trained)
  ctx.check_stop("after the evaluation")
  exports = _export(ctx, trained)
  ctx.check_stop("after the export stage")  # the others wait here while process 0 exports
  report = _report(ctx, results, exports)
  distributed.barrier("jaxkd-experiment-done")  # the others wait for process 0's files
  return report


# ----------------------------------------------------------------------------- run


def _get_source(config):
  from jaxkd.data import get_source
  data = config.data
  return get_source(data.name, data_dir=data.data_dir, manual_dir=data.manual_dir,
                    val_fraction=float(data.val_fraction), split_seed=int(data.split_seed),
                    download=bool(data.download), version=data.version,
                    skip_bad_images=bool(data.skip_bad_images))


def _prepared_source(config):
  """The data source; with several processes, process 0 prepares it first (builds the TFDS
  dataset, checks and indexes the image folder, writes the caches) while the others wait, so
  no two processes write the same files."""
  if jax.process_count() == 1:
    return _get_source(config)
  source = None
  if distributed.is_main():
    source = _get_source(config)
    for split in source.splits:
      source.num_examples(split)
  distributed.barrier("jaxkd-data-prepared")
  return source if source is not None else _get_source(config)


def _check_training(config, wd: Workdir, source) -> None:
  """What needs the data to be checked, checked before any compute: every stage left to train
  has a full batch per epoch and, with handoff='best' or a 'from_accuracy' value, a val split to
  choose by."""
  from jaxkd.train.loop import FitSpec
  for role in schema.ROLES:
    stage = config[role]
    if not stage.enabled or int(stage.epochs) == 0 or wd.done(role):
      continue
    bs, n = int(stage.batch_size), source.num_examples("train")
    spe = _steps_per_epoch(source, stage)
    if spe < 1:
      raise ConfigError(f"config.{role}.batch_size={bs} is larger than the training split ({n} "
                        f"examples); lower config.{role}.batch_size")
    if stage.handoff == "best" and _eval_split(source) is None:
      raise ConfigError(f"config.{role}.handoff='best' chooses by val top-1, but the data has no "
                        f"val split ({', '.join(source.splits)}); use 'last'")
    # The loss as training resolves it: the parser says which values follow the val top-1.
    total = FitSpec.from_config(stage, steps_per_epoch=spe, seed=0).total_steps
    loss = LossConfig.from_config(stage.loss, steps_per_epoch=spe, total_steps=max(total, 1))
    adaptive = [name for name, value in loss.specs().items()
                if isinstance(value, schedules.AccuracyRule)]
    if adaptive and _eval_split(source) is None:
      raise ConfigError(f"config.{role}.loss.{adaptive[0]}='from_accuracy' is set from the val "
                        f"top-1, but the data has no val split ({', '.join(source.splits)}); use "
                        "a number or a schedule of the step")


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        progress: bool = True) -> dict:
  """Runs the experiment's unfinished stages; returns the report dict.

  `config` gets every schema key it lacks, at its default (jaxkd.config.fill_defaults, in place).
  Raises ConfigError for a config that cannot work (before any compute), and
  jaxkd.train.checkpoint.StopRequested when SIGINT/SIGTERM stopped a stage at a safe point with
  its work saved (a rerun of the same command resumes).
  """
  from jaxkd.train.checkpoint import install_stop_handler
  from jaxkd.train.step import data_mesh

  schema.fill_defaults(config)
  validate(config)
  wd = Workdir(pathlib.Path(workdir))
  harmless = wd.check_config(config)
  if harmless:
    _log("rerun with settings that change no result: " + "; ".join(harmless))

  if all(wd.done(s) for s in STAGES if s != "export"):
    why_no_export = _export_wanted(config)[1]
    if why_no_export:
      _skip(wd, "export", why_no_export)
    if _export_done(wd, config):
      report = json.loads((wd.path / "report.json").read_text())
      if distributed.is_main():
        print((wd.path / "report.md").read_text())
      return report

  source = _prepared_source(config)
  wd.check_dataset(source)
  stop = install_stop_handler()
  try:
    dtype = compute_dtype(config)
    built = {role: models.create(config[role].model, num_classes=source.num_classes, dtype=dtype,
                                 **schema.model_kwargs(config[role]))
             for role in schema.ROLES if config[role].enabled}
    ctx = _Context(config=config, workdir=wd, source=source, mesh=data_mesh(), models=built,
                   stop=stop, progress=progress)
    splits = " / ".join(f"{s} {source.num_examples(s)}" for s in data_splits(source))
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    _log(f"{source.name} {source.version}: {source.num_classes} classes, {splits}; "
         f"{jax.device_count()} {jax.default_backend()} device(s){processes}, compute dtype "
         f"{jnp.dtype(dtype).name}")
    missing = [s for s in config.evaluate.splits if s not in source.splits]
    if missing:
      _log(f"evaluate: the data has no {' / '.join(missing)} split; evaluating on "
           f"{', '.join(ctx.eval_splits())}")
    if not ctx.eval_splits():
      raise ConfigError(f"config.evaluate.splits={tuple(config.evaluate.splits)}: the data has "
                        "none of these splits; use ('val',)")
    _check_training(config, wd, source)
    if _needs_store(config) and not wd.done("student"):
      _check_store_writable(ctx)
    wd.record(config, source)
    return _run_stages(ctx)
  finally:
    stop.uninstall()

