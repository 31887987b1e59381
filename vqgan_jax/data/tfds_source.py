"""Random access to a prepared TFDS dataset (`tfds:NAME[:SPLIT]`).

Only this module imports tensorflow_datasets, and only when a `tfds:` dataset
is built. Reading does not need TensorFlow: array_record (and parquet)
datasets go through `builder.as_data_source`; tfrecord datasets (the default
of `tfds build`) through an index of record offsets built lazily per file,
with the same numpy example parser. Images are kept encoded
(`tfds.decode.SkipDecoding`) and decoded by PIL in the pipeline's threads.
"""
import bisect
import os
import re
import struct
import sys
import threading
from typing import Any, Sequence

from vqgan_jax.data import images

_VERSION = re.compile(r'^\d+\.(\d+|\*)\.(\d+|\*)$')


def parse_tfds_spec(spec: str) -> tuple[str, str | None]:
  """Splits 'NAME[:VERSION][:SPLIT]' into (name with version, split or None).

  Args:
    spec: the text after 'tfds:', e.g. 'mnist', 'mnist:test',
      'imagenet2012:5.1.0:validation[:10%]'.

  Returns:
    (name, split).
  """
  head, _, tail = spec.partition(':')
  version, _, rest = tail.partition(':')
  if _VERSION.match(version):
    return f'{head}:{version}', rest or None
  return head, tail or None


MISSING = ('needs TensorFlow Datasets, which the main install leaves out: '
           "pip install -e '.[tfds]' (or pip install -r "
           'requirements-tfds.txt); digits and folder:PATH need neither')


def available() -> bool:
  """Whether tensorflow_datasets is installed (looked up, not imported)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('tensorflow_datasets') is not None


def _import_tfds():
  """Imports tensorflow_datasets quietly and keeps TensorFlow off GPUs."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(f'tfds: datasets {MISSING} ({e})') from e
  hide_gpus_from_tensorflow()
  return tfds


def hide_gpus_from_tensorflow() -> None:
  """Hides GPUs from TensorFlow if it is loaded, so JAX keeps their memory.

  Never imports TensorFlow itself: reading needs no TensorFlow, and a
  TensorFlow that is not loaded cannot take a GPU.
  """
  tf = sys.modules.get('tensorflow')
  if tf is None or not hasattr(tf, 'config'):
    return
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices; nothing to do.
    pass


def _not_found(name: str, data_dir: str | None, why: str) -> FileNotFoundError:
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  return FileNotFoundError(
      f'tfds dataset {name} not found in data_dir {where} ({why}); prepare it '
      f'with `tfds build {name} --data_dir={data_dir or "DIR"} '
      f'--file_format=array_record` (or `builder.download_and_prepare()` for '
      f'your own GeneratorBasedBuilder with that data_dir), or set '
      f'--config.data_dir to the folder that holds {name.split(":")[0]}/.')


def _pick_split(info: Any, split: str) -> str:
  """Maps the logical split to one the dataset has ('validation' <-> 'test')."""
  base = re.split(r'[\[+]', split, maxsplit=1)[0]
  available = sorted(info.splits.keys())
  if base in available:
    return split
  for alias in {'validation': ('test',), 'test': ('validation',)}.get(base, ()):
    if alias in available:
      return alias + split[len(base):]
  raise ValueError(f'tfds dataset {info.name} has no split {base!r}; '
                   f'available: {available}. Name one with tfds:NAME:SPLIT.')


