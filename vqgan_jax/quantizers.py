"""Quantizers: pure functions plus thin Flax modules.

Everything here computes in float32 (distances with HIGHEST matmul
precision), whatever the compute dtype of the surrounding network: bf16
distances flip argmins.

Conventions: ``z`` is channels-last, ``(..., D)``; a codebook is
``(n_embed, D)``; indices are int32 with the leading shape of ``z``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------
# Beyond the reference: quantizers that keep their codebooks in use.
# Every option below is off by default; the reference's VectorQuantizer above
# is untouched.

GRADIENT_ESTIMATORS = ("ste", "rotation")
CODEBOOK_UPDATES = ("loss", "ema")


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  """``x / max(|x|, eps)`` over the last axis, float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def rotation_trick(z: Array, z_q: Array, eps: float = 1e-6) -> Array:
  """The rotation-trick estimator (Fifty et al. 2024), channels-last.

  Forward value ``z_q`` (up to float32 round-off), like
  :func:`straight_through`. Backward, the gradient reaching ``z`` is the
  upstream gradient ``g`` mapped by ``lambda * R^T`` instead of the identity,
  where ``R`` is the rotation taking ``z/|z|`` onto ``z_q/|z_q|`` in the plane
  they span (``R = I - 2 r r^T + 2 q e^T`` with ``e = z/|z|``,
  ``q = z_q/|z_q|``, ``r = (e + q)/|e + q|``) and ``lambda = |z_q|/|z|``; ``R``
  and ``lambda`` are constants (stop-gradient). No gradient reaches ``z_q``.

  Args:
    z: ``(..., D)`` encoder outputs.
    z_q: ``(..., D)`` their codes.
    eps: guards the norms of zero vectors.

  Returns:
    ``(..., D)`` float32, forward ``z_q``.
  """
  z = z.astype(jnp.float32)
  z_q = jax.lax.stop_gradient(z_q.astype(jnp.float32))
  sg = jax.lax.stop_gradient
  z_norm = sg(jnp.sqrt(jnp.sum(z**2, axis=-1, keepdims=True)))
  q_norm = jnp.sqrt(jnp.sum(z_q**2, axis=-1, keepdims=True))
  e = sg(z / jnp.maximum(z_norm, eps))
  q = z_q / jnp.maximum(q_norm, eps)
  r = l2_normalize(e + q, eps)
  lam = q_norm / jnp.maximum(z_norm, eps)
  dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
  return lam * (z - 2.0 * dot(z, r) * r + 2.0 * dot(z, e) * q)


def gradient_estimator(name: str) -> Callable[[Array, Array], Array]:
  """``'ste'`` -> :func:`straight_through`, ``'rotation'`` -> :func:`rotation_trick`."""
  if name == "ste":
    return straight_through
  if name == "rotation":
    return rotation_trick
  raise ValueError(f"quantizer gradient {name!r}; valid: {GRADIENT_ESTIMATORS}")


def entropy_penalty(logits: Array, temperature: float = 0.01
                    ) -> Tuple[Array, Dict[str, Array]]:
  """Per-sample entropy minus the entropy of the batch-average distribution.

  ``p_i = softmax(logits_i / T)`` over the codes; minimising the result makes
  each vector confident in one code (low per-sample entropy) and the batch as
  a whole spread over all codes (high average entropy), as in MaskGIT/MAGVIT.
  For a nearest-code quantizer the logits are negative squared distances.
  The reduction is over every leading position of ``logits``: under ``jit``
  with a sharded batch that is the global batch.

  Args:
    logits: ``(..., K)`` affinities of each vector to each code.
    temperature: softmax temperature.

  Returns:
    ``(loss, {'sample_entropy': ..., 'batch_entropy': ...})``, float32; the
    loss lies in ``[-log K, log K]``.
  """
  logits = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  p = jnp.exp(logp)
  sample = jnp.mean(-jnp.sum(p * logp, axis=-1))
  avg = jnp.mean(p, axis=0)
  batch = -jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-30)))
  return sample - batch, {"sample_entropy": sample, "batch_entropy": batch}


# -- EMA codebook with dead-code restart


