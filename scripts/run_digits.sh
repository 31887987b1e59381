#!/usr/bin/env bash
# The embedded default, end to end: VQGAN on scikit-learn's digits, a
# class-conditional transformer on its codes, and a 10x10 sample grid
# (one row per digit). Runs offline; 15-20 minutes on 2 CPU cores.
# Re-running resumes each stage from its checkpoints.
#
#   RUNS=dir      where the three workdirs go (default: runs)
#   SEED=n        seeds both stages and the sampler (default: 0)
#   CONFIG=:test  the seconds-long variant of both configs (for tests)
# Further arguments go to train_vqgan.py.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
SEED=${SEED:-0}
CONFIG=${CONFIG:-}
export TF_CPP_MIN_LOG_LEVEL=3
python train_vqgan.py --config="configs/digits_vqgan.py$CONFIG" \
  --workdir="$RUNS/digits_vqgan" --config.seed="$SEED" "$@"
# --host_malloc=keep: the GPT step's ~370 MB of temporaries are otherwise
# faulted in afresh on every step (BENCHMARKS.md, "The allocator").
python train_transformer.py --config="configs/digits_transformer.py$CONFIG" \
  --workdir="$RUNS/digits_transformer" --config.vqgan_workdir="$RUNS/digits_vqgan" \
  --config.seed="$SEED" --host_malloc=keep
# The model's own sampling settings (config.sampling: guidance scale 3).
python sample.py --workdir="$RUNS/digits_transformer" --num_samples=10 \
  --outdir="$RUNS/digits_samples" --seed="$SEED"
# An independent classifier, trained on the real digits, reads the samples.
python -m vqgan_jax.evaluate digits-judge --samples="$RUNS/digits_samples" \
  --output="$RUNS/digits_samples/judge.json" > /dev/null
python - "$RUNS" <<'PY'
import json, sys
runs = sys.argv[1]
def last(path, key):
  rows = [json.loads(l) for l in open(path) if key in l]
  return rows[-1] if rows else {}
vq = last(f"{runs}/digits_vqgan/metrics.jsonl", "eval_psnr")
tr = last(f"{runs}/digits_transformer/metrics.jsonl", "eval_loss")
print(f"VQGAN:       held-out PSNR {vq.get('eval_psnr', float('nan')):.2f} dB (unclipped decoder output), "
      f"codebook usage {100 * vq.get('eval_codebook_usage', 0):.1f}%   ({runs}/digits_vqgan)")
ent = last(f"{runs}/digits_transformer/metrics.jsonl", "code_entropy").get("code_entropy", float("nan"))
print(f"Transformer: validation loss {tr.get('eval_loss', float('nan')):.3f} nats/token "
      f"(code entropy {ent:.3f})   ({runs}/digits_transformer)")
print(f"Samples:     {runs}/digits_samples/grid.png (one row per digit 0-9)")
judge = json.load(open(f"{runs}/digits_samples/judge.json"))
scale = json.load(open(f"{runs}/digits_transformer/model.json")).get(
    "sampling", {}).get("guidance_scale", 1.0)
how = f"guidance scale {scale:g}" if scale != 1 else "no guidance"
print(f"Judge:       the intended digit in {100 * judge['accuracy']:.1f}% of "
      f"{judge['num_samples']} samples ({how}; classifier: "
      f"{100 * judge['judge_val_accuracy']:.1f}% on real held-out digits)   "
      f"({runs}/digits_samples/judge.json)")
per = ", ".join(f"{c}: {100 * a:.0f}%" for c, a in judge["per_class_accuracy"].items())
print(f"             per digit: {per}")
PY
