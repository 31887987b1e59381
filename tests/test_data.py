"""Tests for the input pipeline (vqgan_jax.data): each states its property."""
import itertools
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from vqgan_jax import data
from vqgan_jax.data import images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(dataset, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  kwargs.setdefault('num_workers', 2)
  return data.build_dataset(dataset, **kwargs)


def _take(iterator, n):
  out = list(itertools.islice(iterator, n))
  iterator.close()
  return out


def _gray_folder(root, n):
  """n constant-gray 20x20 PNGs; image i has gray level 10 * i + 5."""
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.new('L', (20, 20), 10 * i + 5).save(root / f'{i:03d}.png')
  return root


def _gray_ids(batch):
  """Recovers the image ids of `_gray_folder` images (masked-in slots)."""
  pixels = batch['image'][:, 0, 0, 0][batch.get('mask', Ellipsis)]
  levels = np.rint((pixels + 1) * 127.5).astype(int)
  assert np.all((levels - 5) % 10 == 0)
  return (levels - 5) // 10


@pytest.fixture
def mixed_folder(tmp_path):
  """Two classes, nested files, odd modes and sizes, two unreadable files."""
  root = tmp_path / 'images'
  (root / 'cat' / 'nested').mkdir(parents=True)
  (root / 'dog').mkdir()
  rng = np.random.default_rng(0)
  noise = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)
  Image.fromarray(noise(30, 40, 3)).save(root / 'cat' / 'rgb.png')
  Image.fromarray(noise(50, 50, 1)[..., 0]).save(root / 'cat' / 'gray.jpg')
  Image.fromarray(noise(64, 33, 4), 'RGBA').save(
      root / 'cat' / 'nested' / 'rgba.png')
  Image.fromarray(noise(48, 64, 3)).convert('P').save(root / 'dog' / 'p.png')
  Image.new('L', (5, 7), 255).save(root / 'dog' / 'tiny.png')
  Image.fromarray(np.full((30, 30), 65535, np.uint16)).save(
      root / 'dog' / 'deep16.png')
  (root / 'dog' / 'corrupt.png').write_bytes(rng.bytes(500))
  Image.fromarray(noise(64, 64, 3)).save(root / 'dog' / 'full.jpg', quality=90)
  jpeg = (root / 'dog' / 'full.jpg').read_bytes()
  (root / 'dog' / 'full.jpg').unlink()
  (root / 'dog' / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
  (root / 'dog' / 'notes.txt').write_text('not an image')
  return root


# ----------------------------------------------------------------- digits


@pytest.mark.parametrize('channels', [1, 3])
def test_digits_shapes_range_and_split(channels):
  from sklearn.datasets import load_digits
  target = load_digits().target
  train = _build('digits', resolution=16, channels=channels)
  val = _build('digits', resolution=16, channels=channels, split='validation')
  assert (train.num_examples, val.num_examples) == (1617, 180)
  assert train.num_classes == val.num_classes == 10
  batches = list(val.eval_iterator(batch_size=64))
  assert len(batches) == 3
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, target[-180:])
  assert set(labels) == set(range(10))
  batch = _take(train.train_iterator(batch_size=256, seed=0), 1)[0]
  assert batch['image'].shape == (256, 16, 16, channels)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  assert set(batch['label']) == set(range(10))


def test_digits_rgb_is_gray_repeated_and_matches_enlarged_sklearn_image():
  from sklearn.datasets import load_digits
  gray_ds = _build('digits', resolution=16, channels=1)
  gray = next(iter(gray_ds.eval_iterator(8)))
  rgb = next(iter(_build('digits', resolution=16).eval_iterator(8)))
  np.testing.assert_array_equal(rgb['image'], np.repeat(gray['image'], 3, -1))
  first = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
  expected = np.asarray(Image.fromarray(first).resize((16, 16), Image.BICUBIC))
  np.testing.assert_array_equal(gray['image'][0, ..., 0],
                                expected / np.float32(127.5) - 1)


# ----------------------------------------------------------------- folder


