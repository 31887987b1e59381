"""Per-step logit filtering and token choice of the samplers.

`filter_logits` applies temperature, top-k (`top_k_mask`) and top-p
(`top_p_mask`), each skipped when None; `sample_logits` chooses one token
per row from the filtered logits (or the argmax). Every argument may be a
traced value, so a jitted sampler does not recompile when they change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _ordered_bits(x: Array) -> Array:
  """Maps float32 to uint32 so that unsigned order equals float order."""
  x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 and +0.0 are equal
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_k_mask(logits: Array, top_k: Array | int, *,
               bits_per_round: int | None = None) -> Array:
  """True where a logit is >= the k-th largest logit of its row.

  The k-th largest value is found exactly by a radix search over an
  order-preserving integer encoding of the float32 logits, `bits_per_round`
  bits at a time, so `top_k` may be a traced value (no static bound, no
  sort). Each round counts, for every value of the next digit at once, the
  logits at or above the candidate threshold: 32 / bits_per_round dependent
  reductions per call, each over 2**bits_per_round x V comparisons. The
  result is exact for every setting; only the cost differs. On CPU the
  comparisons dominate, so one bit per round is the default there. On a
  GPU a decode step at small batch is bound by the number of dependent
  kernels rather than by these comparisons, so four bits per round (8
  reductions instead of 32) is the default there.

  Args:
    logits: float32 (..., V).
    top_k: int, scalar or broadcastable to logits.shape[:-1]; clipped to
      [1, V].
    bits_per_round: 1, 2, 4 or 8 (static); None: 1 on CPU, else 4.

  Returns:
    bool (..., V).
  """
  if bits_per_round is None:
    bits_per_round = 1 if jax.default_backend() == "cpu" else 4
  if bits_per_round not in (1, 2, 4, 8):
    raise ValueError(f"bits_per_round must be 1, 2, 4 or 8, got "
                     f"{bits_per_round}")
  keys = _ordered_bits(logits.astype(jnp.float32))
  k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, logits.shape[-1])
  k = jnp.broadcast_to(k, logits.shape[:-1])[..., None]
  digits = jnp.arange(1, 1 << bits_per_round, dtype=jnp.uint32)
  kth = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)
  for shift in range(32 - bits_per_round, -1, -bits_per_round):
    # Invariant: at least k keys are >= kth, so digit 0 always qualifies.
    # Count the keys >= kth | d << shift for every other digit d at once;
    # the counts fall with d: the digit is how many still reach k.
    candidates = kth | (digits << shift)                   # (..., D - 1)
    counts = jnp.sum(keys[..., None, :] >= candidates[..., None],
                     axis=-1, dtype=jnp.int32)             # (..., D - 1)
    best = jnp.sum(counts >= k, axis=-1, keepdims=True, dtype=jnp.uint32)
    kth = kth | (best << shift)
  return keys >= kth


def top_p_mask(logits: Array, top_p: Array | float) -> Array:
  """Nucleus mask: keep each token whose more probable tokens hold < p.

  In descending order of probability, a token is kept if the total
  probability of the tokens before it is < p; the first token whose
  cumulative probability reaches p is thus the last kept, and the most
  probable token is always kept.

  Args:
    logits: float32 (..., V).
    top_p: float, scalar or broadcastable to logits.shape[:-1].

  Returns:
    bool (..., V).
  """
  logits = logits.astype(jnp.float32)
  p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32),
                       logits.shape[:-1])[..., None]
  ordered = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  before = before.at[..., 0].set(0.0)
  num_kept = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(ordered, num_kept - 1, axis=-1)
  return logits >= threshold


def _per_row(value: Array | float, ndim: int) -> Array:
  """A scalar or per-row value reshaped to broadcast against (..., V)."""
  value = jnp.asarray(value, jnp.float32)
  return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def filter_logits(logits: Array, temperature: Array | float | None = None,
                  top_k: Array | int | None = None,
                  top_p: Array | float | None = None) -> Array:
  """Temperature, top-k then top-p, each skipped when None.

  Args:
    logits: (..., V) logits.
    temperature: divides the logits.
    top_k: keep logits >= the k-th largest (see `top_k_mask`).
    top_p: nucleus filtering of what top-k left (see `top_p_mask`).

  Returns:
    float32 (..., V) logits with the removed entries set to -inf.
  """
  logits = logits.astype(jnp.float32)
  if temperature is not None:
    logits = logits / _per_row(temperature, logits.ndim)
  if top_k is not None:
    logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
  if top_p is not None:
    logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
  return logits


def sample_logits(logits: Array, rng: Array, *,
                  temperature: Array | float | None = None,
                  top_k: Array | int | None = None,
                  top_p: Array | float | None = None,
                  greedy: bool = False) -> Array:
  """Chooses one token per row.

  Args:
    logits: (B, V) logits.
    rng: PRNG key (ignored when greedy).
    temperature: see `filter_logits`.
    top_k: see `filter_logits`.
    top_p: see `filter_logits`.
    greedy: take the argmax instead of sampling.

  Returns:
    int32 (B,) token ids.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
