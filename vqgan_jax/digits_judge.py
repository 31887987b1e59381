"""An independent judge for class-conditional samples of the `digits` default.

A small CNN, trained here from a fixed seed on the real digits' training
split at the samples' resolution and with the pipeline's preprocessing
(scikit-learn's 8x8 digits enlarged bicubically, `x / 127.5 - 1`), reads each
generated sample and says which digit it shows. It never sees a sample in
training and shares no weights with the generator, so the fraction of samples
it recognises as their intended class measures class-conditional quality.

    judge = train_judge(resolution=16)          # seconds on a CPU
    judge.val_accuracy                          # on the held-out real digits
    images, labels = load_labelled_samples('runs/digits_samples')
    report = score_samples(judge, images, labels)
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

NUM_CLASSES = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LABEL_RE = re.compile(r"^(\d+)_")
GRID_NAME = "grid.png"  # written by sample.py next to the single samples


class DigitClassifier(nn.Module):
  """Two conv layers, a hidden dense layer and 10 logits (float32)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES, name="logits")(x).astype(jnp.float32)


@dataclasses.dataclass
class Judge:
  """A trained classifier and what it scored on the real held-out digits."""
  params: Any
  resolution: int
  val_accuracy: float
  seed: int

  def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted digits (int, (N,)) of (N, R, R, 1) images in [-1, 1]."""
    apply = jax.jit(DigitClassifier().apply)
    out = [np.argmax(jax.device_get(apply(self.params, jnp.asarray(
        images[i:i + batch_size]))), axis=-1)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def real_digits(split: str, resolution: int) -> Tuple[np.ndarray, np.ndarray]:
  """The real digits of a split through the project's pipeline, grey.

  Returns:
    (float32 images (N, R, R, 1) in [-1, 1], int32 labels (N,)).
  """
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.build_dataset("digits", resolution=resolution, split=split,
                          channels=1, process_index=0, process_count=1)
  images, labels = [], []
  for batch in ds.eval_iterator(256, prefetch=0):
    images.append(batch["image"][batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  return np.concatenate(images), np.concatenate(labels)


def _shift_augment(images: np.ndarray, rng: np.random.Generator,
                   max_shift: int = 1) -> np.ndarray:
  """Random translations by up to `max_shift` pixels (background fill -1)."""
  n, h, w, _ = images.shape
  p = max_shift
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * p + 1, (2, n))
  return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
                   for i in range(n)])


def train_judge(resolution: int = 16, *, seed: int = 0, steps: int = 800,
                batch_size: int = 64, learning_rate: float = 5e-3) -> Judge:
  """Trains the classifier on the real training digits (deterministic).

  Args:
    resolution: image side; must match the samples (16 for the default).
    seed: initialisation and batch order.
    steps: optimiser steps (800 take a few seconds on 2 CPU cores).
    batch_size: examples per step.
    learning_rate: peak Adam step size (cosine decay to 0).

  Returns:
    A `Judge` with its accuracy on the real validation split.
  """
  x_train, y_train = real_digits("train", resolution)
  x_val, y_val = real_digits("validation", resolution)
  model = DigitClassifier()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros(
      (1, resolution, resolution, 1), jnp.float32))
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  order = np.zeros((0,), np.int64)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(x_train))])
    idx, order = order[:batch_size], order[batch_size:]
    x = _shift_augment(x_train[idx], rng)
    params, opt_state = step(params, opt_state, jnp.asarray(x),
                             jnp.asarray(y_train[idx]))
  judge = Judge(params=params, resolution=resolution, val_accuracy=0.0,
                seed=seed)
  judge.val_accuracy = float(np.mean(judge.predict(x_val) == y_val))
  return judge


def label_from_name(name: str) -> int:
  """The class id a sample's file name starts with (`3_0007.png` -> 3).

  Raises:
    ValueError: the name does not start with `<digit>_` (sample.py writes
      class-conditional samples as `<class>_<index>.png`).
  """
  m = _LABEL_RE.match(os.path.basename(name))
  if not m:
    raise ValueError(f"sample file {name!r} does not start with a class id "
                     f"('<class>_<index>.png', as sample.py writes for "
                     f"class-conditional models)")
  return int(m.group(1))


def list_sample_files(directory: str) -> List[str]:
  """Image files directly in `directory`, sorted, without sample.py's grid."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"samples folder not found: {directory}")
  names = sorted(n for n in os.listdir(directory)
                 if n.lower().endswith(IMAGE_SUFFIXES) and n != GRID_NAME)
  if not names:
    raise FileNotFoundError(f"no sample images in {directory} (looked for "
                            f"{IMAGE_SUFFIXES}, ignoring {GRID_NAME})")
  return names


