"""An experiment = the stages of the distillation pipeline, run in order inside one workdir.

    teacher          train or fine-tune the teacher (from imported weights or another workdir's teacher)
    teacher_logits   precompute the teacher's logits into the store (beside the data, or
                     config.teacher_logits.store_dir)
    student          distill the student (from stored logits, an online teacher, or CE only)
    evaluate         teacher and student on val and test (val only when the data has no test split)
    report           report.md / report.json (parameters, MACs, accuracy) and plots

`run(config, workdir)` runs the stages not yet done and skips finished ones
(each leaves `<workdir>/stages/<stage>.json`), so a rerun of a finished
experiment only prints its report, and a killed run resumes where it stopped.
The config is checked before any compute (`validate`); the config of the first
run is kept in `<workdir>/config.json`, and a rerun whose config would change a
result is refused, naming the keys (keys that change no result, such as batch
sizes of evaluation or logging, are accepted); the data's identity (its folder
fingerprint) is kept in `dataset.json` and must not change either. SIGINT and
SIGTERM stop at the next safe point with the work saved (`StopRequested`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd import config as schema
from jaxkd import models
from jaxkd.config import ConfigError, compute_dtype, validate
from jaxkd.train.state import replicate
from jaxkd.train.step import LossConfig

__all__ = ["STAGES", "run", "validate", "compute_dtype", "ConfigError"]

STAGES = ("teacher", "teacher_logits", "student", "evaluate", "report")


# ----------------------------------------------------------------------------- workdir bookkeeping


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _changes_result(key: str) -> bool:
  # The folder given as data.manual_dir is compared by what it holds (the dataset fingerprint in
  # dataset.json, see Workdir.check_dataset), not by its path.
  return key != "data.manual_dir" and schema.changes_result(key)


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """(result-changing, harmless) differences between two configs, as 'key: old -> new' lines."""
  a, b = schema.flatten(saved), schema.flatten(current)
  changing, harmless = [], []
  for key in sorted(set(a) | set(b)):
    old, new = a.get(key, "<missing>"), b.get(key, "<missing>")
    if old != new:
      (changing if _changes_result(key) else harmless).append(f"{key}: {old!r} -> {new!r}")
  return changing, harmless


class Workdir:
  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.mkdir(parents=True, exist_ok=True)
    (self.path / "stages").mkdir(exist_ok=True)

  def done(self, stage: str) -> Optional[dict]:
    marker = self.path / "stages" / f"{stage}.json"
    return json.loads(marker.read_text()) if marker.exists() else None

  def mark(self, stage: str, info: dict) -> None:
    if jax.process_index() != 0:
      return
    marker = self.path / "stages" / f"{stage}.json"
    _write_json(marker, {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})

  def check_config(self, config) -> list[str]:
    """Refuses a config whose results would differ from the first run's; returns the harmless changes."""
    saved = self.path / "config.json"
    current = _config_json(config)
    if not saved.exists():
      if jax.process_index() == 0:
        _write_json(saved, current)
      return []
    saved_config = schema.fill_defaults(ml_collections.ConfigDict(json.loads(saved.read_text())))
    changing, harmless = config_changes(_config_json(saved_config), current)
    if changing:
      reuse = ""
      if self.done("teacher") and (self.path / "teacher" / "final_variables").exists():
        reuse = (f"; to reuse its finished teacher there, add --config.teacher.pretrained={self.path} "
                 "--config.teacher.epochs=0")
      raise ConfigError(f"{self.path} holds a run whose results this config would change ("
                        + "; ".join(f"config.{c}" for c in changing)
                        + f"): use a new --workdir for a new experiment{reuse}")
    return harmless

  def check_dataset(self, source) -> None:
    """The data a workdir was made with must not change under it (a different or edited folder)."""
    path = self.path / "dataset.json"
    current = _dataset_identity(source)
    if not path.exists():
      if jax.process_index() == 0:
        _write_json(path, current)
      return
    saved = json.loads(path.read_text())
    changed = [k for k in ("name", "version", "num_classes", "num_examples") if saved.get(k) != current.get(k)]
    if changed:
      what = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
      raise ConfigError(f"the data differs from the data {self.path} was made with ({what}): the folder "
                        "was changed or another one given; use a new --workdir for the new data")


def _write_json(path: pathlib.Path, obj) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _data_splits(source) -> list[str]:
  """The evaluation splits the data has: train, val, and test unless it has no test split."""
  return [s for s in ("train", "val", "test") if s in source.splits]


