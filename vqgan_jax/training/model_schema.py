"""The stage-1 model section of the training config: ``config.model``'s
fields with their domains, the quantizer families' options, and the checks
between them (GroupNorm widths, downsampling, attention resolutions, the
quantizer's options, an EMA restart threshold the batch can meet).

`schema.py` builds the whole config from :func:`model_fields` and runs these
checks in ``check_vqgan``; every name here is also importable from there.
Importing this module imports neither JAX nor TensorFlow.
"""
from __future__ import annotations

from vqgan_jax.training.domains import (
    ConfigError, as_config_error, boolean, fraction, int_at_least, nonneg,
    nonneg_int, one_of, open_unit, positive, positive_int, tuple_of)

DTYPES = ("float32", "bfloat16", "float16")

GROUPNORM_GROUPS = 32  # modules.Normalize

# config.model fields that make another model: a workdir or init_from
# checkpoint with other values is refused.
VQGAN_ARCH = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "in_channels", "resolution", "z_channels", "n_embed",
              "embed_dim", "quantizer")


def model_fields():
  """The reference's ImageNet f16 VQGAN at 256x256."""
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top
  return dict(
      ch=(128, positive_int()), out_ch=(3, positive_int()),
      ch_mult=((1, 1, 2, 2, 4), tuple_of(positive_int(), nonempty=True)),
      num_res_blocks=(2, positive_int()),
      attn_resolutions=((16,), tuple_of(positive_int())),
      dropout=(0.0, fraction()),
      in_channels=(3, one_of(1, 3, note="the data pipeline gives 1 "
                                        "(grayscale) or 3 (RGB) channels")),
      resolution=(256, positive_int()),
      z_channels=(256, positive_int()), n_embed=(1024, positive_int()),
      embed_dim=(256, positive_int()),
      # fsq: n_embed = prod of its levels; lfq: n_embed = 2**bits.
      quantizer=("vq", one_of(*quantizers.names())),
      # Each family's options under its name, e.g.
      # --config.model.quantizer_options.vq.codebook_update=ema.
      quantizer_options=_quantizer_fields(),
      dtype=("float32", one_of(*DTYPES)),
      param_dtype=("float32", one_of(*DTYPES)))


def _quantizer_fields():
  """Each family's options; the defaults (the reference's) are its
  ``OPTIONS`` (vqgan_jax/quantizers/<family>.py)."""
  from vqgan_jax import quantizers as q  # pylint: disable=g-import-not-at-top
  entropy = dict(entropy_weight=nonneg("0 = off"),
                 entropy_temperature=positive(),
                 quantizer_grad=one_of(*q.GRADIENT_ESTIMATORS))
  domains = dict(
      vq=dict(beta=nonneg(), legacy_loss=boolean(),
              codebook_dim=nonneg_int("0 = not factorised"),
              l2_codes=boolean(), codebook_update=one_of(*q.CODEBOOK_UPDATES),
              codebook_ema_decay=open_unit(), codebook_ema_eps=positive(),
              dead_code_threshold=nonneg("0 = off"), **entropy),
      gumbel=dict(kl_weight=nonneg(), temperature=positive(),
                  noisy_inference=boolean()),
      fsq=dict(levels=tuple_of(int_at_least(2), nonempty=True), **entropy),
      lfq=dict(beta=nonneg(), **entropy))
  return {kind: {name: (default, domains.get(kind, {}).get(name))
                 for name, default in options.items()}
          for kind, options in q.config_defaults().items()}


def check_model(m) -> None:
  """The stage-1 architecture: GroupNorm widths, downsampling, attention,
  then the quantizer and its options."""
  f = 2**(len(m.ch_mult) - 1)
  widths = [("model.ch", m.ch)] + [(f"model.ch * ch_mult[{i}]", m.ch * k)
                                   for i, k in enumerate(m.ch_mult)]
  for name, ch in widths:
    if ch % GROUPNORM_GROUPS:
      raise ConfigError(
          f"config.{name}={ch} is not divisible by {GROUPNORM_GROUPS}, the "
          f"GroupNorm group count; use a multiple of {GROUPNORM_GROUPS}")
  if m.resolution % f:
    raise ConfigError(
        f"config.model.resolution={m.resolution} is not divisible by the "
        f"downsampling factor {f} (2**(len(ch_mult)-1)); use a multiple of "
        f"{f}")
  reached = {m.resolution // 2**i for i in range(len(m.ch_mult))}
  never = sorted(set(m.attn_resolutions) - reached)
  if never:
    raise ConfigError(
        f"config.model.attn_resolutions contains {never}, never reached; "
        f"reached resolutions are {sorted(reached)}")
  check_quantizer(m)


def check_restart_threshold(config) -> None:
  """An EMA codebook's dead-code threshold that the batch can satisfy.

  Each step quantizes ``V = batch_size * (resolution / f)**2`` vectors, and
  the codes' EMA counts sum to about ``V``; so at most ``V / threshold``
  codes can hold a count of ``threshold``. Above ``V / n_embed`` most codes
  are restarted every step, on vectors of that one batch, whatever the
  data. (An f8 VQGAN with 4096 codes at batch 16 on 32 px photo crops, 256
  vectors a step, 600 steps: threshold 1.0 used 7% of its codes on held-out
  tiles, 0.0625 used 18%; docs/features.md.) Checked where the quantizer
  family has the option and updates its codebook by EMA.
  """
  m = config.model
  options = m.quantizer_options.get(m.quantizer)
  if options is None or "dead_code_threshold" not in options:
    return
  threshold = options["dead_code_threshold"]
  if options.get("codebook_update") != "ema" or not threshold:
    return
  side = m.resolution // 2**(len(m.ch_mult) - 1)
  vectors = config.batch_size * side * side
  if threshold * m.n_embed > vectors:
    path = f"config.model.quantizer_options.{m.quantizer}.dead_code_threshold"
    raise ConfigError(
        f"{path}={threshold}: a step quantizes {vectors} vectors "
        f"(batch {config.batch_size} x {side}x{side}), so at most "
        f"{int(vectors // threshold)} of the {m.n_embed} codes can keep an EMA "
        f"count of {threshold} and the rest restart every step; set it to at "
        f"most {vectors / m.n_embed:g} (vectors per step / n_embed), or raise "
        "config.batch_size, or lower config.model.n_embed")


def check_quantizer(m) -> None:
  """The quantizer name and options (the model library's own check)."""
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  with as_config_error():
    vqgan_lib.check_quantizer_options(m)
