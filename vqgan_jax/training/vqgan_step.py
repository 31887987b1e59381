"""The stage-1 train and eval steps, composed from :mod:`vqgan_jax.losses`.

``make_train_step`` returns ``step(state, batch, lpips_vars) -> (state,
metrics)``: the generator's loss and gradients
(:func:`losses.vqgan_generator_loss_and_grads`, one forward, the adaptive
GAN weight from the decoder's last conv), the discriminator's on the same
stopped reconstructions (:func:`losses.vqgan_discriminator_loss_and_grads`;
with ``config.loss.disc_fake='updated'`` on a second forward of the updated
generator, as the reference),
both updates applied only when every loss and gradient norm is finite, and
the step's metrics. ``vqgan_trainer.create`` jits both steps.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vqgan_jax import gan_options
from vqgan_jax import losses
from vqgan_jax import modules
from vqgan_jax import quantizers


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def _generator_grads(model, disc, lc, lpips_model) -> Callable:
  """``(state, x, rng, lpips_vars, disc_factor, warmup) -> (loss, grads,
  terms)``: :func:`losses.vqgan_generator_loss_and_grads` of the VQGAN split
  at ``decoder/conv_out``. The trunk's aux is ``(indices, quantizer_stats)``
  (an EMA codebook updates its statistics from this global batch), the GAN
  term's the discriminator's ``batch_stats`` after the call."""
  fixed = lc.gan_weight_mode == "fixed"

  def generator(state, x, rng, lpips_vars, disc_factor, warmup):
    r_drop, r_drop2, r_gumbel = jax.random.split(rng, 3)
    qstats = state.get("quantizer_stats")

    def trunk(p):
      rngs = {"dropout": r_drop, "gumbel": r_gumbel,
              "quantizer": jax.random.fold_in(r_gumbel, 1)}
      if qstats is None:
        z_q, aux = model.apply({"params": p}, x, train=True,
                               method=model.encode, rngs=rngs)
        new_qstats = None
      else:
        (z_q, aux), upd = model.apply(
            {"params": p, "quantizer_stats": qstats}, x, train=True,
            method=model.encode, rngs=rngs, mutable=["quantizer_stats"])
        new_qstats = upd["quantizer_stats"]
      h = model.apply({"params": p}, z_q, train=True,
                      method=model.decode_features, rngs={"dropout": r_drop2})
      return (h, aux["q_loss"]), (aux["indices"], new_qstats)

    def head(kernel, bias, h):
      return modules.conv2d(h, kernel, bias, dtype=model.dtype).astype(
          jnp.float32)

    def perceptual(a, b):
      if a.shape[-1] == 1:  # LPIPS-VGG wants RGB
        a, b = jnp.tile(a, (1, 1, 1, 3)), jnp.tile(b, (1, 1, 1, 3))
      return lpips_model.apply(jax.lax.stop_gradient(lpips_vars), a, b)

    def nll_term(rec):
      nll, parts = losses.reconstruction_loss(
          x, rec, perceptual if lpips_model is not None else None,
          perceptual_weight=lc.perceptual_weight)
      return nll, (parts["l1_loss"], parts["p_loss"])

    def gan_term(rec):
      logits_fake, new_stats = disc.apply(
          {"params": state["disc_params"], **state["disc_state"]}, rec,
          train=True, mutable=list(state["disc_state"].keys()))
      return losses.generator_gan_loss(logits_fake), new_stats

    conv_out = state["params"]["decoder"]["conv_out"]
    loss, (grads, (d_kernel, d_bias)), terms = (
        losses.vqgan_generator_loss_and_grads(
            trunk, state["params"], head,
            (conv_out["kernel"], conv_out["bias"]), nll_term, gan_term,
            disc_factor=disc_factor, warmup=warmup,
            codebook_weight=lc.codebook_weight, disc_weight=lc.disc_weight,
            gan_weight=lc.gan_weight if fixed else None))
    grads["decoder"]["conv_out"] = {"kernel": d_kernel, "bias": d_bias}
    return loss, grads, terms

  return generator


def _discriminator_grads(disc, lc) -> Callable:
  """``(state, x, fake, disc_state) -> (loss, grads, terms)``:
  :func:`losses.vqgan_discriminator_loss_and_grads` from ``disc_state`` (the
  collections after the generator's call)."""
  lecam_weight = float(lc.lecam_weight)
  r1_weight = float(lc.r1_weight)

  def discriminator(state, x, fake, disc_state):
    keys = list(disc_state.keys())
    disc_fn = lambda dp, s, im: disc.apply({"params": dp, **s}, im,
                                           train=True, mutable=keys)
    return losses.vqgan_discriminator_loss_and_grads(
        disc_fn, state["disc_params"], disc_state, x, fake, state["step"],
        disc_factor=lc.disc_factor, disc_start=lc.disc_start,
        disc_loss=lc.disc_loss, r1_weight=r1_weight,
        lecam_weight=lecam_weight, lecam_ema=state.get("lecam_ema"),
        lecam_decay=lc.lecam_decay)

  return discriminator


def _generator_update(tx_g, state, g):
  """``(new_params, opt_state)``: the generator's optimizer step from the
  gradients of ``g`` (``(loss, grads, terms)``), its EMA codebooks set from
  the statistics this step computed (unguarded: :func:`_guarded_update`
  keeps the old state when the step is not finite)."""
  _, grads, gt = g
  updates, opt_state = tx_g.update(grads, state["opt_state"], state["params"])
  new_params = optax.apply_updates(state["params"], updates)
  if state.get("quantizer_stats") is not None:
    new_params = quantizers.with_ema_codebooks(new_params, gt.trunk_aux[1])
  return new_params, opt_state


def _updated_reconstruction(model) -> Callable:
  """``(new_params, qstats, x, rng) -> rec``: the reconstruction of ``x``
  by the generator after this step's update
  (``config.loss.disc_fake='updated'``).

  The reference trains the discriminator on a second forward made after the
  generator's optimiser step; this runs the updated model once more in
  training mode, its EMA codebook statistics (``qstats``, None without
  them) read but not updated.
  """

  def refresh(new_params, qstats, x, rng):
    r_drop, r_drop2, r_gumbel = jax.random.split(jax.random.fold_in(rng, 2), 3)
    rngs = {"dropout": r_drop, "gumbel": r_gumbel,
            "quantizer": jax.random.fold_in(r_gumbel, 1)}
    variables = {"params": new_params}
    if qstats is not None:
      variables["quantizer_stats"] = qstats
    (z_q, _), _ = model.apply(variables, x, train=True, method=model.encode,
                              rngs=rngs, mutable=["quantizer_stats"])
    rec = model.apply({"params": new_params}, z_q, train=True,
                      method=model.decode, rngs={"dropout": r_drop2})
    return rec.astype(jnp.float32)

  return refresh


def _guarded_update(tx_g, tx_d, ema) -> Callable:
  """``(state, g, d) -> (state, finite, grad norms)``: both optimizer steps
  (and the EMA codebook and parameter EMA), applied only when the losses
  and gradient norms are all finite; otherwise the state stays as it was
  and ``bad_steps`` counts up. ``g``/``d`` are ``(loss, grads, terms)``;
  ``g_update`` is :func:`_generator_update` of ``g`` when the step has
  already computed it."""

  def update(state, g, d, g_update=None):
    (loss, grads, gt), (d_loss, d_grads, dt) = g, d
    params, dparams = state["params"], state["disc_params"]
    qstats = state.get("quantizer_stats")
    new_qstats = gt.trunk_aux[1]
    g_norm, d_norm = _global_norm(grads), _global_norm(d_grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(d_loss) & jnp.isfinite(g_norm)
              & jnp.isfinite(d_norm))
    new_params, opt_state = g_update or _generator_update(tx_g, state, g)
    d_updates, d_opt_state = tx_d.update(d_grads, state["disc_opt_state"],
                                         dparams)
    new_dparams = optax.apply_updates(dparams, d_updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = dict(state)
    new_state.update(
        step=state["step"] + 1,
        params=keep(new_params, params),
        opt_state=keep(opt_state, state["opt_state"]),
        disc_params=keep(new_dparams, dparams),
        disc_state=keep(dt.disc_state, state["disc_state"]),
        disc_opt_state=keep(d_opt_state, state["disc_opt_state"]),
        bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1),
    )
    if qstats is not None:
      new_state["quantizer_stats"] = keep(new_qstats, qstats)
    if dt.lecam_ema is not None:
      new_state["lecam_ema"] = keep(dt.lecam_ema, state["lecam_ema"])
    if ema:
      new_state["ema_params"] = keep(jax.tree.map(
          lambda e, p: ema * e + (1 - ema) * p, state["ema_params"],
          new_params), state["ema_params"])
    return new_state, finite, (g_norm, d_norm)

  return update


def _step_metrics(g, d, finite, norms, disc_factor, warmup, lc, n_embed):
  """The step's logged scalars (names listed in API.md)."""
  (loss, _, gt), (d_loss, _, dt) = g, d
  l1, p_loss = gt.nll_aux
  indices = gt.trunk_aux[0]
  metrics = {
      "loss": loss, "rec_loss": l1, "p_loss": p_loss,
      "nll_loss": gt.nll_loss, "g_loss": gt.g_loss, "d_weight": gt.d_weight,
      "disc_factor": disc_factor, "q_loss": gt.q_loss, "disc_loss": d_loss,
      "logits_real": dt.logits_real, "logits_fake": dt.logits_fake,
      "grad_norm": norms[0], "disc_grad_norm": norms[1],
      "codebook_usage": quantizers.codebook_usage(indices, n_embed),
      "perplexity": quantizers.perplexity(indices, n_embed),
      "skipped": 1 - finite.astype(jnp.int32),
  }
  metrics.update(dt.regs)
  if lc.disc_warmup_steps:
    metrics["gan_warmup"] = warmup
  return metrics


def make_train_step(model, disc, tx_g, tx_d, config, lpips_model=None
                    ) -> Callable:
  """Returns ``step(state, batch, lpips_vars) -> (state, metrics)``.

  The generator's forward and gradients, then the discriminator's on the
  same reconstructions (gradient stopped) from the ``batch_stats`` the
  generator's call left, then both updates behind one finiteness guard.
  """
  lc = config.loss
  generator = _generator_grads(model, disc, lc, lpips_model)
  discriminator = _discriminator_grads(disc, lc)
  update = _guarded_update(tx_g, tx_d, config.optim.ema_decay)
  refresh = (_updated_reconstruction(model) if lc.disc_fake == "updated"
             else None)

  def step(state, batch, lpips_vars):
    x = batch["image"].astype(jnp.float32)
    rng = jax.random.fold_in(state["rng"], state["step"])
    disc_factor = losses.adopt_weight(lc.disc_factor, state["step"],
                                      lc.disc_start)
    warmup = gan_options.gan_warmup_factor(state["step"], lc.disc_start,
                                      lc.disc_warmup_steps,
                                      lc.disc_warmup_mode)
    g = generator(state, x, rng, lpips_vars, disc_factor, warmup)
    g_terms = g[2]
    fake, g_update = g_terms.rec, None
    if refresh is not None:  # D sees the generator after its update
      g_update = _generator_update(tx_g, state, g)
      fake = refresh(g_update[0], g_terms.trunk_aux[1], x, rng)
    d = discriminator(state, x, jax.lax.stop_gradient(fake), g_terms.gan_aux)
    new_state, finite, norms = update(state, g, d, g_update)
    return new_state, _step_metrics(g, d, finite, norms, disc_factor, warmup,
                                    lc, model.n_embed)

  return step


def make_eval_step(model) -> Callable:
  """``(params, x) -> (rec, indices, psnr, l1)``, per example."""

  def eval_step(params, x):
    rec, aux = model.apply({"params": params}, x)
    err = (x.astype(jnp.float32) - rec)
    mse = jnp.mean(err**2, axis=(1, 2, 3))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return rec, aux["indices"], psnr, jnp.mean(jnp.abs(err), axis=(1, 2, 3))

  return eval_step
