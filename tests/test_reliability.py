"""Reliability: bad configs fail before any work, non-finite steps are skipped
and stop the run (both stages), kills and SIGTERM during a save never cost a
usable checkpoint, damaged checkpoint steps are set aside, a workdir of
another architecture is refused untouched, bad files are counted,
checkpoints move across meshes.

The SIGKILL-at-a-checkpoint, SIGTERM and 8 -> 1 -> 4 device stage-1 tests live
in test_vqgan_trainer.py; these tests cover the rest (docs/troubleshooting.md's
"When things go wrong" table lists every fault and its test).
"""
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.training import checkpoints
from vqgan_jax import sharding
from vqgan_jax.training import schema
from vqgan_jax.training import transformer_trainer as tt
from vqgan_jax.training import vqgan_trainer as vt


def _set(config, field, value):
  node, keys = config, field.split(".")
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value


def _digest(directory):
  """{relative path: sha1} of every file under ``directory``."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
  return out


# ----------------------------------------------------------------------------
# 1. Config validation before anything compiles


@pytest.mark.parametrize("field,value,devices,message", [
    ("model.ch", 48, 1, r"config\.model\.ch=48 is not divisible by 32, the GroupNorm"),
    ("model.resolution", 17, 1,
     r"config\.model\.resolution=17 is not divisible by the downsampling factor 2 "
     r"\(2\*\*\(len\(ch_mult\)-1\)\); use a multiple of 2"),
    ("model.attn_resolutions", (5,), 1,
     r"attn_resolutions contains \[5\], never reached; reached resolutions are \[8, 16\]"),
    ("model.quantizer", "kmeans", 1, r"config\.model\.quantizer='kmeans'; valid: \('vq', 'gumbel'"),
    ("loss.disc_loss", "wgan", 1, r"config\.loss\.disc_loss='wgan'; valid"),
    ("optim.lr_scaling", "linear", 1, r"config\.optim\.lr_scaling='linear'; valid"),
    ("dataset", "imagenet", 1, r"unknown dataset 'imagenet'; config\.dataset must be one of "
     r"'digits', 'tfds:NAME\[:SPLIT\]' \(with data_dir\), 'folder:PATH'"),
    ("dataset", "folder:", 1, r"unknown dataset 'folder:'"),
    ("max_bad_steps", 0, 1, r"config\.max_bad_steps=0 must be >= 1"),
    ("batch_size", 12, 8, r"config\.batch_size=12 is not divisible by the 8 devices of the "
     r"mesh \{'data': 8, 'fsdp': 1\}; use a multiple of 8 \(e\.g\. 8 or 16\)"),
    ("mesh", {"data": 3}, 8, r"config\.mesh=\{'data': 3\} has 3 devices but 8 are available"),
    ("mesh", {"data": -1, "fsdp": 3}, 8, r"does not fit 8 devices: 8 is not divisible by 3"),
])
def test_stage1_config_errors_name_field_value_and_fix(field, value, devices, message):
  c = tu.load_config("digits_vqgan", "test")
  schema.validate_vqgan(c, num_devices=devices)  # valid as is
  _set(c, field, value)
  with pytest.raises(schema.ConfigError, match=message):
    schema.validate_vqgan(c, num_devices=devices)


def _vqgan_dir(path, **model):
  """A minimal converted-VQGAN directory (model.json + params/)."""
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(model)
  cfg = vqgan_lib.model_config(vqgan_lib.from_config(c.model.to_dict()))
  ckpt_lib.write_model_json(str(path), "vqgan", cfg)
  os.makedirs(os.path.join(path, "params"), exist_ok=True)
  return str(path)


def test_init_from_of_another_architecture_is_refused_from_model_json(tmp_path):
  c = tu.load_config("digits_vqgan", "test")
  c.init_from = _vqgan_dir(tmp_path / "same")
  schema.validate_vqgan(c, num_devices=1)
  c.init_from = _vqgan_dir(tmp_path / "other", n_embed=64, ch_mult=(1, 2, 2))
  with pytest.raises(schema.ConfigError,
                     match=r"holds a different architecture: ch_mult: checkpoint \[1, 2, 2\] vs "
                     r"config \[1, 2\], n_embed: checkpoint 64 vs config 32; set config.model"):
    schema.validate_vqgan(c, num_devices=1)
  c.init_from = str(tmp_path / "missing")
  with pytest.raises(schema.ConfigError, match=r"config\.init_from=.*missing does not exist"):
    schema.validate_vqgan(c, num_devices=1)
  (tmp_path / "empty").mkdir()
  c.init_from = str(tmp_path / "empty")
  with pytest.raises(schema.ConfigError, match=r"config\.init_from=.*holds no model\.json"):
    schema.validate_vqgan(c, num_devices=1)


def test_init_from_starts_the_weight_average_at_the_loaded_weights(
    monkeypatch):
  """With ``optim.ema_decay`` the averaged weights restart from the loaded
  ones, not from the random initialisation they replaced."""
  from vqgan_jax.training import vqgan_trainer as vt  # pylint: disable=import-outside-toplevel
  c = tu.load_config("digits_vqgan", "test")
  c.optim.ema_decay = 0.999
  loaded = {"w": np.ones((3,), np.float32)}
  monkeypatch.setattr(vt.ckpt_lib, "load_variables",
                      lambda path, kind: ({"config": {}}, {"params": loaded}))
  monkeypatch.setattr(vt.config_paths, "check_init_from", lambda *a: None)
  random_init = {"w": np.zeros((3,), np.float32)}
  state = vt._load_init_from(
      c, None, {"params": random_init, "ema_params": random_init}, {})
  np.testing.assert_array_equal(state["params"]["w"], loaded["w"])
  np.testing.assert_array_equal(state["ema_params"]["w"], loaded["w"])


@pytest.mark.parametrize("field,value,message", [
    ("conditioning.kind", "text", r"config\.conditioning\.kind='text'; valid: \('sos'"),
    ("permuter", "hilbert", r"config\.permuter='hilbert'; valid"),
    ("gpt.n_head", 3, r"config\.gpt\.n_embd=32 is not divisible by config\.gpt\.n_head=3"),
    ("gpt.remat_policy", "offload", r"config\.gpt\.remat_policy='offload'; valid: \('full'"),
    ("gpt.norm", "batchnorm", r"config\.gpt\.norm='batchnorm'; valid"),
    ("optim.schedule", "linear", r"config\.optim\.schedule='linear'; valid"),
    ("dataset", "tfds", r"unknown dataset 'tfds'"),
    ("batch_size", 6, r"config\.batch_size=6 is not divisible by the 4 devices"),
    ("vqgan_workdir", "/nonexistent/vq", r"config\.vqgan_workdir=/nonexistent/vq does not exist"),
])
def test_stage2_config_errors_name_field_value_and_fix(tmp_path, field, value, message):
  c = tu.load_config("digits_transformer", "test")
  c.vqgan_workdir = _vqgan_dir(tmp_path / "vq")
  schema.validate_transformer(c, num_devices=4)
  _set(c, field, value)
  with pytest.raises(schema.ConfigError, match=message):
    schema.validate_transformer(c, num_devices=4)


@pytest.mark.parametrize("override,message", [
    ("--config.model.ch=48", "error: config.model.ch=48 is not divisible by 32"),
    ("--config.mesh.data=2", "error: config.mesh={'data': 2, 'fsdp': 1} has 2 devices but 1 "
     "are available"),
    ("--config.dataset=folder:/nonexistent/images", "error: folder:/nonexistent/images does "
     "not exist; point config.dataset at a folder of images"),
    ("--compilation_cache_dir=/etc/hostname", "error: --compilation_cache_dir=/etc/hostname "
     "is a file; pass a directory"),
])
def test_cli_rejects_bad_runs_with_exit_2_one_line_and_an_untouched_workdir(tmp_path, override,
                                                                            message):
  wd = tmp_path / "wd"
  ck = checkpoints.Checkpointer(str(wd))
  ck.save(3, {"w": np.arange(6.0)}, {"step": 3}, force=True)
  ck.close()
  ckpt_lib.write_model_json(str(wd), "vqgan", {"ch": 32})
  before = _digest(wd)
  r = tu.run_python(["train_vqgan.py", "--config=configs/digits_vqgan.py:test",
                     f"--workdir={wd}", override], check=False, timeout=300)
  assert r.returncode == schema.EXIT_CONFIG, (r.returncode, r.stderr[-3000:])
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert _digest(wd) == before


# ----------------------------------------------------------------------------
# 2. Non-finite steps


def _tree_np(tree):
  return jax.tree.map(lambda a: np.array(a), tree)


def test_poisoned_batch_skips_the_whole_stage1_update():
  """A NaN or an inf pixel leaves generator, optimizer, discriminator (params,
  state, optimizer) and EMA bit-identical; the next clean batch trains."""
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(ch_mult=(1,), resolution=8)  # the smallest compile
  c.batch_size = 4
  c.loss.disc_start = 0
  c.optim.ema_decay = 0.9
  run = vt.create(c, sharding.make_mesh({"data": 1}))
  state = run.init_fn(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  clean = lambda: rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  state, m = run.step_fn(state, {"image": clean()}, run.lpips_vars)
  assert int(m["skipped"]) == 0
  kept = ("params", "opt_state", "disc_params", "disc_state", "disc_opt_state", "ema_params")
  for k, poison in enumerate([np.nan, np.inf, -np.inf]):
    before = _tree_np({n: state[n] for n in kept})
    x = clean()
    x[3, 5, 6, 1] = poison
    state, m = run.step_fn(state, {"image": x}, run.lpips_vars)
    assert int(m["skipped"]) == 1 and int(state["bad_steps"]) == k + 1
    after = _tree_np({n: state[n] for n in kept})
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
      np.testing.assert_array_equal(a, b)
  before = _tree_np(state["params"])
  state, m = run.step_fn(state, {"image": clean()}, run.lpips_vars)
  assert int(m["skipped"]) == 0 and int(state["bad_steps"]) == 0
  assert np.isfinite(float(m["loss"]))
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]), strict=True)]
  assert sum(changed) > len(changed) // 2


def test_nonfinite_stage2_loss_skips_the_update():
  """A NaN in the embedding row of a token in the batch makes the loss NaN:
  parameters and optimizer state stay exactly as they were."""
  c = tu.load_config("digits_transformer", "test")
  layout = tt.make_layout(c, 16, (2, 2))
  model = tt.build_model(c, layout)
  tx = tt.make_optimizer(c)
  state = jax.jit(lambda r: tt.init_state(model, tx, r))(jax.random.PRNGKey(0))
  step = jax.jit(tt.make_train_step(model, tx, c, layout)[0])
  codes = np.random.default_rng(0).integers(0, 16, (8, 2, 2)).astype(np.int32)
  batch = {"codes": codes, "cond": np.arange(8, dtype=np.int32)[:, None] % 10}
  state, m = step(state, batch)
  assert int(m["skipped"]) == 0
  params = _tree_np(state["params"])
  emb = [k for k in params if "wte" in k or "tok" in k]
  assert emb, sorted(params)
  table = params[emb[0]]["embedding"]
  table[int(codes[0, 0, 0])] = np.nan
  state = dict(state, params=jax.tree.map(jnp.asarray, params))
  before = _tree_np({"params": state["params"], "opt_state": state["opt_state"]})
  state, m = step(state, batch)
  assert int(m["skipped"]) == 1 and int(state["bad_steps"]) == 1
  assert not np.isfinite(float(m["loss"]))
  after = _tree_np({"params": state["params"], "opt_state": state["opt_state"]})
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


def _fault_folder(root):
  """Images with every data fault: corrupt, truncated, non-image, tiny,
  grayscale, RGBA, palette; plus enough good RGB images to train on."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  for i in range(10):
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / f"rgb{i}.png")
  Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "gray.png")
  Image.fromarray(rng.integers(0, 256, (20, 22, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
  Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(
      root / "palette.png")
  Image.new("RGB", (5, 9), (255, 0, 0)).save(root / "tiny.png")
  (root / "corrupt.png").write_bytes(rng.bytes(300))
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "full.jpg")
  jpeg = (root / "full.jpg").read_bytes()
  (root / "full.jpg").unlink()
  (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
  (root / "notes.txt").write_text("not an image")


POISON = r"""
import sys, runpy
import numpy as np
from vqgan_jax import data
poison_from = int(sys.argv.pop(1))  # 0-based step index of the first poisoned batch
build = data.build_dataset

def build_poisoned(*args, **kw):
  ds = build(*args, **kw)
  make = ds.train_iterator

  def train_iterator(batch_size, seed, start_step=0, **kw2):
    it = make(batch_size, seed=seed, start_step=start_step, **kw2)

    class Poisoned:
      def __iter__(self):
        return self
      def __next__(self):
        step = it.step
        batch = next(it)
        if step >= poison_from:
          batch = dict(batch, image=batch["image"].copy())
          batch["image"][0, 0, 0, 0] = np.nan if step % 2 else np.inf
        return batch
      def close(self):
        it.close()
    return Poisoned()

  ds.train_iterator = train_iterator
  return ds

data.build_dataset = build_poisoned
sys.argv = sys.argv[1:]
runpy.run_path("train_vqgan.py", run_name="__main__")
"""


@pytest.mark.slow
def _check_stopped_after_steps_5_to_7(r, wd):
  """The run poisoned from step 5 with max_bad_steps=3 and checkpoints every
  2 steps exited 3 with one line naming steps 5-7 and checkpoint 4, logged
  each skip and counted them in metrics.jsonl; returns the rows by step."""
  assert r.returncode == schema.EXIT_NONFINITE, (r.returncode, r.stderr[-4000:])
  assert "Traceback" not in r.stderr
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1, r.stderr[-4000:]
  assert "3 non-finite steps in a row (steps 5-7, config.max_bad_steps=3)" in err[0]
  assert f"last good checkpoint is step 4 in {wd / 'checkpoints'}" in err[0]
  for s in (5, 6, 7):
    assert f"step {s}: the loss or a gradient is not finite; update skipped" in r.stderr
  rows = {row["step"]: row for row in tu.rows(wd)}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  assert [rows[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
  assert [rows[s]["skipped_total"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 2]
  assert all(np.isfinite(rows[s]["loss"]) for s in range(1, 5))
  return rows


def test_poisoned_batches_through_the_pipeline_stop_the_run_naming_step_and_checkpoint(tmp_path):
  """Real pipeline over a folder with every kind of bad file: bad files are
  skipped / converted / enlarged and counted in metrics; from step 5 every
  batch holds one inf or NaN pixel: steps 5 and 6 are skipped, logged and
  counted, the scheduled checkpoint at 6 is not written, and at step 7
  (max_bad_steps=3) the script exits with code 3 naming steps 5-7 and
  checkpoint 4, which restores."""
  images = tmp_path / "images"
  _fault_folder(images)
  wd = tmp_path / "wd"
  args = ["-c", POISON, "4", "train_vqgan.py", "--config=configs/digits_vqgan.py:test",
          f"--workdir={wd}", f"--config.dataset=folder:{images}", "--config.num_train_steps=10",
          "--config.checkpoint_every=2", "--config.log_every=1", "--config.max_bad_steps=3",
          "--config.eval_every=0", "--config.image_every=0"]
  r = tu.run_python(args, check=False, timeout=600)
  rows = _check_stopped_after_steps_5_to_7(r, wd)
  # Bad files: corrupt + truncated skipped, notes.txt ignored, tiny enlarged.
  assert rows[6]["skipped_corrupt"] == 2 and rows[6]["ignored_files"] == 1
  assert rows[6]["upscaled"] >= 1 and rows[6]["num_examples"] == 16
  ck = checkpoints.Checkpointer(str(wd))
  assert ck.all_steps() == [2, 4]
  run = vt.create(tu.load_config("digits_vqgan", "test"), sharding.make_mesh({"data": 1}))
  state, meta, step = ck.restore(checkpoints.abstract_with_shardings(
      run.abstract_state, run.state_shardings))
  ck.close()
  assert step == 4 and meta["step"] == 4 and int(state["bad_steps"]) == 0
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state["params"]))


POISON2 = r"""
import sys, runpy
from vqgan_jax.training import transformer_trainer as tt
poison_from = int(sys.argv.pop(1))  # 0-based step index of the first poisoned batch
global_batch = tt._global_batch

def poisoned(data, cond, step, config, batch_sh):
  if step >= poison_from:  # a corrupt codes cache: a code outside the codebook
    codes = data["codes"].copy()
    codes[:, 0, 0] = 10**6 + step
    data = dict(data, codes=codes)
  return global_batch(data, cond, step, config, batch_sh)

tt._global_batch = poisoned
sys.argv = sys.argv[1:]
runpy.run_path("train_transformer.py", run_name="__main__")
"""


def test_poisoned_batches_stop_a_stage2_run_naming_steps_and_checkpoint(tmp_path):
  """Stage 2 through train_transformer.py's real loop: from step 5 every
  batch holds a code outside the codebook (its embedding lookup is NaN), so
  the loss is not finite. Steps 5 and 6 are skipped, logged and counted, the
  scheduled checkpoint at 6 is not written, and at step 7 (max_bad_steps=3)
  the script exits with code 3 naming steps 5-7 and checkpoint 4, which
  restores with finite parameters."""
  vq = _tiny_vqgan_dir(tmp_path / "vq")
  wd = tmp_path / "wd"
  r = tu.run_python(["-c", POISON2, "4", "train_transformer.py",
                     "--config=configs/digits_transformer.py:test", f"--workdir={wd}",
                     f"--config.vqgan_workdir={vq}", "--config.num_train_steps=10",
                     "--config.checkpoint_every=2", "--config.log_every=1",
                     "--config.max_bad_steps=3", "--config.eval_every=0",
                     "--config.sample_every=0"], check=False, timeout=600)
  rows = _check_stopped_after_steps_5_to_7(r, wd)
  assert not any(np.isfinite(float(rows[s]["loss"])) for s in (5, 6))  # logged as "nan"
  ck = checkpoints.Checkpointer(str(wd))
  assert ck.all_steps() == [2, 4]
  c = tu.load_config("digits_transformer", "test")
  layout = tt.make_layout(c, 32, (4, 4))
  model = tt.build_model(c, layout)
  tx = tt.make_optimizer(c)
  abstract = jax.eval_shape(lambda r: tt.init_state(model, tx, r), jax.random.PRNGKey(0))
  mesh = sharding.make_mesh({"data": 1})
  state, meta, step = ck.restore(checkpoints.abstract_with_shardings(
      abstract, sharding.state_shardings(abstract, mesh)))
  ck.close()
  assert step == 4 and meta["step"] == 4 and int(state["bad_steps"]) == 0
  assert int(state["step"]) == 4
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state["params"]))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state["opt_state"]))


