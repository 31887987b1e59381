r"""Speculative Jacobi decoding against the plain sampler, and guidance schedules.

Decoding (default): tokens accepted per forward pass and wall time of
`sampling.sample(..., speculative_window=W)` against the plain sampler,
in one process, calls alternating, medians of --repeats timed calls after a
compiling one:

  python -m benchmarks.probes.speculative [--workdir=runs/digits_transformer] \
      [--windows=2,4,8] [--batch=8] [--repeats=5] [--top_k=K] [--large]

--workdir samples a trained transformer (its class / SOS prefix); without it
a randomly initialised GPT of the digits config (4x128, 64 tokens) is timed.
--large adds a randomly initialised 12x512 GPT over 256 tokens. Acceptance
of randomly initialised models says nothing about trained ones (their
distributions are nearly uniform, so drafts are accepted easily); only their
cost per forward pass is meaningful.

Guidance schedules (--schedules): samples a trained class-conditional digits
model without guidance (the baseline row) and with each schedule at the same
scale (equal compute: every schedule runs the conditional and unconditional
rows at every token), and scores the samples with the digits judge:

  python -m benchmarks.probes.speculative --workdir=runs/digits_transformer \
      --schedules --guidance_scale=3 --num_samples=20 --outdir=/tmp/sched
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags

from vqgan_jax import cli


def _define(fv):
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "Trained transformer directory.", **d)
  flags.DEFINE_list("windows", ["2", "4", "8"], "Speculative windows.", **d)
  flags.DEFINE_integer("batch", 8, "Samples per call.", lower_bound=1, **d)
  flags.DEFINE_integer("repeats", 5, "Timed calls per sampler.",
                       lower_bound=1, **d)
  flags.DEFINE_integer("top_k", None, "Top-k filter.", lower_bound=1, **d)
  flags.DEFINE_float("temperature", 1.0, "Temperature.", **d)
  flags.DEFINE_bool("large", False, "Also time a random 12x512 GPT "
                    "(256 tokens).", **d)
  flags.DEFINE_bool("schedules", False, "Judge guidance schedules instead.",
                    **d)
  flags.DEFINE_float("guidance_scale", 3.0, "Guidance scale (--schedules).",
                     **d)
  flags.DEFINE_integer("num_samples", 20, "Samples per class (--schedules).",
                       lower_bound=1, **d)
  flags.DEFINE_string("outdir", "/tmp/guidance_schedules",
                      "Samples (--schedules).", **d)
  flags.DEFINE_string("json", None, "Also write the results here.", **d)

# (name, schedule, power, interval) compared by --schedules.
SCHEDULES = (("no guidance", "constant", 2.0, None),
             ("constant", "constant", 2.0, None),
             ("linear", "linear", 2.0, None),
             ("power2", "power", 2.0, None),
             ("cosine", "cosine", 2.0, None),
             ("interval 0.2-1", "constant", 2.0, (0.2, 1.0)),
             ("interval 0-0.5", "constant", 2.0, (0.0, 0.5)))


def _random_gpt(vocab, block_size, n_layer, n_head, n_embd, seed=0):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=import-outside-toplevel
  model = gpt_lib.GPT(vocab_size=vocab, block_size=block_size, n_layer=n_layer,
                      n_head=n_head, n_embd=n_embd)
  shapes = jax.eval_shape(lambda: {"params": model.init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]})
  return model, common.host_drawn_state(shapes, seed)


def _trained(workdir, batch):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vqgan_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  info = ckpt_lib.read_model_json(os.path.abspath(workdir), "transformer")
  model, variables = ckpt_lib.load_transformer(workdir)
  c = info["conditioning"]
  if c["kind"] == "class":
    prefix = (np.arange(batch) % c["num_classes"]).astype(np.int32)[:, None]
  elif c["kind"] == "sos":
    prefix = np.full((batch, 1), c.get("sos_token", 0), np.int32)
  else:
    cli.fail(f"--workdir={workdir}: timing needs a class-conditional or "
             "unconditional (SOS) model")
  h, w = info["image_grid"]
  return model, variables, prefix, h * w


def time_decoding(args, name, model, variables, prefix, num_tokens,
                  windows):
  """Rows of (sampler, median s, tokens per pass) for one model."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sampling  # pylint: disable=import-outside-toplevel
  from vqgan_jax import speculative  # pylint: disable=import-outside-toplevel
  kw = dict(temperature=args.temperature, top_k=args.top_k)
  runs = {0: lambda key: sampling.sample(model, variables, prefix, num_tokens,
                                         key, **kw)}
  passes = {0: num_tokens}
  for w in windows:
    def run(key, w=w):
      tokens, p = speculative.sample_speculative(
          model, variables, prefix, num_tokens, key, window=w,
          return_passes=True, **kw)
      passes[w] = float(np.mean(np.asarray(p)))
      return tokens
    runs[w] = run
  times = {w: [] for w in runs}
  for w, fn in runs.items():  # compile
    jax.block_until_ready(fn(jax.random.key(0)))
  for r in range(args.repeats):
    for w, fn in runs.items():  # alternating
      t = time.perf_counter()
      jax.block_until_ready(fn(jax.random.key(r + 1)))
      times[w].append(time.perf_counter() - t)
  base = statistics.median(times[0])
  rows = []
  for w in runs:
    med = statistics.median(times[w])
    rows.append(dict(model=name, window=w, median_s=med,
                     tokens_per_pass=num_tokens / passes[w],
                     ms_per_pass=1e3 * med / passes[w],
                     speedup=base / med))
    print(f"{name:28s} {'plain' if w == 0 else f'W={w}':6s} "
          f"{med:8.3f} s  {num_tokens / passes[w]:5.2f} tokens/pass  "
          f"{1e3 * med / passes[w]:7.2f} ms/pass  x{base / med:.2f}")
  return rows


