"""A VQGAN against classical codecs on held-out photo crops, at equal bits.

`report(data, vqgan_dir)` reads the crops `vqgan_jax.data.photos.prepare`
wrote, reconstructs the held-out tiles with the VQGAN, with shrink-and-enlarge
at no more bits and with k-means VQ at the same bits
(`benchmarks.photos.baselines`), and scores all of them with the same PSNR and
SSIM (`vqgan_jax.metrics`, on [0, 1] images, reconstructions clipped as when
saved), plus the model's codebook usage on the held-out tiles.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Optional

import numpy as np
from PIL import Image

from benchmarks.photos import baselines as bl


def read_crops(folder: str, limit: Optional[int] = None, seed: int = 0
               ) -> np.ndarray:
  """uint8 (N, H, W, 3) from the PNG files of a folder (sorted; `limit`
  files drawn at random without replacement)."""
  paths = sorted(glob.glob(os.path.join(folder, "*.png")))
  if not paths:
    raise FileNotFoundError(f"{folder} holds no .png crops (run "
                            "`python -m benchmarks.photos prepare` first)")
  if limit is not None and len(paths) > limit:
    rng = np.random.default_rng(seed)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), limit,
                                                 replace=False))]
  return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def scores(originals: np.ndarray, recs: np.ndarray) -> Dict[str, float]:
  """Mean PSNR and SSIM of uint8 reconstructions against uint8 originals."""
  from vqgan_jax import metrics  # pylint: disable=g-import-not-at-top
  a = originals.astype(np.float32) / 255.0
  b = recs.astype(np.float32) / 255.0
  return {"psnr": float(np.mean(metrics.psnr(a, b))),
          "ssim": float(np.mean(metrics.ssim(a, b)))}


def vqgan_reconstruct(vqgan_dir: str, images: np.ndarray,
                      batch_size: int = 64):
  """(uint8 reconstructions, int32 codes, model) of uint8 images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vqgan_jax import checkpoint  # pylint: disable=g-import-not-at-top
  model, variables = checkpoint.load_vqgan(vqgan_dir)
  if images.shape[1] != model.resolution:
    raise ValueError(f"crops are {images.shape[1]} px but the VQGAN in "
                     f"{vqgan_dir} is trained at {model.resolution} px")

  @jax.jit
  def run(x):
    codes = model.apply(variables, x, method=model.encode_to_indices)
    rec = model.apply(variables, codes, method=model.decode_indices)
    return codes, jnp.clip(rec, -1.0, 1.0)

  recs, codes = [], []
  for s in range(0, len(images), batch_size):
    x = images[s:s + batch_size].astype(np.float32) / 127.5 - 1.0
    c, r = jax.device_get(run(jnp.asarray(x)))
    codes.append(c)
    recs.append(np.round((r + 1.0) * 127.5).astype(np.uint8))
  return np.concatenate(recs), np.concatenate(codes), model


def write_grid(path: str, originals: np.ndarray, recs: np.ndarray,
               columns: int = 16, scale: int = 2) -> None:
  """Rows of originals, each above the row of their reconstructions."""
  n = min(len(originals), columns * 4)
  pick = np.linspace(0, len(originals) - 1, n).astype(int)
  rows = []
  for s in range(0, n, columns):
    idx = pick[s:s + columns]
    pad = columns - len(idx)
    for src in (originals, recs):
      row = np.concatenate(list(src[idx]), axis=1)
      if pad:
        row = np.pad(row, ((0, 0), (0, pad * src.shape[2]), (0, 0)))
      rows.append(row)
  grid = np.concatenate(rows, axis=0)
  img = Image.fromarray(grid)
  img = img.resize((img.width * scale, img.height * scale),
                   Image.Resampling.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)


def report(data: str, vqgan_dir: str, *, kmeans_blocks: int = 100_000,
           seed: int = 0, grid: Optional[str] = None) -> Dict[str, Any]:
  """Held-out PSNR / SSIM of the VQGAN and the baselines (module doc)."""
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top
  held = read_crops(os.path.join(data, "heldout"))
  recs, codes, model = vqgan_reconstruct(vqgan_dir, held)
  n, h, w, c = held.shape
  f = 2**(len(model.ch_mult) - 1)
  k = int(model.n_embed)
  bits = bl.tokenizer_bits(h, w, f, k)
  out: Dict[str, Any] = {"heldout_crops": n, "crop": h, "factor": f,
                         "n_embed": k, "bits_per_pixel": bits / (h * w)}
  used = codes.ravel()
  out["vqgan"] = dict(scores(held, recs), bits_per_pixel=bits / (h * w),
                      codebook_usage=float(quantizers.codebook_usage(used, k)),
                      perplexity=float(quantizers.perplexity(used, k)))
  small = bl.shrink_size(h, w, bits, channels=c)
  out["shrink_enlarge"] = dict(
      scores(held, bl.shrink_enlarge(held, small)),
      size=list(small), bits_per_pixel=small[0] * small[1] * c * 8 / (h * w))
  # Enough training crops for `kmeans_blocks` blocks, drawn at random.
  per_crop = (h // f) * (w // f)
  train = read_crops(os.path.join(data, "train"),
                     limit=-(-kmeans_blocks // per_crop), seed=seed)
  out["kmeans_vq"] = dict(
      scores(held, bl.kmeans_vq(train, held, f, k, max_blocks=kmeans_blocks,
                                seed=seed)),
      block=[f, f, c], codes=k, bits_per_pixel=bits / (h * w))
  mean = np.broadcast_to(held.mean(axis=(1, 2), keepdims=True).round()
                         .astype(np.uint8), held.shape)
  out["mean_colour"] = dict(scores(held, mean),
                            bits_per_pixel=c * 8 / (h * w))
  grid = grid or os.path.join(vqgan_dir, "photos_heldout.png")
  write_grid(grid, held, recs)
  out["grid"] = grid
  return out


def table(r: Dict[str, Any]) -> str:
  """A Markdown table of `report`'s result."""
  lines = [f"{r['heldout_crops']} held-out {r['crop']}x{r['crop']} crops; "
           f"VQGAN f{r['factor']}, {r['n_embed']} codes",
           "| codec | bits/pixel | PSNR (dB) | SSIM |", "|---|---:|---:|---:|"]
  names = {"vqgan": "VQGAN", "shrink_enlarge": "shrink-and-enlarge to {}x{}",
           "kmeans_vq": "k-means VQ, {} codes over {}x{}x{} blocks",
           "mean_colour": "mean colour"}
  for key, name in names.items():
    v = r[key]
    if key == "shrink_enlarge":
      name = name.format(*v["size"])
    elif key == "kmeans_vq":
      name = name.format(v["codes"], *v["block"])
    lines.append(f"| {name} | {v['bits_per_pixel']:.3f} | {v['psnr']:.2f} | "
                 f"{v['ssim']:.4f} |")
  lines.append(f"VQGAN codebook usage on the held-out crops: "
               f"{100 * r['vqgan']['codebook_usage']:.1f}%")
  return "\n".join(lines)