# ----------------------------------------------------------------------------
# 3. Preemption and damaged checkpoints


def _small_state(v):
  return {"w": jnp.full((4, 3), float(v)), "b": {"c": jnp.arange(5) + v}}


def _abstract():
  s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      _small_state(0))


@pytest.mark.parametrize("damage", ["no_commit_marker", "missing_file", "unfinished_tmp"])
def test_damaged_newest_step_is_set_aside_with_a_warning(tmp_path, caplog, damage):
  ck = checkpoints.Checkpointer(str(tmp_path))
  ck.save(1, _small_state(1), {"step": 1}, force=True)
  ck.save(2, _small_state(2), {"step": 2}, force=True)
  ck.close()
  d = tmp_path / "checkpoints"
  if damage == "no_commit_marker":
    os.remove(d / "2" / "commit_success.txt")
  elif damage == "missing_file":
    for root, _, files in os.walk(d / "2" / "state"):
      for f in files:
        if f == "manifest.ocdbt":
          os.remove(os.path.join(root, f))
  else:  # a copy of a step caught before orbax renamed it
    shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp-1700000000")
    os.remove(d / "3.orbax-checkpoint-tmp-1700000000" / "commit_success.txt")
  want = 2 if damage == "unfinished_tmp" else 1
  bad = "3" if damage == "unfinished_tmp" else "2"
  with caplog.at_level(logging.WARNING):
    ck = checkpoints.Checkpointer(str(tmp_path))
    state, meta, step = ck.restore(_abstract())
  assert step == want and meta["step"] == want
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), float(want)))
  assert f"ignoring checkpoint {bad}" in caplog.text
  expect = ["1", "2", "3.incomplete-0"] if want == 2 else ["1", "2.incomplete-0"]
  assert sorted(os.listdir(d)) == expect
  # The run goes on and writes the damaged step's number again.
  ck.save(int(bad), _small_state(7), {"step": int(bad)}, force=True)
  ck.close()
  ck = checkpoints.Checkpointer(str(tmp_path))
  state, _, step = ck.restore(_abstract())
  ck.close()
  assert step == int(bad)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 7.0))


