"""MixUp / CutMix from the input pipeline through the train step.

Every reference is recomputed in NumPy float64 from independent inputs: the
partner of each example is found by matching the mixed image against the
unmixed images of the same stream (same seed, mixing off), labels and teacher
logits come from the source index and the test's own logit table by key, and
the model's logits from `model.apply` on the batch's images. The formulas are
MixUp (Zhang et al., ICLR 2018), CutMix (Yun et al., ICCV 2019), label
smoothing (Szegedy et al., CVPR 2016) and KD (Hinton, Vinyals & Dean 2015),
with the stored-teacher target lam softmax(t_i / T) + (1 - lam) softmax(t_j / T).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf

from jaxkd import losses, models
from jaxkd.data import pipeline
from jaxkd.data.sources import ImageFolderSource
from jaxkd.train import optim
from jaxkd.train import state as state_lib
from jaxkd.train import step as step_lib

NUM_CLASSES = 8
PER_CLASS = 3
SIZE = 16
BATCH = 16
SEED = 4  # MixUp lam 0.54, CutMix lam 0.58 on the first batch: both clearly mixed
MIXES = {"mixup": {"mixup_alpha": 1.0}, "cutmix": {"cutmix_alpha": 1.0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  pil_image = pytest.importorskip("PIL.Image")
  root = tmp_path_factory.mktemp("mixing_images")
  rng = np.random.default_rng(0)
  for c in range(NUM_CLASSES):
    (root / f"class{c}").mkdir()
    for k in range(PER_CLASS):
      pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
      pil_image.fromarray(pixels).save(root / f"class{c}" / f"img{k}.jpg", quality=95)
  source = ImageFolderSource(root)
  keys, labels = source.index("trainval")
  table_logits = (rng.normal(size=(len(keys), NUM_CLASSES)) * 3.0).astype(np.float32)
  row_of = {k: i for i, k in enumerate(keys.tolist())}
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keys.tolist()),
                                          tf.range(len(keys), dtype=tf.int64)), -1)
  store = tf.constant(table_logits)

  def lookup(batch_keys):
    return tf.gather(store, table.lookup(batch_keys))

  mesh = step_lib.data_mesh()
  model = models.create("resnet8", num_classes=NUM_CLASSES)
  tx = optim.make_optimizer({"optimizer": "sgd"}, 0.1)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(0), (1, SIZE, SIZE, 3), tx,
                                       mesh=mesh)
  # A freshly initialised classifier gives near-uniform logits, for which CE hardly depends on
  # the target; a scaled classifier spreads them so that the wrong target is clearly visible.
  fc = jax.tree.map(lambda x: x * 30.0, state.params["fc"])
  state = state.replace(params={**state.params, "fc": fc})
  return dict(source=source, label_of=dict(zip(keys.tolist(), labels.tolist())),
              logits_of={k: table_logits[i].astype(np.float64) for k, i in row_of.items()},
              lookup=lookup, mesh=mesh, model=model, tx=tx, state=state, steps={})


def _train_step(setup, name, cfg, **kwargs):
  """One compiled step per loss config, shared by the MixUp and CutMix batches (same shapes)."""
  if name not in setup["steps"]:
    setup["steps"][name] = step_lib.make_train_step(setup["model"], cfg, setup["tx"], setup["mesh"],
                                                    donate=False, **kwargs)
  return setup["steps"][name]


def _first_batch(setup, mix, *, mesh):
  augment = {"image_size": SIZE, "train_crop": "pad_random_crop", "crop_padding": 0, **mix}
  it = pipeline.train_batches(setup["source"], "trainval", global_batch_size=BATCH, seed=SEED,
                              augment=augment, teacher_lookup=setup["lookup"], mesh=mesh)
  return next(it)


def _partners(mixed, clean, lam, kind):
  """Index j of each row's partner, recovered from the images alone, and the CutMix box."""
  mixed, clean = mixed.astype(np.float64), clean.astype(np.float64)
  if kind == "mixup":
    cand = lam * clean[:, None] + (1.0 - lam) * clean[None, :]  # [i, j, H, W, 3]
    err = np.abs(mixed[:, None] - cand).max(axis=(2, 3, 4))
    box = None
  else:
    box = np.any(mixed != clean, axis=(0, 3))  # one box per batch: every pixel that changed
    np.testing.assert_array_equal(mixed[:, ~box], clean[:, ~box])  # outside it: the own image
    err = np.abs(mixed[:, None][:, :, box] - clean[None, :][:, :, box]).max(axis=(2, 3))
  j = np.argmin(err, axis=1)
  assert np.all(err[np.arange(len(j)), j] < 1e-4), "a mixed row matches no partner image"
  return j, box


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd(teacher_probs, student_logits, temperature):
  log_ps = _log_softmax(student_logits / temperature)
  p = teacher_probs
  return temperature ** 2 * np.mean(np.sum(p * (np.log(p) - log_ps), axis=-1))