class TfdsSource:
  """A prepared TFDS split with an `image` and an optional `label` feature.

  Args:
    spec: 'NAME[:VERSION][:SPLIT]' (the text after 'tfds:').
    split: split used when `spec` names none; 'validation' falls back to
      'test' and back when the dataset lacks it.
    data_dir: the TFDS data_dir (None: the TFDS default).

  Raises:
    FileNotFoundError: the dataset is not prepared in data_dir.
    ValueError: no such split, or no `image` feature.
  """

  def __init__(self, spec: str, split: str, data_dir: str | None):
    tfds = _import_tfds()
    name, spec_split = parse_tfds_spec(spec)
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise _not_found(name, data_dir, 'no such registered dataset and no '
                       'prepared copy') from e
    if not builder.is_prepared():
      raise _not_found(name, data_dir, 'registered but not prepared there')
    hide_gpus_from_tensorflow()
    info = builder.info
    features = info.features
    if 'image' not in features.keys():
      raise ValueError(f'tfds dataset {name} has no `image` feature '
                       f'(features: {sorted(features.keys())}).')
    self.split = _pick_split(info, spec_split or split)
    decoders = ({'image': tfds.decode.SkipDecoding()}
                if isinstance(features['image'], tfds.features.Image) else None)
    self._reader = _open_reader(builder, self.split, decoders)
    label = features['label'] if 'label' in features.keys() else None
    self.has_labels = label is not None
    self.num_classes = getattr(label, 'num_classes', None)
    self.name = f'tfds:{name}:{self.split}'
    self.num_examples = len(self._reader)

  def fetch(self, indices: Sequence[int]) -> list[Any]:
    try:
      return list(self._reader.__getitems__([int(i) for i in indices]))
    except Exception:  # pylint: disable=broad-except
      return [self._fetch_one(int(i)) for i in indices]

  def _fetch_one(self, index: int) -> Any:
    try:
      return self._reader[index]
    except Exception as e:  # pylint: disable=broad-except
      return e

  def decode(self, raw: Any) -> tuple[Any, int | None]:
    label = int(raw['label']) if self.has_labels else None
    return images.open_image(raw['image']), label

  def describe(self, index: int) -> str:
    return f'{self.name}[{index}]'


def _open_reader(builder: Any, split: str, decoders: Any) -> Any:
  """A random-access sequence of decoded-but-image-encoded examples."""
  formats = {f.value for f in builder.info.available_file_formats()}
  if formats & {'array_record', 'parquet'}:
    return builder.as_data_source(split, decoders=decoders)
  if 'tfrecord' in formats:
    return TfrecordReader(builder.info, split, decoders)
  raise ValueError(f'tfds dataset {builder.info.name} is stored as {formats}; '
                   f'rebuild it with --file_format=array_record.')


class TfrecordReader:
  """Random access into a TFRecord split via per-file record offsets.

  A TFRecord is [uint64 length][uint32 crc][data][uint32 crc]; the offsets of
  a file are found by reading only its 12-byte headers, the first time an
  example of that file is asked for.

  Args:
    info: the dataset's DatasetInfo.
    split: a split string (slices allowed).
    decoders: TFDS decoders passed to the example parser.
  """

  def __init__(self, info: Any, split: str, decoders: Any):
    from etils import epath
    from tensorflow_datasets.core.data_sources import base
    self._epath = epath
    self._features = info.features
    self._decoders = decoders
    self._files = []  # (filename, first record, number of records)
    for instruction in base.file_instructions(info, split):
      take = instruction.take
      if take is None or take < 0:
        take = instruction.examples_in_shard - instruction.skip
      self._files.append((os.fspath(instruction.filename), instruction.skip,
                          take))
    self._starts = []
    total = 0
    for _, _, take in self._files:
      self._starts.append(total)
      total += take
    self._length = total
    self._offsets = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    return [self[i] for i in indices]

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < self._length:
      raise IndexError(index)
    file_id = bisect.bisect_right(self._starts, index) - 1
    filename, skip, _ = self._files[file_id]
    offset, length = self._file_offsets(filename)[skip + index -
                                                 self._starts[file_id]]
    with self._epath.Path(filename).open('rb') as f:
      f.seek(offset)
      record = f.read(length)
    return self._features.deserialize_example_np(record,
                                                 decoders=self._decoders)

  def _file_offsets(self, filename: str) -> list[tuple[int, int]]:
    with self._lock:
      if filename not in self._offsets:
        self._offsets[filename] = _scan_tfrecord(self._epath.Path(filename))
      return self._offsets[filename]


def _scan_tfrecord(path: Any) -> list[tuple[int, int]]:
  """(data offset, data length) of every record in a TFRecord file."""
  offsets, position = [], 0
  with path.open('rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return offsets
      (length,) = struct.unpack('<Q', header[:8])
      offsets.append((position + 12, length))
      position += 16 + length
      f.seek(position)
