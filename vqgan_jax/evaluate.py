r"""Evaluates VQGANs and their samples: reconstruction, FID/IS, digits judge.

    python -m vqgan_jax.evaluate reconstruction --vqgan=DIR \
        [--dataset=digits|tfds:NAME[:SPLIT]|folder:PATH] [--split=validation] \
        [--lpips_vgg=vgg16.pth --lpips_lin=vgg.pth] [--num_examples=N]
    python -m vqgan_jax.evaluate samples --samples=DIR_OR_NPZ \
        --reference=DATASET_OR_DIR_OR_NPZ \
        --inception=pt_inception-2015-12-05-6726825d.pth
    python -m vqgan_jax.evaluate digits-judge --samples=DIR_OR_NPZ

`reconstruction` encodes and decodes a dataset split with a VQGAN (a stage-1
workdir or a converted checkpoint) and reports PSNR and SSIM (images in
[0, 1]), LPIPS when its weights are given, codebook usage and perplexity.
`samples` computes FID against the reference and the Inception Score of the
samples with the FID-standard Inception (weights by path, never downloaded).
`digits-judge` trains a small classifier on the real `digits` training split
and reports how often it sees the intended digit in class-conditional samples
(file names `<class>_<index>.png` as sample.py writes, or its samples.npz).
Every mode prints its numbers; `--output=FILE.json` writes them as JSON
(digits-judge writes `<samples>/judge.json` without it).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
import numpy as np

from vqgan_jax import cli

MODES = ("reconstruction", "samples", "digits-judge")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the tool's flags on `fv` (done by `main`, not on import)."""
  string, integer = flags.DEFINE_string, flags.DEFINE_integer
  string("vqgan", None, "reconstruction: stage-1 workdir or converted VQGAN "
         "directory.", flag_values=fv)
  string("dataset", "digits", "reconstruction: config.dataset string "
         "('digits', 'tfds:NAME[:SPLIT]', 'folder:PATH').", flag_values=fv)
  string("split", "validation", "Dataset split to evaluate on.",
         flag_values=fv)
  string("data_dir", None, "TFDS data_dir for tfds: datasets.",
         flag_values=fv)
  integer("num_examples", None, "Evaluate at most this many examples "
          "(default: the whole split / all samples).", flag_values=fv)
  integer("batch_size", 32, "Images per forward pass.", flag_values=fv)
  string("lpips_vgg", None, "torchvision VGG16 .pth (LPIPS trunk).",
         flag_values=fv)
  string("lpips_lin", None, "lpips v0.1 vgg.pth (LPIPS heads).",
         flag_values=fv)
  string("samples", None, "samples / digits-judge: folder of sample images "
         "(grid.png ignored) or sample.py's samples.npz.", flag_values=fv)
  string("reference", None, "samples: real images to compare with: a "
         "dataset string, a folder of images, an .npz of uint8 `images`, or "
         "an .npz of Inception statistics `mu`, `sigma`.", flag_values=fv)
  string("inception", None, "samples: path of pytorch-fid's "
         "pt_inception-2015-12-05-6726825d.pth.", flag_values=fv)
  integer("is_splits", 10, "samples: Inception Score splits.",
          flag_values=fv)
  integer("seed", 0, "digits-judge: classifier seed.", flag_values=fv)
  string("output", None, "Write the metrics as JSON here (default: "
         "<samples>/judge.json for digits-judge, else none).",
         flag_values=fv)


def _take(images: np.ndarray, labels, num: Optional[int]):
  if num is None:
    return images, labels
  return images[:num], None if labels is None else labels[:num]


