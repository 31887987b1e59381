"""The VQGAN first stage: encoder, quantizer, decoder.

Example::

  model = VQGAN(ch=128, ch_mult=(1, 1, 2, 2, 4), n_embed=16384)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  rec, aux = model.apply(variables, images)             # aux['indices'] (B,16,16)
  codes = model.apply(variables, images, method=model.encode_to_indices)
  images = model.apply(variables, codes, method=model.decode_indices)
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from vqgan_jax import config_io
from vqgan_jax import modules
from vqgan_jax import quantizers

Dtype = Any

def check_quantizer_options(cfg) -> None:
  """The config check of the quantizer: raises a one-line ValueError naming
  the field and a fix for an unknown ``quantizer``, an option its family
  does not declare, an impossible value (the family's own check), or a
  quantizer option set as a model field (its place is
  ``config.model.quantizer_options.FAMILY``).

  Args:
    cfg: a model config mapping (``config.model``) or a :class:`VQGAN`.
  """
  get = (lambda k, d=None: cfg.get(k, d)) if hasattr(cfg, "get") else (
      lambda k, d=None: getattr(cfg, k, d))
  kind = get("quantizer")
  flat = quantizers.flat_fields()
  moved = sorted(k for k in (cfg.keys() if hasattr(cfg, "keys") else ())
                 if k in flat)
  if moved:
    k = moved[0]
    family = kind if kind in flat[k] else next(iter(flat[k]))
    raise ValueError(
        f"config.model.{k} is now {quantizers.options_path(family)}."
        f"{flat[k][family]}; set it there")
  options = get("quantizer_options")
  quantizers.check(kind, options.to_dict() if hasattr(options, "to_dict")
                   else options or {}, get("n_embed"))


class VQGAN(nn.Module):
  """VQModel / GumbelVQ of the reference, in Flax.

  The first eleven fields mirror the reference ``ddconfig`` plus
  ``n_embed``/``embed_dim``. ``dtype`` is the compute dtype of the
  convolutions (``jnp.bfloat16`` for mixed precision), ``param_dtype`` that
  of the parameters; quantizer distances and losses are float32 always.

  Attributes:
    quantizer: the quantizer family, a name of ``quantizers.REGISTRY``:
      ``'vq'`` (VectorQuantizer2 of the reference), ``'gumbel'`` (GumbelVQ),
      ``'fsq'`` or ``'lfq'``.
    quantizer_options: that family's options (``quantizers.vq.OPTIONS`` and
      so on; missing ones take their defaults, which are the reference's).
      Also accepted: the config's form ``{family: options}``, of which the
      chosen family's are kept. Stored as a hashable FrozenDict.
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
  quantizer_options: Mapping[str, Any] = FrozenDict()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    # A hashable, complete copy of the options (Flax hashes module fields).
    object.__setattr__(self, "quantizer_options", quantizers.resolve(
        self.quantizer, self.quantizer_options))
    super().__post_init__()

  def setup(self):
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
    self.quantize = quantizers.build(self.quantizer, self.n_embed,
                                     self.embed_dim, self.quantizer_options,
                                     **kw)

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
  """Builds a VQGAN from :func:`model_config`'s output, also that of a
  ``model.json`` written before the quantizer options were grouped in
  ``quantizer_options`` (see :func:`quantizers.from_flat`)."""
  return config_io.from_config(VQGAN, quantizers.from_flat(config),
                               **overrides)


def init_variables(model: VQGAN, rng, image_shape: Optional[Tuple[int, ...]] = None):
  """Initialises parameters for a (1, resolution, resolution, in_channels) input."""
  shape = image_shape or (1, model.resolution, model.resolution,
                          model.in_channels)
  return model.init({"params": rng, "gumbel": rng}, jnp.zeros(shape, jnp.float32))
