"""Torch-free reading of torch.save checkpoints (jaxkd.models.torch_pickle, read_checkpoint).

The checkpoints here are written by this file's own writer: a zip archive laid out as torch.save
lays it out (`<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/byteorder`, `<prefix>/version`)
whose data.pkl is pickle protocol 2 emitted opcode by opcode (GLOBAL, BINPERSID, REDUCE, ...; not
Python's Pickler), with the storage bytes from NumPy. Expected tensor values are computed by
indexing the storage element by element (offset + sum(i_k * stride_k)), independently of the
reader's strided views. Every test runs with `sys.modules['torch'] = None`, so an `import torch`
anywhere on the path would fail.

With torch and torchvision in the system Python (/usr/bin/python3 with Debian's
python3-torchvision, as CI installs it), files written by real torch.save (a torchvision resnet18
state dict; tensors of several dtypes and memory layouts; the legacy format) are read and compared
with torch.load's own values; those tests skip, saying why, elsewhere.
"""
from __future__ import annotations

import collections
import itertools
import os
import pathlib
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest
import system_torch
from safetensors.numpy import save_file

from jaxkd.models import convert, torch_pickle


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
  """`import torch` fails during every test here: the reader must not need it."""
  monkeypatch.setitem(sys.modules, "torch", None)

# ------------------------------------------------------------------------------ hand-made writer


class Global:
  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


class Call:
  """`func(*args)`: pushed as func, MARK args TUPLE, REDUCE."""
  def __init__(self, func, *args):
    self.func, self.args = func, args


class PersistentId:
  def __init__(self, pid: tuple):
    self.pid = pid


class ODict:
  def __init__(self, items):
    self.items = list(items)


def _emit(value, out: bytearray) -> None:
  """Protocol-2 opcodes (pickletools' names) that push `value`."""
  if isinstance(value, Global):
    out += b"c" + f"{value.module}\n{value.name}\n".encode("ascii")  # GLOBAL
  elif isinstance(value, Call):
    _emit(value.func, out)
    _emit(tuple(value.args), out)
    out += b"R"  # REDUCE
  elif isinstance(value, PersistentId):
    _emit(value.pid, out)
    out += b"Q"  # BINPERSID
  elif isinstance(value, ODict):
    _emit(Call(Global("collections", "OrderedDict")), out)
    _emit_items(value.items, out)
  elif isinstance(value, dict):
    out += b"}"  # EMPTY_DICT
    _emit_items(list(value.items()), out)
  elif value is None:
    out += b"N"
  elif isinstance(value, bool):
    out += b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
  elif isinstance(value, int):
    if 0 <= value < 256:
      out += b"K" + bytes([value])  # BININT1
    else:
      out += b"J" + struct.pack("<i", value)  # BININT
  elif isinstance(value, float):
    out += b"G" + struct.pack(">d", value)  # BINFLOAT
  elif isinstance(value, str):
    data = value.encode("utf-8")
    out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
  elif isinstance(value, tuple):
    if not value:
      out += b")"  # EMPTY_TUPLE
      return
    out += b"("  # MARK
    for item in value:
      _emit(item, out)
    out += b"t"  # TUPLE
  else:
    raise TypeError(type(value))


def _emit_items(items, out: bytearray) -> None:
  if items:
    out += b"("  # MARK
    for k, v in items:
      _emit(k, out)
      _emit(v, out)
    out += b"u"  # SETITEMS


def pickle_bytes(value) -> bytes:
  out = bytearray(b"\x80\x02")  # PROTO 2
  _emit(value, out)
  return bytes(out + b".")  # STOP


STORAGE_TYPE = {"float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage",
                "float64": "DoubleStorage", "bfloat16": "BFloat16Storage", "uint8": "ByteStorage"}


def tensor(storage_type: str, key: str, numel: int, offset: int, size: tuple, stride: tuple,
           parameter: bool = False):
  """The pickle expression torch.save writes for a tensor on storage `key`."""
  storage = PersistentId(("storage", Global("torch", storage_type), key, "cpu", numel))
  value = Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, offset, size, stride, False,
               Call(Global("collections", "OrderedDict")))
  if parameter:
    value = Call(Global("torch._utils", "_rebuild_parameter"), value, True,
                 Call(Global("collections", "OrderedDict")))
  return value


