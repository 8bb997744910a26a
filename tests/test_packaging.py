"""The installed package, as a user's own code meets it: importable from any directory, with the
`jaxkd` console command (README's install: `pip install -r requirements.txt -e .`)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _clean_env():
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_import_from_outside_the_repository(tmp_path):
  proc = subprocess.run([sys.executable, "-c", "import jaxkd, jaxkd.losses, jaxkd.models; print(jaxkd.__file__)"],
                        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert pathlib.Path(proc.stdout.strip()).resolve().parent == (ROOT / "jaxkd").resolve()


def test_console_command_prints_the_config_from_another_directory(tmp_path):
  script = pathlib.Path(sys.executable).parent / "jaxkd"
  assert script.exists(), f"no console script {script}: install with `pip install -e .`"
  config = ROOT / "configs" / "food101_mini.py"
  proc = subprocess.run([str(script), f"--config={config}", "--print_config", "--config.student.epochs=3"],
                        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("student.epochs"))
  assert line.split("#")[0].strip() == "student.epochs = 3"
