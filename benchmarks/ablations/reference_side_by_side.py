r"""The reference and vqgan-jax trained side by side at equal steps.

    python -m benchmarks.ablations.reference_side_by_side --workdir=runs/side \
        [--seeds=0,1,2] [--steps=800] [--disc_start=400] [--eval_every=100] \
        [--options=ema_restart,l2_codes,rotation,lecam,gan_warmup,...] \
        [--photos=runs/photos_data]

For each seed: the reference (`taming-transformers`, the test oracle) builds
a VQGAN with `configs/digits_vqgan.py`'s architecture, its discriminator and
its loss (`VQLPIPSWithDiscriminator`: L1, adaptive-weight hinge GAN from
`--disc_start`, the legacy codebook loss; no perceptual term, whose VGG16
weights are a download). Its random initial weights, generator and
discriminator, are converted to this project's format, and both
implementations train from them:

* the reference in PyTorch, driven the way its Lightning module trains: per
  batch, a generator step (Adam, betas 0.5/0.9), then a fresh generator
  forward and a discriminator step;
* vqgan-jax with `train_vqgan.py`'s trainer (`--config.init_from` the
  converted weights), on the same quantizer (codebook learnt by its loss,
  legacy form), loss, learning rate and batch size; one generator forward per
  step, and the discriminator sees that step's reconstructions.

Both read the same batches in the same order (this project's `digits`
pipeline with the seed) and are scored the same way every `--eval_every`
steps: held-out PSNR over the 180 validation digits (the decoder's raw
output on [-1, 1], 10 log10(4 / MSE) per image, averaged) and the share of
codes in use. `--options` then trains vqgan-jax again from the same weights
with one of its own options switched on, on every seed.

With `--photos=DIR` (a folder written by `python -m benchmarks.photos
prepare`) both train on its crops with the folder config's `photos`
architecture (no augmentation: the reference reads the same batches) and are
scored on its held-out tiles instead.

Held-out PSNR moves by a few dB between neighbouring evaluations, so the
summary averages a window of them: before the GAN, the evaluations in the
second half of the steps before `--disc_start`; after, those in the second
half of the steps from `--disc_start` on (with the defaults: steps 300-400
and 700-800). It gives each run's windows per seed, then mean +- sd over the
seeds, and prints the PSNR curves (mean over the seeds). Writes
`results.json` under `--workdir` (with the CPU model). A finished run is
reused when the command runs again.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from absl import flags

from benchmarks.ablations import records
from vqgan_jax import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# vqgan-jax options tried on top of the like-for-like run: config overrides
# (dotted paths under the config).
OPTIONS: Dict[str, Dict[str, Any]] = {
    "ema_restart": {"model.quantizer_options.vq.codebook_update": "ema",
                    "model.quantizer_options.vq.codebook_ema_decay": 0.99,
                    "model.quantizer_options.vq.dead_code_threshold": 1.0},
    "fixed_commitment": {"model.quantizer_options.vq.legacy_loss": False},
    "l2_codes": {"model.quantizer_options.vq.l2_codes": True},
    "rotation": {"model.quantizer_options.vq.quantizer_grad": "rotation"},
    "lecam": {"loss.lecam_weight": 0.001},
    "gan_warmup": {"loss.disc_warmup_mode": "linear",
                   "loss.disc_warmup_steps": 200},
    # The reference's way: D trains on a second forward of the updated
    # generator (prices the one-forward step).
    "disc_fake_updated": {"loss.disc_fake": "updated"},
}


def base_config(arg: str, steps: int, disc_start: int, eval_every: int,
                seed: int, photos: str = ""):
  """`configs/digits_vqgan.py` (or, with ``photos``, the folder config's
  `photos` preset on ``photos``/train, evaluated on ``photos``/heldout) set
  to the reference's recipe."""
  from vqgan_jax_testing import train_utils  # pylint: disable=g-import-not-at-top
  if photos:
    c = train_utils.load_config(
        "folder_vqgan", os.path.join(photos, "train") + ",photos")
    c.eval_dataset = "folder:" + os.path.join(photos, "heldout")
    c.augment = ()  # the reference trains on the same plain batches
  else:
    c = train_utils.load_config("digits_vqgan", arg)
  c.model.quantizer_options.vq.update(dict(
      codebook_update="loss", dead_code_threshold=0.0, legacy_loss=True,
      l2_codes=False, quantizer_grad="ste"))
  c.loss.update(dict(disc_start=disc_start, perceptual_weight=0.0,
                     lecam_weight=0.0, disc_warmup_steps=0,
                     disc_loss="hinge", gan_weight_mode="adaptive",
                     codebook_weight=1.0, disc_factor=1.0))
  c.optim.update(dict(ema_decay=0.0, grad_clip=0.0, lr_scaling="none", b1=0.5,
                      b2=0.9))  # the reference's Adam betas
  c.num_train_steps = steps
  c.seed = seed
  c.eval_every = eval_every
  c.eval_batches = 0
  c.eval_split = "validation"
  c.image_every = 0
  c.checkpoint_every = steps
  c.log_every = min(c.log_every, eval_every)
  return c


