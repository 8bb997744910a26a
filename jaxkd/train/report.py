"""The experiment report: report.md / report.json in the shape of the seed's Table 1
(model, parameters, MACs, accuracy) and plots (training curves, confusion matrices)."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np

from jaxkd import models
from jaxkd.train.loop import read_metrics

__all__ = ["write_report", "plot_training_curves", "plot_confusion"]


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def plot_training_curves(workdir: pathlib.Path, roles: list[str], path: pathlib.Path) -> bool:
  """Train loss, train accuracy and val top-1 per epoch for each trained role; False if nothing to plot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = {role: read_metrics(workdir / role) for role in roles}
  series = {r: s for r, s in series.items() if s}
  if not series:
    return False
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for role, records in series.items():
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"].startswith("eval_")]
    if train:
      axes[0].plot([r["epoch"] for r in train], [r["loss"] for r in train], label=role)
      axes[1].plot([r["epoch"] for r in train], [100 * r["accuracy"] for r in train], label=role)
    if evals:
      axes[2].plot([r["epoch"] for r in evals], [100 * r["top1"] for r in evals], marker="o", label=role)
  for ax, title in zip(axes, ["train loss", "train accuracy (%)", "val top-1 (%)"]):
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_confusion(confusion, class_names, title: str, path: pathlib.Path) -> None:
  """Row-normalised confusion matrix (rows: true class); class names shown up to 30 classes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  m = np.asarray(confusion, np.float64)
  m = m / np.maximum(m.sum(1, keepdims=True), 1)
  n = m.shape[0]
  size = min(4 + 0.35 * n, 24)
  fig, ax = plt.subplots(figsize=(size, size))
  im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
  if n <= 30:
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(config, workdir: pathlib.Path, *, source, results: Mapping[tuple[str, str], dict]) -> dict:
  """Writes report.json, report.md and plots/ into `workdir`; returns the report dict."""
  workdir = pathlib.Path(workdir)
  plots = workdir / "plots"
  plots.mkdir(exist_ok=True)
  image_size = int(config.augment.image_size)
  roles = [r for r in ("teacher", "student") if any(k[0] == r for k in results)]
  rows = []
  for role in roles:
    stage = config[role]
    kwargs = dict(stage.get("model_kwargs", {}))
    cost = models.cost(stage.model, image_size=image_size, num_classes=source.num_classes, **kwargs)
    row = {"role": role, "model": stage.model, "model_kwargs": kwargs, "params": int(cost["params"]),
           "macs": float(cost["macs"]), "image_size": image_size}
    if role == "student":
      row["loss"] = dict(config.student.loss)
    for split in config.evaluate.splits:
      res = results.get((role, split))
      if res is not None:
        row[split] = {k: res[k] for k in ("top1", "top5", "loss", "num_examples")}
        row[split]["per_class_accuracy"] = res["per_class_accuracy"]
    rows.append(row)

  report = {"name": config.get("name", ""), "dataset": {"name": source.name, "version": source.version,
                                                        "num_classes": source.num_classes,
                                                        "splits": {s: source.num_examples(s)
                                                                   for s in ("train", "val", "test")}},
            "models": rows, "reference": dict(config.report.get("reference", {})) if "report" in config else {}}
  (workdir / "report.json").write_text(json.dumps(report, indent=2))

  splits = list(config.evaluate.splits)
  lines = [f"# {config.get('name', 'jaxkd experiment')}", "",
           f"Data: {source.name} {source.version}, {source.num_classes} classes; "
           f"train {source.num_examples('train')} / val {source.num_examples('val')} / "
           f"test {source.num_examples('test')} images; {image_size} px.", "",
           "| model | role | parameters | MACs | " + " | ".join(f"{s} top-1 (%) | {s} top-5 (%)" for s in splits) + " |",
           "|---|---|---:|---:|" + "---:|---:|" * len(splits)]
  for row in rows:
    accs = " | ".join(f"{_pct(row.get(s, {}).get('top1'))} | {_pct(row.get(s, {}).get('top5'))}" for s in splits)
    lines.append(f"| {row['model']} | {row['role']} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e9:.3f} G | {accs} |")
  ref = report["reference"]
  if ref:
    lines += ["", "Published reference (" + ref.get("source", "seed") + "): " +
              ", ".join(f"{k} {v}" for k, v in ref.items() if k != "source") + "."]
  if plot_training_curves(workdir, roles, plots / "training_curves.png"):
    lines += ["", "![training curves](plots/training_curves.png)"]
  for role in roles:
    res = results.get((role, splits[-1]))
    if res is not None:
      name = f"confusion_{role}_{splits[-1]}.png"
      plot_confusion(res["confusion"], list(source.class_names), f"{role} ({config[role].model}), {splits[-1]}",
                     plots / name)
      lines += ["", f"![{role} confusion matrix](plots/{name})"]
  # Per-class accuracy of the last split, side by side.
  last = splits[-1]
  if all((r, last) in results for r in roles):
    lines += ["", f"## Per-class top-1 on {last} (%)", "",
              "| class | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
    for c, name in enumerate(source.class_names):
      vals = " | ".join(_pct(results[(r, last)]["per_class_accuracy"][c]) for r in roles)
      lines.append(f"| {name} | {vals} |")
  (workdir / "report.md").write_text("\n".join(lines) + "\n")
  return report
