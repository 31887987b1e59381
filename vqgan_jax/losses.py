"""The losses both trainers call: stage 1 (reconstruction + LPIPS, PatchGAN,
adaptive weight, the GAN regularisers of :mod:`vqgan_jax.gan_options`)
and stage 2 (token cross-entropy).

Pure functions over arrays and callables, meant to be called inside one
jitted training step: nothing branches in Python on a traced value (the
step only enters through ``jnp.where``), and every loss is float32 whatever
the model's compute dtype.

The stage-1 trainer's step is composed of two entry points, which mirror
the reference ``VQLPIPSWithDiscriminator.forward``:

* :func:`vqgan_generator_loss_and_grads` (its ``optimizer_idx == 0``): the
  generator loss with the adaptive GAN weight, and its gradients. The
  generator is given as a trunk (everything before the decoder's last
  conv) and a head (that conv), so that the weight's two kernel gradients
  come from one forward and the VJPs of the two loss terms::

    loss, (grads, (d_kernel, d_bias)), terms = vqgan_generator_loss_and_grads(
        trunk_fn,        # params -> ((h, q_loss), aux)
        params,
        conv_out,        # (kernel, bias, h) -> reconstructions
        (kernel, bias),
        lambda rec: reconstruction_loss(x, rec, perceptual_fn),
        gan_fn,          # rec -> (generator_gan_loss(D(rec)), aux)
        disc_factor=adopt_weight(disc_factor, step, disc_start))

* :func:`vqgan_discriminator_loss_and_grads` (its ``optimizer_idx == 1``):
  :func:`vqgan_discriminator_loss` plus the optional R1 and LeCam
  regularisers, and its gradient w.r.t. the discriminator's parameters.

BatchNorm. The reference runs its discriminator in train mode: in the
generator step once on the reconstructions, in the discriminator step once
on the real images and once on the reconstructions, each call normalising
with its own batch statistics and moving the running statistics. The
generator's GAN function applies the discriminator with ``train=True`` and
``mutable=['batch_stats']`` (returning the updates as its aux), and the
discriminator objective threads ``batch_stats`` through its real and fake
calls (as :func:`vqgan_jax.discriminator.discriminator_logits` does).

Stage 2: :func:`token_loss` and :func:`token_accuracy` over the GPT's
float32 logits.

Known differences from the reference, all deliberate:
  * The adaptive weight is always computed (the reference falls back to 0
    when autograd fails, i.e. in its validation step).
  * ``pixelloss_weight`` scales the L1 term; the reference stores the value
    but never uses it (all released configs leave it at 1.0).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from vqgan_jax.gan_options import (lecam_ema_update, lecam_penalty,
                                  r1_penalty)

Array = jax.Array
Metrics = Dict[str, Array]


def _f32(x: Any) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def l1_loss(x: Array, y: Array) -> Array:
  """Mean absolute difference.

  Args:
    x: array.
    y: array of the same shape.

  Returns:
    float32 scalar ``mean(|x - y|)``.
  """
  return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Hinge discriminator loss.

  Args:
    logits_real: discriminator logits on real images (any shape).
    logits_fake: discriminator logits on reconstructions (any shape).

  Returns:
    float32 scalar ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``.
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
  return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Non-saturating (binary cross-entropy) discriminator loss.

  Args:
    logits_real: discriminator logits on real images.
    logits_fake: discriminator logits on reconstructions.

  Returns:
    float32 scalar ``0.5 * (mean softplus(-real) + mean softplus(fake))``.
  """
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real))) +
                jnp.mean(jax.nn.softplus(_f32(logits_fake))))


D_LOSSES: Dict[str, Callable[[Array, Array], Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def generator_gan_loss(logits_fake: Array) -> Array:
  """Generator adversarial term.

  Args:
    logits_fake: discriminator logits on reconstructions.

  Returns:
    float32 scalar ``-mean(logits_fake)``.
  """
  return -jnp.mean(_f32(logits_fake))


def adopt_weight(weight: Any, step: Any, threshold: Any,
                 value: float = 0.0) -> Array:
  """A weight that is ``value`` before ``threshold`` steps.

  ``step`` may be traced: crossing the threshold does not recompile.

  Args:
    weight: the weight from ``threshold`` on.
    step: current global step (batches seen).
    threshold: first step at which ``weight`` applies (``disc_start``).
    value: the weight before then.

  Returns:
    float32 scalar.
  """
  return jnp.where(jnp.asarray(step) < threshold, _f32(value), _f32(weight))


def adaptive_disc_weight(nll_grad: Any, g_grad: Any,
                         disc_weight: float = 1.0) -> Array:
  """Balances the GAN term against the reconstruction term.

  Args:
    nll_grad: gradient (array or pytree) of the reconstruction loss w.r.t.
      the decoder's last layer.
    g_grad: gradient of the generator GAN loss w.r.t. the same layer.
    disc_weight: extra factor (the reference's ``disc_weight``).

  Returns:
    float32 scalar ``clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4) *
    disc_weight``, with its gradient stopped.
  """
  def norm(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(g))) for g in leaves))

  weight = norm(nll_grad) / (norm(g_grad) + 1e-4)
  weight = jax.lax.stop_gradient(jnp.clip(weight, 0.0, 1e4))
  return weight * _f32(disc_weight)


