"""Helpers of the side-by-side benchmarks: a timer and a host-drawn state."""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


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
