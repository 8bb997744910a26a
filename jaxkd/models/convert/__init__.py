"""Import PyTorch checkpoints (torchvision / timm state dicts) into jaxkd's Flax models.

    variables = convert.load_pretrained("resnet50", "resnet50.safetensors", num_classes=101)
    variables = convert.load_pretrained("mobilenet_v3_large_eca", "torchvision",
                                        num_classes=101)  # downloads
    logits = models.create("resnet50", num_classes=101).apply(variables, images)

One module per job, their public names re-exported here (``convert.X`` as before):

* ``reading``: ``read_checkpoint`` (.safetensors or a PyTorch pickle, without torch) and
  ``check_pretrained_readable``;
* ``naming``: the torch <-> Flax naming rules of each architecture family,
  ``convert_state_dict``, ``ConversionReport`` and ``CheckpointMismatchError``;
* ``download``: torchvision's weights (``TORCHVISION_URLS``, ``torchvision_url``,
  ``download_pretrained``, ``DEFAULT_CACHE_DIR``);
* this module: ``load_pretrained``, which puts the three together.

Supported models: `resnet18/34/50/101` (torchvision's ResNet v1.5 naming, which is also timm's
naming for its plain `resnet18/34/50/101`: conv1, bn1, layer{s}.{i}.conv{j}/bn{j},
downsample.0/.1, fc) and `mobilenet_v3_large` / `mobilenet_v3_small` / `mobilenet_v3_large_eca`
(torchvision naming: features.N..., classifier.0/.3). The key -> Flax path rules are the ones in
the docstrings of `resnet.py` and `mobilenetv3.py`; tensor layouts: conv weight [O, I/g, kh, kw]
-> kernel [kh, kw, I/g, O] (transpose (2, 3, 1, 0)), Linear weight [O, I] -> kernel [I, O],
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var,
num_batches_tracked dropped.

Checkpoints: `.safetensors` (read with safetensors' NumPy API) or a PyTorch pickle written by
`torch.save` (`.pth`, `.pt`, `.pth.tar`, `.bin`, `.ckpt`; the zip format of PyTorch >= 1.6, which
all of torchvision's published weights use). Neither needs torch: PyTorch pickles are read by
`jaxkd.models.torch_pickle`, a restricted unpickler that rebuilds tensors as NumPy arrays and
refuses every Python object other than tensors, OrderedDicts and plain values (so a malicious file
cannot run code). Wrapper dicts ({'state_dict': ...}, {'model': ...}, {'model_state_dict': ...})
and key prefixes shared by every key ('module.' from DataParallel, 'model.', '_orig_mod.' from
torch.compile) are removed.

Rules (what loads, what is kept at the model's init, what is an error):
  * Every checkpoint tensor must have a counterpart of the same shape and every model variable
    must come from the checkpoint, except:
  * the classifier (ResNet `fc`, MobileNetV3 `classifier_3`) when its number of classes differs
    from `num_classes`: it is replaced by the model's fresh initialisation (logged);
  * modules the checkpoint cannot have: stage attention (`stage{s}_attention`, e.g. the ECA
    modules of `mobilenet_v3_large_eca`) and, when the model's in-block attention is not 'se', the
    attention in the SE slot (its SE tensors in the checkpoint are then ignored). These keep the
    model's init (logged, and listed in the `ConversionReport`).
  * Everything else that does not fit (unknown keys, missing keys, wrong shapes) raises ONE
    `CheckpointMismatchError` listing all of them. `strict=False` turns it into a logged warning:
    unexpected keys are ignored and missing / mis-shaped variables keep the model's init.
"Initial values" are exactly `model.init(rng, images)`'s (Flax derives every parameter's random
stream from its module path, so the needed subset is computed alone, in one small jit-compiled
program).

`load_pretrained(name, "torchvision")` (or "torchvision:IMAGENET1K_V2") downloads torchvision's
official ImageNet weights (URLs from torchvision's `*_Weights` enums) into ~/.cache/jaxkd with
`download_pretrained`. `check_pretrained_readable(spec, model)` checks a checkpoint spec up front
(the file exists, its format is known and readable with what is installed, the torchvision
weights name is known) without reading tensors or using the network.

JAX and the model code are imported where they are used: `read_checkpoint` needs only NumPy (and
safetensors for .safetensors files).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jaxkd.models.convert.download import (
    DEFAULT_CACHE_DIR,
    TORCHVISION_URLS,
    download_pretrained,
    torchvision_url,
)
from jaxkd.models.convert.naming import (
    CheckpointMismatchError,
    ConversionReport,
    convert_state_dict,
)
from jaxkd.models.convert.reading import check_pretrained_readable, read_checkpoint

__all__ = [
    "load_pretrained",
    "read_checkpoint", "check_pretrained_readable",
    "convert_state_dict", "ConversionReport", "CheckpointMismatchError",
    "TORCHVISION_URLS", "DEFAULT_CACHE_DIR", "torchvision_url", "download_pretrained",
]


def load_pretrained(name: str, path: str | os.PathLike, *, num_classes: int, strict: bool = True,
                    rng: Any = 0, model_kwargs: Mapping[str, Any] | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    return_report: bool = False) -> Any:
  """Flax variables {'params', 'batch_stats'} (NumPy float32) of model `name` from a PyTorch
  checkpoint.

  `path`: a .safetensors / .pth / .pt file, or 'torchvision' ('torchvision:IMAGENET1K_V2') for
  torchvision's official ImageNet weights, downloaded into `cache_dir` (a .pth, read without
  torch). `model_kwargs` go to `jaxkd.models.create` (e.g. {'attention': 'eca'}). Returns the
  variables, or (variables, ConversionReport) with `return_report=True`. Raises
  CheckpointMismatchError (listing every unexpected, missing or mis-shaped key) unless
  `strict=False`.
  """
  spec = os.fspath(path)
  if spec == "torchvision" or spec.startswith("torchvision:"):
    weights = spec.partition(":")[2] or "IMAGENET1K_V1"
    spec = os.fspath(download_pretrained(name, weights=weights, cache_dir=cache_dir))
  variables, report = convert_state_dict(name, read_checkpoint(spec), num_classes=num_classes,
                                         strict=strict, rng=rng, source=repr(spec),
                                         model_kwargs=model_kwargs)
  return (variables, report) if return_report else variables
