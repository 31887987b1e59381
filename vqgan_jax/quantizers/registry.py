"""What a quantizer family declares: its options, their check, its module.

Each family module (``vq.py``, ``gumbel.py``, ...) defines one
:class:`QuantizerSpec` named ``SPEC``; ``vqgan_jax.quantizers`` lists them in
its ``REGISTRY``. The VQGAN builds its quantizer from the spec of
``VQGAN.quantizer`` and ``VQGAN.quantizer_options``; the training config
holds each family's options under ``config.model.quantizer_options.NAME``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """A quantizer family.

  Attributes:
    name: the value of ``VQGAN.quantizer`` / ``config.model.quantizer``.
    options: every option of the family and its default (hashable values:
      tuples, not lists).
    check: ``check(options, n_embed, path)`` raises a one-line ValueError
      naming ``{path}.OPTION``, the value and the fix; ``options`` is
      complete (defaults filled in) and holds no unknown names.
    build: ``build(n_embed, embed_dim, options, dtype, param_dtype)`` returns
      the Flax module, called ``(z, train=...) -> (z_q, loss, indices)`` and
      with a ``lookup(indices)`` method.
    flat_names: model fields of ``model.json`` files written before the
      options were grouped, mapped to the option they now are (an option
      not listed kept its name).
  """
  name: str
  options: Mapping[str, Any]
  check: Callable[[Mapping[str, Any], int, str], None]
  build: Callable[..., nn.Module]
  flat_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def flat_to_option(self) -> Mapping[str, str]:
    """Old flat model field -> option, for every option of the family."""
    inverse = {new: old for old, new in self.flat_names.items()}
    return {inverse.get(k, k): k for k in self.options}
