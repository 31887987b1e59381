"""Sampling images from a trained (or converted) stage-2 model.

``sample.py`` parses flags and calls :func:`sample_images`. The transformer
directory's ``model.json`` says how it is conditioned and where its VQGAN
is; tokens are sampled with :func:`vqgan_jax.sampling.sample` (or the
sliding window for grids larger than the training grid), put back in raster
order and decoded by the VQGAN.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import conditioning as cond_lib
from vqgan_jax import console
from vqgan_jax import image_io
from vqgan_jax import sampling
from vqgan_jax import sliding_window


def shard_batch(x: np.ndarray):
  """Places a batch across all devices (leading axis) when it divides evenly.

  The sampler's jit follows its input: the key/value cache, the scan and
  the decoder then run data-parallel, one slice of the batch per device.
  """
  n = jax.device_count()
  if n == 1 or len(x) % n:
    return jnp.asarray(x)
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  return jax.device_put(x, NamedSharding(mesh, P("data")))


def _resolve(base: str, path: Optional[str]) -> Optional[str]:
  if not path:
    return None
  return path if os.path.isabs(path) else os.path.join(base, path)


def load_pipeline(workdir: str):
  """``(info, gpt, gpt_vars, vqgan, vqgan_vars)`` of a transformer directory."""
  workdir = os.path.abspath(workdir)
  info = ckpt_lib.read_model_json(workdir, "transformer")
  model, variables = ckpt_lib.load_transformer(workdir)
  vq_dir = _resolve(workdir, info.get("vqgan")) or os.path.join(workdir, "vqgan")
  vq_model, vq_vars = ckpt_lib.load_vqgan(vq_dir)
  return info, model, variables, vq_model, vq_vars


# The settings of a model whose model.json has none (converted checkpoints,
# older workdirs): plain sampling from the model's distribution.
SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0,
                         guidance_scale=1.0)


def sampling_defaults(workdir: str) -> Dict[str, float]:
  """The sampling settings a transformer was trained to be sampled with
  (``config.sampling``, kept in its ``model.json``); `sample.py` uses them
  for the flags it is not given. ``top_k=0``, ``top_p=1`` and
  ``guidance_scale=1`` mean off."""
  info = ckpt_lib.read_model_json(os.path.abspath(workdir), "transformer")
  saved = info.get("sampling") or {}
  return {k: type(v)(saved.get(k, v)) for k, v in SAMPLING_DEFAULTS.items()}


def resolve_sampling(defaults: Dict[str, float], *,
                     sliding_window: bool = False, **given
                     ) -> Tuple[Dict[str, object], List[str]]:
  """`sample_images` keyword arguments from the settings given (None: not
  given) and a model's `sampling_defaults`; also the names taken from the
  model. The sliding window samples without guidance, so a guidance scale
  from the model is dropped there (one given explicitly is not)."""
  chosen, from_model = {}, []
  for name, neutral in SAMPLING_DEFAULTS.items():
    value = given.get(name)
    chosen[name] = defaults.get(name, neutral) if value is None else value
    if value is None and chosen[name] != neutral:
      from_model.append(name)
  if sliding_window and "guidance_scale" in from_model:
    chosen["guidance_scale"] = 1.0
    from_model.remove("guidance_scale")
  scale = chosen["guidance_scale"]
  return dict(temperature=chosen["temperature"],
              top_k=int(chosen["top_k"]) or None,
              top_p=None if chosen["top_p"] >= 1.0 else chosen["top_p"],
              guidance_scale=None if scale == 1.0 else scale), from_model


def _prefixes(info, classes, num_samples, cond_codes) -> tuple:
  c = info["conditioning"]
  kind = c["kind"]
  if kind == "class":
    n = c.get("num_classes")
    classes = list(range(n)) if classes is None else list(classes)
    bad = [k for k in classes if not 0 <= k < n]
    if bad:
      raise ValueError(f"--classes {bad} out of range: the model has {n} "
                       f"classes (0..{n - 1})")
    labels = np.repeat(np.asarray(classes, np.int32), num_samples)
    return labels[:, None], labels
  if classes:
    raise ValueError(f"--classes given, but the model is conditioned on "
                     f"{kind!r}, not on classes")
  if kind == "sos":
    return np.full((num_samples, 1), c.get("sos_token", 0), np.int32), None
  if cond_codes is None:
    raise ValueError(f"a {kind!r}-conditioned model needs conditioning "
                     "(--cond_images for 'codes')")
  return np.repeat(cond_codes, num_samples, axis=0), None


def _cover_crop(image, height: int, width: int):
  """Resizes `image` to cover height x width (aspect kept), centre-crops."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = max(height / image.height, width / image.width)
  size = (max(width, round(image.width * scale)),
          max(height, round(image.height * scale)))
  image = image.resize(size, Image.BICUBIC)
  left, top = (size[0] - width) // 2, (size[1] - height) // 2
  return image.crop((left, top, left + width, top + height))


