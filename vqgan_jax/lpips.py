"""LPIPS perceptual distance (VGG16 variant) for the VQGAN stage-1 loss.

The metric of Zhang et al. (2018), "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", version 0.1, as used by Taming
Transformers:

  1. shift/scale the [-1, 1] input channel-wise (:data:`SHIFT`, :data:`SCALE`);
  2. run the 13-conv VGG16 trunk and tap it after relu1_2, relu2_2, relu3_3,
     relu4_3 and relu5_3;
  3. unit-normalise each tap over channels, ``f / (||f||_2 + 1e-10)``;
  4. squared difference of the two images' taps, a bias-free 1x1 conv to one
     channel (the "lin" heads), spatial mean;
  5. sum over the five taps -> one distance per image.

Weights are not shipped here and nothing is downloaded. :func:`load_lpips`
reads the torchvision VGG16 ImageNet weights (``vgg16-397923af.pth``) and the
lin heads of the ``lpips`` package (``lpips/weights/v0.1/vgg.pth``);
:func:`lpips_variables_from_reference` reads the ``loss.perceptual_loss.*``
entries of a reference VQGAN checkpoint.

The parameters are frozen. They live in the ordinary ``'params'`` collection
so that ``model.apply(variables, x, y)`` works as usual, but a trainer must
keep them out of its optimizer: pass them to the jitted step as a separate
argument and call :func:`lpips_distance`, which wraps them in
``jax.lax.stop_gradient`` (gradients still flow to the images).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import keymaps
from vqgan_jax import torch_io

Array = jax.Array

# Channel-wise input normalisation of LPIPS v0.1 (``lpips.ScalingLayer``).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# The VGG16 trunk as (name, channels), grouped into the five blocks that end
# at the LPIPS taps. A 2x2 max-pool precedes every block but the first.
VGG16_BLOCKS: Tuple[Tuple[Tuple[str, int], ...], ...] = (
    (("conv1_1", 64), ("conv1_2", 64)),
    (("conv2_1", 128), ("conv2_2", 128)),
    (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
    (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
    (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)

_WEIGHTS_HELP = (
    "LPIPS needs two weight files that are not part of this project: the "
    "torchvision VGG16 ImageNet weights 'vgg16-397923af.pth' (from "
    "https://download.pytorch.org/models/vgg16-397923af.pth, or "
    "~/.cache/torch/hub/checkpoints/ after torchvision has downloaded them) "
    "and the LPIPS v0.1 lin heads 'weights/v0.1/vgg.pth' shipped inside the "
    "'lpips' pip package (e.g. site-packages/lpips/weights/v0.1/vgg.pth). "
    "Alternatively train without the perceptual term: perceptual_weight=0.")


def _normalize_channels(f: Array, eps: float = 1e-10) -> Array:
  """Divides each feature vector (last axis) by its L2 norm plus ``eps``.

  The square root is guarded so that an all-zero vector (common after a
  ReLU) has a zero gradient rather than NaN; the value is unchanged.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + eps)


def max_pool_2x2(h: Array) -> Array:
  """2x2 max pooling with stride 2 (odd trailing rows/columns dropped, as
  torch's MaxPool2d(2, 2) and `nn.max_pool` do), as a reshape and a max.

  Its gradient is an equality mask rather than XLA's select-and-scatter,
  which under XLA:CPU made LPIPS's backward pass ~3x slower than its
  forward pass. On a tie the gradient is shared among the tied entries
  instead of going to the first; after the ReLU before every pool, ties are
  zeros, whose gradient the ReLU stops either way.
  """
  b, height, width, c = h.shape
  h = h[:, :height // 2 * 2, :width // 2 * 2]
  return h.reshape(b, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))


