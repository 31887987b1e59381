"""Exports stage-2 models to taming-transformers' Net2NetTransformer.

The stage-2 half of :mod:`vqgan_jax.export` (which has the format, what maps
and the command line): the GPT becomes minGPT's ``transformer.*``, the first
stage and a conditioning VQGAN are written by
:func:`vqgan_jax.export.first_stage_reference`, and the conditioning and
permuter become the reference's ``cond_stage_config`` / ``permuter_config``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vqgan_jax import checkpoint
from vqgan_jax import keymaps
from vqgan_jax.export import (VQ_TARGET, Exported, ExportError,
                              first_stage_reference, write_files)

GPT_TARGET = "taming.modules.transformer.mingpt.GPT"
TRANSFORMER_TARGET = "taming.models.cond_transformer.Net2NetTransformer"


def _resolve(base: str, path: Optional[str], default: str) -> str:
  if not path:
    return os.path.join(base, default)
  return path if os.path.isabs(path) else os.path.join(base, path)


def gpt_reference(gpt) -> Dict[str, Any]:
  """The ``transformer_config`` of a :class:`vqgan_jax.GPT`.

  Raises:
    ExportError: an architecture option minGPT does not have.
  """
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  for name in ("norm", "mlp", "position_embedding"):
    value, ref = getattr(gpt, name), gpt_lib.OPTIONS[name].default
    if value != ref:
      raise ExportError(f"gpt.{name}={value!r} has no equivalent in the "
                        f"reference's minGPT (which has {name}={ref!r})")
  params = {k: int(getattr(gpt, k)) for k in (
      "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_unmasked")}
  params.update({k: float(getattr(gpt, k)) for k in (
      "embd_pdrop", "resid_pdrop", "attn_pdrop")})
  return {"target": GPT_TARGET, "params": params}


def _morton(i: int, j: int) -> int:
  return sum((((j >> b) & 1) << (2 * b)) | (((i >> b) & 1) << (2 * b + 1))
             for b in range(16))


def _permuter(name: str, grid) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  if name == "identity":
    return {"target": "taming.modules.transformer.permuter.Identity"}, {}
  if name == "zcurve":
    h, w = (int(g) for g in grid)
    keys = np.array([_morton(i, j) for i in range(h) for j in range(w)],
                    np.int64)
    return ({"target": "taming.modules.transformer.permuter.ZCurve",
             "params": {"H": h, "W": w}},
            {"permuter.forward_shuffle_idx": np.argsort(keys, kind="stable"),
             "permuter.backward_shuffle_idx": keys})
  raise ExportError(f"permuter={name!r} has no equivalent among the "
                    "reference's permuters; export an 'identity' or "
                    "'zcurve' model")


def _stage2_source(path: str, use_ema: bool):
  from vqgan_jax import config_io  # pylint: disable=g-import-not-at-top
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  info, variables = checkpoint.load_variables(path, "transformer",
                                              use_ema=use_ema)
  gpt = config_io.from_config(gpt_lib.GPT, info["config"])
  vq_dir = _resolve(path, info.get("vqgan"), "vqgan")
  cond = dict(info.get("conditioning") or {"kind": "sos"})
  cond_vqgan = None
  if cond.get("kind") == "codes":
    c_dir = _resolve(path, cond.get("cond_vqgan"), "cond_vqgan")
    if os.path.realpath(c_dir) != os.path.realpath(vq_dir):
      cond_vqgan = checkpoint.load_vqgan(c_dir, use_ema=use_ema)
  pkeep = (info.get("train_config") or {}).get("pkeep", 1.0)
  return (gpt, variables, checkpoint.load_vqgan(vq_dir, use_ema=use_ema),
          cond, cond_vqgan, info.get("permuter", "identity"),
          info.get("image_grid"), int(info.get("step", 0)), pkeep)


def _cond_stage(cond, cond_vqgan, notes) -> Tuple[Dict, Dict, Any]:
  """``(Net2NetTransformer params, cond_stage_model.* weights, first-stage
  quirk)`` of a conditioning."""
  kind = cond.get("kind", "sos")
  if kind == "sos":
    return ({"cond_stage_config": "__is_unconditional__",
             "sos_token": int(cond.get("sos_token", 0))}, {}, None)
  if kind == "class":
    if cond.get("null_token") is not None:
      notes.append(f"conditioning.null_token={cond['null_token']} (the "
                   "classifier-free guidance token; its weights are kept)")
    return ({"cond_stage_config": {"target": "taming.modules.util.Labelator",
                                   "params": {"n_classes":
                                              int(cond["num_classes"])}},
             "cond_stage_key": "class_label"}, {}, None)
  if kind == "coord":
    if "n_embed" not in cond or "down_factor" not in cond:
      raise ExportError("conditioning.kind='coord' without n_embed and "
                        "down_factor has no CoordStage equivalent")
    return ({"cond_stage_config": {
        "target": "taming.modules.misc.coord.CoordStage",
        "params": {"n_embed": int(cond["n_embed"]),
                   "down_factor": int(cond["down_factor"])}},
             "cond_stage_key": "coord"}, {}, None)
  if kind == "codes":
    transform = cond.get("cond_transform", "identity")
    if transform != "identity":
      raise ExportError(f"conditioning.cond_transform={transform!r} has no "
                        "equivalent in Net2NetTransformer")
    if cond_vqgan is None:
      return {"cond_stage_config": "__is_first_stage__"}, {}, "sane"
    c_cfg, c_sd, c_notes = first_stage_reference(cond_vqgan[0],
                                                 cond_vqgan[1]["params"])
    notes.extend(c_notes)
    if c_cfg["target"] == VQ_TARGET:  # (B, h, w) indices, as the prefix needs
      c_cfg["params"]["sane_index_shape"] = True
    return ({"cond_stage_config": c_cfg},
            {"cond_stage_model." + k: v for k, v in c_sd.items()}, None)
  raise ExportError(f"conditioning.kind={kind!r} has no equivalent in "
                    "Net2NetTransformer")


def export_taming_transformer(source, out_dir, *, variables=None, vqgan=None,
                              conditioning=None, cond_vqgan=None,
                              permuter: str = "identity", image_grid=None,
                              pkeep: float = 1.0, use_ema: bool = True,
                              global_step: Optional[int] = None,
                              epoch: int = 0, overwrite: bool = False
                              ) -> Exported:
  """Writes a stage-2 model as a taming-transformers Net2NetTransformer.

  The checkpoint holds ``transformer.*`` (minGPT, with its mask buffers),
  ``first_stage_model.*``, ``cond_stage_model.*`` for a conditioning VQGAN
  and ``permuter.*`` for the z-curve; the YAML its ``transformer_config``,
  ``first_stage_config`` (a DummyLoss, as the releases), ``cond_stage_config``
  (``__is_unconditional__`` with ``sos_token``, ``Labelator``,
  ``CoordStage``, ``__is_first_stage__`` or a VQModel) and
  ``permuter_config``.

  Args:
    source: a stage-2 training workdir or converted directory, or a
      :class:`vqgan_jax.GPT` (then pass ``variables``, ``vqgan``,
      ``conditioning`` and, for the z-curve, ``image_grid``).
    out_dir: where ``checkpoints/last.ckpt`` and ``configs/model.yaml`` go.
    variables: ``{'params': ...}`` of a GPT ``source``.
    vqgan: ``(model, variables)`` of the first stage.
    conditioning: as ``model.json`` records it (``{'kind': 'class',
      'num_classes': 10}``, ``{'kind': 'sos', 'sos_token': 0}``, ...).
    cond_vqgan: ``(model, variables)`` of a ``'codes'`` conditioning's
      VQGAN; None when it is the first stage.
    permuter: ``'identity'`` or ``'zcurve'``.
    image_grid: the image token grid (h, w).
    pkeep: the training input-noise keep rate, for the YAML.
    use_ema: a workdir's EMA parameters when it keeps them.
    global_step, epoch: the checkpoint's counters (default: the step).
    overwrite: replace files in ``out_dir``.

  Returns:
    :class:`Exported`.

  Raises:
    ExportError: an option with no Net2NetTransformer equivalent, or
      existing output files.
  """
  step = 0
  if isinstance(source, (str, os.PathLike)):
    path = os.path.abspath(os.fspath(source))
    if not os.path.isdir(path):
      raise checkpoint.CheckpointNotFoundError(f"no such directory: {path}")
    (gpt, variables, vqgan, conditioning, cond_vqgan, permuter, image_grid,
     step, pkeep) = _stage2_source(path, use_ema)
  else:
    gpt = source
    if variables is None or vqgan is None or conditioning is None:
      raise ValueError("export_taming_transformer(gpt, ...) needs "
                       "variables=, vqgan= and conditioning=")
  notes: List[str] = []
  transformer_config = gpt_reference(gpt)
  cond_params, sd, quirk = _cond_stage(conditioning, cond_vqgan, notes)
  first_cfg, first_sd, first_notes = first_stage_reference(vqgan[0],
                                                       vqgan[1]["params"])
  if quirk and first_cfg["target"] == VQ_TARGET:
    first_cfg["params"]["sane_index_shape"] = True
  if image_grid is None:
    f = 2 ** (len(vqgan[0].ch_mult) - 1)
    image_grid = (vqgan[0].resolution // f,) * 2
  perm_cfg, perm_sd = _permuter(permuter, image_grid)
  sd.update({"first_stage_model." + k: v for k, v in first_sd.items()})
  sd.update(perm_sd)
  sd.update(keymaps.gpt.state_dict_from_params(
      variables["params"], prefix="transformer.",
      n_unmasked=int(gpt.n_unmasked)))
  params = {"transformer_config": transformer_config,
            "first_stage_config": first_cfg, **cond_params,
            "permuter_config": perm_cfg, "first_stage_key": "image",
            "pkeep": float(pkeep)}
  return write_files(out_dir, {"target": TRANSFORMER_TARGET, "params": params},
                     sd, step if global_step is None else global_step, epoch,
                     first_notes + notes, overwrite)