def reconstruction_loss(
    inputs: Array, reconstructions: Array,
    perceptual_fn: Optional[Callable[[Array, Array], Array]] = None, *,
    perceptual_weight: float = 1.0, pixelloss_weight: float = 1.0
) -> Tuple[Array, Metrics]:
  """The reference's ``nll_loss``: L1 per pixel plus LPIPS per image, mean.

  The reference adds each image's LPIPS distance to every one of its pixel
  errors before the mean, which equals ``mean L1 + weight * mean LPIPS``.

  Args:
    inputs: (B, H, W, C) images.
    reconstructions: (B, H, W, C) reconstructions.
    perceptual_fn: ``(inputs, reconstructions) -> (B,)`` distances, e.g.
      :func:`vqgan_jax.lpips.lpips_distance` with its weights bound; may be
      ``None`` when ``perceptual_weight == 0``.
    perceptual_weight: LPIPS weight (Python float; 0 skips LPIPS).
    pixelloss_weight: L1 weight (the reference ignores it; see the module
      docstring).

  Returns:
    ``(nll, {'l1_loss', 'p_loss'})``, float32 scalars; ``p_loss`` is the
    batch mean of the LPIPS distances (0 when skipped).
  """
  x, rec = _f32(inputs), _f32(reconstructions)
  l1 = l1_loss(x, rec)
  if perceptual_weight > 0:
    if perceptual_fn is None:
      raise ValueError("perceptual_weight > 0 needs a perceptual_fn (e.g. "
                       "vqgan_jax.lpips.lpips_distance with loaded weights); "
                       "set perceptual_weight=0 to train without LPIPS")
    p_loss = jnp.mean(_f32(perceptual_fn(x, rec)))
  else:
    p_loss = jnp.zeros((), jnp.float32)
  nll = _f32(pixelloss_weight) * l1 + _f32(perceptual_weight) * p_loss
  return nll, {"l1_loss": l1, "p_loss": p_loss}


def vqgan_discriminator_loss(logits_real: Array, logits_fake: Array,
                             step: Any, *, disc_factor: float = 1.0,
                             disc_start: int = 0, disc_loss: str = "hinge"
                             ) -> Tuple[Array, Metrics]:
  """Discriminator loss of the VQGAN (the reference's ``optimizer_idx == 1``).

  Args:
    logits_real: logits on real images (from a train-mode call, see
      :func:`vqgan_jax.discriminator.discriminator_logits`).
    logits_fake: logits on reconstructions with their gradient stopped.
    step: global step (may be traced).
    disc_factor: factor from ``disc_start`` on.
    disc_start: first step with a non-zero loss.
    disc_loss: ``'hinge'`` or ``'vanilla'``.

  Returns:
    ``(loss, metrics)``; metrics ``disc_loss``, ``logits_real`` and
    ``logits_fake`` (batch means) and ``disc_factor``, float32 scalars.
  """
  if disc_loss not in D_LOSSES:
    raise ValueError(f"unknown disc_loss {disc_loss!r}; expected one of "
                     f"{sorted(D_LOSSES)}")
  factor = adopt_weight(disc_factor, step, disc_start)
  loss = factor * D_LOSSES[disc_loss](logits_real, logits_fake)
  metrics = {"disc_loss": loss, "logits_real": jnp.mean(_f32(logits_real)),
             "logits_fake": jnp.mean(_f32(logits_fake)),
             "disc_factor": factor}
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------
# The two objectives of one stage-1 train step.


class GeneratorTerms(NamedTuple):
  """What :func:`vqgan_generator_loss_and_grads` computed on the way.

  ``nll_loss``, ``g_loss``, ``d_weight``, ``q_loss`` are float32 scalars;
  ``rec`` the reconstructions; ``trunk_aux``, ``nll_aux``, ``gan_aux`` the
  auxiliary outputs of the trunk, NLL and GAN functions.
  """
  nll_loss: Array
  g_loss: Array
  d_weight: Array
  q_loss: Array
  rec: Array
  trunk_aux: Any
  nll_aux: Any
  gan_aux: Any


