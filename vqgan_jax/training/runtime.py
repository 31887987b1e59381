"""Process-level concerns: multi-host start-up, SIGTERM, NaN guards, seeds."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import signal
import threading
from typing import Any, Callable, Optional


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
  """Keeps compiled programs in `path` across runs (JAX's persistent cache).

  A restarted or resumed run then loads its initialiser, step and sampler
  instead of compiling them again (the digits VQGAN run for 2 steps on a
  2-core CPU: 23.2 s cold, 8.6 s from the cache). None or '' leaves JAX's
  setting alone (JAX itself reads ``JAX_COMPILATION_CACHE_DIR``). Must run
  before the first compilation.

  Returns:
    The absolute cache directory, or None.

  Raises:
    ValueError: `path` exists and is not a directory, or cannot be created.
  """
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--compilation_cache_dir={path} is a file; pass a "
                     "directory (it is created if missing)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compilation_cache_dir={path}: cannot create it "
                     f"({e.strerror}); pass a writable directory") from e
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC_MODES = ("default", "keep")


def keep_freed_host_memory(mode: str = "keep") -> bool:
  """Lets glibc's malloc reuse freed host memory instead of unmapping it.

  XLA:CPU allocates each call's temporaries afresh; glibc serves a block
  that large with a new mapping and unmaps it on free, so the kernel
  faults in and zeroes every page again on every call. The 256x256 VQGAN's
  training step (3.5 GiB of temporaries) took ~790,000 page faults and
  3-8 s of system time per step on this project's 2-core CPU: 11.7-13.5 s
  per step, and 8.9-11.5 s with no faults once this was applied; the main
  job's stage-2 step (374 MB), 0.34 -> 0.25-0.31 s. It sets `mallopt` so
  that all threads share one arena (M_ARENA_MAX=1), nothing is served by
  its own mapping (M_MMAP_MAX=0) and the heap is never trimmed
  (M_TRIM_THRESHOLD=-1): freed memory stays with the process. All three
  are needed: XLA's worker threads otherwise allocate from their own
  arenas, whose heaps glibc maps and unmaps by itself (without the one
  arena, the other two changed nothing measurable).

  The cost is resident memory: it never falls back from its peak, and the
  one heap fragments. A loop of calls with ~260 MB of temporaries grew the
  process by 130-1,100 MB over its first 15 calls, in jumps, before the
  faults stopped; a 600-step digits stage-2 run peaked at 2.39 GiB instead
  of 1.25 GiB. So it is opt-in (``--host_malloc=keep`` on the training
  and sampling scripts, ``--malloc=keep`` on the benchmarks), for CPU runs;
  on accelerators XLA's temporaries are device memory and it buys nothing.

  Must run before JAX starts a backend (its threads pick their arena on
  their first allocation).

  Args:
    mode: 'keep' applies it; 'default' leaves malloc alone.

  Returns:
    Whether it was applied (never where the C library is not glibc).

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in HOST_MALLOC_MODES:
    raise ValueError(f"--host_malloc={mode!r}: valid: "
                     f"{', '.join(HOST_MALLOC_MODES)}")
  if mode == "default":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def gpu_kernel_threefry(init_fn: Callable[..., Any],
                        backend: Optional[str] = None) -> Callable[..., Any]:
  """`init_fn` compiled with threefry as one GPU kernel per draw on GPUs.

  XLA otherwise inlines the threefry hash into every parameter's
  initialiser: the 256x256 VQGAN's jitted initialiser compiled for ~75 s on
  an H200, the 336M GPT's for most of a minute. With
  ``jax_threefry_gpu_kernel_lowering`` each draw is one custom kernel; the
  random bits are the same, so is the state. Elsewhere (and if XLA refuses
  the kernel) `init_fn` runs as it is. The flag is set only around this
  call: the training steps' dropout keeps XLA's fused threefry.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def call(*args, **kwargs):
    if (backend or jax.default_backend()) != "gpu":
      return init_fn(*args, **kwargs)
    before = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
      return init_fn(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
      if "threefry" not in str(e):  # not about the kernel: a real failure
        raise
      logging.warning("threefry GPU kernel refused (%s); compiling the "
                      "initialiser without it", str(e).splitlines()[0])
    finally:
      jax.config.update("jax_threefry_gpu_kernel_lowering", before)
    return init_fn(*args, **kwargs)  # the flag restored

  return call


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 auto: bool = False) -> None:
  """Calls ``jax.distributed.initialize`` when launched on several hosts.

  Explicit arguments (or the ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables) select a
  cluster by hand; ``auto=True`` lets JAX detect TPU pods, SLURM or
  Open MPI. Single-host runs call nothing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and "
                       "process_id (flags or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


class PreemptionHandler:
  """Turns SIGTERM (and SIGINT) into a flag the training loop polls.

  The loop saves a checkpoint and exits cleanly when ``should_stop`` is
  set; a second signal falls through to the default handler.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._event.is_set():
      prev = self._previous.get(signum)
      signal.signal(signum, prev if callable(prev) else signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self._event.set()

  @property
  def should_stop(self) -> bool:
    return self._event.is_set()

  def restore(self):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any (for coordinated stops)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return flag
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([int(flag)]))
  return bool(np.asarray(flags).any())
