"""Nearest-code vector quantisation: the reference's quantizer and its options.

:class:`VectorQuantizer` is the reference's VectorQuantizer2 (parameter
``embedding``). :class:`FactorizedQuantizer` computes the same function with
default options and adds factorised and l2-normalised codes, an EMA codebook
with dead-code restart, an entropy penalty and the rotation trick. The VQGAN
uses the reference module unless an option beyond the reference is set.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.quantizers.common import (
    _HIGHEST, Array, Projections, check_estimator_and_entropy, codebook_logits,
    entropy_penalty, gradient_estimator, l2_normalize, lookup_codes,
    nearest_code, straight_through)
from vqgan_jax.quantizers.registry import QuantizerSpec

CODEBOOK_UPDATES = ("loss", "ema")


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


def _uniform_init(n_embed: int):

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)

  return init


class VectorQuantizer(nn.Module):
  """Nearest-code quantizer with a learned ``(n_embed, embed_dim)`` codebook.

  Codebook initialised uniform(-1/n, 1/n) as the reference. Returns
  ``(z_q, loss, indices)``; see :func:`vector_quantize`. ``train`` is
  accepted for the common quantizer signature and changes nothing.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  param_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", _uniform_init(self.n_embed),
                                (self.n_embed, self.embed_dim), self.param_dtype)

  def __call__(self, z, *, train: bool = False):
    del train  # the same function in training and inference
    z_q, loss, indices, _ = vector_quantize(z, self.embedding, beta=self.beta,
                                            legacy=self.legacy)
    return z_q, loss, indices

  def lookup(self, indices):
    return lookup_codes(indices, self.embedding)



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
    self.proj = Projections(dim, self.embed_dim, param_dtype=self.param_dtype)
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




# -- Options, checks and the module of the 'vq' family

OPTIONS = dict(
    beta=0.25, legacy_loss=True, codebook_dim=0, l2_codes=False,
    codebook_update="loss", codebook_ema_decay=0.99, codebook_ema_eps=1e-5,
    dead_code_threshold=0.0, entropy_weight=0.0, entropy_temperature=0.01,
    quantizer_grad="ste")
"""Options of ``quantizer='vq'``.

``beta``/``legacy_loss``: loss balance and the reference's released loss
weighting (:func:`vq_loss`). ``codebook_dim`` > 0: factorised codes of this
many channels; ``l2_codes``: l2-normalised lookup; ``codebook_update``:
``'loss'`` (the reference) or ``'ema'`` (state in ``'quantizer_stats'``),
with ``codebook_ema_decay``/``codebook_ema_eps`` and
``dead_code_threshold`` (EMA count under which a code restarts; 0 = off);
``entropy_weight``/``entropy_temperature``: the entropy penalty (0 = off);
``quantizer_grad``: ``'ste'`` or ``'rotation'``. Every option but ``beta``
and ``legacy_loss`` at its default gives the reference's
:class:`VectorQuantizer`.
"""

_REFERENCE = ("beta", "legacy_loss")


def is_reference(options: Mapping[str, Any]) -> bool:
  """Whether ``options`` leave the reference's quantizer (no extra option)."""
  return all(options[k] == d for k, d in OPTIONS.items() if k not in _REFERENCE)


def check(options: Mapping[str, Any], n_embed: int, path: str) -> None:
  del n_embed
  update = options["codebook_update"]
  if update not in CODEBOOK_UPDATES:
    raise ValueError(f"{path}.codebook_update={update!r}; valid: "
                     f"{CODEBOOK_UPDATES}")
  check_estimator_and_entropy(options, path)
  if options["dead_code_threshold"] < 0:
    raise ValueError(f"{path}.dead_code_threshold="
                     f"{options['dead_code_threshold']} must be >= 0 (0 = off)")
  if update == "ema" and not 0 < options["codebook_ema_decay"] < 1:
    raise ValueError(f"{path}.codebook_ema_decay="
                     f"{options['codebook_ema_decay']} must lie in (0, 1)")


def build(n_embed: int, embed_dim: int, options: Mapping[str, Any], dtype,
          param_dtype) -> nn.Module:
  del dtype  # quantizer math is float32
  o = options
  if is_reference(o):
    return VectorQuantizer(n_embed, embed_dim, beta=o["beta"],
                           legacy=o["legacy_loss"], param_dtype=param_dtype)
  return FactorizedQuantizer(
      n_embed, embed_dim, code_dim=o["codebook_dim"], l2=o["l2_codes"],
      update=o["codebook_update"], beta=o["beta"], legacy=o["legacy_loss"],
      ema_decay=o["codebook_ema_decay"], ema_eps=o["codebook_ema_eps"],
      dead_threshold=o["dead_code_threshold"],
      entropy_weight=o["entropy_weight"],
      entropy_temperature=o["entropy_temperature"],
      gradient=o["quantizer_grad"], param_dtype=param_dtype)


SPEC = QuantizerSpec("vq", OPTIONS, check, build)
