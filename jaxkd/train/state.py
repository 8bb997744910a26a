"""The training state: a pure pytree of arrays (no functions), so it jits, shards and checkpoints.

The model and the optax transformation are not stored in the state: the train
step closes over them (`jaxkd.train.step.make_train_step`). Everything here is
float32 (parameters, BatchNorm statistics, optimizer state) whatever compute
dtype the model runs in; the PRNG key is a raw uint32 key (`jax.random.key_data`
layout) so Orbax saves and restores it like any other array.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["TrainState", "create_train_state", "with_variables", "replicate", "state_sharding",
           "abstract_state"]

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar, the number of optimizer updates applied so far.
  params / batch_stats: the model's 'params' and 'batch_stats' collections (float32;
    batch_stats is an empty dict for models without BatchNorm).
  opt_state: the optax state for `params` (float32).
  rng: uint32 [2] raw PRNG key; the step's dropout/augmentation key is
    fold_in(rng, step), so the key never needs updating and a resumed run draws
    the same numbers as an uninterrupted one.
  heads: the distillation-only modules that train with the model but are not part
    of it (FitNets regressors, LSTM encoders; `jaxkd.train.heads`): {} when the loss
    has none, else {'params', 'batch_stats', 'frozen', 'opt_state'} ('frozen': the
    teacher-side encoders, never updated). `variables()` leaves them out, so the
    evaluated, handed-on and exported model is the student alone.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  heads: PyTree = flax.struct.field(default_factory=dict)

  def variables(self) -> dict[str, PyTree]:
    """The variables dict for `model.apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def _to_f32(tree: PyTree) -> PyTree:
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


def _raw_key(rng: jax.Array) -> jax.Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def create_train_state(model: flax.linen.Module, rng: jax.Array, input_shape: Sequence[int],
                       tx: optax.GradientTransformation, *,
                       mesh: Mesh | None = None) -> TrainState:
  """Initialises `model` on zeros of `input_shape` (e.g. (1, 32, 32, 3)) and `tx` on its params.

  `rng` (a raw or typed key) is split into the parameter-init key, the dropout
  init key and the state's own key. Floating parameters and statistics are cast
  to float32. With `mesh`, the state is placed replicated on every device of the
  mesh (the layout the data-parallel train step expects).
  """
  rng = _raw_key(rng)
  params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  # Eager (op-by-op) on purpose: the per-op executables are cached across calls, whereas a
  # jitted init is a new program for every model and XLA:CPU takes seconds to compile the
  # threefry random-number code inside it. The state is then copied to the mesh once.
  variables = model.init({"params": params_rng, "dropout": dropout_rng},
                         jnp.zeros(tuple(input_shape), jnp.float32), train=False)
  variables = flax.core.unfreeze(variables)
  unknown = set(variables) - {"params", "batch_stats"}
  if unknown:
    raise ValueError(f"model has variable collections {sorted(unknown)} besides 'params' and "
                     "'batch_stats'; TrainState only carries those two")
  params = _to_f32(variables["params"])
  batch_stats = _to_f32(variables.get("batch_stats", {}))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=_to_f32(tx.init(params)), rng=state_rng)
  if mesh is not None:
    state = replicate(state, mesh)
  return state


def with_variables(state: TrainState, variables: Mapping[str, PyTree],
                   tx: optax.GradientTransformation) -> TrainState:
  """`state` with the model `variables` instead of its own (e.g. pretrained weights).

  'params' and 'batch_stats' (if any) are cast to float32, the optimizer state is
  initialised afresh on the new parameters (`tx.init`), the step and the RNG key are
  kept, and so are the distillation heads. Call it before `replicate`, like
  `create_train_state` without a mesh.
  """
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables["params"])
  stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables.get("batch_stats", {}))
  return state.replace(params=params, batch_stats=stats, opt_state=tx.init(params))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` fully replicated over `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def state_sharding(mesh: Mesh, state: PyTree) -> PyTree:
  """A pytree of replicated NamedShardings with the structure of `state` (data parallelism)."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), state)


def abstract_state(state: PyTree, mesh: Mesh | None = None) -> PyTree:
  """jax.ShapeDtypeStruct leaves carrying shardings: the restore target for Orbax.

  With `mesh`, every leaf is replicated on it; without, each leaf keeps the
  sharding of the concrete array in `state`.
  """
  def leaf(x):
    sharding = NamedSharding(mesh, P()) if mesh is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)
  return jax.tree.map(leaf, state)
