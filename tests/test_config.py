"""The config schema (jaxkd/config.py) and the command line (jaxkd/cli.py, main.py).

Expected values are written out by hand from the model factories, the LossConfig /
AugmentConfig dataclasses and the config files, never taken from the schema itself.
"""
import ast
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from jaxkd import cli
from jaxkd import config as schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py")
                      if p.name != "__init__.py" and not p.name.endswith("common.py"))
MINI = str(ROOT / "configs" / "food101_mini.py")


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _main_py(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=120)


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict) and v and f"{prefix}{k}" != "report.reference":
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _literal(path: pathlib.Path, name: str):
  """A module-level tuple literal read from source (no import: the module may import TensorFlow)."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
      return ast.literal_eval(node.value)
  raise AssertionError(f"{name} not found in {path}")


def _dataclass_fields(path: pathlib.Path, cls: str) -> set:
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ClassDef) and node.name == cls:
      return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
  raise AssertionError(f"class {cls} not found in {path}")


# ----------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_key_of_every_config_is_in_the_schema(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # config files load their siblings by path, from any directory
  config = schema.load_config_file(str(path))
  schema.check_values(config)
  for key, _ in _leaves(config.to_dict()):
    entry = schema.lookup(key)
    assert entry is not None, f"{path.name}: {key} is not in jaxkd/config.py"
    assert entry.meaning.strip() and entry.type in ("int", "float", "bool", "str", "tuple", "dict")
    assert entry.unit in ("", "epochs", "steps", "px", "images", "ops")


def test_schema_lists_agree_with_the_code():
  from jaxkd import models
  from jaxkd.train.step import LossConfig
  assert set(schema.MODELS) == set(models.names())
  assert schema.DATASETS == _literal(ROOT / "jaxkd/data/sources.py", "SOURCE_NAMES")
  assert schema.ATTENTION_KINDS == _literal(ROOT / "jaxkd/models/attention.py", "ATTENTION_KINDS")
  loss_keys = {p.split(".")[-1] for p in schema.SCHEMA if p.startswith("student.loss.")}
  assert loss_keys == {f.name for f in dataclasses.fields(LossConfig)} | {"warmup_epochs"}
  augment_keys = {p.split(".")[-1] for p in schema.SCHEMA if p.startswith("augment.")}
  (augment_file,) = [p for p in (ROOT / "jaxkd/data").rglob("*.py")
                     if "class AugmentConfig" in p.read_text()]
  assert augment_keys == _dataclass_fields(augment_file, "AugmentConfig")
  # Every optimizer / stage field the training code reads with a fallback is a key.
  read = set(re.findall(r'config_get\((?:config|cfg), "(\w+)"',
                        (ROOT / "jaxkd/train/optim.py").read_text() +
                        (ROOT / "jaxkd/train/loop.py").read_text()))
  keys = {p.split(".")[-1] for p in schema.SCHEMA if p.startswith("student.")}
  assert read and read <= keys, read - keys


def test_every_default_passes_its_own_checks():
  config = schema.base_config()
  schema.check_values(config)
  for role, model, epochs in (("teacher", "resnet50", 3), ("student", "mobilenet_v3_large", 20)):
    assert config[role].model == model and config[role].epochs == epochs
  assert config.data.skip_bad_images is False and config.teacher_logits.store_dir is None
  assert config.student.teacher == "stored" and "teacher" not in config.teacher


def test_new_keys_and_model_options_are_present_as_none():
  config = schema.base_config()
  for role in ("teacher", "student"):
    kwargs = config[role].model_kwargs.to_dict()
    assert {"width_mult", "dropout", "attention", "stage_attention", "bn_momentum", "groups",
            "out_planes", "out_channels", "num_blocks"} <= set(kwargs)
    assert all(v is None for v in kwargs.values())
    assert schema.model_kwargs(config[role]) == {}


def test_model_options_are_asked_of_the_factories():
  # From the factory signatures in jaxkd/models: mobilenet_v3_large_eca fixes stage_attention,
  # mdistiller's mobilenetv2 fixes width_mult, the ImageNet ResNets take no options.
  mbv3 = {"width_mult", "dropout", "attention", "stage_attention", "bn_momentum"}
  assert set(schema.model_options("mobilenet_v3_large")) == mbv3
  assert set(schema.model_options("mobilenet_v3_small")) == mbv3
  assert set(schema.model_options("mobilenet_v3_large_eca")) == mbv3 - {"stage_attention"}
  assert set(schema.model_options("shufflenetv1")) == {"groups", "out_planes", "num_blocks"}
  assert set(schema.model_options("shufflenetv2")) == {"out_channels", "num_blocks"}
  for name in ("resnet50", "resnet8", "mobilenetv2", "vgg8", "wrn_16_2"):
    assert schema.model_options(name) == (), name


@pytest.mark.parametrize("path,expected", [
    ("student.epochz", "unknown key student.epochz (did you mean student.epochs?)"),
    ("config.techer.epochs", "unknown key techer.epochs (did you mean teacher.epochs?)"),
    ("student.optimizer.lr", "unknown key student.optimizer.lr "
                             "(did you mean student.optimizer.learning_rate?)"),
    ("student.model_kwargs.widthmult", "unknown key student.model_kwargs.widthmult "
                                       "(did you mean student.model_kwargs.width_mult?)"),
])
def test_did_you_mean(path, expected):
  assert schema.unknown_key_message(path) == expected


def test_a_typo_inside_a_config_file_is_refused_with_a_suggestion(tmp_path):
  (tmp_path / "typo.py").write_text(
      "from jaxkd import config as schema\n\n\ndef get_config():\n"
      "  c = schema.base_config()\n  c.student.loss.temprature = 2.0\n  return c\n")
  with pytest.raises(schema.ConfigError, match=re.escape(
      "unknown key student.loss.temprature (did you mean student.loss.temperature?)")):
    schema.check_values(schema.load_config_file(str(tmp_path / "typo.py")))


@pytest.mark.parametrize("path,value,match", [
    ("student.epochs", "20", r"config\.student\.epochs='20' must be an int \[epochs\]"),
    ("student.epochs", -1, r"config\.student\.epochs=-1 must be >= 0"),
    ("student.optimizer.optimizer", "rmsprop", r"use one of 'sgd', 'adam', 'adamw'"),
    ("data.val_fraction", 1.0, r"config\.data\.val_fraction=1\.0 must be in \(0, 1\)"),
    ("augment.color_jitter", (0.2, 0.2), r"must have 4 items"),
    ("student.model_kwargs.attention", "ECA", r"use one of 'se', 'eca'"),
    ("augment.flip", 1, r"must be a bool"),
])
def test_type_choice_and_range_checks_name_the_key(path, value, match):
  config = schema.base_config()
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(schema.ConfigError, match=match):
    schema.check_values(config)


def test_validate_refuses_an_option_the_model_does_not_take():
  config = schema.base_config()
  config.teacher.model_kwargs.width_mult = 0.5  # the teacher is resnet50
  with pytest.raises(schema.ConfigError) as e:
    schema.validate(config, num_devices=8)
  assert "config.teacher.model_kwargs.width_mult=0.5" in str(e.value)
  assert "'resnet50'" in str(e.value)
  config = schema.base_config()
  config.student.model = "mobilenet_v3_large_eca"
  config.student.model_kwargs.stage_attention = "cbam"
  with pytest.raises(schema.ConfigError, match=r"student\.model_kwargs\.stage_attention.*"
                                               r"'mobilenet_v3_large_eca' does not take"):
    schema.validate(config, num_devices=8)
  config.student.model_kwargs.stage_attention = None
  config.student.model_kwargs.width_mult = 0.75
  schema.validate(config, num_devices=8)


def test_region_mode_needs_stored_logits_and_random_resized_crops():
  config = schema.base_config()
  config.teacher_logits.mode = "regions"
  schema.validate(config, num_devices=8)
  config.student.teacher = "online"
  with pytest.raises(schema.ConfigError, match=r"mode='regions'.*student\.teacher='online'"):
    schema.validate(config, num_devices=8)
  config.student.teacher = "stored"
  config.augment.train_crop = "pad_random_crop"
  with pytest.raises(schema.ConfigError, match=r"train_crop='pad_random_crop'"):
    schema.validate(config, num_devices=8)


def test_handoff_is_last_by_default_and_only_last_or_best():
  config = schema.base_config()
  assert config.teacher.handoff == "last" and config.student.handoff == "last"
  assert schema.changes_result("student.handoff") and schema.changes_result("teacher.handoff")
  config.student.handoff = "first"
  with pytest.raises(schema.ConfigError, match=r"config\.student\.handoff='first': use one of "
                                               r"'last', 'best'"):
    schema.validate(config, num_devices=8)
  config.student.handoff = "best"
  config.teacher.handoff = "best"
  schema.validate(config, num_devices=8)
  # Imported weights taken as they are (epochs=0) have no checkpoint to choose from.
  config.teacher.epochs = 0
  config.teacher.pretrained = "torchvision"
  with pytest.raises(schema.ConfigError, match=r"config\.teacher\.handoff='best' with "
                                               r"config\.teacher\.epochs=0"):
    schema.validate(config, num_devices=8)


def test_a_finished_workdir_is_a_teacher_and_any_other_folder_is_refused(tmp_path):
  # The layout of a finished teacher stage: its marker and the variables it handed on.
  workdir = tmp_path / "run"
  (workdir / "stages").mkdir(parents=True)
  (workdir / "teacher" / "final_variables").mkdir(parents=True)
  (workdir / "stages" / "teacher.json").write_text("{}")
  config = schema.base_config()
  config.teacher.pretrained = str(workdir)
  schema.validate(config, num_devices=8)
  (workdir / "stages" / "teacher.json").unlink()  # the teacher stage did not finish
  with pytest.raises(schema.ConfigError, match=r"is a folder but not a jaxkd workdir with a "
                                               r"finished teacher"):
    schema.validate(config, num_devices=8)


def test_changes_result():
  for path in ("data.num_parallel_calls", "data.data_dir", "teacher_logits.store_dir",
               "teacher_logits.batch_size", "evaluate.batch_size", "student.log_every_steps",
               "teacher.checkpoint_every_steps", "student.keep_checkpoints", "name",
               "report.reference", "report.reference.source", "config.student.log_every_steps"):
    assert not schema.changes_result(path), path
  for path in ("student.epochs", "seed", "student.model_kwargs.width_mult", "augment.image_size",
               "student.loss.temperature", "teacher_logits.dtype", "student", "no.such.key"):
    assert schema.changes_result(path), path


def test_describe_lists_values_units_meanings_and_changes():
  config = schema.load_config_file(MINI)
  text = schema.describe(config)
  lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line}
  # food101_mini.py sets 10 student epochs (default 20) and keeps the default seed.
  assert re.match(r"student\.epochs = 10 +# \(default: 20\) \[epochs\] passes over the train split",
                  lines["student.epochs"])
  assert "(default" not in lines["seed"]
  assert lines["student.model_kwargs.stage_attention"].startswith(
      "student.model_kwargs.stage_attention = 'eca'")
  assert lines["student.model_kwargs.width_mult"].startswith(
      "student.model_kwargs.width_mult = None")
  assert set(lines) >= set(schema.SCHEMA)


def test_helpers_of_configs_common_build_the_same_groups():
  sys.path.insert(0, str(ROOT))
  try:
    from configs import common
  finally:
    sys.path.remove(str(ROOT))
  assert common.optimizer("sgd", learning_rate=0.05).to_dict() == {
      **schema.base_config().student.optimizer.to_dict(), "optimizer": "sgd", "learning_rate": 0.05}
  with pytest.raises(schema.ConfigError, match="did you mean loss.temperature"):
    common.loss("kd", temprature=2.0)


# ----------------------------------------------------------------------------- the command line


def test_model_kwargs_override_reaches_models_create():
  from jaxkd import models
  config, options = cli.parse_args([f"--config={MINI}", "--config.teacher.pretrained=None",
                                    "--config.student.model_kwargs.width_mult=0.75",
                                    "--print_config"])
  assert options["print_config"] and options["workdir"] is None
  kwargs = schema.model_kwargs(config.student)
  assert kwargs == {"width_mult": 0.75, "stage_attention": "eca", "bn_momentum": 0.9}
  model = models.create(config.student.model, num_classes=10, **kwargs)
  assert (model.width_mult, model.stage_attention, model.bn_momentum) == (0.75, "eca", 0.9)


def test_group_reset_none_and_free_form_overrides():
  # A whole group given as a dict resets it first; key overrides apply after it, in any order.
  config, _ = cli.parse_args([f"--config={MINI}", "--config.student.model_kwargs.width_mult=0.5",
                              "--config.student.model_kwargs={}", "--config.student.max_steps=7",
                              "--config.student.max_steps=None", "--config.data.manual_dir=None",
                              "--config.report.reference.paper=76.1", "--noconfig.augment.flip"])
  assert schema.model_kwargs(config.student) == {"width_mult": 0.5}  # the file's eca/0.9 reset
  assert config.student.max_steps is None and config.data.manual_dir is None
  assert config.report.reference.to_dict() == {"paper": "76.1"}
  assert config.augment.flip is False
  with pytest.raises(schema.ConfigError, match=r"student\.model_kwargs is a group of keys"):
    cli.parse_args([f"--config={MINI}", "--config.student.model_kwargs=3"])


def test_in_process_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "broken.py").write_text("def get_config(:\n  pass\n")
  cases = [
      ([f"--config={tmp_path / 'missing.py'}", "--workdir=w"], "config error: config file ",
       "not found"),
      ([f"--config={tmp_path / 'broken.py'}", "--workdir=w"], "config error: config file ",
       "line 1: syntax error"),
      ([f"--config={MINI}"], "usage error: --workdir is required", ""),
      ([f"--config={MINI}", "--config.student.model_kwargs.attention=foo", "--workdir=w"],
       "config error: config.student.model_kwargs.attention='foo': use one of", ""),
      (["--workdir=w", "--config.student.epochs=2"], "usage error: --config.KEY overrides need",
       ""),
      # Multi-process flags, refused before JAX starts.
      ([f"--config={MINI}", "--workdir=w", "--coordinator_address=node0:1234",
        "--num_processes=2", "--process_id=2"], "usage error: --process_id=2 must be in 0 .. 1",
       ""),
      ([f"--config={MINI}", "--workdir=w", "--coordinator_address=node0", "--num_processes=2",
        "--process_id=0"], "usage error: --coordinator_address='node0' is not HOST:PORT", ""),
      ([f"--config={MINI}", "--workdir=w", "--distributed=no", "--coordinator_address=node0:1"],
       "usage error: --distributed=no contradicts --coordinator_address", ""),
      ([f"--config={MINI}", "--workdir=w", "--num_processes=0"],
       "usage error: --num_processes=0 must be at least 1", ""),
  ]
  for args, start, contains in cases:
    with pytest.raises(SystemExit) as e:
      cli.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, (args, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith(start) and contains in err, err


def test_pipeline_errors_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
  import signal

  from jaxkd.data import DataError
  from jaxkd.teacher_store import TeacherStoreError
  from jaxkd.train.checkpoint import StopRequested
  from jaxkd.train.loop import NonFiniteLossError
  seen = {}
  for raised, code, start in ((schema.ConfigError("config.x: bad"), 2,
                               "config error: config.x: bad"),
                              (DataError("3 files do not decode:\n  a.jpg\n  b.jpg"), 2,
                               "data error: 3 files do not decode:"),
                              (TeacherStoreError("teacher store s: bad. To fix: delete s"), 2,
                               "store error: teacher store s: bad."),
                              (StopRequested(signal.SIGINT, "during teacher training at step 3"),
                               130, "stopped: SIGINT during teacher training at step 3"),
                              (StopRequested(signal.SIGTERM, "during teacher training at step 3"),
                               0, "stopped: SIGTERM during teacher training at step 3"),
                              (NonFiniteLossError("student", 7, float("nan")), 1,
                               "training error: student training: the loss is nan at step 7"),
                              (KeyboardInterrupt(), 130, "interrupted: ")):
    def run(config, options, raised=raised):  # in place of jax setup + jaxkd.experiment.run
      seen["epochs"], seen["workdir"] = config.student.epochs, options["workdir"]
      raise raised
    monkeypatch.setattr(cli, "_run", run)
    with pytest.raises(SystemExit) as e:
      cli.main([f"--config={MINI}", f"--workdir={tmp_path}", "--config.student.epochs=3",
                "--noprogress"])
    err = capsys.readouterr().err
    assert e.value.code == code and err.startswith(start) and "Traceback" not in err, err
    assert seen == {"epochs": 3, "workdir": str(tmp_path)}


@pytest.mark.parametrize("override,expected", [
    ("--config.student.epochz=5", "config error: unknown key student.epochz "
                                  "(did you mean student.epochs?)"),
    ("--config.student.epochs=abc", "config error: --config.student.epochs=abc: student.epochs "
                                    "must be an int [epochs] (passes over the train split)"),
])
def test_main_py_prints_one_line_and_exits_2(override, expected, tmp_path):
  res = _main_py("--config=configs/food101_mini.py", f"--workdir={tmp_path}", override)
  assert res.returncode == 2, res.stderr
  assert res.stderr.splitlines() == [expected]
  assert res.stdout == ""


def test_print_config_from_another_directory_without_jax(tmp_path):
  # As the console script does: any directory, the config path relative to it. Printing the config
  # imports neither JAX nor TensorFlow.
  code = ("import sys; from jaxkd.cli import main; main(sys.argv[1:]); "
          "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, 'heavy import'")
  config = os.path.relpath(MINI, tmp_path)
  res = subprocess.run([sys.executable, "-c", code, f"--config={config}", "--print_config",
                        "--config.student.epochs=7"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**_env(), "PYTHONPATH": str(ROOT)})
  assert res.returncode == 0, res.stderr
  line = next(x for x in res.stdout.splitlines() if x.startswith("student.epochs = "))
  assert line.startswith("student.epochs = 7 ") and "[epochs] passes over the train split" in line
  help_text = _main_py("--help").stdout
  assert "--print_config" in help_text and "--config.student.model_kwargs.width_mult" in help_text


def test_export_keys_entries_and_the_missing_extra(monkeypatch):
  config = schema.base_config()
  assert tuple(config.export.formats) == () and config.export.role == "student"
  assert schema.export_entries(config) == []
  for path in ("export.formats", "export.role", "export.latency_runs",
               "export.num_representative", "export.max_verify_images", "export"):
    assert not schema.changes_result(path), path  # adding an export to a finished run is harmless
  config.export.formats = ("tflite", "onnx:int8", "tflite:float16")
  assert schema.export_entries(config) == [("tflite", "none"), ("onnx", "int8"),
                                           ("tflite", "float16")]
  schema.validate(config, num_devices=8)
  config.export.formats = ("tflite:int4",)
  with pytest.raises(schema.ConfigError, match=r"config\.export\.formats=\('tflite:int4',\): "
                                               r"'tflite:int4': use one of 'tflite', 'onnx', "
                                               r"'tflite:none'.*'onnx:int8'"):
    schema.check_values(config)
  config.export.formats = ("tflite", "tflite:none")
  with pytest.raises(schema.ConfigError, match=r"'tflite:none' names the same file"):
    schema.validate(config, num_devices=8)
  # Without the export packages: refused before any compute, in one line naming the extra and
  # how to turn the stage off; not when the exported role does not run.
  from jaxkd.export import extra
  monkeypatch.setattr(extra, "available", lambda module: module != "ai_edge_litert")
  config.export.formats = ("tflite", "tflite:int8")
  with pytest.raises(schema.ConfigError) as e:
    schema.validate(config, num_devices=8)
  message = str(e.value)
  assert "\n" not in message and "ai-edge-litert" in message
  assert 'pip install -e ".[export]"' in message and '--config.export.formats="()"' in message
  config.export.formats = ("onnx",)
  schema.validate(config, num_devices=8)
  config.export.formats = ("tflite",)
  config.student.enabled = False
  config.student.loss.kind = "ce"
  schema.validate(config, num_devices=8)  # the export stage is skipped, saying why
