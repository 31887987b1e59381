"""Real photographs that ship inside installed packages, cut into crops.

scikit-image bundles a few sample photographs in its wheel (no download) and
scikit-learn bundles two (``china.jpg``, ``flower.jpg``). `prepare` holds
whole photos out, cuts square crops from the others for training and tiles
the held-out photos, and writes them as PNG files that ``folder:`` datasets
read:

    OUT/train/<photo>_<y>_<x>.png     overlapping crops of the training photos
    OUT/heldout/<photo>_<y>_<x>.png   non-overlapping tiles of held-out photos
    OUT/photos.json                   which photo went where, and the sizes

scikit-image is optional (``pip install -e '.[photos]'``); without it only
scikit-learn's two photos are available. Nothing here imports JAX.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image

INSTALL = "pip install -e '.[photos]' (or pip install -r requirements-photos.txt)"
MISSING = f"needs scikit-image for its sample photos: {INSTALL}"

# scikit-image's bundled photographs (files inside its wheel), by loader name.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee",
                  "coins", "grass", "gravel", "hubble_deep_field",
                  "immunohistochemistry", "moon", "motorcycle_left",
                  "retina", "rocket")
SKLEARN_PHOTOS = ("china", "flower")
DEFAULT_HELDOUT = ("chelsea", "china")


def skimage_available() -> bool:
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _as_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
  a = np.asarray(pixels)
  if a.dtype != np.uint8:  # floats in [0, 1]
    a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  return a[..., :3]


def _loaders() -> Dict[str, Callable[[], np.ndarray]]:
  """Photo name -> zero-argument loader of its uint8 RGB pixels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  out: Dict[str, Callable[[], np.ndarray]] = {}
  if skimage_available():
    import skimage.data  # pylint: disable=g-import-not-at-top
    for name in SKIMAGE_PHOTOS:
      if name == "motorcycle_left":  # the left view of a stereo pair
        out[name] = lambda: skimage.data.stereo_motorcycle()[0]
      else:
        out[name] = getattr(skimage.data, name)
  for name in SKLEARN_PHOTOS:
    out[name] = lambda n=name: datasets.load_sample_image(n + ".jpg")
  return out


def available_photos() -> Tuple[str, ...]:
  """Names of the photos this installation can load, in a fixed order."""
  return tuple(_loaders())


def load_photo(name: str) -> np.ndarray:
  """uint8 RGB (H, W, 3) pixels of one bundled photo.

  Raises:
    KeyError: an unknown name (or a scikit-image photo without scikit-image).
  """
  loaders = _loaders()
  if name not in loaders:
    raise KeyError(f"unknown photo {name!r}; available: "
                   f"{', '.join(loaders)}")
  return _as_rgb_uint8(loaders[name]())


def crop_offsets(height: int, width: int, size: int,
                 stride: int) -> List[Tuple[int, int]]:
  """Top-left corners of every `size` square at `stride` inside the image."""
  if height < size or width < size:
    return []
  return [(y, x) for y in range(0, height - size + 1, stride)
          for x in range(0, width - size + 1, stride)]


def spread(offsets: List[Tuple[int, int]], limit: int
           ) -> List[Tuple[int, int]]:
  """At most `limit` of `offsets` (0: all), evenly spaced in raster order, so
  that a large photo covers itself without outweighing the small ones."""
  if not limit or len(offsets) <= limit:
    return offsets
  keep = np.unique(np.linspace(0, len(offsets) - 1, limit).round().astype(int))
  return [offsets[i] for i in keep]


def iter_crops(pixels: np.ndarray, size: int, stride: int, limit: int = 0
               ) -> Iterator[Tuple[int, int, np.ndarray]]:
  """(y, x, crop) for each `size` square at `stride` (raster order), at most
  `limit` of them spread over the photo (0: all)."""
  h, w = pixels.shape[:2]
  for y, x in spread(crop_offsets(h, w, size, stride), limit):
    yield y, x, pixels[y:y + size, x:x + size]


def split_photos(names: Sequence[str], heldout: Sequence[str]
                 ) -> Tuple[List[str], List[str]]:
  """(training, held-out) photo names; every held-out name must be known."""
  unknown = [n for n in heldout if n not in names]
  if unknown:
    raise KeyError(f"held-out photo(s) {', '.join(unknown)} not available; "
                   f"available: {', '.join(names)}")
  train = [n for n in names if n not in heldout]
  if not train:
    raise ValueError("every photo is held out; keep at least one to train on")
  return train, [n for n in names if n in heldout]


def prepare(out: str, *, size: int = 32, stride: int = 16,
            max_crops: int = 0, heldout: Sequence[str] = DEFAULT_HELDOUT,
            photos: Sequence[str] = (),
            loader: Callable[[str], np.ndarray] = load_photo
            ) -> Dict[str, object]:
  """Writes training crops and held-out tiles under `out` (see module doc).

  Args:
    out: output folder (created; existing crops of the same names are
      overwritten).
    size: crop side in pixels (the model's resolution).
    stride: step between training crops (held-out tiles never overlap).
    max_crops: at most this many training crops per photo, spread over it
      (0: all), so that each photo weighs about the same in training.
    heldout: names of the photos kept out of training, whole.
    photos: which photos to use (default: all available).
    loader: name -> uint8 RGB pixels (tests pass generated images).

  Returns:
    The manifest written to OUT/photos.json.
  """
  if size < 1 or stride < 1:
    raise ValueError(f"size and stride must be positive (got {size}, {stride})")
  if max_crops < 0:
    raise ValueError(f"max_crops must be >= 0 (0: all), got {max_crops}")
  names = list(photos) if photos else list(available_photos())
  train, held = split_photos(names, heldout)
  manifest: Dict[str, object] = {"size": size, "stride": stride,
                                 "max_crops": max_crops,
                                 "train": {}, "heldout": {}}
  for part, group, step, limit in (("train", train, stride, max_crops),
                                   ("heldout", held, size, 0)):
    folder = os.path.join(out, part)
    os.makedirs(folder, exist_ok=True)
    for name in group:
      pixels = loader(name)
      count = 0
      for y, x, crop in iter_crops(pixels, size, step, limit):
        Image.fromarray(crop).save(
            os.path.join(folder, f"{name}_{y:04d}_{x:04d}.png"))
        count += 1
      manifest[part][name] = {"height": int(pixels.shape[0]),
                              "width": int(pixels.shape[1]), "crops": count}
  with open(os.path.join(out, "photos.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest
