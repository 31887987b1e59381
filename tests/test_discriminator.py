"""PatchGAN discriminator parity with the reference NLayerDiscriminator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax import discriminator as jdisc


def reference(seed=0, **kwargs):
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.discriminator.model import NLayerDiscriminator
  from taming.modules.discriminator.model import weights_init
  torch.manual_seed(seed)
  return NLayerDiscriminator(**kwargs).apply(weights_init)


def state(module, prefix=""):
  return {prefix + k: v.detach().numpy().copy()
          for k, v in module.state_dict().items()}


def images(seed, shape=(2, 3, 32, 32)):
  return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def run_torch(module, x, train):
  torch = oracle.torch()
  module.train(train)
  with torch.no_grad():
    return module(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                             atol=tol)


def test_batchnorm_train_eval_and_running_stats_match_reference():
  ref = reference(input_nc=3, ndf=8, n_layers=3)
  model, variables = jdisc.discriminator_from_state_dict(
      state(ref, "loss.discriminator."))
  assert (model.n_layers, model.ndf, model.use_actnorm) == (3, 8, False)
  real, fake = images(1), images(2)

  # Training step of the reference: real, then fake, each with its own
  # batch statistics and one running-stat update.
  want_real = run_torch(ref, real, True)
  want_fake = run_torch(ref, fake, True)
  got_real, got_fake, stats = jax.jit(
      jdisc.discriminator_logits, static_argnums=(0, 4))(
          model, variables, nhwc(real), nhwc(fake), True)
  assert got_real.shape == (2, 2, 2, 1) and got_real.dtype == jnp.float32
  close(got_real, want_real)
  close(got_fake, want_fake)
  ref_sd = state(ref)
  for i in (3, 6, 9):
    close(stats[f"main_{i}"]["mean"], ref_sd[f"main.{i}.running_mean"])
    close(stats[f"main_{i}"]["var"], ref_sd[f"main.{i}.running_var"])
  # Non-trivial: the running statistics moved away from (0, 1).
  assert np.abs(ref_sd["main.3.running_mean"]).max() > 1e-3

  # Eval mode with the updated statistics.
  test = images(3)
  got = model.apply({"params": variables["params"], "batch_stats": stats},
                    nhwc(test), train=False)
  close(got, run_torch(ref, test, False))


def test_actnorm_data_dependent_init_matches_reference():
  torch = oracle.torch()
  ref = reference(seed=1, input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
  model, variables = jdisc.discriminator_from_state_dict(state(ref), "")
  assert model.use_actnorm and model.n_layers == 2
  assert int(variables["batch_stats"]["main_3"]["initialized"]) == 0
  x, y = images(4, (2, 3, 16, 16)), images(5, (2, 3, 16, 16))

  # Eval before initialisation: identity affine in both.
  close(model.apply(variables, nhwc(x)), run_torch(ref, x, False))

  # First training call: the gradient w.r.t. loc/scale (before the stored
  # parameters change) and the output both follow the reference.
  ref.train(True)
  xt = torch.from_numpy(x)
  out = ref(xt)
  out.sum().backward()
  want_first = out.detach().numpy().transpose(0, 2, 3, 1)

  def total(params):
    return model.apply({"params": params,
                        "batch_stats": variables["batch_stats"]},
                       nhwc(x), train=True).sum()

  grads = jax.grad(total)(variables["params"])
  for i in (3, 6):
    close(grads[f"main_{i}"]["loc"],
          ref.main[i].loc.grad.numpy().reshape(-1), 1e-5)
    close(grads[f"main_{i}"]["scale"],
          ref.main[i].scale.grad.numpy().reshape(-1), 1e-5)

  variables = jdisc.initialize_actnorm(model, variables, nhwc(x))
  ref_sd = state(ref)
  for i in (3, 6):
    close(variables["params"][f"main_{i}"]["loc"],
          ref_sd[f"main.{i}.loc"].reshape(-1))
    close(variables["params"][f"main_{i}"]["scale"],
          ref_sd[f"main.{i}.scale"].reshape(-1), 1e-5)
    assert int(variables["batch_stats"][f"main_{i}"]["initialized"]) == 1
  close(model.apply(variables, nhwc(x)), want_first, 1e-5)

  # Later training calls use the stored parameters, not the batch.
  got, _ = model.apply(variables, nhwc(y), train=True,
                       mutable=["params", "batch_stats"])
  close(got, run_torch(ref, y, True), 1e-5)
  close(model.apply(variables, nhwc(y)), run_torch(ref, y, False), 1e-5)


def test_init_distribution_follows_weights_init():
  model = jdisc.NLayerDiscriminator(ndf=16, n_layers=3)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  p = v["params"]
  kernel = np.asarray(p["main_5"]["kernel"])
  assert kernel.shape == (4, 4, 32, 64)
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
  bn = np.asarray(p["main_6"]["scale"])
  assert abs(bn.mean() - 1.0) < 0.01 and 0.01 < bn.std() < 0.03
  assert np.all(np.asarray(p["main_6"]["bias"]) == 0)
  assert "bias" not in p["main_2"] and "bias" in p["main_0"]
  assert np.all(np.asarray(v["batch_stats"]["main_3"]["var"]) == 1)
  # Parameter count equals the reference's for the same configuration.
  ref = reference(ndf=16, n_layers=3)
  n_ref = sum(t.numel() for t in ref.parameters())
  assert sum(x.size for x in jax.tree_util.tree_leaves(p)) == n_ref


def test_bfloat16_compute_returns_float32():
  model = jdisc.NLayerDiscriminator(ndf=4, n_layers=2, dtype=jnp.bfloat16)
  x = jnp.asarray(images(6, (1, 16, 16, 3)))
  v = model.init(jax.random.PRNGKey(0), x)
  out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
  assert out.dtype == jnp.float32 and out.shape == (1, 2, 2, 1)
  want, _ = model.clone(dtype=jnp.float32).apply(v, x, train=True,
                                                 mutable=["batch_stats"])
  close(out, want, 0.1)


def test_conversion_errors_name_keys_and_shapes():
  sd = state(reference(ndf=8, n_layers=3))
  sd["main.3.num_batches_tracked"] = np.asarray(3)  # dropped silently
  model = jdisc.NLayerDiscriminator(ndf=8, n_layers=3)
  jdisc.params_from_state_dict(sd, "", model)

  broken = dict(sd)
  del broken["main.6.running_var"]
  broken["main.12.weight"] = np.zeros((1,), np.float32)
  broken["main.8.weight"] = np.zeros((64, 32, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    jdisc.params_from_state_dict(broken, "", model)
  msg = str(e.value)
  assert "missing keys" in msg and "main.6.running_var" in msg
  assert "unexpected keys" in msg and "main.12.weight" in msg
  assert "main.8.weight: expected (64, 32, 4, 4), got (64, 32, 3, 3)" in msg
  with pytest.raises(ValueError, match="loss.discriminator.main.0.weight"):
    jdisc.params_from_state_dict({"encoder.x": np.zeros(1)})
