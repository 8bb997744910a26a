"""PyTorch eager baseline for `bench/run.py`: the same model steps as the JAX rows, in plain
PyTorch.

Standalone on purpose (imports neither jax nor jaxkd): `bench/run.py` runs it as a subprocess with
whichever interpreter has PyTorch (`--torch-python` or the JAXKD_TORCH_PYTHON environment
variable), so the jaxkd environment never needs torch.

Rows (synthetic data on the device, fixed batch, warm-up steps first, then R repeats of N timed
steps with one synchronisation after the last step of each; the median repeat is reported):

* ``student_kd``: MobileNetV3-Large (torchvision's model code) with ECA, the jaxkd student
  ``mobilenet_v3_large_eca``: torchvision's SE kept inside the blocks and one ECA module
  (Wang et al., CVPR 2020: x * sigmoid(conv1d_k(mean_hw(x))), k = odd(|log2 C + 1| / 2), no bias)
  appended after the last layer of each of the five stages -- added here because torchvision has
  no ECA. One training step of KD from stored logits,
  L = 0.5 CE + 0.5 T^2 KL(softmax(t/T) || softmax(s/T)), T = 4 (Hinton, Vinyals and Dean,
  "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015; the loss of the
  Food-101 KD + ECA manuscript, "A lightweight food image classification model based on knowledge
  distillation and the ECA attention mechanism", in Chinese, which names no authors, venue or
  year), Adam (L2 weight decay 1e-4) + OneCycleLR, as configs/food101_eca.py.
* ``teacher_infer``: torchvision ResNet-50 forward in eval mode under ``torch.inference_mode``
  (the teacher-logit precompute).
* ``teacher_train``: ResNet-50 training step, cross-entropy, Adam (weight decay 1e-4) +
  OneCycleLR.

Precision: float32 on CPU (``torch.set_num_threads`` = cores available); on CUDA
``torch.autocast(bfloat16)`` with channels_last tensors and cudnn.benchmark (the fair fast eager
setting).

torchvision: imported normally when it loads; when its compiled extension does not match the
installed torch (e.g. a CUDA torchvision wheel beside a CPU torch), only its pure-Python model
definitions (``torchvision.models.mobilenetv3`` / ``resnet`` and what they import) are loaded,
without running the package ``__init__`` that needs the extension; the JSON says which.

    python bench/torch_baseline.py --batch-size 32 --image-size 224 --steps 3 --json-out rows.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROWS = ("student_kd", "teacher_infer", "teacher_train")


def cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_model_builders() -> tuple[Callable[..., nn.Module], Callable[..., nn.Module], str]:
  """(mobilenet_v3_large, resnet50, description of how torchvision was loaded)."""
  try:
    import torchvision
    from torchvision.models import mobilenet_v3_large, resnet50
    return (mobilenet_v3_large, resnet50,
            f"torchvision {torchvision.__version__} (imported normally)")
  except (ImportError, OSError, RuntimeError) as e:
    first_error = f"{type(e).__name__}: {e}"
  # The package __init__ failed (its compiled ops do not load against this torch). Load only the
  # model definition files: stub the packages torchvision, torchvision.models and torchvision.ops
  # so that their __init__ (which registers the compiled ops) is not executed.
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"torchvision failed to import ({first_error}) and its files were not found")
  root = list(spec.submodule_search_locations)[0]
  for name in ("torchvision", "torchvision.models", "torchvision.ops"):
    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(root, *name.split(".")[1:])]
    sys.modules[name] = stub
  from torchvision.models.mobilenetv3 import mobilenet_v3_large
  from torchvision.models.resnet import resnet50
  try:
    version = importlib.metadata.version("torchvision")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown version"
  return mobilenet_v3_large, resnet50, (
      f"torchvision {version} model definitions only, from {root} (the package did not import: "
      f"{first_error.splitlines()[0][:160]})")


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA's adaptive kernel size: t = int(|log2(C) + b| / gamma); k = t if t is odd else t + 1."""
  t = int(abs(math.log2(channels) + b) / gamma)
  return t if t % 2 == 1 else t + 1


class ECA(nn.Module):
  """Efficient Channel Attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep
  Convolutional Neural Networks", CVPR 2020) on NCHW: x * sigmoid(conv1d_k(mean_hw(x)))."""

  def __init__(self, channels: int):
    super().__init__()
    k = eca_kernel_size(channels)
    self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = x.mean(dim=(2, 3))                      # [B, C]
    y = self.conv(y[:, None, :])[:, 0, :]        # conv over the channel axis
    return x * torch.sigmoid(y)[:, :, None, None].to(x.dtype)


