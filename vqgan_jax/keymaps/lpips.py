"""LPIPS-VGG16 weights from torch files -> `vqgan_jax.lpips.LPIPS` params.

Two sources hold the same weights under different keys:

* torchvision's VGG16 (``features.{N}.weight|bias``, N the index in its
  ``features`` Sequential; ``classifier.*`` is not used) together with the
  lin heads of the ``lpips`` package's ``weights/v0.1/vgg.pth``
  (``lin{k}.model.1.weight``): :func:`torchvision_params`;
* the perceptual loss inside a reference VQGAN checkpoint, whose trunk is
  ``net.slice{s}.{N}.weight|bias`` (s = 1..5, the slice holding torchvision
  layer N) next to the same lin heads and two ``scaling_layer`` buffers:
  :func:`reference_params`.

Flax names the convolutions after VGG16's layers (``conv{block}_{i}``) and
the heads ``lin{k}``; kernels go from torch's (out, in, kh, kw) to Flax's
(kh, kw, in, out).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

# torchvision VGG16 ``features`` index of each convolution.
VGG16_FEATURES = {
    "conv1_1": 0, "conv1_2": 2,
    "conv2_1": 5, "conv2_2": 7,
    "conv3_1": 10, "conv3_2": 12, "conv3_3": 14,
    "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
    "conv5_1": 24, "conv5_2": 26, "conv5_3": 28,
}
# First torchvision ``features`` index of each reference slice 2..5
# (``net.slice{k}`` keeps the torchvision index of each layer it holds).
_SLICE_STARTS = (0, 4, 9, 16, 23)


def _torch_shape(shape: Sequence[int]) -> Tuple[int, ...]:
  """Flax kernel (kh, kw, I, O) -> torch (O, I, kh, kw); biases as they are."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _trunk_keys(abstract_params: Mapping[str, Any],
                key_of) -> Dict[str, str]:
  """``{torch key: 'module/param'}`` of the trunk; ``key_of(N)`` is the
  torch prefix of torchvision layer N."""
  keys = {}
  for name, leaves in abstract_params.items():
    if name in VGG16_FEATURES:
      for kind in leaves:
        leaf = {"kernel": "weight", "bias": "bias"}[kind]
        keys[f"{key_of(VGG16_FEATURES[name])}.{leaf}"] = f"{name}/{kind}"
  return keys


def _lin_keys(abstract_params: Mapping[str, Any],
              prefix: str = "") -> Dict[str, str]:
  return {f"{prefix}{name}.model.1.weight": f"{name}/kernel"
          for name in abstract_params if name.startswith("lin")}


def _expected_shapes(keys: Mapping[str, str],
                     abstract_params: Mapping[str, Any]
                     ) -> Dict[str, Tuple[int, ...]]:
  """Torch-layout shape of every key of a ``{key: 'module/param'}`` map."""
  shapes = {}
  for key, role in keys.items():
    name, kind = role.split("/")
    shapes[key] = _torch_shape(abstract_params[name][kind].shape)
  return shapes


def _check_keys(given: Mapping[str, np.ndarray],
                expected: Mapping[str, Tuple[int, ...]], what: str,
                ignore_prefixes: Sequence[str] = ()) -> None:
  """Raises a ValueError naming missing/unexpected keys and bad shapes."""
  present = {k for k in given if not any(k.startswith(p)
                                         for p in ignore_prefixes)}
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  bad = [f"{k}: expected {tuple(expected[k])}, got {tuple(given[k].shape)}"
         for k in sorted(set(expected) & present)
         if tuple(given[k].shape) != tuple(expected[k])]
  problems = []
  if missing:
    problems.append(f"missing keys: {missing}")
  if unexpected:
    problems.append(f"unexpected keys: {unexpected}")
  if bad:
    problems.append("shape mismatches: " + "; ".join(bad))
  if problems:
    raise ValueError(f"{what} does not match the LPIPS VGG16 layout: " +
                     " | ".join(problems))


def _build_params(arrays: Mapping[str, np.ndarray],
                  vgg_keys: Mapping[str, str], lin_keys: Mapping[str, str],
                  dtype: Any) -> Dict[str, Any]:
  params: Dict[str, Dict[str, np.ndarray]] = {}
  for key, role in {**vgg_keys, **lin_keys}.items():
    name, kind = role.split("/")
    value = np.asarray(arrays[key], np.float32)
    if kind == "kernel":
      value = _conv_kernel(value)
    params.setdefault(name, {})[kind] = jnp.asarray(value, dtype)
  return {"params": params}


