"""Continuing an official training run (``config.init_from_optimizer``).

The reference VQModel trains a few steps with its own two Adams, its
Lightning-style checkpoint (``state_dict``, ``optimizer_states``,
``global_step``) is converted, and then N more steps of the reference must
equal N steps of our trainer started from that checkpoint, within the
training-step parity tolerance of tests/test_vqgan_trainer.py. The same
steps from zeroed Adam moments must miss by far, so the test fails if the
moments were dropped.

The reference is driven the way our step works ("one forward, two
gradients": the discriminator learns from the reconstructions of the
generator before its update, see vqgan_trainer's docstring), so that the
comparison isolates the optimizer states.
"""
import copy

import jax
import numpy as np
import optax
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import convert
from vqgan_jax import keymaps
from vqgan_jax import sharding
from vqgan_jax.training import optimizer_import as oi
from vqgan_jax.training import schema
from vqgan_jax.training import vqgan_trainer as vt

LR = 1e-3
DISC_START = 1  # the GAN term is on from the checkpoint's global_step on
BEFORE, AFTER = 2, 2  # reference steps before the checkpoint, steps compared
BATCH = 4
ATOL, RTOL = 2e-5, 1e-4  # test_step_gradients_equal_the_pure_reference_loss
DD = dict(ch=64, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
          attn_resolutions=[], dropout=0.0, in_channels=3, resolution=16,
          z_channels=32)


def _batches(n, batch=BATCH, size=16):
  rng = np.random.default_rng(0)
  return [rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
          for _ in range(n)]


def _reference():
  """The reference VQModel with its loss (no LPIPS) and its two Adams."""
  from vqgan_jax_testing import reference_ckpt as rc
  loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
          "params": {"disc_start": DISC_START, "disc_num_layers": 1,
                     "disc_ndf": 16, "disc_weight": 0.8, "codebook_weight": 1.0,
                     "perceptual_weight": 0.0}}
  cfg = rc.vq_model_config(DD, 32, 16, lossconfig=loss)
  ref = rc.build_reference_without_perceptual(cfg, seed=0).train()
  ref.learning_rate = LR
  (opt_g, opt_d), _ = ref.configure_optimizers()
  return cfg, ref, opt_g, opt_d


def _reference_step(torch, ref, opts, x, step):
  """One step: generator and discriminator losses from one forward, each
  optimizer's gradients, then both ``optimizer.step()``."""
  opt_g, opt_d = opts
  groups = [[p for g in o.param_groups for p in g["params"]] for o in opts]
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  xrec, qloss = ref(xt)
  last = ref.get_last_layer()
  g_loss, _ = ref.loss(qloss, xt, xrec, 0, step, last_layer=last, split="train")
  g_grads = torch.autograd.grad(g_loss, groups[0], allow_unused=True)
  d_loss, _ = ref.loss(qloss, xt, xrec.detach(), 1, step, last_layer=last,
                       split="train")
  d_grads = torch.autograd.grad(d_loss, groups[1], allow_unused=True)
  for ps, gs in zip(groups, (g_grads, d_grads)):
    for p, g in zip(ps, gs):
      p.grad = torch.zeros_like(p) if g is None else g
  opt_g.step()
  opt_d.step()


