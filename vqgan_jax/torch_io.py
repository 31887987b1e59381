"""Reads PyTorch checkpoints (``.ckpt`` / ``.pth``) into numpy, without torch.

PyTorch pickles tensors as references to raw storages. This module
unpickles such files with a restricted unpickler that records every tensor
and every storage reference, and turns every unknown class (Lightning
callbacks, omegaconf configs, argparse namespaces, ...) into an inert
placeholder, so a Lightning checkpoint can be converted on a machine without
torch and no code from the file is ever executed.

Nothing in the file is trusted. Each storage's declared size must equal its
archive entry (zip format) or its recorded size and the bytes present
(legacy format); each tensor's dtype, size, stride and offset are checked
against its storage before a single element is read, and the tensor is then
copied out of a buffer that holds exactly the elements it addresses. Any
violation is a :class:`CheckpointError` naming the file and the tensor (its
key path, e.g. ``state_dict/encoder.conv_in.weight``).

Both serialisation formats are handled: the zip archive written by
torch >= 1.6 and the older "legacy" stream format.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import reprlib
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
    "uint8": np.uint8, "bool": np.bool_, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64,
}
if _BF16 is not None:  # saved as raw bytes plus a dtype (_rebuild_tensor_v3)
  _TORCH_DTYPES.update(float8_e4m3fn=ml_dtypes.float8_e4m3fn,
                       float8_e5m2=ml_dtypes.float8_e5m2)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Limits on what a tensor record may ask for. torch keeps sizes, strides and
# offsets in int64; numpy allows 64 dimensions.
_MAX_DIMS = 64
_MAX_INDEX = 2**63 - 1
# A tensor's shape may not describe more than this many bytes (with every
# size of 0 counted as 1: numpy refuses larger shapes even when empty).
_MAX_TENSOR_BYTES = 2**62
# Tensors whose strides overlap (saved from `expand`, for instance) hold
# more elements than their storage; the bytes their copies add beyond the
# storages' own sizes are bounded per file, so a small file cannot ask for
# an allocation of any size.
_MAX_EXPANDED_BYTES = 1 << 30

_LOCATION = re.compile(
    r"(cpu|cuda|mps|xpu|hpu|meta|xla|mtia|ipu|privateuseone)(:[0-9]+)?")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class _StorageType:
  """Stands for ``torch.FloatStorage`` etc. in a pickle; the untyped
  storage (raw bytes) of tensors that ``_rebuild_tensor_v3`` gives a dtype
  is ``torch.storage.UntypedStorage``."""

  def __init__(self, name):
    self.dtype = (np.uint8 if name == "UntypedStorage" else
                  _STORAGE_DTYPES.get(name))
    self.name = name


class _DType:
  """Stands for a ``torch.dtype`` object such as ``torch.float32``."""

  def __init__(self, name):
    self.dtype = _TORCH_DTYPES.get(name)
    self.name = name


class _Storage:
  """A storage reference of the pickle: key, declared type and size."""

  def __init__(self, key, type_name, dtype, numel):
    self.key, self.type_name, self.numel = key, type_name, numel
    self.dtype = np.dtype(dtype)
    self.nbytes = numel * self.dtype.itemsize


class _Tensor:
  """A tensor record; becomes an array once checked against its storage."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.size, self.stride = (storage, offset, size,
                                                         stride)
    self.dtype = dtype  # a _DType for _rebuild_tensor_v3, else None


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
    if getattr(self, "_state", None) is None:
      self._state = {}
    if isinstance(self._state, dict):
      self._state[key] = value

  def append(self, value):
    self.extend([value])

  def extend(self, values):
    if not isinstance(getattr(self, "_state", None), list):
      self._state = []
    self._state.extend(values)


def _placeholder_class(module, name):
  return type(name, (Placeholder,), {"__module__": "placeholder." + module})


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *unused_args):
  return data


def _numpy_reconstruct(cls, shape, typecode):
  """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty array
  that BUILD then fills (numpy checks the state's length). Any other shape
  would allocate whatever the file asks for."""
  if cls is not np.ndarray or shape != (0,):
    raise CheckpointError(f"unexpected numpy array record ({_short.repr(cls)},"
                          f" {_short.repr(shape)})")
  return _numpy_multiarray()._reconstruct(cls, shape, typecode)


