"""The stage-2 transformer: a minGPT-style decoder in Flax (linen).

`GPT` computes the same function as the reference minGPT used inside
`Net2NetTransformer`: pre-LN blocks, exact (erf) GELU, LayerNorm eps 1e-5,
separate query/key/value/proj projections, a learned zero-initialised
position embedding, an output head without bias and an optional block of
`n_unmasked` leading positions that attend to each other bidirectionally.

Submodule names mirror the reference state dict, so converting a checkpoint
is a rename plus transposes (`params_from_state_dict`):

  tok_emb.weight            -> tok_emb/embedding
  pos_emb                   -> pos_emb
  blocks.{i}.ln1.weight     -> blocks_{i}/ln1/scale      (bias -> bias)
  blocks.{i}.attn.query.*   -> blocks_{i}/attn/query/kernel (transposed), bias
  blocks.{i}.mlp.0.*        -> blocks_{i}/mlp/fc1/...
  blocks.{i}.mlp.2.*        -> blocks_{i}/mlp/fc2/...
  ln_f.*                    -> ln_f/...
  head.weight               -> head/kernel (transposed)

With `scan_layers=True` the per-layer parameters are stacked along a leading
axis of length `n_layer` under one `blocks` collection (`stack_layers` and
`unstack_layers` switch between the layouts).

Decoding with a key/value cache: `init_cache(model, batch, length)` creates
zeros of layout (B, n_head, length, head_dim) per layer; calling the model
with `cache=` and `position=` writes the new keys/values at
`[position, position + T)` and attends over the whole cache buffer, masking
positions that are not filled yet. Callers choose the buffer length, so a
sampler can grow it in segments and never read far past the filled part.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np
import optax

Array = jax.Array
Params = Any
Cache = dict

_INIT = nn.initializers.normal(stddev=0.02)
_LN_EPS = 1e-5

# GPT fields that a reference `transformer_config.params` can set, with the
# reference's defaults.
_REFERENCE_DEFAULTS = {
    "n_layer": 12,
    "n_head": 8,
    "n_embd": 256,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "n_unmasked": 0,
}


# ----------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------


def attention_mask(query_pos: Array, key_pos: Array, n_unmasked: int,
                   num_filled: Array | int | None = None) -> Array:
  """Boolean attention mask of the reference minGPT.

  A query attends to keys at or before its own position; additionally the
  first `n_unmasked` positions all see each other.

  Args:
    query_pos: int (T,) positions of the queries.
    key_pos: int (S,) positions of the keys.
    n_unmasked: size of the leading bidirectional block.
    num_filled: if given, keys at positions >= num_filled are masked (cache
      slots that hold no key yet).

  Returns:
    bool (T, S), True where attention is allowed.
  """
  q = query_pos[:, None]
  k = key_pos[None, :]
  mask = k <= q
  if n_unmasked > 0:
    mask = mask | ((k < n_unmasked) & (q < n_unmasked))
  if num_filled is not None:
    mask = mask & (k < num_filled)
  return mask


def _explicit_attention(q: Array, k: Array, v: Array, mask: Array,
                        dropout: nn.Module | None = None,
                        deterministic: bool = True) -> Array:
  """Softmax attention with (B, H, T, D) queries and (B, H, S, D) keys/values.

  Scores and softmax are float32 whatever the input dtype.

  Args:
    q: (B, H, T, D) queries.
    k: (B, H, S, D) keys.
    v: (B, H, S, D) values.
    mask: bool, broadcastable to (B, H, T, S).
    dropout: optional dropout module applied to the attention weights.
    deterministic: disables dropout.

  Returns:
    (B, H, T, D) attention output in v's dtype.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bhtd,bhsd->bhts", q, k,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  return jnp.einsum("bhts,bhsd->bhtd", weights.astype(v.dtype), v)


def _half_precision(dtype: Any) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _library_attention(q: Array, k: Array, v: Array, n_unmasked: int,
                       implementation: str | None, dtype: Any) -> Array:
  """Full-sequence causal attention through `jax.nn.dot_product_attention`.

  Args:
    q: (B, T, H, D) queries; k, v likewise.
    k: (B, T, H, D) keys.
    v: (B, T, H, D) values.
    n_unmasked: size of the leading bidirectional block (custom mask if > 0).
    implementation: passed to `jax.nn.dot_product_attention`; None picks
      'cudnn' on GPU for half precision (falling back to XLA when cuDNN
      refuses the shapes) and XLA elsewhere.
    dtype: compute dtype.

  Returns:
    (B, T, H, D) attention output.
  """
  t = q.shape[1]
  if n_unmasked > 0:
    pos = jnp.arange(t)
    kwargs = dict(mask=attention_mask(pos, pos, n_unmasked)[None, None])
  else:
    kwargs = dict(is_causal=True)
  if implementation is not None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                        **kwargs)
  if jax.default_backend() == "gpu" and _half_precision(dtype):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn",
                                          **kwargs)
    except Exception:  # pylint: disable=broad-except
      pass  # unsupported shape / mask / cuDNN version: use XLA below
  return jax.nn.dot_product_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------
