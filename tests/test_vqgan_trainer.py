"""Stage-1 trainer: the step's gradients, sharding, resume, multi-process, config errors."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import discriminator as disc_lib
from vqgan_jax import losses
from vqgan_jax import modules
from vqgan_jax import sharding
from vqgan_jax.training import schema
from vqgan_jax.training import vqgan_trainer as vt


def tiny_config(**loss):
  c = tu.load_config("digits_vqgan", "test")
  c.loss.update(dict(disc_start=0, disc_weight=0.8, codebook_weight=1.0, **loss))
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  r = c.model.resolution
  return {"image": jnp.asarray(rng.uniform(-1, 1, (c.batch_size, r, r, 3)).astype(np.float32))}


def plain_generator_loss(x, rec_fn, kernel, q_loss, step, disc_fn, *,
                         codebook_weight, disc_weight, disc_start):
  """The reference's generator loss by plain autodiff (no LPIPS): its
  adaptive weight from jax.grad of each term w.r.t. the last kernel, with
  ``rec_fn(kernel)`` the reconstructions and ``disc_fn`` returning
  ``(logits, batch_stats updates)``."""
  nll_fn = lambda k: losses.reconstruction_loss(x, rec_fn(k), None,
                                                perceptual_weight=0.0)[0]

  def g_fn(k):
    logits, upd = disc_fn(rec_fn(k))
    return losses.generator_gan_loss(logits), upd

  nll, nll_grad = jax.value_and_grad(nll_fn)(kernel)
  (g, upd), g_grad = jax.value_and_grad(g_fn, has_aux=True)(kernel)
  d_weight = losses.adaptive_disc_weight(nll_grad, g_grad, disc_weight)
  factor = losses.adopt_weight(1.0, step, disc_start)
  loss = nll + d_weight * factor * g + codebook_weight * jnp.mean(q_loss)
  return loss, ({"d_weight": d_weight}, upd)


@pytest.mark.parametrize("disc_start,disc_loss", [(0, "hinge"), (5, "vanilla")])
def test_step_gradients_equal_the_pure_reference_loss(disc_start, disc_loss):
  """With SGD(lr=1) the step's update is minus the gradient; it must equal
  jax.grad of the plain generator loss above / losses.vqgan_discriminator_loss
  (the form and the function tested against VQLPIPSWithDiscriminator), for G
  and D."""
  c = tiny_config(disc_loss=disc_loss)
  c.loss.disc_start = disc_start
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  run = vt.create(c, mesh, tx=(optax.sgd(1.0), optax.sgd(1.0)))
  state = run.init_fn(jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: x, state)
  before = jax.device_get(state)
  batch = _batch(c)
  new, m = run.step_fn(state, batch, run.lpips_vars)
  new = jax.device_get(new)
  model, disc = run.model, run.disc
  x = batch["image"]
  step = before["step"]

  def g_loss(params):
    z_q, aux = model.apply({"params": params}, x, train=True, method=model.encode)
    h = model.apply({"params": params}, z_q, train=True, method=model.decode_features)
    bias = params["decoder"]["conv_out"]["bias"]
    rec_fn = lambda k: modules.conv2d(h, k, bias).astype(jnp.float32)
    disc_fn = lambda r: disc.apply({"params": before["disc_params"], **before["disc_state"]},
                                   r, train=True, mutable=["batch_stats"])
    loss, (metrics, upd) = plain_generator_loss(
        x, rec_fn, params["decoder"]["conv_out"]["kernel"], aux["q_loss"], step,
        disc_fn, codebook_weight=1.0, disc_weight=0.8, disc_start=disc_start)
    return loss, (metrics, upd, rec_fn(params["decoder"]["conv_out"]["kernel"]))

  # Jitted: one compilation instead of one per operation.
  (loss, (metrics, upd, rec)), grads = jax.jit(jax.value_and_grad(g_loss, has_aux=True))(
      before["params"])
  np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(m["d_weight"], metrics["d_weight"], rtol=1e-4)
  want = jax.tree.map(lambda p, g: p - g, before["params"], grads)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))

  def d_loss(dp):
    lr_, lf_, stats = disc_lib.discriminator_logits(
        disc, {"params": dp, **upd}, x, jax.lax.stop_gradient(rec))
    l, _ = losses.vqgan_discriminator_loss(lr_, lf_, step, disc_start=disc_start,
                                           disc_loss=disc_loss)
    return l, stats

  (dl, stats), dgrads = jax.jit(jax.value_and_grad(d_loss, has_aux=True))(
      before["disc_params"])
  np.testing.assert_allclose(m["disc_loss"], dl, rtol=1e-5, atol=1e-7)
  want_d = jax.tree.map(lambda p, g: p - g, before["disc_params"], dgrads)
  for a, b in zip(jax.tree.leaves(new["disc_params"]), jax.tree.leaves(want_d)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(new["disc_state"]), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  if disc_start > 0:  # before disc_start the discriminator does not learn
    for a, b in zip(jax.tree.leaves(new["disc_params"]), jax.tree.leaves(before["disc_params"])):
      np.testing.assert_array_equal(a, b)
    # Crossing disc_start (a traced step) does not recompile the step.
    state = jax.device_put(new, run.state_shardings)
    for _ in range(disc_start + 1):
      state, m = run.step_fn(state, batch, run.lpips_vars)
    assert float(m["disc_factor"]) == 1.0 and run.step_fn._cache_size() == 1


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import sharding
from vqgan_jax.training import vqgan_trainer as vt
sharding.MIN_FSDP_SIZE = 0  # shard even the tiny test model
c = tu.load_config("digits_vqgan", "test")
c.loss.disc_start = 1
rng = np.random.default_rng(0)
batches = [{"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)} for _ in range(3)]
out = {}
for name, spec, devs in [("one", {"data": 1}, jax.devices()[:1]),
                         ("mesh", {"data": 4, "fsdp": 2}, jax.devices())]:
  mesh = sharding.make_mesh(spec, devs)
  # SGD: Adam's normalisation would magnify round-off in near-zero gradients.
  run = vt.create(c, mesh, tx=(optax.sgd(0.05), optax.sgd(0.05)))
  state = run.init_fn(jax.random.PRNGKey(0))
  if name == "mesh":
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
    assert any("fsdp" in s for s in specs), specs
    adam = vt.create(c, mesh).state_shardings["opt_state"]
    assert any("fsdp" in str(x.spec) for x in jax.tree.leaves(adam))
  losses = []
  for b in batches:
    b = {"image": jax.device_put(b["image"], run.batch_sharding)}
    state, m = run.step_fn(state, b, run.lpips_vars)
    losses.append([float(m["loss"]), float(m["disc_loss"]), float(m["d_weight"])])
  out[name] = (losses, [np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])])
print(json.dumps({"losses": [out["one"][0], out["mesh"][0]],
                  "maxdiff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                 for a, b in zip(out["one"][1], out["mesh"][1]))}))
"""


