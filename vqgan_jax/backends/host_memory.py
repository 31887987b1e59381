"""glibc malloc settings that keep freed host memory for reuse.

Standard library only: importing this module does not import JAX, so a
program can apply the setting before JAX starts a backend (as it must).
"""
from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC_MODES = ("default", "keep")


def keep_freed_host_memory(mode: str = "keep") -> bool:
  """Lets glibc's malloc reuse freed host memory instead of unmapping it.

  XLA:CPU allocates each call's temporaries afresh; glibc serves a block
  that large with a new mapping and unmaps it on free, so the kernel
  faults in and zeroes every page again on every call, which shows up as
  system time in every training step. This sets `mallopt` so that all
  threads share one arena (M_ARENA_MAX=1), nothing is served by its own
  mapping (M_MMAP_MAX=0) and the heap is never trimmed
  (M_TRIM_THRESHOLD=-1): freed memory stays with the process. All three
  are needed: XLA's worker threads otherwise allocate from their own
  arenas, whose heaps glibc maps and unmaps by itself.

  The cost is resident memory: it never falls back from its peak, and the
  one heap fragments, so the process can grow well past its working set
  over its first calls. So it is opt-in (``--host_malloc=keep`` on the
  training and sampling scripts, ``--malloc=keep`` on the benchmarks), for
  CPU runs; on accelerators XLA's temporaries are device memory and it buys
  nothing. BENCHMARKS.md has the measured effect.

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
