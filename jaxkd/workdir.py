"""The layout of an experiment's workdir, and the checks that keep one workdir one experiment.

    <workdir>/config.json             the config of the first run (a rerun that would change a
                                      result is refused, naming the keys)
    <workdir>/dataset.json            the data's identity (name, version, classes, split sizes)
                                      and its class names (prediction and export need no data)
    <workdir>/stages/<stage>.json     one marker per finished stage (teacher, teacher_logits,
                                      student, evaluate, export, report)
    <workdir>/<role>/final_variables  the variables a training stage hands on (Orbax)
    <workdir>/<role>/checkpoints/     the training checkpoints, metrics.jsonl, tensorboard/
                                      (written by jaxkd.train.loop.fit)
    <workdir>/eval/<role>_<split>.json, report.md, report.json, plots/
    <workdir>/export/<role>_<float32|float16|int8>.<tflite|onnx>(.json)  deployable files

`Workdir(path)` reads and writes these; `load_variables(workdir, role)` gives a finished run's
model and variables (for prediction and export); `finished_workdir_teacher(path)` says whether a
folder is a workdir whose teacher can be reused by another experiment. Nothing here computes:
the stages themselves are in jaxkd.experiment.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections

from jaxkd import config as schema
from jaxkd.config import ConfigError

__all__ = ["Workdir", "config_changes", "data_splits", "dataset_identity", "variables_dir",
           "restore_variables", "load_variables", "finished_workdir_teacher",
           "check_reusable_teacher", "write_json"]

# What identifies the data a workdir was made with (dataset.json); none of it may change.
_IDENTITY = ("name", "version", "num_classes", "num_examples")


def write_json(path: pathlib.Path, obj) -> None:
  """Writes `obj` as indented JSON atomically (a temporary file renamed over `path`)."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


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


def data_splits(source) -> list[str]:
  """The evaluation splits the data has: train, val, and test unless it has no test split."""
  return [s for s in ("train", "val", "test") if s in source.splits]


def dataset_identity(source) -> dict:
  """What dataset.json records: name, version, classes, the size of every split and the class
  names (in label order)."""
  return {"name": source.name, "version": source.version, "num_classes": source.num_classes,
          "num_examples": {s: source.num_examples(s) for s in data_splits(source)},
          "class_names": [str(n) for n in source.class_names]}


def variables_dir(workdir: str | os.PathLike, role: str) -> pathlib.Path:
  """<workdir>/<role>/final_variables: the variables the `role` stage hands on."""
  return pathlib.Path(workdir) / role / "final_variables"


def _saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The workdir's config.json with every schema key (keys added since at their defaults)."""
  return schema.fill_defaults(ml_collections.ConfigDict(
      json.loads((workdir / "config.json").read_text())))


class Workdir:
  """An experiment's folder: stage markers, the config and data checks, saved variables."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.mkdir(parents=True, exist_ok=True)
    (self.path / "stages").mkdir(exist_ok=True)

  def done(self, stage: str) -> dict | None:
    """The marker of a finished stage (what it recorded), or None when it has not finished."""
    marker = self.path / "stages" / f"{stage}.json"
    return json.loads(marker.read_text()) if marker.exists() else None

  def mark(self, stage: str, info: dict) -> None:
    """Records `stage` as finished, with `info` (process 0 writes)."""
    if jax.process_index() != 0:
      return
    marker = self.path / "stages" / f"{stage}.json"
    write_json(marker, {"stage": stage, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})

  def check_config(self, config) -> list[str]:
    """Refuses a config whose results would differ from the first run's; returns the harmless
    changes ('key: old -> new'). The first run's config is written by `record`."""
    if not (self.path / "config.json").exists():
      return []
    changing, harmless = config_changes(_config_json(_saved_config(self.path)),
                                        _config_json(config))
    if changing:
      reuse = ""
      if self.done("teacher") and variables_dir(self.path, "teacher").exists():
        reuse = (f"; to reuse its finished teacher there, add --config.teacher.pretrained="
                 f"{self.path} --config.teacher.epochs=0")
      raise ConfigError(f"{self.path} holds a run whose results this config would change ("
                        + "; ".join(f"config.{c}" for c in changing)
                        + f"): use a new --workdir for a new experiment{reuse}")
    return harmless

  def check_dataset(self, source) -> None:
    """The data a workdir was made with must not change under it (a different or edited
    folder). The first run's data is written by `record`."""
    path = self.path / "dataset.json"
    if not path.exists():
      return
    current = dataset_identity(source)
    saved = json.loads(path.read_text())
    # A dataset.json written before class names were recorded is checked without them.
    keys = _IDENTITY + (("class_names",) if "class_names" in saved else ())
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    if changed:
      what = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
      raise ConfigError(f"the data differs from the data {self.path} was made with ({what}): "
                        "the folder was changed or another one given; use a new --workdir for "
                        "the new data")
    if "class_names" not in saved and jax.process_index() == 0:
      write_json(path, {**saved, "class_names": current["class_names"]})  # for predict / export

  def record(self, config, source) -> None:
    """Writes config.json and dataset.json if the workdir has none: called by the first run once
    every check has passed, so a run refused before any compute leaves nothing that would
    refuse its corrected rerun (process 0 writes)."""
    if jax.process_index() != 0:
      return
    for name, content in (("config.json", lambda: _config_json(config)),
                          ("dataset.json", lambda: dataset_identity(source))):
      if not (self.path / name).exists():
        write_json(self.path / name, content())

  def save_variables(self, role: str, variables) -> None:
    """Saves the variables the `role` stage hands on (<role>/final_variables)."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(variables_dir(self.path, role).resolve(), jax.device_get(variables), force=True)

  def load_variables(self, role: str, model, image_size: int):
    """The variables the finished `role` stage saved, restored for `model` (float32)."""
    return restore_variables(variables_dir(self.path, role), model, image_size)


def restore_variables(path: pathlib.Path, model, image_size: int):
  """Variables saved by `Workdir.save_variables`, restored (float32) with `model`'s structure."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), dict(abstract))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path.resolve(), abstract)


