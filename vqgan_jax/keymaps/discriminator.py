"""Reference NLayerDiscriminator state dict -> PatchGAN variables.

Layer ``main_{i}`` of :class:`vqgan_jax.discriminator.NLayerDiscriminator` is
entry ``i`` of the reference's ``main`` Sequential (the LeakyReLUs take the
missing indices), so keys map one to one: ``main.{i}.weight|bias`` ->
``params/main_{i}/kernel|bias`` (conv kernels from (out, in, kh, kw) to
(kh, kw, in, out)), BatchNorm ``weight`` -> ``scale`` and
``running_mean|running_var`` -> ``batch_stats/main_{i}/mean|var``. ActNorm
keeps its names: ``loc``/``scale`` of shape (1, C, 1, 1) become (C,)
parameters and its ``initialized`` flag lives in ``batch_stats``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

# Flax leaf name -> reference buffer/parameter name (ActNorm's loc/scale
# keep their names).
_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                "mean": "running_mean", "var": "running_var",
                "initialized": "initialized"}


def config_from_state_dict(sd: Mapping[str, np.ndarray], prefix: str
                           ) -> Dict[str, Any]:
  """The architecture of a reference state dict, as NLayerDiscriminator fields.

  Returns:
    ``{'input_nc', 'ndf', 'n_layers', 'use_actnorm'}``.

  Raises:
    ValueError: no discriminator under ``prefix``.
  """
  w0 = sd.get(f"{prefix}main.0.weight")
  if w0 is None or np.ndim(w0) != 4:
    raise ValueError(f"missing keys: ['{prefix}main.0.weight'] (no "
                     f"discriminator under prefix {prefix!r})")
  convs = sorted({int(k[len(prefix):].split(".")[1]) for k in sd
                  if k.startswith(prefix + "main.") and k.endswith(".weight")
                  and np.ndim(sd[k]) == 4})
  use_actnorm = any(k.startswith(prefix + "main.") and k.endswith(".loc")
                    for k in sd)
  return dict(input_nc=int(w0.shape[1]), ndf=int(w0.shape[0]),
              n_layers=max(len(convs) - 2, 1), use_actnorm=use_actnorm)


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              abstract_variables: Mapping[str, Any], *,
                              prefix: str, what: str,
                              dtype: Any = jnp.float32) -> Dict[str, Any]:
  """Converts the discriminator entries of a reference state dict.

  Args:
    state_dict: flat ``{name: array}``; keys outside ``prefix`` are ignored
      (a whole VQGAN checkpoint state dict may be passed).
    abstract_variables: ``{'params', 'batch_stats'}`` shapes of the target
      model (``jax.eval_shape`` of its ``init``).
    prefix: prefix of the discriminator entries.
    what: the target model, as errors name it.
    dtype: dtype of the returned parameters (statistics stay float32).

  Returns:
    ``{'params': ..., 'batch_stats': ...}``.

  Raises:
    ValueError: missing or unexpected keys or shape mismatches, each named.
  """
  expected: Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]] = {}
  for col, tree in abstract_variables.items():
    for name, leaves in tree.items():
      i = name.split("_")[1]
      for leaf, s in leaves.items():
        actnorm = leaf in ("loc", "scale") and "loc" in leaves
        torch_name = leaf if actnorm else _TORCH_NAMES[leaf]
        shape = tuple(s.shape)
        if leaf == "kernel":
          shape = (shape[3], shape[2], shape[0], shape[1])
        elif actnorm:
          shape = (1, shape[0], 1, 1)
        expected[f"{prefix}main.{i}.{torch_name}"] = ((col, name, leaf), shape)

  given = {k: v for k, v in state_dict.items() if k.startswith(prefix)
           and not k.endswith("num_batches_tracked")}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  bad = [f"{k}: expected {expected[k][1]}, got {tuple(np.shape(given[k]))}"
         for k in sorted(set(expected) & set(given))
         if tuple(np.shape(given[k])) != expected[k][1]]
  problems = ([f"missing keys: {missing}"] if missing else []) + (
      [f"unexpected keys: {unexpected}"] if unexpected else []) + (
          ["shape mismatches: " + "; ".join(bad)] if bad else [])
  if problems:
    raise ValueError(f"discriminator state dict does not match {what}: " +
                     " | ".join(problems))

  out: Dict[str, Dict[str, Dict[str, Any]]] = {"params": {},
                                               "batch_stats": {}}
  for key, ((col, name, leaf), _) in expected.items():
    value = np.asarray(given[key])
    if leaf == "kernel":
      value = np.transpose(value, (2, 3, 1, 0))
    if leaf == "initialized":
      value = jnp.asarray(int(np.asarray(value).reshape(())), jnp.int32)
    elif col == "batch_stats":
      value = jnp.asarray(value.astype(np.float32))
    else:
      value = jnp.asarray(value if leaf == "kernel" else value.reshape(-1),
                          dtype)
    out[col].setdefault(name, {})[leaf] = value
  return out


def state_dict_from_variables(variables: Mapping[str, Any], *, prefix: str
                              ) -> Dict[str, np.ndarray]:
  """Inverse of :func:`variables_from_state_dict` (Flax -> torch layout).

  Adds the buffers a torch ``NLayerDiscriminator`` holds beyond the Flax
  variables, so that ``load_state_dict(strict=True)`` accepts the result:
  BatchNorm's ``num_batches_tracked`` (0; unused with the reference's
  momentum 0.1), and ActNorm's ``initialized`` flag as uint8.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of the PatchGAN.
    prefix: prepended to every key, e.g. ``'loss.discriminator.'``.

  Returns:
    ``{torch key: array}``, float32 except the integer buffers.
  """
  out: Dict[str, np.ndarray] = {}
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  for name in sorted(set(params) | set(stats), key=lambda n: int(n.split("_")[1])):
    i = name.split("_")[1]
    leaves = dict(params.get(name, {}))
    actnorm = "loc" in leaves
    for leaf, value in leaves.items():
      value = np.asarray(value, np.float32)
      if leaf == "kernel":
        value = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
        torch_name = "weight"
      elif actnorm:
        value, torch_name = value.reshape(1, -1, 1, 1), leaf
      else:
        torch_name = _TORCH_NAMES[leaf]
      out[f"{prefix}main.{i}.{torch_name}"] = value
    for leaf, value in dict(stats.get(name, {})).items():
      if leaf == "initialized":
        out[f"{prefix}main.{i}.initialized"] = np.asarray(value, np.uint8)
      else:
        out[f"{prefix}main.{i}.{_TORCH_NAMES[leaf]}"] = np.asarray(
            value, np.float32)
    if not actnorm and "mean" in dict(stats.get(name, {})):
      out[f"{prefix}main.{i}.num_batches_tracked"] = np.zeros((), np.int64)
  return out