def test_folder_reads_modes_skips_unreadable_counts_upscaled(mixed_folder,
                                                             caplog):
  ds = _build(f'folder:{mixed_folder}', resolution=24, with_labels=True)
  assert ds.num_examples == 8 and ds.num_classes == 2
  assert ds.source.classes == ['cat', 'dog']
  with caplog.at_level(logging.WARNING):
    batches = list(ds.eval_iterator(batch_size=4))
  paths = ds.source.paths
  mask = np.concatenate([b['mask'] for b in batches])
  unreadable = [os.path.basename(p) in ('corrupt.png', 'truncated.jpg')
                for p in paths]
  np.testing.assert_array_equal(mask, ~np.array(unreadable))
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels[mask],
                                np.array([0, 0, 0, 1, 1, 1, 1, 1])[mask])
  stats = ds.stats
  assert stats['skipped_corrupt'] == 2 and stats['upscaled'] == 1
  assert stats['ignored_files'] == 1
  assert 'corrupt.png' in caplog.text and 'truncated.jpg' in caplog.text
  image = np.concatenate([b['image'] for b in batches])
  assert image.shape == (8, 24, 24, 3)
  assert np.all(image[~mask] == 0)
  assert image.min() >= -1 and image.max() <= 1
  by_name = dict(zip([os.path.basename(p) for p in paths], image))
  np.testing.assert_array_equal(by_name['tiny.png'], 1.0)  # white, enlarged
  np.testing.assert_array_equal(by_name['deep16.png'], 1.0)  # 16-bit white
  # Training keeps going past the unreadable files, counting them once.
  for batch in _take(ds.train_iterator(batch_size=4, seed=1), 6):
    assert batch['image'].shape == (4, 24, 24, 3)
    assert np.all(np.abs(batch['image']) <= 1)
    assert set(batch['label']) <= {0, 1}
  assert ds.stats['skipped_corrupt'] == 2


def test_folder_without_class_subfolders_has_no_labels(tmp_path):
  ds = _build(f'folder:{_gray_folder(tmp_path / "g", 3)}', resolution=16)
  assert ds.num_classes is None and not ds.has_labels
  batch = next(iter(ds.eval_iterator(batch_size=4)))
  assert set(batch) == {'image', 'mask', 'index'}
  np.testing.assert_array_equal(batch['index'][batch['mask']], np.flatnonzero(batch['mask']))
  with pytest.raises(ValueError, match='no labels'):
    _build(f'folder:{tmp_path / "g"}', resolution=16, with_labels=True)


def test_center_crop_matches_hand_computation_random_crop_is_seeded(tmp_path):
  pixels = np.arange(12 * 21 * 3, dtype=np.uint8).reshape(12, 21, 3)
  (tmp_path / 'one').mkdir()
  Image.fromarray(pixels).save(tmp_path / 'one' / 'x.png')
  ds = _build(f'folder:{tmp_path / "one"}', resolution=12)
  center = next(iter(ds.eval_iterator(batch_size=1)))['image'][0]
  left = (21 - 12) // 2  # 4: albumentations CenterCrop floors
  np.testing.assert_array_equal(
      center, pixels[:, left:left + 12] / np.float32(127.5) - 1)

  def lefts(seed):
    batches = _take(ds.train_iterator(batch_size=1, seed=seed), 24)
    found = []
    for b in batches:
      windows = [l for l in range(10) if np.array_equal(
          b['image'][0], pixels[:, l:l + 12] / np.float32(127.5) - 1)]
      assert len(windows) == 1  # every crop is an exact window of the image
      found.append(windows[0])
    return found

  first = lefts(seed=3)
  assert len(set(first)) > 3  # crops move across steps
  assert lefts(seed=3) == first  # and are a function of the seed
  assert lefts(seed=4) != first