def _numpy_multiarray():
  return np.core.multiarray if hasattr(np, "core") else np._core.multiarray


class _Unpickler(pickle.Unpickler):
  """Records tensors and storages; everything unknown becomes inert.

  ``legacy``: storage references have the legacy format's six fields
  instead of the zip format's five.
  """

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

  def __init__(self, file, legacy):
    super().__init__(file)
    self._legacy = legacy
    self.storages: Dict[str, _Storage] = {}
    self._classes = {}

  def find_class(self, module, name):
    if (module, name) in self._SAFE:
      return self._SAFE[(module, name)]
    if (module == "torch" and name in _STORAGE_DTYPES or
        (module, name) == ("torch.storage", "UntypedStorage")):
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _DType(name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
      if name == "scalar":
        return _numpy_multiarray().scalar
      if name == "_reconstruct":
        return _numpy_reconstruct
    if module == "numpy" and name in ("dtype", "ndarray"):
      return getattr(np, name)
    if (module, name) not in self._classes:
      self._classes[(module, name)] = _placeholder_class(module, name)
    return self._classes[(module, name)]

  def persistent_load(self, pid):
    fields = 6 if self._legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == fields and
            pid[0] == "storage"):
      raise CheckpointError(f"unsupported persistent id {_short.repr(pid)}")
    storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if not isinstance(key, str):
      raise CheckpointError(f"storage key {_short.repr(key)} is not a string")
    # Storages saved from any device are read to the host, but the tag must
    # be one torch writes.
    if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
      raise CheckpointError(f"storage {key} has an unknown device "
                            f"{_short.repr(location)}")
    if self._legacy and pid[5] is not None:
      raise CheckpointError("legacy storage views are not supported; re-save "
                            "the checkpoint with a current torch")
    if (not isinstance(storage_type, (_StorageType, _DType)) or
        storage_type.dtype is None):
      name = getattr(storage_type, "name",
                     getattr(storage_type, "__name__", storage_type))
      raise CheckpointError(f"storage {key} has type {_short.repr(name)}, "
                            "which this reader does not support")
    if not _is_int(numel) or not 0 <= numel <= _MAX_INDEX:
      raise CheckpointError(f"storage {key} declares {_short.repr(numel)} "
                            "elements")
    storage = _Storage(key, storage_type.name, storage_type.dtype, numel)
    seen = self.storages.setdefault(key, storage)
    if (seen.dtype, seen.numel) != (storage.dtype, storage.numel):
      raise CheckpointError(
          f"storage {key} is declared both as {seen.numel} elements of "
          f"{seen.type_name} and as {numel} elements of {storage_type.name}")
    return seen


class _Storages:
  """Reads storages' bytes, each checked against its declaration once."""

  def __init__(self, read):
    self._read = read
    self._cache = {}
    self.expanded_bytes = 0

  def get(self, storage: _Storage):
    if storage.key not in self._cache:
      raw = self._read(storage)
      if len(raw) != storage.nbytes:  # each reader checks; this is the last word
        raise CheckpointError(f"storage {storage.key}: read {len(raw)} bytes "
                              f"where {storage.nbytes} were declared")
      self._cache[storage.key] = raw
    return self._cache[storage.key]


