"""Tests for jaxkd.teacher_store: round trip, resumability, atomicity, tampering, no TensorFlow;
and for its tf.data join, jaxkd.data.teacher_logits.tf_lookup.

References are independent of the store: the tiny teacher's logits are recomputed in NumPy float64
from its formula, checksums with hashlib, row order from the synthetic key list.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import teacher_store as ts
from jaxkd.teacher_store import TeacherStore, TeacherStoreError

# 37 examples in batches of 8: 5 batches, the last one padded (3 real, 5 padding).
N, C, BS, HW = 37, 5, 8, 4
PREP = {"image_size": HW, "resize": "none", "normalisation": "synthetic"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, HW, HW, 3)).astype(np.float32)
  keys = [f"class_{i % 3}/{1000 + 7 * i}" for i in range(n)]
  return images, keys


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {"params": {"dense": {"kernel": rng.normal(size=(3 * HW * HW, C)).astype(np.float32),
                               "bias": rng.normal(size=(C,)).astype(np.float32)}}}


def _reference_logits(images, variables):
  """float64 formula of the toy teacher: logits = 3 * tanh(flatten(x) @ W + b)."""
  p = variables["params"]["dense"]
  x = images.reshape(images.shape[0], -1).astype(np.float64)
  return 3.0 * np.tanh(x @ p["kernel"].astype(np.float64) + p["bias"].astype(np.float64))


class CountingTeacher:
  """Jitted toy teacher; counts the batches it is run on."""

  def __init__(self, variables):
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.calls = 0

    @jax.jit
    def forward(v, x):
      p = v["params"]["dense"]
      return 3.0 * jnp.tanh(x.reshape(x.shape[0], -1) @ p["kernel"] + p["bias"])

    self._forward = forward

  def __call__(self, images):
    self.calls += 1
    return self._forward(self.variables, images)


def _batches(images, keys, *, bs=BS, key_as_bytes=False, extra_padding_batch=True):
  """Eval-style numpy batches: fixed size, padded with weight-0 rows; optionally one all-padding
  batch."""
  out = []
  for start in range(0, len(keys), bs):
    idx = np.arange(start, min(start + bs, len(keys)))
    pad = bs - len(idx)
    img = np.concatenate([images[idx], np.zeros((pad,) + images.shape[1:], np.float32)])
    kk = [keys[i] for i in idx] + [""] * pad
    key_arr = np.array([k.encode() for k in kk], dtype=object) if key_as_bytes else np.array(kk)
    out.append({"image": img, "label": np.zeros(bs, np.int32), "key": key_arr,
                "weight": np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)})
  if extra_padding_batch:
    out.append({"image": np.zeros_like(out[0]["image"]), "label": np.zeros(bs, np.int32),
                "key": np.array([""] * bs), "weight": np.zeros(bs, np.float32)})
  return out


class Source:
  """A `batches_from(start_batch)` factory that records where it was asked to start and can fail."""

  def __init__(self, batches, fail_at=None):
    self.batches, self.fail_at, self.starts = batches, fail_at, []

  def __call__(self, start):
    self.starts.append(start)

    def gen():
      for i in range(start, len(self.batches)):
        if self.fail_at is not None and i == self.fail_at:
          raise RuntimeError(f"simulated interruption at batch {i}")
        yield self.batches[i]

    return gen()


def _run(tmp, source, teacher, *, tid="toy-000000000000", **kw):
  args = dict(data_dir=tmp, dataset="toyset", version="1.0.0", split="train", teacher_id=tid,
              num_examples=N, num_classes=C, preprocessing=PREP,
              class_names=[f"c{i}" for i in range(C)], flush_every=2, progress=False)
  args.update(kw)
  return ts.precompute(source, teacher, **args)


EXPECT = dict(dataset="toyset", version="1.0.0", split="train", num_classes=C,
              teacher_id="toy-000000000000")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One complete store (and its inputs) for the read-only and tampering tests."""
  tmp = tmp_path_factory.mktemp("built")
  images, keys = _data()
  variables = _params()
  teacher = CountingTeacher(variables)
  store = _run(tmp, Source(_batches(images, keys)), teacher)
  return {"dir": store.path, "images": images, "keys": keys, "variables": variables}