def test_a_restore_that_fails_on_every_step_moves_nothing(tmp_path):
  """A config mismatch (every step fails) is raised, not mistaken for damage."""
  ck = checkpoints.Checkpointer(str(tmp_path))
  ck.save(1, _small_state(1), {"step": 1}, force=True)
  ck.save(2, _small_state(2), {"step": 2}, force=True)
  ck.close()
  before = _digest(tmp_path)
  wrong = dict(_abstract(), w=jax.ShapeDtypeStruct((7, 3), jnp.float32,
                                                 sharding=_abstract()["w"].sharding))
  ck = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"holds checkpoints of another model or optimizer than this config "
                     r"builds \(step 2: 1 of 2 arrays differ: w: checkpoint \(4, 3\) float32 vs "
                     r"config \(7, 3\) float32\); resume with the config the run was started "
                     r"with, or pass a new --workdir"):
    ck.restore(wrong)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"\(step 1: "):
    ck.restore(wrong, step=1)
  extra = dict(_abstract(), v=_abstract()["w"])
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"v: in the config \(4, 3\) float32, not in the checkpoint"):
    ck.restore(extra)
  ck.close()
  assert _digest(tmp_path) == before
  assert issubclass(checkpoints.CheckpointMismatchError, schema.ConfigError)


def test_loaders_read_the_newest_committed_step_and_change_nothing(tmp_path):
  """load_vqgan / load_transformer / sample.py read a workdir without moving
  anything: an uncommitted newest step is passed over."""
  ck = checkpoints.Checkpointer(str(tmp_path))
  ck.save(1, _small_state(1), {"step": 1}, force=True)
  ck.save(2, _small_state(2), {"step": 2}, force=True)
  ck.close()
  os.remove(tmp_path / "checkpoints" / "2" / "commit_success.txt")
  before = _digest(tmp_path)
  assert ckpt_lib.latest_step(str(tmp_path / "checkpoints")) == 1
  state, step = ckpt_lib.restore_workdir_state(str(tmp_path))
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 1.0))
  assert _digest(tmp_path) == before


