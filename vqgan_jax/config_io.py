"""Module configs as JSON-able dicts (for model.json) and back."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax.numpy as jnp

_DTYPE_FIELDS = ("dtype", "param_dtype")


def _jsonable(v):
  """Tuples as lists and mappings (e.g. FrozenDict) as dicts, recursively."""
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  if hasattr(v, "items"):
    return {k: _jsonable(x) for k, x in v.items()}
  return v


def to_config(module) -> Dict[str, Any]:
  """The dataclass fields of a Flax module, dtypes as names, tuples as lists,
  mappings as dicts."""
  out = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    v = getattr(module, f.name)
    if f.name in _DTYPE_FIELDS:
      v = jnp.dtype(v).name
    else:
      v = _jsonable(v)
    out[f.name] = v
  return out


def from_config(cls, config: Dict[str, Any], **overrides):
  """Builds ``cls`` from :func:`to_config`'s output, checking field names."""
  cfg = dict(config)
  cfg.update({k: v for k, v in overrides.items() if v is not None})
  fields = {f.name: f for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}
  unknown = sorted(set(cfg) - set(fields))
  if unknown:
    raise ValueError(f"unknown {cls.__name__} config fields {unknown}; "
                     f"known: {sorted(fields)}")
  for k, v in list(cfg.items()):
    if k in _DTYPE_FIELDS and isinstance(v, str):
      cfg[k] = jnp.dtype(v)
    elif isinstance(v, list):
      cfg[k] = tuple(v)
  return cls(**cfg)