def torchvision_params(vgg_state_dict: Mapping[str, np.ndarray],
                       lin_state_dict: Mapping[str, np.ndarray],
                       abstract_params: Mapping[str, Any],
                       dtype: Any = jnp.float32) -> Dict[str, Any]:
  """LPIPS variables from a torchvision VGG16 and the lpips lin weights.

  Args:
    vgg_state_dict: torchvision VGG16 state dict (``features.N.weight|bias``;
      ``classifier.*`` entries are ignored).
    lin_state_dict: lpips v0.1 ``vgg.pth`` (``linK.model.1.weight``).
    abstract_params: the LPIPS ``params`` shapes (``jax.eval_shape`` of its
      ``init``).
    dtype: dtype of the returned parameters.

  Returns:
    ``{'params': ...}``.

  Raises:
    ValueError: missing or unexpected keys, or a shape mismatch.
  """
  vgg_keys = _trunk_keys(abstract_params, lambda n: f"features.{n}")
  lin_keys = _lin_keys(abstract_params)
  _check_keys(vgg_state_dict, _expected_shapes(vgg_keys, abstract_params),
              "VGG16 state dict", ignore_prefixes=("classifier.",))
  _check_keys(lin_state_dict, _expected_shapes(lin_keys, abstract_params),
              "LPIPS lin state dict")
  merged = {**vgg_state_dict, **lin_state_dict}
  return _build_params(merged, vgg_keys, lin_keys, dtype)


def reference_params(state_dict: Mapping[str, np.ndarray],
                     abstract_params: Mapping[str, Any], *, prefix: str,
                     shift: Sequence[float], scale: Sequence[float],
                     dtype: Any = jnp.float32) -> Dict[str, Any]:
  """LPIPS variables from the perceptual-loss part of a reference checkpoint.

  Keys outside ``prefix`` are ignored, so a whole VQGAN checkpoint state
  dict can be passed. The reference's ``scaling_layer.shift|scale`` buffers,
  when present, must equal ``shift`` / ``scale`` (the model's constants).

  Args:
    state_dict: flat ``{name: array}``.
    abstract_params: the LPIPS ``params`` shapes.
    prefix: prefix of the LPIPS entries.
    shift: the model's input shift.
    scale: the model's input scale.
    dtype: dtype of the returned parameters.

  Returns:
    ``{'params': ...}``.

  Raises:
    ValueError: missing or unexpected keys, a shape mismatch, or scaling
      constants that differ from the model's.
  """
  sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}

  def key_of(n):
    s = sum(n >= start for start in _SLICE_STARTS)
    return f"{prefix}net.slice{s}.{n}"

  vgg_keys = _trunk_keys(abstract_params, key_of)
  lin_keys = _lin_keys(abstract_params, prefix)
  expected = _expected_shapes({**vgg_keys, **lin_keys}, abstract_params)
  buffers = {f"{prefix}scaling_layer.shift": shift,
             f"{prefix}scaling_layer.scale": scale}
  for key, want in buffers.items():
    if key in sub:
      got = np.asarray(sub[key], np.float64).reshape(-1)
      if got.shape != (3,) or not np.allclose(got, want, atol=1e-6):
        raise ValueError(f"{key} is {got.tolist()}, LPIPS v0.1 uses "
                         f"{list(want)}")
  _check_keys({k: v for k, v in sub.items() if k not in buffers}, expected,
              f"state dict under prefix {prefix!r}")
  return _build_params(sub, vgg_keys, lin_keys, dtype)


def reference_state_dict(params: Mapping[str, Any], *, prefix: str,
                         shift: Sequence[float], scale: Sequence[float]
                         ) -> Dict[str, np.ndarray]:
  """Inverse of :func:`reference_params`: the reference's perceptual-loss
  keys (``net.slice{s}.{N}.*``, ``lin{k}.model.1.weight`` and the two
  ``scaling_layer`` buffers of shape (1, 3, 1, 1)) from LPIPS ``params``."""

  def key_of(n):
    s = sum(n >= start for start in _SLICE_STARTS)
    return f"{prefix}net.slice{s}.{n}"

  out = {f"{prefix}scaling_layer.shift":
             np.asarray(shift, np.float32).reshape(1, 3, 1, 1),
         f"{prefix}scaling_layer.scale":
             np.asarray(scale, np.float32).reshape(1, 3, 1, 1)}
  keys = {**_trunk_keys(params, key_of), **_lin_keys(params, prefix)}
  for key, role in keys.items():
    name, kind = role.split("/")
    value = np.asarray(params[name][kind], np.float32)
    if kind == "kernel":
      value = np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    out[key] = value
  return out
