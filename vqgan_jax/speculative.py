"""Speculative Jacobi decoding: several tokens per forward pass, same samples.

Speculative Jacobi decoding (Teng et al., "Accelerating Auto-regressive
Text-to-Image Generation with Training-free Speculative Jacobi Decoding",
arXiv 2410.01699) keeps a window of draft tokens after the accepted prefix
and runs one forward pass over it with the key/value cache. With n tokens
accepted and a window of W, the pass feeds [token n-1, draft n, ...,
draft n+W-2] and yields the model's distributions p_n ... p_{n+W-1}, each
filtered and guided exactly as the plain sampler's. Then:

  * verification: draft x_i (drawn from q_i) is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)), left to right; at the first rejection a
    token is drawn from the residual norm(max(0, p_i - q_i)) and the later
    drafts are dropped; when every draft is accepted, one more token is
    drawn from p_{n+W-1}. Each pass thus accepts between 1 and W tokens;
  * Jacobi refill: the window's drafts after the accepted tokens are drawn
    from this pass's distributions at their positions (which become their
    q), and positions the pass did not reach start uniformly random.

This is the speculative-sampling rule, so every token follows the model's
(filtered, guided) conditional distribution given the tokens before it: the
samples are distributed exactly as `sampling.sample`'s, and greedy decoding
gives the same tokens. A window of 1 is plain decoding.

Everything is one jitted `lax.while_loop` with fixed shapes. Each row of
the batch keeps its own number of accepted tokens: the model runs per row
(`jax.vmap`) at that row's position. Keys/values written for rejected drafts
are overwritten by the next pass, which starts at the first position not
accepted; causal attention only reads the accepted prefix and the window.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vqgan_jax import gpt as gpt_lib
from vqgan_jax import guidance
from vqgan_jax import kv_cache
from vqgan_jax import logit_filters
from vqgan_jax import sampling

Array = jax.Array
# (inputs int32 (B, W), state, steps int32 (B,)) -> (logits (B, W, V), state):
# inputs[:, 0] is token steps-1 (the prefix's last token for step 0), the
# others are drafts; logits[:, j] are those of token steps + j.
WindowLogits = Callable[[Array, Any, Array], tuple[Array, Any]]
# (p (B, W, V), q (B, W-1, V), drafts (B, W-1), u (B, W-1)) ->
# (accepted drafts (B,), probabilities of the next token (B, V)).
Verify = Callable[[Array, Array, Array, Array], tuple[Array, Array]]


# ----------------------------------------------------------------------------
# Distributions and the acceptance rule.
# ----------------------------------------------------------------------------


def target_probs(logits: Array, *, temperature: Array | float | None = None,
                 top_k: Array | int | None = None,
                 top_p: Array | float | None = None,
                 greedy: bool = False) -> Array:
  """The distribution the plain sampler draws from, as probabilities.

  Args:
    logits: (..., V) logits (already guided).
    temperature: see `logit_filters.filter_logits`.
    top_k: see `logit_filters.filter_logits`.
    top_p: see `logit_filters.filter_logits`.
    greedy: a one-hot distribution at the argmax.

  Returns:
    float32 (..., V) probabilities.
  """
  if greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1],
                          dtype=jnp.float32)
  filtered = logit_filters.filter_logits(logits, temperature, top_k, top_p)
  return jax.nn.softmax(filtered, axis=-1)


def verify_drafts(p: Array, q: Array, drafts: Array, u: Array
                  ) -> tuple[Array, Array]:
  """The speculative acceptance rule.

  Draft i is accepted when u_i * q_i(x_i) < p_i(x_i) (probability
  min(1, p/q)); the drafts before the first rejection are kept. The next
  token is drawn from the residual norm(max(0, p_a - q_a)) at the first
  rejection a, or from p_{W-1} when all W-1 drafts are accepted.

  Args:
    p: float32 (B, W, V) target distributions of the window's tokens.
    q: float32 (B, W-1, V) distributions the drafts were drawn from.
    drafts: int32 (B, W-1) draft tokens.
    u: float32 (B, W-1) uniform [0, 1) numbers.

  Returns:
    (int32 (B,) number of accepted drafts a, float32 (B, V) distribution of
    token a).
  """
  p_draft = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
  q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  accept = u * q_draft < p_draft
  accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
  q_next = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
  p_a = _take_row(p, accepted)
  residual = jnp.maximum(p_a - _take_row(q_next, accepted), 0.0)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  # p == q leaves no residual; such a draft is never rejected (u < 1).
  next_probs = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1),
                         p_a)
  return accepted, next_probs


def _take_row(x: Array, index: Array) -> Array:
  """x[b, index[b]] for x (B, T, ...)."""
  return jax.vmap(lambda row, i: row[i])(x, index)


def _slice_rows(x: Array, start: Array, size: int) -> Array:
  """x[b, start[b]:start[b] + size] for x (B, T, ...)."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(
      row, s, size, axis=0))(x, start)


