"""Reference VQModel / GumbelVQ state dict <-> `vqgan_jax.VQGAN` params.

Flax paths name the reference modules with underscores where torch uses
list indices (`down_0_block_1` for `down.0.block.1`), so a torch key is the
Flax path joined by dots with those indices restored
(`flax_path_to_torch_key`). Convolution kernels go from torch's
(out, in, kh, kw) to Flax's (kh, kw, in, out), Linear weights are
transposed, and `kernel`/`scale` leaves are torch's `weight`.

The same map serves the conditioning stage of a Net2NetTransformer (a second
VQGAN under `cond_stage_model.`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

# Buffers of the reference models that are not weights of the network.
IGNORED_KEYS = re.compile(r"^(colorize|loss\.|.*num_batches_tracked$)")


def flax_path_to_torch_key(path: Tuple[str, ...]) -> str:
  """``('encoder', 'down_0_block_1', 'conv1', 'kernel')`` -> ``encoder.down.0.block.1.conv1.weight``."""
  *mods, leaf = path
  key = ".".join(mods)
  key = re.sub(r"(down|up)_(\d+)_(block|attn)_(\d+)", r"\1.\2.\3.\4", key)
  key = re.sub(r"(down|up)_(\d+)_(downsample|upsample)", r"\1.\2.\3", key)
  key = re.sub(r"mid_((block|attn)_\d)", r"mid.\1", key)
  if mods == ["quantize"] and leaf in ("embedding", "embed"):
    return f"quantize.{leaf}.weight"
  return key + "." + {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)


def _to_flax(name: str, value: np.ndarray, target_shape) -> np.ndarray:
  if value.ndim == 4 and len(target_shape) == 4:  # conv (O, I, kh, kw) -> HWIO
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2 and len(target_shape) == 2 and name.endswith(
      "kernel"):  # linear
    value = value.T
  return value


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           abstract_params, *, prefix: str = "",
                           ignore: re.Pattern = IGNORED_KEYS,
                           what: str = "checkpoint") -> Dict[str, Any]:
  """Fills a Flax parameter tree from a torch state dict, checking everything.

  Args:
    state_dict: torch names -> arrays.
    abstract_params: the target tree (arrays or ShapeDtypeStructs), e.g.
      ``jax.eval_shape`` of the model's ``init``.
    prefix: prefix of the relevant keys in ``state_dict``.
    ignore: keys (after the prefix) that are not parameters of this model.
    what: how to name the source in errors.

  Returns:
    The parameter tree, float32 numpy arrays in Flax layout.

  Raises:
    ValueError: listing missing keys, unexpected keys, and shape
      mismatches (key, checkpoint shape, expected shape).
  """
  flat = traverse_util.flatten_dict(abstract_params)
  own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  wanted = {flax_path_to_torch_key(p): p for p in flat}
  missing = sorted(set(wanted) - set(own))
  unexpected = sorted(k for k in set(own) - set(wanted) if not ignore.match(k))
  out, mismatched = {}, []
  for key, path in wanted.items():
    if key not in own:
      continue
    target = flat[path]
    value = _to_flax(path[-1], np.asarray(own[key]), target.shape)
    if tuple(value.shape) != tuple(target.shape):
      mismatched.append(f"{prefix}{key}: checkpoint {tuple(own[key].shape)}, "
                        f"model expects {_torch_shape(target.shape)}")
      continue
    out[path] = value.astype(np.float32)
  if missing or unexpected or mismatched:
    raise ValueError(_mismatch_message(what, prefix, missing, unexpected,
                                       mismatched))
  return traverse_util.unflatten_dict(out)


def _torch_shape(shape):
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _mismatch_message(what, prefix, missing, unexpected, mismatched, limit=20):
  lines = [f"the {what} does not match the model built from its config:"]
  for title, items in (("missing keys", missing),
                       ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
    if items:
      shown = [i if i.startswith(prefix) and ":" in i else prefix + i
               for i in items[:limit]]
      more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
      lines.append(f"  {title} ({len(items)}){more}: " + ", ".join(shown))
  lines.append("  check that the YAML config is the one released with this "
               "checkpoint")
  return "\n".join(lines)


def state_dict_from_params(params, *, prefix: str = "") -> Dict[str, np.ndarray]:
  """Inverse of :func:`params_from_state_dict` (Flax -> torch layout)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    out[prefix + flax_path_to_torch_key(path)] = value
  return out