def evaluate_reconstruction(vqgan_dir: str, dataset: str = "digits", *,
                            split: str = "validation",
                            data_dir: Optional[str] = None,
                            batch_size: int = 32,
                            num_examples: Optional[int] = None,
                            lpips_vgg: Optional[str] = None,
                            lpips_lin: Optional[str] = None) -> Dict[str, Any]:
  """Reconstruction metrics of a VQGAN over a dataset split.

  Args:
    vqgan_dir: stage-1 workdir or converted VQGAN directory.
    dataset: a `config.dataset` string.
    split: which split.
    data_dir: TFDS data_dir.
    batch_size: images per forward.
    num_examples: stop after this many examples.
    lpips_vgg: VGG16 weights for LPIPS (both LPIPS paths or neither).
    lpips_lin: LPIPS lin-head weights.

  Returns:
    {'examples', 'psnr', 'ssim', ['lpips',] 'codebook_usage', 'perplexity',
     'codes_used', 'n_embed', 'psnr_unclipped'}: means over examples;
    PSNR/SSIM on [0, 1] images with the reconstruction clipped as when
    saved ('psnr_unclipped': of the raw decoder output, as the trainer's
    eval_psnr).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vqgan_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  from vqgan_jax import metrics  # pylint: disable=g-import-not-at-top
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top

  if (lpips_vgg is None) != (lpips_lin is None):
    raise ValueError("LPIPS needs both --lpips_vgg (torchvision VGG16 .pth) "
                     "and --lpips_lin (lpips v0.1 vgg.pth), or neither")
  # The inputs named on the command line are checked before the model loads.
  try:
    data.check_dataset(dataset)
  except ValueError as e:
    raise ValueError(str(e).replace("config.dataset", "--dataset")) from None
  lp = None
  if lpips_vgg is not None:
    from vqgan_jax import lpips  # pylint: disable=g-import-not-at-top
    try:
      lp = lpips.load_lpips(lpips_vgg, lpips_lin)
    except FileNotFoundError as e:
      flag = "vgg" if repr(os.fspath(lpips_vgg)) in str(e) else "lin"
      raise FileNotFoundError(f"--lpips_{flag}: {e}") from None
  model, variables = checkpoint.load_vqgan(vqgan_dir)
  ds = data.build_dataset(dataset, resolution=model.resolution, split=split,
                          data_dir=data_dir, channels=model.in_channels,
                          process_index=0, process_count=1)

  @jax.jit
  def run(variables, lpips_variables, x):
    codes = model.apply(variables, x, method=model.encode_to_indices)
    raw = model.apply(variables, codes, method=model.decode_indices)
    rec = jnp.clip(raw, -1.0, 1.0)
    a, b = metrics.to_unit_range(x), metrics.to_unit_range(rec)
    out = {"psnr": metrics.psnr(a, b), "ssim": metrics.ssim(a, b),
           # as the trainer's eval_psnr: the decoder's raw output, [-1, 1]
           "psnr_unclipped": metrics.psnr(x, raw, max_value=2.0),
           "codes": codes}
    if lp is not None:
      rgb = lambda t: jnp.repeat(t, 3, -1) if t.shape[-1] == 1 else t
      out["lpips"] = lp[0].apply(lpips_variables, rgb(x), rgb(rec))
    return out

  sums: Dict[str, float] = {}
  hist = np.zeros(model.n_embed, np.int64)
  count = 0
  for batch in ds.eval_iterator(batch_size):
    mask = batch["mask"]
    if num_examples is not None:
      mask = mask & (np.cumsum(mask) + count <= num_examples)
    if not mask.any():
      break
    out = jax.device_get(run(variables, lp[1] if lp else None,
                             jnp.asarray(batch["image"])))
    for k, v in out.items():
      if k != "codes":
        sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v)[mask]))
    hist += np.bincount(out["codes"][mask].ravel(), minlength=model.n_embed)
    count += int(mask.sum())
  if not count:
    raise ValueError(f"no examples evaluated from {dataset} split {split!r}")
  result = {"examples": count, "dataset": dataset, "split": split}
  result.update({k: v / count for k, v in sums.items()})
  used = np.repeat(np.arange(model.n_embed), hist)
  result.update({
      "codebook_usage": float(quantizers.codebook_usage(used, model.n_embed)),
      "perplexity": float(quantizers.perplexity(used, model.n_embed)),
      "codes_used": int(np.sum(hist > 0)),
      "n_embed": int(model.n_embed),
  })
  return result


def _dataset_images(dataset: str, split: str, data_dir: Optional[str],
                    resolution: int, channels: int,
                    num: Optional[int]) -> np.ndarray:
  """uint8 images of a dataset split at `resolution` (centre crops)."""
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.build_dataset(dataset, resolution=resolution, split=split,
                          data_dir=data_dir, channels=channels,
                          process_index=0, process_count=1)
  out, count = [], 0
  for batch in ds.eval_iterator(64):
    x = batch["image"][batch["mask"]]
    out.append(np.round((x + 1.0) * 127.5).astype(np.uint8))
    count += len(x)
    if num is not None and count >= num:
      break
  return np.concatenate(out)[:num]


def _reference_statistics(reference: str, model, variables, apply_fn, *,
                          split: str,
                          data_dir: Optional[str], resolution: int,
                          channels: int, batch_size: int,
                          num: Optional[int]) -> Tuple[np.ndarray, np.ndarray,
                                                       int]:
  """(mu, sigma, count) of the reference: stats npz, images or a dataset."""
  from vqgan_jax import digits_judge  # pylint: disable=g-import-not-at-top
  from vqgan_jax import inception  # pylint: disable=g-import-not-at-top
  from vqgan_jax import metrics  # pylint: disable=g-import-not-at-top
  if reference.endswith(".npz"):
    if not os.path.isfile(reference):
      raise FileNotFoundError(f"--reference file not found: {reference}")
    with np.load(reference) as f:
      if "mu" in f and "sigma" in f:
        return np.asarray(f["mu"]), np.asarray(f["sigma"]), -1
    images, _, _ = digits_judge.load_sample_images(reference)
  elif os.path.isdir(reference):
    images, _, _ = digits_judge.load_sample_images(reference)
  else:
    images = _dataset_images(reference, split, data_dir, resolution, channels,
                             num)
  images = images[:num] if num is not None else images
  feats, _ = inception.compute_features(model, variables, images, batch_size,
                                        apply_fn)
  mu, sigma = metrics.feature_statistics(feats)
  return mu, sigma, len(images)


def evaluate_samples(samples: str, reference: str, inception_path: str, *,
                     split: str = "validation", data_dir: Optional[str] = None,
                     batch_size: int = 32, num_examples: Optional[int] = None,
                     is_splits: int = 10,
                     inception_size: int = 299) -> Dict[str, Any]:
  """FID of samples against a reference, and the samples' Inception Score.

  Args:
    samples: folder of sample images or sample.py's samples.npz.
    reference: dataset string, image folder, images .npz or statistics .npz
      (`mu`, `sigma`, as pytorch-fid saves them).
    inception_path: pytorch-fid's Inception weights file.
    split: reference split when `reference` is a dataset string.
    data_dir: TFDS data_dir.
    batch_size: images per Inception forward.
    num_examples: use at most this many samples (and reference images).
    is_splits: Inception Score splits (fewer when there are fewer samples).
    inception_size: the Inception's input size; 299 is the standard, and
      FIDs at other sizes are not comparable with published ones.

  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'num_samples',
     'num_reference'}.
  """
  from vqgan_jax import digits_judge  # pylint: disable=g-import-not-at-top
  from vqgan_jax import inception  # pylint: disable=g-import-not-at-top
  from vqgan_jax import metrics  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model, variables = inception.load_inception(inception_path,
                                              resize_to=inception_size)
  apply_fn = jax.jit(model.apply)
  images, _, _ = digits_judge.load_sample_images(samples)
  images, _ = _take(images, None, num_examples)
  feats, logits = inception.compute_features(model, variables, images,
                                             batch_size, apply_fn)
  mu, sigma = metrics.feature_statistics(feats)
  mu_r, sigma_r, n_ref = _reference_statistics(
      reference, model, variables, apply_fn, split=split, data_dir=data_dir,
      resolution=images.shape[1], channels=images.shape[-1],
      batch_size=batch_size, num=num_examples)
  score, score_std = metrics.inception_score(
      logits, max(1, min(is_splits, len(images) // 2)))
  return {"fid": metrics.frechet_distance(mu, sigma, mu_r, sigma_r),
          "inception_score": score, "inception_score_std": score_std,
          "num_samples": int(len(images)), "num_reference": int(n_ref)}


def evaluate_digits_judge(samples: str, *, seed: int = 0,
                          num_examples: Optional[int] = None
                          ) -> Dict[str, Any]:
  """Scores class-conditional digit samples with a freshly trained judge."""
  from vqgan_jax import digits_judge  # pylint: disable=g-import-not-at-top
  images, labels, _ = digits_judge.load_sample_images(samples)
  if labels is None:
    raise ValueError(f"{samples} has no class labels: the judge needs "
                     f"class-conditional samples named '<class>_<index>.png' "
                     f"or a samples.npz with 'labels'")
  images, labels = _take(images, labels, num_examples)
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"samples must be square, got {images.shape[1:3]}")
  judge = digits_judge.train_judge(images.shape[1], seed=seed)
  return digits_judge.score_samples(judge, images, labels)


def _print(mode: str, r: Dict[str, Any]) -> None:
  if mode == "reconstruction":
    line = (f"{r['examples']} examples of {r['dataset']}:{r['split']}: "
            f"PSNR {r['psnr']:.2f} dB (outputs clipped to [-1, 1]; "
            f"{r['psnr_unclipped']:.2f} dB unclipped, as the trainer's "
            f"eval_psnr), SSIM {r['ssim']:.4f}")
    if "lpips" in r:
      line += f", LPIPS {r['lpips']:.4f}"
    line += (f", codebook usage {100 * r['codebook_usage']:.1f}% "
             f"({r['codes_used']}/{r['n_embed']}), perplexity "
             f"{r['perplexity']:.1f}")
  elif mode == "samples":
    line = (f"{r['num_samples']} samples: FID {r['fid']:.2f} (reference "
            f"{r['num_reference']} images), Inception Score "
            f"{r['inception_score']:.3f} +- {r['inception_score_std']:.3f}")
  else:
    per = ", ".join(f"{c}: {100 * a:.0f}%"
                    for c, a in r["per_class_accuracy"].items())
    line = (f"judge (held-out accuracy on real digits "
            f"{100 * r['judge_val_accuracy']:.1f}%) recognises the intended "
            f"digit in {100 * r['accuracy']:.1f}% of {r['num_samples']} "
            f"samples\nper class: {per}")
  print(line)


def run(argv, fv: flags.FlagValues = flags.FLAGS) -> int:
  """Runs one mode from parsed flags; returns the exit status."""
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"give one mode: {' | '.join(MODES)} (got "
                         f"{argv[1:]})")
  mode = argv[1]
  try:
    if mode == "reconstruction":
      if not fv.vqgan:
        raise ValueError("reconstruction needs --vqgan=DIR (a stage-1 workdir "
                         "or a converted VQGAN)")
      result = evaluate_reconstruction(
          fv.vqgan, fv.dataset, split=fv.split,
          data_dir=fv.data_dir, batch_size=fv.batch_size,
          num_examples=fv.num_examples, lpips_vgg=fv.lpips_vgg,
          lpips_lin=fv.lpips_lin)
    elif mode == "samples":
      missing = [f"--{n}" for n in ("samples", "reference", "inception")
                 if not getattr(fv, n)]
      if missing:
        raise ValueError(f"samples needs {', '.join(missing)}")
      if not os.path.isfile(fv.inception):  # the message says where from
        try:
          from vqgan_jax import inception  # pylint: disable=g-import-not-at-top
          inception.load_inception(fv.inception)
        except FileNotFoundError as e:
          raise FileNotFoundError(f"--inception: {e}") from None
      result = evaluate_samples(
          fv.samples, fv.reference, fv.inception, split=fv.split,
          data_dir=fv.data_dir, batch_size=fv.batch_size,
          num_examples=fv.num_examples, is_splits=fv.is_splits)
    else:
      if not fv.samples:
        raise ValueError("digits-judge needs --samples=DIR_OR_NPZ")
      result = evaluate_digits_judge(fv.samples, seed=fv.seed,
                                     num_examples=fv.num_examples)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _print(mode, result)
  output = fv.output
  if output is None and mode == "digits-judge":
    base = (fv.samples if os.path.isdir(fv.samples)
            else os.path.dirname(fv.samples))
    output = os.path.join(base, "judge.json")
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(result, f, indent=1)
    print(f"metrics -> {output}")
  return 0


def main(argv=None) -> int:
  """The command line (``argv`` without the program name: the mode, then
  flags); returns the exit status: 0 done, 2 a command-line mistake or an
  unreadable input."""
  fv = flags.FlagValues()
  define_flags(fv)
  rest = cli.parse(fv, argv, __doc__, prog="python -m vqgan_jax.evaluate",
                   max_args=1)
  try:
    return run(["evaluate"] + rest, fv)
  except app.UsageError as e:
    cli.fail(e)


if __name__ == "__main__":
  sys.exit(main())
