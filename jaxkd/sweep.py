"""A grid of runs with several seeds, one after another, and the table of their mean and spread.

  python -m jaxkd.sweep --config=configs/food101_mini.py --seeds=0,1,2 \\
      --set student.loss.kind=ce,kd,dkd --workdir=sweeps/mini [--config.KEY=VALUE ...]

Every combination of the `--set` values (each `--set KEY=V1,V2,...`; values as in
`--config.KEY=VALUE`, commas inside brackets or quotes kept) runs once per seed, as
`main.py --config=... --config.seed=SEED --config.KEY=V ...` would, in
`<workdir>/runs/<setting>/seed<SEED>`. Runs whose teacher is the same (the same config.teacher,
data, augmentation and compute dtype, whatever the seed) share one: the first trains it, the others
take it from that run (`--config.teacher.pretrained=<its workdir> --config.teacher.epochs=0`), and
so also its stored logits. A rerun of the same command skips finished runs and resumes an
interrupted one (Ctrl-C stops the sweep at a safe point).

It writes, after every run, `<workdir>/sweep.md`, `sweep.json` and `sweep.png`: per setting, the
student's val and test top-1 as mean +- sample standard deviation over the finished seeds, and the
wall time per run (a teacher's first run includes training it). Two settings differ beyond
noise only when their means are further apart than about twice the standard error (std / sqrt
of the number of seeds) of each.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence

from jaxkd import cli
from jaxkd import config as schema
from jaxkd.cli import UsageError
from jaxkd.config import ConfigError

__all__ = ["main", "plan", "summarise", "split_values"]

_USAGE = ("usage: python -m jaxkd.sweep --config=CONFIG.py --workdir=DIR [--seeds=0,1,2] "
          "[--set KEY=V1,V2 ...] [--config.KEY=VALUE ...] [--noprogress]")


def split_values(text: str) -> list[str]:
  """'a,(1, 2),"x,y"' -> ['a', '(1, 2)', '"x,y"']: commas at depth 0, outside quotes."""
  out, depth, quote, start = [], 0, "", 0
  for i, ch in enumerate(text):
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(text[start:i].strip())
      start = i + 1
  out.append(text[start:].strip())
  return out


def _parse(argv: Sequence[str]) -> tuple[list[str], dict]:
  """(the arguments every run gets, {'workdir', 'seeds', 'sets', 'progress'})."""
  shared, sets, workdir, seeds, progress = [], [], None, [0], True
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--set" or arg.startswith("--set="):
      if arg == "--set":
        if i + 1 >= len(args):
          raise UsageError("--set needs KEY=V1,V2 after it")
        i += 1
        text = args[i]
      else:
        text = arg[len("--set="):]
      key, sep, values = text.partition("=")
      key = key.removeprefix("config.")
      if not sep or not key or not values:
        raise UsageError(f"--set {text!r}: give KEY=V1,V2 (e.g. --set student.loss.kind=kd,dkd)")
      if not schema.is_known(key):
        raise ConfigError(schema.unknown_key_message(key))
      if key in ("seed",):
        raise UsageError("--set seed=...: give the seeds with --seeds=0,1,2")
      if any(k == key for k, _ in sets):
        raise UsageError(f"--set {key}=... is given twice; list every value in one --set")
      sets.append((key, split_values(values)))
    elif arg.startswith("--seeds="):
      try:
        seeds = [int(s) for s in split_values(arg[len("--seeds="):])]
      except ValueError:
        raise UsageError(f"{arg}: give integers, e.g. --seeds=0,1,2") from None
      if len(set(seeds)) != len(seeds):
        raise UsageError(f"{arg}: a seed is listed twice")
    elif arg.startswith("--workdir="):
      workdir = arg[len("--workdir="):]
    elif arg in ("--progress", "--noprogress", "--progress=false", "--progress=true"):
      progress = arg in ("--progress", "--progress=true")
    elif re.match(r"^--?config\.seed(=|$)", arg):
      raise UsageError(f"{arg}: give the seeds with --seeds=0,1,2")
    else:
      shared.append(arg)
    i += 1
  if not workdir:
    raise UsageError(f"--workdir is required: the folder of the sweep's runs and table. {_USAGE}")
  return shared, {"workdir": pathlib.Path(workdir), "seeds": seeds, "sets": sets,
                  "progress": progress}


def _setting_name(values: Sequence[tuple[str, str]]) -> str:
  """A folder name for a setting: 'student.loss.kind=dkd,student.loss.temperature=2'."""
  if not values:
    return "default"
  text = ",".join(f"{k}={v}" for k, v in values)
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)[:200]


def _teacher_key(config) -> str:
  """What makes two runs' teachers the same: their config.teacher, data, augmentation and compute
  dtype (not the seed: one teacher serves every seed of the students)."""
  parts = {name: json.loads(config[name].to_json_best_effort(sort_keys=True))
           for name in ("teacher", "data", "augment")}
  parts["dtype"] = config.get("dtype")
  return json.dumps(parts, sort_keys=True)


def plan(shared: Sequence[str], options: dict) -> list[dict]:
  """The runs, in order: {'setting', 'values', 'seed', 'workdir', 'args'} (args: main.py's,
  without the teacher reuse, which `main` adds once the first run of a teacher exists)."""
  root = options["workdir"]
  keys = [k for k, _ in options["sets"]]
  runs = []
  for combo in itertools.product(*[vals for _, vals in options["sets"]]):
    values = list(zip(keys, combo))
    name = _setting_name(values)
    for seed in options["seeds"]:
      wd = root / "runs" / name / f"seed{seed}"
      args = [*shared, f"--workdir={wd}", f"--config.seed={seed}",
              *(f"--config.{k}={v}" for k, v in values)]
      runs.append({"setting": name, "values": values, "seed": seed, "workdir": wd,
                   "args": args})
  return runs


def _finished(wd: pathlib.Path) -> bool:
  return (wd / "stages" / "report.json").exists() and (wd / "report.json").exists()


def _wall_file(wd: pathlib.Path) -> pathlib.Path:
  return wd / "sweep_wall_s.json"


def _student_row(wd: pathlib.Path) -> dict | None:
  report = json.loads((wd / "report.json").read_text())
  rows = {m["role"]: m for m in report.get("models", [])}
  return rows.get("student") or rows.get("teacher")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: Sequence[dict]) -> list[dict]:
  """Per setting (in plan order): seeds finished, and mean / sample std of the student's val and
  test top-1 and of the wall time, over the finished runs."""
  table: dict[str, dict] = {}
  for run in runs:
    entry = table.setdefault(run["setting"], {"setting": run["setting"],
                                              "values": dict(run["values"]), "seeds": [],
                                              "val_top1": [], "test_top1": [], "wall_s": []})
    wd = run["workdir"]
    if not _finished(wd):
      continue
    row = _student_row(wd) or {}
    entry["seeds"].append(run["seed"])
    for split in ("val", "test"):
      if split in row:
        entry[f"{split}_top1"].append(float(row[split]["top1"]))
    if _wall_file(wd).exists():
      entry["wall_s"].append(float(json.loads(_wall_file(wd).read_text())["wall_s"]))
  out = []
  for entry in table.values():
    for name in ("val_top1", "test_top1", "wall_s"):
      values = entry.pop(name)
      mean, std = _mean_std(values)
      entry[name] = {"mean": mean, "std": std, "runs": values}
    out.append(entry)
  return out


def _cell(stat: dict, scale: float = 100.0, digits: int = 2) -> str:
  if stat["mean"] is None:
    return "-"
  text = f"{stat['mean'] * scale:.{digits}f}"
  return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat["std"] is not None else "")


def write_table(root: pathlib.Path, rows: list[dict], command: str) -> None:
  """sweep.md, sweep.json and sweep.png in `root`."""
  lines = ["# Sweep", "", f"    {command}", "",
           "Student top-1 (%) as mean ± sample standard deviation over the finished seeds; wall "
           "time per run in seconds.", "",
           "| setting | seeds | val top-1 % | test top-1 % | wall s |", "|---|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {','.join(map(str, r['seeds'])) or '-'} | "
                 f"{_cell(r['val_top1'])} | {_cell(r['test_top1'])} | "
                 f"{_cell(r['wall_s'], 1.0, 1)} |")
  (root / "sweep.md").write_text("\n".join(lines) + "\n")
  (root / "sweep.json").write_text(json.dumps({"command": command, "settings": rows}, indent=2))
  _plot(root / "sweep.png", rows)


def _plot(path: pathlib.Path, rows: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = [r for r in rows if r["val_top1"]["mean"] is not None]
  if not shown:
    return
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(shown) + 2), 3.5))
  x = range(len(shown))
  for offset, split in ((-0.2, "val"), (0.2, "test")):
    means = [(r[f"{split}_top1"]["mean"] or 0.0) * 100 for r in shown]
    stds = [(r[f"{split}_top1"]["std"] or 0.0) * 100 for r in shown]
    if any(r[f"{split}_top1"]["mean"] is not None for r in shown):
      ax.bar([i + offset for i in x], means, width=0.4, yerr=stds, capsize=3, label=split)
  ax.set_xticks(list(x))
  ax.set_xticklabels([r["setting"] for r in shown], rotation=20, ha="right", fontsize=7)
  ax.set_ylabel("student top-1 (%)")
  ax.set_ylim(0, 100)
  ax.set_title("mean ± std over seeds", fontsize=9)
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the sweep (see the module doc); exits like main.py on errors."""
  args = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("--help", "-h") for a in args):
    print(__doc__)
    return
  cli.exit_on_error(lambda: _sweep(args), rerun="the same sweep command")


