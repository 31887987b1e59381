"""Causal self-attention of the stage-2 GPT, with rotary position options.

`CausalSelfAttention` is the reference minGPT's attention (separate
query/key/value/proj projections, the `n_unmasked` leading block that
attends bidirectionally). Without a cache and without attention dropout it
runs through `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU in
half precision); with a key/value cache (`vqgan_jax.kv_cache`) or attention
dropout it computes the softmax explicitly, in float32.

Rotary position embeddings (`rope_angles`, `apply_rope`) rotate the queries
and keys by their absolute sequence position; the 2D form rotates by the
row and column of an image token in its code grid (`grid_positions`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vqgan_jax.gpt_layers import INIT
from vqgan_jax.kv_cache import Cache

Array = jax.Array


# ----------------------------------------------------------------------------
# Masks and attention kernels.
# ----------------------------------------------------------------------------


def attention_mask(query_pos: Array, key_pos: Array, n_unmasked: int,
                   num_filled: Array | int | None = None) -> Array:
  """Boolean attention mask of the reference minGPT.

  A query attends to keys at or before its own position; additionally the
  first `n_unmasked` positions all see each other.

  Args:
    query_pos: int (T,) positions of the queries.
    key_pos: int (S,) positions of the keys.
    n_unmasked: size of the leading bidirectional block.
    num_filled: if given, keys at positions >= num_filled are masked (cache
      slots that hold no key yet).

  Returns:
    bool (T, S), True where attention is allowed.
  """
  q = query_pos[:, None]
  k = key_pos[None, :]
  mask = k <= q
  if n_unmasked > 0:
    mask = mask | ((k < n_unmasked) & (q < n_unmasked))
  if num_filled is not None:
    mask = mask & (k < num_filled)
  return mask


def _explicit_attention(q: Array, k: Array, v: Array, mask: Array,
                        dropout: nn.Module | None = None,
                        deterministic: bool = True) -> Array:
  """Softmax attention with (B, H, T, D) queries and (B, H, S, D) keys/values.

  Scores and softmax are float32 whatever the input dtype.

  Args:
    q: (B, H, T, D) queries.
    k: (B, H, S, D) keys.
    v: (B, H, S, D) values.
    mask: bool, broadcastable to (B, H, T, S).
    dropout: optional dropout module applied to the attention weights.
    deterministic: disables dropout.

  Returns:
    (B, H, T, D) attention output in v's dtype.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bhtd,bhsd->bhts", q, k,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  return jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v)


def _half_precision(dtype: Any) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _library_attention(q: Array, k: Array, v: Array, n_unmasked: int,
                       implementation: str | None, dtype: Any) -> Array:
  """Full-sequence causal attention through `jax.nn.dot_product_attention`.

  Args:
    q: (B, T, H, D) queries; k, v likewise.
    k: (B, T, H, D) keys.
    v: (B, T, H, D) values.
    n_unmasked: size of the leading bidirectional block (custom mask if > 0).
    implementation: passed to `jax.nn.dot_product_attention`; None picks
      'cudnn' on GPU for half precision (falling back to XLA when cuDNN
      refuses the shapes) and XLA elsewhere.
    dtype: compute dtype.

  Returns:
    (B, T, H, D) attention output.
  """
  t = q.shape[1]
  if n_unmasked > 0:
    pos = jnp.arange(t)
    kwargs = dict(mask=attention_mask(pos, pos, n_unmasked)[None, None])
  else:
    kwargs = dict(is_causal=True)
  if implementation is not None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                        **kwargs)
  if jax.default_backend() == "gpu" and _half_precision(dtype):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                          **kwargs)
    except Exception:  # pylint: disable=broad-except
      pass  # unsupported shape / mask / cuDNN version: use XLA below
  return jax.nn.dot_product_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------
# Rotary position embeddings (an option; the reference uses `pos_emb`).
# ----------------------------------------------------------------------------


def rope_frequencies(dim: int, base: float = 10000.0) -> Array:
  """Angular frequencies ``base ** (-2i / dim)``, i < dim // 2 (float32)."""
  return 1.0 / (base**(jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim))