STALL_SAVE = r"""
import asyncio, os, sys, runpy
from orbax.checkpoint._src.path import atomicity
marker, stall_step = sys.argv.pop(1), sys.argv.pop(1)
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def stalled(self, *a, **kw):
  if os.path.basename(str(self._final_path)) == stall_step:
    open(marker, "w").close()  # every file written, not yet committed
    await asyncio.sleep(3600)
  return await finalize(self, *a, **kw)

atomicity.AtomicRenameTemporaryPath.finalize = stalled
sys.argv = sys.argv[1:]
runpy.run_path("train_vqgan.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_an_async_save_resumes_from_the_previous_step(tmp_path):
  """The save of step 4 is held just before its commit and the process is
  SIGKILLed there: step 2 stays usable, the unfinished step is set aside with
  a warning, and the same command resumes from 2 and recomputes steps 3-4
  with exactly the losses of the killed attempt, also after a second attempt
  is SIGKILLed at a random moment."""
  wd = tmp_path / "wd"
  marker = tmp_path / "saving"
  cmd = ["train_vqgan.py", "--config=configs/digits_vqgan.py:test", f"--workdir={wd}",
         "--config.num_train_steps=6", "--config.checkpoint_every=2", "--config.log_every=1",
         "--config.eval_every=0", "--config.image_every=0"]
  proc = subprocess.Popen([sys.executable, "-c", STALL_SAVE, str(marker), "4"] + cmd,
                          cwd=tu.ROOT, env=tu.env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 400
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
      time.sleep(0.1)
    assert marker.exists(), "the run never reached the save of step 4"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  names = sorted(os.listdir(wd / "checkpoints"))
  assert "2" in names and "4" not in names, names
  assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names
  killed = {row["step"]: row for row in tu.rows(wd)}
  assert {3, 4} <= set(killed)
  # A second attempt SIGKILLed at a random moment (start-up, a step, a save).
  delay = random.Random().uniform(1.0, 30.0)
  proc = subprocess.Popen([sys.executable] + cmd, cwd=tu.ROOT, env=tu.env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  r = tu.run_python(cmd, timeout=600)
  assert "ignoring checkpoint 4.orbax-checkpoint-tmp" in err + r.stderr, delay
  rows = {row["step"]: row for row in tu.rows(wd)}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]
  for s in (3, 4):
    for k in ("loss", "rec_loss", "q_loss", "disc_loss", "d_weight"):
      assert rows[s][k] == killed[s][k], (delay, s, k, rows[s][k], killed[s][k])
  assert checkpoints.Checkpointer(str(wd)).all_steps()[-1] == 6


TERM_IN_SAVE = r"""
import asyncio, os, signal, sys, runpy
from orbax.checkpoint._src.path import atomicity
from vqgan_jax.training import checkpoints
marker, term_step = sys.argv.pop(1), int(sys.argv.pop(1))
finalize = atomicity.AtomicRenameTemporaryPath.finalize
save = checkpoints.Checkpointer.save