def finished_workdir_teacher(path: str) -> pathlib.Path | None:
  """The workdir folder when `path` is a jaxkd workdir with a finished teacher stage, else None."""
  p = pathlib.Path(os.path.expanduser(path))
  if (p.is_dir() and (p / "stages" / "teacher.json").is_file()
      and variables_dir(p, "teacher").is_dir()):
    return p
  return None


def check_reusable_teacher(old: pathlib.Path, stage_config, num_classes: int) -> None:
  """Refuses the finished teacher of workdir `old` for a teacher stage `stage_config` that asks for
  another model or options, or for data with another number of classes."""
  old_config = json.loads((old / "config.json").read_text())
  want = {"model": stage_config.model, "model_kwargs": schema.model_kwargs(stage_config)}
  have = {"model": old_config["teacher"]["model"],
          "model_kwargs": schema.model_kwargs(old_config["teacher"])}
  if want != have:
    raise ConfigError(f"config.teacher.pretrained={str(old)!r}: that workdir's teacher is {have}, "
                      f"this config asks for {want}; set --config.teacher.model (and model_kwargs) "
                      "to match")
  old_data = old / "dataset.json"
  if old_data.exists():
    classes = json.loads(old_data.read_text())["num_classes"]
    if classes != num_classes:
      raise ConfigError(f"config.teacher.pretrained={str(old)!r}: that teacher has {classes} "
                        f"classes, the data has {num_classes}; reuse a teacher trained on the "
                        "same classes")


def split_teacher_entry(entry: str) -> tuple[pathlib.Path, str]:
  """'WORKDIR' or 'WORKDIR:teacher' -> (WORKDIR, 'teacher'); 'WORKDIR:student' -> its student (an
  entry of config.student.extra_teachers)."""
  path, role = entry, "teacher"
  for r in schema.ROLES:
    if entry.endswith(f":{r}"):
      path, role = entry[:-len(r) - 1], r
  return pathlib.Path(os.path.expanduser(path)), role


def check_teacher_entry(entry: str, key: str) -> None:
  """Refuses an extra teacher that is not the finished stage of a workdir (ConfigError naming `key`
  and the entry)."""
  path, role = split_teacher_entry(entry)
  if not ((path / "stages" / f"{role}.json").is_file() and variables_dir(path, role).is_dir()):
    raise ConfigError(f"{key}: {entry!r} is not a jaxkd workdir with a finished {role} stage "
                      f"(resolved to {path.resolve()}); give the workdir of a finished run, with "
                      "':student' to use its student")


def load_variables(workdir: str | os.PathLike, role: str, *,
                   dtype: Any = None) -> tuple[Any, dict, ml_collections.ConfigDict]:
  """(model, variables, config) of the finished `role` stage ('teacher' or 'student') of a workdir.

  The model is built as the run built it (its config.json: model and model options, the
  dataset.json class count) in `dtype` (default: the config's compute dtype on this backend,
  jaxkd.config.compute_dtype); the variables are the ones the stage handed on (float32); config
  is the run's config with every schema key. Raises ConfigError when `workdir` has
  no finished `role` stage.
  """
  from jaxkd import models
  path = pathlib.Path(os.path.expanduser(os.fspath(workdir)))
  if role not in schema.ROLES:
    raise ConfigError(f"role {role!r}: use one of {', '.join(schema.ROLES)}")
  marker = path / "stages" / f"{role}.json"
  if not (marker.is_file() and variables_dir(path, role).is_dir()
          and (path / "config.json").is_file() and (path / "dataset.json").is_file()):
    raise ConfigError(f"{path} has no finished {role} stage (stages/{role}.json and "
                      f"{role}/final_variables); give the workdir of a finished run")
  config = _saved_config(path)
  stage = config[role]
  num_classes = json.loads((path / "dataset.json").read_text())["num_classes"]
  dtype = schema.compute_dtype(config) if dtype is None else dtype
  model = models.create(stage.model, num_classes=num_classes, dtype=dtype,
                        **schema.model_kwargs(stage))
  variables = restore_variables(variables_dir(path, role), model, int(config.augment.image_size))
  return model, variables, config
