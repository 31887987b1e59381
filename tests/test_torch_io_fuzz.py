"""Fuzzing of the torch-free checkpoint reader against ``torch.load``.

Real checkpoints (a tiny reference VQModel state dict in a Lightning-style
``{"state_dict": ...}``, a tiny reference minGPT, and a dict of tensors of
every supported dtype, views, transposes and expands), each in the zip and
the legacy format, are mutated: truncations, byte flips (anywhere, and in
the pickle with the archive's checksums rewritten), and edits of the pickle
records: sizes, strides, offsets, ranks, storage types, storage keys,
declared storage sizes, archive entries, the legacy format's recorded sizes
and key list. For every case the reader must either return exactly what
``torch.load(..., weights_only=True)`` returns (same structure, shapes,
dtypes and bytes) or raise ``CheckpointError``; any other exception, a
crash, or a file that we accept and torch refuses fails the test.

The cases run in a child process (this file run as a script), so a crash
fails the test instead of killing pytest; after a crash the remaining cases
run in a new child. The reader runs first; torch only runs where the reader
accepted a file (``VQGAN_FUZZ_COMPARE_ALL=1`` runs it on every case, to
count where torch and the reader disagree). ``VQGAN_FUZZ_CASES`` sets the
number of cases (default 2000), ``VQGAN_FUZZ_SEED`` the seed.

Where the reader is stricter than torch (it refuses, torch loads):
- an archive entry whose checksum does not match (torch does not check it
  for tensor data, so it loads flipped bytes as values);
- a storage whose archive entry is longer than its declared size, or a
  legacy file with trailing bytes inside a storage's declared extent;
- a storage key declared twice with different types or sizes (torch uses the
  first declaration; torch.save never writes this);
- pickle records torch tolerates but never writes (a non-string storage key,
  a storage reference with extra fields, a bare storage outside a tensor,
  memo indices out of order).
Where it accepts what torch refuses, it is for torch's own reasons, not the
data's: its weights-only unpickler allows fewer globals and opcodes (the
reader keeps unknown classes as inert placeholders), it refuses storages of
devices the machine lacks, and it refuses some zip archives whose directory
is damaged where Python's zipfile does not look; then every entry read
passed its CRC-32 and the result must equal the unmutated file's (checked).
It never reads out of bounds: no tensor torch refuses for its geometry is
accepted.
"""
import copy
import json
import os
import subprocess
import sys
import zipfile

import numpy as np

