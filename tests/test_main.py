"""End-to-end: `python main.py --config=configs/food101_mini.py` on the real food-101-mini photos,
shrunk to a few steps (32 px, CIFAR-size models). Runs main.py in subprocesses, as a user would."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny but complete experiment: teacher 1 epoch-fraction, logits, KD student, evaluate, report.
TINY = [
    "--config.augment.image_size=32",
    "--config.teacher.model=resnet8", "--config.student.model=resnet8", "--config.student.model_kwargs={}",
    "--config.teacher.batch_size=64", "--config.student.batch_size=64",
    "--config.teacher.max_steps=6", "--config.student.max_steps=6",
    "--config.teacher.checkpoint_every_steps=2", "--config.student.checkpoint_every_steps=2",
    "--config.teacher.log_every_steps=2", "--config.student.log_every_steps=2",
    "--config.evaluate.splits=('val',)", "--config.evaluate.batch_size=200",
    "--config.teacher_logits.batch_size=200",
    "--config.data.num_parallel_calls=2",
    "--progress=false",
]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def _cmd(workdir, mini, *extra):
  images, data_dir = mini
  return [sys.executable, str(ROOT / "main.py"), "--config=configs/food101_mini.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", f"--config.data.manual_dir={images}", *TINY, *extra]


def _run(workdir, mini, *extra, timeout=600):
  return subprocess.run(_cmd(workdir, mini, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def mini(shared_data, tmp_path_factory):
  """(the food-101-mini folder, a TFDS data_dir shared by the tests of this module)."""
  return shared_data / "food-101-mini", tmp_path_factory.mktemp("tfds")


def _load_final(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path).resolve())


def test_full_pipeline_then_rerun_is_a_noop(mini, tmp_path):
  wd = tmp_path / "run"
  first = _run(wd, mini)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for stage in ("teacher", "teacher_logits", "student", "evaluate", "report"):
    assert (wd / "stages" / f"{stage}.json").exists(), stage
  report = json.loads((wd / "report.json").read_text())
  roles = {m["role"]: m for m in report["models"]}
  assert set(roles) == {"teacher", "student"}
  assert roles["teacher"]["params"] == roles["student"]["params"] > 0
  assert roles["student"]["val"]["num_examples"] == 400  # 20% of 2,000, every example once
  assert 0.0 <= roles["student"]["val"]["top1"] <= 1.0
  assert (wd / "report.md").read_text().startswith("# ")
  assert (wd / "plots" / "training_curves.png").stat().st_size > 1000
  store = json.loads((wd / "stages" / "teacher_logits.json").read_text())["store"]
  assert pathlib.Path(store, "manifest.json").exists()
  # Metrics and TensorBoard events.
  lines = (wd / "student" / "metrics.jsonl").read_text().splitlines()
  assert any(json.loads(l)["kind"] == "train" and "kd" in json.loads(l) for l in lines)
  assert list((wd / "student" / "tensorboard").glob("events.out.tfevents.*"))

  second = _run(wd, mini)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "| resnet8 | student |" in second.stdout
  assert "[jaxkd]" not in second.stdout  # no stage ran again: only the report is printed
  # A different config in the same workdir is refused, naming the key.
  third = _run(wd, mini, "--config.student.loss.temperature=2.0")
  assert third.returncode == 2
  assert "config.student.loss.temperature" in third.stderr


def test_config_errors_before_compute(mini, tmp_path):
  bad = _run(tmp_path / "a", mini, "--config.student.batch_size=60")
  assert bad.returncode == 2 and "config.student.batch_size=60" in bad.stderr
  assert not (tmp_path / "a" / "teacher").exists()
  missing = _run(tmp_path / "b", mini, "--config.data.manual_dir=/nonexistent/food")
  assert missing.returncode == 2 and "config.data.manual_dir" in missing.stderr
  typo = _run(tmp_path / "c", mini, "--config.student.epochz=3")
  assert typo.returncode != 0 and "epochz" in typo.stderr


def test_sigkill_mid_epoch_then_resume_gives_the_same_parameters(mini, tmp_path):
  only_teacher = ["--config.student.enabled=false", "--config.teacher.max_steps=10"]
  ref = _run(tmp_path / "ref", mini, *only_teacher)
  assert ref.returncode == 0, ref.stderr[-3000:]

  wd = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(wd, mini, *only_teacher), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = wd / "teacher" / "checkpoints"
  deadline = time.time() + 400
  try:
    # Kill once a checkpoint past the first one exists, i.e. mid-epoch (an epoch is 25 steps).
    while time.time() < deadline:
      steps = [int(p.name) for p in ckpt_dir.glob("[0-9]*") if p.name.isdigit()] if ckpt_dir.exists() else []
      if steps and max(steps) >= 4:
        break
      if proc.poll() is not None:
        pytest.fail("training finished before it could be killed")
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (wd / "stages" / "teacher.json").exists()
  resumed = _run(wd, mini, *only_teacher)
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  a = _load_final(tmp_path / "ref" / "teacher" / "final_variables")
  b = _load_final(wd / "teacher" / "final_variables")
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