def _update_rows(x: Array, update: Array, start: Array) -> Array:
  """x[b, start[b]:start[b] + T'] = update[b] for x (B, T, ...)."""
  return jax.vmap(lambda row, u, s: jax.lax.dynamic_update_slice_in_dim(
      row, u, s, axis=0))(x, update, start)


def _draw(uniform: Array, probs: Array) -> Array:
  """A token per row of `probs` (..., V) from uniform numbers (..., V):
  the Gumbel-max draw of `jax.random.categorical`."""
  gumbel = -jnp.log(-jnp.log(uniform))
  return jnp.argmax(jnp.log(probs) + gumbel, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# The pure decode loop.
# ----------------------------------------------------------------------------


def jacobi_loop(window_logits: WindowLogits, state: Any, last: Array,
                num_tokens: int, window: int, vocab_size: int, rng: Array, *,
                distribution: Callable[[Array], Array] = target_probs,
                verify: Verify = verify_drafts) -> tuple[Array, Array]:
  """Samples `num_tokens` tokens per row with speculative Jacobi decoding.

  Each iteration draws the window's drafts from their distributions q
  (uniform at first), runs `window_logits` once, accepts a prefix of the
  drafts by `verify`, draws the next token and keeps the new q of the
  positions after it (this pass's distributions, uniform past the window).
  All random numbers of an iteration come from one uniform draw.

  Args:
    window_logits: the model over a window (`WindowLogits`).
    state: initial state of `window_logits` (e.g. a cache with the prefix).
    last: int32 (B,) the prefix's last token.
    num_tokens: tokens to sample (static).
    window: tokens fed per pass, W >= 1 (static); W - 1 are drafts.
    vocab_size: V.
    rng: PRNG key.
    distribution: logits (B, W, V) -> probabilities to sample from.
    verify: the acceptance rule (`verify_drafts`).

  Returns:
    (int32 (B, num_tokens) tokens, int32 (B,) forward passes each row used).
  """
  if num_tokens < 1 or window < 1:
    raise ValueError(f"need num_tokens >= 1 and window >= 1, got "
                     f"{num_tokens} and {window}")
  batch, drafted = last.shape[0], window - 1
  uniform = jnp.full((batch, drafted, vocab_size), 1.0 / vocab_size,
                     jnp.float32)
  out = jnp.zeros((batch, num_tokens + window), jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  tiny = jnp.finfo(jnp.float32).tiny

  def cond(carry):
    return jnp.any(carry[1] < num_tokens)

  def body(carry):
    it, n, last, q, out, passes, state = carry
    active = n < num_tokens
    steps = jnp.minimum(n, num_tokens - 1)
    numbers = jax.random.uniform(
        jax.random.fold_in(rng, it), (batch, window * vocab_size + drafted),
        jnp.float32, minval=tiny)
    draft_u = numbers[:, :drafted * vocab_size].reshape(q.shape)
    next_u = numbers[:, drafted * vocab_size:window * vocab_size]
    drafts = _draw(draft_u, q)
    inputs = jnp.concatenate([last[:, None], drafts], axis=1)
    logits, state = window_logits(inputs, state, steps)
    p = distribution(logits)
    accepted, next_probs = verify(p, q, drafts,
                                  numbers[:, window * vocab_size:])
    token = _draw(next_u, next_probs)
    # Tokens n .. n + accepted: the accepted drafts, then the new token.
    slots = jnp.arange(window)[None, :]
    padded = jnp.concatenate([drafts, token[:, None]], axis=1)
    finished = jnp.where(slots < accepted[:, None], padded, token[:, None])
    new_out = _update_rows(out, finished, steps)
    # Jacobi refill: the next drafts are tokens n + accepted + 1 .. on;
    # this pass's distributions cover window slots up to W - 1, uniform
    # beyond.
    new_q = _slice_rows(jnp.concatenate([p, uniform], axis=1), accepted + 1,
                        drafted)

    def keep(new, old):
      mask = active.reshape(active.shape + (1,) * (new.ndim - 1))
      return jnp.where(mask, new, old)

    return (it + 1, keep(n + accepted + 1, n), keep(token, last),
            keep(new_q, q), keep(new_out, out),
            passes + active.astype(jnp.int32), state)

  carry = (jnp.zeros((), jnp.int32), zeros, last.astype(jnp.int32), uniform,
           out, zeros, state)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[4][:, :num_tokens], carry[5]


# ----------------------------------------------------------------------------
# Sampling the model.
# ----------------------------------------------------------------------------


def _extend_positions(model: gpt_lib.GPT, variables: Any, length: int
                      ) -> tuple[gpt_lib.GPT, Any]:
  """The model with room for `length` positions.

  The last windows reach past the final token (their drafts there are never
  kept); a learned position table gets zero rows for those positions, which
  only the discarded drafts see (attention is causal).
  """
  if length <= model.block_size:
    return model, variables
  params = dict(variables["params"])
  if "pos_emb" in params:
    pad = length - params["pos_emb"].shape[1]
    params["pos_emb"] = jnp.pad(params["pos_emb"], ((0, 0), (0, pad), (0, 0)))
  return (model.clone(block_size=length),
          dict(variables, params=params))


_STATIC = ("model", "num_tokens", "window", "greedy", "use_top_k", "use_top_p",
           "verify")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _speculative_jit(model, variables, prefix, rng, temperature, top_k, top_p,
                     guidance_scale, null_prefix, *, num_tokens, window,
                     greedy, use_top_k, use_top_p, verify):
  """Jitted body of `sample_speculative` (see there)."""
  model, variables = sampling.decoding_model(model, variables)
  batch, prefix_len = prefix.shape
  null_len = prefix_len if null_prefix is None else null_prefix.shape[1]
  shift = null_len - prefix_len
  length = max(prefix_len, null_len) + num_tokens + window - 2
  model, variables = _extend_positions(model, variables, length)
  cache_len = prefix_len + num_tokens + window - 2

  def run(tokens, cache, position):
    return model.apply(variables, tokens, cache=cache, position=position)

  def split_rows(cache, rows):
    # (rows * B, ...) -> (B, rows, ...): one model call per row under vmap.
    return jax.tree_util.tree_map(
        lambda a: a.reshape((rows, batch) + a.shape[1:]).swapaxes(0, 1),
        cache)

  run_rows = jax.vmap(run)

  def null_inputs(inputs, steps):
    # At step 0 the window starts with the prefix's last token: the
    # unconditional rows start with their own.
    first = jnp.where(steps == 0, null_prefix[:, -1], inputs[:, 0])
    return inputs.at[:, 0].set(first)

  def scales(steps):
    s = guidance_scale
    if s.ndim == 0:
      return s
    index = jnp.clip(steps[:, None] + jnp.arange(window), 0, num_tokens - 1)
    return s[index][..., None]

  if null_prefix is None:
    _, cache = run(prefix, kv_cache.init_cache(model, batch, cache_len), 0)
    state = split_rows(cache, 1)

    def window_logits(inputs, cache, steps):
      logits, cache = run_rows(inputs[:, None], cache,
                               prefix_len - 1 + steps)
      return logits[:, 0], cache
  elif shift == 0:
    # Conditional and unconditional rows of a sample in one call.
    cache = kv_cache.init_cache(model, 2 * batch, cache_len)
    _, cache = run(jnp.concatenate([prefix, null_prefix]), cache, 0)
    state = split_rows(cache, 2)

    def window_logits(inputs, cache, steps):
      both = jnp.stack([inputs, null_inputs(inputs, steps)], axis=1)
      logits, cache = run_rows(both, cache, prefix_len - 1 + steps)
      return guidance.guided(logits[:, 0], logits[:, 1], scales(steps)), cache
  else:
    _, cond_cache = run(prefix, kv_cache.init_cache(model, batch, cache_len),
                        0)
    _, null_cache = run(null_prefix, kv_cache.init_cache(
        model, batch, cache_len + shift), 0)
    state = (split_rows(cond_cache, 1), split_rows(null_cache, 1))

    def window_logits(inputs, caches, steps):
      position = prefix_len - 1 + steps
      cond, cond_cache = run_rows(inputs[:, None], caches[0], position)
      null, null_cache = run_rows(null_inputs(inputs, steps)[:, None],
                                  caches[1], position + shift)
      return (guidance.guided(cond[:, 0], null[:, 0], scales(steps)),
              (cond_cache, null_cache))

  distribution = functools.partial(
      target_probs, temperature=temperature, greedy=greedy,
      top_k=top_k if use_top_k else None, top_p=top_p if use_top_p else None)
  return jacobi_loop(window_logits, state, prefix[:, -1], num_tokens, window,
                     model.vocab_size, rng, distribution=distribution,
                     verify=verify)


def sample_speculative(model: gpt_lib.GPT, variables: Any, prefix: Array,
                       num_tokens: int, rng: Array, *, window: int,
                       temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, greedy: bool = False,
                       guidance_scale: float | Array | None = None,
                       null_prefix: Array | None = None,
                       return_passes: bool = False,
                       verify: Verify = verify_drafts):
  """Samples like `sampling.sample`, several tokens per forward pass.

  Args:
    model: the GPT (either layer layout).
    variables: {'params': ...} for `model`.
    prefix: int32 (B, Tc) (SOS, class token or conditioning codes).
    num_tokens: tokens to sample; Tc + num_tokens - 1 <= block_size.
    rng: PRNG key (unused draws when greedy).
    window: tokens per forward pass, W >= 1 (static); 1 is plain decoding.
    temperature: see `sampling.sample` (traced).
    top_k: see `sampling.sample` (traced).
    top_p: see `sampling.sample` (traced).
    greedy: argmax at every position.
    guidance_scale: scalar scale, or float32 (num_tokens,) per-token scales
      (`guidance.guidance_scales`); requires `null_prefix`.
    null_prefix: int32 (B, Tn) or (1, Tn) unconditional prefix.
    return_passes: also return the forward passes each row used.
    verify: the acceptance rule; the default, `verify_drafts`, is the one
      that keeps the distribution the model's.

  Returns:
    int32 (B, num_tokens) tokens; with `return_passes`, also int32 (B,)
    forward passes per row (num_tokens / passes tokens per pass).
  """
  prefix = jnp.asarray(prefix, jnp.int32)
  if prefix.ndim != 2 or prefix.shape[1] < 1:
    raise ValueError(f"prefix must be (B, Tc) with Tc >= 1, got "
                     f"{prefix.shape}")
  if int(window) < 1:
    raise ValueError(f"speculative window must be >= 1, got {window}")
  batch, prefix_len = prefix.shape
  if prefix_len + num_tokens - 1 > model.block_size:
    raise ValueError(f"prefix of {prefix_len} + {num_tokens} tokens exceeds "
                     f"block_size {model.block_size}")
  if (guidance_scale is None) != (null_prefix is None):
    raise ValueError("guidance_scale and null_prefix go together")
  if null_prefix is not None:
    null_prefix = jnp.asarray(null_prefix, jnp.int32)
    if null_prefix.shape[0] == 1 and batch > 1:
      null_prefix = jnp.broadcast_to(null_prefix, (batch,)
                                     + null_prefix.shape[1:])
    if null_prefix.shape[1] + num_tokens - 1 > model.block_size:
      raise ValueError("null_prefix + num_tokens exceeds block_size")
    guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
  tokens, passes = _speculative_jit(
      model, variables, prefix, rng if rng is not None else jax.random.key(0),
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(0 if top_k is None else top_k, jnp.int32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      guidance_scale, null_prefix, num_tokens=int(num_tokens),
      window=int(window), greedy=bool(greedy), use_top_k=top_k is not None,
      use_top_p=top_p is not None, verify=verify)
  return (tokens, passes) if return_passes else tokens