def encode_condition_images(info, folder: str, workdir: str,
                            grid: Optional[Sequence[int]] = None
                            ) -> np.ndarray:
  """Codes of the conditioning images (for 'codes' models).

  Args:
    info: the transformer's model.json.
    folder: folder of conditioning images (found recursively, sorted).
    workdir: the transformer directory (resolves the conditioning VQGAN).
    grid: None for the training resolution (returns (N, Lc) flat codes);
      (H, W) in tokens for the sliding window: each image is resized to
      cover H x W tokens of the conditioning VQGAN and centre-cropped, and
      the (N, H, W) code grids are returned.

  Returns:
    int32 codes, (N, Lc) or (N, H, W).
  """
  from vqgan_jax import reconstruct  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data import images as image_lib  # pylint: disable=g-import-not-at-top
  c = info["conditioning"]
  c_dir = _resolve(workdir, c.get("cond_vqgan")) or os.path.join(
      workdir, "cond_vqgan")
  model, variables = ckpt_lib.load_vqgan(c_dir)
  paths = reconstruct.find_images(folder)
  if not paths:
    raise FileNotFoundError(f"--cond_images={folder!r}: no images found")
  opened = [image_lib.open_image(os.path.join(folder, p)) for p in paths]
  if grid is None:
    x = np.stack([image_lib.preprocess(im, model.resolution,
                                       model.in_channels)[0] for im in opened])
  else:
    factor = 2 ** (len(model.ch_mult) - 1)
    height, width = grid[0] * factor, grid[1] * factor
    x = np.stack([image_lib.normalize(np.asarray(
        _cover_crop(image_lib.convert_mode(im, model.in_channels), height,
                    width), np.uint8).reshape(height, width, -1))
                  for im in opened])
  x = cond_lib.cond_images(x, c.get("cond_transform", "identity"))
  codes = np.asarray(model.apply(variables, jnp.asarray(x),
                                 method=model.encode_to_indices))
  return codes if grid is not None else codes.reshape(len(paths), -1)