def _dataset_identity(source) -> dict:
  return {"name": source.name, "version": source.version, "num_classes": source.num_classes,
          "num_examples": {s: source.num_examples(s) for s in _data_splits(source)}}


# ----------------------------------------------------------------------------- stages


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[jaxkd] {msg}", flush=True)


def _image_size(config) -> int:
  return int(config.augment.image_size)


def _variables_dir(workdir: pathlib.Path, role: str) -> pathlib.Path:
  return pathlib.Path(workdir) / role / "final_variables"


def _save_variables(path: pathlib.Path, variables) -> None:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.resolve(), jax.device_get(variables), force=True)


def _load_variables(path: pathlib.Path, model, image_size: int):
  import orbax.checkpoint as ocp
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                               train=False))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), dict(abstract))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path.resolve(), abstract)


def finished_workdir_teacher(path: str) -> Optional[pathlib.Path]:
  """The workdir folder when `path` is a jaxkd workdir with a finished teacher stage, else None."""
  p = pathlib.Path(os.path.expanduser(path))
  if p.is_dir() and (p / "stages" / "teacher.json").is_file() and _variables_dir(p, "teacher").is_dir():
    return p
  return None


def _workdir_teacher_variables(ctx: "_Context", old: pathlib.Path, model):
  """The teacher of a finished workdir, for reuse in this one (same model and classes, else an error)."""
  old_config = json.loads((old / "config.json").read_text())
  stage = ctx.config.teacher
  want = {"model": stage.model, "model_kwargs": schema.model_kwargs(stage)}
  have = {"model": old_config["teacher"]["model"], "model_kwargs": schema.model_kwargs(old_config["teacher"])}
  if want != have:
    raise ConfigError(f"config.teacher.pretrained={str(old)!r}: that workdir's teacher is {have}, this config "
                      f"asks for {want}; set --config.teacher.model (and model_kwargs) to match")
  old_data = old / "dataset.json"
  if old_data.exists():
    classes = json.loads(old_data.read_text())["num_classes"]
    if classes != ctx.source.num_classes:
      raise ConfigError(f"config.teacher.pretrained={str(old)!r}: that teacher has {classes} classes, the data "
                        f"has {ctx.source.num_classes}; reuse a teacher trained on the same classes")
  _log(f"teacher: reusing the finished teacher of {old}")
  return _load_variables(_variables_dir(old, "teacher"), model, _image_size(ctx.config))


def _pretrained_variables(ctx: "_Context", role: str, model):
  """Variables from config.<role>.pretrained (a checkpoint file, 'torchvision[:WEIGHTS]' or, for the
  teacher, a finished jaxkd workdir), or None."""
  stage = ctx.config[role]
  path = stage.get("pretrained")
  if not path:
    return None
  old = finished_workdir_teacher(path)
  if old is not None:
    if role != "teacher":
      raise ConfigError(f"config.{role}.pretrained={path!r} is a workdir: only the teacher can be reused that way")
    return _workdir_teacher_variables(ctx, old, model)
  _log(f"{role}: importing pretrained weights from {path}")
  return models.load_pretrained(stage.model, path if path.startswith("torchvision") else os.path.expanduser(path),
                                num_classes=ctx.source.num_classes, model_kwargs=schema.model_kwargs(stage))


def _create(stage, num_classes: int, dtype):
  return models.create(stage.model, num_classes=num_classes, dtype=dtype, **schema.model_kwargs(stage))


def _preprocessing(config) -> dict:
  from jaxkd.data import AugmentConfig
  aug = AugmentConfig.from_mapping(config.augment)
  return {"image_size": aug.image_size, "eval_crop_fraction": aug.eval_crop_fraction,
          "antialias": aug.antialias, "normalization": "imagenet_mean_std"}


@dataclasses.dataclass
class _Context:
  config: Any
  workdir: Workdir
  source: Any
  mesh: Any
  dtype: Any
  stop: Any  # PreemptionFlag: SIGINT / SIGTERM asked to stop at the next safe point
  progress: bool

  def check_stop(self, where: str) -> None:
    from jaxkd.train.checkpoint import StopRequested
    if self.stop is not None and self.stop.requested:
      raise StopRequested(self.stop.signum, where)

  def eval_splits(self) -> list[str]:
    return [s for s in self.config.evaluate.splits if s in self.source.splits]