async def slow_commit(self, *a, **kw):
  if os.path.basename(str(self._final_path)) == str(term_step):
    await asyncio.sleep(2.0)  # every file written, not yet committed
  return await finalize(self, *a, **kw)

def save_then_term(self, step, *a, **kw):
  saved = save(self, step, *a, **kw)  # returns while the save runs on
  if step == term_step:
    done = os.path.exists(os.path.join(self.directory, str(step), "commit_success.txt"))
    with open(marker, "w") as f:
      f.write("committed" if done else "in flight")
    os.kill(os.getpid(), signal.SIGTERM)
  return saved

atomicity.AtomicRenameTemporaryPath.finalize = slow_commit
checkpoints.Checkpointer.save = save_then_term
sys.argv = sys.argv[1:]
runpy.run_path("train_vqgan.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigterm_during_an_async_save_commits_it_stops_cleanly_and_resumes_exactly(tmp_path):
  """SIGTERM arrives right after save() of step 2 returns, while that
  asynchronous save is held just before its commit: the run finishes that
  save, takes one more step, saves step 3 and exits with code 0 (the documented preemption exit); steps 2 and
  3 are committed and restore, nothing is set aside, and the same command
  then finishes with the losses and the final parameters of an uninterrupted
  run, bit for bit."""
  opts = ["--config=configs/digits_vqgan.py:test", "--config.model.ch_mult=(1,)",
          "--config.model.resolution=8", "--config.num_train_steps=6",
          "--config.checkpoint_every=2", "--config.log_every=1", "--config.eval_every=0",
          "--config.image_every=0"]
  full, wd, marker = tmp_path / "full", tmp_path / "wd", tmp_path / "term_sent"
  ref = subprocess.Popen([sys.executable, "train_vqgan.py", f"--workdir={full}"] + opts,
                         cwd=tu.ROOT, env=tu.env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
  r = tu.run_python(["-c", TERM_IN_SAVE, str(marker), "2", "train_vqgan.py",
                     f"--workdir={wd}"] + opts, check=False, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert marker.read_text() == "in flight"
  assert "received signal 15: saving a checkpoint and stopping" in r.stderr
  assert "stopping at step 3 after a signal" in r.stderr
  d = wd / "checkpoints"
  assert sorted(os.listdir(d)) == ["2", "3"], os.listdir(d)
  assert all((d / s / "commit_success.txt").exists() for s in ("2", "3"))
  assert sorted(row["step"] for row in tu.rows(wd)) == [1, 2, 3]
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(ch_mult=(1,), resolution=8)
  run = vt.create(c, sharding.make_mesh({"data": 1}))
  abstract = checkpoints.abstract_with_shardings(run.abstract_state, run.state_shardings)
  for s in (2, 3):
    ck = checkpoints.Checkpointer(str(wd))
    _, meta, step = ck.restore(abstract, step=s)
    ck.close()
    assert step == s and meta["step"] == s
  r = tu.run_python(["train_vqgan.py", f"--workdir={wd}"] + opts, timeout=600)
  assert "ignoring checkpoint" not in r.stderr
  _, err = ref.communicate(timeout=600)
  assert ref.returncode == 0, err[-3000:]
  a = {row["step"]: row for row in tu.rows(full)}
  b = {row["step"]: row for row in tu.rows(wd)}
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in range(1, 7):
    for k in ("loss", "rec_loss", "q_loss", "disc_loss", "d_weight", "g_loss"):
      assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
  final = []
  for w in (full, wd):
    ck = checkpoints.Checkpointer(str(w))
    state, _, step = ck.restore(abstract)
    ck.close()
    assert step == 6
    final.append(_tree_np(state))
  for x, y in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1]), strict=True):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------
