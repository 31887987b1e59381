"""Stage 2: conversion and loss parity with Net2NetTransformer, conditioning,
code caching, sharding, resume, and sample.py."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import codes as codes_lib
from vqgan_jax import conditioning as cond_lib
from vqgan_jax import convert
from vqgan_jax import losses

FIRST = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
             dropout=0.0, in_channels=3, resolution=16, z_channels=32)
GPT = dict(vocab_size=64, block_size=128, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


def _net2net(tmp_path, cond_stage, seed=0, **extra):
  first = rc.vq_model_config(FIRST, 64, 16)
  if cond_stage == "__is_first_stage__":
    # The reference flattens VQ indices unless asked not to, which its own
    # conditioning path cannot concatenate.
    first["params"]["sane_index_shape"] = True
  cfg = rc.net2net_config(first, GPT, cond_stage, **extra)
  ref = rc.build_net2net(cfg, seed=seed)
  x = np.random.default_rng(seed).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  rc.spread_codebook(ref.first_stage_model, rc.to_nchw(x))
  ckpt = rc.lightning_checkpoint(tmp_path / "t.ckpt", ref.state_dict())
  yml = rc.write_yaml(tmp_path / "t.yaml", cfg)
  return ref, x, ckpt, yml


@pytest.mark.parametrize("cond", ["class", "sos", "first_stage"])
def test_loss_equals_net2net_forward(tmp_path, torch, cond):
  stage = {"class": {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}},
           "sos": "__is_unconditional__", "first_stage": "__is_first_stage__"}[cond]
  ref, x, ckpt, yml = _net2net(tmp_path, stage, cond_stage_key="image")
  labels = np.array([3, 1, 4, 1], np.int64)
  xt = rc.to_nchw(x)
  with torch.no_grad():
    c = torch.from_numpy(labels) if cond == "class" else xt
    logits, target = ref(xt, c)
    ref_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    ref_logits = logits.numpy()

  vq_model, vq_vars = convert.load_taming_vqgan(ckpt, yml)
  model, variables = convert.load_taming_transformer(ckpt, yml)
  z = np.asarray(vq_model.apply(vq_vars, jnp.asarray(x), method=vq_model.encode_to_indices))
  z = z.reshape(4, -1)
  if cond == "class":
    c_tok = cond_lib.condition_tokens("class", 4, labels=labels)
  elif cond == "sos":
    c_tok = cond_lib.condition_tokens("sos", 4, sos_token=0)
  else:
    c_tok = cond_lib.condition_tokens("codes", 4, codes=z)
  inputs, targets, start = cond_lib.sequence(c_tok, jnp.asarray(z))
  out = model.apply(variables, inputs)[:, start:]
  np.testing.assert_array_equal(np.asarray(targets), target.numpy())
  np.testing.assert_allclose(np.asarray(out), ref_logits, atol=1e-4)
  np.testing.assert_allclose(float(losses.token_loss(out, targets)), ref_loss, rtol=1e-5)

  # The trainer's own loss function on the same batch.
  from vqgan_jax.training import transformer_trainer as tt
  config = tu.load_config("digits_transformer", "test")
  config.conditioning.kind = {"first_stage": "codes"}.get(cond, cond)
  config.gpt.update(dict(n_layer=2, n_head=2, n_embd=32, block_size=128,
                         embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
  layout = tt.make_layout(config, 64, (8, 8), cond_grid=(8, 8))
  _, eval_step = tt.make_train_step(model, None, config, layout)
  batch = {"codes": jnp.asarray(z.reshape(4, 8, 8)), "cond": c_tok}
  loss, _ = eval_step(variables["params"], batch)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_zcurve_permuter_equals_reference(torch):
  oracle.taming()
  from taming.modules.transformer.permuter import ZCurve
  ref = ZCurve(8, 8)
  x = torch.arange(64)[None]
  np.testing.assert_array_equal(
      cond_lib.permute(np.arange(64)[None], cond_lib.permutation("zcurve", 8, 8)),
      ref(x).numpy())
  for name in cond_lib.PERMUTERS:
    perm = cond_lib.permutation(name, 4, 6)
    t = np.arange(24)[None]
    assert sorted(perm.tolist()) == list(range(24))
    np.testing.assert_array_equal(cond_lib.permute(cond_lib.permute(t, perm), perm, True), t)


def test_pkeep_and_label_dropout_rates():
  tokens = jnp.zeros((200, 64), jnp.int32)
  out = cond_lib.corrupt(tokens, jax.random.PRNGKey(0), 0.7, vocab_size=1000)
  kept = float(jnp.mean(out == 0))
  assert abs(kept - (0.7 + 0.3 / 1000)) < 0.01
  assert int(out.max()) < 1000
  labels = jnp.arange(4000).reshape(-1, 1) % 10
  dropped = cond_lib.drop_labels(labels, jax.random.PRNGKey(1), 0.1, null_token=10)
  assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 0.02
  assert bool(jnp.all((dropped == labels) | (dropped == 10)))


def test_convert_cli_then_sample_py(tmp_path, torch):
  ref, x, ckpt, yml = _net2net(
      tmp_path, {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}},
      permuter_config={"target": "taming.modules.transformer.permuter.ZCurve",
                       "params": {"H": 8, "W": 8}})
  out = tmp_path / "conv"
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(out)]) == 0
  info = json.load(open(out / "model.json"))
  assert info["conditioning"]["kind"] == "class" and info["permuter"] == "zcurve"
  assert info["image_grid"] == [8, 8]
  # Greedy samples equal the reference's decoding of the same class prefix.
  from vqgan_jax import sample_lib
  r = tu.run_python(["sample.py", f"--workdir={out}", "--classes=3", "--num_samples=8",
                     f"--outdir={tmp_path / 's'}", "--batch_size=8"])
  names = sorted(os.listdir(tmp_path / "s"))
  assert "grid.png" in names and "3_0007.png" in names and len(names) == 9
  assert "images/s" in r.stdout
  rate = float(r.stdout.split(" images/s")[0].split()[-1])  # one batch
  assert math.isfinite(rate) and rate > 0, r.stdout
  s = sample_lib.sample_images(str(out), str(tmp_path / "s2"), classes=[2], num_samples=2,
                               progress=False, top_k=5)
  assert s["tokens"].shape == (2, 8, 8) and s["tokens"].max() < 64


def test_sample_py_sliding_window_with_image_conditioning(tmp_path, torch):
  """A codes-conditioned model samples a token grid larger than its window:
  the conditioning images are encoded at the grid's size and the window's
  crop of their codes conditions every position."""
  from PIL import Image
  from vqgan_jax import sample_lib
  ref, x, ckpt, yml = _net2net(tmp_path, "__is_first_stage__")
  out = tmp_path / "conv"
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(out)]) == 0
  conds = tmp_path / "cond"
  conds.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):  # any size: resized to cover 24x32 pixels, centre-cropped
    Image.fromarray(rng.integers(0, 255, (30, 37, 3), dtype=np.uint8)).save(conds / f"{i}.png")
  s = sample_lib.sample_images(str(out), str(tmp_path / "s"), num_samples=1, batch_size=2,
                               grid=(12, 16), cond_images=str(conds), progress=False,
                               save_npz=True)
  assert s["tokens"].shape == (2, 12, 16) and s["tokens"].max() < 64
  npz = np.load(tmp_path / "s" / "samples.npz")
  assert npz["images"].shape == (2, 24, 32, 3)
  # The conditioning grid the sampler saw is the VQGAN's code grid at 24x32.
  info = json.load(open(out / "model.json"))
  codes = sample_lib.encode_condition_images(info, str(conds), str(out), grid=(12, 16))
  assert codes.shape == (2, 12, 16)
  with pytest.raises(ValueError, match="smaller than the model's 8x8"):
    sample_lib.sample_images(str(out), str(tmp_path / "t"), grid=(6, 16),
                             cond_images=str(conds), progress=False)


def test_codes_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
  from vqgan_jax import data as data_lib
  from vqgan_jax import vqgan as vqgan_lib
  from vqgan_jax import sharding
  model = vqgan_lib.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          resolution=16, z_channels=32, n_embed=16, embed_dim=8)
  variables = vqgan_lib.init_variables(model, jax.random.PRNGKey(0))
  ds = data_lib.build_dataset("digits", resolution=16, split="validation")
  mesh = sharding.make_mesh({"data": 1})
  calls = []
  real = codes_lib.encode_dataset
  monkeypatch.setattr(codes_lib, "encode_dataset",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  cfg = vqgan_lib.model_config(model)
  a = codes_lib.cached_codes(str(tmp_path), model, cfg, variables, ds, 36, mesh)
  b = codes_lib.cached_codes(str(tmp_path), model, cfg, variables, ds, 36, mesh)
  assert len(calls) == 1 and a["codes"].shape == (180, 8, 8)
  np.testing.assert_array_equal(a["codes"], b["codes"])
  np.testing.assert_array_equal(a["labels"], np.asarray(ds.source.labels))
  want = model.apply(variables, jnp.asarray(next(ds.eval_iterator(36))["image"]),
                     method=model.encode_to_indices)
  np.testing.assert_array_equal(a["codes"][:36], np.asarray(want))
  other = jax.tree.map(lambda v: v * 1.01, variables)  # different weights
  codes_lib.cached_codes(str(tmp_path), model, cfg, other, ds, 36, mesh)
  train = data_lib.build_dataset("digits", resolution=16, split="train")  # different data
  codes_lib.cached_codes(str(tmp_path), model, cfg, variables, train, 36, mesh)
  assert len(calls) == 3 and len(os.listdir(tmp_path)) == 3


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory, torch):
  tmp = tmp_path_factory.mktemp("vq")
  cfg = rc.vq_model_config(FIRST, 64, 16)
  ref = rc.build_reference(cfg, seed=0)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  rc.spread_codebook(ref, rc.to_nchw(x))
  ckpt, yml = rc.save_reference(tmp, ref, cfg)
  out = tmp / "vqgan"
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(out)]) == 0
  return out


def _cmd(workdir, vq, *opts):
  return ["train_transformer.py", "--config=configs/digits_transformer.py:test",
          f"--workdir={workdir}", f"--config.vqgan_workdir={vq}",
          "--config.sample_every=0", "--config.log_every=1", *opts]


@pytest.mark.slow
def test_resume_gives_the_same_later_losses(tmp_path, vqgan_dir):
  full, split = tmp_path / "full", tmp_path / "split"
  tu.run_python(_cmd(full, vqgan_dir, "--config.num_train_steps=8", "--config.checkpoint_every=4"))
  tu.run_python(_cmd(split, vqgan_dir, "--config.num_train_steps=4", "--config.checkpoint_every=4"))
  tu.run_python(_cmd(split, vqgan_dir, "--config.num_train_steps=8", "--config.checkpoint_every=4"))
  a = {r["step"]: r["loss"] for r in tu.rows(full) if "loss" in r}
  b = {r["step"]: r["loss"] for r in tu.rows(split) if "loss" in r}
  assert sorted(a) == sorted(b) == list(range(1, 9))
  assert a == b


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import sharding
from vqgan_jax.training import transformer_trainer as tt
sharding.MIN_FSDP_SIZE = 0
c = tu.load_config("digits_transformer", "test")
c.optim.update(dict(lr_scaling="none", learning_rate=1e-2, warmup_steps=0, schedule="constant"))
layout = tt.make_layout(c, 64, (8, 8))
model = tt.build_model(c, layout)
import optax
tx = optax.sgd(0.1)  # Adam's normalisation would magnify round-off
step, _ = tt.make_train_step(model, tx, c, layout)
rng = np.random.default_rng(0)
batches = [{"codes": rng.integers(0, 64, (8, 8, 8)).astype(np.int32),
            "cond": rng.integers(0, 10, (8, 1)).astype(np.int32)} for _ in range(3)]
res = {}
for name, spec, devs in [("one", {"data": 1}, jax.devices()[:1]),
                         ("mesh", {"data": 4, "fsdp": 2}, jax.devices())]:
  mesh = sharding.make_mesh(spec, devs)
  init = lambda r: tt.init_state(model, tx, r)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  sh = sharding.state_shardings(abstract, mesh)
  bsh = sharding.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=sh)(jax.random.PRNGKey(0))
  if name == "mesh":
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state["params"]))
  f = jax.jit(step, in_shardings=(sh, bsh), out_shardings=(sh, sharding.replicated(mesh)))
  losses = []
  for b in batches:
    state, m = f(state, jax.device_put(b, bsh))
    losses.append(float(m["loss"]))
  res[name] = (losses, [np.asarray(x) for x in jax.tree.leaves(state["params"])])
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(res["one"][1], res["mesh"][1]))
print(json.dumps({"one": res["one"][0], "mesh": res["mesh"][0], "diff": diff}))
"""