# ----------------------------------------------------------------- reference

def reference_model(config, seed: int):
  """The reference VQModel with its loss (discriminator included), random
  weights from ``seed``, the perceptual term off."""
  from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=g-import-not-at-top
  m, lc = config.model, config.loss
  dd = dict(ch=m.ch, out_ch=m.out_ch, ch_mult=list(m.ch_mult),
            num_res_blocks=m.num_res_blocks,
            attn_resolutions=list(m.attn_resolutions), dropout=m.dropout,
            in_channels=m.in_channels, resolution=m.resolution,
            z_channels=m.z_channels)
  loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
          "params": {"disc_start": lc.disc_start, "disc_weight": lc.disc_weight,
                     "disc_factor": lc.disc_factor,
                     "codebook_weight": lc.codebook_weight,
                     "disc_num_layers": config.disc.n_layers,
                     "disc_ndf": config.disc.ndf,
                     "disc_in_channels": m.out_ch,
                     "disc_loss": lc.disc_loss, "perceptual_weight": 0.0}}
  cfg = rc.vq_model_config(dd, m.n_embed, m.embed_dim, lossconfig=loss)
  return rc.build_reference_without_perceptual(cfg, seed=seed), cfg


def convert_reference(model, cfg, out: str) -> str:
  """Writes ``model``'s weights (generator and discriminator) in this
  project's format under ``out``."""
  from vqgan_jax import convert  # pylint: disable=g-import-not-at-top
  from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  sd = {k: v for k, v in model.state_dict().items() if "perceptual" not in k}
  ckpt = rc.lightning_checkpoint(os.path.join(out, "reference.ckpt"), sd)
  yml = rc.write_yaml(os.path.join(out, "reference.yaml"), cfg)
  target = os.path.join(out, "converted")
  if convert.main(["--checkpoint", str(ckpt), "--config", str(yml),
                   "--out", target]) != 0:
    raise RuntimeError(f"converting the reference's weights into {target} failed")
  return target


def reference_eval(model, batches: Iterable[Dict[str, np.ndarray]],
                   n_embed: int) -> Dict[str, float]:
  """Held-out PSNR (raw decoder output, [-1, 1]) and codebook usage."""
  from vqgan_jax_testing import oracle  # pylint: disable=g-import-not-at-top
  from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=g-import-not-at-top
  torch = oracle.torch()
  psnr, hist = [], np.zeros(n_embed)
  model.eval()
  with torch.no_grad():
    for batch in batches:
      keep = batch["mask"].astype(bool)
      x = rc.to_nchw(batch["image"][keep])
      quant, _, (_, _, idx) = model.encode(x)
      rec = model.decode(quant)
      mse = ((rec - x)**2).mean(dim=(1, 2, 3)).numpy().astype(np.float64)
      psnr.append(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12)))
      hist += np.bincount(idx.numpy().ravel(), minlength=n_embed)
  model.train()
  return {"eval_psnr": float(np.mean(np.concatenate(psnr))),
          "eval_codebook_usage": float(np.mean(hist > 0))}


