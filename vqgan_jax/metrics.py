"""Image-quality metrics: PSNR, SSIM, FID and Inception Score.

Pure functions. PSNR and SSIM run in JAX on images in [0, 1] (convert the
project's [-1, 1] images with `to_unit_range`); the Frechet distance and the
Inception Score run in numpy/float64 on the host (`jax.scipy.linalg.sqrtm`
does not run on GPU, and the 2048x2048 eigenproblem is cheap on a CPU).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# SSIM constants of Wang et al. (2004), as in tf.image.ssim.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def to_unit_range(images: Array) -> Array:
  """Maps [-1, 1] images to [0, 1], clipping as when saving a PNG."""
  return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(x: Array, y: Array, max_value: float = 1.0) -> Array:
  """Per-image peak signal-to-noise ratio in dB.

  Args:
    x: images (B, H, W, C).
    y: images of the same shape.
    max_value: the peak value (1.0 for images in [0, 1]).

  Returns:
    float32 (B,): `10 log10(max_value^2 / mse)`; +inf for identical images.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  mse = jnp.mean((x - y)**2, axis=tuple(range(1, x.ndim)))
  return 10.0 * jnp.log10(max_value**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW,
                    sigma: float = SSIM_SIGMA) -> np.ndarray:
  """The normalised 1-D Gaussian of SSIM (float32, shape (size,))."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-x**2 / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x: Array, g: Array) -> Array:
  """Separable 'valid' Gaussian filter of (B, H, W, C), each channel alone."""
  b, h, w, c = x.shape
  planes = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w, 1)
  hp = jax.lax.Precision.HIGHEST
  dn = ("NHWC", "HWIO", "NHWC")
  out = jax.lax.conv_general_dilated(planes, g.reshape(-1, 1, 1, 1), (1, 1),
                                     "VALID", dimension_numbers=dn,
                                     precision=hp)
  out = jax.lax.conv_general_dilated(out, g.reshape(1, -1, 1, 1), (1, 1),
                                     "VALID", dimension_numbers=dn,
                                     precision=hp)
  return out.reshape(b, c, out.shape[1], out.shape[2]).transpose(0, 2, 3, 1)


def ssim(x: Array, y: Array, max_value: float = 1.0,
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Array:
  """Per-image structural similarity (Wang et al. 2004), Gaussian window.

  The mean of the SSIM map over valid window positions and channels, with
  the 11x11 sigma-1.5 window and K1 = 0.01, K2 = 0.03 (as tf.image.ssim;
  no sample-covariance correction). Computed in float32.

  Args:
    x: images (B, H, W, C) in [0, max_value]; H and W at least `window`.
    y: images of the same shape.
    max_value: the dynamic range (1.0 for images in [0, 1]).
    window: side of the Gaussian window.
    sigma: its standard deviation.

  Returns:
    float32 (B,); 1 for identical images.

  Raises:
    ValueError: shapes differ, or the images are smaller than the window.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"ssim needs two (B, H, W, C) arrays of one shape, got "
                     f"{x.shape} and {y.shape}")
  if min(x.shape[1:3]) < window:
    raise ValueError(f"ssim needs images of at least {window}x{window} "
                     f"pixels (the Gaussian window), got {x.shape[1:3]}")
  g = jnp.asarray(gaussian_window(window, sigma))
  c1 = (SSIM_K1 * max_value)**2
  c2 = (SSIM_K2 * max_value)**2
  mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
  var_x = _filter_valid(x * x, g) - mu_x**2
  var_y = _filter_valid(y * y, g) - mu_y**2
  cov = _filter_valid(x * y, g) - mu_x * mu_y
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  structure = (2.0 * cov + c2) / (var_x + var_y + c2)
  return jnp.mean(luminance * structure, axis=(1, 2, 3))


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (float64) of (N, D) features, N >= 2."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature statistics need (N, D) features with N >= 2, "
                     f"got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigh, clipped)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """`tr(sqrtm(sigma1 @ sigma2))` for covariance matrices, on the host.

  Uses the symmetric form `tr(sqrtm(A sigma2 A))` with `A = sqrtm(sigma1)`,
  whose eigenvalues are those of `sigma1 sigma2` but come from a symmetric
  eigensolver: real, and clipped at 0 where round-off makes them negative.
  """
  a = _psd_sqrt(np.asarray(sigma1, np.float64))
  m = a @ np.asarray(sigma2, np.float64) @ a
  w = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """Frechet distance between two Gaussians (the FID of their features).

  `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))`,
  in float64 on the host. If the product is numerically singular so that the
  result is not finite, `eps` is added to both diagonals (the standard
  fallback of the TensorFlow and pytorch-fid implementations).

  Args:
    mu1: mean (D,) of the first set's features.
    sigma1: covariance (D, D).
    mu2: mean of the second set.
    sigma2: covariance of the second set.
    eps: diagonal offset of the fallback.

  Returns:
    The distance (a float >= 0 up to round-off).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different dimensions: means {mu1.shape} "
                     f"vs {mu2.shape}, covariances {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  tr_covmean = trace_sqrt_product(sigma1, sigma2)
  if not np.isfinite(tr_covmean):
    offset = eps * np.eye(sigma1.shape[0])
    tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) -
               2.0 * tr_covmean)


def inception_score(logits: np.ndarray,
                    num_splits: int = 1) -> Tuple[float, float]:
  """Inception Score `exp(E_x KL(p(y|x) || p(y)))` from classifier logits.

  Args:
    logits: (N, K) logits (the FID Inception's 1008-way output).
    num_splits: the score is computed on this many equal, consecutive splits
      (10 in the original protocol) and averaged.

  Returns:
    (mean, standard deviation) over the splits; the std is 0 for one split.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or num_splits < 1 or logits.shape[0] < num_splits:
    raise ValueError(f"inception_score needs (N, K) logits with N >= "
                     f"num_splits={num_splits}, got shape {logits.shape}")
  logp = logits - logits.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(logp, num_splits):
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    kl = np.sum(p * (part - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
