"""Sliding-window sampling of token grids larger than the training window.

Each position of an H x W grid is sampled from the GPT's logits over a
window of the size it was trained on, placed by the reference's rule
(`window_position`); the whole grid is one jitted `fori_loop`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import gpt as gpt_lib
from vqgan_jax import sampling

Array = jax.Array


def window_position(i: Array | int, size: int, window: int
                    ) -> tuple[Array | int, Array | int]:
  """Where the window sits for target row (or column) i: the reference rule.

  The target's local index inside the window is i while i <= window/2,
  window - (size - i) once size - i < window/2, and window/2 in between.

  Args:
    i: target index along the axis (int or traced int).
    size: grid size along the axis (>= window).
    window: window size along the axis.

  Returns:
    (start, local): the window covers [start, start + window) and the
    target sits at start + local.
  """
  half = window // 2
  if isinstance(i, (int, np.integer)):
    if i <= half:
      local = i
    elif size - i < half:
      local = window - (size - i)
    else:
      local = half
    return i - local, local
  local = jnp.where(i <= half, i,
                    jnp.where(size - i < half, window - (size - i), half))
  return i - local, local


@functools.partial(jax.jit, static_argnames=(
    "model", "grid_hw", "window_hw", "greedy", "use_top_k", "use_top_p"))
def _sliding_jit(model, variables, cond, rng, temperature, top_k, top_p, *,
                 grid_hw, window_hw, greedy, use_top_k, use_top_p):
  """Jitted body of `sample_sliding_window` (see there)."""
  model, variables = sampling.decoding_model(model, variables)
  (height, width), (win_h, win_w) = grid_hw, window_hw
  batch = cond.shape[0]
  spatial = cond.ndim == 3
  cond_len = win_h * win_w if spatial else cond.shape[1]
  keys = jax.random.split(rng, height * width)
  choose = functools.partial(sampling.sample_logits,
                             temperature=temperature, greedy=greedy,
                             top_k=top_k if use_top_k else None,
                             top_p=top_p if use_top_p else None)

  def body(n, grid):
    i, j = n // width, n % width
    top, local_i = window_position(i, height, win_h)
    left, local_j = window_position(j, width, win_w)
    window = jax.lax.dynamic_slice(grid, (0, top, left),
                                   (batch, win_h, win_w))
    if spatial:
      c = jax.lax.dynamic_slice(cond, (0, top, left), (batch, win_h, win_w))
      c = c.reshape(batch, -1)
    else:
      c = cond
    seq = jnp.concatenate([c, window.reshape(batch, -1)], axis=1)[:, :-1]
    logits = model.apply(variables, seq)
    index = cond_len - 1 + local_i * win_w + local_j
    step_logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1,
                                               keepdims=False)
    token = choose(step_logits, keys[n])
    return grid.at[:, i, j].set(token)

  grid = jnp.zeros((batch, height, width), jnp.int32)
  return jax.lax.fori_loop(0, height * width, body, grid)


def sample_sliding_window(model: gpt_lib.GPT, variables: Any,
                          cond_prefix: Array, grid_hw: tuple[int, int],
                          window_hw: tuple[int, int], rng: Array, *,
                          temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None,
                          greedy: bool = False) -> Array:
  """Samples an H x W token grid larger than the model's window.

  Positions are sampled in raster order. For target (i, j) the window is
  placed by `window_position` on each axis; the model sees the conditioning
  (a fixed prefix, or the window's crop of a spatial conditioning grid)
  followed by the window's image tokens, and the logits at the target's
  local position are filtered and sampled. Everything runs in one jitted
  `fori_loop` (window offsets are traced).

  Args:
    model: the GPT; block_size >= Tc + window_h * window_w - 1.
    variables: {'params': ...}.
    cond_prefix: int32 (B, Tc) fixed prefix (SOS / class), or (B, H, W)
      spatial conditioning codes aligned with the grid.
    grid_hw: (H, W) of the output grid; each >= the window.
    window_hw: (h, w) token window the model was trained on.
    rng: PRNG key.
    temperature: see `sampling.sample`.
    top_k: see `sampling.sample`.
    top_p: see `sampling.sample`.
    greedy: argmax instead of sampling.

  Returns:
    int32 (B, H, W).
  """
  cond = jnp.asarray(cond_prefix, jnp.int32)
  grid_hw, window_hw = tuple(map(int, grid_hw)), tuple(map(int, window_hw))
  if grid_hw[0] < window_hw[0] or grid_hw[1] < window_hw[1]:
    raise ValueError(f"grid {grid_hw} is smaller than the window {window_hw}")
  if cond.ndim == 3 and cond.shape[1:] != grid_hw:
    raise ValueError(f"spatial conditioning {cond.shape[1:]} does not match "
                     f"the grid {grid_hw}")
  cond_len = window_hw[0] * window_hw[1] if cond.ndim == 3 else cond.shape[1]
  if cond_len + window_hw[0] * window_hw[1] - 1 > model.block_size:
    raise ValueError("conditioning + window exceed block_size")
  rng = rng if rng is not None else jax.random.key(0)
  return _sliding_jit(
      model, variables, cond, rng,
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(0 if top_k is None else top_k, jnp.int32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      grid_hw=grid_hw, window_hw=window_hw, greedy=bool(greedy),
      use_top_k=top_k is not None, use_top_p=top_p is not None)