from vqgan_jax_testing import torch_pickle as tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = int(os.environ.get("VQGAN_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("VQGAN_FUZZ_SEED", "0"))
COMPARE_ALL = os.environ.get("VQGAN_FUZZ_COMPARE_ALL") == "1"

BASES = ("vq_zip", "vq_legacy", "gpt_zip", "gpt_legacy", "mixed_zip",
         "mixed_legacy")


def write_bases(directory):
  """The unmutated checkpoints, written by torch from reference models."""
  from vqgan_jax_testing import oracle
  from vqgan_jax_testing import reference_ckpt as rc
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.transformer import mingpt
  tiny = dict(ch=32, out_ch=3, ch_mult=[1], num_res_blocks=1,
              attn_resolutions=[], dropout=0.0, in_channels=3, resolution=8,
              z_channels=8)
  vq = rc.build_reference(rc.vq_model_config(tiny, 16, 4), seed=0)
  torch.manual_seed(0)
  gpt = mingpt.GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2,
                   n_embd=32)
  base = torch.randn(6, 5)
  mixed = {
      "a": torch.randn(3, 4), "transposed": base.t(), "view": base[1:4, 2:],
      "expanded": torch.randn(3, 1).expand(3, 4), "ints": torch.arange(7),
      "int32": torch.arange(5, dtype=torch.int32), "bf16": torch.randn(2, 3).bfloat16(),
      "half": torch.randn(4).half(), "double": torch.randn(2).double(),
      "bool": torch.tensor([True, False, True]), "int8": torch.arange(-3, 3).to(torch.int8),
      "uint8": torch.arange(4).to(torch.uint8), "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3), "nested": [torch.ones(2), (torch.zeros(1), 7)],
  }
  objs = {"vq": {"state_dict": vq.state_dict(), "epoch": 3, "global_step": 7},
          "gpt": gpt.state_dict(), "mixed": mixed}
  for name, obj in objs.items():
    torch.save(obj, os.path.join(directory, name + "_zip.ckpt"))
    torch.save(obj, os.path.join(directory, name + "_legacy.ckpt"),
               _use_new_zipfile_serialization=False)


# --- mutations ---------------------------------------------------------------

def _interesting(rng, v, n):
  """An integer near a boundary of value ``v`` in a storage of ``n``."""
  v = v if isinstance(v, int) else 1
  pool = [0, 1, -1, v + 1, v - 1, 2 * v, n, n - 1, n + 1, n // 2, 2**31 - 1,
          2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, -2**63,
          int(rng.integers(0, min(max(2 * n + 2, 2), 2**62)))]
  return pool[int(rng.integers(len(pool)))]


_TYPES = ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage",
          "LongStorage", "IntStorage", "ShortStorage", "CharStorage",
          "ByteStorage", "BoolStorage", "UntypedStorage",
          "ComplexFloatStorage", "QInt8Storage", "FooStorage")


def _edit_tensor(rng, tensors, log):
  """Edits one field of one of the tensor records ``tensors`` in place."""
  t = tensors[int(rng.integers(len(tensors)))]
  storage, offset, size, stride = t.args[:4]
  pid = list(storage.pid)
  n = pid[4] if isinstance(pid[4], int) else 1
  field = ("offset", "size", "stride", "rank", "type", "key", "numel",
           "oddtype", "v3")[int(rng.integers(9))]
  if isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)):
    size, stride = list(size), list(stride)
  elif field in ("size", "stride", "rank", "oddtype", "v3"):
    field = "offset"  # an earlier edit made them something else
  if field == "offset":
    offset = _interesting(rng, offset, n)
  elif field in ("size", "stride") and size:
    values = size if field == "size" else stride
    i = int(rng.integers(len(values)))
    values[i] = _interesting(rng, values[i], n)
  elif field == "rank":
    if rng.integers(2) and size:
      (size if rng.integers(2) else stride).pop()
    else:
      size.append(int(rng.integers(0, 3)))
      stride.append(_interesting(rng, 1, n))
  elif field == "type":
    pid[1] = tp.Global("torch", _TYPES[int(rng.integers(len(_TYPES)))])
  elif field == "key":
    keys = sorted({x.args[0].pid[2] for x in tensors}, key=str)
    pid[2] = (keys[int(rng.integers(len(keys)))] if rng.integers(3)
              else ["nope", 5, "../data.pkl", ""][int(rng.integers(4))])
  elif field == "numel":
    pid[4] = _interesting(rng, n, n)
  elif field == "oddtype":
    odd = [None, 1.0, "3", True, (1,), [2]][int(rng.integers(6))]
    which = int(rng.integers(3))
    if which == 0:
      offset = odd
    elif which == 1 and size:
      size[int(rng.integers(len(size)))] = odd
    else:
      stride = odd
  elif field == "v3":  # the same tensor as _rebuild_tensor_v3 with a dtype
    t.func = tp.Global("torch._utils", "_rebuild_tensor_v3")
    name = ["float32", "float16", "int64", "uint8", "bool", "bfloat16",
            "uint16", "float8_e4m3fn", "complex64", "qint8"][
                int(rng.integers(10))]
    pid[1] = tp.Global("torch.storage", "UntypedStorage")
    nbytes = n * {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2,
                  "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
                  "Bool": 1}.get(tp.name_of(storage.pid[1])[:-7], 1)
    pid[4] = nbytes
    t.args = (tp.PersistentId(tuple(pid)), offset, tuple(size), tuple(stride),
              False, t.args[5], tp.Global("torch", name))
    log.append(f"v3 dtype {name} on {storage.pid[2]}")
    return
  storage = tp.PersistentId(tuple(pid))
  if isinstance(size, list):
    size = tuple(size)
  if isinstance(stride, list):
    stride = tuple(stride)
  t.args = (storage, offset, size, stride) + t.args[4:]
  log.append(f"{field}: storage={pid[1:3]}+{pid[4]!r} offset={offset!r} "
             f"size={size!r} stride={stride!r}")