def test_augment_flips_and_reorders_channels_per_example_and_resumes(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'p').mkdir()
  for i in range(5):  # distinct, asymmetric colour images
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
        tmp_path / 'p' / f'{i}.png')
  ds = _build(f'folder:{tmp_path / "p"}', resolution=8)
  plain = _take(ds.train_iterator(batch_size=5, seed=1), 6)
  augmented = _take(ds.train_iterator(batch_size=5, seed=1,
                                      augment=('flip', 'channels')), 6)
  seen = set()
  for p, a in zip(plain, augmented):
    for x, y in zip(p['image'], a['image']):
      # Each augmented example is its plain crop, maybe mirrored, with its
      # channels in one of the six orders.
      found = [(f, o) for f in (False, True)
               for o in itertools.permutations(range(3))
               if np.array_equal((x[:, ::-1] if f else x)[..., list(o)], y)]
      assert found
      seen.add(found[0])
  assert len(seen) > 6  # both mirrored and unmirrored, several orders
  # One augmentation alone draws the same as when both are on.
  flips = _take(ds.train_iterator(batch_size=5, seed=1, augment=('flip',)), 6)
  for p, f, a in zip(plain, flips, augmented):
    for x, y, z in zip(p['image'], f['image'], a['image']):
      mirrored = not np.array_equal(x, y)
      np.testing.assert_array_equal(y, x[:, ::-1] if mirrored else x)
      assert any(np.array_equal(y[..., list(o)], z)
                 for o in itertools.permutations(range(3)))
  # Exact resume, and () is the plain stream.
  resumed = _take(ds.train_iterator(batch_size=5, seed=1, start_step=4,
                                    augment=('flip', 'channels')), 2)
  for got, want in zip(resumed, augmented[4:]):
    np.testing.assert_array_equal(got['image'], want['image'])
  for got, want in zip(_take(ds.train_iterator(batch_size=5, seed=1,
                                               augment=()), 6), plain):
    np.testing.assert_array_equal(got['image'], want['image'])
  with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
    ds.train_iterator(batch_size=5, seed=1, augment=('rotate',))
  gray = _build(f'folder:{_gray_folder(tmp_path / "g", 3)}', resolution=8,
                channels=1)
  with pytest.raises(ValueError, match="'channels' reorders R, G and B"):
    gray.train_iterator(batch_size=3, seed=1, augment=('channels',))


def test_resized_size_keeps_aspect_and_sets_smallest_side():
  assert images.resized_size(100, 50, 32) == (64, 32)
  assert images.resized_size(33, 64, 24) == (24, 47)
  assert images.resized_size(5, 7, 24) == (24, 34)


# ----------------------------------------------------- order, resume, shards


def test_exact_resume_and_epochs_are_permutations(tmp_path):
  root = _gray_folder(tmp_path / 'g', 7)
  (root / 'zz_corrupt.png').write_bytes(b'\x89PNG not really')
  ds = _build(f'folder:{root}', resolution=16)
  full = _take(ds.train_iterator(batch_size=4, seed=5), 9)
  resumed = ds.train_iterator(batch_size=4, seed=5, start_step=6)
  assert resumed.epoch == 6 * 4 // 8
  for got, want in zip(_take(resumed, 3), full[6:]):
    np.testing.assert_array_equal(got['image'], want['image'])
  ids = np.concatenate([_gray_ids(b) for b in full])
  # Epochs of 8 stream positions; the corrupt one takes the next readable.
  for epoch in range(4):
    assert set(ids[8 * epoch:8 * epoch + 8]) == set(range(7))
  assert not np.array_equal(ids[:8], ids[8:16])  # reshuffled per epoch
  other = _take(ds.train_iterator(batch_size=4, seed=6), 2)
  assert not np.array_equal(np.concatenate([_gray_ids(b) for b in other]),
                            ids[:8])


