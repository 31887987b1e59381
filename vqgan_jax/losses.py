"""Stage-1 (VQGAN) losses: reconstruction + LPIPS, PatchGAN, adaptive weight.

Pure functions over arrays and callables, meant to be called inside one
jitted training step: nothing branches in Python on a traced value (the
training step only enters through ``jnp.where``), and every loss is float32
whatever the model's compute dtype.

The two entry points mirror the reference ``VQLPIPSWithDiscriminator.forward``:
:func:`vqgan_generator_loss` (its ``optimizer_idx == 0``) and
:func:`vqgan_discriminator_loss` (``optimizer_idx == 1``).

Generator step, as the trainer writes it (``decoder_features`` gives the
decoder activations before ``conv_out``, ``conv_out(h, W)`` the last layer)::

  def loss_fn(gen_params):
    h, q_loss = decoder_features(gen_params, x)
    W = gen_params['decoder']['conv_out']['kernel']
    return vqgan_generator_loss(
        x, lambda W: conv_out(h, W), W, q_loss, step,
        disc_fn=lambda r: disc.apply(sg_disc_vars, r, train=True,
                                     mutable=['batch_stats']),
        perceptual_fn=lambda a, b: lpips_distance(lpips, lpips_vars, a, b),
        disc_has_aux=True, disc_start=..., disc_weight=...)

  (loss, (metrics, disc_updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(gen_params)

BatchNorm. The reference runs its discriminator in train mode: in the
generator step once on the reconstructions, in the discriminator step once on
the real images and once on the reconstructions, each call normalising with
its own batch statistics and moving the running statistics. Passing
``disc_fn`` that applies the discriminator with ``train=True`` and
``mutable=['batch_stats']`` (returning ``(logits, updates)`` with
``disc_has_aux=True``) reproduces the generator-step call, and
:func:`vqgan_jax.discriminator.discriminator_logits` the two
discriminator-step calls; their logits feed :func:`vqgan_discriminator_loss`.

Known differences from the reference, all deliberate:
  * The adaptive weight is always computed (the reference falls back to 0
    when autograd fails, i.e. in its validation step).
  * ``pixelloss_weight`` scales the L1 term; the reference stores the value
    but never uses it (all released configs leave it at 1.0).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

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


def adaptive_weight_from_fns(nll_fn: Callable[[Array], Array],
                             g_fn: Callable[[Array], Array],
                             last_layer_kernel: Array,
                             disc_weight: float = 1.0) -> Array:
  """The adaptive weight from two losses written as functions of the kernel.

  Args:
    nll_fn: ``kernel -> scalar`` reconstruction loss.
    g_fn: ``kernel -> scalar`` generator GAN loss.
    last_layer_kernel: the decoder's final conv kernel (the reference's
      ``last_layer``).
    disc_weight: extra factor.

  Returns:
    float32 scalar, see :func:`adaptive_disc_weight`.
  """
  nll_grad = jax.grad(nll_fn)(last_layer_kernel)
  g_grad = jax.grad(g_fn)(last_layer_kernel)
  return adaptive_disc_weight(nll_grad, g_grad, disc_weight)


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


def vqgan_generator_loss(
    inputs: Array,
    reconstruct_fn: Callable[[Array], Array],
    last_layer_kernel: Array,
    q_loss: Array,
    step: Any,
    disc_fn: Callable[[Array], Any],
    perceptual_fn: Optional[Callable[[Array, Array], Array]] = None,
    *,
    codebook_weight: float = 1.0,
    pixelloss_weight: float = 1.0,
    perceptual_weight: float = 1.0,
    disc_weight: float = 1.0,
    disc_factor: float = 1.0,
    disc_start: int = 0,
    disc_has_aux: bool = False,
) -> Tuple[Array, Any]:
  """Autoencoder loss of the VQGAN (the reference's ``optimizer_idx == 0``).

  ``loss = nll + d_weight * adopt_weight(disc_factor) * g + codebook_weight *
  q_loss`` with ``g = -mean(D(reconstructions))`` and ``d_weight`` the
  stop-gradient ratio of the gradient norms of ``nll`` and ``g`` w.r.t. the
  last layer (:func:`adaptive_disc_weight`). The reconstruction is written
  as a function of the last kernel so that both gradients come from
  ``jax.value_and_grad``; the decoder body, LPIPS and the discriminator each
  run once. Gradients w.r.t. whatever the callables close over (generator
  parameters) flow through ``loss`` as usual.

  Args:
    inputs: (B, H, W, C) target images.
    reconstruct_fn: ``kernel -> (B, H, W, C)`` reconstructions; applies the
      decoder's final conv with the given kernel to fixed features.
    last_layer_kernel: that conv's kernel.
    q_loss: quantizer (codebook) loss, scalar or array (averaged).
    step: global step (may be traced).
    disc_fn: ``reconstructions -> logits`` or, with ``disc_has_aux``,
      ``-> (logits, aux)`` (e.g. the discriminator's ``batch_stats``
      updates). Stop the gradient of the discriminator parameters yourself
      if you differentiate w.r.t. them.
    perceptual_fn: ``(inputs, reconstructions) -> (B,)`` LPIPS distances.
    codebook_weight: weight of ``q_loss``.
    pixelloss_weight: weight of the L1 term.
    perceptual_weight: weight of LPIPS (0 disables it).
    disc_weight: the reference's ``disc_weight`` (scales ``d_weight``).
    disc_factor: GAN factor from ``disc_start`` on.
    disc_start: first step with the GAN term.
    disc_has_aux: whether ``disc_fn`` returns ``(logits, aux)``.

  Returns:
    ``(loss, metrics)``, or ``(loss, (metrics, aux))`` with ``disc_has_aux``.
    ``metrics`` (float32 scalars): ``total_loss``, ``nll_loss``,
    ``rec_loss`` (the reference's, equal to ``nll_loss``), ``l1_loss``,
    ``p_loss``, ``g_loss``, ``d_weight``, ``disc_factor``, ``q_loss``.
  """
  x = _f32(inputs)

  def nll_fn(kernel):
    return reconstruction_loss(x, reconstruct_fn(kernel), perceptual_fn,
                               perceptual_weight=perceptual_weight,
                               pixelloss_weight=pixelloss_weight)

  def g_fn(kernel):
    out = disc_fn(reconstruct_fn(kernel))
    logits, aux = out if disc_has_aux else (out, None)
    return generator_gan_loss(logits), aux

  (nll, parts), nll_grad = jax.value_and_grad(nll_fn, has_aux=True)(
      last_layer_kernel)
  (g_loss, aux), g_grad = jax.value_and_grad(g_fn, has_aux=True)(
      last_layer_kernel)
  d_weight = adaptive_disc_weight(nll_grad, g_grad, disc_weight)
  factor = adopt_weight(disc_factor, step, disc_start)
  q = jnp.mean(_f32(q_loss))
  loss = nll + d_weight * factor * g_loss + _f32(codebook_weight) * q
  metrics = {
      "total_loss": loss, "nll_loss": nll, "rec_loss": nll,
      "l1_loss": parts["l1_loss"], "p_loss": parts["p_loss"],
      "g_loss": g_loss, "d_weight": d_weight, "disc_factor": factor,
      "q_loss": q,
  }
  metrics = jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
  return loss, ((metrics, aux) if disc_has_aux else metrics)


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
# GAN options beyond the reference (all off by default in the configs).


def r1_penalty(disc_fn: Callable[[Array], Any], images: Array, *,
               has_aux: bool = False) -> Tuple[Array, Any]:
  """R1 gradient penalty on real images (Mescheder et al., 2018).

  ``mean_b ||d(sum D(x)) / d x_b||^2``: the squared norm, per image, of the
  gradient of the discriminator's summed output (all patches) with respect
  to the pixels, averaged over the batch. The training loss adds
  ``r1_weight * penalty`` (``r1_weight`` is the paper's ``gamma / 2``).
  Differentiable w.r.t. whatever ``disc_fn`` closes over (double backprop).

  Args:
    disc_fn: ``images -> logits`` or, with ``has_aux``, ``-> (logits, aux)``.
    images: (B, H, W, C) real images.
    has_aux: whether ``disc_fn`` returns ``(logits, aux)``.

  Returns:
    ``(penalty, (logits, aux))``: the float32 scalar penalty, and the
    logits (and aux, else None) of the same call, so the caller's hinge
    loss can reuse them.
  """
  def total(x):
    out = disc_fn(x)
    logits, aux = out if has_aux else (out, None)
    return jnp.sum(_f32(logits)), (logits, aux)

  grad, (logits, aux) = jax.grad(total, has_aux=True)(_f32(images))
  per_image = jnp.sum(jnp.square(grad.reshape(grad.shape[0], -1)), axis=-1)
  return jnp.mean(per_image), (logits, aux)


def lecam_penalty(logits_real: Array, logits_fake: Array, ema_real: Array,
                  ema_fake: Array) -> Array:
  """LeCam regulariser of the discriminator (Tseng et al., 2021).

  ``mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2)``: it
  pulls real outputs no higher than the running mean of fake outputs and
  fake outputs no lower than that of real ones (the hinge form of the
  authors' code), which bounds how far apart D's outputs drift.

  Args:
    logits_real: D's outputs on real images (any shape).
    logits_fake: D's outputs on reconstructions.
    ema_real: running mean of D's mean output on real images (scalar).
    ema_fake: running mean of D's mean output on reconstructions.

  Returns:
    float32 scalar.
  """
  ema_real = jax.lax.stop_gradient(_f32(ema_real))
  ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
  return (jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake))) +
          jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(logits_fake)))))


def lecam_ema_update(ema: Dict[str, Array], logits_real: Array,
                     logits_fake: Array, decay: float) -> Dict[str, Array]:
  """One step of the running means that :func:`lecam_penalty` uses.

  Args:
    ema: ``{'real', 'fake'}`` float32 scalars.
    logits_real: D's outputs on real images this step.
    logits_fake: D's outputs on reconstructions this step.
    decay: EMA decay in [0, 1).

  Returns:
    ``{'real', 'fake'}`` with ``new = decay * old + (1 - decay) * mean``.
  """
  d = _f32(decay)
  upd = lambda old, x: jax.lax.stop_gradient(
      d * _f32(old) + (1.0 - d) * jnp.mean(_f32(x)))
  return {"real": upd(ema["real"], logits_real),
          "fake": upd(ema["fake"], logits_fake)}


GAN_WEIGHT_MODES = ("adaptive", "fixed")
WARMUP_MODES = ("hold", "linear")


def gan_warmup_factor(step: Any, disc_start: int, warmup_steps: int,
                      mode: str = "hold") -> Array:
  """How much of the GAN term reaches the generator while D warms up.

  The discriminator trains from ``disc_start``; its loss reaches the
  generator only from ``disc_start + warmup_steps`` (``'hold'``: 0 then 1),
  or ramps linearly from 0 at ``disc_start`` to 1 at ``disc_start +
  warmup_steps`` (``'linear'``). ``warmup_steps == 0`` is always 1 (the
  reference). ``step`` may be traced.

  Args:
    step: global step.
    disc_start: first step the discriminator trains.
    warmup_steps: warm-up length in steps (>= 0).
    mode: ``'hold'`` or ``'linear'``.

  Returns:
    float32 scalar in [0, 1].
  """
  if mode not in WARMUP_MODES:
    raise ValueError(f"disc_warmup_mode={mode!r}; valid: {WARMUP_MODES}")
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  s = _f32(step) - _f32(disc_start)
  if mode == "hold":
    return jnp.where(s >= warmup_steps, 1.0, 0.0).astype(jnp.float32)
  return jnp.clip(s / _f32(warmup_steps), 0.0, 1.0)


def sigmoid_bce_with_logits(logits: Array, targets: Array) -> Array:
  """Mean binary cross-entropy of logits against targets in [0, 1].

  Args:
    logits: raw scores.
    targets: probabilities of the same shape.

  Returns:
    float32 scalar, computed stably as
    ``max(x, 0) - x * t + log1p(exp(-|x|))``.
  """
  x, t = _f32(logits), _f32(targets)
  return jnp.mean(jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))


def bce_with_quant_loss(q_loss: Array, targets: Array, predictions: Array,
                        codebook_weight: float = 1.0
                        ) -> Tuple[Array, Metrics]:
  """Segmentation-map VQGAN loss (the reference's ``BCELossWithQuant``).

  Args:
    q_loss: quantizer loss (scalar or averaged array).
    targets: one-hot maps (B, H, W, n_classes).
    predictions: reconstruction logits, same shape.
    codebook_weight: weight of ``q_loss``.

  Returns:
    ``(loss, {'total_loss', 'bce_loss', 'quant_loss'})``.
  """
  bce = sigmoid_bce_with_logits(predictions, targets)
  q = jnp.mean(_f32(q_loss))
  loss = bce + _f32(codebook_weight) * q
  metrics = {"total_loss": loss, "bce_loss": bce, "quant_loss": q}
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


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