def _perception(z, stats_rows, eps=1e-6):
  mean = stats_rows.mean(axis=0)
  var = ((stats_rows - mean) ** 2).mean(axis=0)
  return (z - mean) / np.sqrt(var + eps)


def _standardize(z, eps=1e-7):
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + eps)


@pytest.fixture(scope="module", params=list(MIXES))
def mixed(request, setup):
  """The first mixed batch (on the mesh), its unmixed twin and the recovered mix."""
  kind = request.param
  batch = _first_batch(setup, MIXES[kind], mesh=setup["mesh"])
  clean = _first_batch(setup, {}, mesh=None)
  np.testing.assert_array_equal(batch["key"], clean["key"])  # same stream, mixing aside
  host = {k: np.asarray(v) for k, v in batch.items()}
  lam = float(host["mix_lambda"][0])
  assert np.all(host["mix_lambda"] == lam) and 0.05 < lam < 0.95, host["mix_lambda"]
  j, box = _partners(host["image"], clean["image"], lam, kind)
  if kind == "cutmix":
    np.testing.assert_allclose(lam, 1.0 - box.mean(), atol=1e-6)  # lam = area kept
  keys = host["key"].tolist()
  y = np.array([setup["label_of"][k] for k in keys])
  assert len(set(j.tolist())) == BATCH and np.sum(y != y[j]) >= 4  # a permutation, mixing classes
  t_own = np.stack([setup["logits_of"][k] for k in keys])
  return dict(kind=kind, batch=batch, host=host, lam=lam, y=y, yj=y[j], t_own=t_own,
              t_partner=t_own[j])


def test_soft_label_is_the_mix_of_the_batch_one_hots(mixed):
  host, lam = mixed["host"], mixed["lam"]
  eye = np.eye(NUM_CLASSES)
  np.testing.assert_array_equal(host["label"], mixed["y"])
  np.testing.assert_array_equal(host["mix_label"], mixed["yj"])  # the partner seen in the image
  ref = (host["mix_lambda"][:, None] * eye[host["label"]]
         + (1.0 - host["mix_lambda"][:, None]) * eye[host["mix_label"]])
  np.testing.assert_allclose(host["soft_label"], ref, rtol=0, atol=1e-6)
  q = lam * eye[mixed["y"]] + (1 - lam) * eye[mixed["yj"]]
  np.testing.assert_allclose(host["soft_label"], q, rtol=0, atol=1e-6)
  # Stored logits stay the example's own (joined by key); the partner's row rides along.
  np.testing.assert_array_equal(host["teacher_logits"], mixed["t_own"].astype(np.float32))
  np.testing.assert_array_equal(host["mix_teacher_logits"], mixed["t_partner"].astype(np.float32))