def _tensor_array(t: _Tensor, name: str, storages: _Storages,
                  little_endian: bool) -> np.ndarray:
  """Checks a tensor record against its storage, then copies it out."""
  storage = t.storage
  where = (f"tensor {name}" +
           (f" (storage {storage.key})" if isinstance(storage, _Storage)
            else ""))

  def bad(what):
    raise CheckpointError(f"{where}: {what}")

  if not isinstance(storage, _Storage):
    bad(f"is built on {_short.repr(storage)}, not on a storage")
  dtype = storage.dtype
  if t.dtype is not None:
    if not isinstance(t.dtype, _DType) or t.dtype.dtype is None:
      bad(f"dtype {_short.repr(getattr(t.dtype, 'name', t.dtype))} is not "
          "supported")
    dtype = np.dtype(t.dtype.dtype)
  offset, size, stride = t.offset, t.size, t.stride
  if not _is_int(offset) or not 0 <= offset <= _MAX_INDEX:
    bad(f"storage offset {_short.repr(offset)} is not a non-negative int64")
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and len(size) == len(stride) <= _MAX_DIMS):
    bad(f"size {_short.repr(size)} and stride {_short.repr(stride)} are not "
        f"two sequences of the same length (at most {_MAX_DIMS})")
  for field, values in (("size", size), ("stride", stride)):
    if not all(_is_int(v) and 0 <= v <= _MAX_INDEX for v in values):
      bad(f"{field} {_short.repr(tuple(values))} holds a value that is not a "
          "non-negative int64")
  size, stride = tuple(size), tuple(stride)
  itemsize = dtype.itemsize
  if math.prod(max(s, 1) for s in size) * itemsize > _MAX_TENSOR_BYTES:
    bad(f"size {size} of {dtype} is larger than any array can be")
  try:
    raw = storages.get(storage)
  except CheckpointError as e:
    bad(str(e))
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, dtype)
  capacity = storage.nbytes // itemsize  # elements of `dtype` in the storage
  last = offset + sum((s - 1) * d for s, d in zip(size, stride))
  if last >= capacity:
    bad(f"size {size}, stride {stride} and offset {offset} address element "
        f"{last}, but its storage holds {capacity} elements of {dtype} "
        f"({storage.numel} of {storage.type_name}); the file is damaged or "
        "was not written by torch.save")
  if numel > capacity:  # overlapping strides, e.g. a saved `expand`
    storages.expanded_bytes += (numel - capacity) * itemsize
    if storages.expanded_bytes > _MAX_EXPANDED_BYTES:
      bad(f"size {size} with stride {stride} repeats the elements of its "
          f"storage ({capacity}); the file's repeated elements exceed "
          f"{_MAX_EXPANDED_BYTES >> 20} MiB")
  # Every index below is now known to lie in [offset, last]: `flat` holds
  # exactly those elements, and the view never leaves it.
  code = np.dtype(f"{'<' if little_endian else '>'}u{itemsize}")
  flat = np.frombuffer(raw, dtype=code, count=last - offset + 1,
                       offset=offset * itemsize)
  view = np.lib.stride_tricks.as_strided(
      flat, shape=size,
      strides=tuple(d * itemsize if s > 1 else 0
                    for s, d in zip(size, stride)))
  return np.array(view, dtype=code.newbyteorder("=")).view(dtype)


def _materialize(obj, storages: _Storages, little_endian: bool):
  """Replaces every tensor record in ``obj`` by its array, naming each by
  its key path (``state_dict/encoder.conv_in.weight``)."""
  done = {}

  def join(path, key):
    key = key if isinstance(key, str) else _short.repr(key)
    return f"{path}/{key}" if path else key

  def visit(x, path):
    if id(x) in done:
      return done[id(x)]
    if isinstance(x, _Tensor):
      done[id(x)] = _tensor_array(x, path or "<top level>", storages,
                                  little_endian)
    elif isinstance(x, dict):
      done[id(x)] = x
      for k in list(x.keys()):
        x[k] = visit(x[k], join(path, k))
    elif isinstance(x, list):
      done[id(x)] = x
      for i, v in enumerate(x):
        x[i] = visit(v, f"{path}[{i}]")
    elif isinstance(x, tuple):
      done[id(x)] = tuple(visit(v, f"{path}[{i}]") for i, v in enumerate(x))
    elif isinstance(x, Placeholder):
      done[id(x)] = x
      for attr in ("_args", "_kwargs", "_state"):
        if hasattr(x, attr):
          setattr(x, attr, visit(getattr(x, attr), join(path, attr)))
    else:
      return x
    return done[id(x)]

  return visit(obj, "")


