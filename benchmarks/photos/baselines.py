"""Classical image codecs at a tokenizer's bit budget, in numpy.

A VQGAN with downsampling f and K codes spends ``(H/f) * (W/f) * log2(K)``
bits on an H x W image. Two classical codecs at that budget:

* shrink-and-enlarge: store the image shrunk to the largest size whose 8-bit
  pixels fit the budget (bicubic, antialiased), enlarge it back (bicubic);
* k-means VQ: cut the image into f x f x C pixel blocks and store, for each,
  the index of its nearest of K centres fitted by k-means on training blocks,
  the same number of indices from the same alphabet as the tokenizer.

Images are uint8 NHWC; distances and centres are float32.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image


def tokenizer_bits(height: int, width: int, factor: int, n_codes: int
                   ) -> float:
  """Bits of one image's code grid: (H/f) (W/f) log2(K)."""
  return (height // factor) * (width // factor) * math.log2(n_codes)


def shrink_size(height: int, width: int, bits: float, channels: int = 3,
                depth: int = 8) -> Tuple[int, int]:
  """The largest (h, w), at the image's aspect ratio, whose pixels
  (`channels` x `depth` bits each) take no more than `bits`.

  Raises:
    ValueError: not even one pixel fits.
  """
  per_pixel = channels * depth
  for scale in range(max(height, width), 0, -1):
    h = max(1, round(height * scale / max(height, width)))
    w = max(1, round(width * scale / max(height, width)))
    if h * w * per_pixel <= bits:
      return h, w
  raise ValueError(f"{bits} bits hold no pixel of {per_pixel} bits")


def shrink_enlarge(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Each uint8 image shrunk to `size` (h, w), stored as uint8, enlarged."""
  h, w = size
  out = np.empty_like(images)
  for i, img in enumerate(images):
    pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
    small = pil.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None)
    big = np.asarray(small.resize((img.shape[1], img.shape[0]),
                                  Image.Resampling.BICUBIC))
    out[i] = big.reshape(img.shape)
  return out


def to_blocks(images: np.ndarray, f: int) -> np.ndarray:
  """uint8 (N, H, W, C) -> float32 (N * H/f * W/f, f * f * C), raster order."""
  n, h, w, c = images.shape
  if h % f or w % f:
    raise ValueError(f"image size {h}x{w} is not a multiple of {f}")
  x = images.reshape(n, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, f * f * c).astype(np.float32)


def from_blocks(blocks: np.ndarray, shape: Tuple[int, ...], f: int
                ) -> np.ndarray:
  """Inverse of `to_blocks`, rounded and clipped to uint8."""
  n, h, w, c = shape
  x = blocks.reshape(n, h // f, w // f, f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return np.clip(np.round(x.reshape(shape)), 0, 255).astype(np.uint8)


def nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 16384
            ) -> np.ndarray:
  """int32 index of each row's nearest centre (squared L2, float32)."""
  x = np.asarray(x, np.float32)
  centres = np.asarray(centres, np.float32)
  c2 = np.sum(centres**2, axis=1)
  out = np.empty(len(x), np.int32)
  for s in range(0, len(x), chunk):
    d = c2[None, :] - 2.0 * (x[s:s + chunk] @ centres.T)  # + |x|^2, constant
    out[s:s + chunk] = np.argmin(d, axis=1)
  return out


def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0
           ) -> np.ndarray:
  """Lloyd's k-means from k distinct random rows; float32 (k, D) centres.

  An emptied cluster restarts at the row farthest from its centre.
  """
  x = np.asarray(x, np.float32)
  if len(x) < k:
    raise ValueError(f"k-means needs at least {k} rows (got {len(x)})")
  rng = np.random.default_rng(seed)
  centres = x[rng.choice(len(x), k, replace=False)].copy()
  for _ in range(iters):
    idx = nearest(x, centres)
    counts = np.bincount(idx, minlength=k)
    sums = np.zeros_like(centres)
    np.add.at(sums, idx, x)
    full = counts > 0
    centres[full] = sums[full] / counts[full, None]
    empty = np.flatnonzero(~full)
    if len(empty):
      err = np.sum((x - centres[idx])**2, axis=1)
      centres[empty] = x[np.argsort(err)[::-1][:len(empty)]]
  return centres


def kmeans_vq(train: np.ndarray, images: np.ndarray, f: int, k: int, *,
              max_blocks: int = 100_000, iters: int = 25, seed: int = 0
              ) -> np.ndarray:
  """`images` coded by k-means VQ over f x f blocks fitted on `train`."""
  blocks = to_blocks(train, f)
  rng = np.random.default_rng(seed)
  if len(blocks) > max_blocks:
    blocks = blocks[rng.choice(len(blocks), max_blocks, replace=False)]
  centres = kmeans(blocks, k, iters=iters, seed=seed)
  test = to_blocks(images, f)
  return from_blocks(centres[nearest(test, centres)], images.shape, f)
