"""The experiment report: report.md / report.json (model, parameters, MACs, accuracy per split, as
in the tables of the distillation papers; the val top-1 of the last and of the best checkpoint of
each trained model, and which of the two was handed on; the deployment table of the exported
files: size, latency, val top-1 and agreement with jaxkd) and plots (training curves, confusion
matrices). It describes the run that happened: the title comes from the effective dataset, models
and loss. Nothing is compiled: parameters and MACs are counted from shapes
(`jaxkd.models.cost(..., xla=False)`), the curves read the stages' metrics.jsonl."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd import models
from jaxkd.config import model_kwargs
from jaxkd.train.step import LossConfig

__all__ = ["write_report", "describe_run", "reference_for_run", "plot_training_curves",
           "plot_hyperparameters",
           "plot_confusion", "read_metrics", "deployment_rows", "SUMMARY_FIELDS"]

# The evaluation numbers a report row keeps per split (besides per_class_accuracy), and a
# training stage's marker of its last and best evaluation.
SUMMARY_FIELDS = ("top1", "top5", "loss", "num_examples")


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def read_metrics(stage_dir: pathlib.Path) -> list[dict]:
  """The records of <stage_dir>/metrics.jsonl, one JSON object a line ({'kind': 'train' or
  'eval_<split>', 'step', 'epoch', ...}, as jaxkd.train.loop's MetricsWriter writes them); an empty
  list when the stage wrote none."""
  path = pathlib.Path(stage_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(workdir: pathlib.Path, roles: list[str], path: pathlib.Path) -> bool:
  """Train loss, train accuracy and val top-1 per epoch for each trained role; False if nothing to
  plot."""
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
      axes[2].plot([r["epoch"] for r in evals], [100 * r["top1"] for r in evals], marker="o",
                   label=role)
  for ax, title in zip(axes, ["train loss", "train accuracy (%)", "val top-1 (%)"]):
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


_HPARAM_KEYS = ("temperature", "kd_alpha", "ce_weight", "kd_weight", "alpha", "beta", "warmup",
                "phase")


def plot_hyperparameters(workdir: pathlib.Path, roles: list[str], path: pathlib.Path) -> bool:
  """The loss hyper-parameters that changed during training (schedules, the accuracy-driven
  temperature, the phase of staged distillation) per epoch, one panel each; False if none
  changed."""
  panels = []
  for role in roles:
    train = [r for r in read_metrics(workdir / role) if r["kind"] == "train"]
    keys = [k for k in train[0] if k in _HPARAM_KEYS or k.startswith("feature_losses.")] if (
        train) else []
    for key in keys:
      values = [r.get(key) for r in train]
      if None not in values and len(set(values)) > 1:
        panels.append((role, key, [r["epoch"] for r in train], values))
  if not panels:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  for ax, (role, key, epochs, values) in zip(axes[0], panels):
    ax.plot(epochs, values, drawstyle="steps-post" if key == "phase" else "default")
    ax.set_title(f"{role}: {key}")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
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
  scheduled = [f"{name} {loss.get(name)}" for name in ("temperature", "kd_alpha", "kd_weight",
                                                       "ce_weight", "alpha", "beta", "warmup")
               if isinstance(loss.get(name), str)]
  if scheduled:
    parts.append(f"({', '.join(scheduled)})")
  feats = loss.get("feature_losses") or ()
  if feats:
    parts.append("+ features (" + ", ".join(f"{dict(f)['kind']} {dict(f)['student_key']}"
                                           for f in feats) + ")")
  if loss.get("phases"):
    parts.append("in phases " + " / ".join(loss.phases))
  teacher = config.student.get("teacher", "stored")
  source = {"stored": "stored teacher logits", "online": "an online teacher"}.get(teacher, teacher)
  logits = config.get("teacher_logits")
  if teacher == "stored" and logits is not None and logits.get("mode") == "regions":
    source = (f"stored teacher logits of {int(logits.regions_per_image)} crop regions per "
              "image")
  extra = tuple(config.student.get("extra_teachers") or ())
  if extra:
    source = source.replace("an online teacher", "online teachers") + (
        f" of {len(extra) + 1} teachers (the mean of their probabilities)")
  return " ".join(parts) + f" from {source}"


def describe_run(config, source) -> str:
  """The report's title, from what actually ran: dataset, models and loss (not the config's
  name)."""
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
  """(the config's published reference, '') when it refers to this run, else ({}, why it is not
  shown).

  A reference says what it refers to in `applies_to`: any of dataset (a name or a list of names),
  num_classes, teacher, student, loss (the loss kind), perception, image_size. Every given field
  must match the effective run; a reference without `applies_to` is never shown, as it cannot be
  checked.
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
            "loss": str(config.student.loss.kind),
            "perception": bool(config.student.loss.get("perception")),
            "image_size": int(config.augment.image_size)}
  for key, want in applies.items():
    wanted = list(want) if isinstance(want, (list, tuple)) else [want]
    if actual.get(key) not in wanted:
      return {}, f"it refers to {key} {want!r}, this run has {actual.get(key)!r}"
  return ref, ""


