"""GAN options beyond the reference, for the stage-1 discriminator objective.

All are off by default in the configs and enter the trained path through
:func:`vqgan_jax.losses.vqgan_discriminator_loss_and_grads` (R1, LeCam) and
the stage-1 train step (the warm-up factor, the weight mode):

* :func:`r1_penalty`: the R1 gradient penalty on real images;
* :func:`lecam_penalty` and :func:`lecam_ema_update`: the LeCam regulariser
  and the running means it reads;
* :func:`gan_warmup_factor`: how much of the GAN term reaches the generator
  while the discriminator warms up.

Pure functions over arrays, float32 whatever the model's compute dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Any) -> Array:
  return jnp.asarray(x).astype(jnp.float32)



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
