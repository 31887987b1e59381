"""Quantizers: pure functions plus thin Flax modules.

Everything here computes in float32 (distances with HIGHEST matmul
precision), whatever the compute dtype of the surrounding network: bf16
distances flip argmins.

Conventions: ``z`` is channels-last, ``(..., D)``; a codebook is
``(n_embed, D)``; indices are int32 with the leading shape of ``z``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(z: Array, codebook: Array) -> Array:
  """Squared Euclidean distances from each vector to each code.

  Uses ``|z|^2 + |e|^2 - 2 z.e`` in float32 at the highest matmul precision,
  the same expansion as the reference, so that the nearest code agrees with
  it everywhere except at float32 near-ties.

  Args:
    z: ``(N, D)`` vectors.
    codebook: ``(K, D)`` codes.

  Returns:
    ``(N, K)`` float32 distances.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z**2, axis=1, keepdims=True) + jnp.sum(codebook**2, axis=1)
          - 2.0 * jnp.matmul(z, codebook.T, precision=_HIGHEST))


def nearest_code(z: Array, codebook: Array) -> Array:
  """Index of the nearest code for each vector of ``z`` (..., D); ties -> lowest index."""
  flat = z.reshape(-1, z.shape[-1])
  idx = jnp.argmin(squared_distances(flat, codebook), axis=1)
  return idx.astype(jnp.int32).reshape(z.shape[:-1])


def lookup_codes(indices: Array, codebook: Array) -> Array:
  """Index grid ``(...)`` -> code vectors ``(..., D)`` (float32)."""
  return jnp.take(codebook.astype(jnp.float32), indices, axis=0)


def vq_loss(z: Array, z_q: Array, *, beta: float = 0.25,
            legacy: bool = True) -> Tuple[Array, Dict[str, Array]]:
  """The VQ-VAE codebook + commitment loss, float32.

  Args:
    z: encoder outputs.
    z_q: their quantized codes (no straight-through applied).
    beta: weight of the term that the reference's released models used it on.
    legacy: the reference's released weighting,
      ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``, i.e. beta on
      the codebook term. ``legacy=False`` is the corrected form of the paper,
      ``beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)``.

  Returns:
    ``(loss, {'commitment': ..., 'codebook': ...})`` (unweighted terms).
  """
  z = z.astype(jnp.float32)
  z_q = z_q.astype(jnp.float32)
  commitment = jnp.mean((jax.lax.stop_gradient(z_q) - z)**2)
  codebook = jnp.mean((z_q - jax.lax.stop_gradient(z))**2)
  if legacy:
    loss = commitment + beta * codebook
  else:
    loss = beta * commitment + codebook
  return loss, {"commitment": commitment, "codebook": codebook}


def straight_through(z: Array, z_q: Array) -> Array:
  """Forward value ``z_q``, gradient of the identity to ``z``."""
  return z + jax.lax.stop_gradient(z_q - z)


def vector_quantize(z: Array, codebook: Array, *, beta: float = 0.25,
                    legacy: bool = True) -> Tuple[Array, Array, Array, Dict]:
  """Vector quantization with the straight-through estimator.

  Args:
    z: ``(..., D)`` encoder outputs (any float dtype).
    codebook: ``(K, D)``.
    beta: commitment/codebook balance (see :func:`vq_loss`).
    legacy: use the reference's released loss weighting.

  Returns:
    ``(z_q, loss, indices, terms)``: ``z_q`` float32 with straight-through
    gradients to ``z`` and codebook gradients through the loss only.
  """
  z32 = z.astype(jnp.float32)
  indices = nearest_code(z32, codebook)
  z_q = lookup_codes(indices, codebook)
  loss, terms = vq_loss(z32, z_q, beta=beta, legacy=legacy)
  return straight_through(z32, z_q), loss, indices, terms


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


def codebook_histogram(indices: Array, n_embed: int) -> Array:
  """Counts of each code in ``indices`` (float32, shape ``(n_embed,)``)."""
  return jnp.zeros((n_embed,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def codebook_usage(indices: Array, n_embed: int) -> Array:
  """Fraction of the codebook used at least once in ``indices``."""
  return jnp.mean(codebook_histogram(indices, n_embed) > 0)


def perplexity(indices: Array, n_embed: int) -> Array:
  """``exp(entropy)`` of the code histogram of ``indices``."""
  counts = codebook_histogram(indices, n_embed)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))


def _uniform_init(n_embed: int):

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)

  return init


class VectorQuantizer(nn.Module):
  """Nearest-code quantizer with a learned ``(n_embed, embed_dim)`` codebook.

  Codebook initialised uniform(-1/n, 1/n) as the reference. Returns
  ``(z_q, loss, indices)``; see :func:`vector_quantize`.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", _uniform_init(self.n_embed),
                                (self.n_embed, self.embed_dim), self.param_dtype)

  def __call__(self, z):
    z_q, loss, indices, _ = vector_quantize(z, self.embedding, beta=self.beta,
                                            legacy=self.legacy)
    return z_q, loss, indices

  def lookup(self, indices):
    return lookup_codes(indices, self.embedding)


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