def _numpy_sd(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """The reference's checkpoint after BEFORE steps, its state AFTER steps
  later, the checkpoint converted, and our run set up for it."""
  from vqgan_jax_testing import oracle
  from vqgan_jax_testing import reference_ckpt as rc
  torch = oracle.torch()
  oracle.taming()
  tmp = tmp_path_factory.mktemp("optimport")
  cfg, ref, opt_g, opt_d = _reference()
  xs = _batches(BEFORE + AFTER)
  for i in range(BEFORE):
    _reference_step(torch, ref, (opt_g, opt_d), xs[i], i)
  sd = {k: v for k, v in ref.state_dict().items() if "perceptual" not in k}
  # The moments by parameter identity (independent of any index order).
  by_name = {n: {k: opt.state[p][k].numpy().copy()
                 for k in ("exp_avg", "exp_avg_sq")}
             for opt in (opt_g, opt_d) for n, p in ref.named_parameters()
             if p in opt.state}
  path = str(tmp / "last.ckpt")
  torch.save({"state_dict": sd, "global_step": BEFORE,
              "optimizer_states": [opt_g.state_dict(), opt_d.state_dict()]},
             path)
  for i in range(BEFORE, BEFORE + AFTER):
    _reference_step(torch, ref, (opt_g, opt_d), xs[i], i)
  want = _numpy_sd(ref)
  yml = rc.write_yaml(tmp / "last.yaml", cfg)
  conv = convert.write_converted_vqgan(path, yml, str(tmp / "converted"))

  c = tu.load_config("digits_vqgan", "test")
  c.model.ch = DD["ch"]  # 2 channels per GroupNorm group (see the test)
  c.batch_size = BATCH
  c.model.quantizer_options.vq.legacy_loss = True  # the reference's
  c.loss.update(dict(disc_start=DISC_START, disc_weight=0.8,
                     codebook_weight=1.0, perceptual_weight=0.0))
  c.optim.update(dict(lr_scaling="none", learning_rate=LR))
  c.init_from, c.init_from_optimizer = conv, path
  schema.validate_vqgan(c, 1)
  run = vt.create(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  extras = ckpt_lib.load_extras(conv)
  imported = oi.read_stage1(c, run.abstract_state, extras)
  return dict(c=c, run=run, extras=extras, imported=imported, want=want,
              xs=xs[BEFORE:], path=path, tmp=tmp, by_name=by_name,
              sd_buffers={k: v.numpy() for k, v in sd.items()
                          if k.startswith("loss.discriminator.")})


def _train(r, imported):
  """AFTER steps of our trainer's step from the converted checkpoint.

  The state ``_load_init_from`` starts from is zeros of the train state's
  shapes instead of ``run.init_fn``'s random one (it replaces every part
  that matters here: weights, discriminator, both Adam states, the step),
  which saves compiling the initialiser.
  """
  run, c = r["run"], r["c"]
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), run.abstract_state)
  state = vt._load_init_from(c, run.model, state, r["extras"], imported)
  state = jax.device_put(state, run.state_shardings)
  for x in r["xs"]:
    state, _ = run.step_fn(state, {"image": jax.numpy.asarray(x)},
                           run.lpips_vars)
  return jax.device_get(state)


def _expected(r, state):
  """The reference's final weights in our layout."""
  g = keymaps.vqgan.params_from_state_dict(r["want"], state["params"])
  d = keymaps.discriminator.variables_from_state_dict(
      r["want"], {"params": state["disc_params"], **state["disc_state"]},
      prefix="loss.discriminator.", what="test")["params"]
  return g, d


def _worst(got, want):
  """max |got - want| / (ATOL + RTOL |want|) over every leaf (<= 1: within
  the parity tolerance), and the leaf where it is reached."""
  worst, where = 0.0, ""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    ratio = float(np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(b))))
    if ratio > worst:
      worst, where = ratio, jax.tree_util.keystr(path)
  return worst, where


def test_steps_after_the_reference_checkpoint_equal_the_reference(resumed):
  r = resumed
  imp = r["imported"]
  assert imp.global_step == BEFORE and not imp.differences
  assert imp.generator.count == imp.discriminator.count == BEFORE
  state = _train(r, imp)
  assert int(state["step"]) == BEFORE + AFTER  # continued from global_step
  g, d = _expected(r, state)
  for got, want in ((state["params"], g), (state["disc_params"], d)):
    worst, where = _worst(got, want)
    assert worst <= 1.0, (worst, where)

  # Control: the same steps from zeroed Adam moments and counts (the
  # global step kept) miss the reference by far more than the tolerance.
  def zero(m):
    z = lambda t: jax.tree.map(np.zeros_like, t)
    return oi.AdamMoments(0, z(m.mu), z(m.nu), m.groups)
  fresh = copy.copy(imp)
  fresh.generator, fresh.discriminator = zero(imp.generator), zero(imp.discriminator)
  state = _train(r, fresh)
  for got, want in ((state["params"], g), (state["disc_params"], d)):
    worst, where = _worst(got, want)
    assert worst > 20.0, (worst, where)


def test_hyperparameters_that_differ_are_named(resumed):
  c = copy.deepcopy(resumed["c"])
  c.optim.learning_rate = 2e-3
  c.optim.b1 = 0.9
  lines = oi.hyperparameter_differences(c, {
      "generator": resumed["imported"].generator})
  assert lines == ["the checkpoint's generator Adam has lr=0.001, this run "
                   "lr=0.002",
                   "the checkpoint's generator Adam has betas=(0.5, 0.9), "
                   "this run betas=(0.9, 0.9)"]