def _sweep(args: list[str]) -> None:
  shared, options = _parse(args)
  runs = plan(shared, options)
  root = options["workdir"]
  root.mkdir(parents=True, exist_ok=True)
  command = "python -m jaxkd.sweep " + " ".join(args)
  parsed = []
  for run in runs:  # every run's config checked before any compute
    config, run_options = cli.parse_args(run["args"], "jaxkd.sweep")
    if config is None:
      raise UsageError(f"--config is required. {_USAGE}")
    schema.check_values(config)
    parsed.append((config, run_options))
  teachers: dict[str, pathlib.Path] = {}
  started = False
  for i, (run, (config, run_options)) in enumerate(zip(runs, parsed), 1):
    wd = run["workdir"]
    owner = teachers.setdefault(_teacher_key(config), wd)
    if _finished(wd):
      continue
    if owner != wd and config.teacher.enabled and not config.teacher.pretrained:
      config, run_options = cli.parse_args(
          [*run["args"], f"--config.teacher.pretrained={owner}", "--config.teacher.epochs=0",
           "--config.teacher.handoff=last"], "jaxkd.sweep")
    print(f"[sweep] run {i}/{len(runs)}: {run['setting']} seed {run['seed']} -> {wd}",
          flush=True)
    run_options = {**run_options, "progress": options["progress"]}
    if started:  # jax.distributed starts once per process: with the first run
      run_options.update(distributed="no", coordinator_address=None, num_processes=None,
                         process_id=None)
    started = True
    start = time.time()
    try:
      cli._run(config, run_options)
    finally:
      wd.mkdir(parents=True, exist_ok=True)
      previous = (json.loads(_wall_file(wd).read_text())["wall_s"]
                  if _wall_file(wd).exists() else 0.0)
      _wall_file(wd).write_text(json.dumps({"wall_s": previous + time.time() - start}))
      write_table(root, summarise(runs), command)
  write_table(root, summarise(runs), command)
  print((root / "sweep.md").read_text(), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
