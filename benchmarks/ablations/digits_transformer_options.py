r"""Reference GPT block vs the modern block on `digits`, guided and unguided.

    python -m benchmarks.ablations.digits_transformer_options \
        --vqgan_workdir=runs/digits_vqgan --workdir=runs/transformer_options \
        [--steps=1500] [--seed=0] [--guidance_scales=1.5,3] [--num_samples=20]

Trains `configs/digits_transformer.py` twice with the same steps, seed, data
and classifier-free-guidance label dropout (0.1): once with the reference's
block (LayerNorm, GELU MLP, learned positions) and once with the modern one
(RMSNorm, SwiGLU, 2D rotary positions over the code grid, zero-initialised
head). For each it reports the validation loss per token, then samples
`--num_samples` images per digit unguided and with each guidance scale
(`sample.py`'s code path, same sampling seed) and scores them with the
independent digits classifier (`python -m vqgan_jax.evaluate digits-judge`):
the rate at which it sees the intended digit. Prints a Markdown table and
writes `results.json` under `--workdir`. Running again reuses finished
trainings (the trainer resumes from their last checkpoint).

`--config_arg=test` uses the seconds-long test config (for the test suite).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from typing import Any, Dict, List, Optional, Sequence

from absl import flags

from vqgan_jax import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = {
    "reference": dict(norm="layernorm", mlp="gelu",
                      position_embedding="learned", zero_head=False),
    "modern": dict(norm="rmsnorm", mlp="swiglu", position_embedding="rope2d",
                   zero_head=True),
}


def _config(arg: str, vqgan_workdir: str, steps: int, seed: int,
            label_dropout: float, gpt: Dict[str, Any]):
  from vqgan_jax_testing import train_utils  # pylint: disable=g-import-not-at-top
  c = train_utils.load_config("digits_transformer", arg)
  c.vqgan_workdir = os.path.abspath(vqgan_workdir)
  c.conditioning.label_dropout = label_dropout
  c.gpt.update(gpt)
  c.num_train_steps = steps
  c.seed = seed
  c.eval_every = steps  # one validation pass, at the end
  c.sample_every = 0
  c.checkpoint_every = steps
  c.log_every = min(c.log_every, steps)
  return c


class _Judge:
  """The digits classifier of `vqgan_jax.evaluate digits-judge`, trained
  once per run (it is deterministic given the seed and resolution)."""

  def __init__(self, seed: int):
    self.seed, self.judge = seed, None

  def __call__(self, samples_dir: str) -> Dict[str, Any]:
    from vqgan_jax import digits_judge  # pylint: disable=g-import-not-at-top
    images, labels, _ = digits_judge.load_sample_images(samples_dir)
    if self.judge is None:
      self.judge = digits_judge.train_judge(images.shape[1], seed=self.seed)
    return digits_judge.score_samples(self.judge, images, labels)


def run_variant(name: str, args, judge: Optional[_Judge]
                ) -> List[Dict[str, Any]]:
  """Trains one variant, samples it at every scale, judges the samples."""
  from vqgan_jax import sample_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import transformer_trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, name)
  config = _config(args.config_arg, args.vqgan_workdir, args.steps, args.seed,
                   args.label_dropout, VARIANTS[name])
  t0 = time.perf_counter()
  transformer_trainer.train_and_evaluate(config, workdir)
  train_s = time.perf_counter() - t0
  rows = [r for r in metrics_lib.read_metrics(workdir) if "eval_loss" in r]
  if not rows:
    raise RuntimeError(f"{workdir} logged no eval_loss")
  eval_loss = rows[-1]["eval_loss"]
  out = []
  for scale in [None] + list(args.guidance_scales):
    tag = "unguided" if scale is None else f"cfg{scale:g}"
    sdir = os.path.join(workdir, "samples_" + tag)
    s = sample_lib.sample_images(workdir, sdir, num_samples=args.num_samples,
                                 seed=args.seed, guidance_scale=scale,
                                 top_k=args.top_k, progress=False)
    row = {"variant": name, "guidance_scale": scale, "eval_loss": eval_loss,
           "train_seconds": train_s, "samples": s["images"],
           "samples_dir": sdir}
    if judge is not None:
      scores = judge(sdir)
      row["judge_accuracy"] = scores["accuracy"]
      row["judge_val_accuracy"] = scores["judge_val_accuracy"]
    out.append(row)
  return out


def table(rows: Sequence[Dict[str, Any]]) -> str:
  lines = ["| block | guidance | val. loss | judge accuracy |",
           "|---|---|---|---|"]
  for r in rows:
    g = "none" if r["guidance_scale"] is None else f"{r['guidance_scale']:g}"
    acc = r.get("judge_accuracy")
    acc = "-" if acc is None else f"{100 * acc:.1f}%"
    lines.append(f"| {r['variant']} | {g} | {r['eval_loss']:.4f} | {acc} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string("vqgan_workdir", None, "Stage-1 workdir "
                      "(train_vqgan.py) or converted VQGAN.", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Output folder; one sub-workdir per "
                      "variant.", flag_values=fv)
  flags.DEFINE_integer("steps", 1500, "Training steps per variant.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Training and sampling seed.",
                       flag_values=fv)
  flags.DEFINE_float("label_dropout", 0.1, "Class-label dropout (for "
                     "classifier-free guidance).", flag_values=fv)
  flags.DEFINE_list("guidance_scales", ["1.5", "3.0"], "Guidance scales to "
                    "sample with, besides none.", flag_values=fv)
  flags.DEFINE_integer("num_samples", 20, "Samples per digit and setting.",
                       flag_values=fv)
  flags.DEFINE_integer("top_k", None, "Top-k filter when sampling.",
                       flag_values=fv)
  flags.DEFINE_string("variants", "reference,modern", "Comma-separated "
                      "subset of VARIANTS.", flag_values=fv)
  flags.DEFINE_string("config_arg", "", "configs/digits_transformer.py "
                      "argument ('test').", flag_values=fv)
  flags.DEFINE_bool("skip_judge", False, "Do not train and run the digits "
                    "judge.", flag_values=fv)
  flags.mark_flags_as_required(["vqgan_workdir", "workdir"], flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.ablations.digits_transformer_options")
  args = types.SimpleNamespace(**fv.flag_values_dict())
  try:
    args.guidance_scales = [float(v) for v in fv.guidance_scales]
  except ValueError:
    cli.fail(f"--guidance_scales={','.join(fv.guidance_scales)}; expected "
             "numbers like 1.5,3")
  names = [n for n in args.variants.split(",") if n]
  bad = sorted(set(names) - set(VARIANTS))
  if bad:
    cli.fail(f"--variants: unknown {bad}; valid: {sorted(VARIANTS)}")
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  judge = None if args.skip_judge else _Judge(args.seed)
  for name in names:
    rows += run_variant(name, args, judge)
  import jax  # pylint: disable=g-import-not-at-top
  result = {"steps": args.steps, "seed": args.seed,
            "label_dropout": args.label_dropout,
            "num_samples_per_class": args.num_samples,
            "device": jax.devices()[0].device_kind, "rows": rows}
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