def write_checkpoint(path, obj, storages: dict[str, bytes], prefix: str = "archive",
                     byteorder: str | None = "little", data_pkl: bytes | None = None) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", data_pkl if data_pkl is not None else pickle_bytes(obj))
    if byteorder is not None:
      z.writestr(f"{prefix}/byteorder", byteorder)
    for key, data in storages.items():
      z.writestr(f"{prefix}/data/{key}", data)
    z.writestr(f"{prefix}/version", "3\n")


def element_view(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
  """storage[offset + sum(i_k * stride_k)] for every index, one element at a time."""
  out = np.empty(size, storage.dtype)
  for index in itertools.product(*(range(n) for n in size)):
    out[index] = storage[offset + sum(i * s for i, s in zip(index, stride))]
  return out


def write_state_dict(path, state: dict[str, np.ndarray], channels_last: bool = False,
                     byteorder: str = "little") -> None:
  """A torch.save'd OrderedDict of `state` (float32/float16/int64 arrays); 4-D tensors stored
  channels-last (storage [O, kh, kw, I], stride (kh*kw*I, 1, kw*I, I)) when `channels_last`."""
  items, storages = [], {}
  order = ">" if byteorder == "big" else "<"
  for i, (name, array) in enumerate(state.items()):
    key = str(i)
    if channels_last and array.ndim == 4:
      o, c, h, w = array.shape
      data, stride = np.transpose(array, (0, 2, 3, 1)), (h * w * c, 1, w * c, c)
    else:
      data = array
      stride = tuple(int(np.prod(array.shape[d + 1:])) for d in range(array.ndim))
    storages[key] = np.ascontiguousarray(data).astype(array.dtype.newbyteorder(order)).tobytes()
    items.append((name, tensor(STORAGE_TYPE[array.dtype.name], key, array.size, 0, array.shape,
                               stride)))
  write_checkpoint(path, ODict(items), storages, byteorder=byteorder)

# ------------------------------------------------------------------------------------------- tests


FLOATS = np.arange(12, dtype=np.float32) * 0.5 - 2.0  # storage '0'
HALVES = np.array([1.5, -0.25, 65504.0], np.float16)  # storage '1'
BF16_BITS = np.array([0x3F80, 0xC040, 0x3E20, 0x7F80], np.uint16)  # 1, -3, 0.15625, inf
BF16_VALUES = np.array([1.0, -3.0, 0.15625, np.inf], np.float32)
VIEWS = {  # name: (offset, size, stride) on FLOATS
    "weight": (0, (3, 4), (4, 1)),
    "weight_t": (0, (4, 3), (1, 4)),  # transposed: not contiguous
    "window": (5, (2, 2), (4, 2)),  # offset, every other column
    "row": (8, (4,), (1,)),
    "broadcast": (2, (3, 2), (0, 1)),  # expand(): stride 0
}


def _tiny(byteorder: str = "little") -> tuple[object, dict[str, bytes]]:
  order = ">" if byteorder == "big" else "<"
  items = [(name, tensor("FloatStorage", "0", 12, *view)) for name, view in VIEWS.items()]
  items += [
      ("half", tensor("HalfStorage", "1", 3, 0, (3,), (1,))),
      ("bn.num_batches_tracked", tensor("LongStorage", "2", 1, 0, (), ())),
      ("bf16", tensor("BFloat16Storage", "3", 4, 0, (2, 2), (2, 1))),
      ("bias", tensor("FloatStorage", "0", 12, 10, (2,), (1,), parameter=True)),
      ("stateful", Call(Global("torch._tensor", "_rebuild_from_type_v2"),  # tensor.x = ... set
                        Global("torch._utils", "_rebuild_tensor_v2"), Global("torch", "Tensor"),
                        (PersistentId(("storage", Global("torch", "FloatStorage"), "0", "cpu", 12)),
                         1, (2,), (3,), False, Call(Global("collections", "OrderedDict"))),
                        {"note": "kept by torch, dropped here"})),
      ("int32_v3", Call(Global("torch._utils", "_rebuild_tensor_v3"),
                        PersistentId(("storage", Global("torch.storage", "UntypedStorage"), "4",
                                      "cpu", 8)),
                        0, (2,), (1,), False, Call(Global("collections", "OrderedDict")),
                        Global("torch", "int32"))),
  ]
  storages = {"0": FLOATS.astype(order + "f4").tobytes(),
              "1": HALVES.astype(order + "f2").tobytes(),
              "2": np.array([123456789012], order + "i8").tobytes(),
              "3": BF16_BITS.astype(order + "u2").tobytes(),
              "4": np.array([7, -1], order + "i4").tobytes()}
  obj = {"epoch": 7, "arch": "tiny", "lr": (0.1, None), "state_dict": ODict(items)}
  return obj, storages


def _check_tiny(state) -> None:
  assert list(state) == list(VIEWS) + ["half", "bn.num_batches_tracked", "bf16", "bias", "stateful",
                                       "int32_v3"]
  for name, (offset, size, stride) in VIEWS.items():
    expected = element_view(FLOATS, offset, size, stride)
    assert state[name].dtype == np.float32 and state[name].flags.c_contiguous, name
    np.testing.assert_array_equal(state[name], expected, err_msg=name)
  np.testing.assert_array_equal(state["window"], [[0.5, 1.5], [2.5, 3.5]])  # by hand: 0.5 * i - 2
  assert state["half"].dtype == np.float16
  np.testing.assert_array_equal(state["half"], HALVES)
  count = state["bn.num_batches_tracked"]
  assert count.dtype == np.int64 and count.shape == () and int(count) == 123456789012
  assert state["bf16"].dtype == np.float32
  np.testing.assert_array_equal(state["bf16"], BF16_VALUES.reshape(2, 2))
  np.testing.assert_array_equal(state["bias"], [3.0, 3.5])
  np.testing.assert_array_equal(state["stateful"], [-1.5, 0.0])
  np.testing.assert_array_equal(state["broadcast"], [[-1.0, -0.5]] * 3)
  assert state["int32_v3"].dtype == np.int32
  np.testing.assert_array_equal(state["int32_v3"], [7, -1])


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_hand_made_checkpoint_exact_values(tmp_path, byteorder):
  obj, storages = _tiny(byteorder or "little")
  path = tmp_path / "tiny.pth"
  write_checkpoint(path, obj, storages, byteorder=byteorder)  # None: no byteorder record (little)
  loaded = torch_pickle.load(path)
  assert loaded["epoch"] == 7 and loaded["arch"] == "tiny" and loaded["lr"] == (0.1, None)
  assert isinstance(loaded["state_dict"], collections.OrderedDict)
  _check_tiny(loaded["state_dict"])
  loaded["state_dict"]["weight"][0, 0] = 99.0  # a copy: views of one storage do not alias
  assert loaded["state_dict"]["weight_t"][0, 0] == FLOATS[0]
  _check_tiny(convert.read_checkpoint(path))  # {'state_dict': ...} unwrapped


def test_view_outside_storage_refused(tmp_path):
  for offset, size, stride in [(0, (4, 4), (4, 1)), (11, (2,), (1,)), (-1, (2,), (1,)),
                               (0, (2,), (-1,))]:
    path = tmp_path / "bad.pth"
    write_checkpoint(path, ODict([("w", tensor("FloatStorage", "0", 12, offset, size, stride))]),
                     {"0": FLOATS.tobytes()})
    with pytest.raises(torch_pickle.UnsupportedCheckpointError, match=r"bad\.pth.*storage '0'"):
      torch_pickle.load(path)
  path = tmp_path / "short.pth"  # the record holds fewer bytes than the storage's numel says
  write_checkpoint(path, ODict([("w", tensor("FloatStorage", "0", 12, 0, (12,), (1,)))]),
                   {"0": FLOATS[:6].tobytes()})
  with pytest.raises(torch_pickle.UnsupportedCheckpointError, match="has 24 bytes, fewer than 12"):
    torch_pickle.load(path)


class _Shell:
  def __init__(self, function, command):
    self.function, self.command = function, command

  def __reduce__(self):
    return self.function, (self.command,)


# Python's pickler writes builtins as '__builtin__' below protocol 3 (Python 2 names).
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("function,qualified", [
    (os.system, rf"{os.system.__module__}\.system"), (eval, r"(builtins|__builtin__)\.eval")])
def test_malicious_pickle_refused_and_not_run(tmp_path, protocol, function, qualified):
  marker = tmp_path / "ran"
  command = f"open({str(marker)!r}, 'w').close()" if function is eval else f"touch {marker}"
  data = pickle.dumps({"state_dict": {"w": _Shell(function, command)}}, protocol=protocol)
  assert function.__name__.encode() in data  # the pickle does name the function
  path = tmp_path / "evil.pth"
  write_checkpoint(path, None, {}, data_pkl=data)
  with pytest.raises(torch_pickle.ForbiddenGlobalError,
                     match=rf"evil\.pth' refers to the Python object {qualified}, which"):
    torch_pickle.load(path)
  with pytest.raises(ValueError, match=qualified):
    convert.load_pretrained("resnet18", path, num_classes=10)
  assert not marker.exists()
  pickle.loads(data)  # the same bytes do run the command when unpickled without restriction
  assert marker.exists()


def test_placeholders_cannot_be_modified(tmp_path):
  """BUILD on an allowed global (setting attributes of an object the reader handed out) is
  refused, and the reader's own storage type table is unchanged afterwards."""
  build = bytearray(b"\x80\x02")
  _emit(Global("torch", "FloatStorage"), build)
  _emit({"dtype": "evil"}, build)
  data = bytes(build + b"b.")  # BUILD, STOP
  path = tmp_path / "build.pth"
  write_checkpoint(path, None, {}, data_pkl=data)
  with pytest.raises(torch_pickle.UnsupportedCheckpointError, match=r"build\.pth.*sets the state"):
    torch_pickle.load(path)
  assert torch_pickle._STORAGE_TYPES["FloatStorage"].dtype.name == "float32"
  build = bytearray(b"\x80\x02")
  _emit(tensor("FloatStorage", "0", 12, 0, (12,), (1,)), build)
  _emit((None, {"array": "evil"}), build)  # slot state: setattr on the rebuilt tensor
  write_checkpoint(tmp_path / "tensor.pth", None, {"0": FLOATS.tobytes()},
                   data_pkl=bytes(build + b"b."))
  with pytest.raises(torch_pickle.UnsupportedCheckpointError, match=r"tensor\.pth.*sets the state"):
    torch_pickle.load(tmp_path / "tensor.pth")


def test_other_formats_refused_with_what_to_do(tmp_path):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # magic number, protocol
                     + pickle.dumps(1001, protocol=2))
  with pytest.raises(torch_pickle.UnsupportedCheckpointError,
                     match=r"legacy \(< 1\.6\).*torch\.save\(torch\.load"):
    torch_pickle.load(legacy)
  with pytest.raises(ValueError, match=r"pretrained checkpoint .*legacy\.pth.*legacy"):
    convert.check_pretrained_readable(str(legacy))
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(torch_pickle.UnsupportedCheckpointError,
                     match=r"junk\.pt.*not a PyTorch checkpoint"):
    convert.read_checkpoint(junk)
  script = tmp_path / "scripted.pt"
  with zipfile.ZipFile(script, "w") as z:
    z.writestr("scripted/constants.pkl", b"")
    z.writestr("scripted/code/__torch__.py", b"")
  with pytest.raises(torch_pickle.UnsupportedCheckpointError, match="TorchScript"):
    torch_pickle.load(script)