def test_process_shards_are_disjoint_and_cover(tmp_path):
  root = _gray_folder(tmp_path / 'g', 10)
  single = _build(f'folder:{root}', resolution=16)
  order = np.concatenate([_gray_ids(b)
                          for b in single.eval_iterator(batch_size=4)])
  np.testing.assert_array_equal(order, np.arange(10))
  seen, evals = [], []
  for p in range(3):
    ds = _build(f'folder:{root}', resolution=16, process_index=p,
                process_count=3)
    n_local = ds.stats['num_local_examples']
    epoch = _take(ds.train_iterator(batch_size=3, seed=0), n_local)
    ids = np.concatenate([_gray_ids(b) for b in epoch])
    assert len(set(ids)) == n_local  # one local epoch = each local example
    seen.append(set(ids))
    assert ds.num_eval_batches(batch_size=6) == 2
    batches = list(ds.eval_iterator(batch_size=6))
    assert len(batches) == 2 and batches[0]['image'].shape[0] == 2
    evals.append(np.concatenate([_gray_ids(b) for b in batches]))
  assert set().union(*seen) == set(range(10))
  assert sum(len(s) for s in seen) == 10
  for p in range(3):
    np.testing.assert_array_equal(evals[p], np.arange(p, 10, 3))
  with pytest.raises(ValueError, match='multiple of the process count 3'):
    ds.train_iterator(batch_size=4, seed=0)
  dropped = list(ds.eval_iterator(batch_size=6, drop_remainder=True))
  assert len(dropped) == 1 and dropped[0]['mask'].all()


# ----------------------------------------------------------------- errors


def test_errors_name_the_problem_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _build(f'folder:{tmp_path / "missing"}', resolution=16)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('x')
  with pytest.raises(FileNotFoundError, match=r'no image files.*1 other'):
    _build(f'folder:{tmp_path / "empty"}', resolution=16)
  with pytest.raises(ValueError) as e:
    _build('imagenet', resolution=16)
  for form in ('digits', 'tfds:NAME[:SPLIT]', 'folder:PATH'):
    assert form in str(e.value)
  with pytest.raises(ValueError, match='digits has no split'):
    _build('digits', split='bogus', resolution=16)
  empty_dir = tmp_path / 'tfds_empty'
  empty_dir.mkdir()
  for name in ('mnist', 'no_such_dataset_xyz'):
    with pytest.raises(FileNotFoundError) as e:
      _build(f'tfds:{name}', resolution=16, data_dir=str(empty_dir))
    message = str(e.value)
    assert f'{name} not found in data_dir {empty_dir}' in message
    assert 'tfds build' in message and '--config.data_dir' in message


def test_parse_tfds_spec():
  from vqgan_jax.data.tfds_source import parse_tfds_spec
  assert parse_tfds_spec('mnist') == ('mnist', None)
  assert parse_tfds_spec('mnist:test[:10%]') == ('mnist', 'test[:10%]')
  assert parse_tfds_spec('mnist:3.0.1') == ('mnist:3.0.1', None)
  assert parse_tfds_spec('mnist:3.*.*:train') == ('mnist:3.*.*', 'train')


def test_digits_and_folder_do_not_import_tensorflow(tmp_path):
  _gray_folder(tmp_path / 'g', 2)
  code = (
      'import sys\n'
      'from vqgan_jax.data import build_dataset\n'
      f'for name in ("digits", "folder:{tmp_path / "g"}"):\n'
      '  ds = build_dataset(name, resolution=8)\n'
      '  next(iter(ds.eval_iterator(2)))\n'
      'bad = [m for m in ("tensorflow", "tensorflow_datasets") '
      'if m in sys.modules]\n'
      'assert not bad, bad\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=env,
                 timeout=120)


# ------------------------------------------------------------------- tfds


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  """A 6 + 3 example TFDS dataset built twice: tfrecord and array_record."""
  import tensorflow_datasets as tfds  # in requirements-dev.txt; never skipped
  rng = np.random.default_rng(0)
  arrays = {'train': [rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8)
                      for i in range(6)],
            'test': [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                     for _ in range(3)]}

  class VqganJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=3)})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in arrays}

    def _generate_examples(self, split):
      for i, array in enumerate(arrays[split]):
        yield i, {'image': array, 'label': i % 3}

  dirs = {}
  for file_format in ('tfrecord', 'array_record'):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    VqganJaxTinyImages(data_dir=dirs[file_format],
                       file_format=file_format).download_and_prepare()
  return dirs, arrays


