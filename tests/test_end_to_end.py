"""The main job, shortened: `scripts/run_digits.sh` with the seconds-long
configs (VQGAN -> codes -> class-conditional GPT -> guided samples -> judge),
then the seed study on top of the finished run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqgan_jax_testing import train_utils as tu


@pytest.mark.slow
def test_digits_pipeline_ends_in_sample_images_and_the_seed_study_reads_it(tmp_path):
  runs = tmp_path / "seed_3"
  # The script calls `python`: this interpreter's, as after `. .venv/bin/activate`.
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  cache = tmp_path / "jax_cache"
  r = subprocess.run(["bash", "scripts/run_digits.sh", f"--compilation_cache_dir={cache}"],
                     cwd=tu.ROOT, capture_output=True, text=True, timeout=900,
                     env=tu.env(RUNS=str(runs), SEED="3", CONFIG=":test", PATH=path))
  assert r.returncode == 0, r.stderr[-5000:]
  # Stage 1's --compilation_cache_dir holds the run's compiled programs.
  assert any(n.startswith("jit_step") for n in os.listdir(cache)), os.listdir(cache)
  vq, tr, out = runs / "digits_vqgan", runs / "digits_transformer", runs / "digits_samples"
  # SEED reaches both stages.
  assert json.load(open(vq / "model.json"))["train_config"]["seed"] == 3
  info = json.load(open(tr / "model.json"))
  assert info["train_config"]["seed"] == 3
  assert info["conditioning"]["kind"] == "class" and info["image_grid"] == [8, 8]
  # The config's sampling settings travel with the model, and sample.py used them.
  assert info["sampling"]["guidance_scale"] == 3.0
  assert "sampling with the model's config.sampling: guidance_scale=3" in r.stdout
  files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert files == sorted(["grid.png"] + [f"{c}_{i:04d}.png" for c in range(10) for i in range(10)])
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.shape[0] == grid.shape[1]  # 10 rows (one per digit) of 10 samples
  one = np.asarray(Image.open(out / "7_0001.png"))
  assert one.shape[:2] == (16, 16) and one.std() > 0
  rows = tu.rows(tr)
  assert any("eval_loss" in x for x in rows) and any("tokens_per_sec" in x for x in rows)
  assert (tr / "images").is_dir() and os.listdir(tr / "images")
  # The summary the README shows.
  for line in ("VQGAN:       held-out PSNR", "Transformer: validation loss",
               "Judge:       the intended digit in", "guidance scale 3;"):
    assert line in r.stdout, r.stdout[-3000:]

  # The seed study resumes the finished run: it only adds unguided samples.
  s = subprocess.run([sys.executable, "-m", "benchmarks.ablations.digits_seeds",
                      f"--workdir={tmp_path}", "--seeds=3", "--config=:test"],
                     cwd=tu.ROOT, capture_output=True, text=True, timeout=900,
                     env=tu.env(PATH=path))
  assert s.returncode == 0, s.stderr[-5000:]
  res = json.load(open(tmp_path / "results.json"))
  assert res["seeds"] == [3] and res["cpu"]
  row = res["rows"][0]
  judge = json.load(open(out / "judge.json"))
  assert row["judge_guided"] == judge["accuracy"]
  unguided = json.load(open(runs / "digits_samples_unguided" / "judge.json"))
  assert row["judge_unguided"] == unguided["accuracy"]
  assert row["eval_psnr"] == [x for x in tu.rows(vq) if "eval_psnr" in x][-1]["eval_psnr"]
  assert "| 3 |" in s.stdout and "| min-max |" in s.stdout