def _steps_text(ctx: _Context, stage) -> str:
  from jaxkd.data import pipeline
  spe = pipeline.steps_per_epoch(ctx.source, "train", global_batch_size=int(stage.batch_size))
  total = int(stage.epochs) * spe
  cap = stage.get("max_steps")
  if cap and int(cap) < total:
    return f"{int(cap)} steps (max_steps; {stage.epochs} epochs would be {total} steps of {spe} per epoch)"
  return f"{stage.epochs} epochs ({total} steps of batch {stage.batch_size})"


def _train_stage(ctx: _Context, role: str, model, *, teacher_model=None, teacher_variables=None,
                 teacher_lookup=None, init_variables=None):
  from jaxkd.train.checkpoint import StopRequested
  from jaxkd.train.loop import fit
  stage = ctx.config[role]
  eval_split = "val" if "val" in ctx.source.splits else None
  result = fit(model=model, stage_config=stage, source=ctx.source, augment=dict(ctx.config.augment),
               mesh=ctx.mesh, stage_dir=ctx.workdir.path / role, seed=int(ctx.config.seed),
               image_size=_image_size(ctx.config), teacher_model=teacher_model,
               teacher_variables=teacher_variables, teacher_lookup=teacher_lookup, init_variables=init_variables,
               eval_split=eval_split, eval_batch_size=int(ctx.config.evaluate.batch_size), preemption=ctx.stop,
               num_parallel_calls=ctx.config.data.get("num_parallel_calls"), progress=ctx.progress, desc=role)
  if result.preempted:
    raise StopRequested(ctx.stop.signum, f"during {role} training at step {result.steps}; checkpoint saved")
  variables = result.state.variables()
  _save_variables(_variables_dir(ctx.workdir.path, role), variables)
  ctx.workdir.mark(role, {"steps": result.steps, "val": None if result.val is None else
                          {k: result.val[k] for k in ("top1", "top5", "loss", "num_examples")}})
  return variables


def _teacher(ctx: _Context):
  """Returns (teacher_model, teacher_variables), training/fine-tuning or loading as needed."""
  stage = ctx.config.teacher
  model = _create(stage, ctx.source.num_classes, ctx.dtype)
  if ctx.workdir.done("teacher"):
    return model, _load_variables(_variables_dir(ctx.workdir.path, "teacher"), model, _image_size(ctx.config))
  init = _pretrained_variables(ctx, "teacher", model)
  if int(stage.epochs) == 0:
    _save_variables(_variables_dir(ctx.workdir.path, "teacher"), init)
    ctx.workdir.mark("teacher", {"steps": 0, "val": None, "pretrained": stage.pretrained})
    return model, init
  _log(f"teacher: training {stage.model} for {_steps_text(ctx, stage)}")
  return model, _train_stage(ctx, "teacher", model, init_variables=init)


def _store_root(ctx: _Context) -> pathlib.Path:
  """Where teacher-logit stores live: config.teacher_logits.store_dir, else next to the data."""
  chosen = ctx.config.teacher_logits.get("store_dir")
  if chosen:
    return pathlib.Path(os.path.expanduser(chosen))
  builder = getattr(ctx.source, "builder", None)
  if builder is not None:
    return pathlib.Path(os.fspath(builder.data_dir_root))
  from jaxkd.data.user_folders import default_data_dir
  return default_data_dir(ctx.config.data.get("data_dir"))


def _needs_store(config) -> bool:
  return config.student.enabled and config.teacher.enabled and _teacher_source(config) == "stored"


def _check_store_writable(ctx: _Context) -> None:
  """Refuses, before any training, a store location the logit precompute could not write to."""
  import tempfile

  from jaxkd import teacher_store
  base = teacher_store.stores_root(_store_root(ctx), ctx.source.name, ctx.source.version)
  key = ("config.teacher_logits.store_dir" if ctx.config.teacher_logits.get("store_dir")
         else "the default store location (beside the data; config.teacher_logits.store_dir)")
  try:
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=base, prefix=".write-check-"):
      pass
  except OSError as e:
    raise ConfigError(f"{key}: cannot write the teacher-logit store under {base} ({e.strerror or e}); "
                      "set --config.teacher_logits.store_dir to a writable folder") from None


