"""Converts the official PyTorch checkpoints (taming-transformers) to Flax.

Library use::

  model, variables = load_taming_vqgan("last.ckpt", "model.yaml")
  gpt, gpt_variables = load_taming_transformer("last.ckpt", "model.yaml")

Command line (writes this project's checkpoint format, loadable with
``vqgan_jax.load_vqgan`` / ``vqgan_jax.load_transformer``)::

  python -m vqgan_jax.convert --checkpoint last.ckpt --config model.yaml \
      --out converted/vqgan_f16_16384

No torch is needed: checkpoints are read with :mod:`vqgan_jax.torch_io`, and
their keys are mapped onto this package's parameters by
:mod:`vqgan_jax.keymaps`.

The other direction, models trained here to the reference's ``.ckpt`` + YAML
(:mod:`vqgan_jax.export`)::

  export_taming_vqgan("runs/vq", "exported/vq")
  export_taming_transformer("runs/gpt", "exported/gpt")
  python -m vqgan_jax.convert export --workdir=runs/vq --out=exported/vq
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from absl import flags

from vqgan_jax import checkpoint
from vqgan_jax import cli
from vqgan_jax import keymaps
from vqgan_jax import torch_io
from vqgan_jax import vqgan as vqgan_lib

VQ_TARGETS = {
    "taming.models.vqgan.VQModel": "vq",
    "taming.models.vqgan.VQSegmentationModel": "vq",
    "taming.models.vqgan.VQNoDiscModel": "vq",
    "taming.models.vqgan.GumbelVQ": "gumbel",
}
TRANSFORMER_TARGET = "taming.models.cond_transformer.Net2NetTransformer"


def export_taming_vqgan(*args, **kwargs):
  """:func:`vqgan_jax.export.export_taming_vqgan` (stage 1 to the reference)."""
  from vqgan_jax import export  # pylint: disable=g-import-not-at-top
  return export.export_taming_vqgan(*args, **kwargs)


def export_taming_transformer(*args, **kwargs):
  """:func:`vqgan_jax.export_transformer.export_taming_transformer`."""
  from vqgan_jax import export_transformer  # pylint: disable=g-import-not-at-top
  return export_transformer.export_taming_transformer(*args, **kwargs)


class ConversionError(ValueError):
  """A checkpoint or config that does not describe the expected model."""


# ----------------------------------------------------------------------------
# Config files


def read_reference_config(config_path: str | os.PathLike) -> Dict[str, Any]:
  """Reads a reference YAML config (``model: {target, params}``)."""
  path = os.fspath(config_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"config file not found: {path} (pass the YAML that was released "
        "next to the checkpoint, e.g. configs/model.yaml)")
  try:
    with open(path) as f:
      cfg = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConversionError(f"{path} is not valid YAML: {e}") from e
  if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or (
      "target" not in cfg["model"]):
    raise ConversionError(
        f"{path} is not a taming-transformers config: expected a top-level "
        "'model' with 'target' and 'params'")
  return cfg


def vqgan_from_reference(model_cfg: Mapping[str, Any], *,
                         dtype=jnp.float32, param_dtype=jnp.float32,
                         noisy_gumbel: bool = False) -> vqgan_lib.VQGAN:
  """Builds a :class:`VQGAN` from a reference ``model`` entry (target+params)."""
  target = model_cfg.get("target")
  if target not in VQ_TARGETS:
    raise ConversionError(
        f"unknown first-stage target {target!r}; supported: "
        f"{sorted(VQ_TARGETS)} (or {TRANSFORMER_TARGET} for its first stage)")
  params = model_cfg.get("params", {})
  try:
    dd = params["ddconfig"]
    n_embed, embed_dim = params["n_embed"], params["embed_dim"]
  except KeyError as e:
    raise ConversionError(f"model.params lacks {e.args[0]!r}") from e
  if dd.get("double_z", False):
    raise ConversionError("ddconfig.double_z=True is not a VQGAN encoder")
  kind = VQ_TARGETS[target]
  extra = {}
  if kind == "gumbel":
    if embed_dim != dd["z_channels"]:
      raise ConversionError(
          f"GumbelVQ needs embed_dim == z_channels, got {embed_dim} and "
          f"{dd['z_channels']}")
    extra = dict(quantizer_options=dict(
        kl_weight=params.get("kl_weight", 1e-8), noisy_inference=noisy_gumbel))
  return vqgan_lib.VQGAN(
      ch=dd["ch"], out_ch=dd["out_ch"], ch_mult=tuple(dd["ch_mult"]),
      num_res_blocks=dd["num_res_blocks"],
      attn_resolutions=tuple(dd["attn_resolutions"]),
      dropout=dd.get("dropout", 0.0), in_channels=dd["in_channels"],
      resolution=dd["resolution"], z_channels=dd["z_channels"],
      n_embed=n_embed, embed_dim=embed_dim, quantizer=kind, dtype=dtype,
      param_dtype=param_dtype, **extra)


# ----------------------------------------------------------------------------
# Loading


def _first_stage_entry(cfg: Dict[str, Any], config_path) -> Tuple[Dict, str]:
  model_cfg = cfg["model"]
  if model_cfg["target"] == TRANSFORMER_TARGET:
    try:
      return model_cfg["params"]["first_stage_config"], "first_stage_model."
    except KeyError as e:
      raise ConversionError(
          f"{config_path}: Net2NetTransformer config lacks "
          "model.params.first_stage_config") from e
  return model_cfg, ""


def _abstract_params(model: vqgan_lib.VQGAN):
  shape = (1, model.resolution, model.resolution, model.in_channels)
  return jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0),
                          "gumbel": jax.random.PRNGKey(0)},
                         jnp.zeros(shape, jnp.float32)))["params"]


def _vqgan_params(state_dict: Mapping[str, np.ndarray],
                  model: vqgan_lib.VQGAN, *, prefix: str,
                  what: str) -> Dict[str, Any]:
  """``model``'s parameters (float32 numpy) from a reference state dict.

  Raises:
    ConversionError: naming the missing keys, the unexpected keys and each
      shape mismatch (:func:`vqgan_jax.keymaps.vqgan.params_from_state_dict`).
  """
  try:
    return keymaps.vqgan.params_from_state_dict(
        state_dict, _abstract_params(model), prefix=prefix, what=what)
  except ValueError as e:
    raise ConversionError(str(e)) from e


def convert_taming_vqgan(checkpoint_path, config_path, *, dtype=jnp.float32,
                         param_dtype=jnp.float32, noisy_gumbel: bool = False,
                         state_dict: Optional[Mapping[str, np.ndarray]] = None
                         ) -> Tuple[vqgan_lib.VQGAN, Dict, Dict[str, Any]]:
  """Like :func:`load_taming_vqgan`, also returning the loss weights.

  Returns:
    ``(model, variables, extras)``; ``extras`` maps ``'discriminator'`` and
    ``'lpips'`` to their Flax variables when the checkpoint holds the
    reference's ``loss.discriminator.*`` / ``loss.perceptual_loss.*``.
  """
  cfg = read_reference_config(config_path)
  entry, prefix = _first_stage_entry(cfg, config_path)
  model = vqgan_from_reference(entry, dtype=dtype, param_dtype=param_dtype,
                               noisy_gumbel=noisy_gumbel)
  if state_dict is None:
    state_dict = torch_io.load_state_dict(checkpoint_path)
  if prefix:  # a transformer checkpoint: skip the GPT and the cond stage
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  params = _vqgan_params(
      state_dict, model, prefix=prefix,
      what=f"checkpoint {os.fspath(checkpoint_path)}")
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
  extras = _loss_extras(state_dict, prefix)
  return model, {"params": params}, extras


def _loss_extras(state_dict, prefix) -> Dict[str, Any]:
  extras = {}
  disc_prefix = prefix + "loss.discriminator."
  if any(k.startswith(disc_prefix) for k in state_dict):
    from vqgan_jax import discriminator  # pylint: disable=g-import-not-at-top
    extras["discriminator"] = discriminator.params_from_state_dict(
        state_dict, prefix=disc_prefix)
  lp_prefix = prefix + "loss.perceptual_loss."
  if any(k.startswith(lp_prefix) for k in state_dict):
    from vqgan_jax import lpips  # pylint: disable=g-import-not-at-top
    extras["lpips"] = lpips.lpips_variables_from_reference(
        state_dict, prefix=lp_prefix)
  return extras


def load_taming_vqgan(checkpoint_path, config_path, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, noisy_gumbel: bool = False
                      ) -> Tuple[vqgan_lib.VQGAN, Dict]:
  """Loads a reference VQModel / GumbelVQ checkpoint as ``(model, variables)``.

  Args:
    checkpoint_path: a reference Lightning ``.ckpt`` (dict with
      ``state_dict``); a Net2NetTransformer checkpoint gives its first stage.
    config_path: the reference YAML released with it.
    dtype: compute dtype of the returned model (float32 by default).
    param_dtype: dtype of the returned parameters.
    noisy_gumbel: GumbelVQ only: reproduce the reference's noisy encoding at
      inference instead of the argmax of the logits.

  Returns:
    ``(model, {'params': ...})``.
  """
  model, variables, _ = convert_taming_vqgan(
      checkpoint_path, config_path, dtype=dtype, param_dtype=param_dtype,
      noisy_gumbel=noisy_gumbel)
  return model, variables


# ----------------------------------------------------------------------------
# Net2NetTransformer

PERMUTER_TARGETS = {
    "taming.modules.transformer.permuter.Identity": "identity",
    "taming.modules.transformer.permuter.ZCurve": "zcurve",
}


def _transformer_params(cfg, config_path) -> Dict[str, Any]:
  model_cfg = cfg["model"]
  if model_cfg["target"] != TRANSFORMER_TARGET:
    raise ConversionError(
        f"{config_path}: model.target is {model_cfg['target']!r}, not "
        f"{TRANSFORMER_TARGET} (use load_taming_vqgan for first stages)")
  params = model_cfg.get("params", {})
  if "transformer_config" not in params:
    raise ConversionError(f"{config_path}: model.params lacks transformer_config")
  return params


def transformer_conditioning(params: Mapping[str, Any]) -> Dict[str, Any]:
  """The conditioning of a reference Net2NetTransformer, in our terms."""
  cond = params.get("cond_stage_config")
  sos = int(params.get("sos_token", 0))
  if params.get("unconditional") or cond == "__is_unconditional__":
    return {"kind": "sos", "sos_token": sos, "cond_len": 1}
  if cond == "__is_first_stage__":
    return {"kind": "codes", "cond_vqgan": "vqgan", "cond_transform": "identity"}
  if not isinstance(cond, Mapping):
    raise ConversionError(f"unsupported cond_stage_config {cond!r}")
  target = cond.get("target", "")
  cp = cond.get("params", {}) or {}
  if target.endswith("Labelator"):
    return {"kind": "class", "num_classes": int(cp["n_classes"]),
            "cond_len": 1, "null_token": None}
  if target.endswith("SOSProvider"):
    return {"kind": "sos", "sos_token": int(cp.get("sos_token", sos)),
            "cond_len": 1}
  if target.endswith("CoordStage"):
    return {"kind": "coord", "n_embed": int(cp["n_embed"]),
            "down_factor": int(cp["down_factor"])}
  if target in VQ_TARGETS:
    return {"kind": "codes", "cond_vqgan": "cond_vqgan",
            "cond_transform": "identity"}
  raise ConversionError(f"unsupported conditioning stage {target!r}")


# GPT fields that a reference `transformer_config.params` can set, with the
# reference's defaults.
_GPT_REFERENCE_DEFAULTS = {
    "n_layer": 12,
    "n_head": 8,
    "n_embd": 256,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "n_unmasked": 0,
}


def gpt_config_from_reference(transformer_config_params: Mapping[str, Any]
                              ) -> Dict[str, Any]:
  """Maps the reference YAML `transformer_config.params` to `GPT` fields.

  Args:
    transformer_config_params: the `params` mapping of the reference
      `taming.modules.transformer.mingpt.GPT` config (a mapping with
      `target` and `params` is accepted too).

  Returns:
    Keyword arguments for `GPT(...)`, with the reference defaults filled in.

  Raises:
    ValueError: on unknown keys or a missing vocab_size / block_size.
  """
  cfg = dict(transformer_config_params)
  if "params" in cfg and "target" in cfg:
    cfg = dict(cfg["params"])
  known = {"vocab_size", "block_size"} | set(_GPT_REFERENCE_DEFAULTS)
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown minGPT config keys: {unknown}")
  missing = sorted({"vocab_size", "block_size"} - set(cfg))
  if missing:
    raise ValueError(f"minGPT config lacks {missing}")
  out = dict(_GPT_REFERENCE_DEFAULTS)
  out.update(cfg)
  for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
              "n_unmasked"):
    out[key] = int(out[key])
  for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
    out[key] = float(out[key])
  return out


def load_taming_transformer(checkpoint_path, config_path, *, dtype=jnp.float32,
                            state_dict=None):
  """Loads the GPT of a reference Net2NetTransformer as ``(model, variables)``.

  Args:
    checkpoint_path: the reference Lightning ``.ckpt`` (``transformer.*`` keys).
    config_path: its YAML (``model.params.transformer_config``).
    dtype: compute dtype (logits are float32 regardless).

  Returns:
    ``(vqgan_jax.GPT, {'params': ...})``.
  """
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  cfg = read_reference_config(config_path)
  params = _transformer_params(cfg, config_path)
  try:
    gpt_cfg = gpt_config_from_reference(params["transformer_config"])
  except ValueError as e:
    raise ConversionError(f"{config_path}: {e}") from e
  model = gpt_lib.GPT(**gpt_cfg, dtype=dtype)
  if state_dict is None:
    state_dict = torch_io.load_state_dict(checkpoint_path)
  try:
    gpt_params = keymaps.gpt.params_from_state_dict(
        state_dict, prefix="transformer.", model=model)
  except ValueError as e:
    raise ConversionError(f"checkpoint {os.fspath(checkpoint_path)}: {e}") from e
  return model, {"params": jax.tree.map(jnp.asarray, gpt_params)}


def write_converted_transformer(checkpoint_path, config_path, out_dir) -> str:
  """Converts a Net2NetTransformer: GPT, first stage and VQ conditioning stage."""
  from vqgan_jax import config_io  # pylint: disable=g-import-not-at-top
  cfg = read_reference_config(config_path)
  params = _transformer_params(cfg, config_path)
  sd = torch_io.load_state_dict(checkpoint_path)
  model, variables = load_taming_transformer(checkpoint_path, config_path,
                                             state_dict=sd)
  cond = transformer_conditioning(params)
  perm_cfg = params.get("permuter_config") or {
      "target": "taming.modules.transformer.permuter.Identity"}
  if perm_cfg.get("target") not in PERMUTER_TARGETS:
    raise ConversionError(f"unsupported permuter {perm_cfg.get('target')!r}; "
                          f"supported: {sorted(PERMUTER_TARGETS)}")
  first = params.get("first_stage_config")
  if first is None:
    raise ConversionError(f"{config_path}: model.params lacks first_stage_config")
  vq = vqgan_from_reference(first)
  vq_model, vq_vars, vq_extras = convert_taming_vqgan(
      checkpoint_path, config_path, state_dict=sd)
  os.makedirs(out_dir, exist_ok=True)
  checkpoint.save_pretrained(os.path.join(out_dir, "vqgan"), "vqgan",
                             vqgan_lib.model_config(vq_model), vq_vars,
                             vq_extras)
  if cond.get("cond_vqgan") == "cond_vqgan":
    c_entry = params["cond_stage_config"]
    c_model = vqgan_from_reference(c_entry)
    c_params = _vqgan_params(
        {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")},
        c_model, prefix="cond_stage_model.",
        what=f"checkpoint {os.fspath(checkpoint_path)} (cond stage)")
    checkpoint.save_pretrained(os.path.join(out_dir, "cond_vqgan"), "vqgan",
                               vqgan_lib.model_config(c_model),
                               {"params": c_params})
  f = vq.downsample_factor
  grid = [vq.resolution // f, vq.resolution // f]
  return checkpoint.save_pretrained(
      out_dir, "transformer", config_io.to_config(model), variables,
      vqgan="vqgan", image_grid=grid,
      permuter=PERMUTER_TARGETS[perm_cfg["target"]], conditioning=cond,
      source={"checkpoint": os.path.abspath(checkpoint_path),
              "config": os.path.abspath(config_path)})


# ----------------------------------------------------------------------------
# Command line


def write_converted_vqgan(checkpoint_path, config_path, out_dir, *,
                          noisy_gumbel: bool = False, state_dict=None) -> str:
  """Converts a reference first stage into a pretrained directory."""
  model, variables, extras = convert_taming_vqgan(
      checkpoint_path, config_path, noisy_gumbel=noisy_gumbel,
      state_dict=state_dict)
  return checkpoint.save_pretrained(
      out_dir, "vqgan", vqgan_lib.model_config(model), variables, extras,
      source={"checkpoint": os.path.abspath(checkpoint_path),
              "config": os.path.abspath(config_path)},
      extras_saved=sorted(extras))


def define_flags(fv: flags.FlagValues) -> None:
  """The command line's flags, defined on ``fv``."""
  flags.DEFINE_string("checkpoint", None,
                      "Reference Lightning .ckpt (e.g. last.ckpt).",
                      flag_values=fv)
  flags.DEFINE_string("config", None,
                      "The YAML released with it (e.g. model.yaml).",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
  flags.DEFINE_bool("noisy-gumbel", False,
                    "GumbelVQ: keep the reference's noisy encoding at "
                    "inference instead of the argmax.", flag_values=fv)
  flags.mark_flags_as_required(["checkpoint", "config", "out"],
                               flag_values=fv)


_USAGE = """Convert an official taming-transformers checkpoint (VQModel,
GumbelVQ or Net2NetTransformer) to vqgan-jax's format.

  python -m vqgan_jax.convert --checkpoint=last.ckpt --config=model.yaml \\
      --out=converted/vqgan_f16_16384 [--noisy-gumbel]

The other direction (`export --help` lists its flags):

  python -m vqgan_jax.convert export --workdir=runs/vq --out=exported/vq
"""


def main(argv=None) -> int:
  """The command line (``argv`` without the program name); returns the exit
  status: 0 written, 2 a command-line mistake or an unreadable input.
  ``export ...`` runs :func:`vqgan_jax.export.main` (the other direction)."""
  args = list(sys.argv[1:] if argv is None else argv)
  if args[:1] == ["export"]:
    from vqgan_jax import export  # pylint: disable=g-import-not-at-top
    return export.main(args[1:])
  fv = flags.FlagValues()
  define_flags(fv)
  cli.parse(fv, args, _USAGE, prog="python -m vqgan_jax.convert")
  checkpoint_path, config_path, out_dir = fv.checkpoint, fv.config, fv.out
  try:
    cfg = read_reference_config(config_path)
    if os.path.exists(os.path.join(out_dir, checkpoint.MODEL_FILE)):
      raise ConversionError(
          f"{out_dir} already holds a converted model; choose a new --out "
          "(nothing was overwritten)")
    if cfg["model"]["target"] == TRANSFORMER_TARGET:
      out = write_converted_transformer(checkpoint_path, config_path, out_dir)
    else:
      out = write_converted_vqgan(checkpoint_path, config_path, out_dir,
                                  noisy_gumbel=fv["noisy-gumbel"].value)
  except (ConversionError, torch_io.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_USAGE
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
