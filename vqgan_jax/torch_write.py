"""Writes PyTorch checkpoint files (``torch.save``'s zip format) without torch.

The counterpart of :mod:`vqgan_jax.torch_io`: :func:`save_torch_file` takes
plain Python data (dicts, lists, tuples, strings, numbers, booleans, None)
whose arrays are ``numpy.ndarray``\\ s, and writes the archive that
``torch.load`` reads, every array becoming a CPU tensor:

* ``archive/data.pkl``: a pickle (protocol 2, as ``torch.save`` writes)
  whose tensors are ``torch._utils._rebuild_tensor_v2(storage, offset,
  size, stride, requires_grad, backward_hooks)`` calls, and whose storages
  are persistent ids ``('storage', torch.<Type>Storage, key, 'cpu',
  numel)``;
* ``archive/data/<key>``: each storage's raw bytes, starting
  at a multiple of 64 bytes in the file (so ``torch.load(mmap=True)`` works);
* ``archive/byteorder`` (the machine's), ``archive/version``, ``archive/.format_version``
  and ``archive/.storage_alignment``, as torch writes them.

The pickle is emitted opcode by opcode rather than with :mod:`pickle`,
because :mod:`pickle` can only name a global it can import, and the point
is not to need torch. It uses only globals that ``torch.load``'s
``weights_only=True`` unpickler allows (the tensor rebuild function, the
typed storage classes, ``collections.OrderedDict``), so the files load in
torch's safe mode.
"""
from __future__ import annotations

import collections
import io
import os
import struct
import sys
import zipfile
from typing import Any, Dict, List

import numpy as np

try:  # bfloat16 arrays (ml_dtypes ships with jax)
  import ml_dtypes
  _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  _BF16 = None

ALIGNMENT = 64  # torch's storage alignment in the archive
ARCHIVE = "archive"

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
if _BF16 is not None:
  _STORAGE_NAMES[_BF16] = "BFloat16Storage"


class _Pickle:
  """A protocol-2 pickle of plain data and tensors, opcode by opcode."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: List[np.ndarray] = []

  def op(self, data: bytes) -> None:
    self.out.write(data)

  def glob(self, module: str, name: str) -> None:
    self.op(b"c" + f"{module}\n{name}\n".encode("ascii"))

  def text(self, s: str) -> None:
    raw = s.encode("utf-8")
    self.op(b"X" + struct.pack("<I", len(raw)) + raw)

  def integer(self, v: int) -> None:
    if -2**31 <= v < 2**31:
      self.op(b"J" + struct.pack("<i", v))
    else:  # LONG1: little-endian two's complement
      n = (v.bit_length() + 8) // 8
      self.op(b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True))

  def tuple_(self, items) -> None:
    self.op(b"(")
    for item in items:
      self.save(item)
    self.op(b"t")

  def tensor(self, a: np.ndarray) -> None:
    if a.dtype.byteorder not in ("=", "|"):
      a = a.astype(a.dtype.newbyteorder("="))
    dtype = a.dtype
    if dtype not in _STORAGE_NAMES:
      raise TypeError(f"arrays of dtype {dtype} have no torch storage type")
    key = str(len(self.storages))
    self.storages.append(a)
    self.glob("torch._utils", "_rebuild_tensor_v2")
    self.op(b"(")
    # The storage: persistent id ('storage', type, key, location, numel).
    self.op(b"(")
    self.text("storage")
    self.glob("torch", _STORAGE_NAMES[dtype])
    self.text(key)
    self.text("cpu")
    self.integer(int(a.size))
    self.op(b"tQ")
    self.integer(0)  # storage offset
    self.tuple_([int(s) for s in a.shape])
    strides, acc = [], 1
    for s in reversed(a.shape):  # C-contiguous strides, in elements
      strides.append(acc)
      acc *= int(s)
    self.tuple_(list(reversed(strides)))
    self.op(b"\x89")  # requires_grad=False
    self.glob("collections", "OrderedDict")
    self.op(b")R")  # backward_hooks: an empty OrderedDict
    self.op(b"tR")

  def save(self, obj: Any) -> None:
    if obj is None:
      self.op(b"N")
    elif obj is True or obj is False:
      self.op(b"\x88" if obj else b"\x89")
    elif isinstance(obj, np.ndarray):
      self.tensor(obj)
    elif isinstance(obj, np.generic):
      self.save(obj.item())
    elif isinstance(obj, int):
      self.integer(int(obj))
    elif isinstance(obj, float):
      self.op(b"G" + struct.pack(">d", obj))
    elif isinstance(obj, str):
      self.text(obj)
    elif isinstance(obj, collections.OrderedDict):
      self.glob("collections", "OrderedDict")
      self.op(b")R")
      self.items(obj)
    elif isinstance(obj, dict):
      self.op(b"}")
      self.items(obj)
    elif isinstance(obj, list):
      self.op(b"]")
      if obj:
        self.op(b"(")
        for item in obj:
          self.save(item)
        self.op(b"e")
    elif isinstance(obj, tuple):
      self.tuple_(obj)
    else:
      raise TypeError(f"cannot write a {type(obj).__name__} to a torch file "
                      "(plain data and numpy arrays only)")

  def items(self, d) -> None:
    if not d:
      return
    self.op(b"(")
    for k, v in d.items():
      self.save(k)
      self.save(v)
    self.op(b"u")


def dumps(obj: Any) -> tuple[bytes, List[np.ndarray]]:
  """``(data.pkl bytes, storages)``: storage ``i`` is the array that the
  pickle names by key ``str(i)``, C-contiguous in the machine's byte order."""
  p = _Pickle()
  p.op(b"\x80\x02")
  p.save(obj)
  p.op(b".")
  return p.out.getvalue(), [np.ascontiguousarray(a) for a in p.storages]


def _write_aligned(zf: zipfile.ZipFile, name: str, data) -> None:
  """A stored (uncompressed) member whose data starts at a multiple of
  :data:`ALIGNMENT` bytes, padded with an extra field as torch does."""
  size = memoryview(data).nbytes
  zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
  header = 30 + len(name.encode()) + (20 if zip64 else 0)
  pad = (-(zf.fp.tell() + header + 4)) % ALIGNMENT
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  info.file_size = size
  with zf.open(info, "w", force_zip64=zip64) as f:
    f.write(data)


def save_torch_file(path: str | os.PathLike, obj: Any) -> str:
  """Writes ``obj`` as ``torch.save(obj, path)`` would, numpy arrays as
  tensors; the file is written next to ``path`` and renamed into place.

  Args:
    path: the output file (e.g. ``last.ckpt``).
    obj: dicts (``collections.OrderedDict`` kept as such), lists, tuples,
      strings, ints, floats, booleans, None, and numpy arrays of a dtype
      torch has (float16/32/64, bfloat16, int8/16/32/64, uint8, bool).

  Returns:
    ``path``.

  Raises:
    TypeError: an object or dtype that a torch file cannot hold.
  """
  path = os.fspath(path)
  pkl, storages = dumps(obj)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
    records: Dict[str, bytes] = {"data.pkl": pkl,
                                 "byteorder": sys.byteorder.encode(),
                                 ".format_version": b"1",
                                 ".storage_alignment": str(ALIGNMENT).encode()}
    for name, data in records.items():
      _write_aligned(zf, f"{ARCHIVE}/{name}", data)
    for key, array in enumerate(storages):
      _write_aligned(zf, f"{ARCHIVE}/data/{key}",
                     array.reshape(-1).view(np.uint8))
    _write_aligned(zf, f"{ARCHIVE}/version", b"3\n")
  os.replace(tmp, path)
  return path