@pytest.fixture
def store_copy(built, tmp_path):
  dst = tmp_path / "toyset" / "1.0.0" / "teacher_logits" / "toy-000000000000" / "train"
  shutil.copytree(built["dir"], dst)
  return dst


# ----------------------------------------------------------------------------- identity


def test_teacher_id_is_stable_and_sensitive():
  v = _params()
  tid = ts.teacher_id("toy", v)
  assert tid.startswith("toy-") and len(tid) == len("toy-") + 12 and int(tid[4:], 16) >= 0
  # Independent of dict insertion order and of copies.
  reordered = {"params": {"dense": {"bias": v["params"]["dense"]["bias"].copy(),
                                    "kernel": v["params"]["dense"]["kernel"].copy()}}}
  assert ts.teacher_id("toy", reordered) == tid
  assert ts.teacher_id("toy", jax.tree_util.tree_map(jnp.asarray, v)) == tid
  # Any changed value, dtype or added collection gives another id.
  changed = jax.tree_util.tree_map(np.copy, v)
  changed["params"]["dense"]["bias"][0] += 1e-3
  assert ts.teacher_id("toy", changed) != tid
  as16 = jax.tree_util.tree_map(lambda a: a.astype(np.float16), v)
  assert ts.teacher_id("toy", as16) != tid
  assert ts.teacher_id("toy", {**v, "batch_stats": {"mean": np.zeros(3, np.float32)}}) != tid
  assert ts.teacher_id("other", v) != tid
  with pytest.raises(ValueError, match="model_name"):
    ts.teacher_id("bad/name", v)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
  images, keys = _data()
  variables = _params()
  teacher = CountingTeacher(variables)
  source = Source(_batches(images, keys, key_as_bytes=True))
  store = _run(tmp_path, source, teacher, dtype=dtype)
  expected_dir = tmp_path / "toyset" / "1.0.0" / "teacher_logits" / "toy-000000000000" / "train"
  assert store.path == expected_dir
  assert not ts.partial_path(expected_dir).exists()
  assert teacher.calls == 5  # the all-padding sixth batch never reaches the teacher
  assert source.starts == [0]

  reopened = TeacherStore.open(expected_dir, expect={**EXPECT, "num_examples": N,
                                                     "preprocessing": PREP, "dtype": dtype})
  assert reopened.keys == keys
  assert reopened.logits.shape == (N, C) and reopened.logits.dtype == np.dtype(dtype)
  ref = _reference_logits(images, variables)
  tol = dict(rtol=2e-3, atol=2e-3) if dtype == "float16" else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(reopened.logits, np.float64), ref, **tol)
  for i in (0, 17, N - 1):
    np.testing.assert_allclose(reopened.row(keys[i]), ref[i], **tol)
    assert reopened.row(keys[i]).dtype == np.float32
    assert reopened.index(keys[i].encode()) == i
  np.testing.assert_allclose(reopened.rows([keys[3], keys[1]]), ref[[3, 1]], **tol)
  with pytest.raises(KeyError, match="not in the teacher store"):
    reopened.row("class_0/nope")

  m = json.loads((expected_dir / "manifest.json").read_text())
  assert m["format"] == "jaxkd.teacher_logits" and m["format_version"] == 1
  assert (m["dataset"], m["version"], m["split"], m["teacher_id"]) == ("toyset", "1.0.0", "train",
                                                                       "toy-000000000000")
  assert (m["num_examples"], m["num_classes"], m["dtype"]) == (N, C, dtype)
  assert m["class_names"] == [f"c{i}" for i in range(C)] and m["preprocessing"] == PREP
  assert m["created"].endswith("+00:00")
  for name, fname in (("logits", "logits.npy"), ("keys", "keys.txt")):
    digest = hashlib.sha256((expected_dir / fname).read_bytes()).hexdigest()
    assert m["files"][name]["sha256"] == digest
  assert (expected_dir / "keys.txt").read_text() == "".join(k + "\n" for k in keys)
  assert sorted(p.name for p in expected_dir.iterdir()) == ["keys.txt", "logits.npy",
                                                            "manifest.json"]

  # A second precompute finds the complete store and does not run the teacher again.
  again = _run(tmp_path, Source(_batches(images, keys)), teacher, dtype=dtype)
  assert teacher.calls == 5 and again.keys == keys


