"""Reads and rewrites the pickle records of files written by ``torch.save``.

Tests use this to edit a real checkpoint's tensor records (sizes, strides,
offsets, storage types and keys) and feed the result to the reader. The
pickle is parsed into plain records by an unpickler that calls nothing, and
written back with a small protocol-2 writer that emits exactly the records
it is given, including values torch itself would never write (negative or
huge integers, unknown storage types).
"""
import collections
import copy
import io
import pickle
import struct
import zipfile


class Global:
  """A ``GLOBAL module name`` record; calling it records a REDUCE."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    return Call(self, args)

  def __eq__(self, other):
    return (isinstance(other, Global) and
            (self.module, self.name) == (other.module, other.name))

  def __hash__(self):
    return hash((self.module, self.name))

  def __repr__(self):
    return f"{self.module}.{self.name}"


class Call:
  """``func(*args)`` as pickled by REDUCE (or NEWOBJ), plus the items,
  appended values and BUILD state the pickle gives the result."""

  def __init__(self, func, args, state=None):
    self.func, self.args, self.state = func, tuple(args), state
    self.items, self.appended = [], []

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def __deepcopy__(self, memo):
    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return new

  def append(self, value):
    self.appended.append(value)

  def extend(self, values):
    self.appended.extend(values)

  def __repr__(self):
    return f"{self.func!r}{self.args!r}"


class PersistentId:
  """A BINPERSID record (torch's storage references)."""

  def __init__(self, pid):
    self.pid = pid

  def __repr__(self):
    return f"PersistentId({self.pid!r})"


class ODict(collections.OrderedDict):
  """``collections.OrderedDict``; attributes set by BUILD (``_metadata``) kept."""


def _record_class(module, name):
  """A class standing for ``module.name``: instantiating it (REDUCE or
  NEWOBJ) records a :class:`Call`."""
  glob = Global(module, name)

  def new(cls, *args, **unused_kwargs):
    obj = object.__new__(cls)
    Call.__init__(obj, glob, args)
    return obj

  return type(name, (Call,), {"glob": glob, "__new__": new,
                              "__init__": lambda self, *a, **k: None})


class _Recorder(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return ODict
    return _record_class(module, name)

  def persistent_load(self, pid):
    return PersistentId(pid)


def loads(data):
  """Parses one pickle into records (nothing in it is called)."""
  return _Recorder(io.BytesIO(data)).load()


def _load_one(f):
  start = f.tell()
  obj = _Recorder(f).load()
  return obj, start, f.tell()


class _Writer:

  def __init__(self, cache=None, static=()):
    self.out = bytearray(b"\x80\x02")
    self.memo = {}  # id(obj) -> memo index: shared and cyclic references
    # With a cache (see FastDumper), no memo: the subtrees in `static` are
    # written once and their bytes reused.
    self.cache, self.static = cache, static

  def put(self, obj):
    if self.cache is not None:
      return
    self.memo[id(obj)] = len(self.memo)
    self.out += b"r" + struct.pack("<I", self.memo[id(obj)])

  def int_(self, v):
    if 0 <= v < 256:
      self.out += b"K" + bytes([v])
    elif -2**31 <= v < 2**31:
      self.out += b"J" + struct.pack("<i", v)
    else:
      n = (v.bit_length() + 8) // 8
      self.out += b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)

  def tuple_(self, items):
    if not items:
      self.out += b")"
      return
    if len(items) > 3:
      self.out += b"("
    for x in items:
      self.write(x)
    self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

  def global_(self, g):
    self.out += b"c" + f"{g.module}\n{g.name}\n".encode()

  def write(self, obj):
    if id(obj) in self.memo:
      self.out += b"j" + struct.pack("<I", self.memo[id(obj)])
      return
    if self.cache is not None and id(obj) in self.static:
      if id(obj) not in self.cache:
        sub = _Writer(self.cache, self.static)
        sub.out = bytearray()
        sub.write_new(obj)
        self.cache[id(obj)] = bytes(sub.out)
      self.out += self.cache[id(obj)]
      return
    self.write_new(obj)

  def write_new(self, obj):
    if obj is None:
      self.out += b"N"
    elif obj is True or obj is False:
      self.out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
      self.int_(obj)
    elif isinstance(obj, float):
      self.out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
      raw = obj.encode("utf-8", "surrogatepass")
      self.out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, Global):
      self.global_(obj)
    elif isinstance(obj, type) and issubclass(obj, Call):
      self.global_(obj.glob)
    elif isinstance(obj, PersistentId):
      self.write(obj.pid)
      self.out += b"Q"
    elif isinstance(obj, Call):
      self.write(obj.func)
      self.tuple_(obj.args)
      self.out += b"R"
      self.put(obj)
      if obj.items:
        self.out += b"("
        for k, v in obj.items:
          self.write(k)
          self.write(v)
        self.out += b"u"
      if obj.appended:
        self.out += b"("
        for v in obj.appended:
          self.write(v)
        self.out += b"e"
      if obj.state is not None:
        self.write(obj.state)
        self.out += b"b"
    elif isinstance(obj, tuple):
      self.tuple_(obj)
    elif isinstance(obj, list):
      self.out += b"]"
      self.put(obj)
      if obj:
        self.out += b"("
        for x in obj:
          self.write(x)
        self.out += b"e"
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self.global_(Global("collections", "OrderedDict"))
        self.out += b")R"
      else:
        self.out += b"}"
      self.put(obj)
      if obj:
        self.out += b"("
        for k, v in obj.items():
          self.write(k)
          self.write(v)
        self.out += b"u"
      state = getattr(obj, "__dict__", None)
      if state:
        self.write(dict(state))
        self.out += b"b"
    else:
      raise TypeError(f"cannot write {type(obj).__name__}")


