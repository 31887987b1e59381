r"""The main job over several seeds: how much of its result is luck.

    python -m benchmarks.ablations.digits_seeds --workdir=runs/seeds \
        [--seeds=0,1,2]

Runs `scripts/run_digits.sh` (both stages and the guided samples, exactly as
the README's first command) once per seed, with ``SEED`` seeding the VQGAN,
the transformer and the sampler, then samples each transformer once more
without guidance. An independent judge (`python -m vqgan_jax.evaluate
digits-judge`) reads both sets of samples. Reports per seed: held-out PSNR and
codebook usage (stage 1), validation loss (stage 2), the judge on the guided
and on the unguided samples, and the minutes the seed took; then min-max and
mean +- standard deviation of each. Writes ``results.json`` under
``--workdir`` with the CPU model. Running again resumes unfinished seeds and
reuses finished ones.

``--config=:test`` runs the seconds-long variants (for the test suite).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

from absl import flags

from benchmarks.ablations import records
from vqgan_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# (key, column title, format); values per seed in `collect`.
COLUMNS = (
    ("eval_psnr", "held-out PSNR (dB)", "{:.2f}"),
    ("codebook_usage", "codebook usage", "{:.1%}"),
    ("eval_loss", "stage-2 val. loss (nats)", "{:.3f}"),
    ("judge_guided", "judge, guided", "{:.1%}"),
    ("judge_unguided", "judge, unguided", "{:.1%}"),
    ("minutes", "minutes", "{:.1f}"),
)


def collect(runs: str) -> Dict[str, float]:
  """One seed's numbers from its finished run folder."""
  vq = records.last_row(os.path.join(runs, "digits_vqgan", "metrics.jsonl"), "eval_psnr")
  tr = records.last_row(os.path.join(runs, "digits_transformer", "metrics.jsonl"),
             "eval_loss")
  judged = {}
  for name, folder in (("judge_guided", "digits_samples"),
                       ("judge_unguided", "digits_samples_unguided")):
    with open(os.path.join(runs, folder, "judge.json")) as f:
      judged[name] = json.load(f)["accuracy"]
  return dict(eval_psnr=vq["eval_psnr"],
              codebook_usage=vq["eval_codebook_usage"],
              eval_loss=tr["eval_loss"], **judged)


def _run(cmd: List[str], env: Dict[str, str]) -> None:
  print("+ " + " ".join(cmd), flush=True)
  r = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
  if r.returncode:
    raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}")


def run_seed(workdir: str, seed: int, config: str) -> Dict[str, float]:
  """The main job with ``SEED=seed``, then unguided samples and their judge."""
  runs = os.path.join(os.path.abspath(workdir), f"seed_{seed}")
  # The script calls `python`: this interpreter's (as in an activated venv).
  env = dict(os.environ, RUNS=runs, SEED=str(seed), CONFIG=config,
             TF_CPP_MIN_LOG_LEVEL="3",
             PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get("PATH", ""))
  t0 = time.time()
  _run(["bash", os.path.join("scripts", "run_digits.sh")], env)
  unguided = os.path.join(runs, "digits_samples_unguided")
  _run([sys.executable, "sample.py",
        f"--workdir={os.path.join(runs, 'digits_transformer')}",
        "--num_samples=10", f"--outdir={unguided}", f"--seed={seed}",
        "--guidance_scale=1"], env)
  _run([sys.executable, "-m", "vqgan_jax.evaluate", "digits-judge",
        f"--samples={unguided}",
        f"--output={os.path.join(unguided, 'judge.json')}"], env)
  row = collect(runs)
  row["minutes"] = (time.time() - t0) / 60
  return row


def summary(rows: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
  """Min, max, mean and standard deviation (0 for one seed) per column."""
  out = {}
  for key, _, _ in COLUMNS:
    v = [r[key] for r in rows]
    out[key] = dict(min=min(v), max=max(v), mean=statistics.fmean(v),
                    std=statistics.stdev(v) if len(v) > 1 else 0.0)
  return out


def table(seeds: Sequence[int], rows: Sequence[Dict[str, float]]) -> str:
  lines = ["| seed | " + " | ".join(t for _, t, _ in COLUMNS) + " |",
           "|---:|" + "---:|" * len(COLUMNS)]
  for s, r in zip(seeds, rows):
    lines.append(f"| {s} | " + " | ".join(
        fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
  stats = summary(rows)
  lines.append("| min-max | " + " | ".join(
      f"{fmt.format(stats[k]['min'])}-{fmt.format(stats[k]['max'])}"
      for k, _, fmt in COLUMNS) + " |")
  lines.append("| mean +- sd | " + " | ".join(
      f"{fmt.format(stats[k]['mean'])} +- {fmt.format(stats[k]['std'])}"
      for k, _, fmt in COLUMNS) + " |")
  return "\n".join(lines)


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", "runs/seeds", "Output folder; one "
                      "seed_<n> run folder per seed.", flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.",
                    flag_values=fv)
  flags.DEFINE_enum("config", "", ["", ":test"], "Config variant of both "
                    "stages ('' or ':test').", flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.ablations.digits_seeds")
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    cli.fail(f"--seeds={','.join(fv.seeds)!r}; expected integers, e.g. "
             "--seeds=0,1,2")
  if not seeds:
    cli.fail("--seeds is empty; e.g. --seeds=0,1,2")
  os.makedirs(fv.workdir, exist_ok=True)
  rows = []
  for seed in seeds:
    try:
      rows.append(run_seed(fv.workdir, seed, fv.config))
    except RuntimeError as e:
      cli.fail(f"seed {seed}: {e}")
    print(f"seed {seed}: " + ", ".join(
        f"{t} {fmt.format(rows[-1][k])}" for k, t, fmt in COLUMNS), flush=True)
  result = dict(cpu=records.cpu_model(), config=fv.config or "default", seeds=seeds,
                rows=rows, summary=summary(rows),
                date=time.strftime("%Y-%m-%d"))
  with open(os.path.join(fv.workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nthe main job over seeds {seeds} on {result['cpu']}")
  print(table(seeds, rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