# 4. Resuming a workdir with another architecture


def _error_line(r):
  """The single ``error:`` line of a refused run (exit 2, no traceback)."""
  assert r.returncode == schema.EXIT_CONFIG, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, r.stderr[-3000:]
  return lines[0]


def test_stage1_resume_with_another_architecture_exits_2_and_touches_nothing(tmp_path):
  """A workdir trained with ch=32 refuses ch=64 from its model.json before any
  device work; a change model.json does not record (the discriminator's
  width) is caught from the checkpoint's stored shapes. Both exit with code 2
  and one line naming the workdir, the step, the difference with both values
  and the fix; not a file of the workdir changes and no step is set aside."""
  wd = tmp_path / "wd"
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(ch_mult=(1,), resolution=8)  # the smallest compile
  c.update(dict(num_train_steps=2, checkpoint_every=1, log_every=1, eval_every=0,
                image_every=0))
  vt.train_and_evaluate(c, str(wd))
  before = _digest(wd)
  assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]
  cmd = ["train_vqgan.py", "--config=configs/digits_vqgan.py:test", f"--workdir={wd}",
         "--config.model.ch_mult=(1,)", "--config.model.resolution=8",
         "--config.eval_every=0", "--config.image_every=0"]
  err = _error_line(tu.run_python(cmd + ["--config.model.ch=64"], check=False, timeout=300))
  assert err == (f"error: --workdir={wd} holds checkpoints (newest step 2) of another "
                 "architecture: ch: checkpoint 32 vs config 64; resume with the config the "
                 f"run was started with (saved under \"train_config\" in {wd}/model.json), "
                 "or pass a new --workdir to start another run"), err
  err = _error_line(tu.run_python(cmd + ["--config.disc.ndf=32"], check=False, timeout=300))
  assert err.startswith(f"error: --workdir={wd} holds checkpoints of another model or "
                        "optimizer than this config builds (step 2: "), err
  assert ("disc_params/main_0/kernel: checkpoint (4, 4, 3, 16) float32 vs config "
          "(4, 4, 3, 32) float32") in err, err
  assert f"resume with the config the run was started with (saved under \"train_config\" in {wd}/model.json)" in err
  assert _digest(wd) == before