def test_plain_iterable_source_and_store_dir(tmp_path):
  images, keys = _data()
  teacher = CountingTeacher(_params())
  batches = _batches(images, keys, extra_padding_batch=False)
  store = ts.precompute(batches, teacher, store_dir=tmp_path / "custom", dataset="toyset",
                        version="1.0.0", split="test", teacher_id="toy-1", num_examples=N,
                        num_classes=C, preprocessing={}, progress=False)
  assert store.path == tmp_path / "custom" and store.keys == keys and teacher.calls == 5


# ------------------------------------------------------------------------ resumability + atomicity


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
  images, keys = _data()
  variables = _params()
  batches = _batches(images, keys)

  clean_teacher = CountingTeacher(variables)
  clean = _run(tmp_path / "clean", Source(batches), clean_teacher)

  teacher = CountingTeacher(variables)
  failing = Source(batches, fail_at=3)
  with pytest.raises(RuntimeError, match="simulated interruption"):
    _run(tmp_path / "resumed", failing, teacher)
  assert teacher.calls == 3
  final = (tmp_path / "resumed" / "toyset" / "1.0.0" / "teacher_logits" / "toy-000000000000"
           / "train")
  partial = ts.partial_path(final)
  assert partial.is_dir() and not final.exists()
  progress = json.loads((partial / "progress.json").read_text())
  assert (progress["batches_done"], progress["rows_done"]) == (3, 24)

  # Atomicity: neither the final path nor the partial folder opens.
  with pytest.raises(TeacherStoreError, match="interrupted precompute"):
    TeacherStore.open(final)
  with pytest.raises(TeacherStoreError, match="unfinished precompute"):
    TeacherStore.open(partial)

  resumed_source = Source(batches)
  resumed = _run(tmp_path / "resumed", resumed_source, teacher)
  assert resumed_source.starts == [3]  # finished batches are not even requested
  assert teacher.calls == 3 + 2  # 5 real batches in all: none recomputed
  assert not partial.exists()
  assert (final / "logits.npy").read_bytes() == (clean.path / "logits.npy").read_bytes()
  np.testing.assert_array_equal(np.asarray(resumed.logits), np.asarray(clean.logits))
  assert resumed.keys == clean.keys == keys
  assert (final / "keys.txt").read_bytes() == (clean.path / "keys.txt").read_bytes()


def test_resume_with_plain_iterable_skips_done_batches(tmp_path):
  images, keys = _data()
  batches = _batches(images, keys)
  teacher = CountingTeacher(_params())

  def interrupted():
    for i, b in enumerate(batches):
      if i == 2:
        raise KeyboardInterrupt
      yield b

  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path, interrupted(), teacher)
  assert teacher.calls == 2
  store = _run(tmp_path, batches, teacher)
  assert teacher.calls == 5 and store.keys == keys
  np.testing.assert_allclose(np.asarray(store.logits, np.float64),
                             _reference_logits(images, _params()), rtol=2e-3, atol=2e-3)


_KILL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from jaxkd import teacher_store as ts
    out, kill_at = sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(40, 2, 2, 3)).astype(np.float32)
    keys = np.array([f"k/{i}" for i in range(40)])
    w = rng.normal(size=(12, 3)).astype(np.float32)
    calls = []
    def teacher(x):
      calls.append(1)
      return x.reshape(x.shape[0], -1) @ w
    def source(start):
      for i in range(start, 10):
        if i == kill_at:
          os._exit(3)  # a hard kill: no exception handler, no flush
        yield {"image": images[4 * i:4 * i + 4], "key": keys[4 * i:4 * i + 4], "weight": np.ones(4)}
    ts.precompute(source, teacher, store_dir=out, dataset="d", version="1", split="s",
                  teacher_id="t-1", num_examples=40, num_classes=3, preprocessing={},
                  flush_every=2, progress=False, dtype="float32")
    print(json.dumps({"calls": len(calls)}))
