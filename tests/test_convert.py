"""PyTorch checkpoint import (jaxkd.models.convert) against torchvision's own model code.

The reference is torchvision itself, run by the system Python (`/usr/bin/python3` with Debian's
python3-torchvision; the test venv has no torch) in a subprocess: it builds `resnet50()`,
`mobilenet_v3_large()` and `mobilenet_v3_small()` with a fixed seed, randomises every BatchNorm's
affine parameters and every bias, measures the BN running statistics on calibration images (so
that eval-mode BN is not the identity), and writes the state dicts (np.savez), one random 224 px
image (smooth random pattern plus noise) and torchvision's eval-mode logits for it and for its
transpose. The tests write the state dicts as .safetensors, import them with `load_pretrained` and
compare the Flax logits with torchvision's (float32, max |difference| relative to the largest
|logit|). Tests skip, saying why, when torch/torchvision are not importable there.

timm's naming: timm/models/resnet.py (huggingface/pytorch-image-models) names the plain ResNet
exactly as torchvision (conv1, bn1, layer{s}.{i}.conv{j}/bn{j}, downsample.0 = conv,
downsample.1 = BN, fc); its published checkpoints are flat state dicts (hub safetensors) or
training checkpoints {'state_dict': ..., 'epoch': ...} with 'module.' prefixes from DataParallel;
its deep-stem variants (resnet50d: conv1.0/.1/...) are other architectures.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import sys
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import system_torch
from safetensors.numpy import save_file

from jaxkd import models
from jaxkd.models import convert

RTOL = 1e-4

TORCHVISION_SCRIPT = r"""
import json, sys
import numpy as np
import torch, torchvision

torch.set_num_threads(2)
out = sys.argv[1]


def images(n, seed):
  # Smooth random patterns plus fine noise: global pooling does not average the content away, so
  # the logits depend on the image (i.i.d. noise images give nearly the same logits for any input).
  g = torch.Generator().manual_seed(seed)
  coarse = torch.nn.functional.interpolate(torch.randn(n, 3, 7, 7, generator=g), size=(224, 224),
                                           mode="bicubic", align_corners=False)
  return coarse + 0.3 * torch.randn(n, 3, 224, 224, generator=g)


def randomise(model, seed):
  # Random BN affine parameters and biases; BN running statistics measured on 4 calibration images
  # (train-mode forward, cumulative average), so eval-mode BN is non-trivial and activations stay
  # O(1).
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
        module.bias.copy_(torch.randn(module.num_features, generator=g) * 0.1)
        module.momentum = None
        module.reset_running_stats()
      elif getattr(module, "bias", None) is not None:
        module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.02)
    model.train()
    model(images(4, 100 + seed))
  return model.eval()