def _tiny_vqgan_dir(path):
  """A converted-style VQGAN directory with random weights (4x4 codes of 8x8
  images, 32 codes)."""
  c = tu.load_config("digits_vqgan", "test")
  c.model.update(resolution=8)
  model = vqgan_lib.from_config(c.model.to_dict())
  variables = vqgan_lib.init_variables(model, jax.random.PRNGKey(0))
  return ckpt_lib.save_pretrained(str(path), "vqgan", vqgan_lib.model_config(model),
                                  variables)


def test_stage2_resume_with_another_architecture_exits_2_and_touches_nothing(tmp_path):
  """Stage 2: n_embd 32 -> 64 is refused from model.json's train_config
  before the VQGAN or the codes load; without model.json the stored shapes
  catch it, naming a parameter path and both shapes; an optimizer change
  (another optax chain) is caught the same way. Exit 2, nothing touched."""
  vq = _tiny_vqgan_dir(tmp_path / "vq")
  wd = tmp_path / "wd"
  c = tu.load_config("digits_transformer", "test")
  c.update(dict(vqgan_workdir=vq, num_train_steps=2, checkpoint_every=1, log_every=1,
                eval_every=0, sample_every=0))
  tt.train_and_evaluate(c, str(wd))
  before = _digest(wd)
  assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]
  cmd = ["train_transformer.py", "--config=configs/digits_transformer.py:test",
         f"--workdir={wd}", f"--config.vqgan_workdir={vq}", "--config.eval_every=0",
         "--config.sample_every=0"]
  err = _error_line(tu.run_python(cmd + ["--config.gpt.n_embd=64"], check=False, timeout=300))
  assert err.startswith(f"error: --workdir={wd} holds checkpoints (newest step 2) of another "
                        "architecture: n_embd: checkpoint 32 vs config 64; resume with the "
                        "config the run was started with"), err
  err = _error_line(tu.run_python(cmd + ["--config.optim.grad_clip=0.0"], check=False,
                                  timeout=300))
  assert "holds checkpoints of another model or optimizer than this config builds (step 2: " in err
  assert "opt_state/" in err and "params/" not in err.split("; resume")[0], err
  assert _digest(wd) == before
  os.remove(wd / "model.json")  # a workdir without model.json: the checkpoint decides
  before = _digest(wd)
  err = _error_line(tu.run_python(cmd + ["--config.gpt.n_embd=64"], check=False, timeout=300))
  assert "(step 2: " in err and "resume with the config the run was started with, or" in err
  assert ("params/blocks_0/attn/key/kernel: checkpoint (32, 32) float32 vs config (64, 64) "
          "float32") in err, err
  assert _digest(wd) == before


