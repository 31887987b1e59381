"""Tensor and storage records of a torch pickle, and their checked
conversion to numpy arrays.

The unpickler of :mod:`vqgan_jax.torch_io` records each tensor as a
:class:`TensorRecord` (storage, offset, size, stride, dtype) and each storage
reference as a :class:`StorageRecord` (key, type, declared size). Once the
whole object is unpickled, :func:`materialize` walks it, naming each tensor
by its key path, checks the record against its storage and copies the
tensor out of a buffer that holds exactly the elements it addresses. Nothing
is read before the checks pass.
"""
from __future__ import annotations

import math
import reprlib

import numpy as np

try:  # bfloat16 storages (ml_dtypes ships with jax)
  import ml_dtypes
  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None


class CheckpointError(ValueError):
  """A file that cannot be read as a PyTorch checkpoint."""


STORAGE_DTYPES = {
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

TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16,
    "bfloat16": _BF16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64,
}
if _BF16 is not None:  # saved as raw bytes plus a dtype (_rebuild_tensor_v3)
  TORCH_DTYPES.update(float8_e4m3fn=ml_dtypes.float8_e4m3fn,
                       float8_e5m2=ml_dtypes.float8_e5m2)


# Limits on what a tensor record may ask for. torch keeps sizes, strides and
# offsets in int64; numpy allows 64 dimensions.
_MAX_DIMS = 64
MAX_INDEX = 2**63 - 1
# A tensor's shape may not describe more than this many bytes (with every
# size of 0 counted as 1: numpy refuses larger shapes even when empty).
_MAX_TENSOR_BYTES = 2**62
# Tensors whose strides overlap (saved from `expand`, for instance) hold
# more elements than their storage; the bytes their copies add beyond the
# storages' own sizes are bounded per file, so a small file cannot ask for
# an allocation of any size.
_MAX_EXPANDED_BYTES = 1 << 30


# Values from the file quoted in messages are cut short.
short = reprlib.Repr()
short.maxstring = short.maxother = 60


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


class StorageType:
  """Stands for ``torch.FloatStorage`` etc. in a pickle; the untyped
  storage (raw bytes) of tensors that ``_rebuild_tensor_v3`` gives a dtype
  is ``torch.storage.UntypedStorage``."""

  def __init__(self, name):
    self.dtype = (np.uint8 if name == "UntypedStorage" else
                  STORAGE_DTYPES.get(name))
    self.name = name


class DType:
  """Stands for a ``torch.dtype`` object such as ``torch.float32``."""

  def __init__(self, name):
    self.dtype = TORCH_DTYPES.get(name)
    self.name = name


class StorageRecord:
  """A storage reference of the pickle: key, declared type and size."""

  def __init__(self, key, type_name, dtype, numel):
    self.key, self.type_name, self.numel = key, type_name, numel
    self.dtype = np.dtype(dtype)
    self.nbytes = numel * self.dtype.itemsize


class TensorRecord:
  """A tensor record; becomes an array once checked against its storage."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.size, self.stride = (storage, offset, size,
                                                         stride)
    self.dtype = dtype  # a DType for _rebuild_tensor_v3, else None


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



class Storages:
  """Reads storages' bytes, each checked against its declaration once."""

  def __init__(self, read):
    self._read = read
    self._cache = {}
    self.expanded_bytes = 0

  def get(self, storage: StorageRecord):
    if storage.key not in self._cache:
      raw = self._read(storage)
      if len(raw) != storage.nbytes:  # each reader checks; this is the last word
        raise CheckpointError(f"storage {storage.key}: read {len(raw)} bytes "
                              f"where {storage.nbytes} were declared")
      self._cache[storage.key] = raw
    return self._cache[storage.key]


def _tensor_array(t: TensorRecord, name: str, storages: Storages,
                  little_endian: bool) -> np.ndarray:
  """Checks a tensor record against its storage, then copies it out."""
  storage = t.storage
  where = (f"tensor {name}" +
           (f" (storage {storage.key})" if isinstance(storage, StorageRecord)
            else ""))

  def bad(what):
    raise CheckpointError(f"{where}: {what}")

  if not isinstance(storage, StorageRecord):
    bad(f"is built on {short.repr(storage)}, not on a storage")
  dtype = storage.dtype
  if t.dtype is not None:
    if not isinstance(t.dtype, DType) or t.dtype.dtype is None:
      bad(f"dtype {short.repr(getattr(t.dtype, 'name', t.dtype))} is not "
          "supported")
    dtype = np.dtype(t.dtype.dtype)
  offset, size, stride = t.offset, t.size, t.stride
  if not is_int(offset) or not 0 <= offset <= MAX_INDEX:
    bad(f"storage offset {short.repr(offset)} is not a non-negative int64")
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and len(size) == len(stride) <= _MAX_DIMS):
    bad(f"size {short.repr(size)} and stride {short.repr(stride)} are not "
        f"two sequences of the same length (at most {_MAX_DIMS})")
  for field, values in (("size", size), ("stride", stride)):
    if not all(is_int(v) and 0 <= v <= MAX_INDEX for v in values):
      bad(f"{field} {short.repr(tuple(values))} holds a value that is not a "
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
  out = np.array(view, dtype=code.newbyteorder("="))
  if dtype == np.bool_:  # any non-zero byte is True (torch: static_cast)
    return out.astype(np.bool_)
  return out.view(dtype)


def materialize(obj, storages: Storages, little_endian: bool):
  """Replaces every tensor record in ``obj`` by its array, naming each by
  its key path (``state_dict/encoder.conv_in.weight``)."""
  done = {}

  def join(path, key):
    key = key if isinstance(key, str) else short.repr(key)
    return f"{path}/{key}" if path else key

  def visit(x, path):
    if id(x) in done:
      return done[id(x)]
    if isinstance(x, StorageRecord):
      raise CheckpointError(f"{path or '<top level>'} is a bare storage "
                            f"(storage {x.key}); only tensors are read")
    if isinstance(x, TensorRecord):
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