""")


def test_hard_kill_resumes_from_last_flush(tmp_path):
  script = tmp_path / "kill.py"
  script.write_text(_KILL_SCRIPT)
  out = tmp_path / "store"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  first = subprocess.run([sys.executable, str(script), str(ROOT), str(out), "5"], env=env,
                         capture_output=True, text=True, timeout=120)
  assert first.returncode == 3, first.stderr
  progress = json.loads((ts.partial_path(out) / "progress.json").read_text())
  # Batches 0-4 ran; the teacher runs one batch ahead, so 4 were written, flushed every 2 -> 4
  # durable.
  assert progress["batches_done"] == 4 and progress["rows_done"] == 16
  second = subprocess.run([sys.executable, str(script), str(ROOT), str(out), "-1"], env=env,
                          capture_output=True, text=True, timeout=120)
  assert second.returncode == 0, second.stderr
  assert json.loads(second.stdout.strip().splitlines()[-1])["calls"] == 6
  store = TeacherStore.open(out)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 2, 2, 3)).astype(np.float32)
  w = rng.normal(size=(12, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(store.logits),
                             images.reshape(40, -1).astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
  assert store.keys == [f"k/{i}" for i in range(40)]


_NO_TF_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["tensorflow"] = None  # from here on, any `import tensorflow` raises ImportError
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from jaxkd import teacher_store as ts
    store = ts.TeacherStore.open(sys.argv[2])
    keys = store.keys[:3]
    rows = store.rows(keys).tolist()
    x = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    def batches(start):
      return [{"image": x, "key": np.array(["a/0", "a/1"]), "weight": np.ones(2)}][start:]
    new = ts.precompute(batches, lambda images: images.sum(axis=2), store_dir=sys.argv[3],
                        dataset="d", version="1", split="s", teacher_id="t-1", num_examples=2,
                        num_classes=4, preprocessing={}, progress=False, dtype="float32")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras"))
    print(json.dumps({"keys": keys, "rows": rows, "new": np.asarray(new.logits).tolist(),
                      "tf_modules": loaded, "data": "jaxkd.data" in sys.modules}))
""")


def test_store_needs_no_tensorflow(built, tmp_path):
  """Writing, opening and reading a store work where TensorFlow cannot be imported at all."""
  script = tmp_path / "no_tf.py"
  script.write_text(_NO_TF_SCRIPT)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(script), str(ROOT), str(built["dir"]),
                         str(tmp_path / "new")], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["tf_modules"] == ["tensorflow"] and not out["data"]  # only the blocked entry
  assert out["keys"] == built["keys"][:3]
  store = TeacherStore.open(built["dir"])
  np.testing.assert_array_equal(np.asarray(out["rows"], np.float32), store.logits[:3])
  x = np.arange(24, dtype=np.float64).reshape(2, 4, 3)
  np.testing.assert_array_equal(out["new"], x.sum(axis=2))


def test_resume_with_different_arguments_is_refused(tmp_path):
  images, keys = _data()
  batches = _batches(images, keys)
  with pytest.raises(RuntimeError):
    _run(tmp_path, Source(batches, fail_at=2), CountingTeacher(_params()))
  with pytest.raises(TeacherStoreError, match=r"preprocessing=.*image_size.*8"):
    _run(tmp_path, Source(batches), CountingTeacher(_params()),
         preprocessing={**PREP, "image_size": 8})
  # overwrite=True starts over.
  store = _run(tmp_path, Source(batches), CountingTeacher(_params()),
               preprocessing={**PREP, "image_size": 8}, overwrite=True)
  assert store.manifest["preprocessing"]["image_size"] == 8


def test_folder_without_manifest_is_refused(built, tmp_path):
  d = tmp_path / "half"
  shutil.copytree(built["dir"], d)
  (d / "manifest.json").unlink()
  with pytest.raises(TeacherStoreError, match="no manifest.json"):
    TeacherStore.open(d)
  with pytest.raises(TeacherStoreError, match="no such folder"):
    TeacherStore.open(tmp_path / "nothing")


@pytest.mark.parametrize("problem", ["duplicate", "too_few", "too_many", "nan", "wrong_classes"])
def test_bad_sources_are_refused(tmp_path, problem):
  images, keys = _data()
  batches = _batches(images, keys, extra_padding_batch=False)
  teacher = CountingTeacher(_params())
  kw = {}
  if problem == "duplicate":
    batches[2]["key"] = batches[0]["key"].copy()
    match = "arrived twice"
  elif problem == "too_few":
    batches = batches[:-1]
    match = "ended after 32 real rows"
  elif problem == "too_many":
    kw["num_examples"] = 30
    match = "more than num_examples=30"
  elif problem == "nan":
    batches[1]["image"] = batches[1]["image"].copy()
    batches[1]["image"][0, 0, 0, 0] = np.nan
    match = f"{keys[8]}.*not finite"
  else:
    kw["num_classes"] = C + 1
    kw["class_names"] = None
    match = r"shape \(8, 5\).*num_classes=6"
  with pytest.raises(TeacherStoreError, match=match):
    _run(tmp_path, batches, teacher, **kw)