def _entry(archive, name, size_limit):
  """An entry's bytes; only uncompressed entries inside the file are read."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise CheckpointError(f"the archive has no entry {name}") from None
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
    raise CheckpointError(
        f"entry {name} is compressed or encrypted (method "
        f"{info.compress_type}); torch.save writes uncompressed archives")
  if info.file_size > size_limit:
    raise CheckpointError(f"entry {name} claims {info.file_size} bytes, more "
                          "than the file holds")
  return archive.read(info)


def _load_zip(path) -> Any:
  file_size = os.path.getsize(path)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    if len(set(names)) != len(names):
      raise CheckpointError("the archive holds two entries of the same name")
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise CheckpointError(f"{path}: a zip file without data.pkl is not a "
                            "PyTorch checkpoint")
    prefix = pkl[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = _entry(archive, prefix + "byteorder", 16).decode()
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"byte order {byteorder!r} is neither 'little' "
                              "nor 'big'")

    def read(storage):
      name = f"{prefix}data/{storage.key}"
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise CheckpointError(f"the archive has no entry {name}") from None
      if info.file_size != storage.nbytes:
        raise CheckpointError(
            f"declared as {storage.numel} elements of {storage.type_name} "
            f"({storage.nbytes} bytes), but the archive entry {name} holds "
            f"{info.file_size} bytes")
      return _entry(archive, name, file_size)

    unpickler = _Unpickler(
        io.BytesIO(_entry(archive, pkl[0], file_size)), legacy=False)
    obj = unpickler.load()
    return _materialize(obj, _Storages(read), byteorder == "little")


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles plain data only (numbers, strings, lists, dicts): the legacy
  format's header records and storage keys. Any class or persistent id is
  refused, so nothing in them can run."""

  def find_class(self, module, name):
    raise CheckpointError(f"unexpected class {module}.{name} in a legacy "
                          "checkpoint's header")

  def persistent_load(self, pid):
    raise CheckpointError(f"unexpected persistent id {_short.repr(pid)} in a "
                          "legacy checkpoint's header")


def _plain_load(f) -> Any:
  return _PlainDataUnpickler(f).load()


def _load_legacy(path) -> Any:
  file_size = os.path.getsize(path)
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
    version = _plain_load(f)
    if version != _LEGACY_PROTOCOL:
      raise CheckpointError(f"legacy protocol version {_short.repr(version)} "
                            f"is not {_LEGACY_PROTOCOL}")
    _plain_load(f)  # sys info
    # Storages come after the object: tensors are recorded first and
    # turned into arrays once every storage has been read and checked.
    unpickler = _Unpickler(f, legacy=True)
    obj = unpickler.load()
    keys = _plain_load(f)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and len(set(keys)) == len(keys)):
      raise CheckpointError(f"the storage key list {_short.repr(keys)} is not "
                            "a list of distinct strings")
    data = {}
    for key in keys:
      storage = unpickler.storages.get(key)
      if storage is None:
        raise CheckpointError(f"storage {key} has data but no tensor")
      head = f.read(8)
      if len(head) != 8:
        raise CheckpointError(f"storage {key}: the file ends before its data")
      numel, = struct.unpack("<q", head)
      if numel != storage.numel:
        raise CheckpointError(
            f"storage {key} holds {numel} elements where its tensors "
            f"expect {storage.numel}; the file is damaged")
      if storage.nbytes > file_size - f.tell():
        raise CheckpointError(
            f"storage {key}: {storage.nbytes} bytes declared, "
            f"{file_size - f.tell()} left in the file; is the file complete?")
      data[key] = f.read(storage.nbytes)

  def read(storage):
    if storage.key not in data:
      raise CheckpointError("the file holds no data for it")
    return data[storage.key]

  return _materialize(obj, _Storages(read), little_endian=True)


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
    with open(path, "rb") as f:
      is_zip = f.read(4) == b"PK\x03\x04"  # torch.load's own test
    if is_zip:
      return _load_zip(path)
    return _load_legacy(path)
  except CheckpointError as e:
    if path in str(e):
      raise
    raise CheckpointError(
        f"{path} could not be read as a PyTorch checkpoint: {e}") from e
  except (PermissionError, IsADirectoryError):
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError,
          struct.error, ValueError, TypeError, AttributeError, IndexError,
          OverflowError, MemoryError, RecursionError, OSError) as e:
    # Overflow and memory errors: a damaged length field asking for an
    # impossible allocation (e.g. a pickle FRAME of 2^62 bytes); OSError: a
    # damaged zip directory sending a seek before the start of the file.
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
