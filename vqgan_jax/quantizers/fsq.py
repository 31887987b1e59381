"""Finite scalar quantisation (Mentzer et al. 2023): rounding on a fixed grid."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.quantizers.common import (
    Array, Projections, check_estimator_and_entropy, codebook_logits,
    entropy_penalty, gradient_estimator)
from vqgan_jax.quantizers.registry import QuantizerSpec


def _fsq_consts(levels: Sequence[int]):
  levels = np.asarray(levels, np.int64)
  if levels.ndim != 1 or np.any(levels < 2):
    raise ValueError(f"fsq levels {levels.tolist()}: need a list of ints >= 2")
  basis = np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int64)
  return levels, basis


def fsq_bound(z: Array, levels: Sequence[int], eps: float = 1e-3) -> Array:
  """Squashes each channel into the open interval that rounds to its levels.

  ``tanh(z + shift) * h - offset`` with ``h = (L - 1)(1 + eps)/2``; offset
  1/2 for even ``L`` (so rounding gives ``L`` integers ``-L/2 .. L/2 - 1``),
  0 for odd ``L`` (``-(L-1)/2 .. (L-1)/2``); ``shift`` makes ``z = 0`` map
  to 0.
  """
  lv = np.asarray(levels, np.float64)
  half = (lv - 1) * (1 + eps) / 2
  offset = np.where(lv % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half)
  z = z.astype(jnp.float32)
  return (jnp.tanh(z + jnp.asarray(shift, jnp.float32))
          * jnp.asarray(half, jnp.float32) - jnp.asarray(offset, jnp.float32))


def round_ste(x: Array) -> Array:
  """``round(x)`` forward (exactly), identity gradient."""
  return (x - jax.lax.stop_gradient(x)) + jax.lax.stop_gradient(jnp.round(x))


def fsq_codes_to_indices(codes: Array, levels: Sequence[int]) -> Array:
  """FSQ codes (normalised grid values, ``(..., d)``) -> int32 indices."""
  levels, basis = _fsq_consts(levels)
  half = jnp.asarray(levels // 2, jnp.float32)
  digits = jnp.round(codes.astype(jnp.float32) * half + half)
  return jnp.sum(digits * jnp.asarray(basis, jnp.float32),
                 axis=-1).astype(jnp.int32)


def fsq_indices_to_codes(indices: Array, levels: Sequence[int]) -> Array:
  """int32 indices ``(...)`` -> FSQ codes ``(..., d)`` in ``[-1, 1]``."""
  levels, basis = _fsq_consts(levels)
  idx = indices.astype(jnp.int32)[..., None]
  digits = (idx // jnp.asarray(basis, jnp.int32)) % jnp.asarray(levels,
                                                                 jnp.int32)
  half = jnp.asarray(levels // 2, jnp.float32)
  return (digits.astype(jnp.float32) - half) / half


def fsq_quantize(z: Array, levels: Sequence[int]) -> Tuple[Array, Array]:
  """Finite scalar quantisation (Mentzer et al. 2023).

  Args:
    z: ``(..., d)`` with ``d == len(levels)``.
    levels: quantisation levels per channel; ``prod(levels)`` codes.

  Returns:
    ``(z_q, indices)``: ``z_q`` float32 on the grid ``(k - L//2)/(L//2)``
    with straight-through gradients of the rounding, and int32 indices.
  """
  if z.shape[-1] != len(levels):
    raise ValueError(f"fsq: input has {z.shape[-1]} channels, levels "
                     f"{list(levels)} need {len(levels)}")
  half = jnp.asarray(np.asarray(levels) // 2, jnp.float32)
  z_q = round_ste(fsq_bound(z, levels)) / half
  return z_q, fsq_codes_to_indices(z_q, levels)


class FSQuantizer(nn.Module):
  """Finite scalar quantizer: ``proj_in`` to ``len(levels)`` channels (when
  that differs from ``embed_dim``), :func:`fsq_quantize`, ``proj_out`` back.
  No loss of its own (0), unless an entropy penalty over the implicit grid
  codebook is asked for. Returns ``(z_q, loss, indices)``."""
  levels: Sequence[int]
  embed_dim: int
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  gradient: str = "ste"
  param_dtype: Any = jnp.float32

  def setup(self):
    _fsq_consts(self.levels)
    self.estimator = gradient_estimator(self.gradient)
    self.proj = Projections(len(self.levels), self.embed_dim,
                             param_dtype=self.param_dtype)

  def __call__(self, z, *, train: bool = False):
    del train
    ze = self.proj.into(z)
    z_q, indices = fsq_quantize(ze, self.levels)
    if self.gradient != "ste":
      bounded = fsq_bound(ze, self.levels) / jnp.asarray(
          np.asarray(self.levels) // 2, jnp.float32)
      z_q = self.estimator(bounded, z_q)
    loss = jnp.zeros((), jnp.float32)
    if self.entropy_weight:
      grid = fsq_indices_to_codes(jnp.arange(int(np.prod(self.levels))),
                                  self.levels)
      ent, _ = entropy_penalty(codebook_logits(z_q, grid),
                               self.entropy_temperature)
      loss = self.entropy_weight * ent
    return self.proj.out(z_q), loss, indices

  def lookup(self, indices):
    return self.proj.out(fsq_indices_to_codes(indices, self.levels))




# -- Options, checks and the module of the 'fsq' family

OPTIONS = dict(levels=(8, 5, 5, 5), entropy_weight=0.0,
               entropy_temperature=0.01, quantizer_grad="ste")
"""Options of ``quantizer='fsq'``: the levels per channel
(``prod(levels) == n_embed``), the entropy penalty over the grid codes
(0 = off) and the gradient estimator (``'ste'`` or ``'rotation'``)."""


def check(options: Mapping[str, Any], n_embed: int, path: str) -> None:
  check_estimator_and_entropy(options, path)
  levels = list(options["levels"])
  if not levels or int(np.prod(levels)) != n_embed:
    raise ValueError(
        f"{path}.levels={levels} give {int(np.prod(levels or [0]))} codes but "
        f"config.model.n_embed={n_embed}; set n_embed to the product of the "
        "levels")


def build(n_embed: int, embed_dim: int, options: Mapping[str, Any], dtype,
          param_dtype) -> nn.Module:
  del n_embed, dtype  # the levels give the codes; quantizer math is float32
  return FSQuantizer(
      tuple(options["levels"]), embed_dim,
      entropy_weight=options["entropy_weight"],
      entropy_temperature=options["entropy_temperature"],
      gradient=options["quantizer_grad"], param_dtype=param_dtype)


SPEC = QuantizerSpec("fsq", OPTIONS, check, build,
                     flat_names={"fsq_levels": "levels"})
