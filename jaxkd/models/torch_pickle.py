"""Reads PyTorch checkpoints written by `torch.save` into NumPy arrays, without torch.

    obj = torch_pickle.load("resnet50-0676ba61.pth")   # e.g. OrderedDict {name: np.ndarray}

Format (torch.save since PyTorch 1.6; torchvision's published weights): a zip archive whose records
lie under one folder `<prefix>/`: `data.pkl`, a pickle of the saved object; `data/<key>`, the raw
bytes of storage `key`; `byteorder` ('little' or 'big'; absent in old files, which are little).
In data.pkl every tensor is a call `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
stride, requires_grad, backward_hooks[, metadata])` (`_rebuild_tensor_v3(..., dtype[, metadata])`
for dtypes without a legacy storage class; wrapped in `_rebuild_parameter(tensor, requires_grad,
backward_hooks)` for an `nn.Parameter`), and every storage is a persistent id
`('storage', <storage type>, key, location, numel)`.

Security: unpickling calls whatever global the pickle names, so a `.pth` from elsewhere could run
any code (`os.system`, `builtins.eval`, ...). `load` accepts only the names in `ALLOWED_GLOBALS`
(collections.OrderedDict, the tensor and parameter rebuild functions, storage types, torch dtypes:
a subset of what `torch.load(weights_only=True)` accepts), each bound to this module's own NumPy
implementation; any other global is refused with `ForbiddenGlobalError` naming it, before anything
is imported or called. Objects handed to the pickle machine refuse attribute and state changes (the
BUILD opcode), and offsets, sizes and strides are checked against the storage's length before any
view of its bytes is taken.

Tensors come back as C-contiguous NumPy arrays of the tensor's dtype (copies, honouring storage
offset, size and stride, so views of one storage are separate arrays); bfloat16, which NumPy lacks,
becomes float32 of the same value (the 16 bits shifted into the upper half of a float32). Quantized
and float8 tensors are refused (by the name of their storage type or dtype).

Not read: PyTorch's legacy format (< 1.6, or `_use_new_zipfile_serialization=False`: a stream of
pickles), the older tar format and TorchScript archives (`torch.jit.save`); each is recognised and
refused saying how to re-save the file. torchvision re-saved its oldest weights in the zip format,
and the `*_Weights` URLs that `jaxkd.models.convert.TORCHVISION_URLS` lists are those zip files.

Imports only the standard library and NumPy.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import tarfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["load", "check_format", "ForbiddenGlobalError", "UnsupportedCheckpointError",
           "ALLOWED_GLOBALS"]


class ForbiddenGlobalError(pickle.UnpicklingError, ValueError):
  """The pickle names a global outside `ALLOWED_GLOBALS` (it was neither imported nor called)."""


class UnsupportedCheckpointError(ValueError):
  """Not a torch.save zip checkpoint this reader can read (the message says what the file is)."""


class _Frozen:
  """Base of every object this reader hands to the pickle machine: no attribute can be set and no
  state restored on it (the BUILD opcode would otherwise let a file change the reader's objects)."""
  __slots__ = ()

  def __init__(self, *values: Any):
    for name, value in zip(self.__slots__, values, strict=True):
      object.__setattr__(self, name, value)

  def __setattr__(self, name: str, value: Any) -> None:
    raise UnsupportedCheckpointError(f"the pickle sets attribute {name!r} of {self!r}")

  def __setstate__(self, state: Any) -> None:
    raise UnsupportedCheckpointError(f"the pickle sets the state of {self!r}")

  def __repr__(self) -> str:
    return f"<{type(self).__name__} {getattr(self, self.__slots__[0])}>"


class _Dtype(_Frozen):
  """A torch dtype: its name and the NumPy dtype string of its little-endian storage bytes."""
  __slots__ = ("name", "storage")  # storage: '<f4', ...; '<u2' for bfloat16

  def numpy_dtype(self, byteorder: str) -> np.dtype:
    dtype = np.dtype(self.storage)
    return dtype.newbyteorder(">") if byteorder == "big" and dtype.itemsize > 1 else dtype


class _StorageType(_Frozen):
  """A torch storage class (torch.FloatStorage, ...); dtype None for torch.UntypedStorage."""
  __slots__ = ("name", "dtype")


class _TensorType(_Frozen):
  """torch.Tensor / torch.nn.Parameter as the `new_type` argument of `_rebuild_from_type_v2`."""
  __slots__ = ("name",)


class _Function(_Frozen):
  """An allowed global that the pickle may call."""
  __slots__ = ("name", "function")

  def __call__(self, *args: Any) -> Any:
    return self.function(*args)


_DTYPES = {d.name: d for d in (
    _Dtype("float64", "<f8"), _Dtype("float32", "<f4"), _Dtype("float16", "<f2"),
    _Dtype("bfloat16", "<u2"), _Dtype("int64", "<i8"), _Dtype("int32", "<i4"),
    _Dtype("int16", "<i2"), _Dtype("int8", "i1"), _Dtype("uint8", "u1"), _Dtype("uint16", "<u2"),
    _Dtype("uint32", "<u4"), _Dtype("uint64", "<u8"), _Dtype("bool", "?"),
    _Dtype("complex64", "<c8"), _Dtype("complex128", "<c16"))}
_STORAGE_TYPES = {f"{prefix}Storage": _StorageType(f"{prefix}Storage", _DTYPES[dtype])
                  for prefix, dtype in (
                      ("Double", "float64"), ("Float", "float32"), ("Half", "float16"),
                      ("BFloat16", "bfloat16"), ("Long", "int64"), ("Int", "int32"),
                      ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"),
                      ("ComplexFloat", "complex64"), ("ComplexDouble", "complex128"))}
_UNTYPED = _StorageType("UntypedStorage", None)


class _Storage(_Frozen):
  """One storage record: its elements, a 1-D array of the storage type's dtype (uint8: untyped)."""
  __slots__ = ("key", "type", "elements")

  def as_dtype(self, dtype: _Dtype, byteorder: str) -> np.ndarray:
    if self.type.dtype is not None:
      if self.type.dtype is not dtype:
        raise UnsupportedCheckpointError(f"storage {self.key!r} is a {self.type.name} but a tensor "
                                         f"of dtype torch.{dtype.name} is built on it")
      return self.elements
    itemsize = np.dtype(dtype.storage).itemsize
    if self.elements.size % itemsize:
      raise UnsupportedCheckpointError(f"storage {self.key!r} has {self.elements.size} bytes, "
                                       f"not a whole number of torch.{dtype.name} elements")
    return self.elements.view(dtype.numpy_dtype(byteorder))


class _Tensor(_Frozen):
  """A rebuilt tensor while unpickling; `load` swaps these for their arrays afterwards, so the
  arrays never reach the pickle machine."""
  __slots__ = ("array",)

  def __repr__(self) -> str:
    return f"<tensor {self.array.dtype}{list(self.array.shape)}>"


def _check_ints(what: str, values: Any) -> tuple[int, ...]:
  values = tuple(values) if isinstance(values, (tuple, list)) else values
  if not isinstance(values, tuple) or not all(type(v) is int for v in values):
    raise UnsupportedCheckpointError(f"tensor {what} must be a tuple of ints, found {values!r}")
  return values


def _tensor(storage: _Storage, offset: Any, size: Any, stride: Any, dtype: _Dtype,
            byteorder: str) -> np.ndarray:
  """The tensor `storage[offset + sum(i_k * stride_k)]` of shape `size`: a C-contiguous copy."""
  (offset,) = _check_ints("storage offset", (offset,))
  shape, strides = _check_ints("size", size), _check_ints("stride", stride)
  elements = storage.as_dtype(dtype, byteorder)
  if (len(shape) != len(strides) or offset < 0 or any(n < 0 for n in shape)
      or any(s < 0 for s in strides)):
    raise UnsupportedCheckpointError(f"storage {storage.key!r}: invalid view offset={offset} "
                                     f"size={shape} stride={strides}")
  if 0 in shape:
    out = np.zeros(shape, elements.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= elements.size:
      raise UnsupportedCheckpointError(
          f"storage {storage.key!r} has {elements.size} elements, but the view offset={offset} "
          f"size={shape} stride={strides} reaches element {last}")
    view = np.lib.stride_tricks.as_strided(
        elements[offset:], shape, [s * elements.itemsize for s in strides], writeable=False)
    out = np.array(view, order="C")
  out = out.astype(out.dtype.newbyteorder("="), copy=False)
  if dtype.name == "bfloat16":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _rebuild_tensor(byteorder: str, storage, storage_offset, size, stride, dtype=None) -> _Tensor:
  if not isinstance(storage, _Storage):
    raise UnsupportedCheckpointError(f"a tensor's storage must be a storage record, found "
                                     f"{storage!r:.100}")
  dtype = storage.type.dtype if dtype is None else dtype
  if not isinstance(dtype, _Dtype):
    raise UnsupportedCheckpointError(f"a tensor on storage {storage.key!r} needs a torch dtype, "
                                     f"found {dtype!r:.100}")
  return _Tensor(_tensor(storage, storage_offset, size, stride, dtype, byteorder))


def _bool(what: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise UnsupportedCheckpointError(f"{what} must be a bool, found {value!r:.100}")


def _functions(byteorder: str) -> dict[tuple[str, str], _Function]:
  """The allowed callables for a file of byte order `byteorder`, with torch's signatures (backward
  hooks, tensor metadata and requires_grad are ignored)."""

  def tensor_v1(storage, storage_offset, size, stride):
    return _rebuild_tensor(byteorder, storage, storage_offset, size, stride)

  def tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                metadata=None):
    _bool("requires_grad", requires_grad)
    return _rebuild_tensor(byteorder, storage, storage_offset, size, stride)

  def tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                metadata=None):
    _bool("requires_grad", requires_grad)
    return _rebuild_tensor(byteorder, storage, storage_offset, size, stride, dtype)

  def parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _Tensor):
      raise UnsupportedCheckpointError(f"a parameter must wrap a tensor, found {data!r:.100}")
    return data  # `state` (Python attributes of the parameter) is dropped

  def from_type_v2(func, new_type, args, state):
    if (not any(func is f for f in tensors) or not isinstance(new_type, _TensorType)
        or not isinstance(args, tuple)):
      raise UnsupportedCheckpointError(f"_rebuild_from_type_v2({func!r:.100}, {new_type!r:.100}, "
                                       "...): only plain tensors and parameters are supported")
    return func(*args)  # `state` (Python attributes of the tensor) is dropped

  functions = {("torch._utils", name): _Function(name, f) for name, f in (
      ("_rebuild_tensor", tensor_v1), ("_rebuild_tensor_v2", tensor_v2),
      ("_rebuild_tensor_v3", tensor_v3), ("_rebuild_parameter", parameter),
      ("_rebuild_parameter_with_state", parameter))}
  tensors = tuple(functions[("torch._utils", n)] for n in
                  ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"))
  functions[("torch._tensor", "_rebuild_from_type_v2")] = _Function("_rebuild_from_type_v2",
                                                                    from_type_v2)
  functions[("collections", "OrderedDict")] = _Function("OrderedDict", collections.OrderedDict)
  return functions


# module -> names this reader accepts; everything else is refused by `_Unpickler.find_class`.
ALLOWED_GLOBALS: dict[str, tuple[str, ...]] = {
    "collections": ("OrderedDict",),
    "torch._utils": ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                     "_rebuild_parameter", "_rebuild_parameter_with_state"),
    "torch._tensor": ("_rebuild_from_type_v2",),
    "torch": tuple(_STORAGE_TYPES) + ("UntypedStorage", "Tensor") + tuple(_DTYPES),
    "torch.storage": ("UntypedStorage",),
    "torch.nn.parameter": ("Parameter",),
}
_TYPES = {("torch", "UntypedStorage"): _UNTYPED, ("torch.storage", "UntypedStorage"): _UNTYPED,
          ("torch", "Tensor"): _TensorType("torch.Tensor"),
          ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.parameter.Parameter"),
          **{("torch", name): value for name, value in {**_STORAGE_TYPES, **_DTYPES}.items()}}


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler with `find_class` limited to `ALLOWED_GLOBALS`, storages read from the zip."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str,
               source: str):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self.archive, self.prefix, self.byteorder, self.source = archive, prefix, byteorder, source
    self.storages: dict[str, _Storage] = {}
    self.globals = {**_TYPES, **_functions(byteorder)}
    assert sorted(self.globals) == sorted((m, n) for m, ns in ALLOWED_GLOBALS.items() for n in ns)

  def find_class(self, module: str, name: str) -> Any:
    value = self.globals.get((module, name))
    if value is None:
      raise ForbiddenGlobalError(
          f"checkpoint {self.source} refers to the Python object {module}.{name}, which this "
          "reader does not load (it could run code): only tensors, OrderedDicts and plain Python "
          "values (dict, list, str, numbers) are read. Re-save just the state dict where torch is "
          "installed and the file is trusted: torch.save(model.state_dict(), 'weights.pth') (or "
          "write .safetensors).")
    return value

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise UnsupportedCheckpointError(f"unknown persistent id {pid!r:.200} "
                                       "(expected ('storage', type, key, location, numel))")
    _, storage_type, key, _location, numel = pid
    if (not isinstance(storage_type, _StorageType) or not isinstance(key, str)
        or type(numel) is not int):
      raise UnsupportedCheckpointError(f"invalid storage id {pid!r:.200}")
    if key in self.storages:
      storage = self.storages[key]
      if storage.type is not storage_type:
        raise UnsupportedCheckpointError(f"storage {key!r} is read both as "
                                         f"{storage.type.name} and {storage_type.name}")
      return storage
    record = f"{self.prefix}/data/{key}"
    try:
      data = self.archive.read(record)
    except KeyError:
      raise UnsupportedCheckpointError(f"storage record {record!r} is missing "
                                       "(truncated or damaged file?)") from None
    dtype = (np.dtype("u1") if storage_type.dtype is None
             else storage_type.dtype.numpy_dtype(self.byteorder))
    if numel < 0 or len(data) < numel * dtype.itemsize:
      raise UnsupportedCheckpointError(f"storage record {record!r} has {len(data)} "
                                       f"bytes, fewer than {numel} x {storage_type.name} elements")
    storage = _Storage(key, storage_type, np.frombuffer(data, dtype, count=numel))
    self.storages[key] = storage
    return storage