# Rotary position embeddings (an option; the reference uses `pos_emb`).
# ----------------------------------------------------------------------------

POSITION_EMBEDDINGS = ("learned", "rope", "rope2d")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")
# What a rematerialised block keeps from its forward pass for the backward
# pass (everything else is recomputed):
#   'full': nothing but the block's input (least memory, one extra forward);
#   'attention': also the attention output of every layer, so the attention
#     (the costly part at long sequences) is not run again;
#   'dots': also every projection's output (q, k, v, proj, the MLP's
#     matmuls); norms, activations and attention are recomputed.
REMAT_POLICIES = ("full", "attention", "dots")


def checkpoint_policy(name: str):
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name."""
  policies = jax.checkpoint_policies
  if name == "full":
    return policies.nothing_saveable
  if name == "attention":
    return policies.save_only_these_names("attention_out")
  if name == "dots":
    return policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"GPT remat_policy={name!r}; valid: {REMAT_POLICIES}")


def rope_frequencies(dim: int, base: float = 10000.0) -> Array:
  """Angular frequencies ``base ** (-2i / dim)``, i < dim // 2 (float32)."""
  return 1.0 / (base**(jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim))


def grid_positions(positions: Array, grid_width: int,
                   prefix_len: int) -> tuple[Array, Array]:
  """(row, column) of each sequence position for 2D rotary embeddings.

  The sequence is ``[prefix (prefix_len tokens) | image tokens in raster
  order]``. Image token n sits at (n // grid_width + 1, n % grid_width);
  prefix token j sits on row 0 at column j, a row above the image, so every
  prefix/image pair has its own offset and image pairs depend only on their
  (d_row, d_col).

  Args:
    positions: int (T,) absolute sequence positions.
    grid_width: tokens per image row.
    prefix_len: number of conditioning tokens before the image.

  Returns:
    (rows, cols), int32 (T,) each.
  """
  s = jnp.asarray(positions, jnp.int32)
  n = s - prefix_len
  image = n >= 0
  rows = jnp.where(image, n // grid_width + 1, 0)
  cols = jnp.where(image, n % grid_width, s)
  return rows, cols


def rope_angles(positions: Array, head_dim: int, base: float = 10000.0, *,
                grid_width: int | None = None, prefix_len: int = 0) -> Array:
  """Rotation angles (T, head_dim // 2) for 1D or 2D rotary embeddings.

  1D: angle[t, i] = positions[t] * freq_i over head_dim. 2D (with
  `grid_width`): the first half of the angles rotate by the token's row,
  the second half by its column (`grid_positions`), each with the
  frequencies of a head_dim / 2 rotary embedding.

  Args:
    positions: int (T,) absolute sequence positions.
    head_dim: per-head width D (even; divisible by 4 for 2D).
    base: frequency base.
    grid_width: image grid width for 2D; None for 1D.
    prefix_len: conditioning tokens before the image (2D only).

  Returns:
    float32 (T, head_dim // 2).
  """
  pos = jnp.asarray(positions, jnp.int32)
  if grid_width is None:
    return pos[:, None].astype(jnp.float32) * rope_frequencies(head_dim, base)
  rows, cols = grid_positions(pos, grid_width, prefix_len)
  freqs = rope_frequencies(head_dim // 2, base)
  return jnp.concatenate([rows[:, None].astype(jnp.float32) * freqs,
                          cols[:, None].astype(jnp.float32) * freqs], axis=-1)


def apply_rope(x: Array, angles: Array) -> Array:
  """Rotates feature pairs (i, i + D/2) of `x` by `angles[t, i]`.

  Args:
    x: (B, T, H, D) queries or keys.
    angles: (T, D // 2) angles (`rope_angles`).

  Returns:
    (B, T, H, D) in x's dtype (rotation computed in float32).
  """
  half = x.shape[-1] // 2
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head masked self-attention with separate q/k/v/proj projections.

  With `position_embedding` 'rope' / 'rope2d' the queries and keys are
  rotated by their absolute sequence position (`position + t`, also when
  decoding with a cache) before attention.
  """
  n_head: int
  n_embd: int
  n_unmasked: int = 0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  deterministic: bool = True
  position_embedding: str = "learned"
  rope_base: float = 10000.0
  rope_grid: tuple = ()
  rope_prefix: int = 1

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None = None,
               position: Array | None = None) -> tuple[Array, Cache | None]:
    """Attends over `x` (and the cache, when given).

    Args:
      x: (B, T, C) inputs.
      cache: None, or {'k', 'v'} of (B, H, S, D); the new keys/values are
        written at [position, position + T).
      position: int scalar, absolute position of x[:, 0] (cache mode only).

    Returns:
      (B, T, C) output and the updated cache (None without a cache).
    """
    b, t, c = x.shape
    h = self.n_head
    d = c // h
    dense = functools.partial(nn.Dense, c, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=_INIT,
                              bias_init=nn.initializers.zeros)
    q = dense(name="query")(x).reshape(b, t, h, d)
    k = dense(name="key")(x).reshape(b, t, h, d)
    v = dense(name="value")(x).reshape(b, t, h, d)
    if self.position_embedding in ("rope", "rope2d"):
      start_pos = jnp.zeros((), jnp.int32) if position is None else position
      grid_w = (self.rope_grid[1] if self.position_embedding == "rope2d"
                else None)
      angles = rope_angles(start_pos + jnp.arange(t), d, self.rope_base,
                           grid_width=grid_w, prefix_len=self.rope_prefix)
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    drop = None
    if self.attn_pdrop > 0 and not self.deterministic:
      drop = nn.Dropout(self.attn_pdrop)

    if cache is not None:
      to_bhtd = lambda a: a.transpose(0, 2, 1, 3)
      q, k, v = to_bhtd(q), to_bhtd(k), to_bhtd(v)
      zero = jnp.zeros((), jnp.int32)
      start = (zero, zero, position.astype(jnp.int32), zero)
      k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(
          cache["k"].dtype), start)
      v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(
          cache["v"].dtype), start)
      s = k_all.shape[2]
      mask = attention_mask(position + jnp.arange(t), jnp.arange(s),
                            self.n_unmasked, num_filled=position + t)
      y = _explicit_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                              mask, drop, self.deterministic)
      y = y.transpose(0, 2, 1, 3)
      cache = {"k": k_all, "v": v_all}
    elif drop is not None:
      pos = jnp.arange(t)
      mask = attention_mask(pos, pos, self.n_unmasked)
      to_bhtd = lambda a: a.transpose(0, 2, 1, 3)
      y = _explicit_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), mask, drop,
                              self.deterministic).transpose(0, 2, 1, 3)
    else:
      y = _library_attention(q, k, v, self.n_unmasked, self.attention_impl,
                             self.dtype)
    # A name for the 'attention' remat policy; the identity otherwise.
    y = checkpoint_name(y.reshape(b, t, c), "attention_out")
    y = dense(name="proj")(y)
    y = nn.Dropout(self.resid_pdrop)(y, deterministic=self.deterministic)
    return y, cache


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_jvp
def gelu_exact(x: Array) -> Array:
  """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, with a lean
  derivative.

  The values are `jax.nn.gelu`'s, bit for bit. Differentiating that
  function by autodiff keeps three tensors of the MLP's 4d-wide activations
  for the backward pass (`0.5 x`, `erfc(-x/sqrt 2)` and `exp(-x^2/2)`) and
  computes them in the activations' dtype, constants included (in
  bfloat16, 1/sqrt 2 becomes 0.707 and 2/sqrt pi 1.125). Here the
  derivative `Phi(x) + x phi(x)` is recomputed in the backward pass from
  `x` alone, in float32: one saved tensor instead of three, less memory
  traffic in the element-wise kernels around it, and a bfloat16 gradient
  nearer the float32 one. XLA's memory plan for the training step of the
  24 x 1024 GPT at batch 16 x 512 tokens, compiled on a CPU, fell from
  43.0 to 37.0 GiB in float32 and from 38.5 to 35.5 GiB in bfloat16
  (`python -m benchmarks.probes.stage2_memory_plan` compares the step with and
  without the lean GELU and norms). Forward-mode autodiff works (it is a
  `custom_jvp`).
  """
  return jax.nn.gelu(x, approximate=False)


# Rematerialised (inputs saved, nothing else): reverse mode keeps `x` and
# recomputes the derivative in the backward pass. prevent_cse keeps XLA from
# reusing the forward's erfc there, which would keep it alive instead.
@functools.partial(jax.checkpoint,
                   policy=jax.checkpoint_policies.nothing_saveable)
def _gelu_exact_tangent(x: Array, t: Array) -> Array:
  xf = x.astype(jnp.float32)
  slope = (0.5 * jax.lax.erfc(-xf * _SQRT_HALF)
           + xf * jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI)
  return (t.astype(jnp.float32) * slope).astype(t.dtype)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return gelu_exact(x), _gelu_exact_tangent(x, t)


class MLP(nn.Module):
  """Linear(d, 4d) -> GELU -> Linear(4d, d) -> dropout.

  The reference's GELU is the exact one (erf; `gelu_exact`, whose backward
  pass keeps one tensor instead of three); `approximate=True` uses the tanh
  form of GPT-2 (same parameters, outputs within ~1e-3).
  """
  n_embd: int
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = True
  approximate: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=_INIT,
                              bias_init=nn.initializers.zeros)
    x = dense(4 * self.n_embd, name="fc1")(x)
    x = (nn.gelu(x, approximate=True) if self.approximate
         else gelu_exact(x))
    x = dense(self.n_embd, name="fc2")(x)
    return nn.Dropout(self.resid_pdrop)(x, deterministic=self.deterministic)


def swiglu_hidden(n_embd: int) -> int:
  """SwiGLU width: 8/3 * n_embd rounded up to a multiple of 8, so that its
  three matrices hold about as many weights as the GELU MLP's two."""
  return -(-8 * n_embd // 24) * 8


class SwiGLU(nn.Module):
  """Gated MLP without biases: down(silu(gate(x)) * up(x)) -> dropout."""
  n_embd: int
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=_INIT)
    hidden = swiglu_hidden(self.n_embd)
    y = nn.silu(dense(hidden, name="gate")(x)) * dense(hidden, name="up")(x)
    y = dense(self.n_embd, name="down")(y)
    return nn.Dropout(self.resid_pdrop)(y, deterministic=self.deterministic)


