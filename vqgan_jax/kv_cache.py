"""Key/value cache of the GPT for incremental decoding.

`init_cache(model, batch, length)` creates zeros of layout
(B, n_head, length, head_dim) per layer. Calling the GPT with `cache=` and
`position=` writes the new keys/values at `[position, position + T)` and
attends over the whole buffer, masking positions that are not filled yet.
Callers choose the buffer length, so a sampler can grow it in segments
(`resize_cache`) and never read far past the filled part.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# {'blocks_{i}': {'k', 'v'}} or, with scanned layers, {'blocks': {'k', 'v'}}.
Cache = dict


def init_cache(model: Any, batch_size: int, length: int,
               dtype: Any = None) -> Cache:
  """Zero key/value cache for `model`.

  Args:
    model: the `vqgan_jax.gpt.GPT` (its n_layer, n_head, n_embd, dtype and
      scan_layers are read).
    batch_size: batch size B.
    length: number of positions S the buffer holds (<= block_size).
    dtype: cache dtype; defaults to the model's compute dtype.

  Returns:
    {'blocks_{i}': {'k', 'v'}} of (B, n_head, S, head_dim) or, with
    `scan_layers`, {'blocks': {'k', 'v'}} of (n_layer, B, n_head, S, head_dim).
  """
  dtype = model.dtype if dtype is None else dtype
  shape = (batch_size, model.n_head, length, model.n_embd // model.n_head)
  if model.scan_layers:
    shape = (model.n_layer,) + shape
    return {"blocks": {"k": jnp.zeros(shape, dtype),
                       "v": jnp.zeros(shape, dtype)}}
  return {f"blocks_{i}": {"k": jnp.zeros(shape, dtype),
                          "v": jnp.zeros(shape, dtype)}
          for i in range(model.n_layer)}


def cache_length(cache: Cache) -> int:
  """Number of positions a cache buffer holds."""
  return jax.tree_util.tree_leaves(cache)[0].shape[-2]


def resize_cache(cache: Cache, length: int) -> Cache:
  """Grows (zero-pads) or truncates a cache buffer to `length` positions.

  Args:
    cache: a cache from `init_cache`.
    length: the new number of positions.

  Returns:
    The cache with its sequence axis (-2) of size `length`.
  """
  def fix(a):
    s = a.shape[-2]
    if length >= s:
      pad = [(0, 0)] * a.ndim
      pad[-2] = (0, length - s)
      return jnp.pad(a, pad)
    return jax.lax.slice_in_dim(a, 0, length, axis=a.ndim - 2)
  return jax.tree_util.tree_map(fix, cache)
