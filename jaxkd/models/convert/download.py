"""torchvision's official ImageNet weights: their URLs (``TORCHVISION_URLS``, ``torchvision_url``)
and ``download_pretrained``, which fetches one into the cache (~/.cache/jaxkd) and checks it."""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import tempfile
import urllib.request

# One logger for the whole jaxkd.models.convert package (its name as before the split).
logger = logging.getLogger("jaxkd.models.convert")

# torchvision's official ImageNet-1k weights (torchvision.models.*_Weights, torchvision 0.14+).
# The file names carry the first hex digits of the file's sha256.
_PYTORCH_MODELS = "https://download.pytorch.org/models"
TORCHVISION_URLS: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/resnet18-f37072fd.pth"},
    "resnet34": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/resnet34-b627a593.pth"},
    "resnet50": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/resnet50-0676ba61.pth",
                 "IMAGENET1K_V2": f"{_PYTORCH_MODELS}/resnet50-11ad3fa6.pth"},
    "resnet101": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/resnet101-63fe2227.pth",
                  "IMAGENET1K_V2": f"{_PYTORCH_MODELS}/resnet101-cd907fc2.pth"},
    "mobilenet_v3_large": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/mobilenet_v3_large-8738ca79.pth",
                           "IMAGENET1K_V2": f"{_PYTORCH_MODELS}/mobilenet_v3_large-5c1a4163.pth"},
    "mobilenet_v3_small": {"IMAGENET1K_V1": f"{_PYTORCH_MODELS}/mobilenet_v3_small-047dcff4.pth"},
}
# jaxkd models whose torchvision weights are another model's (the extra modules keep their init).
_TORCHVISION_BASE = {"mobilenet_v3_large_eca": "mobilenet_v3_large"}
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "jaxkd")


def torchvision_url(name: str, weights: str = "IMAGENET1K_V1") -> str:
  """URL of torchvision's `weights` (e.g. 'IMAGENET1K_V1') for jaxkd model `name`."""
  base = _TORCHVISION_BASE.get(name, name)
  if base not in TORCHVISION_URLS:
    raise ValueError(f"no torchvision weights for model {name!r}; available for "
                     f"{sorted(TORCHVISION_URLS)} and {sorted(_TORCHVISION_BASE)}")
  if weights not in TORCHVISION_URLS[base]:
    raise ValueError(f"torchvision has no weights {weights!r} for {base}; "
                     f"choose one of {sorted(TORCHVISION_URLS[base])}")
  return TORCHVISION_URLS[base][weights]


def download_pretrained(name: str, *, weights: str = "IMAGENET1K_V1",
                        cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Path of torchvision's `weights` for `name` in `cache_dir` (default ~/.cache/jaxkd),
  downloading it first when absent: streamed to a temporary file in the cache, sha256-checked
  against the hash prefix in torchvision's file name, then renamed into place (a failed download
  leaves nothing behind)."""
  url = torchvision_url(name, weights)
  cache_dir = cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR
  cache = pathlib.Path(os.path.expanduser(os.fspath(cache_dir)))
  target = cache / url.rsplit("/", 1)[-1]
  if target.is_file():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  hash_prefix = re.search(r"-([0-9a-f]{8,})\.", target.name)
  logger.warning("downloading %s to %s", url, target)
  fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name + ".", suffix=".partial")
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      while chunk := response.read(1 << 20):
        out.write(chunk)
        digest.update(chunk)
    if hash_prefix and not digest.hexdigest().startswith(hash_prefix[1]):
      raise OSError(f"download of {url} is corrupt: its sha256 is {digest.hexdigest()}, the file "
                    f"name says it starts with {hash_prefix[1]}; nothing was saved, try again")
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return target
