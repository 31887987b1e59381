"""GAN options beyond the reference: R1, LeCam, fixed GAN weight, D warm-up.

Properties protected:
  * `r1_penalty` equals the hand gradient norm of a tiny linear (and a
    quadratic) discriminator, and its own gradient (double backprop) too;
  * `lecam_penalty` / `lecam_ema_update` equal their formulas on known values;
  * `gan_warmup_factor` is 0 then 1 ('hold') or a linear ramp ('linear');
  * the trainer's step with every option on equals hand gradients: during
    warm-up the generator update has no GAN term (while D trains, with its
    hinge + LeCam + R1 loss), after it the GAN term weighs exactly
    `gan_weight` ('fixed'), and the LeCam EMA follows its update rule;
  * the defaults leave the reference's train state untouched, and bad values
    are named.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import gan_options
from vqgan_jax import losses
from vqgan_jax import modules
from vqgan_jax import sharding
from vqgan_jax.training import schema
from vqgan_jax.training import vqgan_trainer as vt


# ----------------------------------------------------------------------------
# Pure functions.


def test_r1_penalty_equals_hand_gradient_of_a_linear_discriminator():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 4, 2)), jnp.float32)
  linear = lambda im: jnp.sum(im * w, axis=(1, 2, 3))  # one logit per image
  pen, (logits, aux) = gan_options.r1_penalty(linear, x)
  # d(sum_b D(x_b)) / d x_b = w for every image: penalty = ||w||^2.
  np.testing.assert_allclose(pen, np.sum(np.square(w)), rtol=1e-6)
  np.testing.assert_allclose(logits, linear(x), rtol=1e-6)
  assert aux is None
  # Its gradient w.r.t. D's weights (double backprop) is 2 w.
  g = jax.grad(lambda w_: gan_options.r1_penalty(
      lambda im: jnp.sum(im * w_, axis=(1, 2, 3)), x)[0])(w)
  np.testing.assert_allclose(g, 2 * w, rtol=1e-6)


def test_r1_penalty_of_a_patch_discriminator_with_aux():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 1)), jnp.float32)
  # Patch logits (B, H, W, 1) = w * x^2: gradient of their sum is 2 w x.
  quad = lambda im: (w * im**2, {"calls": 1})
  pen, (logits, aux) = gan_options.r1_penalty(quad, x, has_aux=True)
  want = np.mean(np.sum((2 * np.asarray(w) * np.asarray(x))**2, axis=(1, 2, 3)))
  np.testing.assert_allclose(pen, want, rtol=1e-5)
  assert aux == {"calls": 1} and logits.shape == x.shape


def test_lecam_penalty_and_ema_equal_their_formulas():
  real = jnp.asarray([0.5, 2.0, -1.0])
  fake = jnp.asarray([-0.5, 1.5])
  # relu(real - ema_fake)^2 with ema_fake = 0.25: [0.0625, 3.0625, 0] -> mean
  # relu(ema_real - fake)^2 with ema_real = 1.0: [2.25, 0] -> mean
  want = (0.0625 + 3.0625 + 0.0) / 3 + (2.25 + 0.0) / 2
  got = gan_options.lecam_penalty(real, fake, ema_real=1.0, ema_fake=0.25)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == jnp.float32
  # The EMAs are constants for the gradient; the logits are not.
  g = jax.grad(lambda r: gan_options.lecam_penalty(r, fake, 1.0, 0.25))(real)
  np.testing.assert_allclose(g, [2 * 0.25 / 3, 2 * 1.75 / 3, 0.0], rtol=1e-6)
  ema = gan_options.lecam_ema_update({"real": 1.0, "fake": 0.25}, real, fake, 0.9)
  np.testing.assert_allclose(ema["real"], 0.9 * 1.0 + 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(ema["fake"], 0.9 * 0.25 + 0.1 * 0.5, rtol=1e-6)


def test_gan_warmup_factor():
  f = lambda step, mode: float(gan_options.gan_warmup_factor(step, 10, 4, mode))
  assert [f(s, "hold") for s in (0, 10, 13, 14, 20)] == [0, 0, 0, 1, 1]
  assert [f(s, "linear") for s in (0, 10, 11, 12, 14, 20)] == [
      0, 0, 0.25, 0.5, 1, 1]
  assert float(gan_options.gan_warmup_factor(0, 10, 0)) == 1.0  # off
  traced = jax.jit(lambda s: gan_options.gan_warmup_factor(s, 10, 4, "linear"))
  assert float(traced(jnp.int32(13))) == 0.75
  with pytest.raises(ValueError, match="disc_warmup_mode"):
    gan_options.gan_warmup_factor(0, 0, 4, "cosine")


# ----------------------------------------------------------------------------
# The trainer's step.


def _config(**loss):
  c = tu.load_config("digits_vqgan", "test")
  c.loss.update(dict(disc_start=0, disc_weight=0.8, codebook_weight=1.0))
  c.loss.update(loss)
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  r = c.model.resolution
  return {"image": jnp.asarray(rng.uniform(-1, 1, (c.batch_size, r, r, 3)),
                               jnp.float32)}


def _hand_generator_update(run, before, x, gan_weight):
  """params - grad(nll + gan_weight * g + q) and the disc-state updates."""
  model, disc = run.model, run.disc

  def loss_fn(params):
    z_q, aux = model.apply({"params": params}, x, train=True,
                           method=model.encode)
    h = model.apply({"params": params}, z_q, train=True,
                    method=model.decode_features)
    head = params["decoder"]["conv_out"]
    rec = modules.conv2d(h, head["kernel"], head["bias"]).astype(jnp.float32)
    nll, _ = losses.reconstruction_loss(x, rec, None, perceptual_weight=0.0)
    logits, upd = disc.apply(
        {"params": before["disc_params"], **before["disc_state"]}, rec,
        train=True, mutable=["batch_stats"])
    g = losses.generator_gan_loss(logits)
    return nll + gan_weight * g + aux["q_loss"], (upd, rec)

  (_, (upd, rec)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      before["params"])
  return jax.tree.map(lambda p, g: p - g, before["params"], grads), upd, rec


def _hand_disc_update(run, before, upd, x, rec, lecam_w, r1_w):
  disc = run.disc

  def loss_fn(dp):
    real_fn = lambda im: disc.apply({"params": dp, **upd}, im, train=True,
                                    mutable=["batch_stats"])
    (lr_, upd2) = real_fn(x)
    grad_x = jax.grad(lambda im: jnp.sum(real_fn(im)[0]))(x)
    r1 = jnp.mean(jnp.sum(grad_x.reshape(len(x), -1)**2, axis=1))
    lf_, _ = disc.apply({"params": dp, **upd2}, jax.lax.stop_gradient(rec),
                        train=True, mutable=["batch_stats"])
    hinge = 0.5 * (jnp.mean(jax.nn.relu(1 - lr_)) +
                   jnp.mean(jax.nn.relu(1 + lf_)))
    ema = before["lecam_ema"]
    lecam = (jnp.mean(jax.nn.relu(lr_ - ema["fake"])**2) +
             jnp.mean(jax.nn.relu(ema["real"] - lf_)**2))
    return hinge + lecam_w * lecam + r1_w * r1, (jnp.mean(lr_), jnp.mean(lf_))

  (loss, means), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      before["disc_params"])
  new = jax.tree.map(lambda p, g: p - g, before["disc_params"], grads)
  return new, loss, means


def _assert_trees_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path),
                               **tol)


def test_step_with_all_gan_options_equals_hand_gradients():
  """SGD(lr=1): each update is minus the hand gradient. Warm-up holds the
  GAN term out of the generator while D (hinge + LeCam + R1) trains; past
  it, the GAN term weighs exactly gan_weight."""
  lecam_w, r1_w, gan_w, decay = 0.3, 0.5, 0.05, 0.9
  c = _config(gan_weight_mode="fixed", gan_weight=gan_w, disc_warmup_steps=2,
              disc_warmup_mode="hold", lecam_weight=lecam_w,
              lecam_decay=decay, r1_weight=r1_w)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  run = vt.create(c, mesh, tx=(optax.sgd(1.0), optax.sgd(1.0)))
  state = run.init_fn(jax.random.PRNGKey(0))
  batch = _batch(c)
  x = batch["image"]
  hand_g = jax.jit(lambda b, x, w: _hand_generator_update(run, b, x, w))
  hand_d = jax.jit(lambda b, u, x, r: _hand_disc_update(run, b, u, x, r,
                                                        lecam_w, r1_w))
  for step, expect_gan in ((1, 0.0), (2, gan_w)):  # warm-up ends at 0 + 2
    state = dict(jax.device_get(state), step=jnp.int32(step),
                 lecam_ema={"real": jnp.float32(0.7),
                            "fake": jnp.float32(-0.4)})
    before = jax.device_get(state)
    new, m = run.step_fn(jax.device_put(state, run.state_shardings), batch,
                         run.lpips_vars)
    new = jax.device_get(new)
    assert float(m["gan_warmup"]) == (1.0 if expect_gan else 0.0)
    assert float(m["d_weight"]) == np.float32(gan_w)
    want_g, upd, rec = hand_g(before, x, jnp.float32(expect_gan))
    _assert_trees_close(new["params"], want_g, atol=2e-5, rtol=1e-4)
    want_d, d_loss, (mr, mf) = hand_d(before, upd, x, rec)
    np.testing.assert_allclose(m["disc_loss"], d_loss, rtol=1e-5)
    _assert_trees_close(new["disc_params"], want_d, atol=1e-5, rtol=1e-4)
    assert float(m["r1_penalty"]) > 0 and float(m["lecam_loss"]) > 0
    np.testing.assert_allclose(new["lecam_ema"]["real"],
                               decay * 0.7 + (1 - decay) * mr, rtol=1e-5)
    np.testing.assert_allclose(new["lecam_ema"]["fake"],
                               decay * -0.4 + (1 - decay) * mf, rtol=1e-5)
  assert run.step_fn._cache_size() == 1  # crossing warm-up: no recompile


def test_disc_fake_updated_trains_d_on_the_updated_generator():
  """disc_fake='updated' (the reference's way): D's loss and update come
  from a second forward of the generator after this step's update; the
  generator's own update is unchanged (SGD(lr=1): hand gradients)."""
  c = _config(disc_fake="updated", lecam_weight=0.0, r1_weight=0.0,
              gan_weight_mode="fixed", gan_weight=0.05)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  run = vt.create(c, mesh, tx=(optax.sgd(1.0), optax.sgd(1.0)))
  state = run.init_fn(jax.random.PRNGKey(0))
  batch = _batch(c)
  x = batch["image"]
  before = jax.device_get(state)
  new, m = run.step_fn(state, batch, run.lpips_vars)
  new = jax.device_get(new)

  @jax.jit
  def hand(before, x):
    want_g, upd, rec_step = _hand_generator_update(run, before, x, jnp.float32(0.05))
    rec_new = run.model.apply({"params": want_g}, x, train=True)[0]
    want_d, d_loss, _ = _hand_disc_update(
        run, dict(before, lecam_ema={"real": 0.0, "fake": 0.0}), upd, x,
        rec_new, 0.0, 0.0)
    _, d_loss_step, _ = _hand_disc_update(
        run, dict(before, lecam_ema={"real": 0.0, "fake": 0.0}), upd, x,
        rec_step, 0.0, 0.0)
    return want_g, want_d, d_loss, d_loss_step

  want_g, want_d, d_loss, d_loss_step = hand(before, x)
  _assert_trees_close(new["params"], want_g, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(m["disc_loss"], d_loss, rtol=1e-5)
  _assert_trees_close(new["disc_params"], want_d, atol=1e-5, rtol=1e-4)
  assert abs(float(d_loss) - float(d_loss_step)) > 1e-4  # not the step's fake
  with pytest.raises(ValueError, match="disc_fake"):
    schema.check_vqgan(_config(disc_fake="fresh"))


def test_defaults_keep_the_reference_state_and_metrics():
  c = _config()
  model, disc = vt.build_model(c), vt.build_discriminator(c)
  tx = optax.sgd(1.0)
  state = jax.eval_shape(lambda r: vt.init_state(model, disc, tx, tx, c, r),
                         jax.random.PRNGKey(0))
  assert "lecam_ema" not in state
  assert c.loss.gan_weight_mode == "adaptive" and c.loss.r1_weight == 0.0
  assert c.loss.disc_warmup_steps == 0 and c.loss.lecam_weight == 0.0


@pytest.mark.parametrize("field,value,message", [
    ("gan_weight_mode", "constant", "gan_weight_mode"),
    ("disc_warmup_mode", "cosine", "disc_warmup_mode"),
    ("r1_weight", -1.0, "r1_weight"),
    ("lecam_decay", 1.0, "lecam_decay"),
])
def test_bad_gan_option_values_are_named(field, value, message):
  c = _config(**{field: value})
  with pytest.raises(ValueError, match=message):
    schema.check_vqgan(c)
