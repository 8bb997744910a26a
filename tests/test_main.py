"""End-to-end: `python main.py --config=configs/food101_mini.py`, as a user runs it, in
subprocesses.

Every test runs on generated image folders (tests/imagegen.py), so a fresh clone without
../shared runs them all; the full pipeline also runs on the real food-101-mini photographs when
they are present. The runs are shrunk to a few steps (32 px, CIFAR-size models).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

ONLY_TEACHER = ["--config.student.enabled=false"]
# The teacher alone (2 epochs of 5 steps, a val evaluation after each), handing on the best; the
# learning rate is multiplied by 1000 after the first epoch, so that the last step is worse.
BEST_HANDOFF = ["--config.teacher.handoff=best", "--config.teacher.optimizer.schedule=multistep",
                "--config.teacher.optimizer.milestone_steps=(5,)",
                "--config.teacher.optimizer.lr_decay=1000.0"]

# A tiny but complete experiment: teacher a few steps, logits, KD student, evaluate, report.
TINY = [
    "--config.augment.image_size=32",
    "--config.teacher.model=resnet8", "--config.student.model=resnet8",
    "--config.student.model_kwargs={}",
    "--config.teacher.batch_size=64", "--config.student.batch_size=64",
    # The teacher: long enough to interrupt.
    "--config.teacher.max_steps=10", "--config.student.max_steps=6",
    "--config.teacher.checkpoint_every_steps=2", "--config.student.checkpoint_every_steps=2",
    "--config.teacher.log_every_steps=2", "--config.student.log_every_steps=2",
    "--config.evaluate.splits=('val',)", "--config.evaluate.batch_size=200",
    "--config.teacher_logits.batch_size=200",
    "--config.data.num_parallel_calls=2",
    # SGD: its few steps magnify the last-bit differences of a changed summation order (another
    # device or process count) ten times less than Adam's, so runs on other layouts compare closely.
    "--config.teacher.optimizer.optimizer=sgd", "--config.student.optimizer.optimizer=sgd",
    "--config.teacher.optimizer.learning_rate=0.05",
    "--config.student.optimizer.learning_rate=0.05",
    # No export (the mini config exports float32 + int8 TFLite): one test adds it to a finished run.
    "--config.export.formats=()",
    "--progress=false",
    # The teacher hands on its best checkpoint, which is not its last (BEST_HANDOFF): every run
    # exercises the hand-off, and the finished run's teacher is the one the hand-off test checks.
    *BEST_HANDOFF,
]


def _env(devices=8):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if os.environ.get("JAXKD_TEST_JAX_CACHE"):  # the session's compilation cache (tests/conftest.py)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXKD_TEST_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _cmd(workdir, data, *extra):
  folder, data_dir = data
  return [sys.executable, str(ROOT / "main.py"), "--config=configs/food101_mini.py",
          f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={folder}", *TINY, *extra]


def _run(workdir, data, *extra, timeout=600, devices=8):
  return subprocess.run(_cmd(workdir, data, *extra), cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def _in_process(capsys, workdir, data, *extra):
  """The same command line run by jaxkd.cli.main inside the test process (its 8 CPU devices are
  up already), for runs that stop before any training or only print: saves a process start.
  Returns (exit code, stdout, stderr)."""
  from jaxkd import cli
  args = [a.replace("=configs/", f"={ROOT}/configs/", 1) for a in _cmd(workdir, data, *extra)[2:]]
  capsys.readouterr()
  try:
    cli.main(args)
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _error_lines(stderr: str) -> list[str]:
  """The lines of `stderr` that are jaxkd's own (TensorFlow / absl print start-up chatter there)."""
  return [x for x in stderr.splitlines()
          if x.startswith(("config error", "data error", "store error", "training error", "stopped",
                           "interrupted", "Traceback"))]


def _errors(proc) -> list[str]:
  """stderr lines that are jaxkd's own (TensorFlow / absl print start-up chatter there)."""
  return _error_lines(proc.stderr)