def _dumper(obj):
  try:
    return FastDumper(obj).dumps
  except ValueError:  # cycles: the plain writer, with its memo
    return dumps


def dumps(obj):
  """Writes records (as :func:`loads` returns them) as a protocol-2 pickle."""
  w = _Writer()
  w.write(obj)
  w.out += b"."
  return bytes(w.out)


class FastDumper:
  """:func:`dumps` for many edits of one acyclic record tree: only the tensor
  records (whose arguments the edits replace) and the containers holding
  them are written again each time; the bytes of everything else are
  reused. Shared references are written as copies."""

  def __init__(self, obj):
    self.cache, self.static = {}, set()
    self._keep = []  # the cache is keyed by id: keep its objects alive

    active = set()

    def walk(x):
      if id(x) in active:
        raise ValueError("a cyclic record tree")
      if isinstance(x, (Call, dict, list, tuple)):
        active.add(id(x))
      if isinstance(x, Call):
        found = any([walk(a) for a in x.args + tuple(x.appended)] +
                    [walk(v) for _, v in x.items] + [walk(x.state)])
        found = found or x.func.module == "torch._utils"
      elif isinstance(x, dict):
        found = any([walk(v) for v in x.values()] +
                    [walk(v) for v in getattr(x, "__dict__", {}).values()])
      elif isinstance(x, (list, tuple)):
        found = any([walk(v) for v in x])
      elif isinstance(x, PersistentId):
        found = walk(x.pid)
      else:
        return False
      self._keep.append(x)
      active.discard(id(x))
      if not found:
        self.static.add(id(x))
      return found

    walk(obj)

  def dumps(self, obj):
    w = _Writer(self.cache, self.static)
    w.write(obj)
    w.out += b"."
    return bytes(w.out)


# --- torch's two file formats ------------------------------------------------

def tensors(obj):
  """Every ``_rebuild_tensor_v2`` call record in ``obj``, in pickle order."""
  found = []

  def walk(x):
    if isinstance(x, Call):
      if x.func.module == "torch._utils" and x.func.name.startswith(
          "_rebuild_tensor"):
        found.append(x)
      else:
        for a in x.args:
          walk(a)
    elif isinstance(x, dict):
      for v in x.values():
        walk(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        walk(v)

  walk(obj)
  return found


class ZipCheckpoint:
  """A zip-format checkpoint: its entries, in order, and its parsed pickle."""

  def __init__(self, raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
      self.entries = [(i.filename, z.read(i)) for i in z.infolist()]
    self.pkl_name = next(n for n, _ in self.entries if n.endswith("data.pkl"))
    self.prefix = self.pkl_name[:-len("data.pkl")]
    self.obj = loads(dict(self.entries)[self.pkl_name])
    self.dumps = _dumper(self.obj)

  def to_bytes(self, obj=None, entries=None):
    """The archive with ``obj`` as its pickle (and ``entries`` if given)."""
    pkl = self.dumps(self.obj if obj is None else obj)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
      for name, data in (self.entries if entries is None else entries):
        z.writestr(name, pkl if name == self.pkl_name else data)
    return buf.getvalue()


class LegacyCheckpoint:
  """A legacy-format checkpoint: header, object pickle, keys, storages."""

  def __init__(self, raw):
    f = io.BytesIO(raw)
    for _ in range(3):  # magic number, protocol version, system info
      pickle.load(f)
    self.header = raw[:f.tell()]
    self.obj, _, _ = _load_one(f)
    self.keys, _, _ = _load_one(f)
    self.dumps = _dumper(self.obj)
    itemsize = {}
    for t in tensors(self.obj):
      pid = t.args[0].pid
      itemsize[pid[2]] = _ITEMSIZE[name_of(pid[1])]
    self.storages = []  # [recorded element count, raw bytes]
    for key in self.keys:
      numel, = struct.unpack("<q", f.read(8))
      self.storages.append([numel, f.read(numel * itemsize[key])])
    self.tail = f.read()

  def to_bytes(self, obj=None, keys=None, storages=None):
    out = [self.header, self.dumps(self.obj if obj is None else obj),
           dumps(self.keys if keys is None else keys)]
    for numel, data in (self.storages if storages is None else storages):
      out += [struct.pack("<Q", numel % 2**64), data]  # int64, wrapped
    out.append(self.tail)
    return b"".join(out)


_ITEMSIZE = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2,
             "BFloat16Storage": 2, "LongStorage": 8, "IntStorage": 4,
             "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
             "BoolStorage": 1}


def name_of(g):
  """The name of a global record (a storage type, a function)."""
  return g.glob.name if isinstance(g, type) else g.name


def parse(raw):
  """A :class:`ZipCheckpoint` or :class:`LegacyCheckpoint` of ``raw``."""
  if raw[:2] == b"PK":
    return ZipCheckpoint(raw)
  return LegacyCheckpoint(raw)
