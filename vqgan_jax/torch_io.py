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
import os
import pickle
import pickletools
import re
import struct
import zipfile
from typing import Any, Dict

import numpy as np

from vqgan_jax.torch_tensors import CheckpointError
from vqgan_jax.torch_tensors import DType
from vqgan_jax.torch_tensors import MAX_INDEX
from vqgan_jax.torch_tensors import Placeholder
from vqgan_jax.torch_tensors import STORAGE_DTYPES
from vqgan_jax.torch_tensors import StorageRecord
from vqgan_jax.torch_tensors import Storages
from vqgan_jax.torch_tensors import StorageType
from vqgan_jax.torch_tensors import TORCH_DTYPES
from vqgan_jax.torch_tensors import TensorRecord
from vqgan_jax.torch_tensors import is_int
from vqgan_jax.torch_tensors import materialize
from vqgan_jax.torch_tensors import short

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_LOCATION = re.compile(
    r"(cpu|cuda|mps|xpu|hpu|meta|xla|mtia|ipu|privateuseone)(:[0-9]+)?")


def _placeholder_class(module, name):
  return type(name, (Placeholder,), {"__module__": "placeholder." + module})


def _rebuild_tensor(storage, storage_offset, size, stride):
  return TensorRecord(storage, storage_offset, size, stride)


def _check_flags(requires_grad, backward_hooks, metadata):
  # Ignored, but of the types torch writes (torch checks them too); torch
  # 0.4 wrote None for the hooks (LPIPS's v0.1 weights are such files).
  if not (isinstance(requires_grad, bool)
          and (backward_hooks is None or isinstance(backward_hooks, dict))
          and (metadata is None or isinstance(metadata, dict))):
    raise CheckpointError("a tensor record's requires_grad, hooks or "
                          "metadata are not a bool and dicts")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  _check_flags(requires_grad, backward_hooks, metadata)
  return TensorRecord(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  _check_flags(requires_grad, backward_hooks, metadata)
  return TensorRecord(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *unused_args):
  return data


def _numpy_reconstruct(cls, shape, typecode):
  """numpy's ``_reconstruct`` as numpy's own pickles call it: an empty array
  that BUILD then fills (numpy checks the state's length). Any other shape
  would allocate whatever the file asks for."""
  if cls is not np.ndarray or shape != (0,):
    raise CheckpointError(f"unexpected numpy array record ({short.repr(cls)},"
                          f" {short.repr(shape)})")
  return _numpy_multiarray()._reconstruct(cls, shape, typecode)


def _numpy_multiarray():
  return np.core.multiarray if hasattr(np, "core") else np._core.multiarray


def _check_memo(f):
  """Refuses memo indices beyond the number of objects stored so far:
  unpickling grows its memo table to the largest index, so one damaged index
  could ask for tens of GB. Picklers number memo entries in order, from 0
  (Python 3) or from 1 (Python 2's cPickle, which wrote older checkpoints
  such as LPIPS's ``v0.1`` weights), so index ``stored + 1`` is allowed."""
  start, stored = f.tell(), 0
  for op, arg, _ in pickletools.genops(f):
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
      if op.name != "MEMOIZE" and arg > stored + 1:
        raise CheckpointError(f"pickle memo index {arg} after {stored} "
                              "stored objects")
      stored += 1
  f.seek(start)


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
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  }

  def __init__(self, file, legacy):
    super().__init__(file)
    self._legacy = legacy
    self.storages: Dict[str, StorageRecord] = {}
    self._classes = {}

  def find_class(self, module, name):
    if (module, name) in self._SAFE:
      return self._SAFE[(module, name)]
    if (module == "torch" and name in STORAGE_DTYPES or
        (module, name) == ("torch.storage", "UntypedStorage")):
      return StorageType(name)
    if module == "torch" and name in TORCH_DTYPES:
      return DType(name)
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
      raise CheckpointError(f"unsupported persistent id {short.repr(pid)}")
    storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
    if not isinstance(key, str):
      raise CheckpointError(f"storage key {short.repr(key)} is not a string")
    # Storages saved from any device are read to the host, but the tag must
    # be one torch writes.
    if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
      raise CheckpointError(f"storage {key} has an unknown device "
                            f"{short.repr(location)}")
    if self._legacy and getattr(storage_type, "name", "") == "UntypedStorage":
      raise CheckpointError("an untyped storage in a legacy-format file (torch "
                            "cannot read it either)")
    if self._legacy and pid[5] is not None:
      raise CheckpointError("legacy storage views are not supported; re-save "
                            "the checkpoint with a current torch")
    if (not isinstance(storage_type, (StorageType, DType)) or
        storage_type.dtype is None):
      name = getattr(storage_type, "name",
                     getattr(storage_type, "__name__", storage_type))
      raise CheckpointError(f"storage {key} has type {short.repr(name)}, "
                            "which this reader does not support")
    if not is_int(numel) or not 0 <= numel <= MAX_INDEX:
      raise CheckpointError(f"storage {key} declares {short.repr(numel)} "
                            "elements")
    storage = StorageRecord(key, storage_type.name, storage_type.dtype, numel)
    seen = self.storages.setdefault(key, storage)
    if (seen.dtype, seen.numel) != (storage.dtype, storage.numel):
      raise CheckpointError(
          f"storage {key} is declared both as {seen.numel} elements of "
          f"{seen.type_name} and as {numel} elements of {storage_type.name}")
    return seen


def _entry(archive, name, size_limit):
  """An entry's bytes; only uncompressed entries inside the file are read."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise CheckpointError(f"the archive has no entry {name}") from None
  if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x41:
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

    stream = io.BytesIO(_entry(archive, pkl[0], file_size))
    _check_memo(stream)
    unpickler = _Unpickler(stream, legacy=False)
    obj = unpickler.load()
    return materialize(obj, Storages(read), byteorder == "little")


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickles plain data only (numbers, strings, lists, dicts): the legacy
  format's header records and storage keys. Any class or persistent id is
  refused, so nothing in them can run."""

  def find_class(self, module, name):
    raise CheckpointError(f"unexpected class {module}.{name} in a legacy "
                          "checkpoint's header")

  def persistent_load(self, pid):
    raise CheckpointError(f"unexpected persistent id {short.repr(pid)} in a "
                          "legacy checkpoint's header")


def _plain_load(f) -> Any:
  return _PlainDataUnpickler(f).load()


def _load_legacy(path) -> Any:
  with open(path, "rb") as raw:
    # In memory: a damaged length in the pickle then reads what is there
    # instead of asking the file object for a buffer of that length.
    f = io.BytesIO(raw.read())
  file_size = len(f.getbuffer())
  with f:
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
      raise CheckpointError(f"legacy protocol version {short.repr(version)} "
                            f"is not {_LEGACY_PROTOCOL}")
    _plain_load(f)  # sys info
    # Storages come after the object: tensors are recorded first and
    # turned into arrays once every storage has been read and checked.
    _check_memo(f)
    unpickler = _Unpickler(f, legacy=True)
    obj = unpickler.load()
    keys = _plain_load(f)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and len(set(keys)) == len(keys)):
      raise CheckpointError(f"the storage key list {short.repr(keys)} is not "
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

  return materialize(obj, Storages(read), little_endian=True)


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
          OverflowError, MemoryError, RecursionError, OSError,
          NotImplementedError) as e:
    # Overflow and memory errors: a damaged length field asking for an
    # impossible allocation (e.g. a pickle FRAME of 2^62 bytes); OSError: a
    # damaged zip directory sending a seek before the start of the file;
    # NotImplementedError: zipfile on a damaged version or encryption field.
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