def mutate(rng, raw, parsed):
  """One mutated file of ``raw``; returns (bytes, description)."""
  if not hasattr(parsed, "tensor_records"):
    parsed.tensor_records = tp.tensors(parsed.obj)
  saved = [(t, t.func, t.args) for t in parsed.tensor_records]
  try:
    return _mutate(rng, raw, parsed)
  finally:  # the records are edited in place: put them back
    for t, func, args in saved:
      t.func, t.args = func, args


def _mutate(rng, raw, parsed):
  is_zip = isinstance(parsed, tp.ZipCheckpoint)
  kind = int(rng.integers(100))
  if kind < 12:
    k = int(rng.integers(len(raw)))
    return raw[:k], f"truncated to {k} of {len(raw)} bytes"
  if kind < 24:
    data = bytearray(raw)
    flips = []
    for _ in range(int(rng.integers(1, 4))):
      i = int(rng.integers(len(data)))
      data[i] ^= int(rng.integers(1, 256))
      flips.append(i)
    return bytes(data), f"bytes flipped at {flips}"
  obj = parsed.obj
  if kind < 34:  # flips in the pickle, with the archive rebuilt around it
    pkl = bytearray(parsed.dumps(obj))
    flips = []
    for _ in range(int(rng.integers(1, 4))):
      i = int(rng.integers(2, len(pkl)))
      pkl[i] ^= int(rng.integers(1, 256))
      flips.append(i)
    pkl = bytes(pkl)
    if is_zip:
      entries = [(n, pkl if n == parsed.pkl_name else d)
                 for n, d in parsed.entries]
      return _zip(entries), f"pickle bytes flipped at {flips}"
    rest = parsed.to_bytes()[len(parsed.header) + len(parsed.dumps(parsed.obj)):]
    return parsed.header + pkl + rest, f"pickle bytes flipped at {flips}"
  log = []
  if kind < 84:
    for _ in range(1 if rng.integers(3) else int(rng.integers(2, 4))):
      _edit_tensor(rng, parsed.tensor_records, log)
    return parsed.to_bytes(obj), "; ".join(log)
  if is_zip:
    entries = list(parsed.entries)
    data = [i for i, (n, _) in enumerate(entries)
            if n.startswith(parsed.prefix + "data/")]
    i = data[int(rng.integers(len(data)))]
    name, content = entries[i]
    what = int(rng.integers(4))
    if what == 0:
      del entries[i]
      log.append(f"entry {name} removed")
    elif what == 1:
      cut = int(rng.integers(len(content) + 1))
      extra = bytes(int(rng.integers(0, 9)))
      entries[i] = (name, content[:cut] + extra)
      log.append(f"entry {name} of {len(content)} bytes now {cut + len(extra)}")
    elif what == 2:
      j = [k for k, (n, _) in enumerate(entries) if n.endswith("byteorder")]
      order = [b"big", b"", b"little\n", b"middle"][int(rng.integers(4))]
      if j:
        entries[j[0]] = (entries[j[0]][0], order)
      log.append(f"byteorder {order!r}")
    else:
      entries.append((name, content))
      log.append(f"entry {name} duplicated")
    with _quiet_duplicates():
      return parsed.to_bytes(obj, entries), "; ".join(log)
  keys, storages = list(parsed.keys), copy.deepcopy(parsed.storages)
  what = int(rng.integers(4))
  i = int(rng.integers(len(keys)))
  if what == 0:
    storages[i][0] = _interesting(rng, storages[i][0], storages[i][0])
    log.append(f"recorded size of storage {keys[i]} now {storages[i][0]}")
  elif what == 1:
    cut = int(rng.integers(len(storages[i][1]) + 1))
    storages[i][1] = storages[i][1][:cut]
    log.append(f"data of storage {keys[i]} cut to {cut} bytes")
  elif what == 2:
    op = int(rng.integers(3))
    if op == 0:
      del keys[i], storages[i]
    elif op == 1:
      keys.append(keys[i])
      storages.append(storages[i])
    else:
      keys[i] = "999"
    log.append(f"key list op {op} at {i}: {keys}")
  else:
    keys = list(reversed(keys))
    log.append("key list reversed, data kept in order")
  return parsed.to_bytes(obj, keys, storages), "; ".join(log)