# --------------------------------------------------------------------- tampering and expectations


def _edit_manifest(d, **changes):
  m = json.loads((d / "manifest.json").read_text())
  m.update(changes)
  (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change,match", [
    (dict(num_classes=C + 1), r"'num_classes' is 6 but logits.npy has shape \(37, 5\)"),
    (dict(num_examples=N - 1), r"'num_examples' is 36"),
    (dict(split="test"), r"'split' is 'test' but the store's folder says 'train'"),
    (dict(teacher_id="toy-ffffffffffff"),
     r"'teacher_id' is 'toy-ffffffffffff' but the store's folder"),
    (dict(dtype="float32"), r"'dtype' is 'float32' but logits.npy holds float16"),
    (dict(preprocessing={**PREP, "image_size": 224}), "manifest.json was modified"),
    (dict(class_names=["x"] * C), "manifest.json was modified"),
    (dict(format_version=2), "'format_version' is 2"),
])
def test_edited_manifest_is_refused(store_copy, change, match):
  _edit_manifest(store_copy, **change)
  with pytest.raises(TeacherStoreError, match=match) as e:
    TeacherStore.open(store_copy)
  assert "re-run the teacher-logit precompute" in str(e.value)
  assert f"delete {store_copy}" in str(e.value)


def test_changed_key_is_refused(store_copy):
  text = (store_copy / "keys.txt").read_text().replace("class_1/1007", "class_1/1008", 1)
  (store_copy / "keys.txt").write_text(text)
  with pytest.raises(TeacherStoreError, match="keys.txt checksum mismatch"):
    TeacherStore.open(store_copy)


def test_flipped_array_bytes_are_refused(store_copy):
  path = store_copy / "logits.npy"
  blob = bytearray(path.read_bytes())
  blob[-7] ^= 0x40
  path.write_bytes(bytes(blob))
  with pytest.raises(TeacherStoreError, match="logits.npy checksum mismatch"):
    TeacherStore.open(store_copy)
  # verify=False skips the (costly for big stores) array hash, as documented.
  assert TeacherStore.open(store_copy, verify=False).logits.shape == (N, C)


