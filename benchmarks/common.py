"""Shared timing helpers for the side-by-side benchmarks."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import jax


def machine() -> str:
  dev = jax.devices()[0]
  return (f"{platform.processor() or platform.machine()}, "
          f"{len(jax.devices())} x {dev.platform}:{dev.device_kind}, "
          f"jax {jax.__version__}")


def alternate(fns: Dict[str, Callable[[], object]], repeats: int,
              warmup: int = 1) -> Dict[str, List[float]]:
  """Times each function ``repeats`` times, alternating between them.

  Each function must block until its result is ready. Returns the list of
  wall-clock seconds per function (warm-up calls excluded).
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  return times


def median(xs: List[float]) -> float:
  return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t
