"""An experiment = the stages of the seed's pipeline, run in order inside one workdir.

    teacher          train or fine-tune the teacher (optionally from imported weights)
    teacher_logits   precompute the teacher's logits into the store next to the data
    student          distill the student (from stored logits, an online teacher, or CE only)
    evaluate         teacher and student on val and test: top-1/5, per-class, confusion
    report           report.md / report.json (the seed's Table 1) and plots

`run(config, workdir)` runs the stages not yet done and skips finished ones
(each leaves `<workdir>/stages/<stage>.json`), so a rerun of a finished
experiment only prints its report, and a killed run resumes where it stopped.
The config is checked before any compute (`validate`); the config of the first
run is kept in `<workdir>/config.json` and a rerun with a different one is
refused, naming the keys that differ.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd import models
from jaxkd.train.state import replicate
from jaxkd.train.step import LossConfig

__all__ = ["STAGES", "run", "validate", "compute_dtype", "ConfigError"]

STAGES = ("teacher", "teacher_logits", "student", "evaluate", "report")
_TEACHER_SOURCES = ("stored", "online", "none")
_OPTIMIZER_KEYS = {"optimizer", "learning_rate", "weight_decay", "decay_1d_params", "momentum", "nesterov",
                   "b1", "b2", "eps", "grad_clip_norm", "schedule", "pct_start", "div_factor",
                   "final_div_factor", "anneal", "three_phase", "cycle_momentum", "base_momentum",
                   "max_momentum", "milestones", "milestone_steps", "lr_decay",
                   "warmup_steps"}
_STAGE_KEYS = {"model", "model_kwargs", "pretrained", "epochs", "batch_size", "optimizer", "loss",
               "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_steps",
               "eval_every_epochs", "enabled", "teacher"}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what to do."""


# ----------------------------------------------------------------------------- config checks


def compute_dtype(config) -> Any:
  """config.dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'."""
  name = config.get("dtype", "auto")
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _loss_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(LossConfig)} | {"warmup_epochs"}


def _check_keys(d, allowed: set[str], where: str) -> None:
  unknown = sorted(set(d.keys()) - allowed)
  if unknown:
    raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed: "
                      f"{', '.join(sorted(allowed))}")


def _validate_stage(stage, where: str, num_devices: int) -> None:
  _check_keys(stage, _STAGE_KEYS, where)
  if stage.model not in models.names():
    raise ConfigError(f"{where}.model={stage.model!r} is not a registered model; choose one of "
                      f"{', '.join(models.names())}")
  if int(stage.epochs) < 0:
    raise ConfigError(f"{where}.epochs={stage.epochs} must be >= 0")
  bs = int(stage.batch_size)
  if bs <= 0 or bs % num_devices:
    raise ConfigError(f"{where}.batch_size={bs} must be a positive multiple of the {num_devices} devices "
                      f"(global batch, split over the 'data' mesh axis)")
  _check_keys(stage.optimizer, _OPTIMIZER_KEYS, f"{where}.optimizer")
  if float(stage.optimizer.get("learning_rate", 1e-3)) <= 0:
    raise ConfigError(f"{where}.optimizer.learning_rate={stage.optimizer.learning_rate} must be > 0")
  _check_keys(stage.loss, _loss_fields(), f"{where}.loss")
  try:
    loss = LossConfig.from_config(stage.loss)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where}.loss: {e}") from e
  t = loss.temperature
  if not callable(t) and float(t) <= 0:
    raise ConfigError(f"{where}.loss.temperature={t} must be > 0")


