"""Reads PyTorch checkpoints (``.ckpt`` / ``.pth``) into numpy, without torch.

PyTorch pickles tensors as references to raw storages. This module
unpickles such files with a restricted unpickler that rebuilds every tensor
as a ``numpy.ndarray`` and every unknown class (Lightning callbacks,
omegaconf configs, argparse namespaces, ...) as an inert placeholder, so a
Lightning checkpoint can be converted on a machine without torch and no code
from the file is ever executed.

Both serialisation formats are handled: the zip archive written by
torch >= 1.6 and the older "legacy" stream format.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np

try:  # bfloat16 storages (ml_dtypes ships with jax)
  import ml_dtypes
  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None


class CheckpointError(ValueError):
  """A file that cannot be read as a PyTorch checkpoint."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": _BF16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16,
    "bfloat16": _BF16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  """Stands for ``torch.FloatStorage`` etc. in a pickle."""

  def __init__(self, name):
    self.dtype = _STORAGE_DTYPES.get(name)
    self.name = name


class _DType:
  """Stands for a ``torch.dtype`` object such as ``torch.float32``."""

  def __init__(self, name):
    self.dtype = _TORCH_DTYPES.get(name)
    self.name = name


class Placeholder:
  """An object of a class this reader does not know; keeps its state."""

  def __init__(self, *args, **kwargs):
    self._args = args
    self._kwargs = kwargs
    self._state = None

  def __setstate__(self, state):
    self._state = state

  # Some pickled classes (dict/list subclasses) receive items after creation.
  def __setitem__(self, key, value):
    if self._state is None:
      self._state = {}
    if isinstance(self._state, dict):
      self._state[key] = value

  def append(self, value):
    self.extend([value])

  def extend(self, values):
    if not isinstance(self._state, list):
      self._state = []
    self._state.extend(values)


def _placeholder_class(module, name):
  return type(name, (Placeholder,), {"__module__": "placeholder." + module})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  array, = storage
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if not size:
    return np.array(array[storage_offset])
  itemsize = array.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      array[storage_offset:], shape=size,
      strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # own the memory, C-contiguous


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused_args):
  return data


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors as numpy arrays; everything unknown becomes inert."""

  _SAFE = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("collections", "defaultdict"): collections.defaultdict,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "slice"): slice,
      ("builtins", "complex"): complex,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  }

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in self._SAFE:
      return self._SAFE[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _DType(name)
    if module == "numpy.core.multiarray" or module == "numpy._core.multiarray":
      if name in ("scalar", "_reconstruct"):
        return getattr(np.core.multiarray if hasattr(np, "core") else
                       np._core.multiarray, name)
    if module == "numpy" and name in ("dtype", "ndarray"):
      return getattr(np, name)
    return _placeholder_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    elif isinstance(storage_type, _DType):
      dtype = storage_type.dtype
    else:  # UntypedStorage: bytes
      dtype = np.uint8
    if dtype is None:
      raise CheckpointError(
          f"storage type {getattr(storage_type, 'name', storage_type)} is not "
          "supported")
    # A one-element tuple so that as_strided views share one base array.
    return (self._load_storage(key, np.dtype(dtype), numel),)


def _load_zip(path) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise CheckpointError(f"{path}: a zip file without data.pkl is not a "
                            "PyTorch checkpoint")
    prefix = pkl[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = archive.read(f"{prefix}data/{key}")
        dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
        cache[key] = np.frombuffer(raw, dtype=dt).astype(dtype, copy=False)
      return cache[key]

    with archive.open(pkl[0]) as f:
      return _Unpickler(io.BytesIO(f.read()), load_storage).load()


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles plain data only (numbers, strings, lists, dicts): the legacy
  format's header records and storage keys. Any class or persistent id is
  refused, so nothing in them can run."""

  def find_class(self, module, name):
    raise CheckpointError(f"unexpected class {module}.{name} in a legacy "
                          "checkpoint's header")

  def persistent_load(self, pid):
    raise CheckpointError(f"unexpected persistent id {pid!r} in a legacy "
                          "checkpoint's header")


def _plain_load(f) -> Any:
  return _PlainDataUnpickler(f).load()


