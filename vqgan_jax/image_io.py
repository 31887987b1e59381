"""Images as PNG files: a grid of a batch, and writing one image."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, ncol: Optional[int] = None,
               pad: int = 2) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one uint8 grid image (rows of ncol)."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  if c not in (1, 3):  # e.g. one-hot segmentation: show the argmax as gray
    images = (np.argmax(images, -1)[..., None] / max(c - 1, 1)) * 2 - 1
    c = 1
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255,
                 np.uint8)
  pix = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pix[i]
  return grid


def save_png(path: str, pixels: np.ndarray) -> None:
  """Writes uint8 pixels (H, W[, C]) to ``path``, creating its folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  Image.fromarray(pixels).save(path)