def test_check_pretrained_readable(tmp_path, monkeypatch):
  check = convert.check_pretrained_readable
  check("torchvision")
  check("torchvision:IMAGENET1K_V2")
  check("torchvision:IMAGENET1K_V2", "resnet50")
  check("torchvision", "mobilenet_v3_large_eca")
  with pytest.raises(ValueError,
                     match=r"'torchvision:IMAGENET1K_V2'.*mobilenet_v3_small.*IMAGENET1K_V1"):
    check("torchvision:IMAGENET1K_V2", "mobilenet_v3_small")
  with pytest.raises(ValueError, match=r"'torchvision:V9'.*no weights 'V9'"):
    check("torchvision:V9")
  with pytest.raises(ValueError, match=r"'torchvision'.*no PyTorch checkpoint import for model "
                                       r"'resnet20'"):
    check("torchvision", "resnet20")  # the CIFAR ResNet
  with pytest.raises(ValueError, match=r"'torchvision'.*unknown model 'resnet51'"):
    check("torchvision", "resnet51")
  with pytest.raises(ValueError, match=r"'~/nowhere/w\.pth' is not a file"):
    check("~/nowhere/w.pth")
  obj, storages = _tiny()
  write_checkpoint(tmp_path / "tiny.pth", obj, storages)
  check(str(tmp_path / "tiny.pth"))
  check(str(tmp_path / "tiny.pth"), "mobilenet_v3_large")
  with pytest.raises(ValueError, match=r"tiny\.pth'.*no PyTorch checkpoint import for model "
                                       r"'vgg8'"):
    check(str(tmp_path / "tiny.pth"), "vgg8")
  monkeypatch.setenv("HOME", str(tmp_path))
  check("~/tiny.pth")
  (tmp_path / "w.npz").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"w\.npz.*unknown checkpoint format"):
    check(str(tmp_path / "w.npz"))
  save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "w.safetensors"))
  check(str(tmp_path / "w.safetensors"))
  (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match=r"bad\.safetensors.*not a \.safetensors file"):
    check(str(tmp_path / "bad.safetensors"))
  monkeypatch.setitem(sys.modules, "safetensors", None)  # find_spec gives None: not installed
  with pytest.raises(ValueError, match=r"w\.safetensors.*pip install"):
    check(str(tmp_path / "w.safetensors"))