def _teacher_store(ctx: _Context, teacher_model, teacher_variables):
  """Precomputes (or opens) the teacher-logit store of the training split."""
  from jaxkd import teacher_store
  from jaxkd.data import pipeline
  from jaxkd.train.step import make_eval_step

  tid = teacher_store.teacher_id(ctx.config.teacher.model, teacher_variables)
  split = "train"
  store_dir = teacher_store.store_path(_store_root(ctx), ctx.source.name, ctx.source.version, tid, split)
  expect = dict(dataset=ctx.source.name, version=ctx.source.version, split=split,
                num_classes=ctx.source.num_classes, teacher_id=tid, preprocessing=_preprocessing(ctx.config))
  hint = (f"delete the folder {store_dir} (and {teacher_store.partial_path(store_dir).name} beside it, if "
          "present) and rerun the same command: the next run recomputes it")
  if store_dir.exists():
    return teacher_store.TeacherStore.open(store_dir, expect=expect, hint=hint)
  _log(f"teacher_logits: precomputing {tid} on {ctx.source.name}/{split} into {store_dir}")
  eval_step = make_eval_step(teacher_model, ctx.mesh)
  variables = replicate(teacher_variables, ctx.mesh)
  batch_size = int(ctx.config.teacher_logits.get("batch_size", ctx.config.evaluate.batch_size))

  def batches(start_batch: int = 0):
    it = pipeline.eval_batches(ctx.source, split, global_batch_size=batch_size, augment=dict(ctx.config.augment),
                               image_size=_image_size(ctx.config),
                               num_parallel_calls=ctx.config.data.get("num_parallel_calls"))
    for i, b in enumerate(it):
      if i >= start_batch:
        ctx.check_stop(f"during the teacher-logit precompute (batch {i}); the finished batches are kept")
        yield b

  def apply_fn(images):
    n = images.shape[0]
    dummy = {"image": images, "label": jnp.zeros((n,), jnp.int32)}
    on_device = pipeline.to_device(dummy, ctx.mesh)
    return eval_step(variables, on_device)["logits"]

  return teacher_store.precompute(
      batches, apply_fn, dataset=ctx.source.name, version=ctx.source.version, split=split, teacher_id=tid,
      num_examples=ctx.source.num_examples(split), num_classes=ctx.source.num_classes,
      class_names=list(ctx.source.class_names), preprocessing=_preprocessing(ctx.config),
      teacher_info={"model": ctx.config.teacher.model}, store_dir=store_dir,
      dtype=ctx.config.teacher_logits.get("dtype", "float16"), progress=ctx.progress, hint=hint)


def _evaluate_stage(ctx: _Context, roles: dict) -> dict:
  from jaxkd.data import pipeline
  from jaxkd.train import evaluate as evaluate_lib
  from jaxkd.train.step import make_eval_step
  results = {}
  out_dir = ctx.workdir.path / "eval"
  out_dir.mkdir(exist_ok=True)
  bs = int(ctx.config.evaluate.batch_size)
  for role, (model, variables) in roles.items():
    eval_step = make_eval_step(model, ctx.mesh)
    on_mesh = replicate(variables, ctx.mesh)
    for split in ctx.eval_splits():
      path = out_dir / f"{role}_{split}.json"
      if path.exists():
        results[(role, split)] = json.loads(path.read_text())
        continue
      batches = pipeline.eval_batches(ctx.source, split, global_batch_size=bs, augment=dict(ctx.config.augment),
                                      image_size=_image_size(ctx.config), mesh=ctx.mesh,
                                      num_parallel_calls=ctx.config.data.get("num_parallel_calls"))

      def checked(batches=batches, role=role, split=split):
        for b in batches:
          ctx.check_stop(f"while evaluating the {role} on {split}; finished evaluations are kept")
          yield b

      res = evaluate_lib.evaluate(eval_step, on_mesh, checked(), num_classes=ctx.source.num_classes,
                                  total=pipeline.num_eval_batches(ctx.source, split, global_batch_size=bs),
                                  desc=f"evaluate {role} {split}", progress=ctx.progress)
      _log(f"evaluate: {role} {split} top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} "
           f"({res['num_examples']} examples)")
      if jax.process_index() == 0:
        _write_json(path, res)
      results[(role, split)] = res
  return results


def _teacher_source(config) -> str:
  loss = LossConfig.from_config(config.student.loss)
  return config.student.get("teacher", "stored") if loss.needs_teacher else "none"