def test_moments_fill_the_adam_state_of_any_stage1_chain(resumed):
  """With gradient clipping the chain has another state before Adam's; the
  moments still land in the one ScaleByAdamState, leaf by leaf."""
  c = copy.deepcopy(resumed["c"])
  c.optim.grad_clip = 1.0
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        resumed["run"].abstract_state["params"])
  gen = resumed["imported"].generator
  state = oi.with_adam_moments(vt.make_optimizer(c).init(params), gen, "opt")
  adam, = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert int(adam.count) == gen.count
  np.testing.assert_array_equal(adam.mu["decoder"]["conv_out"]["kernel"],
                                gen.mu["decoder"]["conv_out"]["kernel"])
  np.testing.assert_array_equal(adam.nu["quantize"]["embedding"],
                                gen.nu["quantize"]["embedding"])
  # Each parameter's moments, as named by the reference's own optimizer.
  abstract = resumed["run"].abstract_state
  for key, field in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
    named = {n: m[key] for n, m in resumed["by_name"].items()}
    want_g = keymaps.vqgan.params_from_state_dict(named, abstract["params"])
    want_d = keymaps.discriminator.variables_from_state_dict(
        {**resumed["sd_buffers"], **named},
        {"params": abstract["disc_params"], **abstract["disc_state"]},
        prefix="loss.discriminator.", what="test")["params"]
    imp = resumed["imported"]
    for got, want in ((getattr(imp.generator, field), want_g),
                      (getattr(imp.discriminator, field), want_d)):
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def _bad(r, edit, name):
  """A copy of the checkpoint changed by ``edit(ckpt)``, saved as ``name``."""
  from vqgan_jax_testing import oracle
  torch = oracle.torch()
  ckpt = torch.load(r["path"], weights_only=False)
  edit(ckpt)
  path = str(r["tmp"] / name)
  torch.save(ckpt, path)
  return path


@pytest.mark.parametrize("name,edit,message", [
    ("noopt", lambda k: k.update(optimizer_states=[]),
     "has 0 optimizer states where a VQGAN run keeps 2"),
    ("sgd", lambda k: k["optimizer_states"][0]["param_groups"][0].pop("betas"),
     "generator's Adam: a param group without 'betas' is not Adam's"),
    ("amsgrad", lambda k: k["optimizer_states"][1]["param_groups"][0].update(
        amsgrad=True), "discriminator's Adam: AMSGrad"),
    ("missing", lambda k: k["optimizer_states"][0]["state"].pop(3),
     "generator's Adam has no state for 1 of"),
    ("shape", lambda k: k["optimizer_states"][0]["param_groups"][0][
        "params"].reverse(), "parameter order does not match"),
    ("nostep", lambda k: k.pop("global_step"), "no 'global_step'"),
    ("weights", lambda k: k["state_dict"]["decoder.conv_out.bias"].add_(1.0),
     "is not the checkpoint config.init_from=.* was converted from "
     r"\(decoder/conv_out/bias differs\)"),
])
def test_states_that_cannot_be_mapped_are_one_line_errors(resumed, name, edit,
                                                          message):
  r = resumed
  c = copy.deepcopy(r["c"])
  c.init_from_optimizer = _bad(r, edit, name + ".ckpt")
  with pytest.raises(schema.ConfigError, match=message) as e:
    oi.read_stage1(c, r["run"].abstract_state, r["extras"])
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("config.init_from_optimizer: ")


def test_another_discriminator_is_named(resumed):
  c = copy.deepcopy(resumed["c"])
  c.disc.n_layers = 2
  run = vt.create(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  with pytest.raises(schema.ConfigError,
                     match="does not match the configured discriminator"):
    oi.read_stage1(c, run.abstract_state, resumed["extras"])


def test_the_trainer_refuses_before_touching_the_workdir(resumed, tmp_path):
  c = copy.deepcopy(resumed["c"])
  c.init_from_optimizer = _bad(resumed, lambda k: k.update(
      optimizer_states=[]), "none.ckpt")
  wd = tmp_path / "wd"
  with pytest.raises(schema.ConfigError, match="optimizer states"):
    vt.train_and_evaluate(c, str(wd))
  assert not wd.exists()
  c.init_from = ""
  with pytest.raises(schema.ConfigError, match="needs config.init_from"):
    schema.validate_vqgan(c, 1)
  c.init_from, c.init_from_optimizer = resumed["c"].init_from, str(
      tmp_path / "nope.ckpt")
  with pytest.raises(schema.ConfigError, match="nope.ckpt does not exist"):
    schema.validate_vqgan(c, 1)
