"""The installed package, as a user's own code meets it: importable from any directory, with the
`jaxkd` console command (README's install: `pip install -r requirements.txt -e .`)."""
import ast
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
  code = "import jaxkd, jaxkd.losses, jaxkd.models; print(jaxkd.__file__)"
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert pathlib.Path(proc.stdout.strip()).resolve().parent == (ROOT / "jaxkd").resolve()


def test_console_command_prints_the_config_from_another_directory(tmp_path):
  script = pathlib.Path(sys.executable).parent / "jaxkd"
  assert script.exists(), f"no console script {script}: install with `pip install -e .`"
  config = ROOT / "configs" / "food101_mini.py"
  proc = subprocess.run([str(script), f"--config={config}", "--print_config",
                         "--config.student.epochs=3"],
                        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("student.epochs"))
  assert line.split("#")[0].strip() == "student.epochs = 3"


def _jaxkd_sources():
  return sorted((ROOT / "jaxkd").rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at the top or inside a function (absolute names)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
  return found


def test_data_flows_one_way_through_the_modules():
  # config -> data -> model -> step -> metrics/checkpoints -> report: the config does not reach
  # for the stages, the report does not reach back into the training loop, and the workdir layout
  # needs neither.
  back = {"jaxkd/config.py": ("jaxkd.experiment", "jaxkd.train.loop"),
          "jaxkd/workdir.py": ("jaxkd.experiment", "jaxkd.train.loop"),
          "jaxkd/train/report.py": ("jaxkd.experiment", "jaxkd.train.loop")}
  for name, forbidden in back.items():
    imported = _imports(ROOT / name)
    wrong = sorted(m for m in imported if m.startswith(forbidden))
    assert not wrong, f"{name} imports {wrong}"


# The command lines: main.py / jaxkd (cli.py), python -m jaxkd.predict, python -m jaxkd.export.
COMMAND_LINES = ("jaxkd/cli.py", "jaxkd/predict.py", "jaxkd/export/__main__.py")


def test_only_the_command_line_decides_exit_codes():
  exits = []
  for path in _jaxkd_sources():
    if path.relative_to(ROOT).as_posix() in COMMAND_LINES:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      call = node.func if isinstance(node, ast.Call) else None
      name = ast.unparse(call) if call is not None else ""
      if name in ("sys.exit", "exit", "quit", "os._exit", "SystemExit"):
        exits.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
      if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(
          node.exc):
        exits.append(f"{path.relative_to(ROOT)}:{node.lineno} raise SystemExit")
  assert not exits, exits