# Lean norms: the backward pass keeps a norm's input (in the compute dtype)
# and recomputes its float32 statistics, where autodiff of flax's norms keeps
# three float32 tensors of the residual stream's size per norm. Values and
# gradients are flax's. XLA's memory plan for the training step of the
# 24 x 1024 GPT at batch 16 x 512 tokens (no remat, compiled on a CPU) fell
# from 35.5 to 33.2 GiB in bfloat16 and from 37.0 to 33.9 GiB in float32;
# the CPU step time did not change (12 x 512 GPT, float32). Not used inside
# a rematerialised block (`Block.lean_norms`): there the remat policy decides
# what is kept, and in unrolled layers the nested checkpoint let XLA merge
# the block's recomputation into its forward pass (remat_policy='full'
# then saved no memory).
@functools.partial(jax.checkpoint, static_argnums=(0,),
                   policy=jax.checkpoint_policies.nothing_saveable)
def _apply_norm(module: nn.Module, params: Params, x: Array) -> Array:
  return module.apply({"params": params}, x)


class _LeanNorm(nn.Module):
  """A flax norm (`kind` 'layernorm' or 'rmsnorm') with the same parameters
  and values, whose backward pass keeps only its input (above)."""
  kind: str
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    params = {"scale": self.param("scale", nn.initializers.ones, (d,),
                                  self.param_dtype)}
    if self.kind == "layernorm":
      params["bias"] = self.param("bias", nn.initializers.zeros, (d,),
                                  self.param_dtype)
      norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype)
    else:
      norm = nn.RMSNorm(epsilon=self.epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype)
    return _apply_norm(norm, params, x)