torch.manual_seed(0)
image = images(1, 1)
np.save(f"{out}/image.npy", image.numpy())
for seed, name in enumerate(["resnet50", "mobilenet_v3_large", "mobilenet_v3_small"]):
  model = randomise(getattr(torchvision.models, name)(), seed)
  with torch.no_grad():
    np.save(f"{out}/{name}_logits.npy", model(image).numpy())
    np.save(f"{out}/{name}_logits_transposed.npy", model(image.transpose(2, 3)).numpy())
  np.savez(f"{out}/{name}_state.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
shapes = {name: {k: list(v.shape)
                 for k, v in getattr(torchvision.models, name)().state_dict().items()}
          for name in ["resnet18", "resnet34", "resnet101"]}
json.dump(shapes, open(f"{out}/shapes.json", "w"))
"""

# Writes a real PyTorch training checkpoint with torch.save under the system Python.
SAVE_CHECKPOINT_SCRIPT = r"""
import sys
import numpy as np
import torch

out = sys.argv[1]
state = dict(np.load(f"{out}/mobilenet_v3_large_state.npz"))
checkpoint = {"epoch": 3, "arch": "mobilenet_v3_large",
              "optimizer": {"param_groups": [{"step": 10}]},
              "state_dict": {"module." + k: torch.from_numpy(v) for k, v in state.items()}}
torch.save(checkpoint, f"{out}/checkpoint.pth.tar")
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
  """Directory with torchvision's state dicts (npz), image, logits and shapes; their .safetensors
  versions."""
  problem = system_torch.problem()
  if problem:
    pytest.skip(f"torchvision reference unavailable: {problem}")
  out = tmp_path_factory.mktemp("torchvision_reference")
  system_torch.run(TORCHVISION_SCRIPT, str(out))
  for name in ["resnet50", "mobilenet_v3_large", "mobilenet_v3_small"]:
    save_file(_state(out, name), str(out / f"{name}.safetensors"))
  return out


def _state(out: pathlib.Path, name: str) -> dict[str, np.ndarray]:
  with np.load(out / f"{name}_state.npz") as f:
    return {k: f[k] for k in f.files}


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _init_subset(name: str, num_classes: int, paths: list[str], **kwargs) -> dict[str, np.ndarray]:
  """The model's own `model.init(key(0), x)` values at `paths` (Flax derives each parameter's
  random stream from its module path, so the jitted subset equals the full init; only the
  selection is compiled)."""
  model = models.create(name, num_classes=num_classes, **kwargs)

  def select(key):
    variables = _flat(model.init(key, jnp.zeros((1, 32, 32, 3))))
    return {p: variables[p] for p in paths}

  return {p: np.asarray(v) for p, v in jax.jit(select)(jax.random.key(0)).items()}


def _assert_same_variables(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
  fa = {k: v for k, v in _flat(a).items() if not k.startswith(skip)}
  fb = {k: v for k, v in _flat(b).items() if not k.startswith(skip)}
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == np.float32, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_logits_match_torchvision(reference, name):
  variables, report = convert.load_pretrained(name, reference / f"{name}.safetensors",
                                              num_classes=1000, return_report=True)
  assert report.kept_at_init == [] and report.head_replaced == [] and report.ignored_keys == []
  image = np.load(reference / "image.npy").transpose(0, 2, 3, 1)  # NCHW -> NHWC
  expected = np.load(reference / f"{name}_logits.npy")
  # The reference logits depend on the image, even on its orientation: a kernel layout error
  # (kh <-> kw, i.e. the network applied to the transposed image) would be a large error, far
  # above RTOL.
  assert _relative_error(np.load(reference / f"{name}_logits_transposed.npy"), expected) > 0.05
  model = models.create(name, num_classes=1000)
  apply = jax.jit(model.apply)
  logits = np.asarray(apply(variables, image))
  error = _relative_error(logits, expected)
  print(f"{name}: max |flax - torchvision| / max |torchvision| = {error:.2e}")
  assert error < RTOL, f"{name}: relative logit error {error:.2e}"
  # The randomised running statistics matter: with BN statistics at init (0, 1) the logits are far
  # off.
  reset = jax.tree.map(lambda v: v, variables)
  reset["batch_stats"] = jax.tree_util.tree_map_with_path(
      lambda p, v: np.zeros_like(v) if p[-1].key == "mean" else np.ones_like(v),
      variables["batch_stats"])
  assert _relative_error(np.asarray(apply(reset, image)), expected) > 1e-2


def test_other_torchvision_resnets_map_strictly(reference):
  """resnet18/34/101: torchvision's key set and shapes convert with no missing / unexpected /
  mis-shaped key."""
  shapes = json.loads((reference / "shapes.json").read_text())
  for name, key_shapes in shapes.items():
    state = {k: np.broadcast_to(np.float32(0.5), s) for k, s in key_shapes.items()}
    variables, report = convert.convert_state_dict(name, state, num_classes=1000)
    n_params = sum(v.size for v in jax.tree.leaves(variables["params"]))
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    expected = sum(np.prod(s) for k, s in key_shapes.items() if not k.endswith(buffers))
    assert n_params == expected, name
    assert not report.kept_at_init and not report.head_replaced and not report.ignored_keys


def test_timm_resnet_naming_and_wrappers(reference, tmp_path):
  """A timm-style resnet50 checkpoint (no num_batches_tracked, 'module.' / 'model.' prefixes) loads
  to exactly the torchvision variables; a timm deep-stem variant is refused with a hint."""
  torchvision_vars = convert.load_pretrained("resnet50", reference / "resnet50.safetensors",
                                             num_classes=1000)
  state = _state(reference, "resnet50")
  timm = {f"module.model.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  save_file(timm, str(tmp_path / "timm_resnet50.safetensors"))
  timm_vars = convert.load_pretrained("resnet50", tmp_path / "timm_resnet50.safetensors",
                                      num_classes=1000)
  _assert_same_variables(timm_vars, torchvision_vars)
  wrapped = convert.convert_state_dict("resnet50", {"epoch": 3, "state_dict": timm},
                                       num_classes=1000)[0]
  _assert_same_variables(wrapped, torchvision_vars)
  deep_stem = {k: v for k, v in state.items() if not k.startswith("conv1.")}
  deep_stem["conv1.0.weight"] = np.zeros((32, 3, 3, 3), np.float32)
  with pytest.raises(convert.CheckpointMismatchError, match="deep 3x3 stem"):
    convert.convert_state_dict("resnet50", deep_stem, num_classes=1000)


def test_pth_training_checkpoint_read_without_torch(reference, monkeypatch):
  """A real torch.save'd training checkpoint ({'state_dict': {'module.' + key: tensor}, 'epoch',
  'optimizer'}) is read by read_checkpoint with torch not importable and converts to the same
  variables as the .safetensors file."""
  system_torch.run(SAVE_CHECKPOINT_SCRIPT, str(reference))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
  read_back = convert.read_checkpoint(reference / "checkpoint.pth.tar")
  state = _state(reference, "mobilenet_v3_large")
  assert sorted(read_back) == sorted("module." + k for k in state)
  for k, v in state.items():
    np.testing.assert_array_equal(read_back["module." + k], v)
  converted = convert.convert_state_dict("mobilenet_v3_large", read_back, num_classes=1000)[0]
  _assert_same_variables(converted, convert.load_pretrained(
      "mobilenet_v3_large", reference / "mobilenet_v3_large.safetensors", num_classes=1000))


@pytest.mark.parametrize("name,head", [("resnet50", "fc"), ("mobilenet_v3_large", "classifier_3")])
def test_head_replaced_for_other_num_classes(reference, name, head, caplog):
  full = convert.load_pretrained(name, reference / f"{name}.safetensors", num_classes=1000)
  with caplog.at_level(logging.WARNING, logger=convert.__name__):
    variables, report = convert.load_pretrained(name, reference / f"{name}.safetensors",
                                                num_classes=101, return_report=True)
  assert "has 1000 classes, the model 101" in caplog.text and head in caplog.text
  assert report.checkpoint_num_classes == 1000
  assert report.head_replaced == [f"params/{head}/bias", f"params/{head}/kernel"]
  _assert_same_variables(variables, full, skip=(f"params/{head}/",))
  fresh = _init_subset(name, 101, report.head_replaced)
  flat = _flat(variables)
  for path, value in fresh.items():
    assert flat[path].shape[-1] == 101
    np.testing.assert_array_equal(flat[path], value)
  assert np.any(fresh[f"params/{head}/kernel"] != 0)


def test_mismatches_reported_together(reference, tmp_path):
  state = _state(reference, "mobilenet_v3_large")
  state["features.99.0.weight"] = np.zeros((8, 8, 1, 1), np.float32)  # unknown
  del state["features.3.block.1.1.running_var"]  # missing
  # should be [120, 40, 1, 1]:
  state["features.5.block.0.0.weight"] = np.zeros((120, 40, 3, 3), np.float32)
  path = tmp_path / "broken.safetensors"
  save_file(state, str(path))
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.load_pretrained("mobilenet_v3_large", path, num_classes=1000)
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "broken.safetensors" in message and "'mobilenet_v3_large'" in message
  assert "1 unexpected key(s), 1 missing key(s), 1 wrong shape(s)" in message
  lines = [line.split() for line in message.splitlines()]
  assert (["unexpected", "key", "features.99.0.weight", "found", "[8,", "8,", "1,", "1]"]
          == lines[1][:8])
  assert ["missing", "key", "features.3.block.1.1.running_var", "expected", "[72]"] == lines[2][:5]
  assert "batch_stats/features_3/block_1/bn/var" in message
  assert ["wrong", "shape", "features.5.block.0.0.weight", "expected", "[120,", "40,", "1,", "1],",
          "found", "[120,", "40,", "3,", "3]"] == lines[3][:13]
  variables, report = convert.load_pretrained("mobilenet_v3_large", path, num_classes=1000,
                                              strict=False, return_report=True)
  assert len(report.problems) == 3 and report.ignored_keys == ["features.99.0.weight"]
  assert variables["batch_stats"]["features_3"]["block_1"]["bn"]["var"].shape == (72,)


@pytest.mark.parametrize("name,kwargs,kept,ignored", [
    ("mobilenet_v3_large_eca", {},
     [f"params/stage{s}_attention/conv/kernel" for s in range(1, 6)], 0),
    ("mobilenet_v3_large", {"attention": "eca"},
     [f"params/features_{n}/block_2/conv/kernel" for n in (4, 5, 6, 11, 12, 13, 14, 15)], 32),
    ("mobilenet_v3_large", {"attention": "simam"}, [], 32),
])
def test_attention_variants_keep_only_new_modules_at_init(reference, caplog, name, kwargs, kept,
                                                          ignored):
  checkpoint = reference / "mobilenet_v3_large.safetensors"
  plain = convert.load_pretrained("mobilenet_v3_large", checkpoint, num_classes=1000)
  with caplog.at_level(logging.WARNING, logger=convert.__name__):
    variables, report = convert.load_pretrained(name, checkpoint, num_classes=1000,
                                                model_kwargs=kwargs, return_report=True)
  assert sorted(report.kept_at_init) == sorted(kept)
  assert len(report.ignored_keys) == ignored
  assert all(".fc1." in k or ".fc2." in k for k in report.ignored_keys)
  if kept:
    assert "keep their initial values" in caplog.text
  flat, flat_plain = _flat(variables), _flat(plain)
  se = {k for k in flat_plain if "/fc1/" in k or "/fc2/" in k} if ignored else set()
  assert set(flat) == (set(flat_plain) - se) | set(kept)
  for k in set(flat) - set(kept):
    np.testing.assert_array_equal(flat[k], flat_plain[k], err_msg=k)
  if kept:
    for path, value in _init_subset(name, 1000, kept, **kwargs).items():
      np.testing.assert_array_equal(flat[path], value)


def test_download_cache_hit_and_file_url(tmp_path, monkeypatch):
  """Cache hit: no network. Download (from a file:// URL standing in for download.pytorch.org): the
  sha256 prefix in the file name is checked and a bad file leaves nothing in the cache."""
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / "resnet50-0676ba61.pth").write_bytes(b"cached")

  def no_network(*args, **kwargs):
    raise AssertionError("network used on a cache hit")

  monkeypatch.setattr(urllib.request, "urlopen", no_network)
  assert convert.download_pretrained("resnet50", cache_dir=cache) == cache / "resnet50-0676ba61.pth"
  assert convert.torchvision_url("mobilenet_v3_large_eca").endswith(
      "/mobilenet_v3_large-8738ca79.pth")
  # The cached file is what load_pretrained goes on to read (without torch).
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ValueError, match=r"resnet50-0676ba61\.pth' is not a PyTorch checkpoint"):
    convert.load_pretrained("resnet50", "torchvision", num_classes=1000, cache_dir=cache)
  monkeypatch.undo()

  payload = b"weights" * 1000
  digest = hashlib.sha256(payload).hexdigest()
  source = tmp_path / "server"
  source.mkdir()
  for name in (f"resnet18-{digest[:8]}.pth", "resnet18-00000000.pth"):
    (source / name).write_bytes(payload)
  monkeypatch.setitem(convert.TORCHVISION_URLS, "resnet18", {
      "IMAGENET1K_V1": (source / f"resnet18-{digest[:8]}.pth").as_uri(),
      "BAD": (source / "resnet18-00000000.pth").as_uri()})
  path = convert.download_pretrained("resnet18", cache_dir=cache)
  assert path == cache / f"resnet18-{digest[:8]}.pth" and path.read_bytes() == payload
  with pytest.raises(OSError, match="corrupt"):
    convert.download_pretrained("resnet18", weights="BAD", cache_dir=cache)
  assert sorted(p.name for p in cache.iterdir()) == sorted(["resnet50-0676ba61.pth", path.name])