def test_sharded_step_equals_single_device():
  r = tu.run_python(SHARDED, devices=8)
  res = json.loads(r.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(res["mesh"], res["one"], rtol=1e-5)
  assert res["diff"] < 1e-5, res["diff"]


SHARDED_SAMPLING = r"""
import jax, jax.numpy as jnp, numpy as np
from vqgan_jax import gpt as gpt_lib, sampling, sample_lib
model = gpt_lib.GPT(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=32)
v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24), jnp.int32))
prefix = np.arange(8, dtype=np.int32)[:, None]
sharded = sample_lib.shard_batch(prefix)
assert len(sharded.sharding.device_set) == 8
a = sampling.sample(model, v, sharded, 20, jax.random.PRNGKey(1), top_k=5)
b = sampling.sample(model, v, jnp.asarray(prefix), 20, jax.random.PRNGKey(1), top_k=5)
np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("ok", len(a.sharding.device_set))
"""


def test_sampling_batches_shard_across_devices():
  r = tu.run_python(SHARDED_SAMPLING, devices=8)
  assert r.stdout.strip().splitlines()[-1].startswith("ok")


def test_paired_conditioning_dataset_aligns_by_file_name(tmp_path, vqgan_dir):
  """'codes' conditioning from a second folder mirroring the image folder:
  each image is paired with the conditioning file of the same relative name,
  and an unreadable file on either side drops the pair, not the alignment."""
  from PIL import Image
  from vqgan_jax import checkpoint
  from vqgan_jax.data import images as image_lib
  from vqgan_jax import sharding
  from vqgan_jax.training import transformer_trainer as tt
  rng = np.random.default_rng(0)
  imgs, conds = tmp_path / "img", tmp_path / "cond"
  for root in (imgs, conds):
    (root / "a").mkdir(parents=True)
  for i in range(10):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(imgs / "a" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(conds / "a" / f"{i}.png")
  (conds / "a" / "3.png").write_bytes(b"broken")
  c = tu.load_config("depth_transformer", f"folder:{imgs}")
  c.vqgan_workdir = str(vqgan_dir)
  c.conditioning.cond_vqgan_workdir = str(vqgan_dir)
  c.conditioning.cond_dataset = f"folder:{conds}"
  c.codes_dir = str(tmp_path / "cache")
  c.batch_size = 4
  mesh = sharding.make_mesh({"data": 1})
  model, variables = checkpoint.load_vqgan(str(vqgan_dir))
  out = tt.load_codes(c, mesh, "train", model, variables, str(vqgan_dir),
                      (model, variables, str(vqgan_dir)))
  assert list(out["ids"]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
  assert out["codes"].shape == out["cond_codes"].shape == (9, 8, 8)
  x, _ = image_lib.preprocess(image_lib.open_image(str(conds / "a" / "7.png")), 16, 3)
  want = model.apply(variables, jnp.asarray(x[None]), method=model.encode_to_indices)
  np.testing.assert_array_equal(out["cond_codes"][6], np.asarray(want)[0])
  (conds / "a" / "9.png").rename(conds / "a" / "99.png")
  with pytest.raises(ValueError, match="unpaired files"):
    tt.load_codes(c, mesh, "train", model, variables, str(vqgan_dir),
                  (model, variables, str(vqgan_dir)))