def _norm(kind: str, dtype: Any, param_dtype: Any, name: str,
          lean: bool = True) -> nn.Module:
  """The reference's LayerNorm (eps 1e-5) or RMSNorm (eps 1e-6, scale only).

  `lean`: keep only the input for the backward pass (`_LeanNorm`); flax's
  module otherwise (same parameters and values).
  """
  if kind not in NORMS:
    raise ValueError(f"norm={kind!r}; valid: {NORMS}")
  eps = _LN_EPS if kind == "layernorm" else 1e-6
  if lean:
    return _LeanNorm(kind, eps, dtype, param_dtype, name=name)
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      name=name)
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x)).

  The reference block by default; `norm='rmsnorm'`, `mlp='swiglu'` and
  rotary `position_embedding` give a Llama-style block.
  """
  n_head: int
  n_embd: int
  n_unmasked: int = 0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = None
  deterministic: bool = True
  norm: str = "layernorm"
  mlp: str = "gelu"
  position_embedding: str = "learned"
  rope_base: float = 10000.0
  rope_grid: tuple = ()
  rope_prefix: int = 1
  # Lean norms (`_LeanNorm`) unless the block is rematerialised, where its
  # remat policy decides what is kept (and a checkpoint nested in the
  # unrolled block's lets XLA merge its recomputation into the forward).
  lean_norms: bool = True

  @nn.compact
  def __call__(self, x: Array, cache: Cache | None = None,
               position: Array | None = None) -> tuple[Array, Cache | None]:
    """Applies the block.

    Args:
      x: (B, T, C) residual stream.
      cache: optional per-layer {'k', 'v'} cache.
      position: absolute position of x[:, 0] (cache mode).

    Returns:
      The new residual stream and the updated cache (or None).
    """
    norm = functools.partial(_norm, self.norm, self.dtype, self.param_dtype,
                             lean=self.lean_norms)
    y, cache = CausalSelfAttention(
        n_head=self.n_head, n_embd=self.n_embd, n_unmasked=self.n_unmasked,
        attn_pdrop=self.attn_pdrop, resid_pdrop=self.resid_pdrop,
        dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, deterministic=self.deterministic,
        position_embedding=self.position_embedding, rope_base=self.rope_base,
        rope_grid=self.rope_grid, rope_prefix=self.rope_prefix,
        name="attn")(norm("ln1")(x), cache, position)
    x = x + y
    if self.mlp == "swiglu":
      mlp = SwiGLU(self.n_embd, self.resid_pdrop, self.dtype,
                   self.param_dtype, self.deterministic, name="mlp")
    else:
      mlp = MLP(self.n_embd, self.resid_pdrop, self.dtype, self.param_dtype,
                self.deterministic, approximate=self.mlp == "gelu_tanh",
                name="mlp")
    x = x + mlp(norm("ln2")(x))
    return x, cache


class GPT(nn.Module):
  """minGPT decoder; `apply(variables, tokens)` -> float32 logits (B, T, V).

  Attributes:
    vocab_size: number of token ids (class ids, SOS and codes share it).
    block_size: maximum sequence length (size of `pos_emb`).
    n_layer: number of blocks.
    n_head: attention heads (n_embd must divide evenly).
    n_embd: width of the residual stream.
    embd_pdrop: dropout after the embeddings.
    resid_pdrop: dropout on each block's attention and MLP outputs.
    attn_pdrop: dropout on the attention weights.
    n_unmasked: leading positions that attend bidirectionally to each other.
    dtype: compute dtype (logits are float32 regardless).
    param_dtype: parameter dtype.
    remat: rematerialise each block in the backward pass.
    remat_policy: what a rematerialised block keeps (`REMAT_POLICIES`).
    scan_layers: run the blocks with `nn.scan` (stacked parameters).
    attention_impl: `implementation` for `jax.nn.dot_product_attention`.
    norm: 'layernorm' (reference) or 'rmsnorm' (blocks and `ln_f`).
    mlp: 'gelu' (reference, exact GELU), 'gelu_tanh' (the same MLP with
      GPT-2's tanh GELU; loads 'gelu' parameters) or 'swiglu' (`SwiGLU`).
    position_embedding: 'learned' (the reference's `pos_emb`), 'rope' (1D
      rotary over the sequence) or 'rope2d' (rotary over the image grid's
      rows and columns, see `grid_positions`; needs `rope_grid`). Rotary
      models have no `pos_emb` parameter.
    rope_base: rotary frequency base.
    rope_grid: (h, w) image token grid, raster order ('rope2d').
    rope_prefix: conditioning tokens before the image ('rope2d').
    zero_head: initialise the output head to zero (uniform logits at init).
  """
  vocab_size: int
  block_size: int
  n_layer: int
  n_head: int
  n_embd: int
  embd_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  n_unmasked: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False
  attention_impl: str | None = None
  norm: str = "layernorm"
  mlp: str = "gelu"
  position_embedding: str = "learned"
  rope_base: float = 10000.0
  rope_grid: tuple = ()
  rope_prefix: int = 1
  zero_head: bool = False

  def _block_kwargs(self, deterministic: bool) -> dict:
    return dict(n_head=self.n_head, n_embd=self.n_embd,
                n_unmasked=self.n_unmasked, attn_pdrop=self.attn_pdrop,
                resid_pdrop=self.resid_pdrop, dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                deterministic=deterministic, norm=self.norm, mlp=self.mlp,
                position_embedding=self.position_embedding,
                rope_base=self.rope_base, rope_grid=tuple(self.rope_grid),
                rope_prefix=self.rope_prefix, lean_norms=not self.remat)

  def _check_options(self) -> None:
    """Raises on option values that cannot work, naming the field."""
    for field, value, valid in (
        ("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
        ("position_embedding", self.position_embedding,
         POSITION_EMBEDDINGS), ("remat_policy", self.remat_policy,
                                REMAT_POLICIES)):
      if value not in valid:
        raise ValueError(f"GPT {field}={value!r}; valid: {valid}")
    head_dim = self.n_embd // self.n_head
    if self.position_embedding == "rope" and head_dim % 2:
      raise ValueError(f"position_embedding='rope' needs an even head width; "
                       f"n_embd / n_head = {head_dim}")
    if self.position_embedding == "rope2d":
      if head_dim % 4:
        raise ValueError("position_embedding='rope2d' needs a head width "
                         f"divisible by 4; n_embd / n_head = {head_dim}")
      if len(self.rope_grid) != 2:
        raise ValueError("position_embedding='rope2d' needs rope_grid=(h, w),"
                         f" the image token grid; got {self.rope_grid!r}")

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True,
               cache: Cache | None = None, position: Array | int = 0):
    """Runs the model.

    Args:
      tokens: int (B, T) token ids.
      deterministic: disables dropout (pass False and a 'dropout' rng to
        train).
      cache: None for a plain forward pass; otherwise a cache from
        `init_cache` whose keys/values at positions < `position` are filled.
      position: absolute position of tokens[:, 0]; only used with a cache.

    Returns:
      float32 logits (B, T, vocab_size) without a cache; with a cache, the
      tuple (logits, updated cache).
    """
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} is not divisible by "
                       f"n_head={self.n_head}")
    _, t = tokens.shape
    if t > self.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size "
                       f"{self.block_size}")
    self._check_options()
    x = nn.Embed(self.vocab_size, self.n_embd, dtype=self.dtype,
                 param_dtype=self.param_dtype, embedding_init=_INIT,
                 name="tok_emb")(tokens)
    position = jnp.asarray(position, jnp.int32)
    if self.position_embedding == "learned":
      pos_emb = self.param("pos_emb", nn.initializers.zeros,
                           (1, self.block_size, self.n_embd),
                           self.param_dtype)
      if cache is None:
        pe = pos_emb[:, :t]
      else:
        pe = jax.lax.dynamic_slice_in_dim(pos_emb, position, t, axis=1)
      x = x + pe
    x = x.astype(self.dtype)
    x = nn.Dropout(self.embd_pdrop)(x, deterministic=deterministic)

    block_cls = Block
    if self.remat:
      block_cls = nn.remat(Block, prevent_cse=not self.scan_layers,
                           policy=checkpoint_policy(self.remat_policy))
    kwargs = self._block_kwargs(deterministic)
    new_cache = None
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast), length=self.n_layer)
      layer_cache = None if cache is None else cache["blocks"]
      x, layer_cache = scanned(**kwargs, name="blocks")(x, layer_cache,
                                                        position)
      if cache is not None:
        new_cache = {"blocks": layer_cache}
    else:
      new_cache = {} if cache is not None else None
      for i in range(self.n_layer):
        name = f"blocks_{i}"
        layer_cache = None if cache is None else cache[name]
        x, layer_cache = block_cls(**kwargs, name=name)(x, layer_cache,
                                                        position)
        if cache is not None:
          new_cache[name] = layer_cache

    x = _norm(self.norm, jnp.float32, self.param_dtype, "ln_f")(x)
    head_init = nn.initializers.zeros if self.zero_head else _INIT
    logits = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                      param_dtype=self.param_dtype, kernel_init=head_init,
                      name="head")(x.astype(jnp.float32))
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, new_cache


# ----------------------------------------------------------------------------
# Key/value cache.
# ----------------------------------------------------------------------------


def init_cache(model: GPT, batch_size: int, length: int,
               dtype: Any = None) -> Cache:
  """Zero key/value cache for `model`.

  Args:
    model: the GPT.
    batch_size: batch size B.
    length: number of positions S the buffer holds (<= block_size).
    dtype: cache dtype; defaults to the model's compute dtype.

  Returns:
    {'blocks_{i}': {'k', 'v'}} of (B, n_head, S, head_dim) or, with
    `scan_layers`, {'blocks': {'k', 'v'}} of (n_layer, B, n_head, S, head_dim).
  """
  dtype = model.dtype if dtype is None else dtype
  shape = (batch_size, model.n_head, length, model.n_embd // model.n_head)
  if model.scan_layers:
    shape = (model.n_layer,) + shape
    return {"blocks": {"k": jnp.zeros(shape, dtype),
                       "v": jnp.zeros(shape, dtype)}}
  return {f"blocks_{i}": {"k": jnp.zeros(shape, dtype),
                          "v": jnp.zeros(shape, dtype)}
          for i in range(model.n_layer)}


def cache_length(cache: Cache) -> int:
  """Number of positions a cache buffer holds."""
  return jax.tree_util.tree_leaves(cache)[0].shape[-2]


def resize_cache(cache: Cache, length: int) -> Cache:
  """Grows (zero-pads) or truncates a cache buffer to `length` positions.

  Args:
    cache: a cache from `init_cache`.
    length: the new number of positions.

  Returns:
    The cache with its sequence axis (-2) of size `length`.
  """
  def fix(a):
    s = a.shape[-2]
    if length >= s:
      pad = [(0, 0)] * a.ndim
      pad[-2] = (0, length - s)
      return jnp.pad(a, pad)
    return jax.lax.slice_in_dim(a, 0, length, axis=a.ndim - 2)
  return jax.tree_util.tree_map(fix, cache)


# ----------------------------------------------------------------------------
# Conversion from the reference and between layer layouts.
# ----------------------------------------------------------------------------

# torch suffix -> (flax path inside the block, transpose?)
_LAYER_MAP = {
    "ln1.weight": (("ln1", "scale"), False),
    "ln1.bias": (("ln1", "bias"), False),
    "ln2.weight": (("ln2", "scale"), False),
    "ln2.bias": (("ln2", "bias"), False),
    "mlp.0.weight": (("mlp", "fc1", "kernel"), True),
    "mlp.0.bias": (("mlp", "fc1", "bias"), False),
    "mlp.2.weight": (("mlp", "fc2", "kernel"), True),
    "mlp.2.bias": (("mlp", "fc2", "bias"), False),
}
for _name in ("query", "key", "value", "proj"):
  _LAYER_MAP[f"attn.{_name}.weight"] = (("attn", _name, "kernel"), True)
  _LAYER_MAP[f"attn.{_name}.bias"] = (("attn", _name, "bias"), False)

_TOP_MAP = {
    "tok_emb.weight": (("tok_emb", "embedding"), False),
    "pos_emb": (("pos_emb",), False),
    "ln_f.weight": (("ln_f", "scale"), False),
    "ln_f.bias": (("ln_f", "bias"), False),
    "head.weight": (("head", "kernel"), True),
}

# Buffers in the reference state dict that are not parameters.
_IGNORED_SUFFIXES = (".attn.mask",)


def _torch_shapes(vocab: int, block: int, width: int,
                  n_layer: int) -> dict[str, tuple[int, ...]]:
  """Expected reference (torch-layout) shapes of every parameter."""
  shapes = {
      "tok_emb.weight": (vocab, width),
      "pos_emb": (1, block, width),
      "ln_f.weight": (width,),
      "ln_f.bias": (width,),
      "head.weight": (vocab, width),
  }
  per_layer = {
      "ln1.weight": (width,), "ln1.bias": (width,),
      "ln2.weight": (width,), "ln2.bias": (width,),
      "mlp.0.weight": (4 * width, width), "mlp.0.bias": (4 * width,),
      "mlp.2.weight": (width, 4 * width), "mlp.2.bias": (width,),
  }
  for name in ("query", "key", "value", "proj"):
    per_layer[f"attn.{name}.weight"] = (width, width)
    per_layer[f"attn.{name}.bias"] = (width,)
  for i in range(n_layer):
    for suffix, shape in per_layer.items():
      shapes[f"blocks.{i}.{suffix}"] = shape
  return shapes


def _select_prefix(state_dict: Mapping[str, Any],
                   prefix: str) -> dict[str, np.ndarray]:
  """Keys under `prefix` with it stripped, or all keys if none carry it."""
  if prefix and any(k.startswith(prefix) for k in state_dict):
    items = {k[len(prefix):]: v for k, v in state_dict.items()
             if k.startswith(prefix)}
  else:
    items = dict(state_dict)
  return {k: v for k, v in items.items()
          if not k.endswith(_IGNORED_SUFFIXES)}


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           prefix: str = "transformer.",
                           scan_layers: bool = False, *,
                           model: GPT | None = None,
                           dtype: Any = jnp.float32) -> Params:
  """Converts a reference minGPT state dict into `GPT` params.

  Args:
    state_dict: name -> array. Either a bare minGPT state dict or a whole
      Net2NetTransformer one (then only keys under `prefix` are used).
    prefix: prefix of the transformer's keys; ignored if no key has it.
    scan_layers: return the stacked layout of `GPT(scan_layers=True)`.
    model: if given, shapes are checked against its fields; otherwise the
      sizes are inferred from `tok_emb.weight`, `pos_emb` and the block
      indices, and every other key is checked for consistency with them.
    dtype: dtype of the returned arrays.

  Returns:
    The params pytree (without the outer {'params': ...}).

  Raises:
    ValueError: listing missing keys, unexpected keys and shape mismatches
      (key, expected shape, found shape).
  """
  sd = {k: np.asarray(v) for k, v in _select_prefix(state_dict,
                                                    prefix).items()}
  if model is not None:
    vocab, block, width, n_layer = (model.vocab_size, model.block_size,
                                    model.n_embd, model.n_layer)
  else:
    if "tok_emb.weight" in sd:
      vocab, width = sd["tok_emb.weight"].shape[:2]
    elif "head.weight" in sd:
      vocab, width = sd["head.weight"].shape[:2]
    else:
      raise ValueError("cannot infer the vocabulary size: the state dict has "
                       "neither 'tok_emb.weight' nor 'head.weight' "
                       f"(prefix {prefix!r}); keys: {sorted(sd)[:20]}")
    block = sd["pos_emb"].shape[1] if "pos_emb" in sd else 0
    layer_ids = [int(m.group(1)) for k in sd
                 if (m := re.match(r"blocks\.(\d+)\.", k))]
    n_layer = max(layer_ids) + 1 if layer_ids else 0
  expected = _torch_shapes(vocab, block, width, n_layer)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  mismatched = [(k, expected[k], tuple(sd[k].shape)) for k in sorted(expected)
                if k in sd and tuple(sd[k].shape) != expected[k]]
  if missing or unexpected or mismatched:
    lines = ["state dict does not match minGPT(vocab_size="
             f"{vocab}, block_size={block}, n_embd={width}, "
             f"n_layer={n_layer}):"]
    if missing:
      lines.append(f"  missing keys: {missing}")
    if unexpected:
      lines.append(f"  unexpected keys: {unexpected}")
    for k, want, got in mismatched:
      lines.append(f"  shape mismatch for {k}: expected {want}, got {got}")
    raise ValueError("\n".join(lines))

  def convert(value, transpose):
    value = value.T if transpose else value
    return jnp.asarray(value, dtype=dtype)

  params: dict = {}
  for key, (path, transpose) in _TOP_MAP.items():
    _set_path(params, path, convert(sd[key], transpose))
  for i in range(n_layer):
    for suffix, (path, transpose) in _LAYER_MAP.items():
      _set_path(params, (f"blocks_{i}",) + path,
                convert(sd[f"blocks.{i}.{suffix}"], transpose))
  if scan_layers:
    params = stack_layers(params, n_layer)
  return params


def stack_layers(params: Params, n_layer: int) -> Params:
  """`blocks_{i}` params -> one `blocks` subtree stacked on a leading axis.

  Args:
    params: params of `GPT(scan_layers=False)`.
    n_layer: number of blocks.

  Returns:
    params of `GPT(scan_layers=True)`.
  """
  params = dict(params)
  layers = [params.pop(f"blocks_{i}") for i in range(n_layer)]
  params["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
  return params


def unstack_layers(params: Params) -> Params:
  """Inverse of `stack_layers`: one `blocks_{i}` subtree per layer.

  Args:
    params: params of `GPT(scan_layers=True)`.

  Returns:
    params of `GPT(scan_layers=False)`.
  """
  params = dict(params)
  stacked = params.pop("blocks")
  n_layer = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(n_layer):
    params[f"blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i],
                                                   stacked)
  return params


def config_from_reference(transformer_config_params: Mapping[str, Any]
                          ) -> dict[str, Any]:
  """Maps the reference YAML `transformer_config.params` to `GPT` fields.

  Args:
    transformer_config_params: the `params` mapping of the reference
      `taming.modules.transformer.mingpt.GPT` config (a mapping with
      `target` and `params` is accepted too).

  Returns:
    Keyword arguments for `GPT(...)`, with the reference defaults filled in.

  Raises:
    ValueError: on unknown keys or a missing vocab_size / block_size.
  """
  cfg = dict(transformer_config_params)
  if "params" in cfg and "target" in cfg:
    cfg = dict(cfg["params"])
  known = {"vocab_size", "block_size"} | set(_REFERENCE_DEFAULTS)
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown minGPT config keys: {unknown}")
  missing = sorted({"vocab_size", "block_size"} - set(cfg))
  if missing:
    raise ValueError(f"minGPT config lacks {missing}")
  out = dict(_REFERENCE_DEFAULTS)
  out.update(cfg)
  for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
              "n_unmasked"):
    out[key] = int(out[key])
  for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
    out[key] = float(out[key])
  return out


# ----------------------------------------------------------------------------
# Training helpers.
# ----------------------------------------------------------------------------


def weight_decay_mask(params: Params) -> Params:
  """True exactly for the weights the reference decays (Linear weights).

  Biases, LayerNorm scales, the token embedding and `pos_emb` are not
  decayed, as in the reference's `configure_optimizers`.

  Args:
    params: GPT params (either layer layout).

  Returns:
    A pytree of bools with the structure of `params`.
  """
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def token_loss(logits: Array, targets: Array,
               mask: Array | None = None) -> Array:
  """Mean token cross-entropy, computed in float32.

  Args:
    logits: (..., V) logits.
    targets: int (...) target ids.
    mask: optional (...) weights; the mean is taken over weighted tokens.

  Returns:
    float32 scalar.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def token_accuracy(logits: Array, targets: Array,
                   mask: Array | None = None) -> Array:
  """Fraction of tokens whose argmax equals the target.

  Args:
    logits: (..., V) logits.
    targets: int (...) target ids.
    mask: optional (...) weights.

  Returns:
    float32 scalar in [0, 1].
  """
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  if mask is None:
    return hits.mean()
  mask = mask.astype(jnp.float32)
  return (hits * mask).sum() / jnp.maximum(mask.sum(), 1.0)
