r"""The reference quantizer vs each quantizer option on `digits`, side by side.

    python -m benchmarks.ablations.digits_quantizers --workdir=runs/quantizers \
        [--steps=1200] [--seed=0] [--options=reference,fsq,...]

Trains `configs/digits_vqgan.py` once per option with the same steps, seed,
data and optimiser, then reports each run's last held-out evaluation
(`eval_*` rows of its `metrics.jsonl`): codebook usage and perplexity of the
validation codes, PSNR and L1. Like with like: every option has the config's
`n_embed` codes (64): FSQ levels (4, 4, 4), LFQ 6 bits; the factorised
options look codes up in 8 channels. Prints a Markdown table and writes
`results.json` under `--workdir`. Running again reuses finished runs (the
trainer resumes from their last checkpoint; a finished run only evaluates).

`--config_arg=test` uses the seconds-long test config (for the test suite).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Sequence

from absl import flags

from benchmarks.ablations import records
from vqgan_jax import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def fsq_levels_for(n_embed: int) -> tuple:
  """Levels of 4 (and one 2) whose product is ``n_embed`` (a power of 2)."""
  if n_embed < 2 or n_embed & (n_embed - 1):
    raise ValueError(f"n_embed={n_embed}: FSQ levels here need a power of 2")
  bits = n_embed.bit_length() - 1
  return (4,) * (bits // 2) + ((2,) if bits % 2 else ())


def _quantizer(kind: str, **opts) -> Dict[str, Any]:
  """``config.model`` overrides choosing family ``kind`` with ``opts``."""
  return dict(quantizer=kind, quantizer_options={kind: opts})


def options(n_embed: int) -> Dict[str, Dict[str, Any]]:
  """``config.model`` overrides of each compared quantizer."""
  l2 = dict(codebook_dim=8, l2_codes=True)
  return {
      "reference": {},
      "l2_factorised": _quantizer("vq", **l2),
      "ema_restart": _quantizer("vq", codebook_update="ema",
                                codebook_ema_decay=0.99,
                                dead_code_threshold=1.0),
      "l2_ema_restart": _quantizer("vq", **l2, codebook_update="ema",
                                   codebook_ema_decay=0.99,
                                   dead_code_threshold=1.0),
      "entropy": _quantizer("vq", **l2, entropy_weight=0.1,
                            entropy_temperature=0.01),
      "rotation": _quantizer("vq", quantizer_grad="rotation"),
      "fsq": _quantizer("fsq", levels=fsq_levels_for(n_embed)),
      "lfq": _quantizer("lfq", entropy_weight=0.1, entropy_temperature=0.01),
  }


def make_config(arg: str, option: Dict[str, Any], steps: int, seed: int):
  from vqgan_jax_testing import train_utils  # pylint: disable=g-import-not-at-top
  c = train_utils.load_config("digits_vqgan", arg)
  # Every option starts from the reference's loss-trained codebook (the
  # digits config itself keeps its codebook by EMA with restarts).
  c.model.quantizer_options.vq.update(dict(codebook_update="loss",
                                           dead_code_threshold=0.0))
  c.model.update(option)
  c.num_train_steps = steps
  c.seed = seed
  c.eval_every = steps  # one held-out evaluation, at the end
  c.image_every = 0
  c.checkpoint_every = steps
  c.log_every = min(c.log_every, steps)
  return c


def table(results: Sequence[Dict[str, Any]]) -> str:
  lines = ["| quantizer | settings | steps | codebook usage | perplexity | "
           "held-out PSNR (dB) | held-out L1 | train s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    s = ", ".join(f"{k}={v}" for k, v in r["option"].items()) or "reference"
    lines.append(
        f"| {r['name']} | {s} | {r['step']} | {r['eval_codebook_usage']:.3f} "
        f"| {r['eval_perplexity']:.1f} | {r['eval_psnr']:.2f} | "
        f"{r['eval_l1']:.4f} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def run(workdir: str, names: Sequence[str], steps: int, seed: int,
        arg: str = "") -> List[Dict[str, Any]]:
  from vqgan_jax.training import vqgan_trainer  # pylint: disable=g-import-not-at-top
  n_embed = make_config(arg, {}, steps, seed).model.n_embed
  opts = options(n_embed)
  unknown = sorted(set(names) - set(opts))
  if unknown:
    raise ValueError(f"--options: unknown {unknown}; valid: {sorted(opts)}")
  results = []
  for name in names:
    wd = os.path.join(workdir, name)
    t0 = time.time()
    vqgan_trainer.train_and_evaluate(
        make_config(arg, opts[name], steps, seed), wd)
    row = records.last_row(wd, "eval_psnr")
    results.append(dict(name=name, option=opts[name],
                        seconds=time.time() - t0, **row))
    print(f"{name}: usage {row['eval_codebook_usage']:.3f} perplexity "
          f"{row['eval_perplexity']:.1f} PSNR {row['eval_psnr']:.2f}",
          flush=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=list)
  return results


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", "runs/quantizers", "Output folder; one "
                      "sub-workdir per quantizer.", flag_values=fv)
  flags.DEFINE_integer("steps", 1200, "Training steps per quantizer.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Training seed.", flag_values=fv)
  flags.DEFINE_string("options", ",".join(options(64)), "Comma-separated "
                      "subset of: " + ", ".join(options(64)) + ".",
                      flag_values=fv)
  flags.DEFINE_string("config_arg", "", "configs/digits_vqgan.py argument "
                      "('' or 'test').", flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.ablations.digits_quantizers")
  a = fv
  os.makedirs(a.workdir, exist_ok=True)
  results = run(a.workdir, [s for s in a.options.split(",") if s], a.steps,
                a.seed, a.config_arg)
  import jax  # pylint: disable=g-import-not-at-top
  print(f"\ndigits, {a.steps} steps, seed {a.seed}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  print(table(results))


if __name__ == "__main__":
  main()