def validate(config, *, num_devices: Optional[int] = None) -> None:
  """Checks everything that can be checked without compute; raises ConfigError naming the key."""
  num_devices = num_devices or jax.device_count()
  _check_keys(config, {"seed", "dtype", "data", "augment", "teacher", "teacher_logits", "student",
                       "evaluate", "report", "name"}, "config")
  if config.get("dtype", "auto") not in ("auto", "float32", "bfloat16"):
    raise ConfigError(f"config.dtype={config.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
  from jaxkd.data import SOURCE_NAMES, AugmentConfig
  data = config.data
  _check_keys(data, {"name", "data_dir", "manual_dir", "val_fraction", "split_seed", "download", "version",
                     "num_parallel_calls"}, "config.data")
  if data.name not in SOURCE_NAMES:
    raise ConfigError(f"config.data.name={data.name!r}: use one of {', '.join(SOURCE_NAMES)}")
  if data.get("manual_dir") and data.name in ("food101_local", "image_folder"):
    path = pathlib.Path(os.path.expanduser(data.manual_dir))
    if not path.is_dir():
      raise ConfigError(f"config.data.manual_dir={data.manual_dir!r} does not exist (resolved to "
                        f"{path.resolve()}); point it at your extracted data")
  if not 0.0 < float(data.get("val_fraction", 0.2)) < 1.0:
    raise ConfigError(f"config.data.val_fraction={data.val_fraction} must be in (0, 1)")
  try:
    AugmentConfig.from_mapping(config.augment)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.augment: {e}") from e
  if not config.teacher.enabled and not config.student.enabled:
    raise ConfigError("config.teacher.enabled and config.student.enabled are both False: nothing to do")
  if config.teacher.enabled:
    _validate_stage(config.teacher, "config.teacher", num_devices)
  if config.student.enabled:
    _validate_stage(config.student, "config.student", num_devices)
    source = config.student.get("teacher", "stored")
    if source not in _TEACHER_SOURCES:
      raise ConfigError(f"config.student.teacher={source!r}: use one of {_TEACHER_SOURCES}")
    loss = LossConfig.from_config(config.student.loss)
    if loss.needs_teacher:
      if source == "none":
        raise ConfigError(f"config.student.loss.kind={loss.kind!r} distills, but config.student.teacher='none'; "
                          "use 'stored' or 'online', or kind='ce'")
      if not config.teacher.enabled:
        raise ConfigError("config.student.loss distills but config.teacher.enabled=False; enable the teacher "
                          "stage (epochs=0 with a pretrained checkpoint to use imported weights as they are)")
      if loss.feature_losses and source != "online":
        raise ConfigError("feature losses need the teacher's features: set config.student.teacher='online'")
  if config.teacher.enabled and int(config.teacher.epochs) == 0 and not config.teacher.get("pretrained"):
    raise ConfigError("config.teacher.epochs=0 needs config.teacher.pretrained=<checkpoint path>")
  for role in ("teacher", "student"):
    path = config[role].get("pretrained")
    if path and not path.startswith("torchvision") and not pathlib.Path(os.path.expanduser(path)).is_file():
      raise ConfigError(f"config.{role}.pretrained={path!r} is not a file: give a PyTorch checkpoint "
                        "(.safetensors, or .pth with torch installed) or 'torchvision' / "
                        "'torchvision:IMAGENET1K_V2' to download torchvision's ImageNet weights")
  for split in config.evaluate.splits:
    if split not in ("train", "val", "test"):
      raise ConfigError(f"config.evaluate.splits contains {split!r}; use 'train', 'val' or 'test'")
  if int(config.evaluate.batch_size) % num_devices:
    raise ConfigError(f"config.evaluate.batch_size={config.evaluate.batch_size} must be a multiple of the "
                      f"{num_devices} devices")


# ----------------------------------------------------------------------------- workdir bookkeeping


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _diff(a: Any, b: Any, prefix: str = "config") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}.{k}")
    return out
  return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


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
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info},
                              indent=2))
    os.replace(tmp, marker)

  def check_config(self, config) -> None:
    saved = self.path / "config.json"
    current = _config_json(config)
    if saved.exists():
      differences = _diff(json.loads(saved.read_text()), current)
      if differences:
        raise ConfigError(f"{self.path} holds an experiment with a different config:\n  " +
                          "\n  ".join(differences) + "\nuse a new --workdir for a new experiment")
    elif jax.process_index() == 0:
      saved.write_text(json.dumps(current, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- stages


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[jaxkd] {msg}", flush=True)


def _image_size(config) -> int:
  return int(config.augment.image_size)


def _variables_dir(workdir: Workdir, role: str) -> pathlib.Path:
  return workdir.path / role / "final_variables"


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


def _pretrained_variables(ctx: "_Context", role: str):
  """Variables imported from config.<role>.pretrained (a checkpoint file or 'torchvision[:WEIGHTS]'), or None."""
  stage = ctx.config[role]
  path = stage.get("pretrained")
  if not path:
    return None
  _log(f"{role}: importing pretrained weights from {path}")
  return models.load_pretrained(stage.model, path if path.startswith("torchvision") else os.path.expanduser(path),
                                num_classes=ctx.source.num_classes, model_kwargs=dict(stage.get("model_kwargs", {})))


def _create(stage, num_classes: int, dtype):
  return models.create(stage.model, num_classes=num_classes, dtype=dtype, **dict(stage.get("model_kwargs", {})))


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
  preemption: Any
  progress: bool


def _train_stage(ctx: _Context, role: str, *, teacher_model=None, teacher_variables=None, teacher_lookup=None,
                 init_variables=None):
  from jaxkd.train.loop import fit
  stage = ctx.config[role]
  model = _create(stage, ctx.source.num_classes, ctx.dtype)
  result = fit(model=model, stage_config=stage, source=ctx.source, augment=dict(ctx.config.augment),
               mesh=ctx.mesh, stage_dir=ctx.workdir.path / role, seed=int(ctx.config.seed),
               image_size=_image_size(ctx.config), teacher_model=teacher_model,
               teacher_variables=teacher_variables, teacher_lookup=teacher_lookup, init_variables=init_variables,
               eval_batch_size=int(ctx.config.evaluate.batch_size), preemption=ctx.preemption,
               num_parallel_calls=ctx.config.data.get("num_parallel_calls"), progress=ctx.progress, desc=role)
  if result.preempted:
    _log(f"{role}: preempted at step {result.steps}; checkpoint saved. Rerun the same command to resume.")
    sys.exit(0)
  variables = result.state.variables()
  _save_variables(_variables_dir(ctx.workdir, role), variables)
  ctx.workdir.mark(role, {"steps": result.steps, "val": None if result.val is None else
                          {k: result.val[k] for k in ("top1", "top5", "loss", "num_examples")}})
  return model, variables


def _teacher(ctx: _Context):
  """Returns (teacher_model, teacher_variables), training/fine-tuning or loading as needed."""
  stage = ctx.config.teacher
  model = _create(stage, ctx.source.num_classes, ctx.dtype)
  if ctx.workdir.done("teacher"):
    return model, _load_variables(_variables_dir(ctx.workdir, "teacher"), model, _image_size(ctx.config))
  init = _pretrained_variables(ctx, "teacher")
  if int(stage.epochs) == 0:
    _save_variables(_variables_dir(ctx.workdir, "teacher"), init)
    ctx.workdir.mark("teacher", {"steps": 0, "val": None, "pretrained": stage.pretrained})
    return model, init
  _log(f"teacher: training {stage.model} for {stage.epochs} epochs")
  return _train_stage(ctx, "teacher", init_variables=init)


def _store_root(ctx: _Context) -> pathlib.Path:
  """The TFDS data_dir the source lives in (stores are kept next to the data)."""
  builder = getattr(ctx.source, "builder", None)
  if builder is not None:
    return pathlib.Path(os.fspath(builder.data_dir_root))
  root = ctx.config.data.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return pathlib.Path(os.path.expanduser(root))


def _teacher_store(ctx: _Context, teacher_model, teacher_variables):
  """Precomputes (or opens) the teacher-logit store of the training split."""
  from jaxkd import teacher_store
  from jaxkd.data import pipeline
  from jaxkd.train.step import make_eval_step

  tid = teacher_store.teacher_id(ctx.config.teacher.model, teacher_variables)
  data_dir = _store_root(ctx)
  split = "train"
  store_dir = teacher_store.store_path(data_dir, ctx.source.name, ctx.source.version, tid, split)
  expect = dict(dataset=ctx.source.name, version=ctx.source.version, split=split,
                num_classes=ctx.source.num_classes, teacher_id=tid, preprocessing=_preprocessing(ctx.config))
  hint = "rerun main.py with the same --config and --workdir"
  if store_dir.exists():
    store = teacher_store.TeacherStore.open(store_dir, expect=expect, hint=hint)
  else:
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
          yield b

    def apply_fn(images):
      n = images.shape[0]
      dummy = {"image": images, "label": jnp.zeros((n,), jnp.int32)}
      on_device = pipeline.to_device(dummy, ctx.mesh)
      return eval_step(variables, on_device)["logits"]

    store = teacher_store.precompute(
        batches, apply_fn, dataset=ctx.source.name, version=ctx.source.version, split=split, teacher_id=tid,
        num_examples=ctx.source.num_examples(split), num_classes=ctx.source.num_classes,
        class_names=list(ctx.source.class_names), preprocessing=_preprocessing(ctx.config),
        teacher_info={"model": ctx.config.teacher.model}, store_dir=store_dir,
        dtype=ctx.config.teacher_logits.get("dtype", "float16"), progress=ctx.progress, hint=hint)
  return store


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
    for split in ctx.config.evaluate.splits:
      path = out_dir / f"{role}_{split}.json"
      if path.exists():
        results[(role, split)] = json.loads(path.read_text())
        continue
      batches = pipeline.eval_batches(ctx.source, split, global_batch_size=bs, augment=dict(ctx.config.augment),
                                      image_size=_image_size(ctx.config), mesh=ctx.mesh,
                                      num_parallel_calls=ctx.config.data.get("num_parallel_calls"))
      res = evaluate_lib.evaluate(eval_step, on_mesh, batches, num_classes=ctx.source.num_classes,
                                  total=pipeline.num_eval_batches(ctx.source, split, global_batch_size=bs),
                                  desc=f"evaluate {role} {split}", progress=ctx.progress)
      _log(f"evaluate: {role} {split} top-1 {res['top1']:.4f} top-5 {res['top5']:.4f} "
           f"({res['num_examples']} examples)")
      if jax.process_index() == 0:
        path.write_text(json.dumps(res))
      results[(role, split)] = res
  return results


def _student(ctx: _Context, teacher_model, teacher_variables):
  """Returns (student_model, student_variables): precomputes the teacher logits if needed, then distills."""
  wd, cfg = ctx.workdir, ctx.config.student
  loss = LossConfig.from_config(cfg.loss)
  teacher_source = cfg.get("teacher", "stored") if loss.needs_teacher else "none"
  lookup = None
  if teacher_source == "stored" and not wd.done("student"):
    store = _teacher_store(ctx, teacher_model, teacher_variables)
    wd.mark("teacher_logits", {"store": str(store.path), "teacher_id": store.teacher_id})
    lookup = store.tf_lookup
  elif not wd.done("teacher_logits"):
    wd.mark("teacher_logits", {"store": None, "skipped": f"the student's teacher is {teacher_source!r}"})

  model = _create(cfg, ctx.source.num_classes, ctx.dtype)
  if wd.done("student"):
    return model, _load_variables(_variables_dir(wd, "student"), model, _image_size(ctx.config))
  _log(f"student: training {cfg.model} with loss {loss.kind}{' + perception' if loss.perception else ''} "
       f"(teacher: {teacher_source}) for {cfg.epochs} epochs")
  init = _pretrained_variables(ctx, "student")
  online = teacher_source == "online"
  return _train_stage(ctx, "student", teacher_model=teacher_model if online else None,
                      teacher_variables=teacher_variables if online else None, teacher_lookup=lookup,
                      init_variables=init)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
  """Runs the experiment's unfinished stages; returns the report dict."""
  from jaxkd.train import report as report_lib
  from jaxkd.train.checkpoint import install_sigterm_handler
  from jaxkd.train.step import data_mesh

  validate(config)
  wd = Workdir(pathlib.Path(workdir))
  wd.check_config(config)

  if wd.done("report") and all(wd.done(s) for s in STAGES if s != "report"):
    report = json.loads((wd.path / "report.json").read_text())
    print((wd.path / "report.md").read_text())
    return report

  from jaxkd.data import get_source
  data = config.data
  source = get_source(data.name, data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"),
                      val_fraction=float(data.get("val_fraction", 0.2)), split_seed=int(data.get("split_seed", 0)),
                      download=bool(data.get("download", True)), version=data.get("version"))
  ctx = _Context(config=config, workdir=wd, source=source, mesh=data_mesh(), dtype=compute_dtype(config),
                 preemption=install_sigterm_handler(), progress=progress)
  _log(f"{source.name} {source.version}: {source.num_classes} classes, train {source.num_examples('train')} / "
       f"val {source.num_examples('val')} / test {source.num_examples('test')}; {jax.device_count()} "
       f"{jax.default_backend()} device(s), compute dtype {jnp.dtype(ctx.dtype).name}")

  roles = {}
  student_cfg = config.student
  teacher_model = teacher_variables = None
  if config.teacher.enabled:
    teacher_model, teacher_variables = _teacher(ctx)
    roles["teacher"] = (teacher_model, teacher_variables)

  if student_cfg.enabled:
    roles["student"] = _student(ctx, teacher_model, teacher_variables)
  else:
    for stage in ("teacher_logits", "student"):
      if not wd.done(stage):
        wd.mark(stage, {"skipped": "config.student.enabled is False"})

  results = _evaluate_stage(ctx, roles)
  wd.mark("evaluate", {"results": {f"{r}/{s}": {"top1": v["top1"], "top5": v["top5"]}
                                   for (r, s), v in results.items()}})
  report = report_lib.write_report(config, wd.path, source=source, results=results)
  wd.mark("report", {"report": str(wd.path / "report.md")})
  if jax.process_index() == 0:
    print((wd.path / "report.md").read_text())
  return report
