"""Quantizers: pure functions, thin Flax modules, and a registry of families.

Families (one module each, each declaring its options, their check and how
its module is built, see :class:`registry.QuantizerSpec`):

* ``vq`` (:mod:`.vq`): nearest code; the reference's VectorQuantizer2 and,
  with options, factorised/l2 codes, EMA codebook, dead-code restart.
* ``gumbel`` (:mod:`.gumbel`): the reference's Gumbel-softmax quantizer.
* ``fsq`` (:mod:`.fsq`): finite scalar quantisation.
* ``lfq`` (:mod:`.lfq`): lookup-free quantisation.

Shared helpers (distances, estimators, entropy penalty, usage statistics)
live in :mod:`.common`. Adding a family: a module defining ``SPEC``, one
entry in :data:`REGISTRY`, and its tests; ``config.model.quantizer_options``
then holds its options under its name.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from flax.core import FrozenDict

from vqgan_jax.quantizers import fsq
from vqgan_jax.quantizers import gumbel
from vqgan_jax.quantizers import lfq
from vqgan_jax.quantizers import vq
from vqgan_jax.quantizers.common import (
    GRADIENT_ESTIMATORS, codebook_histogram, codebook_logits, codebook_usage,
    entropy_penalty, gradient_estimator, l2_normalize, lookup_codes,
    nearest_code, perplexity, rotation_trick, squared_distances,
    straight_through)
from vqgan_jax.quantizers.fsq import (
    FSQuantizer, fsq_bound, fsq_codes_to_indices, fsq_indices_to_codes,
    fsq_quantize, round_ste)
from vqgan_jax.quantizers.gumbel import GumbelQuantizer, gumbel_quantize
from vqgan_jax.quantizers.lfq import (
    LookupFreeQuantizer, lfq_codebook, lfq_indices_to_codes, lfq_quantize)
from vqgan_jax.quantizers.registry import QuantizerSpec
from vqgan_jax.quantizers.vq import (
    CODEBOOK_UPDATES, FactorizedQuantizer, VectorQuantizer, ema_codebook_update,
    ema_stats_from_params, vector_quantize, vq_loss, with_ema_codebooks)

__all__ = [
    "QuantizerSpec", "REGISTRY", "names", "options_path", "config_defaults",
    "resolve", "check", "build", "flat_fields", "from_flat",
    "GRADIENT_ESTIMATORS", "CODEBOOK_UPDATES", "squared_distances",
    "nearest_code", "lookup_codes", "straight_through", "rotation_trick",
    "gradient_estimator", "l2_normalize", "entropy_penalty", "codebook_logits",
    "codebook_histogram", "codebook_usage", "perplexity", "vq_loss",
    "vector_quantize", "VectorQuantizer", "FactorizedQuantizer",
    "ema_codebook_update", "with_ema_codebooks", "ema_stats_from_params",
    "gumbel_quantize", "GumbelQuantizer", "fsq_bound", "round_ste",
    "fsq_codes_to_indices", "fsq_indices_to_codes", "fsq_quantize",
    "FSQuantizer", "lfq_indices_to_codes", "lfq_codebook", "lfq_quantize",
    "LookupFreeQuantizer",
]

REGISTRY: Dict[str, QuantizerSpec] = {
    s.name: s for s in (vq.SPEC, gumbel.SPEC, fsq.SPEC, lfq.SPEC)}
"""Family name (``VQGAN.quantizer``) -> its spec."""

assert not {o for s in REGISTRY.values() for o in s.options} & set(REGISTRY), (
    "an option may not be named like a family: the config form "
    "{family: options} is told apart from one family's options by its keys")


def names() -> Tuple[str, ...]:
  """The registered family names."""
  return tuple(REGISTRY)


def options_path(kind: str) -> str:
  """Where the options of family ``kind`` sit in a training config."""
  return f"config.model.quantizer_options.{kind}"


def config_defaults() -> Dict[str, Dict[str, Any]]:
  """``{family: {option: default}}``: ``config.model.quantizer_options``."""
  return {name: dict(s.options) for name, s in REGISTRY.items()}


def _frozen(v):
  if isinstance(v, list):
    return tuple(_frozen(x) for x in v)
  return v


def resolve(kind: str, options: Mapping[str, Any]) -> FrozenDict:
  """The complete, hashable options of family ``kind``.

  Args:
    kind: a family name; an unknown one returns ``options`` frozen as given.
    options: that family's options (missing ones take their defaults), or the
      config's form ``{family: options}``, of which ``kind``'s are taken.

  Returns:
    A FrozenDict, lists turned to tuples. Names the family does not declare
    are kept, for :func:`check` to report.
  """
  options = dict(options or {})
  if options and set(options) <= set(REGISTRY) and all(
      hasattr(v, "items") for v in options.values()):
    options = dict(options.get(kind) or {})
  spec = REGISTRY.get(kind)
  full = dict(spec.options) if spec else {}
  full.update(options)
  return FrozenDict({k: _frozen(v) for k, v in full.items()})


def check(kind: str, options: Mapping[str, Any], n_embed: int) -> None:
  """Raises a one-line ValueError naming the config field and a fix for an
  unknown family, an option it does not declare, or an impossible value.
  ``options`` as for :func:`resolve`."""
  if kind not in REGISTRY:
    raise ValueError(f"config.model.quantizer={kind!r}; valid: {names()}")
  spec, options = REGISTRY[kind], resolve(kind, options)
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    others = sorted(n for n, s in REGISTRY.items() if unknown[0] in s.options)
    where = (f"; it is an option of {others}" if others else "")
    raise ValueError(
        f"{options_path(kind)}.{unknown[0]} is not an option of quantizer="
        f"{kind!r}{where}; its options: {sorted(spec.options)}")
  spec.check(options, n_embed, options_path(kind))


def build(kind: str, n_embed: int, embed_dim: int, options: Mapping[str, Any],
          dtype, param_dtype):
  """The Flax quantizer module of family ``kind`` (checked options)."""
  check(kind, options, n_embed)
  return REGISTRY[kind].build(n_embed, embed_dim, resolve(kind, options),
                              dtype, param_dtype)


def flat_fields() -> Dict[str, Dict[str, str]]:
  """Model fields that held quantizer options before they were grouped in
  ``quantizer_options``: ``{field: {family: option}}``."""
  out: Dict[str, Dict[str, str]] = {}
  for name, spec in REGISTRY.items():
    for field, option in spec.flat_to_option().items():
      out.setdefault(field, {})[name] = option
  return out


def from_flat(config: Mapping[str, Any]) -> Dict[str, Any]:
  """A model config with the quantizer options of an older ``model.json``
  (flat model fields such as ``codebook_update``, ``fsq_levels``) moved into
  ``quantizer_options``; fields of other families than ``config['quantizer']``
  are dropped (those models ignored them). Other configs are returned as
  they are."""
  flat = flat_fields()
  if not set(config) & set(flat):
    return dict(config)
  out = {k: v for k, v in config.items() if k not in flat}
  kind = config.get("quantizer", "vq")
  options = dict(resolve(kind, config.get("quantizer_options") or {}))
  for field, families in flat.items():
    if field in config and kind in families:
      options[families[kind]] = config[field]
  out["quantizer_options"] = options
  return out
