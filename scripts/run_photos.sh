#!/usr/bin/env bash
# Real photographs, offline: 32x32 crops of the photos bundled with
# scikit-image and scikit-learn (chelsea and china held out, whole), a small
# f4 VQGAN trained on the others (1,500 steps, about 15 minutes on 2 CPU
# cores), then its held-out PSNR, SSIM and codebook usage beside
# shrink-and-enlarge and k-means VQ at the same bit budget, and a grid of
# held-out originals above their reconstructions. Needs scikit-image
# (pip install -e '.[photos]'). Re-running resumes training from its
# checkpoints. docs/photos.md has the measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
export TF_CPP_MIN_LOG_LEVEL=3
python -m benchmarks.photos prepare --out="$RUNS/photos_data"
python train_vqgan.py --config=configs/folder_vqgan.py:"$RUNS/photos_data/train",photos \
  --workdir="$RUNS/photos_vqgan" "$@"
python -m benchmarks.photos report --data="$RUNS/photos_data" \
  --vqgan="$RUNS/photos_vqgan" --output="$RUNS/photos_vqgan/photos.json"