def _resnet18_state(num_classes: int) -> dict[str, np.ndarray]:
  """torchvision resnet18's keys and shapes (written out by hand), random values."""
  rng = np.random.default_rng(0)
  state = {}

  def conv(name, out, inp, k):
    state[f"{name}.weight"] = (rng.standard_normal((out, inp, k, k)) * 0.05).astype(np.float32)

  def bn(name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    state[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    state[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  cin = 64
  for stage, cout in enumerate([64, 128, 256, 512], 1):
    for block in range(2):
      p = f"layer{stage}.{block}"
      conv(f"{p}.conv1", cout, cin if block == 0 else cout, 3)
      bn(f"{p}.bn1", cout)
      conv(f"{p}.conv2", cout, cout, 3)
      bn(f"{p}.bn2", cout)
      if block == 0 and stage > 1:
        conv(f"{p}.downsample.0", cout, cin, 1)
        bn(f"{p}.downsample.1", cout)
    cin = cout
  state["fc.weight"] = (rng.standard_normal((num_classes, 512)) * 0.05).astype(np.float32)
  state["fc.bias"] = np.zeros(num_classes, np.float32)
  state["fc.bias"][:] = np.arange(num_classes) * 0.01
  return state


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_load_pretrained_pth_equals_safetensors(tmp_path):
  """The same resnet18 state dict as .safetensors and as a .pth (conv weights stored channels-last,
  i.e. strided, as torch.save writes a channels_last model) gives identical Flax variables."""
  state = _resnet18_state(num_classes=10)
  save_file(state, str(tmp_path / "r18.safetensors"))
  write_state_dict(tmp_path / "r18.pth", state, channels_last=True)
  read = convert.read_checkpoint(tmp_path / "r18.pth")
  assert list(read) == list(state)
  for k, v in state.items():
    assert read[k].dtype == v.dtype, k
    np.testing.assert_array_equal(read[k], v, err_msg=k)
  a = _flat(convert.load_pretrained("resnet18", tmp_path / "r18.pth", num_classes=10))
  b = _flat(convert.load_pretrained("resnet18", tmp_path / "r18.safetensors", num_classes=10))
  assert sorted(a) == sorted(b) and len(a) == 4 * 20 + 20 + 2  # 20 BNs, 20 convs, fc
  for k in a:
    assert a[k].dtype == np.float32
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(a["params/conv1/kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))

# ---------------------------------------------------------------------- files written by real torch


REAL_TORCH_SCRIPT = r"""
import sys
import numpy as np
import torch, torchvision

out = sys.argv[1]
torch.manual_seed(0)
model = torchvision.models.resnet18()
torch.save(model.state_dict(), f"{out}/resnet18.pth")
x = torch.randn(4, 6)
stateful = torch.randn(3)
stateful.note = "a Python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
extras = {
    "float16": torch.randn(5).half(), "bfloat16": torch.randn(2, 3).bfloat16(),
    "transposed": x.t(), "window": x[1:, ::2], "expanded": torch.randn(3, 1).expand(3, 4),
    "int64": torch.arange(-3, 3), "int32": torch.arange(4, dtype=torch.int32),
    "uint8": torch.arange(250, 256, dtype=torch.uint8), "bool": torch.tensor([True, False]),
    "float64": torch.randn(3, dtype=torch.float64), "scalar": torch.tensor(2.5),
    "channels_last": torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last),
    "parameter": torch.nn.Parameter(torch.randn(3)), "stateful": stateful,
    "empty": torch.zeros(0, 3)}
torch.save({"epoch": 2, "tensors": extras, "shared": [x, x.t()]}, f"{out}/extras.pt")
torch.save({"w": x}, f"{out}/legacy.pth", _use_new_zipfile_serialization=False)
for name in ("resnet18.pth", "extras.pt"):
  loaded = torch.load(f"{out}/{name}", weights_only=True)
  flat = loaded if name == "resnet18.pth" else {
      **loaded["tensors"], "shared0": loaded["shared"][0], "shared1": loaded["shared"][1]}
  np.savez(f"{out}/{name}.npz", **{
      k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in flat.items()})
print(torch.__version__)
"""


@pytest.fixture(scope="module")
def real_torch_files(tmp_path_factory) -> pathlib.Path:
  problem = system_torch.problem()
  if problem:
    pytest.skip(f"files written by real torch unavailable: {problem}")
  out = tmp_path_factory.mktemp("torch_saved")
  version = system_torch.run(REAL_TORCH_SCRIPT, str(out), what="torch script")
  print(f"written by torch {version.strip()}")
  return out


def _npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_real_torchvision_resnet18_matches_torch_load(real_torch_files):
  expected = _npz(real_torch_files / "resnet18.pth.npz")
  loaded = torch_pickle.load(real_torch_files / "resnet18.pth")
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(expected)
  assert len(loaded) == 122  # torchvision resnet18's state dict
  for k, v in expected.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  variables = convert.load_pretrained("resnet18", real_torch_files / "resnet18.pth",
                                      num_classes=1000)
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], expected["fc.weight"].T)


def test_real_torch_dtypes_and_layouts_match_torch_load(real_torch_files):
  expected = _npz(real_torch_files / "extras.pt.npz")
  loaded = torch_pickle.load(real_torch_files / "extras.pt")
  assert loaded["epoch"] == 2 and isinstance(loaded["shared"], list)
  flat = {**loaded["tensors"], "shared0": loaded["shared"][0], "shared1": loaded["shared"][1]}
  assert sorted(flat) == sorted(expected)
  for k, v in expected.items():
    assert flat[k].dtype == v.dtype and flat[k].shape == v.shape, (k, flat[k].dtype, v.dtype)
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  assert flat["bfloat16"].dtype == np.float32 and flat["float16"].dtype == np.float16
  with pytest.raises(torch_pickle.UnsupportedCheckpointError,
                     match=r"legacy\.pth' is in PyTorch's legacy"):
    torch_pickle.load(real_torch_files / "legacy.pth")