_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # torch < 1.6's first pickle
_RESAVE = ("re-save it where torch >= 1.6 is installed and the file is trusted: "
           "torch.save(torch.load(path, map_location='cpu', weights_only=True), 'weights.pth') "
           "(or write .safetensors)")


def _open(path: str) -> tuple[zipfile.ZipFile, str]:
  """The archive and its record prefix; else UnsupportedCheckpointError saying what the file is."""
  source = repr(path)
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
      raise UnsupportedCheckpointError(
          f"checkpoint {source} is in PyTorch's legacy (< 1.6) serialization format, which this "
          "reader does not read (torchvision's published weights are all in the newer zip "
          f"format); {_RESAVE}")
    if tarfile.is_tarfile(path):
      raise UnsupportedCheckpointError(
          f"checkpoint {source} is in PyTorch's old tar serialization format, which this reader "
          f"does not read; {_RESAVE}")
    raise UnsupportedCheckpointError(
        f"checkpoint {source} is not a PyTorch checkpoint (torch.save's zip format): its first "
        f"bytes are {head[:16]!r}")
  archive = zipfile.ZipFile(path)
  try:
    names = archive.namelist()
    pickles = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
    if len(pickles) != 1:
      if any(n.endswith("/constants.pkl") for n in names):
        raise UnsupportedCheckpointError(
            f"checkpoint {source} is a TorchScript archive (torch.jit.save), not a torch.save "
            "checkpoint; save the state dict instead: "
            "torch.save(model.state_dict(), 'weights.pth')")
      raise UnsupportedCheckpointError(
          f"checkpoint {source} is a zip file but not a torch.save checkpoint: expected one "
          f"'<folder>/data.pkl', found {pickles or 'none'} among {names[:10]}")
    return archive, pickles[0][:-len("/data.pkl")]
  except BaseException:
    archive.close()
    raise