def add_stage_eca(model: nn.Module) -> tuple[nn.Module, list[int]]:
  """Appends ECA after the last layer of each resolution stage of a torchvision MobileNetV3.

  A stage ends at features[i] when features[i + 1] changes the resolution (or i is the last layer),
  as in jaxkd's `mobilenet_v3_large_eca`. Returns the model and the channels of each ECA.
  """
  sizes = []
  x = torch.zeros(1, 3, 64, 64)
  model.eval()
  with torch.no_grad():
    for layer in model.features:
      x = layer(x)
      sizes.append((x.shape[1], x.shape[2]))
  layers, channels = [], []
  for i, layer in enumerate(model.features):
    layers.append(layer)
    if i + 1 == len(sizes) or sizes[i + 1][1] != sizes[i][1]:
      layers.append(ECA(sizes[i][0]))
      channels.append(sizes[i][0])
  model.features = nn.Sequential(*layers)
  return model, channels


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(*, rows: Sequence[str] = ROWS, batch_size: int = 32, image_size: int = 224,
        num_classes: int = 101, steps: int = 3, warmup: int = 1, repeats: int = 1,
        precision: str = "auto", threads: int | None = None,
        verbose: bool = True) -> dict[str, Any]:
  """Times the rows; returns {'rows': [...], 'torch': version, ...} (see the module docstring)."""
  unknown = set(rows) - set(ROWS)
  if unknown:
    raise ValueError(f"unknown torch rows {sorted(unknown)}; choose from {ROWS}")
  if steps < 1 or repeats < 1:
    raise ValueError(f"steps and repeats must be >= 1, got steps={steps}, repeats={repeats}")
  mobilenet_v3_large, resnet50, tv_source = load_model_builders()
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if precision == "auto":
    precision = "bfloat16" if cuda else "float32"
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
  amp = precision == "bfloat16"
  threads = threads or cores()
  if not cuda:
    torch.set_num_threads(threads)
  else:
    torch.backends.cudnn.benchmark = True
  memory_format = torch.channels_last if cuda else torch.contiguous_format
  torch.manual_seed(0)

  images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, num_classes, (batch_size,), device=device)
  teacher_logits = 3.0 * torch.randn(batch_size, num_classes, device=device)

  def sync():
    if cuda:
      torch.cuda.synchronize()

  def timed(step_fn: Callable[[], Any]) -> tuple[list[float], Any]:
    """Seconds per repeat of `steps` calls, synchronised once after the last call of each repeat."""
    out = None
    for _ in range(warmup):
      out = step_fn()
    sync()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        out = step_fn()
      sync()
      times.append(time.perf_counter() - start)
    return times, out

  def build(kind: str) -> nn.Module:
    if kind == "student":
      model, eca_channels = add_stage_eca(mobilenet_v3_large(num_classes=num_classes))
      model.eca_channels = eca_channels
    else:
      model = resnet50(num_classes=num_classes)
    return model.to(device=device, memory_format=memory_format)

  def train_step_fn(model: nn.Module, lr: float, kd: bool) -> Callable[[], torch.Tensor]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=10_000)
    temperature = 4.0

    def step() -> torch.Tensor:
      opt.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
      logits = logits.float()
      loss = F.cross_entropy(logits, labels)
      if kd:
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                      F.log_softmax(teacher_logits / temperature, dim=-1),
                      reduction="batchmean", log_target=True)
        loss = 0.5 * loss + 0.5 * temperature ** 2 * kl
      loss.backward()
      opt.step()
      sched.step()
      return loss.detach()
    return step

  def infer_step_fn(model: nn.Module) -> Callable[[], torch.Tensor]:
    model.eval()

    def step() -> torch.Tensor:
      with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model(images).float()
    return step

  results = []
  for row in rows:
    model = build("student" if row == "student_kd" else "teacher")
    params = sum(p.numel() for p in model.parameters())
    if row == "student_kd":
      fn = train_step_fn(model, 1e-3, kd=True)
    elif row == "teacher_train":
      fn = train_step_fn(model, 3e-4, kd=False)
    else:
      fn = infer_step_fn(model)
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    times, out = timed(fn)
    seconds = statistics.median(times)
    value = float(out.float().mean())
    if not math.isfinite(value):
      raise FloatingPointError(f"torch row {row}: non-finite output {value}")
    result = {"row": row, "params": params, "steps": steps, "repeats": repeats, "seconds": seconds,
              "repeat_seconds": times, "spread": (max(times) - min(times)) / seconds,
              "step_ms": 1e3 * seconds / steps, "images_per_s": batch_size * steps / seconds,
              "peak_rss_mib": _rss_mib(),
              "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    if row == "student_kd":
      result["eca_channels"] = model.eca_channels
    results.append(result)
    if verbose:
      print(f"  torch {row:14s} {result['step_ms']:9.1f} ms/step "
            f"{result['images_per_s']:9.1f} img/s", flush=True)
    del model, fn

  return {
      "rows": results, "torch": torch.__version__, "torchvision": tv_source,
      "python": sys.executable,
      "python_version": sys.version.split()[0],
      "device": torch.cuda.get_device_name(0) if cuda else "cpu",
      "precision": (f"{precision}"
                    + (" autocast + channels_last, cudnn.benchmark" if cuda and amp else "")
                    + ("" if cuda else f", {threads} threads")),
      "threads": None if cuda else threads,
      "batch_size": batch_size, "image_size": image_size, "num_classes": num_classes,
      "warmup": warmup, "steps": steps, "repeats": repeats,
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--num-classes", type=int, default=101)
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  parser.add_argument("--repeats", type=int, default=1,
                      help="timed repeats; the median is reported")
  parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                      help="auto: bfloat16 autocast on CUDA, float32 on CPU")
  parser.add_argument("--threads", type=int, default=None,
                      help="CPU threads (default: cores available)")
  parser.add_argument("--json-out", default=None, help="write the result as JSON here")
  args = parser.parse_args(argv)
  result = run(rows=[r for r in args.rows.split(",") if r], batch_size=args.batch_size,
               image_size=args.image_size, num_classes=args.num_classes, steps=args.steps,
               warmup=args.warmup, repeats=args.repeats, precision=args.precision,
               threads=args.threads)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=1)
  else:
    print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