def grid_positions(positions: Array, grid_width: int,
                   prefix_len: int) -> tuple[Array, Array]:
  """(row, column) of each sequence position for 2D rotary embeddings.

  The sequence is ``[prefix (prefix_len tokens) | image tokens in raster
  order]``. Image token n sits at (n // grid_width + 1, n % grid_width);
  prefix token j sits on row 0 at column j, a row above the image, so every
  prefix/image pair has its own offset and image pairs depend only on their
  (d_row, d_col).

  Args:
    positions: int (T,) absolute sequence positions.
    grid_width: tokens per image row.
    prefix_len: number of conditioning tokens before the image.

  Returns:
    (rows, cols), int32 (T,) each.
  """
  s = jnp.asarray(positions, jnp.int32)
  n = s - prefix_len
  image = n >= 0
  rows = jnp.where(image, n // grid_width + 1, 0)
  cols = jnp.where(image, n % grid_width, s)
  return rows, cols


def rope_angles(positions: Array, head_dim: int, base: float = 10000.0, *,
                grid_width: int | None = None, prefix_len: int = 0) -> Array:
  """Rotation angles (T, head_dim // 2) for 1D or 2D rotary embeddings.

  1D: angle[t, i] = positions[t] * freq_i over head_dim. 2D (with
  `grid_width`): the first half of the angles rotate by the token's row,
  the second half by its column (`grid_positions`), each with the
  frequencies of a head_dim / 2 rotary embedding.

  Args:
    positions: int (T,) absolute sequence positions.
    head_dim: per-head width D (even; divisible by 4 for 2D).
    base: frequency base.
    grid_width: image grid width for 2D; None for 1D.
    prefix_len: conditioning tokens before the image (2D only).

  Returns:
    float32 (T, head_dim // 2).
  """
  pos = jnp.asarray(positions, jnp.int32)
  if grid_width is None:
    return pos[:, None].astype(jnp.float32) * rope_frequencies(head_dim, base)
  rows, cols = grid_positions(pos, grid_width, prefix_len)
  freqs = rope_frequencies(head_dim // 2, base)
  return jnp.concatenate([rows[:, None].astype(jnp.float32) * freqs,
                          cols[:, None].astype(jnp.float32) * freqs], axis=-1)


def apply_rope(x: Array, angles: Array) -> Array:
  """Rotates feature pairs (i, i + D/2) of `x` by `angles[t, i]`.

  Args:
    x: (B, T, H, D) queries or keys.
    angles: (T, D // 2) angles (`rope_angles`).

  Returns:
    (B, T, H, D) in x's dtype (rotation computed in float32).
  """
  half = x.shape[-1] // 2
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------
# The attention layer.
# ----------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
  """Multi-head masked self-attention with separate q/k/v/proj projections.

  With `position_embedding` 'rope' / 'rope2d' the queries and keys are
  rotated by their absolute sequence position (`position + t`, also when
  decoding with a cache) before attention.
  """
  n_head: int
  n_embd: int
  n_unmasked: int = 0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  deterministic: bool = True
  position_embedding: str = "learned"
  rope_base: float = 10000.0
  rope_grid: tuple = ()
  rope_prefix: int = 1

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None = None,
               position: Array | None = None) -> tuple[Array, Cache | None]:
    """Attends over `x` (and the cache, when given).

    Args:
      x: (B, T, C) inputs.
      cache: None, or {'k', 'v'} of (B, H, S, D); the new keys/values are
        written at [position, position + T).
      position: int scalar, absolute position of x[:, 0] (cache mode only).

    Returns:
      (B, T, C) output and the updated cache (None without a cache).
    """
    b, t, c = x.shape
    h = self.n_head
    d = c // h
    dense = functools.partial(nn.Dense, c, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=INIT,
                              bias_init=nn.initializers.zeros)
    q = dense(name="query")(x).reshape(b, t, h, d)
    k = dense(name="key")(x).reshape(b, t, h, d)
    v = dense(name="value")(x).reshape(b, t, h, d)
    if self.position_embedding in ("rope", "rope2d"):
      start_pos = jnp.zeros((), jnp.int32) if position is None else position
      grid_w = (self.rope_grid[1] if self.position_embedding == "rope2d"
                else None)
      angles = rope_angles(start_pos + jnp.arange(t), d, self.rope_base,
                           grid_width=grid_w, prefix_len=self.rope_prefix)
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    drop = None
    if self.attn_pdrop > 0 and not self.deterministic:
      drop = nn.Dropout(self.attn_pdrop)

    if cache is not None:
      to_bhtd = lambda a: a.transpose(0, 2, 1, 3)
      q, k, v = to_bhtd(q), to_bhtd(k), to_bhtd(v)
      zero = jnp.zeros((), jnp.int32)
      start = (zero, zero, position.astype(jnp.int32), zero)
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(
          cache["k"].dtype), start)
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(
          cache["v"].dtype), start)
      s = k_all.shape[2]
      mask = attention_mask(position + jnp.arange(t), jnp.arange(s),
                            self.n_unmasked, num_filled=position + t)
      y = _explicit_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                              mask, drop, self.deterministic)
      y = y.transpose(0, 2, 1, 3)
      cache = {"k": k_all, "v": v_all}
    elif drop is not None:
      pos = jnp.arange(t)
      mask = attention_mask(pos, pos, self.n_unmasked)
      to_bhtd = lambda a: a.transpose(0, 2, 1, 3)
      y = _explicit_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), mask, drop,
                              self.deterministic).transpose(0, 2, 1, 3)
    else:
      y = _library_attention(q, k, v, self.n_unmasked, self.attention_impl,
                             self.dtype)
    # A name for the 'attention' remat policy; the identity otherwise.
    y = checkpoint_name(y.reshape(b, t, c), "attention_out")
    y = dense(name="proj")(y)
    y = nn.Dropout(self.resid_pdrop)(y, deterministic=self.deterministic)
    return y, cache
