"""The benchmark harness: its arithmetic, its reference shims, its imports."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import __main__ as cli
from benchmarks import refcompat
from benchmarks import suite
from benchmarks import table
from vqgan_jax_testing import train_utils

_ROOT = train_utils.ROOT


def test_filter_shim_matches_transformers():
  """The GPU image's transformers lacks top_k_top_p_filtering: ours is equal."""
  from vqgan_jax_testing import oracle
  torch = oracle.torch()
  import transformers
  g = torch.Generator().manual_seed(0)
  for k, p in [(0, 1.0), (100, 1.0), (10, 0.9), (0, 0.5), (1024, 0.95)]:
    x = 3 * torch.randn(8, 1024, generator=g)
    want = transformers.top_k_top_p_filtering(x.clone(), top_k=k, top_p=p)
    got = refcompat.top_k_top_p_filtering(x.clone(), top_k=k, top_p=p)
    assert torch.equal(got, want), (k, p)


def test_reference_imports_on_gpu_image_stack_without_tensorflow():
  """Lightning 2 / transformers 5 lack names the reference imports; shimmed.

  Also: importing the harness, models and trainers never imports TensorFlow
  (it is absent on the GPU machine).
  """
  code = textwrap.dedent("""
      import sys, types
      sys.modules["tensorflow"] = None  # any import of it now fails
      from benchmarks import __main__, suite, refcompat
      from vqgan_jax import gpt, sampling, vqgan
      from vqgan_jax.training import transformer_trainer, vqgan_trainer
      refcompat.oracle.torch()
      import pytorch_lightning.utilities as plu
      del plu.distributed  # as in Lightning 2.x
      sys.modules["pytorch_lightning.utilities.distributed"] = None
      sys.modules["transformers"] = types.ModuleType("transformers")
      torch, taming = refcompat.reference()
      import taming.main
      from taming.modules.transformer import mingpt
      assert mingpt.top_k_top_p_filtering is refcompat.top_k_top_p_filtering
      assert callable(taming.main.rank_zero_only)
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=_ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


def test_gpt_model_flops_agree_with_xla_cost_analysis():
  """6N + attention FLOPs vs XLA's count of our real train step (f32)."""
  from vqgan_jax.training import schema
  from vqgan_jax.training import transformer_trainer as tt
  layers, width, heads, vocab, tokens, batch = 2, 128, 4, 256, 64, 4
  cfg = schema.transformer_config()
  cfg.conditioning.num_classes = 10
  cfg.gpt.update(dict(n_layer=layers, n_head=heads, n_embd=width))
  layout = tt.make_layout(cfg, vocab, (1, tokens))
  model = tt.build_model(cfg, layout)
  tx = tt.make_optimizer(cfg)
  state = jax.eval_shape(lambda: tt.init_state(model, tx,
                                               jax.random.PRNGKey(0)))
  step, _ = tt.make_train_step(model, tx, cfg, layout)
  b = {"codes": jax.ShapeDtypeStruct((batch, 1, tokens), jnp.int32),
       "cond": jax.ShapeDtypeStruct((batch, 1), jnp.int32)}
  flops = table.xla_flops(jax.jit(step).lower(state, b).compile())
  model_flops = suite.gpt_train_flops(layers, width, vocab, tokens, batch)
  # XLA also counts softmax, layer norms, GELU and AdamW; the matmuls
  # dominate, so the two agree within a few tens of percent.
  assert 0.9 < flops / model_flops < 1.4, (flops, model_flops)


def test_sampling_floor_counts_weights_per_step_and_filled_cache():
  # 3 tokens after a 1-token prefix: 3 reads of the weights, and cache
  # reads at positions 1 and 2: 2 (k, v) x 2 layers x 5 batch x 7 width x
  # (1 + 2) x 2 bytes = 840 bytes.
  got = suite.sampling_floor_s(1e6, layers=2, width=7, batch=5, prefix=1,
                               tokens=3, cache_itemsize=2, tb_per_s=1.0)
  assert got == pytest.approx((3e6 + 840) / 1e12, rel=1e-12)


def test_rows_ratio_median_and_mfu():
  ref = table.Row("b", "reference", "float32", "images/s", 4, [2.0, 4.0, 9.0])
  ours = table.Row("b", "vqgan-jax", "bfloat16", "images/s", 4,
                   [1.0, 1.0, 3.0, 2.0], flops=2e12, peak_tflops=4.0)
  assert ours.median_s == 1.5 and ref.median_s == 4.0
  assert ours.rate == pytest.approx(4 / 1.5)
  assert ours.mfu == pytest.approx(2.0 / 1.5 / 4.0)
  text = table.format_rows([ours, ref])
  assert "| 2.67x |" in text and "| 1.00x |" in text
  rows, notes, meta = table.from_json(table.to_json([ours, ref], ["n"],
                                                    {"h": 1}))
  assert rows == [ours, ref] and notes == ["n"] and meta == {"h": 1}


def test_peaks_by_device_kind():
  assert table.peak_for("bfloat16", "NVIDIA H100 80GB HBM3") == 989.0
  assert table.peak_for("autocast bf16", "NVIDIA H100 80GB HBM3") == 989.0
  # float32 as XLA runs it on NVIDIA tensor cores: TF32, half the bf16 rate.
  assert table.peak_for("float32", "NVIDIA H100 80GB HBM3") == 989.0 / 2
  assert table.peaks("TPU v5 lite")[0] == 197.0
  assert table.peak_for("float32", "cpu", cpu_peak=0.1) == 0.1


def test_cli_rejects_bad_values_by_name():
  with pytest.raises(ValueError, match="train_vqgan.sizee"):
    cli._sizes("tiny", ["train_vqgan.sizee=3"])
  assert cli._sizes("tiny", ["train_vqgan.size=48"])["train_vqgan"][
      "size"] == 48
  with pytest.raises(ValueError, match="float16"):
    cli.main(["--dtype=float16", "--only=sampling"])
  with pytest.raises(ValueError, match="--only='nope'"):
    suite.run_section("nope", None, {})
  assert np.isfinite(suite.gpt_train_flops(1, 8, 16, 4, 2))


def test_resized_section_rows_are_their_own_benchmark(tmp_path):
  """gpu.sh runs sampling at two sizes and merges the tables: rows of a
  `--set` size carry it in their name, so each size keeps its own ratios."""
  out = tmp_path / "s.json"
  assert cli.main(["--tiny", "--only=sampling", "--ref=none",
                   "--dtype=float32", "--repeats=1", "--warmup=0",
                   "--set=sampling.layers=1", f"--json={out}"]) == 0
  rows, _, _ = table.from_json(out.read_text())
  assert [r.bench for r in rows] == ["sampling (layers=1)"]


def test_host_drawn_state_keeps_the_tree_and_draws_only_parameters():
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.ones((64, 32)), "ln": {"scale": jnp.ones((32,))},
            "b": {"bias": jnp.ones((32,))}}
  shapes = jax.eval_shape(lambda: {
      "step": jnp.zeros((), jnp.int32), "params": params,
      "opt_state": optax.adamw(1e-3).init(params),
      "disc_params": {"k": jnp.ones((16, 8))},
      "disc_state": {"mean": jnp.ones((8,))},
      "rng": jax.random.PRNGKey(0)})
  state = common.host_drawn_state(shapes, std=0.02)
  assert jax.tree.structure(state) == jax.tree.structure(shapes)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shapes)):
    assert got.shape == want.shape and got.dtype == want.dtype
  w = state["params"]["w"]
  assert 0.015 < float(np.std(w)) < 0.025 and np.all(np.isfinite(w))
  assert 0.01 < float(np.std(state["disc_params"]["k"])) < 0.03
  # Norm scales are one and biases zero, as a real initialiser leaves them.
  assert np.all(state["params"]["ln"]["scale"] == 1)
  assert not np.any(state["params"]["b"]["bias"])
  assert not np.any(state["disc_state"]["mean"])
  # Adam's moments and the counters stay zero (no sign of a trained state).
  assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]))
  assert not np.any(state["rng"]) and state["step"] == 0
  again = common.host_drawn_state(shapes, std=0.02)
  np.testing.assert_array_equal(again["params"]["w"], w)  # seeded