def _training(info: Mapping[str, Any] | None) -> dict | None:
  """The val top-1 of the last and of the best checkpoint of a training stage (its stage marker),
  and which of the two it handed on; None for a stage that did not train."""
  if not info or not info.get("steps"):
    return None
  keep = ("top1", "top5")
  last, best = info.get("val"), info.get("best_val")
  return {"steps": int(info["steps"]), "handoff": info.get("handoff", "last"),
          "last_val": None if last is None else {"step": int(info["steps"]),
                                                 **{k: last[k] for k in keep}},
          "best_val": None if best is None else {"step": info.get("best_step"),
                                                 **{k: best[k] for k in keep}}}


def _training_text(role: str, t: dict) -> str:
  def one(v):
    return "—" if v is None else f"{_pct(v['top1'])} (step {v['step']})"
  return (f"{role}: last {one(t['last_val'])}, best {one(t['best_val'])}; handed on: "
          f"{'the best checkpoint' if t['handoff'] == 'best' else 'the last step'}")


def deployment_rows(exports) -> list[dict]:
  """The report's deployment table from the figures of jaxkd.export.export (one per file):
  format, quantize, file, size_bytes, the latency medians (ms, batch 1) of the file and of jaxkd
  (jitted), the val top-1 of both, the top-1 agreement and the largest probability difference
  between them, and the number of verification images."""
  rows = []
  for f in exports or ():
    latency, top1, parity = f.get("latency_ms") or {}, f.get("top1") or {}, f["parity"]
    rows.append({"format": f["format"], "quantize": f["quantize"], "role": f.get("role"),
                 "file": f"export/{f['file']}", "size_bytes": int(f["size_bytes"]),
                 "latency_ms": latency.get("exported_median"),
                 "jaxkd_latency_ms": latency.get("jaxkd_jit_median"),
                 "latency_runs": latency.get("runs"), "val_top1": top1.get("exported"),
                 "jaxkd_val_top1": top1.get("jaxkd"),
                 "top1_agreement": parity["top1_agreement"],
                 "max_abs_prob_diff": parity["max_abs_prob_diff"], "images": parity["images"]})
  return rows


def _ms(x) -> str:
  return "—" if x is None else f"{x:.2f}"