@pytest.fixture(scope="module")
def food_data(generated_food101, tfds_data_dir):
  """(generated Food-101-layout folder, the session's TFDS data_dir)."""
  return generated_food101, tfds_data_dir


def _load_final(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path).resolve())


def _assert_same_variables(a_dir, b_dir):
  import jax
  la, lb = jax.tree.leaves(_load_final(a_dir)), jax.tree.leaves(_load_final(b_dir))
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _check_finished_run(wd, proc, num_val):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for stage in ("teacher", "teacher_logits", "student", "evaluate", "export", "report"):
    assert (wd / "stages" / f"{stage}.json").exists(), stage
  export = json.loads((wd / "stages" / "export.json").read_text())
  assert export["skipped"] == "config.export.formats is ()"
  report = json.loads((wd / "report.json").read_text())
  roles = {m["role"]: m for m in report["models"]}
  assert set(roles) == {"teacher", "student"}
  assert roles["teacher"]["params"] == roles["student"]["params"] > 0
  assert roles["student"]["val"]["num_examples"] == num_val  # every example once
  assert 0.0 <= roles["student"]["val"]["top1"] <= 1.0
  # The title describes what ran (not the config file's name), and the config's published reference
  # (MobileNetV3-Small + ECA from ResNet-18) is not shown for resnet8 -> resnet8.
  assert report["title"].startswith("food101_local") and "resnet8 -> resnet8, KD" in report["title"]
  assert report["reference"] == {}
  assert (wd / "report.md").read_text().startswith(f"# {report['title']}")
  assert (wd / "plots" / "training_curves.png").stat().st_size > 1000
  store = pathlib.Path(json.loads((wd / "stages" / "teacher_logits.json").read_text())["store"])
  assert (store / "manifest.json").exists()
  lines = (wd / "student" / "metrics.jsonl").read_text().splitlines()
  assert any(json.loads(x)["kind"] == "train" and "kd" in json.loads(x) for x in lines)
  assert list((wd / "student" / "tensorboard").glob("events.out.tfevents.*"))
  assert "6 steps (max_steps" in proc.stdout  # not "10 epochs"
  assert "[student] step 6/6" in proc.stdout  # --progress=false still reports progress
  return store