def train_reference(model, config, batches: Iterable[Dict[str, np.ndarray]],
                    evaluate: Callable[[Any], Dict[str, float]],
                    log: Optional[Callable[[str], None]] = None
                    ) -> List[Dict[str, Any]]:
  """Trains the reference for ``config.num_train_steps`` batches the way its
  Lightning module does; returns the evaluation rows (``step``, ``eval_*``)
  taken every ``config.eval_every`` steps."""
  from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=g-import-not-at-top
  # The reference's own two Adams (betas 0.5, 0.9) at this learning rate.
  model.learning_rate = config.optim.learning_rate
  (opt_ae, opt_disc), _ = model.configure_optimizers()
  model.train()

  def train_one(x, step, optimizer_idx, opt):
    # A fresh forward each time, as the Lightning module runs training_step
    # once per optimiser: the discriminator's step sees the generator after
    # its update. ``global_step`` counts batches, as disc_start does.
    xrec, qloss = model(x)
    loss, _ = model.loss(qloss, x, xrec, optimizer_idx, step,
                         last_layer=model.get_last_layer(), split="train")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  rows = []
  it = iter(batches)
  for step in range(config.num_train_steps):
    x = rc.to_nchw(next(it)["image"])
    aeloss = train_one(x, step, 0, opt_ae)
    train_one(x, step, 1, opt_disc)
    done = step + 1
    if config.eval_every and (done % config.eval_every == 0
                              or done == config.num_train_steps):
      row = dict(step=done, loss=float(aeloss.detach()), **evaluate(model))
      rows.append(row)
      if log:
        log(f"reference step {done}: psnr {row['eval_psnr']:.2f} dB, "
            f"usage {100 * row['eval_codebook_usage']:.1f}%")
  return rows


# ------------------------------------------------------------------ ours

def train_ours(config, workdir: str) -> List[Dict[str, Any]]:
  """Trains with this project's trainer; returns its ``eval_*`` rows."""
  from vqgan_jax.training import vqgan_trainer  # pylint: disable=g-import-not-at-top
  vqgan_trainer.train_and_evaluate(config, workdir)
  return eval_rows(workdir)


def eval_rows(workdir: str) -> List[Dict[str, Any]]:
  out: Dict[int, Dict[str, Any]] = {}
  for r in records.metrics_rows(workdir):
    if "eval_psnr" in r:  # a resumed run may repeat a step: keep the last
      out[int(r["step"])] = {k: r[k] for k in
                             ("step", "eval_psnr", "eval_codebook_usage")}
  return [out[s] for s in sorted(out)]


# --------------------------------------------------------------- reporting

def window_mean(rows: Sequence[Dict[str, Any]], start: int, end: int,
                key: str = "eval_psnr") -> Optional[float]:
  """The mean of ``key`` over the evaluations at steps in ``(start, end]``."""
  v = [r[key] for r in rows if start < r["step"] <= end]
  return statistics.fmean(v) if v else None


