"""Feeding batches to JAX: deterministic, resumable, host-sharded tf.data pipelines.

Training stream (``train_batches``): one global order, whatever the number of hosts ``P``:

* global epoch ``e`` = the split's records shuffled with seed ``f(seed, e)`` (a full
  permutation for image-folder sources, whose records are file names; a
  ``shuffle_buffer``-record window for TFDS, whose files TFDS already wrote in a
  hashed-key, i.e. class-mixed, order); epochs are concatenated forever (repeat) and cut
  into global batches of ``B`` (batches may straddle an epoch boundary, as with
  repeat-then-batch);
* host ``h`` takes rows ``[h B/P, (h+1) B/P)`` of every global batch, the rows that
  ``jax.make_array_from_process_local_data`` places on its devices, and decodes only those
  (every host reads the split's records; with several hosts each reads them all, and decodes
  ``1/P`` of them). So global batch ``k`` is the same set of examples, in the same order, for
  any number of hosts and devices: a run resumes exactly on another process or device count;
* augmentation randomness is stateless, keyed by ``(seed, hash(key), epoch)`` per
  example, so it does not depend on threads, hosts or where the stream was (re)started;
  MixUp/CutMix pairs examples within a host's rows, keyed by ``(seed, h, step)`` (the one
  part of the stream that depends on ``P``);
* ``start_step=N`` resumes exactly: the stream position is ``N * B`` examples, i.e. epoch
  ``N B // n`` and offset ``N B % n``; the skipped records are never decoded.
  ``train_batches(..., start_step=N)`` yields the same batches as the uninterrupted
  stream from step N.

Evaluation stream (``eval_batches``): one pass, every example exactly once.
All hosts read the split's records in the same order, host ``h`` keeps elements
``h, h+P, ...`` (before decoding), and pads its tail with zero-weight examples
(``'weight'`` 0, ``'key'`` b'', zero image, label 0) to ``ceil(N / B)`` local
batches, so hosts stay in lock-step and a metric ``sum(w * m) / sum(w)`` counts each
example once. ``start_batch=k`` starts the pass at batch k; the records of the
skipped batches are dropped before they are loaded or decoded.

Batches are dicts of numpy arrays ``{'image', 'label', 'key', 'weight'}`` (+
``'teacher_logits'`` [B, C] when ``teacher_lookup`` is given, + ``'mix_label'``,
``'mix_lambda'``, ``'soft_label'`` with MixUp/CutMix, + ``'mix_teacher_logits'``, the
partner's stored logits, with both; a store's lookup is
``jaxkd.data.teacher_logits.tf_lookup(store)``). The teacher logits are joined by key before
mixing and stay each example's own row; ``jaxkd.train.step`` mixes the teacher's
probabilities with ``mix_lambda``. With ``augment.color_on_device`` a training batch's 'image'
is uint8 before the colour jitter and the normalisation, and 'color_jitter' [B, 4] holds each
example's jitter factors (``jaxkd.train.color`` finishes the images in the train step). With
``mesh=...`` the numeric
fields are global ``jax.Array``s sharded along the mesh's 'data' axis (``to_device``);
'key' (strings) stays a host-local numpy array.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from jaxkd.data import augment as augment_lib
from jaxkd.data import regions as regions_lib
from jaxkd.data import splits as splits_lib
from jaxkd.data.sources import Source

TeacherLookup = Callable[[tf.Tensor], tf.Tensor]  # keys tf.string [B] -> float32 logits [B, C]
_NEVER = 2**62  # "forever" for the epoch counter
_MIX = 1_000_003


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
  return pi, pc


def local_batch_size(global_batch_size: int, *, num_devices: int | None = None,
                     process_count: int | None = None) -> int:
  """Per-host batch size; the global batch must split evenly over devices and hosts."""
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not a positive multiple of the {num_devices} "
        f"devices of the data axis; use e.g. "
        f"{max(1, round(global_batch_size / num_devices)) * num_devices}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  return global_batch_size // process_count


def _options(num_parallel_calls: int | None) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = num_parallel_calls is None
  return opts


def _npc(num_parallel_calls: int | None) -> int:
  return tf.data.AUTOTUNE if num_parallel_calls is None else int(num_parallel_calls)


def _mesh_devices(mesh: jax.sharding.Mesh | None, axis: str) -> int | None:
  if mesh is None:
    return None
  if axis not in mesh.shape:
    raise ValueError(f"mesh has no {axis!r} axis (axes: {tuple(mesh.shape)}); batches are sharded "
                     f"along {axis!r}")
  return int(mesh.shape[axis])


# ----------------------------------------------------------------------------- train


def _join_teacher(batch: dict[str, tf.Tensor], teacher_lookup: TeacherLookup | None, local: int,
                  num_classes: int) -> dict[str, tf.Tensor]:
  """Adds the stored 'teacher_logits', looked up by 'teacher_key' (a region's row) when the batch
  has one, else by 'key'; 'teacher_key' does not leave the pipeline."""
  out = {k: v for k, v in batch.items() if k != "teacher_key"}
  if teacher_lookup is None:
    return out
  logits = tf.cast(teacher_lookup(batch.get("teacher_key", batch["key"])), tf.float32)
  # [B, C] for one teacher, [B, K, C] for K teachers (`teacher_logits.stacked_lookup`).
  logits = tf.ensure_shape(logits, [local] + [None] * (logits.shape.rank - 2) + [num_classes])
  return {**out, "teacher_logits": logits}


def train_dataset(source: Source, split: str = "train", *, global_batch_size: int,
                  augment: augment_lib.AugmentConfig | Mapping[str, Any] | None = None,
                  image_size: int | None = None, seed: int = 0, start_step: int = 0,
                  shuffle_buffer: int = 10_000, num_parallel_calls: int | None = None,
                  prefetch: int = 2, teacher_lookup: TeacherLookup | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_devices: int | None = None,
                  regions: regions_lib.RegionSpec | None = None) -> tf.data.Dataset:
  """The infinite, host-local training ``tf.data.Dataset`` of local batches (see module doc).

  Args:
    source: a ``Source`` (``get_source(...)``).
    split: 'train' (default), 'trainval' or 'val'.
    global_batch_size: batch over all hosts; must divide by the device count.
    augment: ``AugmentConfig`` or a mapping of its keys.
    image_size: overrides ``augment.image_size``.
    seed: seeds the shuffles and all augmentation randomness.
    start_step: first global step of the stream (resume point).
    shuffle_buffer: shuffle buffer in records (image-folder sources shuffle whole epochs).
    num_parallel_calls: parallelism of decode/augment (None = AUTOTUNE).
    prefetch: batches prefetched by tf.data.
    teacher_lookup: keys [B] -> float32 logits [B, C] inside tf.data; adds 'teacher_logits'
      (joined by key before MixUp/CutMix, so each row is the example's own; with mixing,
      'mix_teacher_logits' holds the partner's row).
    regions: replay stored regions (``jaxkd.data.regions``): each example's crop and flip are
      region r of ``regions``, r drawn per example and epoch; adds 'region' (int32 [B]) and
      looks the teacher's row up under the region's key.
  """
  splits_lib.check_split(split)
  if split == splits_lib.TEST:
    raise ValueError("train_dataset reads 'train', 'trainval' or 'val'; evaluate 'test' with "
                     "eval_batches")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  cfg = augment_lib.as_config(augment, **({"image_size": image_size} if image_size else {}))
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, num_devices=num_devices, process_count=pc)
  n = source.num_examples(split)
  if n == 0:
    raise ValueError(f"split {split!r} of {source.name!r} has no examples")
  npc = _npc(num_parallel_calls)
  records = source.records(split)
  buffer = n if source.records_are_cheap else max(1, min(int(shuffle_buffer), n))
  epoch0, offset = divmod(start_step * global_batch_size, n)
  base_seed = tf.constant(int(seed), tf.int64)

  def epoch(e):
    e = tf.cast(e, tf.int64)
    # (seed, 0, e): the seed a single host always used, so one-host runs keep their order.
    shuffle_seed = base_seed * _MIX * _MIX + e
    ds = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.map(lambda r: {**r, "_epoch": e})

  ds = epoch(epoch0).skip(offset)
  ds = ds.concatenate(tf.data.Dataset.range(epoch0 + 1, _NEVER).flat_map(epoch))
  if pc > 1:  # this host's rows of every global batch, before anything is decoded
    first = pi * local
    ds = ds.enumerate().filter(
        lambda i, r: (i % global_batch_size >= first) & (i % global_batch_size < first + local))
    ds = ds.map(lambda i, r: r)
  if source.load_fn is not None:
    load_fn = source.load_fn
    ds = ds.map(lambda r: {**load_fn(r), "_epoch": r["_epoch"]}, num_parallel_calls=npc,
                deterministic=True)
  image_dtype = tf.float32 if cfg.mixing else cfg.tf_dtype

  def preprocess(ex):
    key_hash = tf.strings.to_hash_bucket_fast(ex["key"], _NEVER)
    example_seed = tf.random.experimental.stateless_fold_in(tf.stack([base_seed, key_hash]),
                                                            ex["_epoch"])
    out = {"label": ex["label"], "key": ex["key"], "weight": tf.constant(1.0, tf.float32)}
    region = None
    if regions is not None:
      r = regions_lib.pick(example_seed, regions)
      region = regions_lib.replay(ex["key"], r, regions)
      out.update(region=r, teacher_key=regions_lib.region_key(ex["key"], r))
    if cfg.color_on_device:
      out["image"], out["color_jitter"] = augment_lib.train_preprocess_uint8(
          ex["image"], example_seed, cfg, region=region)
    else:
      out["image"] = augment_lib.train_preprocess(ex["image"], example_seed, cfg,
                                                  dtype=image_dtype, region=region)
    return out

  ds = ds.map(preprocess, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  num_classes = source.num_classes
  if teacher_lookup is not None or regions is not None:
    ds = ds.map(lambda b: _join_teacher(b, teacher_lookup, local, num_classes))
  if cfg.mixing:
    def mix(step, batch):
      batch_seed = tf.random.experimental.stateless_fold_in(
          tf.stack([base_seed, tf.constant(pi + 1, tf.int64)]), step)
      out = augment_lib.mix_batch(batch, batch_seed, cfg, num_classes=num_classes)
      out["image"] = tf.cast(out["image"], cfg.tf_dtype)
      return out
    ds = ds.enumerate(start=start_step).map(mix, num_parallel_calls=npc, deterministic=True)
  return ds.prefetch(prefetch).with_options(_options(num_parallel_calls))


def train_batches(source: Source, split: str = "train", *, global_batch_size: int,
                  mesh: jax.sharding.Mesh | None = None, data_axis: str = "data",
                  device_prefetch: int = 2, **kwargs) -> Iterator[dict[str, Any]]:
  """Infinite iterator of training batches (numpy, or sharded jax.Arrays with ``mesh``).

  Keyword arguments are those of ``train_dataset`` (augment, image_size, seed,
  start_step, shuffle_buffer, num_parallel_calls, prefetch, teacher_lookup, ...).
  With a mesh, the global batch must divide by the size of its ``data_axis``.
  """
  kwargs.setdefault("num_devices", _mesh_devices(mesh, data_axis))
  ds = train_dataset(source, split, global_batch_size=global_batch_size, **kwargs)
  it = ds.as_numpy_iterator()
  if mesh is None:
    return it
  return prefetch_to_device(it, mesh, size=device_prefetch, data_axis=data_axis)


# ----------------------------------------------------------------------------- eval


def steps_per_epoch(source: Source, split: str = "train", *, global_batch_size: int) -> int:
  """Full global batches per pass over ``split``: floor(N / global_batch_size)."""
  return source.num_examples(split) // global_batch_size


def num_eval_batches(source: Source, split: str, *, global_batch_size: int) -> int:
  """Global batches in one eval pass: ceil(N / global_batch_size)."""
  return math.ceil(source.num_examples(split) / global_batch_size)


def eval_dataset(source: Source, split: str, *, global_batch_size: int,
                 augment: augment_lib.AugmentConfig | Mapping[str, Any] | None = None,
                 image_size: int | None = None, num_parallel_calls: int | None = None,
                 prefetch: int = 2, teacher_lookup: TeacherLookup | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_devices: int | None = None, start_batch: int = 0,
                 regions: regions_lib.RegionSpec | None = None) -> tf.data.Dataset:
  """One host-local pass over ``split`` with eval preprocessing and zero-weight padding.

  ``teacher_lookup`` (optional) also sees the padding rows, whose key is b'': it must
  return some finite row for that key (their weight is 0).

  ``start_batch=k`` (0 <= k <= ``num_eval_batches``) starts the pass at batch k: the
  batches are those of the whole pass from k on, and the records of the first k batches
  are skipped before they are loaded or decoded (how a resumed teacher-logit precompute
  skips its finished batches).

  ``regions`` (``jaxkd.data.regions``) makes it the pass a region store is computed from: every
  example R times in a row, as the teacher's view of its regions 0..R-1
  (``regions.teacher_view``), keyed '<key>#<r>'; N R rows in all.
  """
  cfg = augment_lib.as_config(augment, **({"image_size": image_size} if image_size else {}))
  pi, pc = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, num_devices=num_devices, process_count=pc)
  n = source.num_examples(split) * (regions.regions_per_image if regions else 1)
  if n == 0:
    raise ValueError(f"split {split!r} of {source.name!r} is empty")
  num_batches = math.ceil(n / global_batch_size)
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f"start_batch={start_batch} must be in [0, {num_batches}]: split {split!r} "
                     f"of {source.name!r} has {num_batches} eval batches of {global_batch_size}")
  n_host = len(range(pi, n, pc))
  # The host's first start_batch * local elements: real records, then padding.
  skip_real = min(start_batch * local, n_host)
  skip_pad = start_batch * local - skip_real
  npc = _npc(num_parallel_calls)
  ds = source.records(split)
  if regions is not None:
    ds = regions_lib.expand(ds, regions)
  if pc > 1:
    ds = ds.shard(pc, pi)
  # Fails loudly at iteration time if the split does not hold exactly the indexed count.
  ds = ds.apply(tf.data.experimental.assert_cardinality(n_host))
  if skip_real:
    ds = ds.skip(skip_real)  # before loading and decoding: skipped images are never read
  if source.load_fn is not None:
    load_fn = source.load_fn
    if regions is not None:
      ds = ds.map(lambda r: {**load_fn(r), "_region": r["_region"]}, num_parallel_calls=npc,
                  deterministic=True)
    else:
      ds = ds.map(load_fn, num_parallel_calls=npc, deterministic=True)
  dtype = cfg.tf_dtype

  def preprocess(ex):
    if regions is None:
      return {"image": augment_lib.eval_preprocess(ex["image"], cfg, dtype=dtype),
              "label": ex["label"], "key": ex["key"], "weight": tf.constant(1.0, tf.float32)}
    region = ex["_region"]
    return {"image": regions_lib.teacher_view(ex["image"], ex["key"], region, regions, cfg,
                                              dtype=dtype),
            "label": ex["label"], "key": regions_lib.region_key(ex["key"], region),
            "weight": tf.constant(1.0, tf.float32)}

  ds = ds.map(preprocess, num_parallel_calls=npc, deterministic=True)
  size = cfg.image_size
  pad = {"image": tf.zeros([size, size, 3], dtype), "label": tf.constant(0, tf.int32),
         "key": tf.constant(b"", tf.string), "weight": tf.constant(0.0, tf.float32)}
  num_pad = num_batches * local - n_host - skip_pad
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_pad))
  ds = ds.batch(local, drop_remainder=True)
  if teacher_lookup is not None:
    num_classes = source.num_classes
    ds = ds.map(lambda b: _join_teacher(b, teacher_lookup, local, num_classes))
  return ds.prefetch(prefetch).with_options(_options(num_parallel_calls))


def eval_batches(source: Source, split: str, *, global_batch_size: int,
                 image_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
                 data_axis: str = "data", start_batch: int = 0,
                 **kwargs) -> Iterator[dict[str, Any]]:
  """One pass of eval batches {'image','label','key','weight'} (numpy, or jax.Arrays with mesh).

  Every example of the split appears exactly once with weight 1 (over all hosts);
  padding has weight 0 and key b''. ``start_batch=k`` yields the batches of the whole
  pass from batch k on, without loading or decoding the images of batches 0..k-1.
  Other keyword arguments are those of ``eval_dataset``.
  """
  kwargs.setdefault("num_devices", _mesh_devices(mesh, data_axis))
  ds = eval_dataset(source, split, global_batch_size=global_batch_size, image_size=image_size,
                    start_batch=start_batch, **kwargs)
  it = ds.as_numpy_iterator()
  if mesh is None:
    return it
  return (to_device(b, mesh, data_axis=data_axis) for b in it)


# ----------------------------------------------------------------------------- devices


def to_device(batch: Mapping[str, Any], mesh: jax.sharding.Mesh, *,
              data_axis: str = "data") -> dict[str, Any]:
  """Host-local numpy batch -> global jax.Arrays sharded along ``data_axis`` of ``mesh``.

  Uses ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(data_axis)), x)``
  for each numeric field (the global batch is the concatenation of the hosts'
  local batches). String fields ('key') stay host-local numpy arrays.
  """
  n = _mesh_devices(mesh, data_axis)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "SUO":
      out[name] = value
      continue
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % n:
      raise ValueError(f"batch field {name!r} has {global_rows} rows in total, not divisible by "
                       f"the {n} devices of mesh axis {data_axis!r}")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def prefetch_to_device(iterator: Iterator[Mapping[str, Any]], mesh: jax.sharding.Mesh, *,
                       size: int = 2, data_axis: str = "data") -> Iterator[dict[str, Any]]:
  """Keeps ``size`` batches in flight on the devices (transfers are asynchronous)."""
  queue: collections.deque = collections.deque()
  for batch in iterator:
    queue.append(to_device(batch, mesh, data_axis=data_axis))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