def judge_schedules(args):
  from vqgan_jax import evaluate  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sample_lib  # pylint: disable=import-outside-toplevel
  rows = []
  for name, schedule, power, interval in SCHEDULES:
    # The first row samples without guidance (scale 1: the conditional
    # logits alone), the baseline the schedules are judged against.
    scale = 1.0 if name == "no guidance" else args.guidance_scale
    out = os.path.join(args.outdir, name.replace(" ", "_"))
    sample_lib.sample_images(
        args.workdir, out, num_samples=args.num_samples, seed=0,
        temperature=args.temperature, top_k=args.top_k,
        guidance_scale=scale, guidance_schedule=schedule,
        guidance_power=power, guidance_interval=interval, save_npz=True,
        progress=False)
    r = evaluate.evaluate_digits_judge(os.path.join(out, "samples.npz"))
    rows.append(dict(schedule=name, scale=scale,
                     accuracy=r["accuracy"], num_samples=r["num_samples"]))
    print(f"{name:16s} scale {scale}: judge accuracy "
          f"{100 * r['accuracy']:.1f}% of {r['num_samples']}")
  return rows


def main(argv=None):
  fv = flags.FlagValues()
  _define(fv)
  cli.parse(fv, argv, __doc__, prog="python -m benchmarks.probes.speculative")
  args = fv
  try:
    windows = sorted({int(w) for w in args.windows})
  except ValueError:
    cli.fail(f"--windows={','.join(args.windows)}: give whole numbers, "
             "e.g. --windows=2,4,8")
  if not windows or windows[0] < 1:
    cli.fail("--windows: each speculative window is at least 1")
  if args.workdir and not os.path.isdir(args.workdir):
    cli.fail(f"--workdir={args.workdir}: no such directory (a trained "
             "transformer's workdir, e.g. runs/digits_transformer)")
  if args.schedules:
    if not args.workdir:
      cli.fail("--schedules needs --workdir (a trained digits "
               "transformer)")
    rows = judge_schedules(args)
  else:
    import numpy as np  # pylint: disable=import-outside-toplevel
    if args.workdir:
      model, variables, prefix, n = _trained(args.workdir, args.batch)
      name = "digits (trained)"
    else:
      model, variables = _random_gpt(75, 64, 4, 4, 128)
      prefix, n, name = (np.arange(args.batch) % 10).astype(
          np.int32)[:, None] + 64, 64, "digits config (random)"
    rows = time_decoding(args, name, model, variables, prefix, n, windows)
    if args.large:
      model, variables = _random_gpt(1024, 256, 12, 8, 512)
      prefix = np.zeros((args.batch, 1), np.int32)
      rows += time_decoding(args, "12x512 GPT (random)", model, variables, prefix,
                            256, windows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