def test_wrong_shape_and_truncated_array_are_refused(store_copy):
  np.save(store_copy / "logits.npy", np.zeros((N, C + 1), np.float16))
  match = r"'num_classes' is 5 but logits.npy has shape \(37, 6\)"
  with pytest.raises(TeacherStoreError, match=match):
    TeacherStore.open(store_copy)
  blob = (store_copy / "logits.npy").read_bytes()
  (store_copy / "logits.npy").write_bytes(blob[:len(blob) // 2])
  with pytest.raises(TeacherStoreError, match="truncated or corrupted"):
    TeacherStore.open(store_copy)


@pytest.mark.parametrize("field,value", [
    ("teacher_id", "toy-123456789abc"), ("dataset", "food101"), ("split", "test"),
    ("num_classes", 101),
    ("version", "2.0.0"), ("num_examples", 75750), ("preprocessing", {**PREP, "image_size": 224}),
    ("dtype", "float32"),
])
def test_unexpected_store_is_refused_naming_the_field(built, field, value):
  with pytest.raises(TeacherStoreError) as e:
    TeacherStore.open(built["dir"], expect={**EXPECT, field: value})
  msg = str(e.value)
  canonical = json.loads(json.dumps(value, sort_keys=True))
  assert f"field {field!r} differs" in msg and repr(canonical) in msg
  if field == "preprocessing":
    assert "image_size: store 4 vs expected 224" in msg
  have = json.loads((built["dir"] / "manifest.json").read_text())[field]
  assert repr(have) in msg and "re-run the teacher-logit precompute" in msg


def test_unknown_expect_field_is_an_error(built):
  with pytest.raises(ValueError, match="num_clases"):
    TeacherStore.open(built["dir"], expect={"num_clases": 5})


# ----------------------------------------------------------------------------- tf.data lookup


@pytest.mark.parametrize("backend", ["memory", "mmap"])
def test_tf_lookup_in_shuffled_pipeline(built, backend):
  import tensorflow as tf

  from jaxkd.data.teacher_logits import tf_lookup

  store = TeacherStore.open(built["dir"], expect=EXPECT)
  lookup = tf_lookup(store, backend=backend)
  keys = built["keys"]
  ref = _reference_logits(built["images"], built["variables"])
  labels = np.arange(N, dtype=np.int32)  # carries the original position through the shuffle
  ds = tf.data.Dataset.from_tensor_slices({"key": keys, "label": labels}).shuffle(N, seed=3)
  seen = []
  if backend == "memory":  # per-element lookup, then batch
    ds = ds.map(lambda e: {**e, "teacher_logits": lookup(e["key"])}).batch(6)
  else:  # the mmap backend is meant for batched keys
    ds = ds.batch(6).map(lambda e: {**e, "teacher_logits": lookup(e["key"])})
  assert ds.element_spec["teacher_logits"].shape.as_list() == [None, C]
  for b in ds.as_numpy_iterator():
    assert b["teacher_logits"].dtype == np.float32
    for k, pos, row in zip(b["key"], b["label"], b["teacher_logits"]):
      assert k.decode() == keys[pos]
      # exactly the stored row
      np.testing.assert_array_equal(row, np.asarray(store.logits[pos], np.float32))
      np.testing.assert_allclose(row, ref[pos], rtol=2e-3, atol=2e-3)
      seen.append(int(pos))
  assert sorted(seen) == list(range(N)) and seen != list(range(N))

  # Batched lookup of a 2-D key tensor.
  out = lookup(tf.constant([[keys[4], keys[0]], [keys[36], keys[4]]])).numpy()
  assert out.shape == (2, 2, C)
  np.testing.assert_array_equal(out[1, 0], np.asarray(store.logits[36], np.float32))


@pytest.mark.parametrize("backend", ["memory", "mmap"])
def test_tf_lookup_unknown_key_fails_loudly(built, backend):
  import tensorflow as tf

  from jaxkd.data.teacher_logits import tf_lookup

  store = TeacherStore.open(built["dir"])
  keys = built["keys"][:5] + ["class_9/unknown"]
  ds = tf.data.Dataset.from_tensor_slices(keys).batch(3).map(tf_lookup(store, backend=backend))
  with pytest.raises(tf.errors.OpError, match="class_9/unknown"):
    list(ds.as_numpy_iterator())


# --------------------------------------------------------------------- integration with jaxkd.data


def test_integration_food101_images(data_variant, request, tmp_path):
  """Food-101 photos -> eval_batches -> precompute (resnet8) -> train_batches(teacher_lookup=...).

  A 3-class, 10-image-per-class slice of the food images (generated, or the real food-101-mini;
  symlinked into an image-folder tree, so the test stays fast) is read by the 'image_folder'
  source; the 'train' split (80 % of it) is precomputed with eval preprocessing at 32 px. The
  generated slice includes the greyscale JPEG and the PNG named .jpg. Every training batch,
  shuffled, on both of two simulated hosts, must carry for each key the teacher's logits
  recomputed independently: the test reads that key's file itself, applies eval preprocessing
  and runs the teacher.
  """
  import tensorflow as tf

  from jaxkd import models
  from jaxkd.data import augment, pipeline, sources, teacher_logits

  if data_variant == "real":
    food = request.getfixturevalue("shared_data") / "food-101-mini" / "food-101" / "images"
    special = set()
  else:
    generated = request.getfixturevalue("generated_food101_tree")
    food = generated.food_dir / "images"
    special = {generated.grayscale_key + ".jpg", generated.png_key + ".jpg"}
  assert food.is_dir(), food
  classes = sorted(p.name for p in food.iterdir() if p.is_dir())[:3]
  tree = tmp_path / "images"
  for c in classes:
    (tree / c).mkdir(parents=True)
    files = sorted((food / c).glob("*.jpg"))
    chosen = files[:10]
    for f in files[10:]:  # the greyscale / PNG images go in (replacing the last ordinary ones)
      if f"{c}/{f.name}" in special:
        chosen = [f] + chosen[:-1]
    for f in chosen:
      (tree / c / f.name).symlink_to(f)
  if special:
    linked = {f"{p.parent.name}/{p.name}" for p in tree.glob("*/*.jpg")}
    assert special <= linked, (special, sorted(linked))
  data_dir = tmp_path / "tfds"
  source = sources.get_source("image_folder", manual_dir=tree, data_dir=data_dir)
  n_train = source.num_examples("train")
  assert source.class_names == classes and n_train == 24

  size = 32
  cfg = augment.AugmentConfig(image_size=size)
  model = models.create("resnet8", num_classes=len(classes))
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  calls = []

  @jax.jit
  def forward(x):
    return model.apply(variables, x, train=False)

  def logits_fn(x):
    calls.append(len(x))
    if len(calls) == fail_at_call[0]:
      raise KeyboardInterrupt
    return forward(x)

  starts = []

  def batches(start_batch):
    starts.append(start_batch)
    return pipeline.eval_batches(source, "train", global_batch_size=8, image_size=size,
                                 start_batch=start_batch)

  tid = ts.teacher_id("resnet8", variables)
  preprocessing = {"fn": "jaxkd.data.augment.eval_preprocess", "image_size": size,
                   "eval_crop_fraction": cfg.eval_crop_fraction, "antialias": cfg.antialias,
                   "dtype": "float32"}
  args = dict(dataset=source.name, version=source.version, split="train", teacher_id=tid,
              num_examples=n_train, num_classes=source.num_classes,
              class_names=source.class_names, preprocessing=preprocessing, progress=False)
  fail_at_call = [None]
  store = ts.precompute(batches, logits_fn, data_dir=data_dir, **args)
  assert store.path == data_dir / source.name / source.version / "teacher_logits" / tid / "train"
  assert calls == [8, 8, 8] and starts == [0]  # 24 train examples in 3 full batches of 8
  train_keys = sorted(k.decode() for k in source.index("train")[0])
  assert sorted(store.keys) == train_keys

  # Interrupted in the teacher's third call (batches 0 and 1 done), then resumed from batch 2
  # through eval_batches(start_batch=2): the same bytes as the uninterrupted run.
  calls.clear()
  starts.clear()
  fail_at_call[0] = 3
  resumed_dir = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    ts.precompute(batches, logits_fn, store_dir=resumed_dir, **args)
  fail_at_call[0] = None
  resumed = ts.precompute(batches, logits_fn, store_dir=resumed_dir, **args)
  assert starts == [0, 2] and len(calls) == 4
  for name in ("logits.npy", "keys.txt"):
    assert (resumed.path / name).read_bytes() == (store.path / name).read_bytes(), name

  store = TeacherStore.open(store.path, expect=dict(
      dataset=source.name, version=source.version, split="train", num_classes=3, teacher_id=tid,
      preprocessing=preprocessing))

  # Independent reference: read each key's own file, eval-preprocess it, run the teacher.
  images = np.stack([augment.eval_preprocess(tf.io.read_file(str(tree / (k + ".jpg"))), cfg,
                                             dtype=tf.float32).numpy() for k in train_keys])
  ref_logits = np.concatenate([np.asarray(forward(images[i:i + 8]), np.float64)
                               for i in range(0, 24, 8)])
  ref = dict(zip(train_keys, ref_logits))
  seen = []
  lookup = teacher_logits.tf_lookup(store)
  for host in range(2):
    batches = pipeline.train_batches(source, "train", global_batch_size=8, image_size=size, seed=1,
                                     teacher_lookup=lookup, process_index=host, process_count=2)
    for _ in range(6):  # 6 local batches of 4 = two epochs of this host's ~12 examples
      b = next(batches)
      assert b["teacher_logits"].shape == (4, 3) and b["teacher_logits"].dtype == np.float32
      for key, label, logits in zip(b["key"], b["label"], b["teacher_logits"]):
        key = key.decode()
        assert classes[label] == key.split("/")[0]
        np.testing.assert_allclose(logits, ref[key], rtol=2e-3, atol=2e-3, err_msg=key)
        seen.append(key)
  assert len(set(seen)) == 24  # both hosts together covered the whole split
