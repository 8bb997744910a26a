"""The experiment report: report.md / report.json (model, parameters, MACs, accuracy per split, as in
the tables of the distillation papers) and plots (training curves, confusion matrices). It describes
the run that happened: the title comes from the effective dataset, models and loss."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np

from jaxkd import models
from jaxkd.config import model_kwargs
from jaxkd.train.step import LossConfig
from jaxkd.train.loop import read_metrics

__all__ = ["write_report", "describe_run", "reference_for_run", "plot_training_curves", "plot_confusion"]


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


def _loss_text(config) -> str:
  loss = config.student.loss
  kind = str(loss.kind)
  if kind == "ce":
    return "CE only (no distillation)"
  parts = [kind.upper()]
  if loss.get("perception"):
    parts.append("+ perception reconstruction")
  if loss.get("standardize"):
    parts.append("+ logit standardization")
  feats = loss.get("feature_losses") or ()
  if feats:
    parts.append("+ features")
  teacher = config.student.get("teacher", "stored")
  source = {"stored": "stored teacher logits", "online": "an online teacher"}.get(teacher, teacher)
  return " ".join(parts) + f" from {source}"


def describe_run(config, source) -> str:
  """The report's title, from what actually ran: dataset, models and loss (not the config's name)."""
  data = f"{source.name} ({source.num_classes} classes)"
  teacher = config.teacher.model if config.teacher.enabled else None
  student = config.student.model if config.student.enabled else None
  if teacher and student:
    if LossConfig.from_config(config.student.loss).distills:
      return f"{data}: {teacher} -> {student}, {_loss_text(config)}"
    return f"{data}: teacher {teacher}; student {student}, {_loss_text(config)}"
  if teacher:
    return f"{data}: teacher {teacher}"
  return f"{data}: {student}, {_loss_text(config)}"


def reference_for_run(config, source) -> tuple[dict, str]:
  """(the config's published reference, '') when it refers to this run, else ({}, why it is not shown).

  A reference says what it refers to in `applies_to`: any of dataset (a name or a list of names),
  num_classes, teacher, student, loss (the loss kind), perception, image_size. Every given field must match the
  effective run; a reference without `applies_to` is never shown, as it cannot be checked.
  """
  ref = dict(config.report.get("reference", {}) or {}) if "report" in config else {}
  if not ref:
    return {}, ""
  applies = dict(ref.get("applies_to", {}) or {})
  if not applies:
    return {}, "the config's reference does not say which dataset and models it refers to"
  actual = {"dataset": source.name, "num_classes": source.num_classes,
            "teacher": config.teacher.model if config.teacher.enabled else None,
            "student": config.student.model if config.student.enabled else None,
            "loss": str(config.student.loss.kind), "perception": bool(config.student.loss.get("perception")),
            "image_size": int(config.augment.image_size)}
  for key, want in applies.items():
    wanted = list(want) if isinstance(want, (list, tuple)) else [want]
    if actual.get(key) not in wanted:
      return {}, f"it refers to {key} {want!r}, this run has {actual.get(key)!r}"
  return ref, ""


def write_report(config, workdir: pathlib.Path, *, source, results: Mapping[tuple[str, str], dict],
                 splits=None, data_splits=None) -> dict:
  """Writes report.json, report.md and plots/ into `workdir`; returns the report dict.

  `splits`: the evaluated splits in order (default config.evaluate.splits); a split the data does
  not have (an image folder without test/) is said so in the report. `data_splits`: the splits the
  data has (default train, val, test), for the image counts.
  """
  workdir = pathlib.Path(workdir)
  plots = workdir / "plots"
  plots.mkdir(exist_ok=True)
  image_size = int(config.augment.image_size)
  splits = list(splits if splits is not None else config.evaluate.splits)
  absent = [s for s in config.evaluate.splits if s not in splits]
  roles = [r for r in ("teacher", "student") if any(k[0] == r for k in results)]
  rows = []
  for role in roles:
    stage = config[role]
    kwargs = model_kwargs(stage)
    cost = models.cost(stage.model, image_size=image_size, num_classes=source.num_classes, **kwargs)
    row = {"role": role, "model": stage.model, "model_kwargs": kwargs, "params": int(cost["params"]),
           "macs": float(cost["macs"]), "image_size": image_size}
    if role == "student":
      row["loss"] = stage.loss.to_dict()
    for split in splits:
      res = results.get((role, split))
      if res is not None:
        row[split] = {k: res[k] for k in ("top1", "top5", "loss", "num_examples")}
        row[split]["per_class_accuracy"] = res["per_class_accuracy"]
    rows.append(row)

  data_splits = [s for s in (data_splits or ("train", "val", "test")) if s not in absent]
  counts = {s: source.num_examples(s) for s in data_splits}
  skipped = [list(x) for x in getattr(source, "skipped_images", None) or []]
  converted = [list(x) for x in getattr(source, "converted_images", None) or []]
  title = describe_run(config, source)
  reference, why_not = reference_for_run(config, source)
  report = {"title": title, "config_name": config.get("name", ""),
            "dataset": {"name": source.name, "version": source.version, "num_classes": source.num_classes,
                        "splits": counts, "absent_splits": absent, "skipped_images": skipped,
                        "converted_images": converted},
            "models": rows, "reference": reference}
  if why_not:
    report["reference_not_shown"] = why_not
  (workdir / "report.json").write_text(json.dumps(report, indent=2))

  count_text = " / ".join(f"{s} {n}" for s, n in counts.items())
  lines = [f"# {title}", "",
           f"Data: {source.name} {source.version}, {source.num_classes} classes; {count_text} images; "
           f"{image_size} px."]
  if absent:
    lines += ["", f"The data has no {' / '.join(absent)} split (no test/ folder): the results below are on "
              f"{' / '.join(splits)}, images held out from training."]
  if skipped:
    shown = ", ".join(f"{p} ({why})" for p, why in skipped[:20])
    more = f", and {len(skipped) - 20} more (report.json lists all)" if len(skipped) > 20 else ""
    lines += ["", f"{len(skipped)} image(s) could not be decoded and were left out "
              f"(data.skip_bad_images): {shown}{more}."]
  if converted:
    lines += ["", f"{len(converted)} image(s) in a format TensorFlow cannot decode were converted to PNG "
              "when the dataset was built (report.json lists them)."]
  lines += ["",
            "| model | role | parameters | MACs | " + " | ".join(f"{s} top-1 (%) | {s} top-5 (%)" for s in splits)
            + " |",
            "|---|---|---:|---:|" + "---:|---:|" * len(splits)]
  for row in rows:
    accs = " | ".join(f"{_pct(row.get(s, {}).get('top1'))} | {_pct(row.get(s, {}).get('top5'))}" for s in splits)
    lines.append(f"| {row['model']} | {row['role']} | {row['params'] / 1e6:.2f} M | {row['macs'] / 1e9:.3f} G | "
                 f"{accs} |")
  if reference:
    lines += ["", "Published reference (" + str(reference.get("source", "")) + "): " +
              ", ".join(f"{k} {v}" for k, v in reference.items() if k not in ("source", "applies_to")) + "."]
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