def vqgan_generator_loss_and_grads(
    trunk_fn: Callable[[Any], Tuple[Tuple[Array, Array], Any]],
    params: Any,
    head_fn: Callable[[Array, Array, Array], Array],
    head: Tuple[Array, Array],
    nll_fn: Callable[[Array], Tuple[Array, Any]],
    gan_fn: Callable[[Array], Tuple[Array, Any]],
    *,
    disc_factor: Any,
    warmup: Any = 1.0,
    codebook_weight: float = 1.0,
    disc_weight: float = 1.0,
    gan_weight: Optional[float] = None,
) -> Tuple[Array, Tuple[Any, Tuple[Array, Array]], GeneratorTerms]:
  """The VQGAN's generator loss and its gradients (reference ``optimizer_idx == 0``).

  ``loss = nll + d_weight * disc_factor * warmup * g + codebook_weight *
  q_loss`` with ``g = -mean(D(rec))`` and ``d_weight`` the stop-gradient
  ratio of the gradient norms of ``nll`` and ``g`` w.r.t. the last conv
  kernel (:func:`adaptive_disc_weight`), or ``gan_weight`` when given.

  The generator is split at its last conv: ``trunk_fn(params) -> ((h,
  q_loss), aux)`` runs everything up to it and ``head_fn(kernel, bias, h) ->
  rec`` is the conv. Each part runs forward once. The NLL (L1 + LPIPS) and
  the GAN term each get one backward pass to ``d loss / d rec``; the head's
  VJP maps both to kernel gradients (for the adaptive weight) and their
  weighted sum to ``(d kernel, d bias, d h)``; the trunk's VJP carries ``d
  h`` and ``codebook_weight`` (for ``q_loss``) into ``params``. The result
  equals ``jax.grad`` of ``loss`` with ``d_weight`` held constant.

  Args:
    trunk_fn: ``params -> ((h, q_loss), aux)``: features before the last
      conv and the scalar quantizer loss.
    params: what ``trunk_fn`` differentiates (the generator's parameters).
    head_fn: ``(kernel, bias, h) -> rec``: the last conv, float32 output.
    head: ``(kernel, bias)`` of that conv.
    nll_fn: ``rec -> (nll, aux)``: the reconstruction loss
      (:func:`reconstruction_loss` with the targets bound).
    gan_fn: ``rec -> (g, aux)``: the generator GAN term
      (:func:`generator_gan_loss` of the discriminator's logits; ``aux``
      e.g. its ``batch_stats`` updates). Stop the gradient of the
      discriminator's parameters yourself.
    disc_factor: GAN factor (:func:`adopt_weight` of ``disc_start``; may be
      traced).
    warmup: GAN warm-up factor (:func:`vqgan_jax.gan_options.gan_warmup_factor`).
    codebook_weight: weight of ``q_loss``.
    disc_weight: the reference's ``disc_weight`` (scales the adaptive
      weight).
    gan_weight: a fixed ``d_weight`` instead of the adaptive one.

  Returns:
    ``(loss, (trunk_grads, (d_kernel, d_bias)), terms)``: ``trunk_grads``
    has the structure of ``params`` (zero where ``trunk_fn`` does not read,
    e.g. the head's own entries); ``terms`` is a :class:`GeneratorTerms`.
  """
  (h, q_loss), trunk_vjp, trunk_aux = jax.vjp(trunk_fn, params, has_aux=True)
  rec, head_vjp = jax.vjp(head_fn, head[0], head[1], h)
  nll, nll_vjp, nll_aux = jax.vjp(nll_fn, rec, has_aux=True)
  g_loss, gan_vjp, gan_aux = jax.vjp(gan_fn, rec, has_aux=True)
  d_nll, = nll_vjp(jnp.ones_like(nll))
  d_g, = gan_vjp(jnp.ones_like(g_loss))
  if gan_weight is not None:
    d_weight = jnp.asarray(gan_weight, jnp.float32)
  else:
    d_weight = adaptive_disc_weight(head_vjp(d_nll)[0], head_vjp(d_g)[0],
                                    disc_weight)
  coef = d_weight * disc_factor * warmup
  loss = nll + coef * g_loss + codebook_weight * q_loss
  d_kernel, d_bias, d_h = head_vjp(d_nll + coef * d_g)
  trunk_grads, = trunk_vjp((d_h, jnp.asarray(codebook_weight, q_loss.dtype)))
  terms = GeneratorTerms(nll, g_loss, d_weight, q_loss, rec, trunk_aux,
                         nll_aux, gan_aux)
  return loss, (trunk_grads, (d_kernel, d_bias)), terms


