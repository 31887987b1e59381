"""Shared timing helpers for the side-by-side benchmarks."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np


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


def repo_config(name: str, arg: str = ""):
  """`get_config(arg)` of `configs/<name>.py` in this repository."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                      "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def median(xs: List[float]) -> float:
  return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


_PARAM_TREES = ("params", "disc_params", "ema_params")


def host_drawn_state(shapes, seed: int = 0, std: float = 0.02):
  """A train state of `shapes` (from `jax.eval_shape`) drawn on the host.

  Floating leaves of the parameter trees ('params', 'disc_params',
  'ema_params'; not the optimizer's moments) are normal with standard
  deviation `std`, except normalisation scales ('scale'), which are one, and
  biases, which are zero; every other leaf is zero. For timing only: the
  values do not change a step's work, and XLA's initialiser compiles one
  threefry computation per parameter, which took most of a minute for the
  336M GPT and ~75 s for the 256x256 VQGAN + discriminator on the H200.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if (names and names[0] in _PARAM_TREES
        and jnp.issubdtype(s.dtype, jnp.floating)):
      if names[-1] == "scale":
        return np.ones(s.shape, s.dtype)
      if names[-1] != "bias":
        return (std * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
