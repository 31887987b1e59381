"""The main job, shortened: `scripts/run_digits.sh` with the seconds-long
configs (VQGAN -> codes -> class-conditional GPT -> guided samples -> judge);
the seed study's bookkeeping around it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqgan_jax_testing import train_utils as tu


@pytest.mark.slow
def test_digits_pipeline_ends_in_sample_images(tmp_path):
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


def test_seed_study_runs_the_main_job_per_seed_and_reports_the_spread(tmp_path, monkeypatch,
                                                                      capsys):
  """`benchmarks.ablations.digits_seeds` with the commands replaced by what
  they write: the main job per seed (SEED, RUNS, CONFIG in its environment),
  then unguided samples and their judge; the table and results.json."""
  from benchmarks.ablations import digits_seeds
  calls = []

  def fake_run(cmd, env):
    calls.append((cmd, env))
    runs = env["RUNS"]
    seed = int(env["SEED"])
    if cmd[0] == "bash":
      assert cmd[1].endswith("run_digits.sh") and env["CONFIG"] == ":test"
      assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
      for name, row in (("digits_vqgan", dict(step=9, eval_psnr=30.0 + seed,
                                              eval_codebook_usage=0.9)),
                        ("digits_transformer", dict(step=9, eval_loss=2.0 + seed / 10))):
        os.makedirs(os.path.join(runs, name))
        with open(os.path.join(runs, name, "metrics.jsonl"), "w") as f:
          f.write(json.dumps(dict(step=1, loss=1.0)) + "\n" + json.dumps(row) + "\n")
      os.makedirs(os.path.join(runs, "digits_samples"))
      json.dump({"accuracy": 0.95 + seed / 100},
                open(os.path.join(runs, "digits_samples", "judge.json"), "w"))
    elif "sample.py" in cmd:
      assert "--guidance_scale=1" in cmd and f"--seed={seed}" in cmd
    else:
      assert cmd[1:4] == ["-m", "vqgan_jax.evaluate", "digits-judge"]
      out = [c.split("=", 1)[1] for c in cmd if c.startswith("--output=")][0]
      os.makedirs(os.path.dirname(out), exist_ok=True)
      json.dump({"accuracy": 0.85}, open(out, "w"))

  monkeypatch.setattr(digits_seeds, "_run", fake_run)
  assert digits_seeds.main([f"--workdir={tmp_path}", "--seeds=1,2", "--config=:test"]) == 0
  assert len(calls) == 6 and [int(e["SEED"]) for _, e in calls] == [1, 1, 1, 2, 2, 2]
  res = json.load(open(tmp_path / "results.json"))
  assert res["seeds"] == [1, 2] and res["cpu"]
  assert [r["eval_psnr"] for r in res["rows"]] == [31.0, 32.0]
  assert [r["judge_guided"] for r in res["rows"]] == [0.96, 0.97]
  assert [r["judge_unguided"] for r in res["rows"]] == [0.85, 0.85]
  assert res["summary"]["eval_psnr"]["min"] == 31.0 and res["summary"]["eval_psnr"]["max"] == 32.0
  assert abs(res["summary"]["eval_loss"]["mean"] - 2.15) < 1e-9
  out = capsys.readouterr().out
  assert "| 1 | 31.00 | 90.0% | 2.100 | 96.0% | 85.0% |" in out
  assert "| min-max | 31.00-32.00 |" in out