def test_host_drawn_stage1_state_runs_a_finite_step():
  """gpu.sh's stage-1 rows start from a host-drawn state (no initialiser
  compile): it must fit the trainer's state tree and give a finite step."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from vqgan_jax_testing import train_utils as tu  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sharding  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import vqgan_trainer as vt  # pylint: disable=import-outside-toplevel
  c = tu.load_config("digits_vqgan", "test")
  c.loss.update(dict(disc_start=0, disc_weight=0.8))
  run = vt.create(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  state = jax.device_put(common.host_drawn_state(run.abstract_state),
                         run.state_shardings)
  assert jax.tree.structure(state) == jax.tree.structure(run.abstract_state)
  r = c.model.resolution
  x = np.random.default_rng(0).uniform(-1, 1, (c.batch_size, r, r, 3))
  batch = {"image": jax.device_put(jnp.asarray(x, jnp.float32),
                                   run.batch_sharding)}
  new, m = run.step_fn(state, batch, run.lpips_vars)
  assert np.isfinite(float(m["loss"])) and int(new["bad_steps"]) == 0
  assert int(new["step"]) == 1


def test_stage2_probe_profile_sums_kernel_time(tmp_path, capsys):
  from benchmarks.probes import gpu_stage2_probe as probe  # pylint: disable=import-outside-toplevel
  a = jnp.ones((128, 128))
  f = jax.jit(lambda a: jnp.tanh(a @ a + 1.0).sum()).lower(a).compile()
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(a).block_until_ready()
  probe.kernel_profile(str(tmp_path), steps=2, hlo_text=f.as_text())
  out = capsys.readouterr().out
  assert "ms of kernel time per step" in out
  for cls in ("matmul", "attention", "other"):
    assert cls in out
  # XLA's own kernels are named by their HLO: result shape and JAX source.
  assert re.search(r"= f32\[[\d,]*\] from jit\(<lambda>\)/", out), out
  index = probe.hlo_index(
      '%loop_convert_multiply_fusion.3 = bf16[16,512,4096]{2,1,0} fusion('
      '%p0), kind=kLoop, calls=%fused_computation.3, metadata={op_type='
      '"mul" op_name="jit(step)/transpose(jvp(GPT))/blocks/mlp/mul"}')
  assert index["loop_convert_multiply_fusion_3"] == (
      "bf16[16,512,4096]", "jit(step)/transpose(jvp(GPT))/blocks/mlp/mul")
  assert probe._classify("nvjet_sm90_tst_128x160") == "matmul"  # pylint: disable=protected-access
  assert probe._classify(  # pylint: disable=protected-access
      "cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
  assert probe._classify("loop_convert_multiply_fusion") == "other"  # pylint: disable=protected-access


def test_stage2_probe_prices_the_lean_backward_passes(capsys):
  """The probe's autodiff_backward variant swaps in jax.nn.gelu and flax's
  norms while tracing (and puts them back): XLA plans more memory for it."""
  from benchmarks.probes import gpu_stage2_probe as probe  # pylint: disable=import-outside-toplevel
  from vqgan_jax import gpt_layers  # pylint: disable=import-outside-toplevel
  before = gpt_layers.gelu_exact, gpt_layers.make_norm
  probe.main(["--tiny", "--variants", "base,autodiff_backward", "--steps",
              "1", "--trace_steps", "0"])
  assert (gpt_layers.gelu_exact, gpt_layers.make_norm) == before
  rows = {line.split("|")[1].strip(): line.split("|")
          for line in capsys.readouterr().out.splitlines()
          if line.startswith("| base") or line.startswith("| autodiff")}
  plan = {name: float(cells[7]) for name, cells in rows.items()}
  assert plan["base"] < plan["autodiff_backward"], rows


def test_stage2_memory_plan_compiles_without_running():
  from benchmarks.probes import stage2_memory_plan  # pylint: disable=import-outside-toplevel
  plans = stage2_memory_plan.main(["--tiny", "--dtypes", "float32"])
  assert plans[("float32", "base")] < plans[("float32", "autodiff_backward")]


def test_host_malloc_vqgan_workload_builds_the_benchmarked_step(monkeypatch):
  """The vqgan workload hands `suite.stage1_step` a random VGG16
  state dict and LPIPS's own linear layers. Compiling and running that step
  here, in a subprocess, took ~55 s of CI; the trainer's step from a
  host-drawn state runs in test_host_drawn_stage1_state_runs_a_finite_step,
  and stage1_step itself in `python -m benchmarks --only=train_vqgan`."""
  from benchmarks.probes import host_malloc  # pylint: disable=import-outside-toplevel
  from vqgan_jax import torch_io  # pylint: disable=import-outside-toplevel
  seen = {}

  def stage1_step(dd, n_embed, embed_dim, batch, dtype, vgg_path, lin_path,
                  x, extra):
    seen.update(vgg=torch_io.load_state_dict(vgg_path),
                lin=os.path.isfile(lin_path), x=x.shape, dtype=dtype)
    return "step", 0.0, None

  monkeypatch.setattr(suite, "stage1_step", stage1_step)
  assert host_malloc._vqgan_step(32, True) == "step"  # pylint: disable=protected-access
  assert seen["vgg"]["features.28.weight"].shape == (512, 512, 3, 3)
  assert seen["lin"] and seen["x"][1:3] == (32, 32)
  assert seen["dtype"] == "float32"


@pytest.mark.parametrize("workload", [["--workload=digits_gpt"]])
def test_host_malloc_benchmark_runs_steps_under_kept_memory(workload):
  """`python -m benchmarks.probes.host_malloc` (one setting per process) runs."""
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.probes.host_malloc", "--mode=keep",
       "--steps=2"] + workload, cwd=_ROOT, capture_output=True,
      text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  assert "--mode=keep (applied: True)" in out and "s/step" in out, out
  timed = [l for l in out.splitlines() if l.startswith("steps: ")]
  assert len(timed) == 1 and timed[0].count(" s/") == 2, out  # per step


def test_benchmarks_and_tests_import_the_support_package_not_sys_path():
  """The reference oracle is `vqgan_jax_testing`; nothing edits sys.path,
  and the benchmark sections have one implementation each (suite.py)."""
  edits = ("sys.path." + "insert", "sys.path." + "append")
  found = []
  for top in ("benchmarks", "tests", "vqgan_jax", "vqgan_jax_testing",
              "scripts", "configs", "."):
    folder = os.path.join(_ROOT, top)
    names = (os.listdir(folder) if top == "." else
             [os.path.relpath(os.path.join(d, f), folder)
              for d, _, fs in os.walk(folder) for f in fs])
    for name in names:
      path = os.path.join(folder, name)
      if name.endswith(".py") and os.path.isfile(path):
        with open(path) as f:
          text = f.read()
        found += [f"{top}/{name}" for e in edits if e in text]
  assert not found, found
  assert set(suite.RUNNERS) == set(suite.SECTIONS)
  scripts = [f for f in os.listdir(os.path.join(_ROOT, "benchmarks"))
             if f.endswith(".py")]
  assert sorted(scripts) == ["__init__.py", "__main__.py", "common.py",
                             "refcompat.py", "suite.py", "table.py"], scripts


def test_reference_side_by_side_trains_the_reference_and_reports_both(tmp_path, monkeypatch,
                                                                     capsys):
  """The side-by-side benchmark: the reference (PyTorch) really trains from
  its random weights on this project's batches and is evaluated on the
  validation digits; the converted weights are what vqgan-jax starts from
  (its trainer replaced here by what it writes); a second run reuses both."""
  from benchmarks.ablations import reference_side_by_side as sbs
  from vqgan_jax import checkpoint as ckpt_lib
  started = []

  def fake_ours(config, workdir):
    started.append((config.init_from, config.model.quantizer_options.vq.codebook_update,
                    config.model.quantizer_options.vq.legacy_loss))
    info, _ = ckpt_lib.load_variables(config.init_from, "vqgan")
    assert info["config"]["n_embed"] == config.model.n_embed
    return [dict(step=s, eval_psnr=9.0 + s, eval_codebook_usage=0.5)
            for s in range(config.eval_every, config.num_train_steps + 1,
                           config.eval_every)]

  monkeypatch.setattr(sbs, "train_ours", fake_ours)
  argv = [f"--workdir={tmp_path}", "--seeds=0", "--steps=4", "--disc_start=2",
          "--eval_every=2", "--options=ema_restart", "--config_arg=test"]
  assert sbs.main(argv) == 0
  res = json.load(open(tmp_path / "results.json"))
  ref = res["runs"]["reference"]["0"]
  assert [r["step"] for r in ref] == [2, 4]
  assert all(0 < r["eval_psnr"] < 60 and 0 < r["eval_codebook_usage"] <= 1 for r in ref)
  assert ref[0]["eval_psnr"] != ref[1]["eval_psnr"]  # it trained
  init = str(tmp_path / "seed_0" / "init" / "converted")
  assert started == [(init, "loss", True), (init, "ema", True)]
  out = capsys.readouterr().out
  assert "| ours | 0 | 11.00 | 13.00 | 0.500 |" in out
  assert "| step | reference | ours | ema_restart |" in out
  # Again: nothing retrains.
  monkeypatch.setattr(sbs, "train_reference", lambda *a, **k: pytest.fail("retrained"))
  started.clear()
  assert sbs.main(argv) == 0 and started == []
  for bad in (["--steps=4", "--disc_start=4"], ["--options=nope"], ["--seeds=a"]):
    with pytest.raises(SystemExit) as e:
      sbs.main([f"--workdir={tmp_path}"] + bad)
    assert e.value.code == 2


def test_reference_side_by_side_on_photo_crops(tmp_path, monkeypatch, capsys):
  """--photos: the reference trains on a prepared photo folder's crops with
  the photos preset's architecture and is scored on its held-out tiles; our
  run gets the same data, no augmentation, and the held-out evaluation."""
  import numpy as np
  from PIL import Image
  from benchmarks.ablations import reference_side_by_side as sbs
  from vqgan_jax.data import photos
  rng = np.random.default_rng(0)
  fake = {f"p{i}": np.asarray(Image.fromarray(
      rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((64, 48)))
          for i in range(3)}
  data = tmp_path / "data"
  photos.prepare(str(data), size=32, stride=16, heldout=("p2",),
                 photos=tuple(fake), loader=fake.__getitem__)
  started = []

  def fake_ours(config, workdir):
    started.append((config.dataset, config.eval_dataset, config.augment,
                    config.model.resolution))
    return [dict(step=s, eval_psnr=9.0 + s, eval_codebook_usage=0.5)
            for s in range(config.eval_every, config.num_train_steps + 1,
                           config.eval_every)]

  monkeypatch.setattr(sbs, "train_ours", fake_ours)
  argv = [f"--workdir={tmp_path / 'side'}", "--seeds=0", "--steps=2",
          "--disc_start=1", "--eval_every=2", "--options=", f"--photos={data}"]
  assert sbs.main(argv) == 0
  assert started == [(f"folder:{data / 'train'}", f"folder:{data / 'heldout'}",
                      (), 32)]
  res = json.load(open(tmp_path / "side" / "results.json"))
  assert res["data"] == f"photos ({data})"
  ref = res["runs"]["reference"]["0"]
  assert [r["step"] for r in ref] == [2] and 0 < ref[0]["eval_psnr"] < 60
  assert f"photos ({data}), 2 steps" in capsys.readouterr().out
  for bad, message in (([f"--photos={tmp_path}"], "has no heldout/ folder"),
                       ([f"--photos={data}", "--config_arg=test"], "--config_arg")):
    with pytest.raises(SystemExit) as e:
      sbs.main([f"--workdir={tmp_path / 'side'}"] + bad)
    assert e.value.code == 2 and message in capsys.readouterr().err