class LPIPS(nn.Module):
  """LPIPS distance between two batches of images.

  Attributes:
    dtype: computation dtype of the VGG trunk; the taps, the lin heads and
      the result are float32.
    param_dtype: dtype of freshly initialised parameters.
    precision: ``jax.lax.Precision`` of the trunk convolutions (``None``:
      backend default).
    dropout_rate: dropout on the squared differences before each lin head,
      active only with ``deterministic=False``. The reference builds its lin
      heads with ``Dropout(0.5)`` and, since Lightning puts the whole model in
      train mode, trains with it active; the default here is deterministic.
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  dropout_rate: float = 0.5

  def _trunk(self) -> Sequence[Sequence[nn.Module]]:
    """The VGG16 convolutions, block by block (created once per call)."""
    return [[nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision,
                     name=name) for name, ch in block]
            for block in VGG16_BLOCKS]

  def _taps(self, trunk: Sequence[Sequence[nn.Module]], x: Array
            ) -> Sequence[Array]:
    """The five float32 VGG16 taps of already-scaled NHWC images."""
    h = x.astype(self.dtype)
    taps = []
    for b, block in enumerate(trunk):
      if b > 0:
        h = max_pool_2x2(h)
      for conv in block:
        h = nn.relu(conv(h))
      taps.append(h.astype(jnp.float32))
    return taps

  @nn.compact
  def __call__(self, x: Array, y: Array, deterministic: bool = True
               ) -> Array:
    """Computes the distance.

    The two batches go through the trunk separately (not concatenated):
    when only one side needs a gradient, as the reconstruction does in
    training, the backward pass then runs through that side's trunk alone
    rather than through a doubled batch (half the backward work).

    Args:
      x: (B, H, W, 3) images in [-1, 1].
      y: (B, H, W, 3) images in [-1, 1].
      deterministic: skip the lin-head dropout (needs a ``'dropout'`` rng
        when False).

    Returns:
      float32 (B,) LPIPS distances.
    """
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    trunk = self._trunk()
    taps_x = self._taps(trunk, (jnp.asarray(x, jnp.float32) - shift) / scale)
    taps_y = self._taps(trunk, (jnp.asarray(y, jnp.float32) - shift) / scale)
    total = jnp.zeros((jnp.shape(x)[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(taps_x, taps_y)):
      diff = jnp.square(_normalize_channels(fx) - _normalize_channels(fy))
      diff = nn.Dropout(self.dropout_rate)(diff, deterministic=deterministic)
      head = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                     param_dtype=self.param_dtype,
                     precision=jax.lax.Precision.HIGHEST, name=f"lin{k}")
      total = total + jnp.mean(head(diff), axis=(1, 2, 3))
    return total


def lpips_distance(model: LPIPS, variables: Mapping[str, Any], x: Array,
                   y: Array, dropout_rng: Optional[Array] = None) -> Array:
  """LPIPS with frozen weights: gradients reach ``x`` and ``y`` only.

  Args:
    model: the :class:`LPIPS` module.
    variables: its variables (``{'params': ...}``).
    x: (B, H, W, 3) images in [-1, 1].
    y: (B, H, W, 3) images in [-1, 1].
    dropout_rng: when given, the lin-head dropout of the reference's
      training mode is applied with this key.

  Returns:
    float32 (B,) distances.
  """
  variables = jax.lax.stop_gradient(variables)
  if dropout_rng is None:
    return model.apply(variables, x, y)
  return model.apply(variables, x, y, deterministic=False,
                     rngs={"dropout": dropout_rng})


# ----------------------------------------------------------------------------
# Loading weights (the key maps are in `vqgan_jax.keymaps.lpips`).


@functools.lru_cache(maxsize=None)
def _abstract_params() -> Dict[str, Any]:
  """Parameter shapes of :class:`LPIPS` (no computation)."""
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(
      lambda: LPIPS().init(jax.random.PRNGKey(0), x, x))["params"]


def lpips_variables(vgg_state_dict: Mapping[str, np.ndarray],
                    lin_state_dict: Mapping[str, np.ndarray],
                    dtype: Any = jnp.float32) -> Dict[str, Any]:
  """Builds LPIPS variables from a torchvision VGG16 and lpips lin weights.

  Args:
    vgg_state_dict: torchvision VGG16 state dict (``features.N.weight|bias``;
      ``classifier.*`` entries are ignored).
    lin_state_dict: lpips v0.1 ``vgg.pth`` (``linK.model.1.weight``).
    dtype: dtype of the returned parameters.

  Returns:
    ``{'params': ...}`` for :class:`LPIPS`.

  Raises:
    ValueError: missing or unexpected keys, or a shape mismatch.
  """
  return keymaps.lpips.torchvision_params(vgg_state_dict, lin_state_dict,
                                          _abstract_params(), dtype)


def lpips_variables_from_reference(state_dict: Mapping[str, np.ndarray],
                                   prefix: str = "loss.perceptual_loss.",
                                   dtype: Any = jnp.float32
                                   ) -> Dict[str, Any]:
  """Builds LPIPS variables from the perceptual-loss part of a reference ckpt.

  The reference stores the trunk as ``net.slice{1..5}.{N}.weight|bias`` (N
  the torchvision ``features`` index) and the heads as
  ``lin{0..4}.model.1.weight``; its ``scaling_layer.shift|scale`` buffers are
  checked against :data:`SHIFT` / :data:`SCALE`. Keys outside ``prefix`` are
  ignored, so a whole VQGAN checkpoint state dict can be passed.

  Args:
    state_dict: flat ``{name: array}`` (e.g. from
      :func:`vqgan_jax.torch_io.load_state_dict`).
    prefix: prefix of the LPIPS entries.
    dtype: dtype of the returned parameters.

  Returns:
    ``{'params': ...}`` for :class:`LPIPS`.

  Raises:
    ValueError: missing or unexpected keys, a shape mismatch, or scaling
      constants that differ from LPIPS v0.1.
  """
  return keymaps.lpips.reference_params(
      state_dict, _abstract_params(), prefix=prefix, shift=SHIFT,
      scale=SCALE, dtype=dtype)


def _read(path: str | os.PathLike, what: str) -> Dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found at {path!r}. {_WEIGHTS_HELP}")
  return torch_io.load_state_dict(path)


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike, *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               precision: Optional[Any] = None
               ) -> Tuple[LPIPS, Dict[str, Any]]:
  """Loads LPIPS-VGG from a torchvision VGG16 file and the lpips lin heads.

  Args:
    vgg_path: torchvision VGG16 state dict, e.g. ``vgg16-397923af.pth``.
    lin_path: the lpips package's ``weights/v0.1/vgg.pth``.
    dtype: computation dtype of the VGG trunk (distances are float32).
    param_dtype: dtype of the returned parameters.
    precision: convolution precision of the trunk.

  Returns:
    ``(model, variables)``; ``model.apply(variables, x, y)`` gives (B,)
    float32 distances for NHWC images in [-1, 1].

  Raises:
    FileNotFoundError: a weight file is missing (the message says where the
      files come from).
    ValueError: a file does not hold the expected keys/shapes.
  """
  vgg = _read(vgg_path, "VGG16 weights file")
  lin = _read(lin_path, "LPIPS lin weights file")
  model = LPIPS(dtype=dtype, param_dtype=param_dtype, precision=precision)
  return model, lpips_variables(vgg, lin, dtype=param_dtype)
