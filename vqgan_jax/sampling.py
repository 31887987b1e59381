"""Autoregressive sampling from the stage-2 GPT.

Everything here is jitted once per static configuration: temperature, top-k,
top-p and the guidance scale are traced values, so changing them between
calls does not recompile (switching top-k or top-p between None and a value
does, as does changing `num_tokens`, the batch or the prefix length).

Layers of the API:
  * `filter_logits` / `sample_logits` (from `vqgan_jax.logit_filters`):
    pure per-step filtering and choice; guidance and its schedules:
    `vqgan_jax.guidance`.
  * `decode_loop`: a pure scan over a `tokens_to_logits(token, state,
    position)` closure (testable with a fake logits function).
  * `sample`: the model sampler; the prefix runs once, then `lax.scan`
    segments decode one token per step over a preallocated key/value cache.
    Each segment's cache buffer only reaches the last position that segment
    writes, so attention never reads far past the filled prefix.

Speculative Jacobi decoding (several tokens per forward pass, same
distribution): `vqgan_jax.speculative`, or `sample(..., speculative_window=W)`.
Token grids larger than the training window: `vqgan_jax.sliding_window`.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from vqgan_jax import gpt as gpt_lib
from vqgan_jax import guidance
from vqgan_jax import kv_cache
from vqgan_jax.keymaps import gpt as gpt_keymap
# The filters live in `logit_filters`; their names stay importable from here.
from vqgan_jax.logit_filters import (  # pylint: disable=unused-import
    _ordered_bits, _per_row, filter_logits, sample_logits, top_k_mask,
    top_p_mask)

Array = jax.Array
TokensToLogits = Callable[[Array, Any, Array], tuple[Array, Any]]


# ----------------------------------------------------------------------------
# The pure decode loop.
# ----------------------------------------------------------------------------


def decode_loop(tokens_to_logits: TokensToLogits, state: Any, logits: Array,
                num_tokens: int, rng: Array, *, start_position: int = 0,
                temperature: Array | float | None = None,
                top_k: Array | int | None = None,
                top_p: Array | float | None = None, greedy: bool = False,
                segments: Sequence[int] | None = None,
                prepare_segment: Callable[[Any, int], Any] | None = None
                ) -> Array:
  """Samples `num_tokens` tokens with `lax.scan`, feeding each one back.

  Token 0 is chosen from `logits`; for t >= 1, token t-1 is fed through
  `tokens_to_logits(token, state, start_position + t - 1)`, which returns the
  logits for token t and the new state. The last token is never fed.

  Args:
    tokens_to_logits: (int32 (B,), state, int32 position) -> ((B, V), state).
    state: initial loop state (e.g. a key/value cache holding the prefix).
    logits: (B, V) logits for the first token.
    num_tokens: number of tokens to sample (static).
    rng: PRNG key; one subkey per token.
    start_position: position at which token 0 is fed.
    temperature: see `filter_logits`.
    top_k: see `filter_logits`.
    top_p: see `filter_logits`.
    greedy: argmax instead of sampling.
    segments: static step counts of consecutive scans (summing to
      num_tokens - 1); default one scan.
    prepare_segment: `(state, segment_index) -> state` run before each
      segment, e.g. to grow a cache buffer.

  Returns:
    int32 (B, num_tokens).
  """
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
  steps = num_tokens - 1
  segments = (steps,) if segments is None else tuple(segments)
  if sum(segments) != steps:
    raise ValueError(f"segments {segments} do not sum to {steps} steps")
  choose = functools.partial(sample_logits, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy)
  keys = jax.random.split(rng, num_tokens)
  first = choose(logits, keys[0])

  def body(carry, key):
    state, token, position = carry
    step_logits, state = tokens_to_logits(token, state, position)
    token = choose(step_logits, key)
    return (state, token, position + 1), token

  carry = (state, first, jnp.asarray(start_position, jnp.int32))
  pieces = [first[:, None]]
  offset = 1
  for index, length in enumerate(segments):
    if length == 0:
      continue
    if prepare_segment is not None:
      carry = (prepare_segment(carry[0], index),) + carry[1:]
    carry, tokens = jax.lax.scan(body, carry, keys[offset:offset + length])
    pieces.append(tokens.T)
    offset += length
  return jnp.concatenate(pieces, axis=1)


def segment_plan(num_steps: int, num_segments: int, prefix_len: int,
                 align: int = 8) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Splits the decode steps into segments and sizes each cache buffer.

  Step s feeds position prefix_len + s, so a segment ending at step b needs
  a buffer of prefix_len + b positions (rounded up to `align`, capped at the
  total length).

  Args:
    num_steps: decode steps (num_tokens - 1).
    num_segments: number of scans (clipped to [1, num_steps]).
    prefix_len: length of the prefix already in the cache.
    align: round buffer lengths up to a multiple of this.

  Returns:
    (step counts, buffer lengths), one entry per segment; both empty when
    there are no steps.
  """
  if num_steps <= 0:
    return (), ()
  n = max(1, min(num_segments, num_steps))
  ends = [round(num_steps * (i + 1) / n) for i in range(n)]
  starts = [0] + ends[:-1]
  total = prefix_len + num_steps
  lengths = tuple(min(total, -(-(prefix_len + e) // align) * align)
                  for e in ends)
  return tuple(e - s for s, e in zip(starts, ends)), lengths


def default_num_segments(num_steps: int) -> int:
  """Segments used by `sample` when not given: up to 4, >= 32 steps each.

  A few segments decode faster than one scan (attention reads shorter
  cache buffers); each segment adds a compiled copy of the step, so more
  than 4 do not pay.
  """
  return max(1, min(4, num_steps // 32))


# ----------------------------------------------------------------------------
# Sampling the model.
# ----------------------------------------------------------------------------


def decoding_model(model: gpt_lib.GPT, variables: Any
                   ) -> tuple[gpt_lib.GPT, Any]:
  """Unrolled-layer, no-remat inference copy of the model and variables."""
  if model.scan_layers:
    variables = dict(variables)
    variables["params"] = gpt_keymap.unstack_layers(variables["params"])
  return model.clone(scan_layers=False, remat=False), variables


_guided = guidance.guided


def _scale_at(scale: Array, step: Array | int) -> Array:
  """The guidance scale of token `step`: `scale` itself when it is a scalar,
  else its entry of a per-token table (`guidance.guidance_scales`)."""
  if scale.ndim == 0:
    return scale
  return scale[jnp.clip(step, 0, scale.shape[0] - 1)]


# XLA command-buffer (CUDA graph) types `sample` compiles with on GPUs:
# XLA's default set plus the decoding loop (WHILE) and its conditionals, so
# that the whole loop is recorded as CUDA graphs (README "Speed" has the
# effect). The option is passed to the sampler's compile only, never
# through XLA_FLAGS (where a value XLA does not know aborts the process).
# Set to () to compile without them.
GPU_COMMAND_BUFFERS = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN",
                       "DYNAMIC_SLICE_FUSION", "CONDITIONAL", "WHILE")
_SAMPLE_STATIC = ("model", "num_tokens", "greedy", "use_top_k", "use_top_p",
                  "num_segments")


def _sample_body(model, variables, prefix, rng, temperature, top_k, top_p,
                 guidance_scale, null_prefix, *, num_tokens, greedy, use_top_k,
                 use_top_p, num_segments):
  """Jitted body of `sample` (see there)."""
  model, variables = decoding_model(model, variables)
  batch, prefix_len = prefix.shape
  seg_steps, seg_lengths = segment_plan(num_tokens - 1, num_segments,
                                        prefix_len)
  first_length = seg_lengths[0] if seg_lengths else prefix_len

  def run(tokens, cache, position):
    return model.apply(variables, tokens, cache=cache, position=position)

  filters = dict(temperature=temperature, greedy=greedy,
                 top_k=top_k if use_top_k else None,
                 top_p=top_p if use_top_p else None)

  if null_prefix is None:
    cache = kv_cache.init_cache(model, batch, first_length)
    logits, cache = run(prefix, cache, 0)

    def tokens_to_logits(token, cache, position):
      step_logits, cache = run(token[:, None], cache, position)
      return step_logits[:, 0], cache

    def prepare(cache, index):
      return kv_cache.resize_cache(cache, seg_lengths[index])

    return decode_loop(tokens_to_logits, cache, logits[:, -1], num_tokens,
                       rng, start_position=prefix_len, segments=seg_steps,
                       prepare_segment=prepare, **filters)

  null_len = null_prefix.shape[1]
  if null_len == prefix_len:
    # One batch of 2B rows: conditional rows first, unconditional after.
    cache = kv_cache.init_cache(model, 2 * batch, first_length)
    logits, cache = run(jnp.concatenate([prefix, null_prefix]), cache, 0)
    first = _guided(logits[:batch, -1], logits[batch:, -1],
                    _scale_at(guidance_scale, 0))

    def tokens_to_logits(token, cache, position):
      both = jnp.concatenate([token, token])[:, None]
      step_logits, cache = run(both, cache, position)
      step_logits = step_logits[:, 0]
      return _guided(step_logits[:batch], step_logits[batch:],
                     _scale_at(guidance_scale, position - prefix_len + 1)
                     ), cache

    def prepare(cache, index):
      return kv_cache.resize_cache(cache, seg_lengths[index])
  else:
    # Prefixes of different lengths sit at different positions: two caches.
    shift = null_len - prefix_len
    null_first = first_length + shift
    cond_cache = kv_cache.init_cache(model, batch, first_length)
    null_cache = kv_cache.init_cache(model, batch, null_first)
    cond_logits, cond_cache = run(prefix, cond_cache, 0)
    null_logits, null_cache = run(null_prefix, null_cache, 0)
    first = _guided(cond_logits[:, -1], null_logits[:, -1],
                    _scale_at(guidance_scale, 0))
    cache = (cond_cache, null_cache)

    def tokens_to_logits(token, caches, position):
      cond_logits, cond_cache = run(token[:, None], caches[0], position)
      null_logits, null_cache = run(token[:, None], caches[1],
                                    position + shift)
      scale = _scale_at(guidance_scale, position - prefix_len + 1)
      return (_guided(cond_logits[:, 0], null_logits[:, 0], scale),
              (cond_cache, null_cache))

    def prepare(caches, index):
      return (kv_cache.resize_cache(caches[0], seg_lengths[index]),
              kv_cache.resize_cache(caches[1], seg_lengths[index] + shift))

  return decode_loop(tokens_to_logits, cache, first, num_tokens, rng,
                     start_position=prefix_len, segments=seg_steps,
                     prepare_segment=prepare, **filters)


_sample_jit = jax.jit(_sample_body, static_argnames=_SAMPLE_STATIC)


class _SamplerJits:
  """`_sample_body` compiled with or without command buffers.

  Holds one jit per tuple of command-buffer types, and the tuples XLA
  rejected: if XLA rejects a value, the call compiles without command
  buffers, and this object does not try that tuple again. `sample` uses one
  instance for the process (what this XLA accepts does not change while it
  runs); another instance starts with no such memory.
  """

  def __init__(self):
    self._jits: dict[tuple[str, ...], Callable[..., Array]] = {}
    self.rejected: set[tuple[str, ...]] = set()

  def types(self, backend: str | None = None) -> tuple[str, ...] | None:
    """The command-buffer types to compile with (`GPU_COMMAND_BUFFERS` on
    GPUs unless rejected), or None."""
    types = tuple(GPU_COMMAND_BUFFERS)
    backend = jax.default_backend() if backend is None else backend
    if not types or backend != "gpu" or types in self.rejected:
      return None
    return types

  def __call__(self, types: tuple[str, ...] | None, *args, **kwargs
               ) -> Array:
    """`_sample_jit`, compiled with command buffers `types` when given."""
    if types is None:
      return _sample_jit(*args, **kwargs)
    if types not in self._jits:
      self._jits[types] = jax.jit(
          _sample_body, static_argnames=_SAMPLE_STATIC,
          compiler_options={"xla_gpu_enable_command_buffer": ",".join(types)})
    try:
      return self._jits[types](*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
      if "xla_gpu_enable_command_buffer" not in str(e):
        raise
      self.rejected.add(types)
      logging.warning("XLA rejected command buffers %s (%s); sampling "
                      "without them", ",".join(types), str(e).splitlines()[0])
      return _sample_jit(*args, **kwargs)


_SAMPLER_JITS = _SamplerJits()


def _as_key(rng: Array) -> Array:
  return rng if rng is not None else jax.random.key(0)


def sample(model: gpt_lib.GPT, variables: Any, prefix: Array, num_tokens: int,
           rng: Array, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False,
           guidance_scale: float | None = None,
           null_prefix: Array | None = None,
           guidance_schedule: str = "constant", guidance_power: float = 2.0,
           guidance_interval: Sequence[float] | None = None,
           num_segments: int | None = None,
           speculative_window: int = 0) -> Array:
  """Samples `num_tokens` tokens after `prefix` with a key/value cache.

  The prefix runs through the model once; then each step feeds the previous
  token at position (number of cached tokens) inside `lax.scan` segments.
  On GPUs the call compiles with XLA command buffers (`GPU_COMMAND_BUFFERS`).
  With `speculative_window` W > 0, speculative Jacobi decoding
  (`vqgan_jax.speculative`) verifies W tokens per forward pass instead; the
  tokens follow the same distribution (the same tokens when greedy).

  Args:
    model: the GPT (either layer layout).
    variables: {'params': ...} for `model`.
    prefix: int32 (B, Tc), Tc >= 1 (SOS, class token or conditioning codes).
    num_tokens: tokens to sample; Tc + num_tokens - 1 <= block_size.
    rng: PRNG key (unused when greedy).
    temperature: logits are divided by it (traced: no recompilation).
    top_k: keep logits >= the k-th largest; None disables (traced value).
    top_p: nucleus filtering after top-k; None disables (traced value).
    greedy: take the argmax at every step.
    guidance_scale: classifier-free guidance scale s; logits become
      uncond + s * (cond - uncond). Requires `null_prefix`.
    null_prefix: int32 (B, Tn) or (1, Tn) unconditional prefix.
    guidance_schedule: how the scale varies over the tokens
      (`guidance.SCHEDULES`: 'constant', 'linear', 'power', 'cosine'; see
      `guidance.guidance_scales`).
    guidance_power: exponent of the 'power' schedule.
    guidance_interval: (a, b): guide only the tokens whose progress
      t / (num_tokens - 1) lies in [a, b] (scale 1 elsewhere).
    num_segments: number of scan segments (static); default
      `default_num_segments(num_tokens - 1)`.
    speculative_window: 0 for one token per step; W >= 1 for speculative
      Jacobi decoding with windows of W tokens (static).

  Returns:
    int32 (B, num_tokens) sampled tokens (the prefix is not included).
  """
  prefix = jnp.asarray(prefix, jnp.int32)
  if prefix.ndim != 2 or prefix.shape[1] < 1:
    raise ValueError(f"prefix must be (B, Tc) with Tc >= 1, got "
                     f"{prefix.shape}")
  batch, prefix_len = prefix.shape
  if prefix_len + num_tokens - 1 > model.block_size:
    raise ValueError(f"prefix of {prefix_len} + {num_tokens} tokens exceeds "
                     f"block_size {model.block_size}")
  if (guidance_scale is None) != (null_prefix is None):
    raise ValueError("guidance_scale and null_prefix go together")
  guidance.check_schedule(guidance_schedule, guidance_power,
                          guidance_interval)
  if null_prefix is not None:
    null_prefix = jnp.asarray(null_prefix, jnp.int32)
    if null_prefix.shape[0] == 1 and batch > 1:
      null_prefix = jnp.broadcast_to(null_prefix, (batch,)
                                     + null_prefix.shape[1:])
    if null_prefix.shape[1] + num_tokens - 1 > model.block_size:
      raise ValueError("null_prefix + num_tokens exceeds block_size")
    if guidance.is_constant(guidance_schedule, guidance_interval):
      guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
    else:
      guidance_scale = jnp.asarray(guidance.guidance_scales(
          guidance_scale, num_tokens, guidance_schedule, guidance_power,
          guidance_interval))
  if speculative_window:
    from vqgan_jax import speculative  # pylint: disable=import-outside-toplevel
    return speculative.sample_speculative(
        model, variables, prefix, num_tokens, rng, window=speculative_window,
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
        guidance_scale=guidance_scale, null_prefix=null_prefix)
  if num_segments is None:
    num_segments = default_num_segments(num_tokens - 1)
  return _SAMPLER_JITS(
      _SAMPLER_JITS.types(), model, variables, prefix, _as_key(rng),
      jnp.asarray(temperature, jnp.float32),
      jnp.asarray(0 if top_k is None else top_k, jnp.int32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
      guidance_scale, null_prefix, num_tokens=int(num_tokens),
      greedy=bool(greedy), use_top_k=top_k is not None,
      use_top_p=top_p is not None, num_segments=int(num_segments))
