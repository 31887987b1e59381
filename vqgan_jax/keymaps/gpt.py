"""Reference minGPT (taming-transformers) state dict -> `vqgan_jax.GPT` params.

Submodule names of the GPT mirror the reference state dict, so converting a
checkpoint is a rename plus transposes:

  tok_emb.weight            -> tok_emb/embedding
  pos_emb                   -> pos_emb
  blocks.{i}.ln1.weight     -> blocks_{i}/ln1/scale      (bias -> bias)
  blocks.{i}.attn.query.*   -> blocks_{i}/attn/query/kernel (transposed), bias
  blocks.{i}.mlp.0.*        -> blocks_{i}/mlp/fc1/...
  blocks.{i}.mlp.2.*        -> blocks_{i}/mlp/fc2/...
  ln_f.*                    -> ln_f/...
  head.weight               -> head/kernel (transposed)

`GPT(scan_layers=True)` keeps the per-layer parameters stacked along a
leading axis of length `n_layer` under one `blocks` subtree;
`stack_layers` and `unstack_layers` switch between the two layouts.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


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
                           model: Any = None,
                           dtype: Any = jnp.float32) -> Params:
  """Converts a reference minGPT state dict into `GPT` params.

  Args:
    state_dict: name -> array. Either a bare minGPT state dict or a whole
      Net2NetTransformer one (then only keys under `prefix` are used).
    prefix: prefix of the transformer's keys; ignored if no key has it.
    scan_layers: return the stacked layout of `GPT(scan_layers=True)`.
    model: a `vqgan_jax.GPT`; if given, shapes are checked against its
      vocab_size, block_size, n_embd and n_layer; otherwise the
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


def causal_mask(block_size: int, n_unmasked: int = 0) -> np.ndarray:
  """The reference attention's ``mask`` buffer, (1, 1, block, block) float32:
  lower-triangular ones, with the first ``n_unmasked`` positions seeing each
  other."""
  mask = np.tril(np.ones((block_size, block_size), np.float32))
  mask[:n_unmasked, :n_unmasked] = 1.0
  return mask.reshape(1, 1, block_size, block_size)


def state_dict_from_params(params: Params, *, prefix: str = "transformer.",
                           n_unmasked: int = 0,
                           masks: bool = True) -> dict[str, np.ndarray]:
  """Inverse of :func:`params_from_state_dict` (Flax -> torch layout).

  Args:
    params: `GPT` params, unrolled (`blocks_{i}`) or stacked (`blocks`).
    prefix: prepended to every key.
    n_unmasked: the model's `n_unmasked`, for the mask buffers.
    masks: add each layer's `attn.mask` buffer, which the reference's
      `load_state_dict(strict=True)` expects.

  Returns:
    ``{torch key: float32 array}``.
  """
  if "blocks" in params:
    params = unstack_layers(params)

  def get(tree, path):
    for name in path:
      tree = tree[name]
    return np.asarray(tree, np.float32)

  def convert(value, transpose):
    return np.ascontiguousarray(value.T) if transpose else value

  out = {}
  for key, (path, transpose) in _TOP_MAP.items():
    out[prefix + key] = convert(get(params, path), transpose)
  block = out[prefix + "pos_emb"].shape[1]
  n_layer = sum(1 for k in params if re.fullmatch(r"blocks_\d+", k))
  for i in range(n_layer):
    for suffix, (path, transpose) in _LAYER_MAP.items():
      out[f"{prefix}blocks.{i}.{suffix}"] = convert(
          get(params[f"blocks_{i}"], path), transpose)
    if masks:
      out[f"{prefix}blocks.{i}.attn.mask"] = causal_mask(block, n_unmasked)
  return out