def _student(ctx: _Context, teacher_model, teacher_variables):
  """Returns (student_model, student_variables): precomputes the teacher logits if needed, then distills."""
  wd, cfg = ctx.workdir, ctx.config.student
  loss = LossConfig.from_config(cfg.loss)
  teacher_source = _teacher_source(ctx.config)
  model = _create(cfg, ctx.source.num_classes, ctx.dtype)
  if wd.done("student"):
    return model, _load_variables(_variables_dir(wd.path, "student"), model, _image_size(ctx.config))
  lookup = None
  if teacher_source == "stored":
    store = _teacher_store(ctx, teacher_model, teacher_variables)
    if not wd.done("teacher_logits"):
      wd.mark("teacher_logits", {"store": str(store.path), "teacher_id": store.teacher_id})
    lookup = store.tf_lookup
  elif not wd.done("teacher_logits"):
    wd.mark("teacher_logits", {"store": None, "skipped": f"the student's teacher is {teacher_source!r}"})
  ctx.check_stop("after the teacher-logit precompute")

  _log(f"student: training {cfg.model} with loss {loss.kind}{' + perception' if loss.perception else ''} "
       f"(teacher: {teacher_source}) for {_steps_text(ctx, cfg)}")
  init = _pretrained_variables(ctx, "student", model)
  online = teacher_source == "online"
  return model, _train_stage(ctx, "student", model, teacher_model=teacher_model if online else None,
                             teacher_variables=teacher_variables if online else None, teacher_lookup=lookup,
                             init_variables=init)


def _get_source(config):
  from jaxkd.data import get_source
  data = config.data
  return get_source(data.name, data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"),
                    val_fraction=float(data.get("val_fraction", 0.2)), split_seed=int(data.get("split_seed", 0)),
                    download=bool(data.get("download", True)), version=data.get("version"),
                    skip_bad_images=bool(data.get("skip_bad_images", False)))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
  """Runs the experiment's unfinished stages; returns the report dict.

  Raises ConfigError for a config that cannot work (before any compute), and
  jaxkd.train.checkpoint.StopRequested when SIGINT/SIGTERM stopped a stage at a
  safe point with its work saved (a rerun of the same command resumes).
  """
  from jaxkd.train.checkpoint import install_stop_handler
  from jaxkd.train.step import data_mesh

  validate(config)
  wd = Workdir(pathlib.Path(workdir))
  harmless = wd.check_config(config)
  if harmless:
    _log("rerun with settings that change no result: " + "; ".join(harmless))

  if wd.done("report") and all(wd.done(s) for s in STAGES if s != "report"):
    report = json.loads((wd.path / "report.json").read_text())
    print((wd.path / "report.md").read_text())
    return report

  source = _get_source(config)
  wd.check_dataset(source)
  stop = install_stop_handler()
  try:
    ctx = _Context(config=config, workdir=wd, source=source, mesh=data_mesh(), dtype=compute_dtype(config),
                   stop=stop, progress=progress)
    splits = " / ".join(f"{s} {source.num_examples(s)}" for s in _data_splits(source))
    _log(f"{source.name} {source.version}: {source.num_classes} classes, {splits}; {jax.device_count()} "
         f"{jax.default_backend()} device(s), compute dtype {jnp.dtype(ctx.dtype).name}")
    missing = [s for s in config.evaluate.splits if s not in source.splits]
    if missing:
      _log(f"evaluate: the data has no {' / '.join(missing)} split; evaluating on {', '.join(ctx.eval_splits())}")
    if not ctx.eval_splits():
      raise ConfigError(f"config.evaluate.splits={tuple(config.evaluate.splits)}: the data has none of these "
                        "splits; use ('val',)")
    if _needs_store(config) and not wd.done("student"):
      _check_store_writable(ctx)
    return _run_stages(ctx)
  finally:
    stop.uninstall()


def _run_stages(ctx: _Context) -> dict:
  from jaxkd.train import report as report_lib
  config, wd, source = ctx.config, ctx.workdir, ctx.source
  roles = {}
  teacher_model = teacher_variables = None
  if config.teacher.enabled:
    teacher_model, teacher_variables = _teacher(ctx)
    roles["teacher"] = (teacher_model, teacher_variables)
    ctx.check_stop("after the teacher stage")

  if config.student.enabled:
    roles["student"] = _student(ctx, teacher_model, teacher_variables)
    ctx.check_stop("after the student stage")
  else:
    for stage in ("teacher_logits", "student"):
      if not wd.done(stage):
        wd.mark(stage, {"skipped": "config.student.enabled is False"})

  results = _evaluate_stage(ctx, roles)
  wd.mark("evaluate", {"results": {f"{r}/{s}": {"top1": v["top1"], "top5": v["top5"]}
                                   for (r, s), v in results.items()}})
  report = report_lib.write_report(config, wd.path, source=source, results=results, splits=ctx.eval_splits(),
                                   data_splits=_data_splits(source))
  wd.mark("report", {"report": str(wd.path / "report.md")})
  if jax.process_index() == 0:
    print((wd.path / "report.md").read_text())
  return report