def windows(disc_start: int, steps: int):
  """The summary's two windows of steps: the second half before the GAN
  starts and the second half after."""
  return ((disc_start // 2, disc_start),
          (disc_start + (steps - disc_start) // 2, steps))


def summarize(runs: Dict[str, Dict[int, List[Dict[str, Any]]]],
              disc_start: int, steps: int) -> List[Dict[str, Any]]:
  """Per run and seed: PSNR averaged over the window before the GAN and the
  window after (:func:`windows`), codebook usage over the second; then the
  mean and sd over the seeds."""
  (b0, b1), (a0, a1) = windows(disc_start, steps)
  out = []
  for name, per_seed in runs.items():
    vals: Dict[str, List[float]] = {"before": [], "after": [], "usage": []}
    for rows in per_seed.values():
      got = (window_mean(rows, b0, b1), window_mean(rows, a0, a1),
             window_mean(rows, a0, a1, "eval_codebook_usage"))
      if None in got:
        continue
      for k, v in zip(vals, got):
        vals[k].append(v)
    row: Dict[str, Any] = {"run": name, "seeds": sorted(per_seed)}
    for k, (lo, hi) in (("before", (b0, b1)), ("after", (a0, a1))):
      row[k + "_steps"] = sorted({r["step"] for rows in per_seed.values()
                                  for r in rows if lo < r["step"] <= hi})
    for k, v in vals.items():
      row[k] = v
      row[k + "_mean"] = statistics.fmean(v) if v else float("nan")
      row[k + "_sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
    out.append(row)
  return out


def summary_table(summary: Sequence[Dict[str, Any]]) -> str:
  """Markdown: each run's window means, per seed and mean +- sd."""
  def at(key):
    got = summary[0][key] if summary else []
    return "steps " + ", ".join(map(str, got))

  lines = [f"| run | seeds | PSNR before the GAN ({at('before_steps')}), dB "
           f"| PSNR with the GAN ({at('after_steps')}), dB | codebook usage "
           f"({at('after_steps')}) |",
           "|---|---|---:|---:|---:|"]

  def cell(r, key, fmt):
    v = r[key]
    if not v:
      return "-"
    each = "/".join(fmt.format(x) for x in v)
    if len(v) == 1:
      return each
    return (f"{fmt.format(r[key + '_mean'])} +- {fmt.format(r[key + '_sd'])}"
            f" ({each})")

  for r in summary:
    lines.append(f"| {r['run']} | {','.join(map(str, r['seeds']))} | "
                 f"{cell(r, 'before', '{:.2f}')} | {cell(r, 'after', '{:.2f}')}"
                 f" | {cell(r, 'usage', '{:.3f}')} |")
  return "\n".join(lines)


def curve_table(runs: Dict[str, Dict[int, List[Dict[str, Any]]]]) -> str:
  """Held-out PSNR at each evaluation step, mean over the seeds of each run."""
  names = list(runs)
  steps = sorted({r["step"] for per in runs.values() for rows in per.values()
                  for r in rows})
  lines = ["| step | " + " | ".join(names) + " |",
           "|---:|" + "---:|" * len(names)]
  for s in steps:
    cells = []
    for n in names:
      v = [r["eval_psnr"] for rows in runs[n].values() for r in rows
           if r["step"] == s]
      cells.append(f"{statistics.fmean(v):.2f}" if v else "-")
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# --------------------------------------------------------------------- run

def run_seed(workdir: str, seed: int, arg: str, steps: int, disc_start: int,
             eval_every: int, options: Sequence[str],
             log: Callable[[str], None] = print, photos: str = ""
             ) -> Dict[str, List[Dict[str, Any]]]:
  """The reference, vqgan-jax and each of ``options`` from one seed's
  converted weights; returns each run's evaluation rows."""
  from vqgan_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = base_config(arg, steps, disc_start, eval_every, seed, photos)
  sd = os.path.join(workdir, f"seed_{seed}")
  os.makedirs(sd, exist_ok=True)
  out: Dict[str, List[Dict[str, Any]]] = {}
  done_path = os.path.join(sd, "runs.json")
  if os.path.exists(done_path):
    with open(done_path) as f:
      out = json.load(f)

  def save():
    with open(done_path, "w") as f:
      json.dump(out, f, indent=1)

  init = os.path.join(sd, "init", "converted")
  need = [n for n in ["reference", "ours", *options] if n not in out]
  if not need:
    return out
  model, cfg = reference_model(config, seed)
  if not os.path.exists(os.path.join(init, "model.json")):
    convert_reference(model, cfg, os.path.dirname(init))
  if "reference" in need:
    m = config.model
    train = data_lib.build_dataset(config.dataset, resolution=m.resolution,
                                   split="train", data_dir=config.data_dir,
                                   channels=m.in_channels)
    from vqgan_jax.training import vqgan_trainer  # pylint: disable=g-import-not-at-top
    val = vqgan_trainer.build_eval_dataset(config)  # where ours evaluates
    it = train.train_iterator(config.batch_size, seed=config.seed)
    t0 = time.time()
    try:
      rows = train_reference(
          model, config, it,
          lambda mdl: reference_eval(mdl, val.eval_iterator(config.batch_size),
                                     m.n_embed), log)
    finally:
      it.close()
    out["reference"] = rows
    log(f"seed {seed}: reference trained in {time.time() - t0:.0f} s")
    save()
  for name in need:
    if name == "reference":
      continue
    c = base_config(arg, steps, disc_start, eval_every, seed, photos)
    c.update_from_flattened_dict(OPTIONS.get(name, {}))
    c.init_from = init
    t0 = time.time()
    out[name] = train_ours(c, os.path.join(sd, name))
    log(f"seed {seed}: {name} trained in {time.time() - t0:.0f} s")
    save()
  return out


def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", "runs/side_by_side", "Output folder.",
                      flag_values=fv)
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds: each gives "
                      "its own initial weights and batch order.",
                      flag_values=fv)
  flags.DEFINE_integer("steps", 800, "Training steps of every run.",
                       flag_values=fv)
  flags.DEFINE_integer("disc_start", 400, "Step from which the GAN term and "
                       "the discriminator train.", flag_values=fv)
  flags.DEFINE_integer("eval_every", 100, "Steps between held-out "
                       "evaluations.", flag_values=fv)
  flags.DEFINE_string("options", ",".join(OPTIONS), "vqgan-jax options "
                      "trained once more on every seed; subset of: "
                      + ", ".join(OPTIONS) + " ('' for none).", flag_values=fv)
  flags.DEFINE_string("config_arg", "", "configs/digits_vqgan.py argument "
                      "('' or 'test').", flag_values=fv)
  flags.DEFINE_string("photos", "", "Train on the photo crops of this folder "
                      "(written by `python -m benchmarks.photos prepare`) "
                      "with the folder config's photos preset, evaluated on "
                      "its held-out tiles, instead of the digits.",
                      flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.ablations.reference_side_by_side")
  a = fv
  try:
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  except ValueError:
    cli.fail(f"--seeds={a.seeds!r}: comma-separated integers, e.g. 0,1,2")
  options = [s for s in a.options.split(",") if s]
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    cli.fail(f"--options: unknown {unknown}; valid: {sorted(OPTIONS)}")
  if not seeds:
    cli.fail("--seeds: give at least one seed")
  if not 0 < a.disc_start < a.steps:
    cli.fail(f"--disc_start={a.disc_start} must lie inside the run "
                    f"(0 < disc_start < --steps={a.steps})")
  if a.eval_every <= 0:
    cli.fail(f"--eval_every={a.eval_every}: give a positive number of steps")
  if a.photos and a.config_arg:
    cli.fail("--config_arg is for the digits; --photos uses the photos preset")
  if a.photos and not os.path.isdir(os.path.join(a.photos, "heldout")):
    cli.fail(f"--photos={a.photos} has no heldout/ folder; write it with "
             f"`python -m benchmarks.photos prepare --out={a.photos}`")
  os.makedirs(a.workdir, exist_ok=True)
  runs: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
  for seed in seeds:
    got = run_seed(a.workdir, seed, a.config_arg, a.steps, a.disc_start,
                   a.eval_every, options, photos=a.photos)
    for name, rows in got.items():
      runs.setdefault(name, {})[seed] = rows
  summary = summarize(runs, a.disc_start, a.steps)
  data = f"photos ({a.photos})" if a.photos else "digits"
  result = dict(data=data, seeds=seeds, steps=a.steps, disc_start=a.disc_start,
                eval_every=a.eval_every, options=options,
                cpu=records.cpu_model(), runs=runs, summary=summary)
  with open(os.path.join(a.workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"\n{data}, {a.steps} steps, GAN from step {a.disc_start}, seeds "
        f"{','.join(map(str, seeds))}; {result['cpu']}")
  print(summary_table(summary))
  print("\nheld-out PSNR (dB), mean over seeds")
  print(curve_table(runs))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
