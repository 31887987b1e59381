"""Checks of the checkpoints a config names (``init_from``,
``vqgan_workdir``, ``conditioning.cond_vqgan_workdir``): they exist, hold a
VQGAN, and (for ``init_from``) one of the configured architecture.

The schema (:mod:`vqgan_jax.training.schema`) calls these after the values'
own checks; errors are :class:`schema.ConfigError`, one line each.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from vqgan_jax.training import schema


def read_vqgan_info(field: str, path: str) -> Dict[str, Any]:
  """``model.json`` of a VQGAN directory (a transformer's ``vqgan/`` too)."""
  from vqgan_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise schema.ConfigError(f"config.{field}={path} does not exist; point it to a "
                      "stage-1 workdir or a directory written by `python -m "
                      "vqgan_jax.convert`")
  try:
    info = ckpt_lib.read_model_json(path)
  except (ValueError, FileNotFoundError) as e:
    raise schema.ConfigError(f"config.{field}={path}: {e}") from None
  if info.get("kind") != "vqgan" and os.path.isdir(os.path.join(path, "vqgan")):
    return read_vqgan_info(field, os.path.join(path, "vqgan"))
  if info.get("kind") != "vqgan":
    raise schema.ConfigError(f"config.{field}={path} holds a {info.get('kind')!r} "
                      "model, not a 'vqgan'; point it to a stage-1 workdir")
  if not (os.path.isdir(os.path.join(path, "params")) or
          os.path.isdir(os.path.join(path, ckpt_lib.CHECKPOINTS_DIR))):
    raise schema.ConfigError(f"config.{field}={path} has a model.json but neither "
                      "params/ nor checkpoints/; train stage 1 there first")
  return info


def check_init_from(config, have: Optional[Dict[str, Any]] = None,
                    shapes_ok: bool = True) -> None:
  """``config.init_from`` holds a VQGAN of the configured architecture.

  Args:
    config: the stage-1 config.
    have: the checkpoint's model config (read from its ``model.json`` when
      not given).
    shapes_ok: whether the loaded parameters have the shapes of the
      config's (the trainer checks after loading them).
  """
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  if have is None:
    have = read_vqgan_info("init_from", config.init_from)["config"]
  have = dict(have)
  want = vqgan_lib.model_config(vqgan_lib.from_config(config.model.to_dict()))
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  diff = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs config {want[k]!r}"
                   for k in schema.VQGAN_ARCH if norm(have.get(k)) != norm(want[k]))
  if not shapes_ok and not diff:
    diff = "parameter shapes differ"
  if diff:
    raise schema.ConfigError(
        f"config.init_from={config.init_from} holds a different architecture:"
        f" {diff}; set config.model to the checkpoint's values")