def check_format(path: str | os.PathLike) -> None:
  """Raises UnsupportedCheckpointError, saying what the file is, unless it looks like a torch.save
  zip checkpoint (cheap: reads the zip directory only, no tensor)."""
  archive, _ = _open(os.fspath(path))
  archive.close()


def load(path: str | os.PathLike) -> Any:
  """The object torch.save wrote to `path`, every tensor a NumPy array (see the module docstring).

  Raises ForbiddenGlobalError for any Python object other than tensors, OrderedDicts and plain
  values, and UnsupportedCheckpointError for other formats or damaged files.
  """
  path = os.fspath(path)
  archive, prefix = _open(path)
  with archive:
    try:
      byteorder = archive.read(f"{prefix}/byteorder").decode("ascii").strip()
    except KeyError:
      byteorder = "little"  # files older than the record were written on little-endian machines
    if byteorder not in ("little", "big"):
      raise UnsupportedCheckpointError(f"checkpoint {path!r}: unknown byte order {byteorder!r}")
    unpickler = _Unpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix, byteorder,
                           repr(path))
    try:
      return _arrays(unpickler.load(), set())
    except ForbiddenGlobalError:
      raise  # names the file and the global already
    except (pickle.UnpicklingError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            EOFError, RecursionError) as e:
      raise UnsupportedCheckpointError(f"checkpoint {path!r}: cannot read {prefix}/data.pkl: "
                                       f"{type(e).__name__}: {e}") from e


def _arrays(obj: Any, seen: set[int]) -> Any:
  """`obj` with every _Tensor replaced by its array (lists, dicts in place; tuples rebuilt)."""
  if isinstance(obj, _Tensor):
    return obj.array
  if isinstance(obj, (list, dict)):
    if id(obj) in seen:
      return obj
    seen.add(id(obj))
    for k, v in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
      obj[k] = _arrays(v, seen)
    return obj
  if isinstance(obj, tuple):
    return tuple(_arrays(v, seen) for v in obj)
  return obj