# ----------------------------------------------------------------------------
# 5. Checkpoints across topologies (stage 2; stage 1 is in test_vqgan_trainer)


RESHARD2 = r"""
import sys, jax, numpy as np
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import sharding
from vqgan_jax.training import checkpoints, transformer_trainer as tt
sharding.MIN_FSDP_SIZE = 0
c = tu.load_config("digits_transformer", "test")
layout = tt.make_layout(c, 16, (2, 2))
model = tt.build_model(c, layout)
tx = tt.make_optimizer(c)
init = lambda r: tt.init_state(model, tx, r)
abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
codes = np.random.default_rng(0).integers(0, 16, (8, 2, 2)).astype(np.int32)
batch = {"codes": codes, "cond": np.arange(8, dtype=np.int32)[:, None] % 10}
step_py = tt.make_train_step(model, tx, c, layout)[0]

def setup(mesh):
  sh = sharding.state_shardings(abstract, mesh)
  bs = sharding.batch_sharding(mesh)
  step = jax.jit(step_py, in_shardings=(sh, bs), out_shardings=(sh, sharding.replicated(mesh)))
  return sh, bs, step

mesh8 = sharding.make_mesh({"data": 4, "fsdp": 2})
sh8, bs8, step8 = setup(mesh8)
state = jax.jit(init, out_shardings=sh8)(jax.random.PRNGKey(0))
state, _ = step8(state, jax.device_put(batch, bs8))
assert any(len(set(s.spec) - {None}) for s in jax.tree.leaves(sh8)), "nothing was sharded"
want = [np.asarray(a) for a in jax.tree.leaves(state)]
_, m8 = step8(state, jax.device_put(batch, bs8))
ck = checkpoints.Checkpointer(sys.argv[1])
ck.save(1, state, {"step": 1}, force=True)
ck.close()
for spec, devs in [({"data": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 2}, jax.devices()[:4])]:
  sh, bs, step = setup(sharding.make_mesh(spec, devs))
  ck = checkpoints.Checkpointer(sys.argv[1])
  got, meta, s = ck.restore(checkpoints.abstract_with_shardings(abstract, sh))
  ck.close()
  assert s == 1 and meta["step"] == 1
  for a, b, t in zip(want, jax.tree.leaves(got), jax.tree.leaves(sh)):
    np.testing.assert_array_equal(a, np.asarray(b))
    assert b.sharding == t
  _, m = step(got, jax.device_put(batch, bs))
  np.testing.assert_allclose(float(m["loss"]), float(m8["loss"]), rtol=1e-5)
print("ok")
"""


def test_stage2_checkpoint_restores_from_8_onto_1_and_4_devices(tmp_path):
  r = tu.run_python(["-c", RESHARD2, str(tmp_path / "wd")], devices=8)
  assert r.stdout.strip().endswith("ok")
