"""Stage-2 conditioning: how a training example becomes a token sequence.

The sequence is ``[conditioning tokens | image tokens]``; conditioning and
image codes share one embedding table (only position tells them apart), as
in the reference's Net2NetTransformer:

* ``sos``: one start token (``sos_token``, 0 by default): unconditional;
* ``class``: the class id as one token;
* ``codes``: the code grid of a second VQGAN (depth, segmentation, any image);
* ``coord``: a coordinate map, area-downsampled and quantised to ``n_embed``
  levels (the reference's CoordStage), for sliding-window training.

For ``codes``, the conditioning images may first pass through a transform
(:data:`COND_TRANSFORMS`, :func:`cond_images`), e.g. grayscale for
colourisation; training and sampling apply the same one.

Image tokens may be reordered by a permuter (``identity``, ``reverse``,
``zcurve``, ``spiral``); its inverse restores raster order before decoding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("sos", "class", "codes", "coord")
PERMUTERS = ("identity", "reverse", "zcurve", "spiral")
COND_TRANSFORMS = ("identity", "grayscale", "downsample")


# ----------------------------------------------------------------------------
# Permuters: index arrays, forward and inverse


def _morton(i: int, j: int) -> int:
  out = 0
  for b in range(16):
    out |= ((j >> b) & 1) << (2 * b) | ((i >> b) & 1) << (2 * b + 1)
  return out


def _spiral(h: int, w: int) -> np.ndarray:
  """Raster indices visited spiralling outwards from the centre."""
  ci, cj = (h - 1) / 2.0, (w - 1) / 2.0
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ring = np.maximum(np.abs(ii - ci), np.abs(jj - cj))
  angle = np.arctan2(ii - ci, jj - cj)
  order = np.lexsort((angle.ravel(), ring.ravel()))
  return order


def permutation(name: str, h: int, w: int) -> np.ndarray:
  """``perm`` such that ``tokens[:, perm]`` is the training order.

  Args:
    name: one of :data:`PERMUTERS`.
    h, w: the code grid.

  Returns:
    int32 array of length ``h*w``, a permutation of ``range(h*w)``.
  """
  n = h * w
  if name == "identity":
    perm = np.arange(n)
  elif name == "reverse":
    perm = np.arange(n)[::-1]
  elif name == "zcurve":
    keys = [_morton(i, j) for i in range(h) for j in range(w)]
    perm = np.argsort(keys, kind="stable")
  elif name == "spiral":
    perm = _spiral(h, w)
  else:
    raise ValueError(f"unknown permuter {name!r}; valid: {PERMUTERS}")
  return perm.astype(np.int32)


def permute(tokens, perm: np.ndarray, inverse: bool = False):
  """Reorders ``tokens`` (B, h*w) into training order, or back with ``inverse``."""
  idx = np.argsort(perm) if inverse else perm
  return tokens[:, idx]


# ----------------------------------------------------------------------------
# Conditioning images


def cond_images(x: np.ndarray, transform: str) -> np.ndarray:
  """Applies a conditioning transform to (B, H, W, C) images in [-1, 1].

  ``identity`` keeps them; ``grayscale`` replaces every channel by their
  mean; ``downsample`` averages 4x4 blocks and repeats each block's mean
  over it (same shape, a quarter of the resolution).
  """
  if transform == "identity":
    return x
  if transform == "grayscale":
    g = x.mean(axis=-1, keepdims=True)
    return np.repeat(g, x.shape[-1], axis=-1)
  if transform == "downsample":
    b, h, w, c = x.shape
    low = x.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
    return np.repeat(np.repeat(low, 4, 1), 4, 2)
  raise ValueError(f"config.conditioning.cond_transform={transform!r}; "
                   f"valid: {', '.join(map(repr, COND_TRANSFORMS))}")


# ----------------------------------------------------------------------------
# Token construction


def coord_tokens(coords: jax.Array, n_embed: int, down_factor: int) -> jax.Array:
  """CoordStage: (B, H, W) coordinates in [0, 1] -> (B, H/f * W/f) tokens.

  Area-downsamples by ``down_factor``, scales by ``n_embed`` and rounds
  (round half to even, as torch).
  """
  b, h, w = coords.shape
  f = down_factor
  c = coords.reshape(b, h // f, f, w // f, f).mean(axis=(2, 4))
  c = jnp.clip(c, 0.0, 1.0) * n_embed
  return jnp.round(c).astype(jnp.int32).reshape(b, -1)


def condition_tokens(kind: str, batch_size: int, *, labels=None, codes=None,
                     sos_token: int = 0) -> jax.Array:
  """The conditioning prefix (B, Tc) int32 for one of :data:`KINDS`."""
  if kind == "sos":
    return jnp.full((batch_size, 1), sos_token, jnp.int32)
  if kind == "class":
    if labels is None:
      raise ValueError("class conditioning needs labels")
    return jnp.asarray(labels, jnp.int32).reshape(batch_size, 1)
  if kind in ("codes", "coord"):
    if codes is None:
      raise ValueError(f"{kind} conditioning needs its code grid")
    return jnp.asarray(codes, jnp.int32).reshape(batch_size, -1)
  raise ValueError(f"unknown conditioning {kind!r}; valid: {KINDS}")


def corrupt(tokens: jax.Array, rng: jax.Array, pkeep: float,
            vocab_size: int) -> jax.Array:
  """Keeps each token with probability ``pkeep``, else a uniform random code.

  The reference's ``pkeep`` input noise; targets stay clean.
  """
  if pkeep >= 1.0:
    return tokens
  k1, k2 = jax.random.split(rng)
  keep = jax.random.bernoulli(k1, pkeep, tokens.shape)
  rand = jax.random.randint(k2, tokens.shape, 0, vocab_size, tokens.dtype)
  return jnp.where(keep, tokens, rand)


def drop_labels(cond: jax.Array, rng: jax.Array, rate: float,
                null_token: int) -> jax.Array:
  """Classifier-free guidance training: replaces the class token by
  ``null_token`` with probability ``rate`` (per example)."""
  if rate <= 0.0:
    return cond
  drop = jax.random.bernoulli(rng, rate, (cond.shape[0], 1))
  return jnp.where(drop, null_token, cond)


def sequence(cond: jax.Array, image_tokens: jax.Array, *, rng=None,
             pkeep: float = 1.0, vocab_size: Optional[int] = None
             ) -> Tuple[jax.Array, jax.Array, int]:
  """Model input, targets, and the first logit position to score.

  Returns:
    ``(inputs, targets, start)``: ``inputs = [c | a][:, :-1]`` where ``a`` is
    the (possibly corrupted) image tokens; ``targets`` the clean image
    tokens; logits ``[:, start:]`` (``start = len(c) - 1``) predict them.
  """
  a = image_tokens
  if rng is not None and pkeep < 1.0:
    a = corrupt(image_tokens, rng, pkeep, vocab_size)
  seq = jnp.concatenate([cond, a], axis=1)
  return seq[:, :-1], image_tokens, cond.shape[1] - 1
