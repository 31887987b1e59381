"""Sharded, shuffled, resumable batching over a random-access `Source`.

Sharding: process `p` of `P` owns the examples `p, p + P, p + 2P, ...` of the
source (disjoint, covering, and class-balanced for sorted folders).

Training order: the process-local examples form an infinite stream, epoch
after epoch, each epoch a fresh permutation drawn from (seed, process, epoch).
Step `s` is stream positions `[s * b, (s + 1) * b)` (b = local batch), and its
random crops and augmentations come from (seed, process, step). A batch is
therefore a pure function of (seed, process, step): resuming at step k is
exact and O(1).

Unreadable examples are flagged once (warning + `stats['skipped_corrupt']`)
and never decoded again. In training the slot takes the next readable
example of the stream (so step -> positions stays fixed and resume stays
exact); in evaluation the slot gets `mask = False`.
"""
import concurrent.futures
import logging
import os
import threading
from typing import Any, Iterator

import jax
import numpy as np

from vqgan_jax.data import images
from vqgan_jax.data.prefetch import ThreadPrefetcher

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

_PERMUTATION, _CROP, _AUGMENT = 0, 1, 2  # RNG stream tags.


def _rng(*keys: int) -> np.random.Generator:
  return np.random.default_rng([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])


class Dataset:
  """A dataset split read by this process, with training and eval iterators.

  Args:
    source: the examples (see `sources.Source`).
    resolution: output height and width.
    channels: 1 (grayscale) or 3 (RGB).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    num_workers: decoding threads (default min(8, CPU count)).
  """

  def __init__(self, source: Any, *, resolution: int, channels: int = 3,
               process_index: int | None = None,
               process_count: int | None = None,
               num_workers: int | None = None):
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    if resolution < 1:
      raise ValueError(f'resolution must be positive, got {resolution}.')
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is not in '
                       f'[0, {process_count}).')
    self.source = source
    self.resolution = resolution
    self.channels = channels
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    self.local_indices = np.arange(process_index, source.num_examples,
                                   process_count)
    if not len(self.local_indices):
      raise ValueError(f'{source.name} has {source.num_examples} examples, '
                       f'fewer than the {process_count} processes.')
    self._bad = np.zeros(source.num_examples, bool)
    self._upscaled = np.zeros(source.num_examples, bool)
    self._decoded = 0
    self._logged_upscale = False
    self._lock = threading.Lock()

  @property
  def num_examples(self) -> int:
    """Examples in the split, all processes together."""
    return self.source.num_examples

  @property
  def num_classes(self) -> int | None:
    """Number of classes, or None for unlabelled data."""
    return self.source.num_classes

  @property
  def has_labels(self) -> bool:
    """Whether batches carry a 'label' entry."""
    return self.source.has_labels

  @property
  def stats(self) -> dict[str, int]:
    """Counters for this process: examples flagged unreadable and enlarged
    (each example counted once), images decoded (every read counted)."""
    with self._lock:
      stats = {'num_examples': self.num_examples,
               'num_local_examples': len(self.local_indices),
               'skipped_corrupt': int(self._bad.sum()),
               'upscaled': int(self._upscaled.sum()),
               'decoded': self._decoded}
    ignored = getattr(self.source, 'ignored_files', None)
    if ignored is not None:
      stats['ignored_files'] = ignored
    return stats

  def local_batch_size(self, batch_size: int) -> int:
    """The per-process share of a global batch.

    Args:
      batch_size: the global batch size.

    Returns:
      batch_size // process_count.

    Raises:
      ValueError: batch_size is not a positive multiple of the process count.
    """
    if batch_size < 1 or batch_size % self.process_count:
      raise ValueError(f'global batch_size {batch_size} must be a positive '
                       f'multiple of the process count {self.process_count}.')
    return batch_size // self.process_count

  def train_iterator(self, batch_size: int, seed: int, start_step: int = 0,
                     prefetch: int = 2, augment=()) -> 'TrainIterator':
    """An infinite shuffled iterator of random-crop training batches.

    Args:
      batch_size: the GLOBAL batch size (divided among processes).
      seed: shuffling and cropping seed (same on every process).
      start_step: first step to yield; resuming at k yields exactly the
        batches k, k+1, ... of an uninterrupted run.
      prefetch: host batches prepared ahead in a background thread (0: none).
      augment: names from `images.AUGMENTATIONS` ('flip', 'channels'),
        drawn per example from (seed, process, step); () for none, which
        leaves the batches exactly as without the argument.

    Returns:
      A `TrainIterator` yielding {'image': float32 (b, H, W, C) in [-1, 1],
      'label': int32 (b,) when labelled}, b = the process-local batch.
    """
    augment = images.check_augment(augment, self.channels)
    return TrainIterator(self, self.local_batch_size(batch_size), seed,
                         start_step, prefetch, augment)

  def num_eval_batches(self, batch_size: int,
                       drop_remainder: bool = False) -> int:
    """Batches yielded by `eval_iterator` (the same on every process)."""
    local = self.local_batch_size(batch_size)
    if drop_remainder:
      return (self.num_examples // self.process_count) // local
    longest = -(-self.num_examples // self.process_count)
    return -(-longest // local)

  def eval_iterator(self, batch_size: int, drop_remainder: bool = False,
                    prefetch: int = 2) -> Iterator[Batch]:
    """A finite, ordered iterator of centre-crop batches of this shard.

    Every process yields `num_eval_batches` batches, so collectives line up.
    Slots past the end of the shard are zeros with `mask = False`, as are
    unreadable examples.

    Args:
      batch_size: the GLOBAL batch size.
      drop_remainder: drop the examples that do not fill a whole batch on
        every process, instead of padding.
      prefetch: host batches prepared ahead in a background thread (0: none).

    Returns:
      An iterator of {'image', 'label' (when labelled), 'mask': bool (b,),
      'index': int64 (b,) example ids in the source (-1 for padding)}.
    """
    batches = self._eval_batches(self.local_batch_size(batch_size),
                                 self.num_eval_batches(batch_size,
                                                       drop_remainder))
    return ThreadPrefetcher(batches, prefetch) if prefetch > 0 else batches

  def _eval_batches(self, local: int, num_batches: int) -> Iterator[Batch]:
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      for b in range(num_batches):
        positions = b * local + np.arange(local)
        valid = positions < len(self.local_indices)
        indices = np.full(local, -1)
        indices[valid] = self.local_indices[positions[valid]]
        batch = self._empty_batch(local)
        batch['mask'] = self._read_into(batch, indices, None, pool)
        batch['index'] = indices.astype(np.int64)  # example ids (-1: padding)
        yield batch

  def _train_batches(self, local: int, seed: int, start_step: int,
                     augment: tuple[str, ...] = ()) -> Iterator[Batch]:
    order = _TrainOrder(self.local_indices, seed, self.process_index)
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      step = start_step
      while True:
        positions = step * local + np.arange(local)
        uniforms = _rng(seed, self.process_index, step, _CROP).random(
            (local, 2))
        batch = self._empty_batch(local)
        ok = self._read_into(batch, order.indices(positions), uniforms, pool)
        for slot in np.flatnonzero(~ok):
          self._fill_from_stream(batch, slot, positions[slot], order,
                                 uniforms[slot])
        if augment:
          batch['image'] = images.augment(
              batch['image'], augment,
              _rng(seed, self.process_index, step, _AUGMENT).random(
                  (local, 2)))
        yield batch
        step += 1

  def _fill_from_stream(self, batch: Batch, slot: int, position: int,
                        order: '_TrainOrder', uniform: np.ndarray) -> None:
    """Fills a slot whose example is unreadable with the next readable one."""
    for offset in range(1, len(self.local_indices) + 1):
      index = order.indices(np.array([position + offset]))[0]
      if self._bad[index]:
        continue
      raw = self.source.fetch([index])[0]
      example = self._decode(index, raw, uniform)
      if example is not None:
        self._store(batch, slot, example)
        return
    raise RuntimeError(f'every image of process {self.process_index}\'s '
                       f'shard of {self.source.name} is unreadable '
                       f'({self.stats}).')

  def _empty_batch(self, local: int) -> Batch:
    r, c = self.resolution, self.channels
    batch = {'image': np.zeros((local, r, r, c), np.float32)}
    if self.has_labels:
      batch['label'] = np.zeros((local,), np.int32)
    return batch

  def _read_into(self, batch: Batch, indices: np.ndarray,
                 uniforms: np.ndarray | None,
                 pool: concurrent.futures.Executor) -> np.ndarray:
    """Decodes `indices` (-1: skip) into `batch`; returns which slots worked."""
    wanted = [s for s, i in enumerate(indices) if i >= 0 and not self._bad[i]]
    raws = self.source.fetch([indices[s] for s in wanted]) if wanted else []

    def work(slot: int, raw: Any) -> bool:
      uniform = None if uniforms is None else uniforms[slot]
      example = self._decode(int(indices[slot]), raw, uniform)
      if example is None:
        return False
      self._store(batch, slot, example)
      return True

    ok = np.zeros(len(indices), bool)
    ok[wanted] = list(pool.map(work, wanted, raws))
    return ok

  def _store(self, batch: Batch, slot: int,
             example: tuple[np.ndarray, int | None]) -> None:
    batch['image'][slot] = example[0]
    if 'label' in batch:
      batch['label'][slot] = example[1]

  def _decode(self, index: int, raw: Any, uniform: np.ndarray | None
              ) -> tuple[np.ndarray, int | None] | None:
    """Decodes and preprocesses an example; None (flagged) if unreadable."""
    try:
      if isinstance(raw, Exception):
        raise raw
      image, label = self.source.decode(raw)
      image = images.convert_mode(image, self.channels)
    except Exception as e:  # pylint: disable=broad-except
      self._flag_unreadable(index, e)
      return None
    pixels, upscaled = images.preprocess(image, self.resolution,
                                         self.channels, uniform)
    with self._lock:
      self._decoded += 1
      self._upscaled[index] |= upscaled
      log = upscaled and not self._logged_upscale
      self._logged_upscale |= upscaled
    if log:
      logger.info('%s: enlarging images smaller than %d px (counted in '
                  'stats["upscaled"]), first: %s', self.source.name,
                  self.resolution, self.source.describe(index))
    return pixels, label

  def _flag_unreadable(self, index: int, error: Exception) -> None:
    with self._lock:
      if self._bad[index]:
        return
      self._bad[index] = True
      count = int(self._bad.sum())
    logger.warning('skipping unreadable image %s (%s: %s); %d skipped so far',
                   self.source.describe(index), type(error).__name__, error,
                   count)


class _TrainOrder:
  """Maps training stream positions to example indices (see module doc)."""

  def __init__(self, local_indices: np.ndarray, seed: int,
               process_index: int):
    self._local = local_indices
    self._seed = seed
    self._process = process_index
    self._cache: dict[int, np.ndarray] = {}

  def indices(self, positions: np.ndarray) -> np.ndarray:
    n = len(self._local)
    epochs, within = np.divmod(positions, n)
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._local[self._permutation(int(epoch))[within[sel]]]
    return out

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:
      if len(self._cache) >= 4:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = _rng(self._seed, self._process, epoch,
                                _PERMUTATION).permutation(len(self._local))
    return self._cache[epoch]


class TrainIterator:
  """Infinite training batches; `step` and `epoch` follow what was consumed.

  Save `step` with a checkpoint and pass it back as `start_step` to resume.

  Args:
    dataset: the Dataset.
    local_batch_size: per-process batch size.
    seed: shuffling and cropping seed.
    start_step: the first step yielded.
    prefetch: background host batches (0: none).
    augment: checked names from `images.AUGMENTATIONS`.
  """

  def __init__(self, dataset: Dataset, local_batch_size: int, seed: int,
               start_step: int, prefetch: int, augment: tuple[str, ...] = ()):
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}.')
    self.step = start_step
    self.local_batch_size = local_batch_size
    self._num_local = len(dataset.local_indices)
    batches = dataset._train_batches(  # pylint: disable=protected-access
        local_batch_size, seed, start_step, augment)
    self._batches = (ThreadPrefetcher(batches, prefetch) if prefetch > 0
                     else batches)

  @property
  def epoch(self) -> int:
    """The epoch of the first example of the next batch (from 0)."""
    return (self.step * self.local_batch_size) // self._num_local

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    batch = next(self._batches)
    self.step += 1
    return batch

  def close(self) -> None:
    """Stops background work."""
    self._batches.close()