def ema_codebook_update(codebook: Array, cluster_size: Array, embed_sum: Array,
                        z: Array, indices: Array, *, decay: float = 0.99,
                        eps: float = 1e-5, dead_threshold: float = 0.0,
                        rng: Optional[Array] = None, l2: bool = False
                        ) -> Tuple[Array, Array, Array, Array]:
  """One EMA (k-means style) codebook update, then dead-code restart.

  With ``n_k`` the number of vectors of ``z`` assigned to code ``k`` and
  ``s_k`` their sum::

    N_k <- decay N_k + (1 - decay) n_k
    m_k <- decay m_k + (1 - decay) s_k
    e_k <- m_k / ((N_k + eps) / (sum N + K eps) * sum N)   # Laplace smoothing

  (``e_k`` l2-normalised when ``l2``). Codes with ``N_k < dead_threshold``
  are then restarted: ``e_k`` becomes a vector of ``z`` drawn uniformly
  (from ``rng``), ``m_k`` that vector and ``N_k`` 1. Sums are over all of
  ``z``: under ``jit`` with a sharded batch they are reduced across devices,
  so every replica computes the same codebook.

  Args:
    codebook: ``(K, D)`` current codes.
    cluster_size: ``(K,)`` EMA counts ``N``.
    embed_sum: ``(K, D)`` EMA sums ``m``.
    z: ``(..., D)`` the vectors that were quantized (in code space).
    indices: their codes, shape ``z.shape[:-1]``.
    decay: EMA decay.
    eps: Laplace smoothing.
    dead_threshold: restart codes whose EMA count falls below this; 0 = off.
    rng: PRNG key for the restart draws (needed when ``dead_threshold > 0``).
    l2: normalise the updated codes (l2-normalised codebooks).

  Returns:
    ``(codebook, cluster_size, embed_sum, dead)`` with ``dead`` the float32
    ``(K,)`` mask of restarted codes.
  """
  k = codebook.shape[0]
  flat = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  one_hot = jax.nn.one_hot(indices.reshape(-1), k, dtype=jnp.float32)
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.matmul(one_hot.T, flat, precision=_HIGHEST)
  cluster_size = decay * cluster_size.astype(jnp.float32) + (1 - decay) * counts
  embed_sum = decay * embed_sum.astype(jnp.float32) + (1 - decay) * sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + k * eps) * total
  new = embed_sum / smoothed[:, None]
  if l2:
    new = l2_normalize(new)
  dead = jnp.zeros((k,), bool)
  if dead_threshold > 0:
    if rng is None:
      raise ValueError("ema_codebook_update: dead_threshold > 0 needs an rng "
                       "for the restart draws")
    dead = cluster_size < dead_threshold
    picks = flat[jax.random.randint(rng, (k,), 0, flat.shape[0])]
    new = jnp.where(dead[:, None], picks, new)
    embed_sum = jnp.where(dead[:, None], picks, embed_sum)
    cluster_size = jnp.where(dead, 1.0, cluster_size)
  return (new.astype(codebook.dtype), cluster_size, embed_sum,
          dead.astype(jnp.float32))


def with_ema_codebooks(params: Dict, stats: Dict) -> Dict:
  """``params`` with each quantizer's ``embedding`` replaced by the EMA
  ``codebook`` found at the same module path of the ``quantizer_stats``
  collection (``stats``); other leaves are shared, not copied."""
  out = dict(params)
  for name, sub in stats.items():
    if not isinstance(sub, dict) and not hasattr(sub, "items"):
      continue
    if "codebook" in sub:
      out[name] = dict(out[name], embedding=sub["codebook"].astype(
          out[name]["embedding"].dtype))
    else:
      out[name] = with_ema_codebooks(out[name], sub)
  return out


def ema_stats_from_params(params: Dict, stats: Dict, l2: bool = False) -> Dict:
  """Fresh EMA statistics for the codebooks in ``params`` (e.g. loaded from a
  checkpoint): counts 1, sums and ``codebook`` the current codes."""
  out = {}
  for name, sub in stats.items():
    if "codebook" in sub:
      cb = params[name]["embedding"]
      out[name] = dict(sub, codebook=cb.astype(sub["codebook"].dtype),
                       embed_sum=l2_normalize(cb) if l2 else cb.astype(
                           jnp.float32),
                       cluster_size=jnp.ones_like(sub["cluster_size"]))
    else:
      out[name] = ema_stats_from_params(params[name], sub, l2)
  return out


# -- Finite scalar quantisation


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


# -- Lookup-free quantisation


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


# -- Thin modules


def codebook_logits(z: Array, codebook: Array) -> Array:
  """Negative squared distances ``(N, K)``: the entropy penalty's logits."""
  return -squared_distances(z.reshape(-1, z.shape[-1]), codebook)


class _Projections(nn.Module):
  """Optional linear maps into a code space of ``code_dim`` and back out."""
  code_dim: int
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.factorised = self.code_dim != self.embed_dim
    if self.factorised:
      kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
      self.proj_in = nn.Dense(self.code_dim, name="proj_in", **kw)
      self.proj_out = nn.Dense(self.embed_dim, name="proj_out", **kw)

  def into(self, z):
    z = z.astype(jnp.float32)
    return self.proj_in(z) if self.factorised else z

  def out(self, z):
    return self.proj_out(z) if self.factorised else z


