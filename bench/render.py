"""The markdown report of ``bench/run.py``: the JAX and PyTorch tables, the report's header (date,
machine, backend, versions, command, settings) and notes (``render``), appended to a file
(``append_report``). Standard library only."""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform

from bench.machine import GLIBC_NO_RELEASE, cpu_model, peak_bf16_tflops
from bench.sections import STUDENT_MODEL, TEACHER_MODEL


def _fmt(v: float | None, spec: str = ".1f", missing: str = "n/a") -> str:
  return missing if v is None else format(v, spec)


def jax_table(rows: list[dict], peak: float | None) -> str:
  """The JAX model steps: one line per row of `timing.row`; MFU against `peak` TFLOP/s."""
  lines = ["| model | step | loss | params | compile s | ms/step | spread | images/s | vs CE | "
           "loss cost vs CE | GFLOP/image | achieved TFLOP/s | MFU | peak device MiB | "
           "peak RSS MiB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    vs_ce = loss_cost = ""
    if r["role"] == "student":
      vs_ce = "—" if r["key"] == "ce" else (f"{100.0 * r['vs_ce']:+.1f}%" if "vs_ce" in r else "")
      if "loss_cost" in r:
        loss_cost = "—" if r["key"] == "ce" else f"{100.0 * r['loss_cost']:+.2f}%"
    mfu = (f"{100.0 * r['achieved_tflops'] / peak:.2g}%" if peak and r["dtype"] == "bfloat16"
           else "—")
    spread = f"{100.0 * r['spread']:.0f}%" if r["repeats"] > 1 else "—"
    lines.append(
        f"| {r['model']} | {r['step']} | {r['loss']} | {r['params']:,} | {r['compile_s']:.1f} | "
        f"{r['step_ms']:.1f} | {spread} | {r['images_per_s']:.1f} | {vs_ce} | {loss_cost} | "
        f"{r['flops_per_image'] / 1e9:.2f} | {r['achieved_tflops']:.3g} | {mfu} | "
        f"{_fmt(r['peak_device_mib'], '.0f')} | {r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


_TORCH_MATCH = {"student_kd": (STUDENT_MODEL, "train", "kd"),
                "teacher_infer": (TEACHER_MODEL, "inference", "infer"),
                "teacher_train": (TEACHER_MODEL, "train", "ce")}
_TORCH_LABEL = {"student_kd": "MobileNetV3-Large + ECA, KD train step",
                "teacher_infer": "ResNet-50 inference", "teacher_train": "ResNet-50 CE train step"}


def torch_table(torch_out: dict, jax_rows: list[dict]) -> str:
  """The PyTorch rows of bench/torch_baseline.py beside the matching JAX rows (JAX / PyTorch)."""
  by_key = {(r["model"], r["step"], r["key"]): r for r in jax_rows}
  lines = ["| step | params (torch) | PyTorch ms/step | spread | PyTorch images/s | JAX images/s | "
           "JAX / PyTorch | PyTorch peak device MiB | PyTorch peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in torch_out["rows"]:
    j = by_key.get(_TORCH_MATCH[r["row"]])
    jax_ips = f"{j['images_per_s']:.1f}" if j else "not run"
    ratio = f"{j['images_per_s'] / r['images_per_s']:.2f}x" if j else "—"
    spread = f"{100.0 * r['spread']:.0f}%" if r["repeats"] > 1 else "—"
    lines.append(f"| {_TORCH_LABEL[r['row']]} | {r['params']:,} | {r['step_ms']:.1f} | {spread} | "
                 f"{r['images_per_s']:.1f} | {jax_ips} | {ratio} | "
                 f"{_fmt(r['peak_device_mib'], '.0f')} | {r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


def generic_table(rows: list[dict]) -> str:
  """A markdown table of any list of dicts (columns: every key, in order of appearance)."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def render(args: argparse.Namespace, info: dict, results: dict, notes: list[str], command: str,
           started: datetime.datetime) -> str:
  """The report of one run: header, the tables of the sections in `results`, and `notes`."""
  backend = info["backend"]
  accel = "none" if backend == "cpu" else f"{info['device_kind']} x {info['device_count']}"
  label = args.device_label or (info["device_kind"] if backend != "cpu"
                                else cpu_model().split(" (")[0])
  versions = {"python": platform.python_version(), **info["versions"]}
  if "input" in results:
    versions["tensorflow"] = results["input"].get("tensorflow")
  torch_out = results.get("torch")
  if torch_out and "rows" in torch_out:
    versions["torch"] = torch_out["torch"]
    versions["torchvision"] = torch_out["torchvision"].split(" model definitions")[0].split(
        " (")[0].replace("torchvision ", "")
  peak = peak_bf16_tflops(info["device_kind"]) if backend != "cpu" else None
  malloc = ("default" if args.malloc == "default"
            else f"no-release (GLIBC_TUNABLES={GLIBC_NO_RELEASE})")
  out = [f"## {started:%Y-%m-%d %H:%M} UTC — {label}{' (--quick)' if args.quick else ''}", "",
         f"- command: `{command}`",
         f"- machine: CPU {cpu_model()}; accelerator: {accel}",
         f"- JAX backend: {backend}, {info['device_count']} device(s) ({info['device_kind']}); "
         "data parallel over all devices",
         "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
         f"- settings: global batch {args.batch_size}, {args.image_size} px, {args.num_classes} "
         f"classes, compute dtype {args.dtype} (params float32), synthetic device-resident data, "
         f"{args.warmup} warm-up step(s), then {args.repeats} repeat(s) of {args.steps} timed "
         "steps with one block_until_ready after the last step of each (median repeat reported; "
         "spread = (max - min) / median); the losses of one model run interleaved, repeat by "
         "repeat, and 'vs CE' is the median over repeats of the paired step-time ratio to CE; "
         "Adam (L2 1e-4) + one-cycle",
         "- glibc malloc of every benchmarked process (JAX and PyTorch): " + malloc,
         ""]
  jax_rows = (results.get("student", {}).get("rows", [])
              + results.get("teacher", {}).get("rows", []))
  if jax_rows:
    mfu_note = (f"MFU = achieved / {peak:.0f} TFLOP/s dense bf16 peak of {info['device_kind']}."
                if peak else "MFU only for bfloat16 compute on a device with a known peak "
                "(bench/machine.py PEAK_BF16_TFLOPS).")
    out += ["### JAX model steps", "", jax_table(jax_rows, peak), "",
            "GFLOP/image: analytic conv + dense MACs x 2 (inference) or x 6 (training: forward + "
            "two backward products). " + mfu_note +
            " Peak memory: per section process, so a row shows the peak so far within its "
            "model's section. vs CE: median over repeats of the paired step-time ratio to CE "
            "(whole step, so machine noise included). Loss cost vs CE: the same training step "
            "with the network cut to one Dense layer over pooled pixels (50 steps per repeat, "
            "same losses, batch and optimizer), its extra ms over CE as a share of the full CE "
            "step: the losses' own cost.", ""]
  if torch_out:
    if "rows" in torch_out:
      eca = next((r["eca_channels"] for r in torch_out["rows"] if "eca_channels" in r), "n/a")
      out += ["### PyTorch eager baseline", "", torch_table(torch_out, jax_rows), "",
              f"PyTorch {torch_out['torch']} eager ({torch_out['python']}, Python "
              f"{torch_out['python_version']}, {torch_out['chosen']}), "
              f"{torch_out['torchvision']}; device {torch_out['device']}, precision "
              f"{torch_out['precision']}. The student is torchvision's mobilenet_v3_large (SE "
              "inside the blocks) with an ECA module added in bench/torch_baseline.py after each "
              f"stage (channels {eca}), as jaxkd's mobilenet_v3_large_eca; KD loss 0.5 CE + "
              "0.5 T^2 KL (T 4); Adam + OneCycleLR.", ""]
    else:
      notes.append(torch_out["skipped"])
  if "input" in results:
    out += ["### Input pipeline (tf.data preprocessing)", "", results["input"]["markdown"], "",
            results["input"]["note"] + ".", ""]
  if "depthwise" in results:
    out += ["### Depthwise convolution (bench/bench_depthwise.py)", "",
            results["depthwise"]["markdown"], ""]
  if notes:
    out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(out)


def append_report(path: pathlib.Path, text: str) -> None:
  """Appends `text` to the markdown file `path` (created with a title when new or empty)."""
  new = not path.exists() or path.stat().st_size == 0
  with open(path, "a") as f:
    if new:
      f.write("# jaxkd benchmarks\n\nEach section is appended by `python bench/run.py` "
              "(see bench/README.md).\n\n")
    f.write(text.rstrip("\n") + "\n\n")
