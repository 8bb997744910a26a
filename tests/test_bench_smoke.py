"""Smoke tests of the benchmark entry point bench/run.py (no timing assertions).

The end-to-end run uses `--quick` with a small CIFAR student (resnet8, 32 px) instead of the default
MobileNetV3-Large + ECA: XLA:CPU takes about 30 s to compile each MobileNetV3 training step on two
cores, which would make this test several minutes long. The code path is the same; the PyTorch rows
are left out (`--only=student`).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_run_module():
  spec = importlib.util.spec_from_file_location("bench_run_under_test", REPO / "bench" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device: the run measures what a user's process sees
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_quick_student_run_writes_a_table(tmp_path):
  out = tmp_path / "BENCH.md"
  cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only=student",
         "--student-model=resnet8", "--image-size=32", "--losses=ce,dkd_pr", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("# jaxkd benchmarks")
  assert "### JAX model steps" in text
  assert "| resnet8 | train | CE |" in text
  assert "| resnet8 | train | DKD + perception |" in text
  assert "--only=student" in text  # the exact command line is recorded
  assert "jax 0." in text and "flax " in text and "optax " in text
  # the DKD + perception row reports its overhead against CE as a signed percentage
  lines = text.splitlines()
  header = next(line for line in lines if line.startswith("| model |")).split("|")
  row = next(line for line in lines if "DKD + perception" in line).split("|")
  assert row[header.index(" vs CE ")].strip()[0] in "+-"


def test_training_core_and_models_do_not_import_tensorflow():
  """The GPU machines have no TensorFlow / TFDS / ml_collections: the benchmarked modules must not
  need them."""
  code = ("import sys; sys.path.insert(0, sys.argv[1]);"
          "import jaxkd.train.step, jaxkd.train.state, jaxkd.train.optim, jaxkd.train.loop, "
          "jaxkd.train.checkpoint, jaxkd.models, "
          "jaxkd.losses;"
          "import bench.run;"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'ml_collections', 'jaxkd.data', 'torch'));"
          "assert not bad, bad")
  proc = subprocess.run([sys.executable, "-c", code, str(REPO)], env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_peak_table_published_numbers():
  run = _load_run_module()
  # NVIDIA data sheets, dense BF16 tensor-core peaks (TFLOP/s).
  assert run.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0   # H100 SXM
  assert run.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
  assert run.peak_bf16_tflops("NVIDIA H200") == 989.0
  assert run.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert run.peak_bf16_tflops("cpu") is None
  assert run.peak_bf16_tflops(None) is None


def test_report_is_appended_not_overwritten(tmp_path):
  run = _load_run_module()
  out = tmp_path / "B.md"
  run.append_report(out, "## first\n")
  run.append_report(out, "## second\n")
  text = out.read_text()
  assert text.count("# jaxkd benchmarks") == 1
  assert text.index("## first") < text.index("## second")


def test_bad_section_names_are_rejected(capsys):
  run = _load_run_module()
  with pytest.raises(SystemExit):
    run.parse_args(["--only=student,gpu"])
  assert "gpu" in capsys.readouterr().err


def test_torch_interpreter_from_flag_then_environment_then_path(tmp_path, monkeypatch):
  """--torch-python wins over JAXKD_TORCH_PYTHON, which wins over the python3s on PATH; a named
  interpreter without torch is an error naming where it came from; none found is a skip whose
  note says how to name one. (Which interpreters import torch is faked: no torch is needed.)"""
  run = _load_run_module()
  folder = tmp_path / "bin"
  folder.mkdir()
  path_python = folder / "python3"
  path_python.write_text("#!/bin/sh\n")
  path_python.chmod(0o755)
  with_torch = {str(path_python), "/opt/flag/python", "/opt/env/python"}
  monkeypatch.setattr(run, "_imports_torch", lambda python: python in with_torch)
  monkeypatch.setenv("PATH", str(folder))
  monkeypatch.delenv(run.TORCH_PYTHON_ENV, raising=False)
  assert run.find_torch_python(None) == (str(path_python), "auto-detected")
  monkeypatch.setenv(run.TORCH_PYTHON_ENV, "/opt/env/python")
  assert run.find_torch_python(None) == ("/opt/env/python", "JAXKD_TORCH_PYTHON")
  assert run.find_torch_python("/opt/flag/python") == ("/opt/flag/python", "--torch-python")
  with pytest.raises(RuntimeError, match="--torch-python='/no/torch' cannot import torch"):
    run.find_torch_python("/no/torch")
  monkeypatch.setenv(run.TORCH_PYTHON_ENV, "/no/torch")
  with pytest.raises(RuntimeError, match="JAXKD_TORCH_PYTHON='/no/torch' cannot import torch"):
    run.find_torch_python(None)
  monkeypatch.delenv(run.TORCH_PYTHON_ENV)
  with_torch.clear()
  python, why = run.find_torch_python(None)
  assert python is None
  assert str(path_python) in why and "--torch-python=PATH" in why and "JAXKD_TORCH_PYTHON" in why


def test_missing_data_root_is_a_note_naming_the_flag(tmp_path):
  run = _load_run_module()
  assert run.parse_args([]).data_root == str(REPO.parent / "shared" / "data")
  args = run.parse_args([f"--data-root={tmp_path}"])
  note = run._skip_note("input", args, "cpu")
  if importlib.util.find_spec("tensorflow") is None:
    assert "TensorFlow is not installed" in note
  else:
    assert str(tmp_path / "food-101-mini") in note and "--data-root=DIR" in note
  assert run._skip_note("student", args, "cpu") is None


def test_region_store_bench_writes_its_table(shared_data, tmp_path):
  out = tmp_path / "BENCH.md"
  cmd = [sys.executable, str(REPO / "bench" / "bench_region_store.py"),
         f"--data-root={shared_data}", "--teacher=resnet8", "--image-sizes=32", "--regions=1,2",
         "--num-images=4", "--batch-size=4", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  assert "region store (bench/bench_region_store.py)" in text and "--regions=1,2" in text
  rows = [line for line in text.splitlines() if line.startswith("| 32 |")]
  assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]
  # R regions x 101 classes (Food-101's) x 2 bytes of float16 logits at least, per image
  assert all(float(row.split("|")[4].replace(",", "")) >= 202 * int(row.split("|")[2])
             for row in rows)
