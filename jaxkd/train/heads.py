"""Distillation heads: the modules a feature term trains with the student, kept out of the student.

Two feature terms of `jaxkd.train.step.FeatureLoss` carry trained modules of their own:

- 'fitnet': FitNets' regressor (`jaxkd.models.distill.HintRegressor`), a 1x1 convolution +
  BatchNorm from the student feature's channels to the teacher's, resized to the teacher's
  spatial size; the loss is the MSE between the regressed student feature and the teacher's
  (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).
- 'lstm': LSTM state matching (`jaxkd.models.distill.LSTMStateEncoder` on each side,
  `jaxkd.losses.lstm_state_loss`; KAKAKA, "An innovative image classification scheme based on
  LSTM knowledge distillation", 2025, in Chinese). The student's feature map is resized to the
  teacher's spatial size first, so both sides have the same number of row windows. The
  student-side encoder trains; the teacher-side encoder stays at its random initialisation
  ('frozen'): training it on this loss would let both sides collapse to one constant state.

They live in `TrainState.heads` ({'params', 'batch_stats', 'frozen', 'opt_state'}), are updated
by the same optimizer as the student (their own optimizer state), are checkpointed with it, and
are left out of `TrainState.variables()`: the evaluated, handed-on and exported model is the
student alone. Head variables are keyed by the term's name ('<kind>_<student_key>').
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxkd import losses
from jaxkd.models.distill import HintRegressor, LSTMStateEncoder
from jaxkd.train.state import TrainState

__all__ = ["add_heads", "head_loss", "feature_shapes", "count_parameters"]

PyTree = Any
_LSTM_CHANNELS, _LSTM_HIDDEN = 256, 512


def _lstm(f) -> LSTMStateEncoder:
  return LSTMStateEncoder(channels=f.channels or _LSTM_CHANNELS, hidden=f.hidden or _LSTM_HIDDEN)


def feature_shapes(model, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of `model`'s features (`return_features=True`) for one image, without compute."""
  def init(x):
    key = jax.random.key(0)
    (_, feats), _ = model.init_with_output({"params": key, "dropout": key}, x, train=False,
                                           return_features=True)
    return feats
  return jax.eval_shape(init, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def _feature(shapes: Mapping[str, Any], key: str, side: str, model_name: str):
  if key not in shapes:
    raise ValueError(f"{side} {model_name} has no feature {key!r}; its features are "
                     f"{sorted(shapes)}")
  return shapes[key]


def add_heads(state: TrainState, loss_config, model, teacher_model, *, image_size: int,
              rng: jax.Array, tx: optax.GradientTransformation) -> TrainState:
  """`state` with the heads of `loss_config`'s 'fitnet' / 'lstm' terms initialised (from `rng`),
  before `replicate`; unchanged when there are none. ValueError when a feature key is not one of
  the models' features (the message lists them)."""
  terms = loss_config.head_losses
  if not terms:
    return state
  s_shapes = feature_shapes(model, image_size)
  t_shapes = feature_shapes(teacher_model, image_size)
  params, stats, frozen = {}, {}, {}
  for i, f in enumerate(terms):
    fs = _feature(s_shapes, f.student_key, "student", type(model).__name__)
    ft = _feature(t_shapes, f.teacher_key or f.student_key, "teacher",
                  type(teacher_model).__name__)
    key_s, key_t = jax.random.split(jax.random.fold_in(rng, i))
    if f.kind == "fitnet":
      variables = HintRegressor(features=ft.shape[-1]).init(
          key_s, jnp.zeros(fs.shape, jnp.float32), train=False, target_hw=tuple(ft.shape[1:3]))
      params[f.name] = variables["params"]
      stats[f.name] = variables["batch_stats"]
    else:
      student_in = jnp.zeros(ft.shape[:3] + fs.shape[3:], jnp.float32)  # resized to the teacher's
      params[f.name] = _lstm(f).init(key_s, student_in)["params"]
      frozen[f.name] = _lstm(f).init(key_t, jnp.zeros(ft.shape, jnp.float32))["params"]
  heads = {"params": params, "batch_stats": stats, "frozen": frozen,
           "opt_state": tx.init(params)}
  return state.replace(heads=jax.tree.map(jnp.asarray, heads))


def head_loss(f, head_params: PyTree, heads: PyTree, student_feature: jax.Array,
              teacher_feature: jax.Array, *, weights: jax.Array | None = None
              ) -> tuple[jax.Array, PyTree | None]:
  """The value of head term `f` in training mode, and its new BatchNorm statistics (or None).

  head_params: the trained heads' parameters (differentiated); heads: `TrainState.heads`
  (its 'batch_stats' and 'frozen' entries are read).
  """
  teacher_feature = jax.lax.stop_gradient(teacher_feature.astype(jnp.float32))
  if f.kind == "fitnet":
    variables = {"params": head_params[f.name], "batch_stats": heads["batch_stats"][f.name]}
    regressed, mutated = HintRegressor(features=teacher_feature.shape[-1]).apply(
        variables, student_feature, train=True, target_hw=tuple(teacher_feature.shape[1:3]),
        mutable=["batch_stats"])
    return losses.hint_loss(regressed, teacher_feature, weights=weights), mutated["batch_stats"]
  if f.kind != "lstm":
    raise ValueError(f"feature term {f.name!r} has no head (kinds with heads: fitnet, lstm)")
  x = student_feature.astype(jnp.float32)
  if x.shape[1:3] != teacher_feature.shape[1:3]:
    x = jax.image.resize(x, x.shape[:1] + teacher_feature.shape[1:3] + x.shape[3:],
                         method="bilinear")
  h_s, c_s = _lstm(f).apply({"params": head_params[f.name]}, x)
  h_t, c_t = _lstm(f).apply({"params": jax.lax.stop_gradient(heads["frozen"][f.name])},
                            teacher_feature)
  return losses.lstm_state_loss(h_s, c_s, h_t, c_t, weights=weights), None


def count_parameters(state: TrainState) -> dict[str, int]:
  """Parameters of the heads, by term: {'trained': n, 'frozen': m} summed over the terms."""
  def size(tree):
    return int(sum(x.size for x in jax.tree.leaves(tree)))
  if not state.heads:
    return {"trained": 0, "frozen": 0}
  return {"trained": size(state.heads["params"]), "frozen": size(state.heads["frozen"])}