def test_sharded_step_equals_single_device():
  r = tu.run_python(SHARDED, devices=8)
  res = json.loads(r.stdout.strip().splitlines()[-1])
  one, mesh = res["losses"]
  np.testing.assert_allclose(mesh, one, rtol=2e-5, atol=1e-6)
  assert res["maxdiff"] < 1e-5, res["maxdiff"]


def _train_cmd(workdir, *overrides):
  return ["train_vqgan.py", "--config=configs/digits_vqgan.py:test",
          f"--workdir={workdir}", *overrides]


KEYS = ("loss", "rec_loss", "q_loss", "disc_loss", "d_weight", "g_loss", "codebook_usage")


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_with_identical_losses(tmp_path):
  opts = ["--config.num_train_steps=12", "--config.checkpoint_every=4",
          "--config.log_every=1", "--config.eval_every=0", "--config.image_every=0"]
  full = tmp_path / "full"
  tu.run_python(_train_cmd(full, *opts))
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable] + _train_cmd(killed, *opts), cwd=tu.ROOT,
                          env=tu.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not (killed / "checkpoints" / "4").is_dir():
    time.sleep(0.2)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (killed / "checkpoints" / "4").is_dir(), "the run never saved step 4"
  done = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert done and max(done) < 12, f"the run finished before the kill: {done}"
  tu.run_python(_train_cmd(killed, *opts))
  a = {r["step"]: r for r in tu.rows(full) if "loss" in r}
  b = {r["step"]: r for r in tu.rows(killed) if "loss" in r}
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for s in range(1, 13):
    for k in KEYS:
      assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  wd = tmp_path / "wd"
  opts = ["--config.num_train_steps=100000", "--config.checkpoint_every=100000",
          "--config.log_every=1", "--config.eval_every=0", "--config.image_every=0"]
  proc = subprocess.Popen([sys.executable] + _train_cmd(wd, *opts), cwd=tu.ROOT,
                          env=tu.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and not (wd / "metrics.jsonl").exists():
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  steps = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
  assert steps and max(steps) >= max(r["step"] for r in tu.rows(wd))


@pytest.mark.parametrize("field,value,message", [
    ("model.ch", 48, "config.model.ch=48 is not divisible by 32"),
    ("model.resolution", 17, "config.model.resolution=17 is not divisible by the downsampling factor 2"),
    ("model.attn_resolutions", (4,), r"attn_resolutions contains \[4\], never reached"),
    ("loss.disc_loss", "wgan", "config.loss.disc_loss='wgan'"),
    ("optim.lr_scaling", "linear", "config.optim.lr_scaling='linear'"),
])
def test_bad_config_values_are_named(field, value, message):
  c = tu.load_config("digits_vqgan", "test")
  node, key = c, field.split(".")
  for k in key[:-1]:
    node = node[k]
  node[key[-1]] = value
  with pytest.raises(ValueError, match=message):
    schema.check_vqgan(c)


def test_batch_and_mesh_errors():
  c = tu.load_config("digits_vqgan", "test")
  with pytest.raises(ValueError, match="has 4 devices but 1 are available"):
    sharding.make_mesh({"data": 2, "fsdp": 2})
  c.batch_size = 7
  mesh = sharding.make_mesh({"data": 1})
  schema.check_batch(c, dict(mesh.shape))  # one device divides everything
  with pytest.raises(ValueError, match="does not fit 1 devices"):
    sharding.make_mesh({"data": -1, "fsdp": 2})


def test_perceptual_weight_without_weights_says_how_to_fix():
  c = tu.load_config("digits_vqgan", "test")
  c.loss.perceptual_weight = 1.0
  with pytest.raises(ValueError, match="lpips_vgg_path.*perceptual_weight=0"):
    vt.load_perceptual(c, {})


def test_cli_error_for_unknown_dataset_changes_nothing(tmp_path):
  r = tu.run_python(_train_cmd(tmp_path / "wd", "--config.dataset=imagenet"), check=False)
  assert r.returncode != 0
  assert "unknown dataset 'imagenet'" in r.stderr


@pytest.mark.slow
def test_init_from_converted_reference_and_actnorm(tmp_path):
  """init_from starts from a converted reference checkpoint (generator and its
  discriminator); with learning rate 0 the trained workdir holds exactly the
  converted weights. ActNorm is initialised from data before the first step."""
  from vqgan_jax_testing import reference_ckpt as rc
  from vqgan_jax import convert
  import vqgan_jax
  dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
            dropout=0.0, in_channels=3, resolution=16, z_channels=32)
  lossconfig = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                "params": {"disc_start": 0, "disc_num_layers": 1, "disc_ndf": 16,
                           "perceptual_weight": 0.0}}
  cfg = rc.vq_model_config(dd, 32, 16, lossconfig=lossconfig)
  ref = rc.build_reference_without_perceptual(cfg, seed=0)
  sd = {k: v for k, v in ref.state_dict().items() if "perceptual" not in k}
  ckpt = rc.lightning_checkpoint(tmp_path / "m.ckpt", sd)
  yml = rc.write_yaml(tmp_path / "m.yaml", cfg)
  conv_dir = tmp_path / "converted"
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(conv_dir)]) == 0

  wd = tmp_path / "wd"
  # With a weight average: it starts at the loaded weights (the same arrays,
  # which the donating step must receive as distinct buffers).
  tu.run_python(_train_cmd(wd, f"--config.init_from={conv_dir}", "--config.disc.n_layers=1",
                           "--config.disc.ndf=16", "--config.optim.learning_rate=0.0",
                           "--config.optim.ema_decay=0.9",
                           "--config.num_train_steps=1", "--config.eval_every=0",
                           "--config.image_every=0"))
  _, converted = vqgan_jax.load_vqgan(str(conv_dir))
  _, trained = vqgan_jax.load_vqgan(str(wd), use_ema=False)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(converted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, average = vqgan_jax.load_vqgan(str(wd), use_ema=True)  # 0.9 w + 0.1 w
  for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(converted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  # The reference's discriminator came along (BatchNorm statistics included).
  from vqgan_jax import checkpoint
  state, _ = checkpoint.restore_workdir_state(str(wd))
  disc = checkpoint.load_extras(str(conv_dir))["discriminator"]
  assert "batch_stats" in disc
  for a, b in zip(jax.tree.leaves(state["disc_params"]), jax.tree.leaves(disc["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A checkpoint of another architecture is refused with the differing fields.
  r = tu.run_python(_train_cmd(tmp_path / "wd2", f"--config.init_from={conv_dir}",
                               "--config.model.n_embed=64"), check=False)
  assert r.returncode != 0 and "holds a different architecture" in r.stderr
  assert "n_embed: checkpoint 32 vs config 64" in r.stderr
  assert not (tmp_path / "wd2" / "checkpoints").exists() or not os.listdir(tmp_path / "wd2" / "checkpoints")

  # ActNorm discriminator: initialised from data before step 1.
  wd3 = tmp_path / "wd3"
  tu.run_python(_train_cmd(wd3, "--config.disc.use_actnorm=True", "--config.num_train_steps=2",
                           "--config.eval_every=0", "--config.image_every=0"))
  assert all(np.isfinite(r["loss"]) for r in tu.rows(wd3) if "loss" in r)


RESHARD = r"""
import sys, jax, numpy as np
from vqgan_jax_testing import train_utils as tu
from vqgan_jax import sharding
from vqgan_jax.training import checkpoints, vqgan_trainer as vt
sharding.MIN_FSDP_SIZE = 0
c = tu.load_config("digits_vqgan", "test")
wd = sys.argv[1]
mesh8 = sharding.make_mesh({"data": 4, "fsdp": 2})
run8 = vt.create(c, mesh8)
state = run8.init_fn(jax.random.PRNGKey(0))
x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32), run8.batch_sharding)
state, _ = run8.step_fn(state, {"image": x}, run8.lpips_vars)
want = [np.asarray(a) for a in jax.tree.leaves(state)]
ck = checkpoints.Checkpointer(wd)
ck.save(1, state, {"step": 1}, force=True)
ck.close()
for spec, devs in [({"data": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 2}, jax.devices()[:4])]:
  run = vt.create(c, sharding.make_mesh(spec, devs))
  ck = checkpoints.Checkpointer(wd)
  got, meta, step = ck.restore(checkpoints.abstract_with_shardings(run.abstract_state, run.state_shardings))
  ck.close()
  assert step == 1 and meta["step"] == 1
  for a, b, s in zip(want, jax.tree.leaves(got), jax.tree.leaves(run.state_shardings)):
    np.testing.assert_array_equal(a, np.asarray(b))
    assert b.sharding == s
  if spec.get("fsdp"):  # the resharded state trains (one compile is enough)
    got, _ = run.step_fn(got, {"image": jax.device_put(np.asarray(x), run.batch_sharding)},
                         run.lpips_vars)
print("ok")
"""


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  r = tu.run_python(["-c", RESHARD, str(tmp_path / "wd")], devices=8)
  assert r.stdout.strip().endswith("ok")


def test_gpu_kernel_threefry_initialiser_sets_the_flag_only_around_the_call():
  """Trainers compile their initialisers with threefry as a GPU kernel (the
  same bits, a fraction of the compile time on GPUs): the flag is on inside
  the call on a GPU backend, restored after (also when the call raises),
  and a refused kernel falls back to the plain initialiser."""
  from vqgan_jax.backends import threefry
  seen = []

  def init(rng):
    seen.append(jax.config.jax_threefry_gpu_kernel_lowering)
    return jax.random.normal(rng, (3,))

  key = jax.random.PRNGKey(0)
  want = init(key)
  np.testing.assert_array_equal(threefry.gpu_kernel_threefry(init, "cpu")(key), want)
  np.testing.assert_array_equal(threefry.gpu_kernel_threefry(init, "gpu")(key), want)
  assert seen == [False, False, True]
  assert jax.config.jax_threefry_gpu_kernel_lowering is False

  calls = []

  def refused(rng):
    calls.append(jax.config.jax_threefry_gpu_kernel_lowering)
    if calls[-1]:
      raise jax.errors.JaxRuntimeError("NOT_FOUND: cu_threefry2x32_ffi")
    return init(rng)

  np.testing.assert_array_equal(threefry.gpu_kernel_threefry(refused, "gpu")(key), want)
  assert calls == [True, False]
  assert jax.config.jax_threefry_gpu_kernel_lowering is False

  def out_of_memory(rng):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")

  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    threefry.gpu_kernel_threefry(out_of_memory, "gpu")(key)  # not retried
  assert jax.config.jax_threefry_gpu_kernel_lowering is False
  # The trainer compiles its initialiser through the wrapper.
  wrapped = []
  real = threefry.gpu_kernel_threefry
  try:
    threefry.gpu_kernel_threefry = lambda fn, backend=None: wrapped.append(fn) or fn
    run = vt.create(tiny_config(), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  finally:
    threefry.gpu_kernel_threefry = real
  assert wrapped and run.init_fn is wrapped[0]


_FAULTS_SCRIPT = r"""
import resource, sys
import jax, jax.numpy as jnp
from vqgan_jax.backends import host_memory
print(host_memory.keep_freed_host_memory(sys.argv[1]))
# Two 64 MiB scans are temporaries of the call (~260 MB of pages).
f = jax.jit(lambda a: jnp.sum(jnp.cumsum(jnp.cumsum(a, 0), 1) * a[::-1]))
a = jnp.ones((4096, 4096), jnp.float32)
f(a).block_until_ready()
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_host_memory_ends_xla_cpu_page_faults_per_call():
  """With glibc's defaults XLA:CPU's large temporaries are mapped afresh
  and faulted in on every call (here ~66,000 minor faults each); with
  `keep_freed_host_memory` repeated calls reuse the memory (after a few
  calls in which the heap grows: see its docstring). Without glibc it is a
  no-op that says so."""
  import platform
  from vqgan_jax.backends import host_memory
  with pytest.raises(ValueError, match="--host_malloc='on'.*default, keep"):
    host_memory.keep_freed_host_memory("on")
  if platform.libc_ver()[0] != "glibc":
    assert host_memory.keep_freed_host_memory("keep") is False
    return
  faults = {}
  for mode in ("default", "keep"):
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode],
                         capture_output=True, text=True, check=True,
                         # The optimised build users run (not the tests' -O0).
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
                         ).stdout.split()
    assert out[0] == str(mode == "keep"), (mode, out)
    faults[mode] = [int(n) for n in out[1:]]
  assert min(faults["default"]) > 50_000, faults
  assert sum(n < 1_000 for n in faults["keep"]) >= 3, faults


@pytest.mark.slow
def test_gan_phase_follows_the_reference_step_for_step(tmp_path):
  """From the same converted weights, on the same batches, the reference
  (driven as its Lightning module trains) and the trainer with
  `loss.disc_fake='updated'` reach the same held-out PSNR and codebook usage
  after each step, before the GAN starts (steps 1-2) and with it (3-4)."""
  from benchmarks.ablations import reference_side_by_side as sbs
  from vqgan_jax import data as data_lib
  config = sbs.base_config("test", steps=4, disc_start=2, eval_every=1, seed=0)
  model, cfg = sbs.reference_model(config, seed=0)
  init = sbs.convert_reference(model, cfg, str(tmp_path / "init"))
  m = config.model
  train = data_lib.build_dataset(config.dataset, resolution=m.resolution,
                                 channels=m.in_channels)
  val = data_lib.build_dataset(config.dataset, resolution=m.resolution,
                               split="validation", channels=m.in_channels)
  it = train.train_iterator(config.batch_size, seed=config.seed)
  ref = sbs.train_reference(
      model, config, it,
      lambda mdl: sbs.reference_eval(mdl, val.eval_iterator(config.batch_size),
                                     m.n_embed))
  it.close()
  config.update_from_flattened_dict(sbs.OPTIONS["disc_fake_updated"])
  config.init_from = init
  ours = sbs.train_ours(config, str(tmp_path / "ours"))
  assert [r["step"] for r in ours] == [r["step"] for r in ref] == [1, 2, 3, 4]
  assert ref[-1]["eval_psnr"] != ref[0]["eval_psnr"]  # both trained
  # Measured under the tests' XLA flags: 1e-4 dB apart before the GAN, 7e-3
  # with it (the adaptive weight, a ratio of gradient norms, amplifies
  # float32 rounding; 3e-5 at XLA's default optimisation level). The default
  # disc_fake='step' ends 0.05 dB from the reference at step 4, with other
  # codes in use.
  for r, o in zip(ref, ours):
    tol = 1e-3 if r["step"] <= 2 else 2e-2
    assert abs(r["eval_psnr"] - o["eval_psnr"]) < tol, (r, o)
    assert r["eval_codebook_usage"] == o["eval_codebook_usage"], (r, o)