class DiscriminatorTerms(NamedTuple):
  """What :func:`vqgan_discriminator_loss_and_grads` computed on the way.

  ``disc_state``: the discriminator's collections after the real and the
  fake call; ``logits_real``/``logits_fake``: batch means; ``regs``: the
  regulariser values that are on (``r1_penalty``, ``lecam_loss``);
  ``lecam_ema``: the updated LeCam running means (None when LeCam is off).
  """
  disc_state: Any
  logits_real: Array
  logits_fake: Array
  regs: Dict[str, Array]
  lecam_ema: Optional[Dict[str, Array]]


def vqgan_discriminator_loss_and_grads(
    disc_fn: Callable[[Any, Any, Array], Tuple[Array, Any]],
    disc_params: Any,
    disc_state: Any,
    real: Array,
    fake: Array,
    step: Any,
    *,
    disc_factor: float = 1.0,
    disc_start: int = 0,
    disc_loss: str = "hinge",
    r1_weight: float = 0.0,
    lecam_weight: float = 0.0,
    lecam_ema: Optional[Dict[str, Array]] = None,
    lecam_decay: float = 0.999,
) -> Tuple[Array, Any, DiscriminatorTerms]:
  """The discriminator's loss with its regularisers, and its gradient.

  :func:`vqgan_discriminator_loss` on one train-mode call on ``real`` then
  one on ``fake`` (the second sees the first one's ``batch_stats``, as in
  the reference), plus ``factor * (lecam_weight * lecam_penalty + r1_weight
  * r1_penalty)`` where ``factor`` is the GAN factor (the regularisers train
  D only when its loss does). R1 reuses the real call's logits.

  Args:
    disc_fn: ``(params, state, images) -> (logits, new_state)``: the
      discriminator in train mode with its non-parameter collections
      mutable.
    disc_params: what the gradient is taken of.
    disc_state: its other collections (``batch_stats``).
    real: (B, H, W, C) real images.
    fake: reconstructions, gradient stopped.
    step: global step (may be traced).
    disc_factor: factor from ``disc_start`` on.
    disc_start: first step with a non-zero loss.
    disc_loss: ``'hinge'`` or ``'vanilla'``.
    r1_weight: weight of :func:`vqgan_jax.gan_options.r1_penalty` (0: off).
    lecam_weight: weight of :func:`vqgan_jax.gan_options.lecam_penalty` (0: off).
    lecam_ema: ``{'real', 'fake'}`` running means (needed with LeCam).
    lecam_decay: their decay (:func:`lecam_ema_update`).

  Returns:
    ``(loss, grads, terms)``: ``grads`` has the structure of
    ``disc_params``; ``terms`` is a :class:`DiscriminatorTerms`.
  """
  factor = adopt_weight(disc_factor, step, disc_start)

  def loss_fn(dp):
    real_fn = lambda im: disc_fn(dp, disc_state, im)
    regs = {}
    if r1_weight:
      regs["r1_penalty"], (logits_real, upd) = r1_penalty(real_fn, real,
                                                          has_aux=True)
    else:
      logits_real, upd = real_fn(real)
    logits_fake, upd = disc_fn(dp, upd, fake)
    loss, m = vqgan_discriminator_loss(
        logits_real, logits_fake, step, disc_factor=disc_factor,
        disc_start=disc_start, disc_loss=disc_loss)
    ema = None
    if lecam_weight:
      regs["lecam_loss"] = lecam_penalty(logits_real, logits_fake,
                                         lecam_ema["real"], lecam_ema["fake"])
      ema = lecam_ema_update(lecam_ema, logits_real, logits_fake,
                             lecam_decay)
    loss = loss + factor * (lecam_weight * regs.get("lecam_loss", 0.0) +
                            r1_weight * regs.get("r1_penalty", 0.0))
    return loss, DiscriminatorTerms(upd, m["logits_real"], m["logits_fake"],
                                    regs, ema)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      disc_params)
  return loss, grads, terms


# ----------------------------------------------------------------------------
# Stage 2 (GPT): token losses.


def token_loss(logits: Array, targets: Array,
               mask: Optional[Array] = None) -> Array:
  """Mean token cross-entropy, computed in float32.

  Args:
    logits: (..., V) logits.
    targets: int (...) target ids.
    mask: optional (...) weights; the mean is taken over weighted tokens.

  Returns:
    float32 scalar.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def token_accuracy(logits: Array, targets: Array,
                   mask: Optional[Array] = None) -> Array:
  """Fraction of tokens whose argmax equals the target.

  Args:
    logits: (..., V) logits.
    targets: int (...) target ids.
    mask: optional (...) weights.

  Returns:
    float32 scalar in [0, 1].
  """
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  if mask is None:
    return hits.mean()
  mask = mask.astype(jnp.float32)
  return (hits * mask).sum() / jnp.maximum(mask.sum(), 1.0)