def _zip(entries):
  import io
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    for name, data in entries:
      z.writestr(name, data)
  return buf.getvalue()


class _quiet_duplicates:

  def __enter__(self):
    import warnings
    self._w = warnings.catch_warnings()
    self._w.__enter__()
    warnings.simplefilter("ignore")

  def __exit__(self, *exc):
    self._w.__exit__(*exc)


# --- the child: runs cases, reports one JSON line each ------------------------

# Where torch refuses a file for reasons of its own, not of the data: its
# weights-only unpickler allows fewer globals and opcodes than the reader
# (which keeps unknown classes as inert placeholders and never calls them),
# and it refuses storages of devices this machine lacks (the reader reads
# every storage to the host).
_TORCH_ONLY = (("unknown global", "Unsupported global"),
               ("unknown global", "Unsupported operand"),
               ("device absent", "is_available() is False"))

def _torch_equal(torch, ours, theirs, path="<top>"):
  """None when ``ours`` (numpy) equals ``theirs`` (torch) exactly, else why."""
  if isinstance(theirs, torch.Tensor):
    if not isinstance(ours, np.ndarray):
      return f"{path}: {type(ours).__name__} vs a tensor"
    if ours.shape != tuple(theirs.shape):
      return f"{path}: shape {ours.shape} vs {tuple(theirs.shape)}"
    want = str(theirs.dtype).replace("torch.", "")
    if ours.dtype.name != want:
      return f"{path}: dtype {ours.dtype} vs {want}"
    t = theirs.detach().contiguous().reshape(-1)
    t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                8: torch.int64}[t.element_size()]).numpy()
    mine = np.ascontiguousarray(ours).reshape(-1).view(t.dtype)
    if theirs.dtype == torch.bool:  # torch keeps a raw byte until it copies
      mine, t = mine != 0, t != 0
    if mine.tobytes() != t.tobytes():
      return f"{path}: values differ"
    return None
  if isinstance(theirs, dict):
    if not isinstance(ours, dict) or list(ours) != list(theirs):
      return f"{path}: keys {list(ours)[:5] if isinstance(ours, dict) else ours!r}"
    for k in theirs:
      why = _torch_equal(torch, ours[k], theirs[k], f"{path}/{k}")
      if why:
        return why
    return None
  if isinstance(theirs, (list, tuple)):
    if type(ours) is not type(theirs) or len(ours) != len(theirs):
      return f"{path}: {type(ours).__name__} vs {type(theirs).__name__}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
      why = _torch_equal(torch, a, b, f"{path}[{i}]")
      if why:
        return why
    return None
  return None if (type(ours) is type(theirs) and ours == theirs) else (
      f"{path}: {ours!r} vs {theirs!r}")


