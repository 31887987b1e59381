#!/usr/bin/env bash
# Real photographs, offline: 32x32 crops of the photos bundled with
# scikit-image and scikit-learn (chelsea and china held out, whole; at most
# 1,000 crops per training photo), a small f4 VQGAN trained on the others
# (4,000 steps on mirrored crops, about 12 minutes on 2 CPU cores), then its held-out PSNR, SSIM and codebook usage beside
# shrink-and-enlarge and k-means VQ at the same bit budget, and a grid of
# held-out originals above their reconstructions. Stage 2: a small GPT over
# the VQGAN's codes, sampled on a canvas larger than the crops with the
# sliding window. Needs scikit-image (pip install -e '.[photos]'). Re-running
# resumes each stage from its checkpoints. docs/photos.md has the
# measurements.
#
#   RUNS=dir   where the data, workdirs and samples go (default: runs)
# Further arguments go to train_vqgan.py.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
export TF_CPP_MIN_LOG_LEVEL=3
python -m benchmarks.photos prepare --out="$RUNS/photos_data"
# Both stages evaluate on all the held-out tiles while they train
# (metrics.jsonl): stage 1 every 1,000 steps, stage 2 every 500.
python train_vqgan.py --config=configs/folder_vqgan.py:"$RUNS/photos_data/train",photos \
  --workdir="$RUNS/photos_vqgan" \
  --config.eval_dataset=folder:"$RUNS/photos_data/heldout" --config.eval_batches=0 "$@"
python -m benchmarks.photos report --data="$RUNS/photos_data" \
  --vqgan="$RUNS/photos_vqgan" --output="$RUNS/photos_vqgan/photos.json"
python train_transformer.py \
  --config=configs/folder_transformer.py:"$RUNS/photos_data/train",photos \
  --workdir="$RUNS/photos_transformer" --config.vqgan_workdir="$RUNS/photos_vqgan" \
  --config.eval_dataset=folder:"$RUNS/photos_data/heldout" --config.eval_batches=0 \
  --host_malloc=keep
# 16 samples on a 16x24 token canvas (64x96 px), twice by three times the
# 8x8 window the GPT was trained on.
python sample.py --workdir="$RUNS/photos_transformer" --num_samples=16 \
  --grid=16x24 --outdir="$RUNS/photos_samples"
