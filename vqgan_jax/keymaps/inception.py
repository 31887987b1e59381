"""pytorch-fid's Inception state dict -> `vqgan_jax.inception` variables.

The Flax module names mirror pytorch-fid's, so a torch key is the Flax path
joined by dots: convolutions (``conv``) are ``weight`` (from (out, in, kh,
kw) to (kh, kw, in, out)), BatchNorm ``scale|bias`` are ``weight|bias`` and
its running statistics ``running_mean|running_var``, and the classifier
``fc`` is a transposed Linear. The auxiliary classifier (``AuxLogits.*``)
and ``num_batches_tracked`` counters are not used.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# The weights file of pytorch-fid, the port of the TensorFlow FID graph.
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _torch_name(path: Sequence[str]) -> Tuple[str, str]:
  """Flax variable path -> (torch key, layout kind)."""
  collection, *modules, leaf = path
  prefix = ".".join(modules)
  if modules[-1] == "fc":
    return prefix + {"kernel": ".weight", "bias": ".bias"}[leaf], (
        "linear" if leaf == "kernel" else "copy")
  if modules[-1] == "conv":
    return prefix + ".weight", "conv"
  torch_leaf = {("params", "scale"): "weight", ("params", "bias"): "bias",
                ("batch_stats", "mean"): "running_mean",
                ("batch_stats", "var"): "running_var"}[(collection, leaf)]
  return f"{prefix}.{torch_leaf}", "copy"


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              abstract_variables: Mapping[str, Any]
                              ) -> Dict[str, Any]:
  """Maps a pytorch-fid Inception state dict onto the model's variables.

  Args:
    state_dict: torch key -> array, e.g. from
      `torch_io.load_state_dict(WEIGHTS_FILE)`.
    abstract_variables: {'params', 'batch_stats'} shapes of the model
      (`jax.eval_shape` of its `init`).

  Returns:
    {'params', 'batch_stats'}.

  Raises:
    ValueError: missing, unexpected or wrongly shaped entries (listed).
  """
  flat = {}
  used, missing, bad_shape = set(), [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      abstract_variables)[0]:
    names = [p.key for p in path]
    key, kind = _torch_name(names)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    a = np.asarray(state_dict[key], np.float32)
    if kind == "conv":
      a = a.transpose(2, 3, 1, 0)
    elif kind == "linear":
      a = a.T
    if a.shape != leaf.shape:
      bad_shape.append(f"{key}: {a.shape} != {leaf.shape}")
      continue
    flat[tuple(names)] = a
  unexpected = sorted(
      k for k in state_dict if k not in used and
      not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits."))
  if missing or unexpected or bad_shape:
    raise ValueError(
        "not a pytorch-fid FID Inception state dict "
        f"({WEIGHTS_FILE}): missing {missing[:5]} ({len(missing)}), "
        f"unexpected {unexpected[:5]} ({len(unexpected)}), "
        f"wrong shapes {bad_shape[:5]}")
  variables: Dict[str, Any] = {}
  for names, a in flat.items():
    node = variables
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = jnp.asarray(a)
  return variables