def _load_legacy(path) -> Any:
  with open(path, "rb") as f:
    # torch.save's legacy format opens with a pickle (protocol 2 unless
    # `pickle_protocol` said otherwise) of its magic number.
    head = f.read(2)
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
      raise CheckpointError(
          f"{path} could not be read as a PyTorch checkpoint (neither a zip "
          "archive nor torch's legacy format); is the file complete and "
          "written by torch.save?")
    f.seek(0)
    magic = _plain_load(f)
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(
          f"{path} could not be read as a PyTorch checkpoint (bad magic "
          "number); is the file complete and written by torch.save?")
    _plain_load(f)  # protocol version
    _plain_load(f)  # sys info
    # Storages come after the object, so tensors are rebuilt lazily.
    placeholders = {}

    def lazy_storage(key, dtype, numel):
      placeholders.setdefault(key, (dtype, numel))
      return _LazyStorage(key)

    unpickler = _LegacyUnpickler(f, lazy_storage)
    obj = unpickler.load()
    keys = _plain_load(f)
    data = {}
    for key in keys:
      dtype, expected = placeholders[str(key)]
      numel, = struct.unpack("<q", f.read(8))
      if numel != expected:
        raise CheckpointError(
            f"{path}: storage {key} holds {numel} elements where its tensors "
            f"expect {expected}; the file is damaged")
      data[str(key)] = np.frombuffer(
          f.read(numel * np.dtype(dtype).itemsize), dtype=dtype)
  return _resolve(obj, data)


class _LazyStorage:

  def __init__(self, key):
    self.key = key


class _LazyTensor:

  def __init__(self, key, offset, size, stride):
    self.key, self.offset, self.size, self.stride = key, offset, size, stride


class _LegacyUnpickler(_Unpickler):

  def find_class(self, module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2",
                                             "_rebuild_tensor"):
      return lambda storage, offset, size, stride, *a: _LazyTensor(
          storage[0].key, offset, size, stride)
    return super().find_class(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if len(pid) > 5 and pid[5] is not None:
      raise CheckpointError("legacy storage views are not supported; re-save "
                            "the checkpoint with a current torch")
    return (self._load_storage(key, np.dtype(storage_type.dtype), numel),)


def _resolve(obj, data):
  if isinstance(obj, _LazyTensor):
    return _rebuild_tensor((data[obj.key],), obj.offset, obj.size, obj.stride)
  if isinstance(obj, dict):
    for k in list(obj.keys()):
      obj[k] = _resolve(obj[k], data)
    return obj
  if isinstance(obj, list):
    return [_resolve(v, data) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, data) for v in obj)
  return obj


def load_torch_file(path: str | os.PathLike) -> Any:
  """Loads a file written by ``torch.save``; tensors come back as numpy.

  Args:
    path: a ``.ckpt``/``.pth``/``.pt`` file in either torch format.

  Returns:
    The unpickled object with every tensor replaced by a ``np.ndarray`` and
    every unknown class by a :class:`Placeholder`.

  Raises:
    FileNotFoundError: the path does not exist.
    CheckpointError: the file is not a PyTorch checkpoint or is damaged.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path)
    return _load_legacy(path)
  except CheckpointError as e:
    if path in str(e):
      raise
    raise CheckpointError(
        f"{path} could not be read as a PyTorch checkpoint: {e}") from e
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError,
          struct.error, ValueError, TypeError, AttributeError, IndexError,
          OverflowError, MemoryError, RecursionError) as e:
    # Overflow and memory errors: a damaged length field asking for an
    # impossible allocation (e.g. a pickle FRAME of 2^62 bytes).
    raise CheckpointError(
        f"{path} could not be read as a PyTorch checkpoint "
        f"({type(e).__name__}: {e}); is the file complete and written by "
        "torch.save?") from e


def load_state_dict(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Returns the flat ``{name: array}`` state dict held in a checkpoint.

  Accepts a Lightning checkpoint (a dict with ``state_dict``), a bare state
  dict, or a dict with ``model``/``module``.
  """
  obj = load_torch_file(path)
  if isinstance(obj, dict):
    for key in ("state_dict", "model", "module"):
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(
      isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointError(
        f"{os.fspath(path)} holds no state dict (expected a dict of tensors, "
        "or a Lightning checkpoint with a 'state_dict' entry)")
  return dict(obj)
