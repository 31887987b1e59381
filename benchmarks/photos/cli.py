r"""Real photographs, offline: crops for training, held-out tiles, baselines.

    python -m benchmarks.photos prepare --out=runs/photos_data
    python -m benchmarks.photos report --data=runs/photos_data \
        --vqgan=runs/photos_vqgan --output=runs/photos_vqgan/photos.json

``prepare`` cuts crops of scikit-image's and scikit-learn's bundled photos
(`vqgan_jax.data.photos`): whole photos named by ``--heldout`` are kept out of
training. ``report`` scores the VQGAN on the held-out tiles (PSNR, SSIM,
codebook usage) next to two classical codecs at the model's bit budget
(`benchmarks.photos.baselines`): shrink-and-enlarge with no more bits, and
k-means VQ over f x f x 3 pixel blocks with as many codes as the codebook,
fitted on the training crops. It writes a grid of held-out originals (top
row) above their reconstructions. ``scripts/run_photos.sh`` runs it all;
docs/photos.md has the measurements.
"""
from __future__ import annotations

import json
import os

from absl import flags

from vqgan_jax import cli

MODES = ("prepare", "report")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", None, "prepare: output folder.", flag_values=fv)
  flags.DEFINE_integer("size", 32, "prepare: crop side in pixels (the "
                       "model's resolution).", flag_values=fv)
  flags.DEFINE_integer("stride", 16, "prepare: step between training crops.",
                       flag_values=fv)
  flags.DEFINE_integer("max_crops", 1000, "prepare: at most this many "
                       "training crops per photo, spread over it, so that "
                       "large photos do not outweigh small ones (0: all).",
                       flag_values=fv)
  flags.DEFINE_list("heldout", ["chelsea", "china"], "prepare: photos kept "
                    "out of training, whole.", flag_values=fv)
  flags.DEFINE_list("photos", [], "prepare: photos to use (default: all "
                    "available).", flag_values=fv)
  flags.DEFINE_string("data", None, "report: a folder written by prepare.",
                      flag_values=fv)
  flags.DEFINE_string("vqgan", None, "report: stage-1 workdir.",
                      flag_values=fv)
  flags.DEFINE_integer("kmeans_blocks", 100_000, "report: training blocks "
                       "the k-means baseline is fitted on.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "report: k-means seed.", flag_values=fv)
  flags.DEFINE_string("output", None, "report: write the numbers as JSON "
                      "here.", flag_values=fv)
  flags.DEFINE_string("grid", None, "report: write the reconstruction grid "
                      "here (default: VQGAN/photos_heldout.png).",
                      flag_values=fv)


def _prepare(fv) -> int:
  from vqgan_jax.data import photos  # pylint: disable=g-import-not-at-top
  if not fv.out:
    cli.fail("prepare needs --out=DIR")
  if fv.size < 1 or fv.stride < 1:
    cli.fail(f"--size and --stride must be positive (got {fv.size}, "
             f"{fv.stride})")
  if fv.max_crops < 0:
    cli.fail(f"--max_crops must be >= 0 (0: all), got {fv.max_crops}")
  wanted = set(fv.heldout) | set(fv.photos)
  if not photos.skimage_available() and wanted & set(photos.SKIMAGE_PHOTOS):
    cli.fail(f"prepare {photos.MISSING}")
  try:
    manifest = photos.prepare(fv.out, size=fv.size, stride=fv.stride,
                              max_crops=fv.max_crops, heldout=fv.heldout,
                              photos=fv.photos)
  except (KeyError, ValueError) as e:
    cli.fail(str(e.args[0]) if e.args else e)
  for part in ("train", "heldout"):
    got = manifest[part]
    crops = sum(v["crops"] for v in got.values())
    print(f"{part}: {crops} crops of {len(got)} photos ({', '.join(got)}) "
          f"-> {os.path.join(fv.out, part)}")
  return 0


def _report(fv) -> int:
  if not fv.data or not fv.vqgan:
    cli.fail("report needs --data=DIR (from prepare) and --vqgan=DIR")
  for flag, path in (("data", os.path.join(fv.data, "heldout")),
                     ("vqgan", fv.vqgan)):
    if not os.path.isdir(path):
      cli.fail(f"--{flag}: {path} is not a folder")
  from benchmarks.photos import report as photo_report  # pylint: disable=g-import-not-at-top
  try:
    result = photo_report.report(fv.data, fv.vqgan, kmeans_blocks=fv.kmeans_blocks,
                                 seed=fv.seed, grid=fv.grid)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(e)
  print(photo_report.table(result))
  if fv.output:
    os.makedirs(os.path.dirname(os.path.abspath(fv.output)), exist_ok=True)
    with open(fv.output, "w") as f:
      json.dump(result, f, indent=1)
    print(f"metrics -> {fv.output}")
  return 0


def main(argv=None) -> int:
  """``argv``: the mode, then flags (without the program name)."""
  fv = flags.FlagValues()
  define_flags(fv)
  rest = cli.parse(fv, argv, __doc__, "python -m benchmarks.photos",
                   max_args=1)
  if len(rest) != 1 or rest[0] not in MODES:
    cli.fail(f"give one mode: {' | '.join(MODES)}")
  return _prepare(fv) if rest[0] == "prepare" else _report(fv)