def load_sample_images(path: str) -> Tuple[np.ndarray, np.ndarray | None,
                                           List[str]]:
  """Reads samples from a folder of images or sample.py's `samples.npz`.

  Args:
    path: a folder (every image in it but `grid.png`) or an `.npz` with
      `images` (uint8 (N, H, W, C)) and optionally `labels`.

  Returns:
    (uint8 images (N, H, W, C), int labels (N,) or None, names). Folder
    labels come from file names when every name starts with a class id.

  Raises:
    FileNotFoundError: no such folder/file or no images in it.
    ValueError: images of different sizes, or an npz without `images`.
  """
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path) as f:
      if "images" not in f:
        raise ValueError(f"{path} has no 'images' array (keys: "
                         f"{sorted(f.keys())}); write it with sample.py --npz")
      images = np.asarray(f["images"])
      labels = np.asarray(f["labels"]) if "labels" in f else None
    if labels is not None and labels.size != len(images):
      labels = None  # sample.py writes an empty array when unconditional
    if images.ndim == 3:
      images = images[..., None]
    return images, labels, [f"{path}[{i}]" for i in range(len(images))]
  names = list_sample_files(path)
  arrays = []
  for n in names:
    with Image.open(os.path.join(path, n)) as img:
      a = np.asarray(img.convert("L" if img.mode in ("L", "1") else "RGB"))
    arrays.append(a[..., None] if a.ndim == 2 else a)
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f"samples in {path} have different sizes {sorted(shapes)}")
  labels = None
  if all(_LABEL_RE.match(n) for n in names):
    labels = np.array([label_from_name(n) for n in names])
  return np.stack(arrays), labels, names


def to_judge_input(images: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 (N, H, W, C) samples -> grey float32 (N, R, R, 1) in [-1, 1].

  RGB samples are converted with PIL's luma; other sizes are resized
  (bicubic, as the pipeline), although samples normally already have the
  VQGAN's resolution.
  """
  out = []
  for a in images:
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("L")
    if img.size != (resolution, resolution):
      img = img.resize((resolution, resolution), Image.BICUBIC)
    out.append(np.asarray(img, np.float32)[..., None] / 127.5 - 1.0)
  return np.stack(out)


def score_samples(judge: Judge, images: np.ndarray,
                  labels: np.ndarray) -> Dict[str, Any]:
  """Per-class and overall rate at which the judge sees the intended digit.

  Args:
    judge: a trained `Judge`.
    images: uint8 (N, H, W, C) samples.
    labels: the class each sample was generated for, ints in 0-9.

  Returns:
    {'accuracy', 'per_class_accuracy' {digit: rate}, 'per_class_count',
     'num_samples', 'confusion' (10x10 list, rows = intended class),
     'judge_val_accuracy', 'judge_seed', 'resolution'}.
  """
  labels = np.asarray(labels).astype(np.int64)
  if labels.shape != (len(images),):
    raise ValueError(f"need one label per sample: {labels.shape} labels for "
                     f"{len(images)} images")
  bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
  if bad.size:
    raise ValueError(f"digit labels must be 0-9, got {sorted(set(bad))}")
  pred = judge.predict(to_judge_input(images, judge.resolution))
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  np.add.at(confusion, (labels, pred), 1)
  per_class, counts = {}, {}
  for c in range(NUM_CLASSES):
    n = int(confusion[c].sum())
    if n:
      per_class[str(c)] = float(confusion[c, c] / n)
      counts[str(c)] = n
  return {
      "accuracy": float(np.mean(pred == labels)) if len(labels) else 0.0,
      "per_class_accuracy": per_class,
      "per_class_count": counts,
      "num_samples": int(len(labels)),
      "confusion": confusion.tolist(),
      "judge_val_accuracy": judge.val_accuracy,
      "judge_seed": judge.seed,
      "resolution": judge.resolution,
  }
