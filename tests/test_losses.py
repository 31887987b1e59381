"""Stage-1 losses against the reference VQLPIPSWithDiscriminator.

The reference needs its ``last_layer`` as a torch Parameter that the
reconstruction depends on, so both sides build ``rec = conv(h, W) + b`` from
the same features ``h`` and kernel ``W``. The reference runs in train mode
(so its discriminator's BatchNorm uses each call's batch statistics, as ours
does with mutable ``batch_stats``) except for its LPIPS, kept in eval mode so
that the lin-head dropout is off on both sides.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from test_lpips import patch_reference_lpips, random_vgg
from vqgan_jax import discriminator as jdisc
from vqgan_jax import losses
from vqgan_jax import lpips as jlpips

DISC_START = 5
CONFIG = dict(codebook_weight=0.7, disc_weight=0.8, perceptual_weight=1.0,
              disc_factor=1.0, disc_start=DISC_START)


def state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def conv_nhwc(h, kernel, bias):
  out = jax.lax.conv_general_dilated(
      h, kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  return out + bias


@functools.partial(jax.jit, static_argnums=(0, 1))
def jax_generator_step(lpips_model, disc_model, lpips_vars, disc_vars, x, h,
                       kernel, bias, q_loss, step):
  """Loss, metrics, new batch_stats and d loss / d (kernel, h), from the
  trainer's generator objective with ``h`` as the trunk's output."""

  def nll_fn(rec):
    return losses.reconstruction_loss(
        x, rec, lambda a, b: jlpips.lpips_distance(lpips_model, lpips_vars,
                                                   a, b),
        perceptual_weight=CONFIG["perceptual_weight"])

  def gan_fn(rec):
    logits, upd = disc_model.apply(disc_vars, rec, train=True,
                                   mutable=["batch_stats"])
    return losses.generator_gan_loss(logits), upd

  factor = losses.adopt_weight(CONFIG["disc_factor"], step, DISC_START)
  loss, (g_h, (g_kernel, _)), t = losses.vqgan_generator_loss_and_grads(
      lambda h: ((h, q_loss), None), h, lambda k, b, h: conv_nhwc(h, k, b),
      (kernel, bias), nll_fn, gan_fn, disc_factor=factor,
      codebook_weight=CONFIG["codebook_weight"],
      disc_weight=CONFIG["disc_weight"])
  metrics = {"nll_loss": t.nll_loss, "rec_loss": t.nll_loss,
             "p_loss": t.nll_aux["p_loss"], "g_loss": t.g_loss,
             "d_weight": t.d_weight, "disc_factor": factor,
             "q_loss": t.q_loss}
  return loss, metrics, t.gan_aux["batch_stats"], (g_kernel, g_h)


def rel_close(got, want, tol=1e-4, atol=1e-7):
  np.testing.assert_allclose(np.asarray(got, np.float64),
                             np.asarray(want, np.float64), rtol=tol,
                             atol=atol)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_matches_reference_before_and_after_disc_start(monkeypatch,
                                                       disc_loss):
  torch = oracle.torch()
  patch_reference_lpips(monkeypatch, random_vgg(0))
  from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator
  torch.manual_seed(0)
  ref = VQLPIPSWithDiscriminator(
      disc_start=DISC_START, codebook_weight=0.7, disc_num_layers=2,
      disc_in_channels=3, disc_factor=1.0, disc_weight=0.8,
      perceptual_weight=1.0, disc_ndf=8, disc_loss=disc_loss)
  ref.train()
  ref.perceptual_loss.eval()

  lpips_model = jlpips.LPIPS()
  lpips_vars = jlpips.lpips_variables_from_reference(
      state(ref.perceptual_loss), prefix="")
  disc_model = jdisc.NLayerDiscriminator(ndf=8, n_layers=2)

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  h = rng.normal(0, 1, (2, 8, 32, 32)).astype(np.float32)
  w = rng.normal(0, 0.1, (3, 8, 3, 3)).astype(np.float32)
  b = rng.normal(0, 0.1, (3,)).astype(np.float32)
  q = np.float32(0.37)
  to_nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))
  kernel = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))

  for step in (DISC_START - 1, DISC_START):
    # Generator step.
    disc_vars = jdisc.params_from_state_dict(state(ref.discriminator), "",
                                             disc_model)
    W = torch.nn.Parameter(torch.from_numpy(w.copy()))
    ht = torch.from_numpy(h.copy()).requires_grad_(True)
    rec = torch.nn.functional.conv2d(ht, W, torch.from_numpy(b), padding=1)
    loss_t, log = ref(torch.tensor(q), torch.from_numpy(x), rec, 0, step,
                      last_layer=W)
    loss_t.backward()

    loss, metrics, stats, (g_kernel, g_h) = jax_generator_step(
        lpips_model, disc_model, lpips_vars, disc_vars, to_nhwc(x),
        to_nhwc(h), kernel, jnp.asarray(b), jnp.asarray(q), step)
    rel_close(loss, loss_t.item())
    for name in ("nll_loss", "rec_loss", "p_loss", "g_loss", "d_weight",
                 "disc_factor"):
      rel_close(metrics[name], log[f"train/{name}"].item())
    rel_close(metrics["q_loss"], log["train/quant_loss"].item())
    assert float(metrics["disc_factor"]) == float(step >= DISC_START)
    assert float(metrics["d_weight"]) > 0
    # Gradients of the total loss (d_weight held constant) agree.
    rel_close(g_kernel, W.grad.numpy().transpose(2, 3, 1, 0), 1e-4, 1e-6)
    rel_close(g_h, ht.grad.numpy().transpose(0, 2, 3, 1), 1e-4, 1e-6)
    # The generator step's train-mode call moved the running statistics.
    ref_sd = state(ref.discriminator)
    for i in (3, 6):
      rel_close(stats[f"main_{i}"]["mean"], ref_sd[f"main.{i}.running_mean"],
                1e-5, 1e-7)
      rel_close(stats[f"main_{i}"]["var"], ref_sd[f"main.{i}.running_var"],
                1e-5, 1e-7)

    # Discriminator step: real, then fake, through train-mode BatchNorm.
    disc_vars = jdisc.params_from_state_dict(ref_sd, "", disc_model)
    with torch.no_grad():
      d_t, d_log = ref(torch.tensor(q), torch.from_numpy(x), rec.detach(), 1,
                       step)
    disc_fn = lambda dp, s, im: disc_model.apply(
        {"params": dp, **s}, im, train=True, mutable=["batch_stats"])
    d_loss, _, d_terms = losses.vqgan_discriminator_loss_and_grads(
        disc_fn, disc_vars["params"],
        {"batch_stats": disc_vars["batch_stats"]}, to_nhwc(x),
        jax.lax.stop_gradient(to_nhwc(rec.detach().numpy())),
        jnp.asarray(step), disc_start=DISC_START, disc_loss=disc_loss)
    d_metrics = {"disc_loss": d_loss, "logits_real": d_terms.logits_real,
                 "logits_fake": d_terms.logits_fake}
    rel_close(d_loss, d_t.item())
    for name in ("disc_loss", "logits_real", "logits_fake"):
      rel_close(d_metrics[name], d_log[f"train/{name}"].item())
    if step >= DISC_START:
      assert float(d_loss) > 0.1


def test_d_loss_functions_match_reference():
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.losses import vqperceptual as ref
  rng = np.random.default_rng(1)
  real = rng.normal(0, 2, (3, 1, 5, 5)).astype(np.float32)
  fake = rng.normal(0, 2, (3, 1, 5, 5)).astype(np.float32)
  rt, ft = torch.from_numpy(real), torch.from_numpy(fake)
  rel_close(losses.hinge_d_loss(real, fake), ref.hinge_d_loss(rt, ft).item())
  rel_close(losses.vanilla_d_loss(real, fake),
            ref.vanilla_d_loss(rt, ft).item())
  rel_close(losses.generator_gan_loss(fake), -fake.mean())
  rel_close(losses.l1_loss(real, fake), np.abs(real - fake).mean())
  bf16 = losses.hinge_d_loss(jnp.asarray(real, jnp.bfloat16), fake)
  assert bf16.dtype == jnp.float32


def test_adopt_weight_crosses_disc_start_without_retracing():
  traces = []

  @jax.jit
  def factor(step):
    traces.append(step)
    return losses.adopt_weight(2.5, step, 10)

  got = [float(factor(jnp.int32(s))) for s in (0, 9, 10, 11, 10_000)]
  assert got == [0.0, 0.0, 2.5, 2.5, 2.5]
  assert len(traces) == 1


def test_generator_loss_crosses_disc_start_without_retracing():
  traces = []
  x = jnp.linspace(-1, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  h = jnp.cos(jnp.arange(2 * 4 * 4 * 5.0)).reshape(2, 4, 4, 5)

  @jax.jit
  def step_fn(kernel, step):
    traces.append(step)
    factor = losses.adopt_weight(1.0, step, 3)
    loss, _, t = losses.vqgan_generator_loss_and_grads(
        lambda h: ((h, jnp.float32(0.5)), None), h,
        lambda k, b, h: h @ k + b, (kernel, jnp.zeros(3)),
        lambda r: losses.reconstruction_loss(x, r, None,
                                             perceptual_weight=0.0),
        lambda r: (losses.generator_gan_loss(jnp.tanh(r).sum(-1)), None),
        disc_factor=factor)
    return loss, {"disc_factor": factor, "p_loss": t.nll_aux["p_loss"],
                  "nll_loss": t.nll_loss, "g_loss": t.g_loss,
                  "d_weight": t.d_weight}

  kernel = jnp.sin(jnp.arange(15.0)).reshape(5, 3) * 0.3
  before = step_fn(kernel, 2)[1]
  after = step_fn(kernel, 3)[1]
  assert len(traces) == 1
  assert float(before["disc_factor"]) == 0.0
  assert float(after["disc_factor"]) == 1.0
  assert float(before["p_loss"]) == 0.0
  # Before disc_start the GAN term is absent; after, it is added.
  rel_close(step_fn(kernel, 2)[0], before["nll_loss"] + 0.5)
  rel_close(step_fn(kernel, 3)[0], after["nll_loss"] + 0.5 +
            after["d_weight"] * after["g_loss"])


def test_adaptive_weight_is_gradient_norm_ratio():
  # nll = 3 * sum(W), g = sum(W**2) / 2 -> grads 3 and W.
  kernel = jnp.asarray([[1.0, -2.0], [0.5, 2.0]])
  got = losses.adaptive_disc_weight(
      jax.grad(lambda k: 3.0 * k.sum())(kernel),
      jax.grad(lambda k: 0.5 * jnp.sum(k ** 2))(kernel), 0.8)
  want = 6.0 / (np.sqrt(1 + 4 + 0.25 + 4) + 1e-4) * 0.8
  rel_close(got, want, 1e-6)
  # Clamped at 1e4 when the GAN gradient vanishes, then scaled.
  rel_close(losses.adaptive_disc_weight(jnp.ones(4) * 10, jnp.zeros(4), 0.5),
            5000.0, 1e-6)
  # No gradient flows through the weight.
  g = jax.grad(lambda s: losses.adaptive_disc_weight(s * jnp.ones(3),
                                                     jnp.ones(3)))(2.0)
  assert float(g) == 0.0


def test_reconstruction_loss_weights_and_errors():
  x = jnp.zeros((2, 4, 4, 3))
  y = jnp.full((2, 4, 4, 3), 0.5)
  fake_lpips = lambda a, b: jnp.asarray([1.0, 3.0])
  nll, parts = losses.reconstruction_loss(x, y, fake_lpips,
                                          perceptual_weight=0.25,
                                          pixelloss_weight=2.0)
  rel_close(parts["l1_loss"], 0.5)
  rel_close(parts["p_loss"], 2.0)
  rel_close(nll, 2.0 * 0.5 + 0.25 * 2.0)
  with pytest.raises(ValueError, match="perceptual_weight=0"):
    losses.reconstruction_loss(x, y, None)
  with pytest.raises(ValueError, match="disc_loss"):
    losses.vqgan_discriminator_loss(x, y, 0, disc_loss="wgan")
