"""Host prefetching in a background thread and global batches on devices."""
import collections
import queue
import threading
from typing import Any, Iterable, Iterator

import jax

_END = object()


class _Failure:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


def _produce(iterator: Iterator[Any], buffer: queue.Queue,
             stop: threading.Event) -> None:
  """Producer thread body: fills `buffer` until `stop` or exhaustion."""

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in iterator:
      if not put(item):
        return
    put(_END)
  except BaseException as e:  # pylint: disable=broad-except
    put(_Failure(e))
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


class ThreadPrefetcher:
  """Runs an iterator in a daemon thread, `buffer_size` items ahead.

  Exceptions raised by the iterator are re-raised by `__next__`. Call
  `close()` (or use it as a context manager) to stop the thread early; it
  also stops when this object is garbage collected.

  Args:
    iterable: what to prefetch.
    buffer_size: at most this many items wait in the queue (>= 1).
  """

  def __init__(self, iterable: Iterable[Any], buffer_size: int = 2):
    self._buffer = queue.Queue(maxsize=max(1, buffer_size))
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(iter(iterable), self._buffer, self._stop),
        daemon=True, name='vqgan_jax-data-prefetch')
    self._thread.start()

  def __iter__(self) -> 'ThreadPrefetcher':
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._buffer.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self, timeout: float = 10.0) -> None:
    """Stops the producer thread (pending items are dropped) and waits up
    to `timeout` seconds for it to finish, so that no thread is still
    decoding images while the interpreter shuts down."""
    self._done = True
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __enter__(self) -> 'ThreadPrefetcher':
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


def make_global_batch(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Assembles per-process host batches into global `jax.Array`s.

  Every process passes its own local batch (the same shapes on each); the
  result's leading axis is the global batch (local batch x process count),
  laid out by `sharding`.

  Args:
    local_batch: a pytree of numpy arrays, leading axis = local batch.
    sharding: the sharding of the global batch, e.g.
      `NamedSharding(mesh, PartitionSpec('data'))`; it applies to every leaf
      (a spec shorter than a leaf's rank leaves trailing axes replicated).

  Returns:
    The same pytree of global `jax.Array`s.
  """
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       sharding: jax.sharding.Sharding) -> Iterator[Any]:
  """Keeps `size` global batches in flight on the devices.

  Device transfers are asynchronous, so while the training step runs on
  batch t, batches t+1..t+size-1 are already being copied.

  Args:
    iterator: yields pytrees of process-local numpy batches.
    size: number of batches queued on device (>= 1).
    sharding: the global batch sharding (see `make_global_batch`).

  Yields:
    Pytrees of global `jax.Array`s, in order.
  """
  queued = collections.deque()
  iterator = iter(iterator)

  def enqueue(n: int) -> None:
    for item in iterator:
      queued.append(make_global_batch(item, sharding))
      if len(queued) >= n:
        return

  enqueue(max(1, size))
  while queued:
    yield queued.popleft()
    enqueue(max(1, size))
