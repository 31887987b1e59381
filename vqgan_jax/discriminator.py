"""PatchGAN discriminator of the VQGAN loss (pix2pix NLayerDiscriminator).

Layer ``main_{i}`` is entry ``i`` of the reference's ``main`` Sequential (the
LeakyReLUs take the missing indices), so checkpoint keys map one to one
(:mod:`vqgan_jax.keymaps.discriminator`).

BatchNorm follows torch exactly (:class:`BatchNorm`): training normalises by
the batch's biased variance and updates the running variance with the
unbiased one, momentum 0.9 in Flax terms (torch 0.1), eps 1e-5. Flax's own
``nn.BatchNorm`` updates with the biased variance, hence the small module.

Real and fake batches. The reference calls its discriminator in train mode
once per batch: in the generator step on the reconstructions, in the
discriminator step first on the real images and then on the reconstructions.
Each call normalises with its own batch statistics and moves the running
statistics once. :func:`discriminator_logits` reproduces the two calls of the
discriminator step by threading ``batch_stats`` through two ``apply`` calls
(never one call on the concatenated batch, which would mix the statistics);
:func:`vqgan_jax.losses.vqgan_generator_loss_and_grads` receives the single
generator call as a function that returns the updated ``batch_stats``.

ActNorm (``use_actnorm=True``) replaces BatchNorm and, as in the reference,
gives every conv a bias. Its ``loc``/``scale`` are parameters initialised
(0, 1) by ``init``; the first call with ``train=True`` normalises with the
statistics of its batch (``loc = -mean``, ``scale = 1 / (std + 1e-6)``, std
unbiased), and when ``'params'`` and ``'batch_stats'`` are both mutable it
stores them and sets the ``initialized`` flag kept in ``batch_stats``. Use
:func:`initialize_actnorm` once on the first batch before training; until the
flag is set, every training call re-derives the statistics from its batch.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import keymaps

Array = jax.Array


def _normal(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


def _torch_bias_init(fan_in: int):
  """torch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class BatchNorm(nn.Module):
  """BatchNorm over all but the last axis with torch's running-stat update.

  Attributes:
    momentum: weight of the old running statistics (torch momentum 1 - this).
    epsilon: added to the variance.
    dtype: output dtype; statistics are float32.
    param_dtype: dtype of ``scale``/``bias``.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Normalises ``x``; batch statistics when ``train`` else running ones."""
    c = x.shape[-1]
    scale = self.param("scale", _normal(1.0, 0.02), (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing() and self.is_mutable_collection(
          "batch_stats"):
        n = int(np.prod([x.shape[a] for a in axes]))
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(
            mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(
            unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ActNorm(nn.Module):
  """Per-channel affine ``scale * (x + loc)`` with data-dependent init.

  Attributes:
    dtype: output dtype; statistics are float32.
    param_dtype: dtype of ``loc``/``scale``.
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the affine map, initialising it from ``x`` on the first
    training call (see the module docstring)."""
    c = x.shape[-1]
    loc = self.param("loc", nn.initializers.zeros, (c,), self.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    flag = self.variable("batch_stats", "initialized",
                         lambda: jnp.zeros((), jnp.int32))
    x32 = x.astype(jnp.float32)
    loc32, scale32 = loc.astype(jnp.float32), scale.astype(jnp.float32)
    if train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      stats = jax.lax.stop_gradient(x32)
      new_loc = -jnp.mean(stats, axis=axes)
      new_scale = 1.0 / (jnp.std(stats, axis=axes, ddof=1) + 1e-6)
      first = flag.value == 0
      # Value of the batch statistics on the first call, while gradients
      # still reach the parameters as in the reference.
      loc32 = loc32 + jax.lax.stop_gradient(
          jnp.where(first, new_loc - loc32, 0.0))
      scale32 = scale32 + jax.lax.stop_gradient(
          jnp.where(first, new_scale - scale32, 0.0))
      if (self.is_mutable_collection("params") and
          self.is_mutable_collection("batch_stats")):
        self.put_variable("params", "loc",
                          jax.lax.stop_gradient(loc32).astype(loc.dtype))
        self.put_variable("params", "scale",
                          jax.lax.stop_gradient(scale32).astype(scale.dtype))
        flag.value = jnp.ones((), jnp.int32)
    return (scale32 * (x32 + loc32)).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """pix2pix PatchGAN: a grid of real/fake logits per image.

  Initialisation follows the reference's ``weights_init``: conv kernels
  N(0, 0.02), norm scales N(1, 0.02), norm biases 0; conv biases keep torch's
  default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which ``weights_init`` leaves
  alone.

  Attributes:
    input_nc: input channels.
    ndf: channels of the first conv.
    n_layers: number of stride-2 convs.
    use_actnorm: ActNorm (with conv biases) instead of BatchNorm.
    dtype: computation dtype; logits are float32.
    param_dtype: parameter dtype.
  """
  input_nc: int = 3
  ndf: int = 64
  n_layers: int = 3
  use_actnorm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv(self, idx: int, cin: int, cout: int, stride: int,
            bias: bool) -> nn.Conv:
    return nn.Conv(cout, (4, 4), strides=(stride, stride),
                   padding=((1, 1), (1, 1)), use_bias=bias,
                   kernel_init=_normal(0.0, 0.02),
                   bias_init=_torch_bias_init(cin * 16), dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f"main_{idx}")

  def _norm(self, idx: int) -> nn.Module:
    cls = ActNorm if self.use_actnorm else BatchNorm
    return cls(dtype=self.dtype, param_dtype=self.param_dtype,
               name=f"main_{idx}")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Scores NHWC images.

    Args:
      x: (B, H, W, input_nc) images.
      train: normalise with batch statistics (and update running ones when
        ``batch_stats`` is mutable) instead of running statistics.

    Returns:
      float32 (B, H', W', 1) logits (H' = H / 2**n_layers - 2).
    """
    h = jnp.asarray(x).astype(self.dtype)
    h = nn.leaky_relu(self._conv(0, self.input_nc, self.ndf, 2, True)(h), 0.2)
    idx, mult = 2, 1
    for n in range(1, self.n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = self._conv(idx, self.ndf * prev, self.ndf * mult, stride,
                     self.use_actnorm)(h)
      h = nn.leaky_relu(self._norm(idx + 1)(h, train), 0.2)
      idx += 3
    h = self._conv(idx, self.ndf * mult, 1, 1, True)(h)
    return h.astype(jnp.float32)


def discriminator_logits(model: NLayerDiscriminator,
                         variables: Mapping[str, Any], real: Array,
                         fake: Array, train: bool = True
                         ) -> Tuple[Array, Array, Any]:
  """Scores real then fake images in two calls, as the reference does.

  Args:
    model: the discriminator.
    variables: ``{'params', 'batch_stats'}``.
    real: (B, H, W, C) real images.
    fake: (B, H, W, C) reconstructions (stop their gradient first for the
      discriminator update).
    train: batch statistics and running-stat updates (the reference's mode
      during training) or running statistics.

  Returns:
    ``(logits_real, logits_fake, batch_stats)`` with the running statistics
    after both calls (unchanged when not training).
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  if not train:
    return (model.apply(variables, real, train=False),
            model.apply(variables, fake, train=False), stats)
  logits_real, upd = model.apply({"params": params, "batch_stats": stats},
                                 real, train=True, mutable=["batch_stats"])
  logits_fake, upd = model.apply({"params": params, **upd}, fake, train=True,
                                 mutable=["batch_stats"])
  return logits_real, logits_fake, upd["batch_stats"]


def initialize_actnorm(model: NLayerDiscriminator,
                       variables: Mapping[str, Any], x: Array
                       ) -> Dict[str, Any]:
  """Runs the data-dependent ActNorm initialisation on batch ``x``.

  Args:
    model: a discriminator with ``use_actnorm=True`` (others: no-op).
    variables: ``{'params', 'batch_stats'}`` from ``model.init``.
    x: the batch that initialises the layers (the reference's first
      training call sees reconstructions).

  Returns:
    Variables with ``loc``/``scale`` set and the flags raised; layers whose
    flag was already set keep their parameters.
  """
  if not model.use_actnorm:
    return dict(variables)
  _, new = model.apply(variables, x, train=True,
                       mutable=["params", "batch_stats"])
  return {**variables, **new}


# ----------------------------------------------------------------------------
# Loading reference weights (the key map is `vqgan_jax.keymaps.discriminator`).


def _abstract_variables(model: NLayerDiscriminator) -> Dict[str, Any]:
  size = 4 * 2 ** model.n_layers
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, size, size, model.input_nc))))


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           prefix: str = "loss.discriminator.",
                           model: Optional[NLayerDiscriminator] = None,
                           dtype: Any = jnp.float32) -> Dict[str, Any]:
  """Converts a reference ``NLayerDiscriminator`` state dict.

  Args:
    state_dict: flat ``{name: array}``; keys outside ``prefix`` are ignored
      (a whole VQGAN checkpoint state dict may be passed).
    prefix: prefix of the discriminator entries.
    model: the architecture to check against; inferred from the keys when
      omitted (see :func:`discriminator_from_state_dict`).
    dtype: dtype of the returned parameters (statistics stay float32).

  Returns:
    ``{'params': ..., 'batch_stats': ...}``.

  Raises:
    ValueError: missing or unexpected keys or shape mismatches, each named.
  """
  if model is None:
    model = NLayerDiscriminator(
        **keymaps.discriminator.config_from_state_dict(state_dict, prefix))
  arch = (f"NLayerDiscriminator(input_nc={model.input_nc}, "
          f"ndf={model.ndf}, n_layers={model.n_layers}, "
          f"use_actnorm={model.use_actnorm})")
  return keymaps.discriminator.variables_from_state_dict(
      state_dict, _abstract_variables(model), prefix=prefix, what=arch,
      dtype=dtype)


def discriminator_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                  prefix: str = "loss.discriminator.",
                                  dtype: Any = jnp.float32
                                  ) -> Tuple[NLayerDiscriminator,
                                             Dict[str, Any]]:
  """Infers the architecture from a reference state dict and converts it.

  Args:
    state_dict: flat ``{name: array}``.
    prefix: prefix of the discriminator entries.
    dtype: computation and parameter dtype.

  Returns:
    ``(model, variables)``.
  """
  model = NLayerDiscriminator(
      **keymaps.discriminator.config_from_state_dict(state_dict, prefix))
  model = model.clone(dtype=dtype, param_dtype=dtype)
  return model, params_from_state_dict(state_dict, prefix, model, dtype)