def sample_images(workdir: str, outdir: str, *, classes: Optional[Sequence[int]] = None,
                  num_samples: int = 8, batch_size: int = 32, seed: int = 0,
                  temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None,
                  guidance_scale: Optional[float] = None,
                  guidance_schedule: str = "constant",
                  guidance_power: float = 2.0,
                  guidance_interval: Optional[Sequence[float]] = None,
                  speculative_window: int = 0,
                  grid: Optional[Sequence[int]] = None,
                  cond_images: Optional[str] = None, save_npz: bool = False,
                  progress: bool = True) -> Dict[str, object]:
  """Samples, decodes and writes PNGs; returns a summary dict.

  Its ``img_per_sec`` leaves out the seconds JAX spent compiling
  (``compile_seconds``, mostly the first batch's).
  """
  info, model, variables, vq_model, vq_vars = load_pipeline(workdir)
  h, w = info["image_grid"]
  perm = cond_lib.permutation(info.get("permuter", "identity"), h, w)
  big = grid is not None and tuple(grid) != (h, w)
  if big:
    if grid[0] < h or grid[1] < w:
      raise ValueError(f"--grid={grid[0]}x{grid[1]} is smaller than the "
                       f"model's {h}x{w} token window")
    if info.get("permuter", "identity") != "identity":
      raise ValueError("the sliding window needs raster order; this model "
                       f"uses permuter {info['permuter']!r}")
  cond_codes = None
  if cond_images:
    cond_codes = encode_condition_images(info, cond_images,
                                         os.path.abspath(workdir),
                                         grid=grid if big else None)
  if big and cond_codes is not None and cond_codes.shape[1:] != tuple(grid):
    raise ValueError(f"conditioning codes form a {cond_codes.shape[1:]} grid "
                     f"but --grid is {tuple(grid)}: the sliding window needs "
                     "conditioning and image VQGANs with the same "
                     "downsampling factor")
  prefix, labels = _prefixes(info, classes, num_samples, cond_codes)
  null = None
  if guidance_scale is not None:
    null_token = info["conditioning"].get("null_token")
    if null_token is None:
      raise ValueError("--guidance_scale needs a model trained with label "
                       "dropout (config.conditioning.label_dropout > 0)")
    null = np.full((1, 1), null_token, np.int32)
  if big and guidance_scale is not None:
    raise ValueError("guidance with the sliding window is not supported")
  if big and speculative_window:
    raise ValueError("--speculative_window does not apply to the sliding "
                     "window (--grid)")
  if guidance_scale is None and (guidance_schedule != "constant"
                                 or guidance_interval is not None):
    raise ValueError("--guidance_schedule / --guidance_interval need "
                     "--guidance_scale")
  total = len(prefix)
  rng = jax.random.PRNGKey(seed)
  tokens: List[np.ndarray] = []
  images: List[np.ndarray] = []
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, unit="img")
  # The rate leaves out the time JAX spends compiling (the first batch's).
  with console.Stopwatch() as watch:
    decode = jax.jit(lambda v, t: vq_model.apply(
        v, t, method=vq_model.decode_indices))
    for start in range(0, total, batch_size):
      p = prefix[start:start + batch_size]
      n = len(p)
      if n < batch_size and total > batch_size:  # keep one compiled shape
        p = np.concatenate([p, np.repeat(p[-1:], batch_size - n, 0)])
      rng, key = jax.random.split(rng)
      if big:
        toks = sliding_window.sample_sliding_window(
            model, variables, jnp.asarray(p), tuple(grid), (h, w), key,
            temperature=temperature, top_k=top_k, top_p=top_p)
        gh, gw = grid
        toks = np.asarray(toks)
      else:
        toks = sampling.sample(model, variables, shard_batch(p), h * w, key,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               guidance_scale=guidance_scale, null_prefix=null,
                               guidance_schedule=guidance_schedule,
                               guidance_power=guidance_power,
                               guidance_interval=guidance_interval,
                               speculative_window=speculative_window)
        toks = cond_lib.permute(np.asarray(toks), perm, inverse=True)
        gh, gw = h, w
        toks = toks.reshape(-1, gh, gw)
      img = np.asarray(decode(vq_vars, jnp.asarray(toks)))
      tokens.append(toks[:n])
      images.append(img[:n])
      watch.count(n)
      if bar is not None:
        bar.update(n)
  if bar is not None:
    bar.close()
  tokens_all = np.concatenate(tokens)
  images_all = np.concatenate(images)
  os.makedirs(outdir, exist_ok=True)
  ncol = num_samples if labels is not None else int(np.ceil(np.sqrt(total)))
  grid_path = os.path.join(outdir, "grid.png")
  image_io.save_png(grid_path, image_io.image_grid(images_all, ncol=ncol))
  for i, img in enumerate(images_all):
    name = (f"{labels[i]}_{i % num_samples:04d}.png" if labels is not None
            else f"{i:04d}.png")
    image_io.save_png(os.path.join(outdir, name),
                      image_io.image_grid(img[None], pad=0))
  if save_npz:
    pix = np.round((np.clip(images_all, -1, 1) + 1) * 127.5).astype(np.uint8)
    np.savez(os.path.join(outdir, "samples.npz"), images=pix, tokens=tokens_all,
             labels=labels if labels is not None else np.zeros(0))
  return {"images": total, "grid": grid_path, "img_per_sec": watch.rate,
          "compile_seconds": watch.compile_seconds,
          "tokens": tokens_all, "labels": labels}