def _has_placeholder(x, torch_io, seen=None):
  """Whether ``x`` holds an object of a class the reader does not know (a
  damaged global name, say): such a result is inert, not data."""
  seen = set() if seen is None else seen
  if id(x) in seen:
    return False
  seen.add(id(x))
  if isinstance(x, torch_io.Placeholder):
    return True
  if isinstance(x, dict):
    x = list(x.values())
  if isinstance(x, (list, tuple)):
    return any(_has_placeholder(v, torch_io, seen) for v in x)
  return False


def child(base_dir, start, stop, out_path, path):
  import warnings
  warnings.simplefilter("ignore")
  import torch
  torch.set_num_threads(1)
  from vqgan_jax import torch_io
  raws = {b: open(os.path.join(base_dir, b + ".ckpt"), "rb").read()
          for b in BASES}
  parsed = {b: tp.parse(raw) for b, raw in raws.items()}
  out = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

  def say(record):
    os.write(out, (json.dumps(record) + "\n").encode())

  for i in range(start, stop):
    rng = np.random.default_rng([SEED, i])
    base = BASES[i % len(BASES)]
    if i < len(BASES):  # first: each base rewritten unchanged by our writer
      data, what = parsed[base].to_bytes(), "rewritten unchanged"
    else:
      data, what = mutate(rng, raws[base], parsed[base])
    with open(path, "wb") as f:
      f.write(data)
    rec = {"i": i, "base": base, "what": what[:300]}
    say({"start": i, "phase": "ours"})
    try:
      ours = torch_io.load_torch_file(path)
      rec["ours"] = "placeholder" if _has_placeholder(ours, torch_io) else "ok"
    except torch_io.CheckpointError as e:
      rec["ours"], rec["msg"] = "CheckpointError", str(e)[:300]
    except BaseException as e:  # pylint: disable=broad-except
      rec["ours"] = f"{type(e).__name__}: {str(e)[:300]}"
    if rec["ours"] in ("ok", "placeholder") or COMPARE_ALL:
      say({"start": i, "phase": "torch"})
      try:
        theirs = torch.load(path, weights_only=True)
        rec["torch"] = "ok"
      except Exception as e:  # pylint: disable=broad-except
        rec["torch"] = f"{type(e).__name__}: {str(e)[-300:]}"
        for label, text in _TORCH_ONLY:
          if text in str(e):
            rec["torch"] = label
      if rec["torch"] == "ok" and rec["ours"] in ("ok", "placeholder"):
        rec["diff"] = _torch_equal(torch, ours, theirs)
      if (rec["ours"] == "ok" and base.endswith("zip") and
          what.startswith(("bytes flipped", "truncated")) and
          (rec["torch"] != "ok" or rec["diff"])):
        # torch refuses (or reads other bytes from) an archive whose
        # directory is damaged where Python's zipfile does not look; every
        # entry we read passed its CRC-32, so the result must be the
        # unmutated file's.
        rec["torch"] = "zip directory"
        rec["diff"] = _torch_equal(torch, ours, torch.load(
            os.path.join(base_dir, base + ".ckpt"), weights_only=True))
    say(rec)
  os.close(out)


# --- the test -----------------------------------------------------------------

def run_cases(base_dir, n, timeout):
  """Runs cases 0..n-1 in children; returns (records, crashes)."""
  return run_cases_range(base_dir, 0, n, timeout)