STORED = {
    "kd_smoothing": {"kind": "kd", "label_smoothing": 0.1, "ce_weight": 0.5, "kd_weight": 0.9,
                     "temperature": 4.0},
    "kd_perception": {"kind": "kd", "perception": True, "ce_weight": 1.0, "kd_weight": 1.0,
                      "temperature": 2.0},
    "lskd": {"kind": "lskd", "ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0},
}


@pytest.mark.parametrize("name", list(STORED))
def test_stored_teacher_step_trains_on_mixed_labels_and_mixed_teacher(setup, mixed, name):
  cfg = STORED[name]
  model, state = setup["model"], setup["state"]
  host, lam = mixed["host"], mixed["lam"]
  eye = np.eye(NUM_CLASSES)
  z, _ = model.apply(state.variables(), host["image"], train=True, mutable=["batch_stats"])
  z = np.asarray(z, np.float64)
  temp, eps = cfg["temperature"], cfg.get("label_smoothing", 0.0)
  q = lam * eye[mixed["y"]] + (1.0 - lam) * eye[mixed["yj"]]
  ce = np.mean(-np.sum(((1 - eps) * q + eps / NUM_CLASSES) * _log_softmax(z), axis=-1))
  t_own, t_partner, zs = mixed["t_own"], mixed["t_partner"], z
  if cfg.get("perception"):
    t_own, t_partner = _perception(t_own, t_own), _perception(t_partner, t_own)
    zs = _perception(z, z)
  if cfg["kind"] == "lskd":
    t_own, t_partner, zs = _standardize(t_own), _standardize(t_partner), _standardize(z)
  p_t = (lam * np.exp(_log_softmax(t_own / temp))
         + (1.0 - lam) * np.exp(_log_softmax(t_partner / temp)))
  kd = _kd(p_t, zs, temp)
  # The references tell the right targets from the wrong ones: hard labels, mixed logits.
  hard = (1 - eps) * eye[mixed["y"]] + eps / NUM_CLASSES
  ce_hard = np.mean(-np.sum(hard * _log_softmax(z), axis=-1))
  t_logit_mix = lam * t_own + (1.0 - lam) * t_partner
  kd_logit_mix = _kd(np.exp(_log_softmax(t_logit_mix / temp)), zs, temp)
  assert abs(ce_hard - ce) > 5e-3 * ce and abs(kd_logit_mix - kd) > 5e-3 * kd  # >> rtol
  _, m = _train_step(setup, name, cfg)(state, mixed["batch"])
  m = {k: float(v) for k, v in m.items()}
  np.testing.assert_allclose(m["ce"], ce, rtol=2e-5, err_msg="CE must use the mixed soft label")
  np.testing.assert_allclose(m["kd"], kd, rtol=2e-5, err_msg="KD must use the mixed teacher probs")
  np.testing.assert_allclose(m["loss"], cfg["ce_weight"] * ce + cfg["kd_weight"] * kd, rtol=2e-5)
  np.testing.assert_allclose(m["accuracy"], np.mean(q[np.arange(BATCH), np.argmax(z, -1)]),
                             atol=1e-6)


def test_online_teacher_sees_the_mixed_image(setup, mixed):
  """The online teacher runs on the mixed image itself: its output is the target, unmixed."""
  model, state, mesh = setup["model"], setup["state"], setup["mesh"]
  teacher = models.create("resnet8", num_classes=NUM_CLASSES)
  t_vars = state_lib.create_train_state(teacher, jax.random.PRNGKey(1), (1, SIZE, SIZE, 3),
                                        setup["tx"], mesh=mesh).variables()
  host, lam, temp = mixed["host"], mixed["lam"], 3.0
  z, _ = model.apply(state.variables(), host["image"], train=True, mutable=["batch_stats"])
  z = np.asarray(z, np.float64)
  t = np.asarray(teacher.apply(t_vars, host["image"], train=False), np.float64)
  q = lam * np.eye(NUM_CLASSES)[mixed["y"]] + (1.0 - lam) * np.eye(NUM_CLASSES)[mixed["yj"]]
  ce = np.mean(-np.sum(q * _log_softmax(z), axis=-1))
  kd = _kd(np.exp(_log_softmax(t / temp)), z, temp)
  train_step = _train_step(setup, "online", {"kind": "kd", "temperature": temp},
                           teacher_model=teacher)
  _, m = train_step(state, mixed["batch"], t_vars)  # stored fields in the batch are ignored
  np.testing.assert_allclose(float(m["ce"]), ce, rtol=2e-5)
  np.testing.assert_allclose(float(m["kd"]), kd, rtol=2e-5)


def test_dkd_refuses_mixed_batches(setup, mixed):
  with pytest.raises(ValueError, match="'dkd' cannot train on MixUp/CutMix"):
    step_lib.check_mixing_supported({"kind": "dkd", "perception": True})
  for ok in ({"kind": "kd", "perception": True}, {"kind": "lskd"}, {"kind": "ce"}):
    step_lib.check_mixing_supported(ok)
  train_step = step_lib.make_train_step(setup["model"], {"kind": "dkd"}, setup["tx"], setup["mesh"],
                                        donate=False)
  with pytest.raises(ValueError, match="soft labels.*'dkd' cannot train on MixUp/CutMix"):
    train_step(setup["state"], mixed["batch"])


def test_mixed_teacher_pseudo_logits_extremes():
  """lam = 1 (unmixed batch) gives the own teacher; logit gaps far past float32 exp stay finite."""
  rng = np.random.default_rng(5)
  zs = rng.normal(size=(4, 6)).astype(np.float32)
  own = (rng.normal(size=(4, 6)) * 3).astype(np.float32)
  partner = np.zeros((4, 6), np.float32)
  partner[:, 0] = 300.0  # softmax(partner) is one-hot to float32 precision even at T = 1
  lam = np.array([1.0, 0.0, 0.3, 0.7], np.float32)
  first = np.array([1.0, 0.0, 0.0, 0.0], np.float32)

  @jax.jit
  def run(temp):
    u = step_lib._mixed_teacher_logits(own, partner, lam, temp)
    return (u, losses.kd_loss(zs, u, temperature=temp),
            losses.kd_loss(zs, u, temperature=temp, weights=first),
            losses.kd_loss(zs, own, temperature=temp, weights=first))

  for temp in (1.0, 4.0):
    u, kd, kd_row0, plain_row0 = jax.tree.map(np.asarray, run(np.float32(temp)))
    assert np.all(np.isfinite(u))
    p_own = np.exp(_log_softmax(own.astype(np.float64) / temp))
    p_partner = np.exp(_log_softmax(partner.astype(np.float64) / temp))
    p = lam[:, None] * p_own + (1.0 - lam[:, None]) * p_partner
    lps = _log_softmax(zs.astype(np.float64) / temp)
    log_p = np.log(np.maximum(p, 1e-300))
    per_row = temp ** 2 * np.sum(np.where(p > 0, p * (log_p - lps), 0.0), axis=-1)
    np.testing.assert_allclose(kd, per_row.mean(), rtol=2e-5)
    np.testing.assert_allclose(kd_row0, plain_row0, rtol=1e-5)
