"""Imports the reference (taming-transformers) on any torch stack we run on.

The development machine has the reference's era of dependencies
(pytorch-lightning 1.9, transformers 4.38) next to a CPU torch whose
torchvision extension does not load; the GPU image has working torchvision
but pytorch-lightning 2.x and transformers 5.x, which dropped two names the
reference imports. :func:`reference` makes both work without touching the
installed packages:

* torchvision: `vqgan_jax_testing.oracle` defines the ``torchvision::nms`` schemas
  before torchvision imports (needed where its ``_C`` extension fails to
  load). Where the extension does load, we load it first, so the real schemas
  exist and the oracle's definitions are skipped.
* ``pytorch_lightning.utilities.distributed.rank_zero_only`` (removed in
  Lightning 2): an alias of ``pytorch_lightning.utilities.rank_zero``'s.
* ``transformers.top_k_top_p_filtering`` (removed in transformers 4.40):
  :func:`top_k_top_p_filtering` below, the same top-k then nucleus filter.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import types

from vqgan_jax_testing import oracle

def _load_torchvision_ops(torch) -> bool:
  """Loads torchvision's compiled ops if they load; False where they don't."""
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    return False
  libs = []
  for d in spec.submodule_search_locations:
    libs += glob.glob(os.path.join(d, "_C.so")) + glob.glob(
        os.path.join(d, "_C.*.so")) + glob.glob(os.path.join(d, "_C.pyd"))
  for lib in libs:
    try:
      torch.ops.load_library(lib)
      return True
    except (OSError, RuntimeError):
      pass
  return False


def top_k_top_p_filtering(logits, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf"),
                          min_tokens_to_keep: int = 1):
  """Top-k then nucleus filtering of (B, V) torch logits.

  Keeps the ``top_k`` largest logits (when ``top_k`` > 0); then, in
  ascending order of probability, removes the tokens whose cumulative
  probability is <= 1 - ``top_p``, keeping at least ``min_tokens_to_keep``.
  Removed logits become ``filter_value``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  if top_k > 0:
    k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
    kth = torch.topk(logits, k)[0][..., -1, None]
    logits = logits.masked_fill(logits < kth, filter_value)
  if 0 <= top_p <= 1.0:
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    logits = logits.masked_fill(remove, filter_value)
  return logits


def _patch_lightning() -> None:
  try:
    importlib.import_module("pytorch_lightning.utilities.distributed")
    return
  except ImportError:
    pass
  rank_zero = importlib.import_module("pytorch_lightning.utilities.rank_zero")
  shim = types.ModuleType("pytorch_lightning.utilities.distributed")
  shim.rank_zero_only = rank_zero.rank_zero_only
  sys.modules[shim.__name__] = shim
  setattr(importlib.import_module("pytorch_lightning.utilities"),
          "distributed", shim)


def _patch_transformers() -> None:
  try:
    transformers = importlib.import_module("transformers")
  except ImportError:
    transformers = types.ModuleType("transformers")
    sys.modules["transformers"] = transformers
  try:
    getattr(transformers, "top_k_top_p_filtering")
  except (AttributeError, ImportError, RuntimeError):
    transformers.top_k_top_p_filtering = top_k_top_p_filtering


def torch_with_torchvision():
  """torch, with torchvision importable (its ops or the oracle's schemas)."""
  import torch  # pylint: disable=import-outside-toplevel
  if _load_torchvision_ops(torch):
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  return oracle.torch()


def reference():
  """Returns ``(torch, taming)`` with the reference's modules importable."""
  torch = torch_with_torchvision()
  _patch_lightning()
  _patch_transformers()
  taming = oracle.taming()
  importlib.import_module("taming.modules.transformer.mingpt")
  return torch, taming
