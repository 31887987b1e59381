"""The main job, shortened: VQGAN -> codes -> class-conditional GPT -> sample images."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from vqgan_jax_testing import train_utils as tu


@pytest.mark.slow
def test_digits_pipeline_ends_in_sample_images(tmp_path):
  vq, tr, out = tmp_path / "vq", tmp_path / "tr", tmp_path / "samples"
  cache = tmp_path / "jax_cache"
  tu.run_python(["train_vqgan.py", "--config=configs/digits_vqgan.py:test", f"--workdir={vq}",
                 f"--compilation_cache_dir={cache}"])
  # The persistent compilation cache holds the run's compiled programs.
  assert any(n.startswith("jit_step") for n in os.listdir(cache)), os.listdir(cache)
  tu.run_python(["train_transformer.py", "--config=configs/digits_transformer.py:test",
                 f"--workdir={tr}", f"--config.vqgan_workdir={vq}", "--host_malloc=keep"])
  r = tu.run_python(["sample.py", f"--workdir={tr}", "--num_samples=2", f"--outdir={out}",
                     "--host_malloc=keep"])
  files = sorted(os.listdir(out))
  assert files == sorted(["grid.png"] + [f"{c}_{i:04d}.png" for c in range(10) for i in range(2)])
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape[0] > grid.shape[1]  # 10 rows (one per digit) of 2 samples
  one = np.asarray(Image.open(out / "7_0001.png"))
  assert one.shape[:2] == (16, 16) and one.std() > 0
  info = json.load(open(tr / "model.json"))
  assert info["conditioning"]["kind"] == "class" and info["image_grid"] == [8, 8]
  rows = tu.rows(tr)
  assert any("eval_loss" in r for r in rows) and any("tokens_per_sec" in r for r in rows)
  assert (tr / "images").is_dir() and os.listdir(tr / "images")
  assert "20 samples" in r.stdout