@pytest.fixture(scope="module")
def finished(food_data, generated_food101_tree, tmp_path_factory):
  """A finished tiny run on the generated folder, checked: (workdir, its teacher-logit store)."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  num_val = sum(int(0.2 * len(keys) + 0.5) for keys in generated_food101_tree.train.values())
  return wd, _check_finished_run(wd, _run(wd, food_data), num_val)


def test_full_pipeline(finished):
  wd, store = finished  # the fixture ran and checked it
  assert (wd / "report.md").exists() and store.is_dir()


def test_full_pipeline_on_real_photos(shared_data, tfds_data_dir, tmp_path):
  # Not parametrized by data_variant: `finished` requested inside a test of a session-scoped
  # parameter would be set up again after it (pytest ties it to the parameter's teardown).
  photos = shared_data / "food-101-mini"
  wd = tmp_path / "run"
  # Its 25 steps per epoch put no evaluation between the learning-rate jump of BEST_HANDOFF and
  # the last step: the food101_mini teacher's own schedule and hand-off instead.
  mini = ["--config.teacher.handoff=last", "--config.teacher.optimizer.schedule=one_cycle"]
  proc = _run(wd, (photos, tfds_data_dir), *mini)
  _check_finished_run(wd, proc, 400)  # 20% of each class's 200 images


def test_rerun_accepts_harmless_changes_and_refuses_others(food_data, finished, tmp_path, capsys):
  folder, data_dir = food_data
  wd, _ = finished
  # A rerun prints the report; settings that change no result (eval batch size, logging, the same
  # folder by another path) are accepted.
  alias = tmp_path / "alias"
  alias.symlink_to(folder, target_is_directory=True)
  code, out, err = _in_process(capsys, wd, (alias, data_dir), "--config.evaluate.batch_size=80",
                               "--config.student.log_every_steps=3")
  assert code == 0, err[-3000:]
  assert "| resnet8 | student |" in out
  # No stage ran again.
  assert ": training" not in out and "evaluate:" not in out
  assert "settings that change no result:" in out
  assert "evaluate.batch_size: 200 -> 80" in out
  # A result-changing key is refused in one line naming it, saying how to reuse the teacher.
  code, _, err = _in_process(capsys, wd, food_data, "--config.student.loss.temperature=2.0")
  assert code == 2
  (err,) = _error_lines(err)
  assert err.startswith("config error") and "config.student.loss.temperature" in err
  assert f"--config.teacher.pretrained={wd}" in err


def test_export_added_to_a_finished_run_runs_only_the_export_stage(food_data, finished, tmp_path):
  pytest.importorskip("ai_edge_litert", reason="the export extra is not installed")
  wd = tmp_path / "exported"
  shutil.copytree(finished[0], wd)
  proc = _run(wd, food_data, "--config.export.formats=('tflite', 'tflite:int8')",
              "--config.export.latency_runs=2", "--config.export.max_verify_images=16",
              "--config.export.num_representative=16")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "settings that change no result:" in proc.stdout and "export.formats" in proc.stdout
  assert ": training" not in proc.stdout and "evaluate:" not in proc.stdout  # nothing else ran
  files = {"tflite:none": "export/student_float32.tflite",
           "tflite:int8": "export/student_int8.tflite"}
  marker = json.loads((wd / "stages" / "export.json").read_text())
  assert marker["role"] == "student"
  assert {k: v["file"] for k, v in marker["files"].items()} == files
  report = json.loads((wd / "report.json").read_text())
  rows = {r["quantize"]: r for r in report["deployment"]}
  assert set(rows) == {"none", "int8"}
  for quantize, row in rows.items():
    path = wd / row["file"]
    assert row["file"] == files[f"tflite:{quantize}"] and row["format"] == "tflite"
    assert row["size_bytes"] == path.stat().st_size > 0
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["class_names"] == json.loads((wd / "dataset.json").read_text())["class_names"]
    assert row["images"] == meta["parity"]["images"] == 16 and row["latency_runs"] == 2
    assert row["latency_ms"] > 0 and row["jaxkd_latency_ms"] > 0
    assert 0.0 <= row["val_top1"] <= 1.0 and 0.0 <= row["top1_agreement"] <= 1.0
  assert rows["none"]["max_abs_prob_diff"] <= 1e-4 and rows["none"]["top1_agreement"] == 1.0
  assert rows["none"]["val_top1"] == rows["none"]["jaxkd_val_top1"]
  assert rows["int8"]["size_bytes"] < rows["none"]["size_bytes"]
  md = (wd / "report.md").read_text()
  assert "## Deployment (student; verified on 16 val images)" in md
  assert "| tflite | int8 | export/student_int8.tflite |" in md
  assert "| tflite | float32 | export/student_float32.tflite |" in md


def _assert_close_variables(a_dir, b_dir, atol):
  import jax
  la, lb = jax.tree.leaves(_load_final(a_dir)), jax.tree.leaves(_load_final(b_dir))
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# Two runs of the same steps on other device or process counts sum in another order; after a few
# SGD steps their parameters differ in the last bits, magnified (measured: ~3e-4 after the
# teacher's 5 steps of 2 processes x 4 devices against 1 x 8). A wrong batch would differ by ~0.1.
LAYOUT_ATOL = 3e-3


def test_rerun_reuses_the_store_and_resumes_on_another_device_count(food_data, finished,
                                                                    tmp_path):
  first, store = finished
  marker = json.loads((first / "stages" / "teacher_logits.json").read_text())
  manifest = json.loads((store / "manifest.json").read_text())
  assert marker["stage"] == "teacher_logits" and marker["teacher_id"] == manifest["teacher_id"]
  # A copy of the finished 8-device run as if it had stopped after the student's step-5 checkpoint
  # (what came later removed), resumed on 4 devices: it opens the stored logits, not recomputes
  # them, continues from step 5 with the same global batches and ends where the 8-device run did.
  wd = tmp_path / "copy"
  shutil.copytree(first, wd)
  for stage in ("student", "evaluate", "export", "report"):
    (wd / "stages" / f"{stage}.json").unlink()
  for later in ("student/checkpoints/6", "student/final_variables"):
    shutil.rmtree(wd / later)
  for result in (wd / "eval").glob("student_*.json"):
    result.unlink()
  written = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
  rerun = _run(wd, food_data, devices=4)
  assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
  assert "4 cpu device(s)" in rerun.stdout
  assert "[student] resuming from the checkpoint at step 5 of 6" in rerun.stdout
  assert "teacher_logits: precomputing" not in rerun.stdout
  assert "teacher: training" not in rerun.stdout
  assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == written
  assert json.loads((wd / "stages" / "teacher_logits.json").read_text()) == marker
  _assert_close_variables(first / "student" / "final_variables",
                          wd / "student" / "final_variables", LAYOUT_ATOL)
  ours, theirs = (json.loads((w / "eval" / "student_val.json").read_text()) for w in (wd, first))
  assert ours["num_examples"] == theirs["num_examples"] and ours["top1"] == theirs["top1"]


def test_load_variables_gives_a_finished_runs_model_and_variables(finished, tmp_path):
  import jax
  import jax.numpy as jnp

  from jaxkd.config import ConfigError
  from jaxkd.workdir import load_variables
  wd, _ = finished
  model, variables, config = load_variables(wd, "student", dtype=jnp.float32)
  assert config.student.model == "resnet8" and config.augment.image_size == 32
  saved = _load_final(wd / "student" / "final_variables")
  assert jax.tree.structure(variables) == jax.tree.structure(saved)
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  logits = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 4)  # the generated data's 4 classes
  with pytest.raises(ConfigError, match="has no finished teacher stage"):
    load_variables(tmp_path, "teacher")


def test_handoff_best_hands_on_the_best_checkpoint(finished):
  wd, _ = finished  # its teacher: BEST_HANDOFF (in TINY)
  # The evaluations during training, as the loop logged them: the best is before the last.
  evals = [json.loads(x) for x in (wd / "teacher" / "metrics.jsonl").read_text().splitlines()]
  evals = [(r["step"], r["top1"]) for r in evals if r["kind"] == "eval_val"]
  (best_step, best), (last_step, last) = max(evals, key=lambda e: e[1]), evals[-1]
  assert [t for _, t in evals].count(best) == 1 and best > last, evals  # tells them apart
  # The evaluation stage, run on the variables the teacher stage handed on, gets the best top-1.
  assert json.loads((wd / "eval" / "teacher_val.json").read_text())["top1"] == best
  marker = json.loads((wd / "stages" / "teacher.json").read_text())
  assert marker["handoff"] == "best" and marker["best_step"] == best_step
  assert marker["best_val"]["top1"] == best and marker["val"]["top1"] == last
  row = {m["role"]: m for m in json.loads((wd / "report.json").read_text())["models"]}["teacher"]
  assert row["val"]["top1"] == best
  assert row["training"] == {
      "steps": last_step, "handoff": "best",
      "last_val": {"step": last_step, "top1": last, "top5": marker["val"]["top5"]},
      "best_val": {"step": best_step, "top1": best, "top5": marker["best_val"]["top5"]}}
  assert "handed on: the best checkpoint" in (wd / "report.md").read_text()


def test_config_errors_before_compute(food_data, tmp_path, capsys):
  code, _, err = _in_process(capsys, tmp_path / "a", food_data, "--config.student.batch_size=60")
  assert code == 2 and "config.student.batch_size=60" in err
  assert not (tmp_path / "a" / "teacher").exists()
  # A run refused by a check of the data records nothing: its corrected rerun there meets the
  # checks afresh, not "holds a run whose results this config would change".
  code, _, err = _in_process(capsys, tmp_path / "a", food_data, "--config.student.batch_size=4096")
  assert code == 2 and "is larger than the training split" in err
  assert not (tmp_path / "a" / "config.json").exists()
  assert not (tmp_path / "a" / "dataset.json").exists()
  code, _, err = _in_process(capsys, tmp_path / "a", food_data, "--config.student.batch_size=8192")
  assert code == 2 and "config.student.batch_size=8192 is larger" in err
  assert "holds a run" not in err
  code, _, err = _in_process(capsys, tmp_path / "b", (tmp_path / "nonexistent" / "food",
                                                      food_data[1]))
  assert code == 2 and "config.data.manual_dir" in err
  # A typo of a key: tests/test_config.py::test_main_py_prints_one_line_and_exits_2.


def test_unwritable_store_is_refused_before_the_teacher_trains(food_data, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  code, _, err = _in_process(capsys, tmp_path / "wd", food_data,
                             f"--config.teacher_logits.store_dir={blocker / 'stores'}")
  assert code == 2, err[-3000:]
  (err,) = _error_lines(err)
  assert "config.teacher_logits.store_dir" in err and str(blocker) in err
  assert not (tmp_path / "wd" / "teacher" / "checkpoints").exists()




def _interrupt(food_data, wd, signum, after_step):
  """Starts main.py (teacher only), sends `signum` once a checkpoint at `after_step` or later
  exists."""
  proc = subprocess.Popen(_cmd(wd, food_data, *ONLY_TEACHER), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dir = wd / "teacher" / "checkpoints"
  deadline = time.time() + 400
  try:
    while time.time() < deadline:
      steps = ([int(p.name) for p in ckpt_dir.glob("[0-9]*") if p.name.isdigit()]
               if ckpt_dir.exists() else [])
      if steps and max(steps) >= after_step:
        break
      if proc.poll() is not None:
        pytest.fail("training finished before it could be interrupted: "
                    f"{proc.stderr.read()[-2000:]}")
      time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out, err


def test_ctrl_c_then_resume_gives_the_uninterrupted_parameters(food_data, finished, tmp_path):
  wd = tmp_path / "interrupted"
  # Ctrl-C mid-training: a checkpoint, one line, exit code 130.
  rc, out, err = _interrupt(food_data, wd, signal.SIGINT, after_step=2)
  assert rc == 130, err[-3000:]
  assert "Traceback" not in err
  lines = [x for x in err.splitlines() if x.startswith("stopped")]
  assert len(lines) == 1 and "SIGINT" in lines[0], err[-2000:]
  assert "during teacher training" in lines[0], err[-2000:]
  assert "rerun the same command" in lines[0].lower()
  assert not (wd / "stages" / "teacher.json").exists()
  # (kill -9 mid-training: tests/test_checkpoint_resume.py, and the multi-process test below.)
  resumed = _run(wd, food_data, *ONLY_TEACHER)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[teacher] resuming from the checkpoint at step" in resumed.stdout
  # Bit for bit the teacher of the uninterrupted run (same config but the student stage).
  _assert_same_variables(finished[0] / "teacher" / "final_variables",
                         wd / "teacher" / "final_variables")


def test_image_folder_without_test_split_and_a_bad_image(generated_image_folder_flat, tfds_data_dir,
                                                         tmp_path):
  folder = tmp_path / "photos"
  shutil.copytree(generated_image_folder_flat, folder)
  first_class = sorted(p for p in folder.iterdir() if p.is_dir())[0]
  bad = first_class / "truncated.jpg"
  good = next(first_class.glob("*.jpg")).read_bytes()
  bad.write_bytes(good[: len(good) // 3])
  args = ["--config.data.name=image_folder", "--config.evaluate.splits=('val', 'test')",
          "--config.teacher.batch_size=16", "--config.student.batch_size=16",
          "--config.teacher.max_steps=4", "--config.student.max_steps=4"]
  refused = _run(tmp_path / "refused", (folder, tfds_data_dir), *args)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "Traceback" not in refused.stderr and str(bad) in refused.stderr
  assert not (tmp_path / "refused" / "teacher").exists()

  ok = _run(tmp_path / "skipped", (folder, tfds_data_dir), *args,
            "--config.data.skip_bad_images=true")
  assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
  report = json.loads((tmp_path / "skipped" / "report.json").read_text())
  assert report["dataset"]["absent_splits"] == ["test"]
  assert [p for p, _ in report["dataset"]["skipped_images"]] == [str(bad)]
  student = {m["role"]: m for m in report["models"]}["student"]
  assert "val" in student and "test" not in student
  md = (tmp_path / "skipped" / "report.md").read_text()
  assert "no test split" in md.lower() and "truncated.jpg" in md


# ----------------------------------------------------------------------------- several processes

HEARTBEAT_S = 10  # --heartbeat_timeout_seconds of the multi-process runs


def _start_processes(workdir, data, *extra, num_processes=2, tag="run"):
  """Starts the job as `num_processes` main.py processes of 8 / num_processes CPU devices each,
  meeting on a free local port; returns (processes, their output files)."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs, logs = [], []
  for i in range(num_processes):
    log = workdir.parent / f"{workdir.name}.{tag}.process{i}.log"
    with open(log, "w") as out:  # files, not pipes: one process must not block on a full pipe
      procs.append(subprocess.Popen(
          _cmd(workdir, data, f"--coordinator_address=localhost:{port}",
               f"--num_processes={num_processes}", f"--process_id={i}",
               f"--heartbeat_timeout_seconds={HEARTBEAT_S}", *extra),
          cwd=ROOT, env=_env(8 // num_processes), stdout=out, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _kill_all(procs):
  for p in procs:  # SIGKILL: JAX's preemption notifier takes SIGTERM in a distributed process
    if p.poll() is None:
      p.kill()
      p.wait()


def _first_train_loss(path):
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if record["kind"] == "train":
      return record["loss"]
  raise AssertionError(f"no train record in {path}")


def _store_rows(store):
  """{key: float32 logits} of a teacher-logit store."""
  keys = (store / "keys.txt").read_text().splitlines()
  return dict(zip(keys, np.load(store / "logits.npy").astype(np.float32)))


def test_two_processes_match_one_and_a_killed_process_stops_the_job(food_data, finished,
                                                                     tmp_path, capsys):
  """The tiny run as 2 processes x 4 CPU devices (JAX's cross-process CPU collectives), with the
  teacher of the 1 process x 8 devices run: killed mid-student, the other process stops within the
  heartbeat timeout; rerun, it resumes, and the results are those of the 1 x 8 run."""
  ref, store = finished
  ref_rows = _store_rows(store)
  reuse = [f"--config.teacher.pretrained={ref}", "--config.teacher.epochs=0",
           "--config.teacher.handoff=last"]
  # The finished teacher, reused in a new workdir, has the same logit store: damaged, it is refused
  # in one line whose advice works (the two processes below compute it again, where it was).
  (store / "manifest.json").write_text("{not json")
  code, _, err = _in_process(capsys, tmp_path / "damaged", food_data, *reuse)
  assert code == 2, err[-3000:]
  (err,) = _error_lines(err)
  assert err.startswith("store error") and f"delete the folder {store}" in err
  shutil.rmtree(store)

  wd = tmp_path / "two"
  procs, logs = _start_processes(wd, food_data, *reuse, tag="killed")
  try:
    deadline = time.time() + 400
    while not (wd / "student" / "checkpoints" / "2").exists():
      died = [i for i, p in enumerate(procs) if p.poll() is not None]
      assert not died and time.time() < deadline, logs[(died or [0])[0]].read_text()[-3000:]
      time.sleep(0.05)
    procs[1].kill()
    killed = time.time()
    try:
      procs[0].wait(timeout=HEARTBEAT_S + 60)
    except subprocess.TimeoutExpired:
      pytest.fail("process 0 still runs a minute after process 1 was killed")
    waited = time.time() - killed
  finally:
    _kill_all(procs)
  assert procs[0].returncode != 0 and waited < HEARTBEAT_S + 30, (waited, procs[0].returncode)
  # JAX's message naming the dead task: from the coordination service's error poll, or, when
  # process 0 was in a collective at that moment (seen on a loaded machine), from the barrier.
  log0 = logs[0].read_text()
  assert ("The following tasks are unhealthy" in log0 or "Task 1 heartbeat timeout" in log0), \
      log0[-3000:]
  print(f"process 0 stopped {waited:.1f} s after process 1 was killed (exit code "
        f"{procs[0].returncode})")
  assert "teacher: training" not in logs[0].read_text()  # the finished teacher, reused
  assert not (wd / "stages" / "student.json").exists()

  procs, logs = _start_processes(wd, food_data, *reuse)
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    _kill_all(procs)
  out0, out1 = (log.read_text() for log in logs)
  assert codes == [0, 0], out0[-3000:] + out1[-3000:]
  assert "8 cpu device(s) in 2 processes" in out0
  assert "[student] resuming from the checkpoint at step 2" in out0
  # Process 0 alone prints and writes what is not a checkpoint.
  assert "| resnet8 | student |" in out0 and "| resnet8 | student |" not in out1
  assert "[jaxkd]" not in out1

  # The same results as one process of 8 devices: the same teacher, its logits stored again by
  # both processes; the student's first logged loss (steps 1-2) shows the same global batches, and
  # the rest agrees up to the last bits a different summation order changes.
  _assert_same_variables(ref / "teacher" / "final_variables", wd / "teacher" / "final_variables")
  assert json.loads((wd / "stages" / "teacher_logits.json").read_text())["store"] == str(store)
  rows = _store_rows(store)
  assert sorted(rows) == sorted(ref_rows) and len(rows) == 320
  for key, value in ref_rows.items():
    np.testing.assert_allclose(rows[key], value, rtol=0, atol=1e-2, err_msg=key)
  np.testing.assert_allclose(_first_train_loss(wd / "student" / "metrics.jsonl"),
                             _first_train_loss(ref / "student" / "metrics.jsonl"), rtol=1e-5)
  _assert_close_variables(ref / "student" / "final_variables", wd / "student" / "final_variables",
                          LAYOUT_ATOL)
  kinds = [[json.loads(x)["kind"] for x in (w / "student" / "metrics.jsonl").read_text()
            .splitlines()] for w in (ref, wd)]
  assert kinds[0] == kinds[1]  # written once, though two processes ran
  ours, theirs = ({m["role"]: m for m in json.loads((w / "report.json").read_text())["models"]}
                  for w in (wd, ref))
  for role in ("teacher", "student"):
    for key in ("top1", "top5", "num_examples"):
      assert ours[role]["val"][key] == theirs[role]["val"][key], (role, key)
    np.testing.assert_allclose(ours[role]["val"]["loss"], theirs[role]["val"]["loss"], rtol=1e-3)


def test_region_store_run(food_data, finished, tmp_path):
  """--config.teacher_logits.mode=regions with the finished run's teacher: a store of R rows per
  training image beside the per-image store, computed once, and a student trained from it."""
  ref, image_store = finished
  regions = [f"--config.teacher.pretrained={ref}", "--config.teacher.epochs=0",
             "--config.teacher.handoff=last", "--config.teacher_logits.mode=regions",
             "--config.teacher_logits.regions_per_image=2", "--config.student.max_steps=2"]
  proc = _run(tmp_path / "regions", food_data, *regions)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  marker = json.loads((tmp_path / "regions" / "stages" / "teacher_logits.json").read_text())
  store = pathlib.Path(marker["store"])
  assert store.name.startswith("train.regions-2-") and store.parent == image_store.parent
  manifest = json.loads((store / "manifest.json").read_text())
  image_manifest = json.loads((image_store / "manifest.json").read_text())
  assert manifest["num_examples"] == 2 * image_manifest["num_examples"]
  assert manifest["preprocessing"]["regions_per_image"] == 2
  assert "(2 regions per image," in proc.stdout
  assert "[student] step 2/2" in proc.stdout
  title = json.loads((tmp_path / "regions" / "report.json").read_text())["title"]
  assert title.endswith("KD from stored teacher logits of 2 crop regions per image"), title