def _deployment_lines(rows: list[dict]) -> list[str]:
  if not rows:
    return []
  first = rows[0]
  lines = ["", f"## Deployment ({first['role']}; verified on {first['images']} val images)", "",
           "| format | quantisation | file | size (MB) | latency (ms): file / jaxkd jit | "
           "val top-1 (%): file / jaxkd | top-1 agreement (%) | max prob. diff. |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    quant = "float32" if r["quantize"] == "none" else r["quantize"]
    lines.append(f"| {r['format']} | {quant} | {r['file']} | {r['size_bytes'] / 1e6:.2f} | "
                 f"{_ms(r['latency_ms'])} / {_ms(r['jaxkd_latency_ms'])} | "
                 f"{_pct(r['val_top1'])} / {_pct(r['jaxkd_val_top1'])} | "
                 f"{_pct(r['top1_agreement'])} | {r['max_abs_prob_diff']:.2g} |")
  lines += ["", "Latency: median of batch-1 runs on the CPU, the file single-threaded (LiteRT / "
            "ONNX Runtime), jaxkd jitted on its first device; <workdir>/export/FILE.json holds "
            "the figures, class names and input preprocessing (docs/deploy.md)."]
  return lines


def write_report(config, workdir: pathlib.Path, *, source, results: Mapping[tuple[str, str], dict],
                 splits=None, data_splits=None,
                 training: Mapping[str, Mapping[str, Any]] | None = None,
                 exports=None) -> dict:
  """Writes report.json, report.md and plots/ into `workdir`; returns the report dict.

  `splits`: the evaluated splits in order (default config.evaluate.splits); a split the data does
  not have (an image folder without test/) is said so in the report. `data_splits`: the splits the
  data has (default train, val, test), for the image counts. `training`: per role, what its
  training stage recorded (its stage marker: steps, val, best_val, best_step, handoff); the row of
  a trained role gets `training` = {steps, handoff, last_val, best_val} ({step, top1, top5} each).
  `exports`: the figures of the exported files (jaxkd.export.export); report.json's `deployment`
  lists them (`deployment_rows`).
  """
  workdir = pathlib.Path(workdir)
  plots = workdir / "plots"
  plots.mkdir(exist_ok=True)
  image_size = int(config.augment.image_size)
  splits = list(splits if splits is not None else config.evaluate.splits)
  absent = [s for s in config.evaluate.splits if s not in splits]
  roles = [r for r in ("teacher", "student") if any(k[0] == r for k in results)]
  training = dict(training or {})
  rows = []
  for role in roles:
    stage = config[role]
    kwargs = model_kwargs(stage)
    cost = models.cost(stage.model, image_size=image_size, num_classes=source.num_classes,
                       xla=False, **kwargs)
    row = {"role": role, "model": stage.model, "model_kwargs": kwargs,
           "params": int(cost["params"]), "macs": float(cost["macs"]), "image_size": image_size}
    if role == "student":
      row["loss"] = stage.loss.to_dict()
    for split in splits:
      res = results.get((role, split))
      if res is not None:
        row[split] = {k: res[k] for k in SUMMARY_FIELDS}
        row[split]["per_class_accuracy"] = res["per_class_accuracy"]
    trained = _training(training.get(role))
    if trained is not None:
      row["training"] = trained
    rows.append(row)

  data_splits = [s for s in (data_splits or ("train", "val", "test")) if s not in absent]
  counts = {s: source.num_examples(s) for s in data_splits}
  skipped = [list(x) for x in getattr(source, "skipped_images", None) or []]
  converted = [list(x) for x in getattr(source, "converted_images", None) or []]
  title = describe_run(config, source)
  reference, why_not = reference_for_run(config, source)
  report = {"title": title, "config_name": config.get("name", ""),
            "dataset": {"name": source.name, "version": source.version,
                        "num_classes": source.num_classes, "splits": counts,
                        "absent_splits": absent, "skipped_images": skipped,
                        "converted_images": converted},
            "models": rows, "reference": reference}
  deployment = deployment_rows(exports)
  if deployment:
    report["deployment"] = deployment
  if why_not:
    report["reference_not_shown"] = why_not
  (workdir / "report.json").write_text(json.dumps(report, indent=2))

  count_text = " / ".join(f"{s} {n}" for s, n in counts.items())
  lines = [f"# {title}", "",
           f"Data: {source.name} {source.version}, {source.num_classes} classes; {count_text} "
           f"images; {image_size} px."]
  if absent:
    lines += ["", f"The data has no {' / '.join(absent)} split (no test/ folder): the results "
              f"below are on {' / '.join(splits)}, images held out from training."]
  if skipped:
    shown = ", ".join(f"{p} ({why})" for p, why in skipped[:20])
    more = f", and {len(skipped) - 20} more (report.json lists all)" if len(skipped) > 20 else ""
    lines += ["", f"{len(skipped)} image(s) could not be decoded and were left out "
              f"(data.skip_bad_images): {shown}{more}."]
  if converted:
    lines += ["", f"{len(converted)} image(s) in a format TensorFlow cannot decode were converted "
              "to PNG when the dataset was built (report.json lists them)."]
  lines += ["",
            "| model | role | parameters | MACs | "
            + " | ".join(f"{s} top-1 (%) | {s} top-5 (%)" for s in splits) + " |",
            "|---|---|---:|---:|" + "---:|---:|" * len(splits)]
  for row in rows:
    accs = " | ".join(f"{_pct(row.get(s, {}).get('top1'))} | {_pct(row.get(s, {}).get('top5'))}"
                      for s in splits)
    lines.append(f"| {row['model']} | {row['role']} | {row['params'] / 1e6:.2f} M | "
                 f"{row['macs'] / 1e9:.3f} G | {accs} |")
  trained = [(row["role"], row["training"]) for row in rows if "training" in row]
  if trained:
    lines += ["", "Val top-1 (%) during training, at the last step and at the best checkpoint:",
              ""] + [f"- {_training_text(role, t)}" for role, t in trained]
  lines += _deployment_lines(deployment)
  if reference:
    lines += ["", "Published reference (" + str(reference.get("source", "")) + "): " +
              ", ".join(f"{k} {v}" for k, v in reference.items()
                        if k not in ("source", "applies_to")) + "."]
  if plot_training_curves(workdir, roles, plots / "training_curves.png"):
    lines += ["", "![training curves](plots/training_curves.png)"]
  if plot_hyperparameters(workdir, roles, plots / "hyperparameters.png"):
    lines += ["", "![scheduled hyper-parameters](plots/hyperparameters.png)"]
  for role in roles:
    res = results.get((role, splits[-1]))
    if res is not None:
      name = f"confusion_{role}_{splits[-1]}.png"
      plot_confusion(res["confusion"], list(source.class_names),
                     f"{role} ({config[role].model}), {splits[-1]}", plots / name)
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
