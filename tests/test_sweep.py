"""python -m jaxkd.sweep: the grid, the shared teacher, resuming, and the mean +- std table.

The runs themselves are main.py's (`jaxkd.cli._run`, tested in tests/test_main.py); here a stand-in
writes what a finished run leaves (its report and stage marker), with top-1 values chosen per seed
and setting, so the table can be checked against NumPy.
"""
import json
import pathlib

import numpy as np
import pytest

from jaxkd import cli, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs" / "food101_mini.py")


def _top1(temperature: float, seed: int) -> tuple[float, float]:
  return 0.5 + 0.01 * temperature + 0.003 * seed, 0.4 + 0.02 * seed


@pytest.fixture
def fake_runs(monkeypatch):
  """Replaces the run by a stand-in; returns the list of (workdir, config) it was called with."""
  calls = []

  def run(config, options):
    wd = pathlib.Path(options["workdir"])
    calls.append((wd, config))
    if config.seed == 99:
      raise KeyboardInterrupt
    val, test = _top1(float(config.student.loss.temperature), int(config.seed))
    (wd / "stages").mkdir(parents=True, exist_ok=True)
    (wd / "report.json").write_text(json.dumps({"models": [
        {"role": "teacher", "val": {"top1": 0.9}},
        {"role": "student", "val": {"top1": val}, "test": {"top1": test}}]}))
    (wd / "stages" / "report.json").write_text("{}")

  monkeypatch.setattr(cli, "_run", run)
  return calls


def test_split_values_keeps_brackets_and_quotes():
  assert sweep.split_values("kd,dkd") == ["kd", "dkd"]
  assert sweep.split_values("('val', 'test'),('val',)") == ["('val', 'test')", "('val',)"]
  assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
  assert sweep.split_values("linear(10, 1),4") == ["linear(10, 1)", "4"]


def test_grid_seeds_shared_teacher_table_and_resume(fake_runs, tmp_path, capsys):
  root = tmp_path / "sweep"
  args = [f"--config={MINI}", f"--workdir={root}", "--seeds=0,1,2",
          "--set", "student.loss.temperature=2.0,4.0", "--config.student.epochs=3"]
  sweep.main(args)
  assert len(fake_runs) == 6
  names = [wd.relative_to(root).as_posix() for wd, _ in fake_runs]
  assert names == [f"runs/student.loss.temperature={t}/seed{s}"
                   for t in ("2.0", "4.0") for s in (0, 1, 2)]
  first = fake_runs[0][0]
  for i, (_, config) in enumerate(fake_runs):
    assert config.student.epochs == 3 and config.seed == i % 3
    # One teacher for all: the first run trains it, the others take it from that run.
    if i == 0:
      assert config.teacher.pretrained is None and config.teacher.epochs > 0
    else:
      assert config.teacher.pretrained == str(first) and config.teacher.epochs == 0
  table = json.loads((root / "sweep.json").read_text())
  for row, t in zip(table["settings"], (2.0, 4.0)):
    vals = np.array([_top1(t, s)[0] for s in (0, 1, 2)])
    tests = np.array([_top1(t, s)[1] for s in (0, 1, 2)])
    assert row["seeds"] == [0, 1, 2]
    np.testing.assert_allclose(row["val_top1"]["mean"], vals.mean(), rtol=1e-12)
    np.testing.assert_allclose(row["val_top1"]["std"], vals.std(ddof=1), rtol=1e-9)
    np.testing.assert_allclose(row["test_top1"]["std"], tests.std(ddof=1), rtol=1e-9)
    assert len(row["wall_s"]["runs"]) == 3
  md = (root / "sweep.md").read_text()
  v = np.array([_top1(4.0, s)[0] for s in (0, 1, 2)]) * 100
  assert f"| student.loss.temperature=4.0 | 0,1,2 | {v.mean():.2f} ± {v.std(ddof=1):.2f} |" in md
  assert "python -m jaxkd.sweep --config=" in md
  assert (root / "sweep.png").stat().st_size > 1000
  assert md in capsys.readouterr().out

  # A rerun skips the finished runs; a new seed runs alone, and Ctrl-C (in the stand-in: seed 99)
  # stops the sweep with one line and code 130, the finished runs kept.
  fake_runs.clear()
  with pytest.raises(SystemExit) as e:
    sweep.main([a.replace("--seeds=0,1,2", "--seeds=0,1,2,99") for a in args])
  assert e.value.code == 130
  assert [c.seed for _, c in fake_runs] == [99]
  assert "interrupted:" in capsys.readouterr().err
  fake_runs.clear()
  sweep.main(args)
  assert fake_runs == []


@pytest.mark.parametrize("args,start", [
    (["--set", "student.loss.temprature=2,4"], "config error: unknown key student.loss.temprature"),
    (["--set", "student.loss.temperature"], "usage error: --set 'student.loss.temperature': give"),
    (["--set", "seed=1,2"], "usage error: --set seed=...: give the seeds with --seeds"),
    (["--seeds=0,x"], "usage error: --seeds=0,x: give integers"),
    (["--config.seed=3"], "usage error: --config.seed=3: give the seeds with --seeds"),
    (["--set", "student.loss.temperature=2,abc"],
     "config error: config.student.loss.temperature='abc': not a schedule spec"),
    (["--set", "student.epochs=2,x"], "config error: --config.student.epochs=x: student.epochs "
                                      "must be an int"),
])
def test_mistakes_are_one_line_before_any_run(fake_runs, tmp_path, capsys, args, start):
  with pytest.raises(SystemExit) as e:
    sweep.main([f"--config={MINI}", f"--workdir={tmp_path}", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith(start) and len(err.strip().splitlines()) == 1, err
  assert fake_runs == []