class FactorizedQuantizer(nn.Module):
  """Nearest-code quantizer with the options beyond the reference.

  With ``code_dim`` unset (0), no l2, loss updates, straight-through and no
  entropy penalty it computes exactly :class:`VectorQuantizer` with the same
  parameter (``embedding``). Otherwise:

  * ``code_dim > 0``: factorised codes. A learned linear ``proj_in`` maps
    ``z`` to ``code_dim`` channels, where the lookup happens, and
    ``proj_out`` maps the codes back to ``embed_dim``.
  * ``l2``: ``z`` (projected) and the codebook are l2-normalised before the
    lookup (cosine-similarity codes).
  * ``update='ema'``: the codebook follows an EMA of its assigned vectors
    (:func:`ema_codebook_update`) with dead-code restart; only the
    commitment loss ``beta * |z - sg(z_q)|^2`` remains. In training the
    module needs ``mutable=['quantizer_stats']`` and a ``'quantizer'`` rng;
    the trainer copies the stats' ``codebook`` into the ``embedding``
    parameter (:func:`with_ema_codebooks`).
  * ``entropy_weight > 0``: adds ``entropy_weight * entropy_penalty`` of the
    softmax over negative squared distances.
  * ``gradient='rotation'``: :func:`rotation_trick` instead of
    straight-through.

  Returns ``(z_q, loss, indices)`` like :class:`VectorQuantizer`.
  """
  n_embed: int
  embed_dim: int
  code_dim: int = 0
  l2: bool = False
  update: str = "loss"
  beta: float = 0.25
  legacy: bool = True
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  dead_threshold: float = 0.0
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  gradient: str = "ste"
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.update not in CODEBOOK_UPDATES:
      raise ValueError(f"codebook update {self.update!r}; valid: "
                       f"{CODEBOOK_UPDATES}")
    self.estimator = gradient_estimator(self.gradient)
    dim = self.code_dim or self.embed_dim
    self.proj = _Projections(dim, self.embed_dim, param_dtype=self.param_dtype)
    init = _uniform_init(self.n_embed)
    if self.l2:
      init = nn.initializers.normal(1.0)  # normalised at use; uniform on the sphere
    self.embedding = self.param("embedding", init, (self.n_embed, dim),
                                self.param_dtype)
    # EMA state, only where it exists or may be created (init / training):
    # inference with parameters alone never needs it.
    self.has_stats = self.update == "ema" and (
        self.is_mutable_collection("quantizer_stats") or
        self.has_variable("quantizer_stats", "cluster_size"))
    if self.has_stats:
      self.cluster_size = self.variable(
          "quantizer_stats", "cluster_size",
          lambda: jnp.ones((self.n_embed,), jnp.float32))
      self.embed_sum = self.variable("quantizer_stats", "embed_sum",
                                     self._codebook)
      self.ema_codebook = self.variable("quantizer_stats", "codebook",
                                        lambda: self.embedding)

  def _codebook(self):
    cb = self.embedding.astype(jnp.float32)
    return l2_normalize(cb) if self.l2 else cb

  def __call__(self, z, *, train: bool = False):
    ze = self.proj.into(z)
    if self.l2:
      ze = l2_normalize(ze)
    codebook = self._codebook()
    indices = nearest_code(ze, codebook)
    z_q = lookup_codes(indices, codebook)
    if self.update == "ema":
      loss = self.beta * jnp.mean((ze - jax.lax.stop_gradient(z_q))**2)
      self._ema_step(ze, indices, train)
    else:
      loss, _ = vq_loss(ze, z_q, beta=self.beta, legacy=self.legacy)
    if self.entropy_weight:
      ent, _ = entropy_penalty(codebook_logits(ze, codebook),
                               self.entropy_temperature)
      loss = loss + self.entropy_weight * ent
    out = self.proj.out(self.estimator(ze, z_q))
    return out, loss, indices

  def _ema_step(self, ze, indices, train):
    if not train or self.is_initializing() or not (
        self.has_stats and self.is_mutable_collection("quantizer_stats")):
      return
    size, total, book = self.cluster_size, self.embed_sum, self.ema_codebook
    rng = self.make_rng("quantizer") if self.dead_threshold > 0 else None
    new, n, m, _ = ema_codebook_update(
        jax.lax.stop_gradient(self._codebook()), size.value, total.value,
        jax.lax.stop_gradient(ze), indices, decay=self.ema_decay,
        eps=self.ema_eps, dead_threshold=self.dead_threshold, rng=rng,
        l2=self.l2)
    size.value, total.value, book.value = n, m, new.astype(book.value.dtype)

  def lookup(self, indices):
    return self.proj.out(lookup_codes(indices, self._codebook()))


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
    self.proj = _Projections(len(self.levels), self.embed_dim,
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
    self.proj = _Projections(self.bits, self.embed_dim,
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
