"""Gumbel-softmax quantisation: the reference's GumbelVQ quantizer."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.quantizers.common import _HIGHEST, Array, lookup_codes
from vqgan_jax.quantizers.registry import QuantizerSpec


def gumbel_quantize(logits: Array, embed: Array, *, rng: Optional[Array] = None,
                    temperature: float | Array = 1.0, hard: bool = True,
                    kl_weight: float = 5e-4) -> Tuple[Array, Array, Array]:
  """Gumbel-softmax quantization over codes (channels-last ``logits``).

  With ``rng`` set, Gumbel noise is added and ``softmax((logits + g) / T)``
  is used; ``hard=True`` turns it into a one-hot with straight-through
  gradients of the soft sample. Without ``rng`` the code is the argmax of the
  logits (deterministic inference).

  Args:
    logits: ``(..., K)`` projection logits.
    embed: ``(K, D)`` code vectors.
    rng: PRNG key for the Gumbel noise, or None for noise-free argmax.
    temperature: softmax temperature (may be traced).
    hard: one-hot straight-through sample (the reference's default).
    kl_weight: weight of ``KL(softmax(logits) || uniform)``.

  Returns:
    ``(z_q, loss, indices)`` with ``z_q`` float32 ``(..., D)``.
  """
  logits = logits.astype(jnp.float32)
  n = logits.shape[-1]
  if rng is None:
    indices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    one_hot = jax.nn.one_hot(indices, n, dtype=jnp.float32)
  else:
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + g) / temperature, axis=-1)
    indices = jnp.argmax(soft, axis=-1).astype(jnp.int32)
    if hard:
      one_hot = jax.nn.one_hot(indices, n, dtype=jnp.float32)
      one_hot = one_hot - jax.lax.stop_gradient(soft) + soft
    else:
      one_hot = soft
  z_q = jnp.matmul(one_hot, embed.astype(jnp.float32), precision=_HIGHEST)
  qy = jax.nn.softmax(logits, axis=-1)
  kl = jnp.sum(qy * jnp.log(qy * n + 1e-10), axis=-1)
  return z_q, kl_weight * jnp.mean(kl), indices


class GumbelQuantizer(nn.Module):
  """Gumbel-softmax quantizer: a 1x1 ``proj`` to code logits, then codes.

  In training (``train=True``) it draws Gumbel noise from the ``'gumbel'``
  RNG stream and uses the hard straight-through sample. At inference it takes
  the argmax of the logits, unless ``noisy_inference`` asks for the
  reference's behaviour (noise also at eval, so random indices).
  """
  n_embed: int
  embed_dim: int
  kl_weight: float = 5e-4
  temperature: float = 1.0
  straight_through: bool = True
  noisy_inference: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.proj = nn.Conv(self.n_embed, (1, 1), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="proj")
    self.embed = self.param("embed", nn.initializers.normal(1.0),
                            (self.n_embed, self.embed_dim), self.param_dtype)

  def __call__(self, z, *, train: bool = False, temperature=None):
    logits = self.proj(z)
    noisy = train or self.noisy_inference
    rng = self.make_rng("gumbel") if noisy else None
    hard = self.straight_through if train else True
    t = self.temperature if temperature is None else temperature
    return gumbel_quantize(logits, self.embed, rng=rng, temperature=t,
                           hard=hard, kl_weight=self.kl_weight)

  def lookup(self, indices):
    return lookup_codes(indices, self.embed)




# -- Options, checks and the module of the 'gumbel' family

OPTIONS = dict(kl_weight=1e-8, temperature=1.0, noisy_inference=False)
"""Options of ``quantizer='gumbel'``: the KL-to-uniform weight, the softmax
temperature in training, and ``noisy_inference`` to reproduce the reference's
noisy encoding at inference (random indices) instead of the logits' argmax."""


def check(options: Mapping[str, Any], n_embed: int, path: str) -> None:
  del options, n_embed, path  # any weight and temperature are usable


def build(n_embed: int, embed_dim: int, options: Mapping[str, Any], dtype,
          param_dtype) -> nn.Module:
  return GumbelQuantizer(
      n_embed, embed_dim, kl_weight=options["kl_weight"],
      temperature=options["temperature"],
      noisy_inference=options["noisy_inference"], dtype=dtype,
      param_dtype=param_dtype)


SPEC = QuantizerSpec("gumbel", OPTIONS, check, build,
                     flat_names={"gumbel_noisy_inference": "noisy_inference"})
