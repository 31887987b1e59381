"""The FID-standard InceptionV3 in Flax, and a loader for its weights.

FID and Inception Score are only comparable across papers when computed with
one network: the TensorFlow Inception graph of 2015-12-05, of which
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a port. This module
builds that network (torchvision's InceptionV3 with the FID patches: average
pools that ignore padding in the A/C/E_1 blocks, a max pool in the last E
block, 1008 output classes) and reads that file with the project's torch-free
reader, mapping its keys (:mod:`vqgan_jax.keymaps.inception`):

    model, variables = load_inception('pt_inception-2015-12-05-6726825d.pth')
    pool, logits = model.apply(variables, images)  # images in [-1, 1]

`pool` is the 2048-d final average pool (FID features), `logits` the
1008-way classifier output (Inception Score). Inputs are resized to 299x299
bilinearly exactly as pytorch-fid does (`F.interpolate(..., 'bilinear',
align_corners=False)`, no antialiasing). Nothing is downloaded: users fetch
the weights file themselves (see the README).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import keymaps
from vqgan_jax import torch_io

Array = jax.Array

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BN_EPS = 1e-3


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) bilinear interpolation matrix, align_corners=False, no AA.

  Source positions are computed in float32, as torch's CPU kernel does
  (in float64 they differ from torch's by up to ~3e-5 of a pixel at 512 px).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale -
                   f32(0.5), f32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = (src - i0.astype(f32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), i1), frac)
  return m.astype(np.float32)


def resize_bilinear(images: Array, size: int = INPUT_SIZE) -> Array:
  """Resizes (B, H, W, C) to (B, size, size, C) as torch's bilinear resize.

  Matches `F.interpolate(x, (size, size), mode='bilinear',
  align_corners=False)` (half-pixel centres, edge clamping, no antialiasing
  when shrinking), unlike `jax.image.resize`, which antialiases.
  """
  _, h, w, _ = images.shape
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.asarray(_resize_matrix(h, size))
  cols = jnp.asarray(_resize_matrix(w, size))
  x = jnp.einsum("oh,bhwc->bowc", rows, images, precision=hp)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp)


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, (self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv",
                precision=jax.lax.Precision.HIGHEST)(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/c/d)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1),
                     name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a): the 35 -> 17 reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b-e): factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a): the 17 -> 8 reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (average pool) / FIDInceptionE_2 (max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.max_pool:  # the FID graph's quirk in its last block
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception network; module names mirror pytorch-fid's state dict.

  Attributes:
    resize_to: resize inputs to this square size first (299, as pytorch-fid);
      None feeds them as they are (at least 75x75).
  """
  resize_to: Optional[int] = INPUT_SIZE

  @nn.compact
  def __call__(self, images: Array) -> Tuple[Array, Array]:
    """Features of images in [-1, 1].

    Args:
      images: (B, H, W, 3) float in [-1, 1] (1-channel inputs are repeated).

    Returns:
      (pool features float32 (B, 2048), logits float32 (B, 1008)).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
      raise ValueError(f"the Inception network takes 1 or 3 channels, got "
                       f"images of shape {x.shape}")
    if self.resize_to is not None:
      x = resize_bilinear(x, self.resize_to)
    x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                    ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, name="fc",
                      precision=jax.lax.Precision.HIGHEST)(pool)
    return pool, logits


def _abstract_variables() -> Mapping[str, Any]:
  """Variable shapes of the network (no computation)."""
  return jax.eval_shape(
      lambda: FIDInceptionV3(resize_to=None).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32)))


def inception_variables(state_dict: Mapping[str, np.ndarray]
                        ) -> Dict[str, Any]:
  """Maps a pytorch-fid Inception state dict to this module's variables.

  The key map is :mod:`vqgan_jax.keymaps.inception`.

  Args:
    state_dict: torch key -> array, e.g. from
      `torch_io.load_state_dict(path)`. `num_batches_tracked` and
      auxiliary-classifier (`AuxLogits.*`) entries are ignored.

  Returns:
    {'params', 'batch_stats'} for `FIDInceptionV3`.

  Raises:
    ValueError: missing, unexpected or wrongly shaped entries (listed).
  """
  return keymaps.inception.variables_from_state_dict(state_dict,
                                                     _abstract_variables())


def load_inception(path: str | os.PathLike, *,
                   resize_to: Optional[int] = INPUT_SIZE
                   ) -> Tuple[FIDInceptionV3, Dict[str, Any]]:
  """Builds the FID Inception from pytorch-fid's weights file.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (a torch state dict), read
      without torch.
    resize_to: input resize (299, as pytorch-fid); None to feed inputs as
      they are.

  Returns:
    (model, variables); `model.apply(variables, images)` -> (pool, logits).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights not found: {path}; download "
        f"{keymaps.inception.WEIGHTS_FILE} from "
        f"pytorch-fid's releases (github.com/mseitzer/pytorch-fid) and pass "
        f"its path")
  state_dict = torch_io.load_state_dict(path)
  return FIDInceptionV3(resize_to=resize_to), inception_variables(state_dict)


def compute_features(model: FIDInceptionV3, variables: Mapping[str, Any],
                     images: np.ndarray, batch_size: int = 50,
                     apply_fn: Optional[Any] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Pool features and logits of many images, in fixed-size batches.

  Args:
    model: the Inception module.
    variables: its variables.
    images: (N, H, W, C) float in [-1, 1] or uint8 in [0, 255].
    batch_size: images per forward (the last batch is padded).
    apply_fn: a jitted `model.apply` to reuse across calls (compiled once).

  Returns:
    (features float32 (N, 2048), logits float32 (N, 1008)) as numpy.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  apply = apply_fn if apply_fn is not None else jax.jit(model.apply)
  feats, logits = [], []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    f, l = jax.device_get(apply(variables, jnp.asarray(x, jnp.float32)))
    feats.append(f[:n])
    logits.append(l[:n])
  return np.concatenate(feats), np.concatenate(logits)
