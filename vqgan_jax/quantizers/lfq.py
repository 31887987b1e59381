"""Lookup-free quantisation (MAGVIT-v2): the sign of each channel."""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.quantizers.common import (
    _HIGHEST, Array, Projections, check_estimator_and_entropy, entropy_penalty,
    gradient_estimator)
from vqgan_jax.quantizers.registry import QuantizerSpec


def lfq_indices_to_codes(indices: Array, bits: int) -> Array:
  """int32 indices -> sign codes ``(..., bits)``: bit ``i`` set -> +1 at ``i``."""
  b = (indices.astype(jnp.int32)[..., None] >> jnp.arange(bits)) & 1
  return 2.0 * b.astype(jnp.float32) - 1.0


def lfq_codebook(bits: int) -> Array:
  """All ``2**bits`` sign codes, row ``k`` the code of index ``k``."""
  return lfq_indices_to_codes(jnp.arange(2**bits), bits)


def lfq_quantize(z: Array) -> Tuple[Array, Array]:
  """Lookup-free quantisation (MAGVIT-v2): the sign of each channel.

  Args:
    z: ``(..., bits)``.

  Returns:
    ``(codes, indices)``: ``codes`` in ``{-1, +1}`` (``z >= 0`` -> +1), no
    gradient attached, and ``indices = sum_i [z_i > 0] 2^i`` (int32).
  """
  z = z.astype(jnp.float32)
  bits = (z >= 0).astype(jnp.int32)
  codes = 2.0 * bits.astype(jnp.float32) - 1.0
  indices = jnp.sum(bits << jnp.arange(z.shape[-1]), axis=-1)
  return codes, indices.astype(jnp.int32)


class LookupFreeQuantizer(nn.Module):
  """Lookup-free quantizer over ``bits`` channels (``2**bits`` codes).

  ``proj_in``/``proj_out`` when ``bits != embed_dim``; commitment loss
  ``beta * |z - sg(sign z)|^2`` plus ``entropy_weight`` times the entropy
  penalty with logits ``2 z.c`` over all sign codes ``c`` (equal to negative
  squared distances up to a per-vector constant). Returns
  ``(z_q, loss, indices)``.
  """
  bits: int
  embed_dim: int
  beta: float = 0.25
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  gradient: str = "ste"
  param_dtype: Any = jnp.float32

  def setup(self):
    if not 1 <= self.bits <= 16:
      raise ValueError(f"lfq bits={self.bits}: the entropy term enumerates "
                       "2**bits codes; use 1..16 bits")
    self.estimator = gradient_estimator(self.gradient)
    self.proj = Projections(self.bits, self.embed_dim,
                             param_dtype=self.param_dtype)

  def __call__(self, z, *, train: bool = False):
    del train
    ze = self.proj.into(z)
    codes, indices = lfq_quantize(ze)
    loss = self.beta * jnp.mean((ze - codes)**2)
    if self.entropy_weight:
      flat = ze.reshape(-1, self.bits)
      logits = 2.0 * jnp.matmul(flat, lfq_codebook(self.bits).T,
                                precision=_HIGHEST)
      ent, _ = entropy_penalty(logits, self.entropy_temperature)
      loss = loss + self.entropy_weight * ent
    return self.proj.out(self.estimator(ze, codes)), loss, indices

  def lookup(self, indices):
    return self.proj.out(lfq_indices_to_codes(indices, self.bits))


# -- Options, checks and the module of the 'lfq' family

OPTIONS = dict(beta=0.25, entropy_weight=0.0, entropy_temperature=0.01,
               quantizer_grad="ste")
"""Options of ``quantizer='lfq'`` (``n_embed = 2**bits``): the commitment
weight, the entropy penalty over all sign codes (0 = off) and the gradient
estimator (``'ste'`` or ``'rotation'``)."""


def check(options: Mapping[str, Any], n_embed: int, path: str) -> None:
  if n_embed < 2 or n_embed & (n_embed - 1):
    raise ValueError(f"config.model.n_embed={n_embed} is not a power of two, "
                     "as lookup-free quantisation needs (n_embed = 2**bits)")
  check_estimator_and_entropy(options, path)


def build(n_embed: int, embed_dim: int, options: Mapping[str, Any], dtype,
          param_dtype) -> nn.Module:
  del dtype  # quantizer math is float32
  return LookupFreeQuantizer(
      n_embed.bit_length() - 1, embed_dim, beta=options["beta"],
      entropy_weight=options["entropy_weight"],
      entropy_temperature=options["entropy_temperature"],
      gradient=options["quantizer_grad"], param_dtype=param_dtype)


SPEC = QuantizerSpec("lfq", OPTIONS, check, build)
