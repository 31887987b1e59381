r"""Encode a folder of images to code grids and reconstruct them.

    python -m vqgan_jax.reconstruct --model=DIR --images=FOLDER --out=OUT \
        [--resolution=256] [--batch_size=8] [--bf16]

``DIR`` is a converted reference checkpoint or a stage-1 training workdir.
For every image ``FOLDER/a/b.jpg`` it writes ``OUT/codes/a/b.npy`` (int32
code grid) and ``OUT/reconstructions/a/b.png``, and prints PSNR, codebook
usage and images/s. Images are resized (smallest side) and centre-cropped as
for evaluation. Unreadable files are skipped and listed.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from vqgan_jax import checkpoint
from vqgan_jax import cli
from vqgan_jax import console
from vqgan_jax import quantizers
from vqgan_jax.data import images as image_lib


def find_images(root: str) -> List[str]:
  """Image files under ``root``, recursively, as sorted relative paths."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder not found: {root}")
  found = []
  for dirpath, _, files in os.walk(root):
    for name in files:
      if os.path.splitext(name)[1].lower() in image_lib.IMAGE_SUFFIXES:
        found.append(os.path.relpath(os.path.join(dirpath, name), root))
  if not found:
    raise FileNotFoundError(
        f"no images under {root} (looked for {sorted(image_lib.IMAGE_SUFFIXES)})")
  return sorted(found)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, clipping as the reference's saving code does."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of [-1, 1] images (peak-to-peak 2)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64))**2,
                axis=tuple(range(1, a.ndim)))
  return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def _batches(root: str, paths: Sequence[str], resolution: int, channels: int,
             batch_size: int, skipped: List[str]
             ) -> Iterator[Tuple[List[str], np.ndarray]]:
  names, arrays = [], []
  for rel in paths:
    try:
      img = image_lib.open_image(os.path.join(root, rel))
      arr, _ = image_lib.preprocess(img, resolution, channels)
    except Exception as e:  # pylint: disable=broad-except
      skipped.append(f"{rel} ({type(e).__name__}: {e})")
      continue
    names.append(rel)
    arrays.append(arr)
    if len(names) == batch_size:
      yield names, np.stack(arrays)
      names, arrays = [], []
  if names:
    yield names, np.stack(arrays)


def reconstruct_folder(model_dir: str, image_dir: str, out_dir: str, *,
                       resolution: int | None = None, batch_size: int = 8,
                       dtype=None, progress: bool = True) -> dict:
  """Runs the tool; returns a summary dict (counts, psnr, usage, img/s)."""
  model, variables = checkpoint.load_vqgan(model_dir, dtype=dtype)
  resolution = resolution or model.resolution
  f = model.downsample_factor
  if resolution % f:
    raise ValueError(f"--resolution {resolution} is not divisible by the "
                     f"model's downsampling factor {f}")
  paths = find_images(image_dir)

  @jax.jit
  def run(variables, x):
    codes = model.apply(variables, x, method=model.encode_to_indices)
    return codes, model.apply(variables, codes, method=model.decode_indices)

  skipped: List[str] = []
  psnrs, hist = [], np.zeros(model.n_embed)
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(paths), unit="img", disable=not progress)
  except ImportError:  # pragma: no cover
    bar = None
  watch = console.Stopwatch()  # the rate leaves compilation out
  for names, x in _batches(image_dir, paths, resolution, model.in_channels,
                           batch_size, skipped):
    n = len(names)
    if n < batch_size:  # pad the last batch to the compiled shape
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    with watch:
      codes, rec = jax.device_get(run(variables, jnp.asarray(x)))
    watch.count(n)
    codes, rec, x = codes[:n], rec[:n], x[:n]
    psnrs.extend(psnr(x, rec).tolist())
    hist += np.bincount(codes.ravel(), minlength=model.n_embed)
    for name, c, r in zip(names, codes, rec):
      stem = os.path.splitext(name)[0]
      for sub, ext in (("codes", ".npy"), ("reconstructions", ".png")):
        os.makedirs(os.path.dirname(os.path.join(out_dir, sub, stem + ext)),
                    exist_ok=True)
      np.save(os.path.join(out_dir, "codes", stem + ".npy"), c.astype(np.int32))
      pixels = to_uint8(r)
      Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
          os.path.join(out_dir, "reconstructions", stem + ".png"))
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  summary = {
      "images": len(psnrs),
      "skipped": skipped,
      "psnr_db": float(np.mean(psnrs)) if psnrs else float("nan"),
      "codebook_usage": float(np.mean(hist > 0)),
      "perplexity": float(quantizers.perplexity(
          jnp.repeat(jnp.arange(model.n_embed), hist.astype(np.int32)),
          model.n_embed)) if hist.sum() else 0.0,
      "img_per_sec": watch.rate,
      "compile_seconds": watch.compile_seconds,
  }
  return summary


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, defined on ``fv``."""
  flags.DEFINE_string("model", None, "Converted checkpoint directory or "
                      "stage-1 workdir.", flag_values=fv)
  flags.DEFINE_string("images", None, "Folder of images (searched "
                      "recursively).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
  flags.DEFINE_integer("resolution", None, "Crop size (default: the model's "
                       "training resolution).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Images per jitted batch.",
                       flag_values=fv)
  flags.DEFINE_bool("bf16", False, "Compute in bfloat16.", flag_values=fv)
  flags.mark_flags_as_required(["model", "images", "out"], flag_values=fv)


def main(argv=None) -> int:
  """The command line (``argv`` without the program name); returns the exit
  status: 0 done, 2 a command-line mistake or a missing input."""
  fv = flags.FlagValues()
  define_flags(fv)
  cli.parse(fv, argv, __doc__, prog="python -m vqgan_jax.reconstruct")
  try:
    s = reconstruct_folder(fv.model, fv.images, fv.out,
                           resolution=fv.resolution,
                           batch_size=fv.batch_size,
                           dtype=jnp.bfloat16 if fv.bf16 else None)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  for line in s["skipped"]:
    print(f"skipped {line}", file=sys.stderr)
  print(f"{s['images']} images -> {fv.out}: PSNR {s['psnr_db']:.2f} dB, "
        f"codebook usage {100 * s['codebook_usage']:.1f}%, perplexity "
        f"{s['perplexity']:.1f}, {s['img_per_sec']:.1f} img/s not counting "
        f"{s['compile_seconds']:.1f} s of compilation ({len(s['skipped'])} "
        "skipped)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
