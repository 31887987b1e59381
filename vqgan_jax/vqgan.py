"""The VQGAN first stage: encoder, quantizer, decoder.

Example::

  model = VQGAN(ch=128, ch_mult=(1, 1, 2, 2, 4), n_embed=16384)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  rec, aux = model.apply(variables, images)             # aux['indices'] (B,16,16)
  codes = model.apply(variables, images, method=model.encode_to_indices)
  images = model.apply(variables, codes, method=model.decode_indices)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import config_io
from vqgan_jax import modules
from vqgan_jax import quantizers

Dtype = Any

QUANTIZERS = ("vq", "gumbel", "fsq", "lfq")

# Quantizer options beyond the reference and their defaults, which
# keep the reference's VectorQuantizer (same parameters, same outputs).
QUANTIZER_OPTION_DEFAULTS = dict(
    codebook_dim=0, l2_codes=False, codebook_update="loss",
    codebook_ema_decay=0.99, codebook_ema_eps=1e-5, dead_code_threshold=0.0,
    entropy_weight=0.0, entropy_temperature=0.01, quantizer_grad="ste")


def check_quantizer_options(cfg) -> None:
  """Raises a ValueError naming the field and a fix for an impossible
  quantizer choice; ``cfg`` is a model config mapping or a :class:`VQGAN`."""
  get = (lambda k, d=None: cfg.get(k, d)) if hasattr(cfg, "get") else (
      lambda k, d=None: getattr(cfg, k, d))
  kind, n = get("quantizer"), get("n_embed")
  if kind not in QUANTIZERS:
    raise ValueError(f"config.model.quantizer={kind!r}; valid: {QUANTIZERS}")
  grad = get("quantizer_grad", "ste")
  if grad not in quantizers.GRADIENT_ESTIMATORS:
    raise ValueError(f"config.model.quantizer_grad={grad!r}; valid: "
                     f"{quantizers.GRADIENT_ESTIMATORS}")
  update = get("codebook_update", "loss")
  if update not in quantizers.CODEBOOK_UPDATES:
    raise ValueError(f"config.model.codebook_update={update!r}; valid: "
                     f"{quantizers.CODEBOOK_UPDATES}")
  if kind == "gumbel":
    changed = sorted(k for k, d in QUANTIZER_OPTION_DEFAULTS.items()
                     if get(k, d) != d)
    if changed:
      raise ValueError(f"config.model.{changed[0]} is an option of the 'vq', "
                       "'fsq' and 'lfq' quantizers, not 'gumbel'; reset "
                       f"{changed} or choose another quantizer")
  if kind in ("fsq", "lfq"):
    vq_only = [k for k in ("codebook_dim", "l2_codes", "codebook_update",
                           "dead_code_threshold")
               if get(k, QUANTIZER_OPTION_DEFAULTS[k])
               != QUANTIZER_OPTION_DEFAULTS[k]]
    if vq_only:
      raise ValueError(f"config.model.{vq_only[0]} applies to quantizer='vq' "
                       f"only; unset it for quantizer={kind!r}")
  if kind == "fsq":
    levels = list(get("fsq_levels", ()))
    if not levels or int(np.prod(levels)) != n:
      raise ValueError(
          f"config.model.fsq_levels={levels} give {int(np.prod(levels or [0]))}"
          f" codes but config.model.n_embed={n}; set n_embed to the product "
          "of the levels")
  if kind == "lfq" and (n < 2 or n & (n - 1)):
    raise ValueError(f"config.model.n_embed={n} is not a power of two, as "
                     "lookup-free quantisation needs (n_embed = 2**bits)")
  if get("entropy_weight", 0.0) < 0 or get("entropy_temperature", 0.01) <= 0:
    raise ValueError(
        f"config.model.entropy_weight={get('entropy_weight')} / "
        f"entropy_temperature={get('entropy_temperature')}: need a weight "
        ">= 0 (0 = off) and a temperature > 0")
  if get("dead_code_threshold", 0.0) < 0:
    raise ValueError(f"config.model.dead_code_threshold="
                     f"{get('dead_code_threshold')} must be >= 0 (0 = off)")
  if update == "ema" and not 0 < get("codebook_ema_decay", 0.99) < 1:
    raise ValueError("config.model.codebook_ema_decay="
                     f"{get('codebook_ema_decay')} must lie in (0, 1)")


class VQGAN(nn.Module):
  """VQModel / GumbelVQ of the reference, in Flax.

  The first eleven fields mirror the reference ``ddconfig`` plus
  ``n_embed``/``embed_dim``. ``dtype`` is the compute dtype of the
  convolutions (``jnp.bfloat16`` for mixed precision), ``param_dtype`` that
  of the parameters; quantizer distances and losses are float32 always.

  Attributes:
    quantizer: ``'vq'`` (VectorQuantizer2 of the reference) or ``'gumbel'``.
    beta: VQ loss balance.
    legacy_loss: the reference's released VQ loss weighting (beta on the
      codebook term); ``False`` for the corrected form.
    kl_weight: Gumbel KL-to-uniform weight.
    temperature: Gumbel softmax temperature (training).
    gumbel_noisy_inference: reproduce the reference's noisy Gumbel encoding at
      inference (random indices) instead of the argmax of the logits.
    codebook_dim: 'vq' only; > 0 looks codes up in a learned projection of
      this many channels (factorised codes, see
      :class:`quantizers.FactorizedQuantizer`).
    l2_codes: 'vq' only; l2-normalise latents and codes before the lookup.
    codebook_update: 'vq' only; ``'loss'`` (the reference) or ``'ema'``
      (EMA codebook, commitment loss only; state in ``'quantizer_stats'``).
    codebook_ema_decay, codebook_ema_eps: EMA decay and Laplace smoothing.
    dead_code_threshold: EMA count under which a code is restarted from an
      encoder output of the batch (``'ema'`` only; 0 = off).
    entropy_weight, entropy_temperature: weight and softmax temperature of the
      entropy penalty on the code distribution (0 = off).
    fsq_levels: levels of ``quantizer='fsq'`` (``prod == n_embed``).
    quantizer_grad: ``'ste'`` (straight-through) or ``'rotation'``.
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  in_channels: int = 3
  resolution: int = 256
  z_channels: int = 256
  n_embed: int = 1024
  embed_dim: int = 256
  quantizer: str = "vq"
  beta: float = 0.25
  legacy_loss: bool = True
  kl_weight: float = 1e-8
  temperature: float = 1.0
  gumbel_noisy_inference: bool = False
  codebook_dim: int = 0
  l2_codes: bool = False
  codebook_update: str = "loss"
  codebook_ema_decay: float = 0.99
  codebook_ema_eps: float = 1e-5
  dead_code_threshold: float = 0.0
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  fsq_levels: Sequence[int] = (8, 5, 5, 5)
  quantizer_grad: str = "ste"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"VQGAN.quantizer={self.quantizer!r}; valid: {QUANTIZERS}")
    check_quantizer_options(self)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    trunk = dict(ch=self.ch, ch_mult=tuple(self.ch_mult),
                 num_res_blocks=self.num_res_blocks,
                 attn_resolutions=tuple(self.attn_resolutions),
                 resolution=self.resolution, z_channels=self.z_channels,
                 dropout=self.dropout, **kw)
    self.encoder = modules.Encoder(**trunk)
    self.decoder = modules.Decoder(out_ch=self.out_ch, **trunk)
    self.quant_conv = modules._FlatConv(self.embed_dim, 1, padding=0, **kw)
    self.post_quant_conv = modules._FlatConv(self.z_channels, 1, padding=0, **kw)
    if self.quantizer == "vq" and self._reference_vq:
      self.quantize = quantizers.VectorQuantizer(
          self.n_embed, self.embed_dim, beta=self.beta,
          legacy=self.legacy_loss, param_dtype=self.param_dtype)
    elif self.quantizer == "vq":
      self.quantize = quantizers.FactorizedQuantizer(
          self.n_embed, self.embed_dim, code_dim=self.codebook_dim,
          l2=self.l2_codes, update=self.codebook_update, beta=self.beta,
          legacy=self.legacy_loss, ema_decay=self.codebook_ema_decay,
          ema_eps=self.codebook_ema_eps,
          dead_threshold=self.dead_code_threshold,
          entropy_weight=self.entropy_weight,
          entropy_temperature=self.entropy_temperature,
          gradient=self.quantizer_grad, param_dtype=self.param_dtype)
    elif self.quantizer == "fsq":
      self.quantize = quantizers.FSQuantizer(
          tuple(self.fsq_levels), self.embed_dim,
          entropy_weight=self.entropy_weight,
          entropy_temperature=self.entropy_temperature,
          gradient=self.quantizer_grad, param_dtype=self.param_dtype)
    elif self.quantizer == "lfq":
      self.quantize = quantizers.LookupFreeQuantizer(
          self.n_embed.bit_length() - 1, self.embed_dim, beta=self.beta,
          entropy_weight=self.entropy_weight,
          entropy_temperature=self.entropy_temperature,
          gradient=self.quantizer_grad, param_dtype=self.param_dtype)
    else:
      self.quantize = quantizers.GumbelQuantizer(
          self.n_embed, self.embed_dim, kl_weight=self.kl_weight,
          temperature=self.temperature,
          noisy_inference=self.gumbel_noisy_inference, **kw)

  @property
  def _reference_vq(self) -> bool:
    return all(getattr(self, k) == d
               for k, d in QUANTIZER_OPTION_DEFAULTS.items())

  @property
  def downsample_factor(self) -> int:
    return 2**(len(self.ch_mult) - 1)

  def __call__(self, images, train: bool = False
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Reconstructs ``images`` (B, H, W, in_channels).

    Returns:
      ``(reconstruction, aux)``; aux holds ``indices`` (B, h, w) int32,
      ``q_loss`` (float32 scalar) and ``z_q`` (the quantized latents).
    """
    z_q, aux = self.encode(images, train=train)
    return self.decode(z_q, train=train), aux

  def encode_to_prequant(self, images, train: bool = False):
    """Encoder + ``quant_conv``: the continuous latents before quantization."""
    h = self.encoder(images, deterministic=not train)
    return self.quant_conv(h)

  def encode(self, images, train: bool = False):
    """Images -> ``(z_q, aux)``; ``z_q`` float32 with straight-through grads."""
    h = self.encode_to_prequant(images, train=train)
    if self.quantizer == "vq" and self._reference_vq:
      z_q, q_loss, indices = self.quantize(h)
    else:
      z_q, q_loss, indices = self.quantize(h, train=train)
    return z_q, {"indices": indices, "q_loss": q_loss, "z_q": z_q}

  def decode(self, z_q, train: bool = False):
    """Quantized latents (B, h, w, embed_dim) -> images, unclamped."""
    h = self.post_quant_conv(z_q)
    return self.decoder(h, deterministic=not train).astype(jnp.float32)

  def decode_features(self, z_q, train: bool = False):
    """The decoder up to (not including) ``conv_out``.

    ``modules.conv2d(features, kernel, bias)`` with the decoder's
    ``conv_out`` parameters gives the reconstruction; the adaptive GAN weight
    differentiates that last step with respect to the kernel.
    """
    h = self.post_quant_conv(z_q)
    return self.decoder(h, deterministic=not train, features_only=True)

  def encode_to_indices(self, images):
    """Images -> int32 code grid (B, H/f, W/f)."""
    _, aux = self.encode(images)
    return aux["indices"]

  def indices_to_latents(self, indices):
    """int32 code grid -> code vectors (B, h, w, embed_dim), float32."""
    return self.quantize.lookup(indices)

  def decode_indices(self, indices):
    """int32 code grid (B, h, w) -> images (B, h*f, w*f, out_ch), unclamped."""
    return self.decode(self.indices_to_latents(indices))


def model_config(model: VQGAN) -> Dict[str, Any]:
  """The JSON-serialisable fields of a VQGAN (dtypes as names)."""
  return config_io.to_config(model)


def from_config(config: Dict[str, Any], **overrides) -> VQGAN:
  """Builds a VQGAN from :func:`model_config`'s output."""
  return config_io.from_config(VQGAN, config, **overrides)


def init_variables(model: VQGAN, rng, image_shape: Optional[Tuple[int, ...]] = None):
  """Initialises parameters for a (1, resolution, resolution, in_channels) input."""
  shape = image_shape or (1, model.resolution, model.resolution,
                          model.in_channels)
  return model.init({"params": rng, "gumbel": rng}, jnp.zeros(shape, jnp.float32))
