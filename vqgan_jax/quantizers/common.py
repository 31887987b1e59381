"""Helpers shared by the quantizer families.

Distances and nearest-code lookup, the gradient estimators
(straight-through, rotation trick), the entropy penalty, codebook usage
statistics, the optional in/out projections, and the option checks common
to several families.

Everything here computes in float32 (distances with HIGHEST matmul
precision), whatever the compute dtype of the surrounding network: bf16
distances flip argmins.

Conventions: ``z`` is channels-last, ``(..., D)``; a codebook is
``(n_embed, D)``; indices are int32 with the leading shape of ``z``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

GRADIENT_ESTIMATORS = ("ste", "rotation")

# -- Distances and lookup


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


def straight_through(z: Array, z_q: Array) -> Array:
  """Forward value ``z_q``, gradient of the identity to ``z``."""
  return z + jax.lax.stop_gradient(z_q - z)


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


# -- Gradient estimators and the entropy penalty


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


def codebook_logits(z: Array, codebook: Array) -> Array:
  """Negative squared distances ``(N, K)``: the entropy penalty's logits."""
  return -squared_distances(z.reshape(-1, z.shape[-1]), codebook)


class Projections(nn.Module):
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


# -- Option checks shared by several families


def check_estimator_and_entropy(options: Mapping[str, Any], path: str) -> None:
  """``quantizer_grad`` names an estimator; ``entropy_weight >= 0`` and
  ``entropy_temperature > 0``. ``path`` prefixes the option names."""
  grad = options["quantizer_grad"]
  if grad not in GRADIENT_ESTIMATORS:
    raise ValueError(f"{path}.quantizer_grad={grad!r}; valid: "
                     f"{GRADIENT_ESTIMATORS}")
  weight, temp = options["entropy_weight"], options["entropy_temperature"]
  if weight < 0 or temp <= 0:
    raise ValueError(
        f"{path}.entropy_weight={weight} / entropy_temperature={temp}: need a "
        "weight >= 0 (0 = off) and a temperature > 0")