def run_cases_range(base_dir, start, n, timeout):
  """Runs cases start..n-1 in children; returns (records, crashes)."""
  out_path = os.path.join(base_dir, f"results_{os.getpid()}.jsonl")
  # Each case is written to one file, read twice: on tmpfs where there is one.
  scratch = "/dev/shm" if os.access("/dev/shm", os.W_OK) else base_dir
  case_path = os.path.join(scratch, f"vqgan_fuzz_{os.getpid()}.ckpt")
  records, crashes = {}, []
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  while start < n:
    open(out_path, "w").close()
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), base_dir, str(start),
         str(n), out_path, case_path], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env=env)
    if os.path.exists(case_path):
      os.remove(case_path)
    pending = None
    with open(out_path) as f:
      for line in f:
        rec = json.loads(line)
        if "start" in rec:
          pending = rec
        else:
          records[rec["i"]] = rec
          pending = None
    if r.returncode == 0 and pending is None and max(records, default=-1) == n - 1:
      break
    if pending is None:
      raise AssertionError(f"the fuzz child failed outside a case "
                           f"(exit {r.returncode}):\n{r.stderr[-3000:]}")
    crashes.append((pending["start"], pending["phase"], r.returncode))
    start = pending["start"] + 1
  return records, crashes


def summarize(records, crashes):
  """Counts by outcome; the failures (each a line)."""
  counts, failures = {}, []
  for rec in records.values():
    key = (rec["ours"] if rec["ours"] in ("ok", "placeholder", "CheckpointError")
           else "other exception", rec.get("torch", "-").split(":")[0])
    counts[key] = counts.get(key, 0) + 1
    if key[0] == "other exception":
      failures.append(f"case {rec['i']} ({rec['base']}: {rec['what']}): "
                      f"{rec['ours']}")
    elif rec["ours"] in ("ok", "placeholder") and rec.get("torch") not in (
        "ok", "unknown global", "device absent", "zip directory"):
      failures.append(f"case {rec['i']} ({rec['base']}: {rec['what']}): "
                      f"accepted, torch refuses: {rec.get('torch')}")
    elif rec["ours"] in ("ok", "placeholder") and rec.get("diff"):
      failures.append(f"case {rec['i']} ({rec['base']}: {rec['what']}): "
                      f"differs from torch: {rec['diff']}")
  for i, phase, rc in crashes:
    if phase == "ours":
      failures.append(f"case {i}: the reader crashed the process (exit {rc})")
  return counts, failures


def test_mutated_checkpoints_load_exactly_as_torch_or_raise_checkpoint_error(
    tmp_path):
  write_bases(str(tmp_path))
  records, crashes = run_cases(str(tmp_path), CASES,
                               timeout=max(600, CASES // 5))
  counts, failures = summarize(records, crashes)
  print(f"{CASES} cases, seed {SEED}:", json.dumps(
      {f"{a} / torch {b}": c for (a, b), c in sorted(counts.items())},
      indent=1), f"torch crashed on {sum(p == 'torch' for _, p, _ in crashes)}")
  assert not failures, "\n".join(failures[:30])
  assert len(records) + len(crashes) == CASES
  # The unchanged rewrites load, equal to torch: the edits start from files
  # that both readers accept.
  for i in range(len(BASES)):
    assert records[i]["ours"] == "ok" and records[i].get("diff") is None, records[i]
  # Many mutated files were refused, and many still loaded exactly.
  ours = lambda outcome: sum(c for (a, _), c in counts.items() if a == outcome)
  assert ours("CheckpointError") > CASES // 4, counts
  assert counts.get(("ok", "ok"), 0) > CASES // 20, counts


def test_old_checkpoints_shipped_in_a_package_load_exactly_as_torch():
  """Files written by old torch (0.4, legacy format, Python 2's memo
  numbering from 1, ``None`` hooks): the LPIPS package's linear-layer
  weights, both versions, all three trunks."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from vqgan_jax import torch_io  # pylint: disable=import-outside-toplevel
  # The package's folder, without importing it (it imports torchvision).
  spec = importlib.util.find_spec("lpips")
  root = os.path.join(spec.submodule_search_locations[0], "weights")
  paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root)
                 for f in fs if f.endswith(".pth"))
  assert len(paths) == 6, paths
  for path in paths:
    ours = torch_io.load_torch_file(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert _torch_equal(torch, ours, theirs) is None, path


if __name__ == "__main__":
  child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
        sys.argv[5])
