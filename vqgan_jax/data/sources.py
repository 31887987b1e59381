"""Random-access example sources: scikit-learn digits and image folders.

A source knows how many examples it has and how to read example `i`; the
pipeline (`pipeline.py`) does sharding, shuffling, batching and error
handling on top. Neither source imports TensorFlow.
"""
import os
from typing import Any, Protocol, Sequence

import numpy as np

from vqgan_jax.data import images

# digits: the last 10% of scikit-learn's order is the validation split.
DIGITS_VALIDATION_FRACTION = 0.1


class Source(Protocol):
  """What the pipeline needs from a dataset.

  Attributes:
    name: a short description for messages.
    num_examples: number of examples (all processes together).
    num_classes: number of classes, or None when unknown or unlabelled.
    has_labels: whether examples carry an integer label.
  """
  name: str
  num_examples: int
  num_classes: int | None
  has_labels: bool

  def fetch(self, indices: Sequence[int]) -> list[Any]:
    """Reads the raw records of `indices` (I/O only, in the calling thread).

    Args:
      indices: example indices.

    Returns:
      One raw record per index, or the exception that reading it raised.
    """

  def decode(self, raw: Any) -> tuple[Any, int | None]:
    """Turns a raw record into (decoded PIL image, label or None).

    Args:
      raw: a record returned by `fetch` (never an exception).

    Returns:
      (image, label). Raises for unreadable images.
    """

  def describe(self, index: int) -> str:
    """A human-readable name for example `index` (a path, an index)."""


class ArraySource:
  """Examples held in memory as uint8 arrays (used for digits).

  Args:
    name: description for messages.
    pixels: uint8 (N, H, W) or (N, H, W, C).
    labels: int (N,) or None.
    num_classes: number of classes, or None.
  """

  def __init__(self, name: str, pixels: np.ndarray, labels: np.ndarray | None,
               num_classes: int | None):
    self.name = name
    self.pixels = pixels
    self.labels = labels
    self.num_examples = len(pixels)
    self.num_classes = num_classes
    self.has_labels = labels is not None

  def fetch(self, indices: Sequence[int]) -> list[Any]:
    return [int(i) for i in indices]

  def decode(self, raw: Any) -> tuple[Any, int | None]:
    label = None if self.labels is None else int(self.labels[raw])
    return images.open_image(self.pixels[raw]), label

  def describe(self, index: int) -> str:
    return f'{self.name}[{index}]'


def digits_source(split: str) -> ArraySource:
  """scikit-learn's 8x8 handwritten digits (1797 images, shipped, no download).

  Pixels 0..16 become uint8 0..255 (`round(x * 255 / 16)`); the pipeline then
  enlarges them to the training resolution (bicubic) like any small image.
  The split is deterministic: the first 90% of scikit-learn's order (1617
  images) is 'train', the last 10% (180 images, every class present) is
  'validation' (alias 'test'); 'all' is both.

  Args:
    split: 'train', 'validation', 'test' or 'all'.

  Returns:
    An ArraySource with labels 0-9.
  """
  from sklearn.datasets import load_digits
  digits = load_digits()
  pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int32)
  num_val = int(round(len(pixels) * DIGITS_VALIDATION_FRACTION))
  bounds = {'train': slice(0, len(pixels) - num_val),
            'validation': slice(len(pixels) - num_val, None),
            'test': slice(len(pixels) - num_val, None),
            'all': slice(None)}
  if split not in bounds:
    raise ValueError(f'digits has no split {split!r}; use one of '
                     f'{sorted(bounds)}.')
  part = bounds[split]
  return ArraySource(f'digits:{split}', pixels[part], labels[part], 10)


class FolderSource:
  """Image files found recursively under a folder.

  Files are sorted by path. If every image sits inside a first-level
  subfolder, the sorted subfolder names are the classes (label = rank);
  otherwise there are no labels. Files whose suffix is not an image suffix
  (`images.IMAGE_SUFFIXES`) and hidden files are ignored and counted.

  Args:
    root: the folder.

  Raises:
    FileNotFoundError: the folder is missing, not a folder, or holds no image.
  """

  def __init__(self, root: str):
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
      what = 'is not a folder' if os.path.exists(root) else 'does not exist'
      raise FileNotFoundError(
          f'folder:{root} {what}; point config.dataset at a folder of images, '
          f'e.g. --config.dataset=folder:/data/my_images')
    self.root = root
    self.paths, self.ignored_files = _list_images(root)
    if not self.paths:
      raise FileNotFoundError(
          f'folder:{root} holds no image files (looked recursively for '
          f'{", ".join(sorted(images.IMAGE_SUFFIXES))}; '
          f'{self.ignored_files} other files ignored); add images or fix the '
          f'path.')
    self.classes, self.labels = _folder_labels(root, self.paths)
    self.name = f'folder:{root}'
    self.num_examples = len(self.paths)
    self.num_classes = len(self.classes) if self.classes else None
    self.has_labels = self.labels is not None

  def fetch(self, indices: Sequence[int]) -> list[Any]:
    return [int(i) for i in indices]

  def decode(self, raw: Any) -> tuple[Any, int | None]:
    label = None if self.labels is None else int(self.labels[raw])
    return images.open_image(self.paths[raw]), label

  def describe(self, index: int) -> str:
    return self.paths[index]


def _list_images(root: str) -> tuple[list[str], int]:
  """Sorted image paths under `root` and the number of other files."""
  paths, ignored = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    for filename in filenames:
      suffix = os.path.splitext(filename)[1].lower()
      if filename.startswith('.') or suffix not in images.IMAGE_SUFFIXES:
        ignored += 1
      else:
        paths.append(os.path.join(dirpath, filename))
  return sorted(paths), ignored


def _folder_labels(
    root: str, paths: list[str]) -> tuple[list[str], np.ndarray | None]:
  """Classes from first-level subfolders, if every image is inside one."""
  parts = [os.path.relpath(p, root).split(os.sep) for p in paths]
  if any(len(p) < 2 for p in parts):
    return [], None
  classes = sorted({p[0] for p in parts})
  rank = {name: i for i, name in enumerate(classes)}
  return classes, np.array([rank[p[0]] for p in parts], np.int32)
