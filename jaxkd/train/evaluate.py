"""Evaluation over one pass of a split: top-1, top-5, per-class accuracy, confusion matrix.

Counts are exact: the eval pipeline pads the last batch with zero-weight rows,
which the eval step zeroes out, so every example counts exactly once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

__all__ = ["evaluate", "accumulate"]


def _to_host(tree: Any) -> Any:
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def accumulate(outputs: Iterable[Mapping[str, Any]], num_classes: int) -> dict[str, Any]:
  """Aggregates per-example eval outputs (host numpy: logits, label, weight, correct5, ce).

  Returns top1, top5, loss (mean CE), num_examples, per_class_accuracy [C]
  (NaN for a class with no example) and confusion [C, C] (rows: true class,
  columns: predicted), all over rows with weight > 0.
  """
  confusion = np.zeros((num_classes, num_classes), np.int64)
  correct5 = 0.0
  ce = 0.0
  n = 0
  for out in outputs:
    real = np.asarray(out["weight"]) > 0
    labels = np.asarray(out["label"])[real]
    pred = np.asarray(out["logits"])[real].argmax(-1)
    np.add.at(confusion, (labels, pred), 1)
    correct5 += float(np.sum(np.asarray(out["correct5"])[real]))
    ce += float(np.sum(np.asarray(out["ce"])[real]))
    n += int(real.sum())
  if n == 0:
    raise ValueError("evaluation saw no example with weight > 0")
  per_class_total = confusion.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.diag(confusion) / per_class_total
  return {"top1": float(np.trace(confusion) / n), "top5": correct5 / n, "loss": ce / n,
          "num_examples": n, "per_class_accuracy": per_class.tolist(),
          "confusion": confusion.tolist()}


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[Mapping[str, Any]], *,
             num_classes: int, total: int | None = None, desc: str = "eval",
             progress: bool = True) -> dict[str, Any]:
  """Runs `eval_step(variables, batch)` (from jaxkd.train.step.make_eval_step) over `batches`.

  Results are fetched to the host one batch behind the device, so the next batch
  is dispatched before the previous one is read back.
  """
  keep = ("logits", "label", "weight", "correct5", "ce")

  def outputs():
    pending = None
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                      disable=not progress or jax.process_index() != 0):
      out = eval_step(variables, batch)
      out = {k: out[k] for k in keep}
      if pending is not None:
        yield _to_host(pending)
      pending = out
    if pending is not None:
      yield _to_host(pending)

  return accumulate(outputs(), num_classes)
