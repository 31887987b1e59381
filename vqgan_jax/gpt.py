"""The stage-2 transformer: a minGPT-style decoder in Flax (linen).

`GPT` computes the same function as the reference minGPT used inside
`Net2NetTransformer`: pre-LN blocks, exact (erf) GELU, LayerNorm eps 1e-5,
separate query/key/value/proj projections, a learned zero-initialised
position embedding, an output head without bias and an optional block of
`n_unmasked` leading positions that attend to each other bidirectionally.
Submodule names mirror the reference state dict, so a reference checkpoint
converts by a rename plus transposes (`vqgan_jax.keymaps.gpt`).

The model is spread over a few modules:
  gpt.py         `GPT`, `Block` and the options (`OPTIONS`, `check_options`);
  attention.py   `CausalSelfAttention`, masks, rotary position embeddings;
  gpt_layers.py  `MLP`, `SwiGLU`, `gelu_exact` and the norms;
  kv_cache.py    the key/value cache for decoding (`init_cache`).

Options beyond the reference (norm, MLP, position embedding,
rematerialisation, ...) are declared once, in `OPTIONS`: each option's
default (the reference's block) and valid values. `check_options` checks a
GPT or a `config.gpt` mapping against them, and `ARCH_FIELDS` names the
fields that make another model.

With `scan_layers=True` the per-layer parameters are stacked along a leading
axis of length `n_layer` under one `blocks` collection
(`vqgan_jax.keymaps.gpt.stack_layers` and `unstack_layers` switch between
the layouts).

Decoding with a key/value cache (`vqgan_jax.kv_cache`): calling the model
with `cache=` and `position=` writes the new keys/values at
`[position, position + T)` and attends over the whole cache buffer, masking
positions that are not filled yet.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax import gpt_layers
from vqgan_jax.attention import CausalSelfAttention
from vqgan_jax.gpt_layers import INIT, MLP, NORMS, SwiGLU
from vqgan_jax.kv_cache import Cache

Array = jax.Array


# ----------------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------------

POSITION_EMBEDDINGS = ("learned", "rope", "rope2d")
MLPS = ("gelu", "gelu_tanh", "swiglu")
# What a rematerialised block keeps from its forward pass for the backward
# pass (everything else is recomputed):
#   'full': nothing but the block's input (least memory, one extra forward);
#   'attention': also the attention output of every layer, so the attention
#     (the costly part at long sequences) is not run again;
#   'dots': also every projection's output (q, k, v, proj, the MLP's
#     matmuls); norms, activations and attention are recomputed.
REMAT_POLICIES = ("full", "attention", "dots")


@dataclasses.dataclass(frozen=True)
class Option:
  """A GPT option.

  Attributes:
    default: its value in the reference's model (the `GPT` field's default).
    choices: the valid values; None when any value of the field's type is.
    arch: part of the architecture: a run is not resumed with another value
      (`ARCH_FIELDS`).
  """
  default: Any
  choices: tuple | None = None
  arch: bool = False


# Every `GPT` field a config sets besides the sizes and dtypes, with its
# default and valid values. A new option goes here, as a `GPT` field that
# reads its default from here, and into `Block` or the layer it changes.
OPTIONS = {
    "n_unmasked": Option(0, arch=True),
    "embd_pdrop": Option(0.0),
    "resid_pdrop": Option(0.0),
    "attn_pdrop": Option(0.0),
    "remat": Option(False),
    "remat_policy": Option("full", REMAT_POLICIES),
    "scan_layers": Option(False),
    "attention_impl": Option(None),
    "norm": Option("layernorm", NORMS, arch=True),
    "mlp": Option("gelu", MLPS, arch=True),
    "position_embedding": Option("learned", POSITION_EMBEDDINGS, arch=True),
    "rope_base": Option(10000.0),
    "zero_head": Option(False),
}
# Sizes have no default: every config sets them.
SIZES = ("n_layer", "n_head", "n_embd")
# `config.gpt` fields that make another model: resuming a workdir trained
# with other values is refused. Other shape changes (block_size, vocabulary)
# show in the checkpoint's stored shapes.
ARCH_FIELDS = SIZES + tuple(name for name, o in OPTIONS.items() if o.arch)


def _default(name: str) -> Any:
  return OPTIONS[name].default


def _field_values(cfg: Any) -> dict:
  """The fields of a GPT, a ConfigDict or a mapping, as a dict."""
  if isinstance(cfg, Mapping):
    return dict(cfg)
  if dataclasses.is_dataclass(cfg):
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("parent", "name")}
  return cfg.to_dict()  # ml_collections.ConfigDict


def check_options(cfg: Any) -> None:
  """Raises ValueError on GPT field values that cannot work.

  The message names the field as `config.gpt.FIELD`, its value and the valid
  values (or what the value must satisfy).

  Args:
    cfg: a `GPT`, or a mapping of its fields such as `config.gpt`; fields
      the mapping lacks are not checked.
  """
  values = _field_values(cfg)
  n_embd, n_head = values.get("n_embd"), values.get("n_head")
  if n_embd is not None and n_head is not None and n_embd % n_head:
    raise ValueError(f"config.gpt.n_embd={n_embd} is not divisible by "
                     f"config.gpt.n_head={n_head}; use a multiple of {n_head}")
  for name, option in OPTIONS.items():
    if (option.choices is not None and name in values
        and values[name] not in option.choices):
      raise ValueError(f"config.gpt.{name}={values[name]!r}; "
                       f"valid: {option.choices}")
  if n_embd is None or n_head is None:
    return
  head_dim = n_embd // n_head
  position_embedding = values.get("position_embedding")
  if position_embedding == "rope" and head_dim % 2:
    raise ValueError("config.gpt.position_embedding='rope' needs an even "
                     f"head width; n_embd / n_head = {head_dim}")
  if position_embedding == "rope2d":
    if head_dim % 4:
      raise ValueError("config.gpt.position_embedding='rope2d' needs a head "
                       f"width divisible by 4; n_embd / n_head = {head_dim}")
    if "rope_grid" in values and len(values["rope_grid"]) != 2:
      raise ValueError("config.gpt.position_embedding='rope2d' needs "
                       "rope_grid=(h, w), the image token grid; got "
                       f"{values['rope_grid']!r}")


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


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x)).

  The reference block by default; `norm='rmsnorm'`, `mlp='swiglu'` and
  rotary `position_embedding` give a Llama-style block.
  """
  n_head: int
  n_embd: int
  n_unmasked: int = _default("n_unmasked")
  attn_pdrop: float = _default("attn_pdrop")
  resid_pdrop: float = _default("resid_pdrop")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str | None = _default("attention_impl")
  deterministic: bool = True
  norm: str = _default("norm")
  mlp: str = _default("mlp")
  position_embedding: str = _default("position_embedding")
  rope_base: float = _default("rope_base")
  rope_grid: tuple = ()
  rope_prefix: int = 1
  # Lean norms (`gpt_layers.make_norm`) unless the block is rematerialised,
  # where its remat policy decides what is kept (and a checkpoint nested in
  # the unrolled block's lets XLA merge its recomputation into the forward).
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
    norm = functools.partial(gpt_layers.make_norm, self.norm, self.dtype,
                             self.param_dtype, lean=self.lean_norms)
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
      rows and columns, see `attention.grid_positions`; needs
      `rope_grid`). Rotary models have no `pos_emb` parameter.
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
  embd_pdrop: float = _default("embd_pdrop")
  resid_pdrop: float = _default("resid_pdrop")
  attn_pdrop: float = _default("attn_pdrop")
  n_unmasked: int = _default("n_unmasked")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = _default("remat")
  remat_policy: str = _default("remat_policy")
  scan_layers: bool = _default("scan_layers")
  attention_impl: str | None = _default("attention_impl")
  norm: str = _default("norm")
  mlp: str = _default("mlp")
  position_embedding: str = _default("position_embedding")
  rope_base: float = _default("rope_base")
  rope_grid: tuple = ()
  rope_prefix: int = 1
  zero_head: bool = _default("zero_head")

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

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True,
               cache: Cache | None = None, position: Array | int = 0):
    """Runs the model.

    Args:
      tokens: int (B, T) token ids.
      deterministic: disables dropout (pass False and a 'dropout' rng to
        train).
      cache: None for a plain forward pass; otherwise a cache from
        `kv_cache.init_cache` whose keys/values at positions < `position`
        are filled.
      position: absolute position of tokens[:, 0]; only used with a cache.

    Returns:
      float32 logits (B, T, vocab_size) without a cache; with a cache, the
      tuple (logits, updated cache).
    """
    check_options(self)
    _, t = tokens.shape
    if t > self.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size "
                       f"{self.block_size}")
    x = nn.Embed(self.vocab_size, self.n_embd, dtype=self.dtype,
                 param_dtype=self.param_dtype, embedding_init=INIT,
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

    x = gpt_layers.make_norm(self.norm, jnp.float32, self.param_dtype,
                             "ln_f")(x)
    head_init = nn.initializers.zeros if self.zero_head else INIT
    logits = nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32,
                      param_dtype=self.param_dtype, kernel_init=head_init,
                      name="head")(x.astype(jnp.float32))
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, new_cache