@pytest.mark.parametrize('file_format', ['tfrecord', 'array_record'])
def test_tfds_reads_prepared_dataset(tiny_tfds, file_format):
  dirs, arrays = tiny_tfds
  ds = _build('tfds:vqgan_jax_tiny_images', resolution=16,
              data_dir=dirs[file_format], with_labels=True)
  assert ds.num_examples == 6 and ds.num_classes == 3
  reader = {'tfrecord': 'TfrecordReader', 'array_record': 'ArrayRecord'}
  reader_type = type(ds.source._reader).__name__  # pylint: disable=protected-access
  assert reader_type.startswith(reader[file_format])
  batches = list(ds.eval_iterator(batch_size=4))
  got = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  expected = [images.preprocess(Image.fromarray(a), 16, 3)[0]
              for a in arrays['train']]
  matches = [[i for i, e in enumerate(expected) if np.array_equal(g, e)]
             for g in got]
  assert sorted(m[0] for m in matches) == list(range(6))  # each exactly once
  np.testing.assert_array_equal(labels, [m[0] % 3 for m in matches])
  resumed = _take(ds.train_iterator(batch_size=2, seed=0, start_step=4), 1)[0]
  full = _take(ds.train_iterator(batch_size=2, seed=0), 5)[4]
  np.testing.assert_array_equal(resumed['image'], full['image'])
  # 'validation' falls back to the dataset's 'test'; SPLIT in the string wins.
  assert _build('tfds:vqgan_jax_tiny_images', resolution=16, split='validation',
                data_dir=dirs[file_format]).num_examples == 3
  assert _build('tfds:vqgan_jax_tiny_images:train[:2]', resolution=16,
                split='validation',
                data_dir=dirs[file_format]).num_examples == 2
  tf = sys.modules.get('tensorflow')
  if tf is not None and hasattr(tf, 'config'):
    assert tf.config.get_visible_devices('GPU') == []


# ----------------------------------------------------- prefetch and devices


def test_make_global_batch_and_prefetch_to_device_on_one_device_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  sharding = jax.sharding.NamedSharding(mesh, spec)
  ds = _build('digits', resolution=8, split='validation')
  host = list(ds.eval_iterator(batch_size=64))
  batch = data.make_global_batch(host[0], sharding)
  for key in ('image', 'label', 'mask'):
    assert isinstance(batch[key], jax.Array)
    assert batch[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch[key]), host[0][key])
  on_device = list(data.prefetch_to_device(iter(host), 2, sharding))
  assert len(on_device) == len(host) == 3
  for got, want in zip(on_device, host):
    np.testing.assert_array_equal(np.asarray(got['image']), want['image'])


def test_thread_prefetcher_keeps_order_and_reraises():

  def numbers():
    yield from range(5)
    raise RuntimeError('boom')

  prefetcher = data.ThreadPrefetcher(numbers(), buffer_size=2)
  assert [next(prefetcher) for _ in range(5)] == list(range(5))
  with pytest.raises(RuntimeError, match='boom'):
    next(prefetcher)
  endless = data.ThreadPrefetcher(itertools.count(), buffer_size=1)
  assert next(endless) == 0
  endless.close()
  endless._thread.join(timeout=5)  # pylint: disable=protected-access
  assert not endless._thread.is_alive()  # pylint: disable=protected-access


_TWO_PROCESS_WORKER = """
import sys
import jax, numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from vqgan_jax import data
ds = data.build_dataset('digits', resolution=8, split='validation')
mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
labels = []
for batch in data.prefetch_to_device(ds.eval_iterator(16), 2, sharding):
  assert batch['image'].shape == (16, 8, 8, 3)
  batch = multihost_utils.process_allgather(batch, tiled=True)
  labels.append(np.asarray(batch['label'])[np.asarray(batch['mask'])])
print(np.bincount(np.concatenate(labels)).tolist())
"""


@pytest.mark.slow
def test_two_jax_processes_build_global_batches_covering_the_split():
  from sklearn.datasets import load_digits
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  workers = [subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_WORKER, address, str(i)], cwd=REPO,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(2)]
  try:
    outputs = [w.communicate(timeout=180)[0] for w in workers]
  finally:
    for w in workers:
      w.kill()
  assert [w.returncode for w in workers] == [0, 0]
  expected = np.bincount(load_digits().target[-180:]).tolist()
  for output in outputs:  # every label of the split, once, on each process
    assert output.strip().splitlines()[-1] == str(expected)
