"""Exports models trained here to taming-transformers' format.

:func:`export_taming_vqgan` (stage 1, here) and
:func:`vqgan_jax.export_transformer.export_taming_transformer` (stage 2; both
are re-exported by :mod:`vqgan_jax.convert`) write what the official releases hold::

  OUT/checkpoints/last.ckpt   a Lightning-style checkpoint: {'state_dict',
                              'global_step', 'epoch'}
  OUT/configs/model.yaml      model: {target, params}

so that taming-transformers loads the model from the YAML
(``instantiate_from_config(OmegaConf.load(yaml).model)``) and the weights
with ``load_state_dict(torch.load(ckpt)['state_dict'], strict=True)``, its
``init_from_ckpt``, or ``ckpt_path:`` in the YAML. The file loads with
``torch.load(weights_only=True)``, and back here with
:func:`vqgan_jax.convert.load_taming_vqgan` /
:func:`~vqgan_jax.convert.load_taming_transformer`.

Nothing here needs torch: :mod:`vqgan_jax.torch_write` writes the torch
file format itself, and the YAML is written with PyYAML, a dependency of the
package already (the converter reads the reference's YAML with it).

What maps:

* VQ (VectorQuantizer2) and Gumbel (GumbelQuantize) models, with the
  discriminator (``loss.discriminator.*``) and LPIPS
  (``loss.perceptual_loss.*``) under a ``VQLPIPSWithDiscriminator`` loss
  when they are available;
* beyond the reference, models whose codes the reference's nearest-code
  quantizer reproduces: l2-normalised codes (the exported codebook is
  normalised; nearest in Euclidean distance is then nearest in angle),
  factorised codes (``codebook_dim``: the linear projections are folded into
  ``quant_conv``/``post_quant_conv``, so ``embed_dim`` becomes the code
  width) and lookup-free quantisation (the codebook of all ``2**bits`` sign
  vectors, whose nearest code is the sign; a channel exactly 0 is the one
  case where the two differ). Folding re-associates float32 products, so
  such exports agree to float32 rounding, like any converted model.
* Options that only change how a model trains (EMA codebooks, the loss
  balance ``beta``/``legacy_loss``, entropy penalties, the rotation trick,
  the GAN options beyond the reference) do not change the exported network;
  taming's YAML cannot express them, so they are listed as notes (logged,
  and written as comments in the YAML).
* Everything else raises :class:`ExportError` naming the option: FSQ, and
  GPT norms, MLPs and position embeddings other than the reference's.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import yaml
from absl import flags
from absl import logging
from flax import traverse_util

from vqgan_jax import checkpoint
from vqgan_jax import cli
from vqgan_jax import keymaps
from vqgan_jax import torch_write

VQ_TARGET = "taming.models.vqgan.VQModel"
GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"
LOSS_TARGET = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
DUMMY_LOSS = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
CKPT_FILE = os.path.join("checkpoints", "last.ckpt")
YAML_FILE = os.path.join("configs", "model.yaml")

# VQLPIPSWithDiscriminator settings when a model carries no training config:
# those of the official ImageNet VQGAN configs.
REFERENCE_LOSS = dict(disc_start=250001, disc_weight=0.8, disc_factor=1.0,
                      codebook_weight=1.0, perceptual_weight=1.0,
                      disc_loss="hinge")
# Loss options beyond the reference and their reference values.
_GAN_EXTRAS = dict(gan_weight_mode="adaptive", disc_warmup_steps=0,
                   lecam_weight=0.0, r1_weight=0.0)
# Quantizer options that change training only, and their reference values.
_TRAINING_ONLY = dict(beta=0.25, legacy_loss=True, codebook_update="loss",
                      dead_code_threshold=0.0, entropy_weight=0.0,
                      quantizer_grad="ste")


class ExportError(ValueError):
  """A model or option that taming-transformers cannot express."""


class Exported(NamedTuple):
  checkpoint: str  # OUT/checkpoints/last.ckpt
  config: str  # OUT/configs/model.yaml
  notes: List[str]  # training-only settings the YAML cannot carry


def _numpy(tree):
  return {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(dict(tree)).items()}


# ----------------------------------------------------------------------------
# Stage 1


def _fold(flat, conv: str, dense: str, before: bool) -> None:
  """Folds the Dense ``quantize/proj/<dense>`` into the 1x1 conv ``conv``
  (applied after it when ``before``, else before it), in float64."""
  k = flat.pop(("quantize", "proj", dense, "kernel")).astype(np.float64)
  b = flat.pop(("quantize", "proj", dense, "bias")).astype(np.float64)
  ck = flat[(conv, "kernel")][0, 0].astype(np.float64)
  cb = flat[(conv, "bias")].astype(np.float64)
  if before:  # dense(conv(x)) = x ck k + (cb k + b)
    kernel, bias = ck @ k, cb @ k + b
  else:  # conv(dense(x)) = x k ck + (b ck + cb)
    kernel, bias = k @ ck, b @ ck + cb
  flat[(conv, "kernel")] = kernel[None, None].astype(np.float32)
  flat[(conv, "bias")] = bias.astype(np.float32)


def check_exportable(model) -> None:
  """Raises :class:`ExportError` for a VQGAN the reference cannot express
  (checked before any weights are read)."""
  if model.quantizer not in ("vq", "gumbel", "lfq"):
    raise ExportError(
        f"quantizer={model.quantizer!r} has no taming-transformers "
        "equivalent (its codes are not the nearest entries of a codebook); "
        "export a 'vq', 'gumbel' or 'lfq' model")
  if model.quantizer == "gumbel" and model.embed_dim != model.z_channels:
    raise ExportError(
        f"a Gumbel model with embed_dim={model.embed_dim} != z_channels="
        f"{model.z_channels} has no GumbelVQ equivalent (its proj reads "
        "z_channels)")


def first_stage_reference(model, params, *, lossconfig=None
                          ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray],
                                     List[str]]:
  """A :class:`vqgan_jax.VQGAN` in the reference's terms.

  Args:
    model: the VQGAN.
    params: its parameters (the ``params`` collection).
    lossconfig: the YAML ``lossconfig`` (default: ``DummyLoss``).

  Returns:
    ``(model_config, state_dict, notes)``: the YAML's ``{target, params}``,
    the torch-layout weights (no ``loss.*`` keys) and the training-only
    options that were dropped.

  Raises:
    ExportError: naming a quantizer or option with no reference equivalent.
  """
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top
  check_exportable(model)
  kind, opts = model.quantizer, dict(model.quantizer_options)
  flat = _numpy(params)
  dd = dict(double_z=False, z_channels=model.z_channels,
            resolution=model.resolution, in_channels=model.in_channels,
            out_ch=model.out_ch, ch=model.ch, ch_mult=list(model.ch_mult),
            num_res_blocks=model.num_res_blocks,
            attn_resolutions=list(model.attn_resolutions),
            dropout=float(model.dropout))
  p = dict(embed_dim=model.embed_dim, n_embed=model.n_embed, ddconfig=dd,
           lossconfig=lossconfig or dict(DUMMY_LOSS))
  notes = [f"quantizer_options.{kind}.{k}={opts[k]!r}"
           for k, ref in _TRAINING_ONLY.items() if k in opts and opts[k] != ref]
  if kind == "gumbel":
    t = float(opts["temperature"])
    p.update(kl_weight=float(opts["kl_weight"]),
             temperature_scheduler_config={
                 "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                 "params": dict(warm_up_steps=0, max_decay_steps=1,
                                lr_start=t, lr_max=t, lr_min=t)})
    target = GUMBEL_TARGET
  else:  # 'vq' and 'lfq': a nearest-code VectorQuantizer2
    target = VQ_TARGET
    if kind == "lfq":
      bits = model.n_embed.bit_length() - 1
      codebook = np.asarray(quantizers.lfq_codebook(bits), np.float32)
    else:
      codebook = flat.pop(("quantize", "embedding"))
      if opts.get("l2_codes"):
        codebook = np.asarray(quantizers.l2_normalize(codebook), np.float32)
    if ("quantize", "proj", "proj_in", "kernel") in flat:
      _fold(flat, "quant_conv", "proj_in", before=True)
      _fold(flat, "post_quant_conv", "proj_out", before=False)
      p["embed_dim"] = int(codebook.shape[1])
    flat = {k: v for k, v in flat.items() if k[0] != "quantize"}
    flat[("quantize", "embedding")] = codebook
  state = keymaps.vqgan.state_dict_from_params(
      traverse_util.unflatten_dict(flat))
  return {"target": target, "params": p}, state, notes


def loss_reference(discriminator, lpips=None, loss_settings=None
                   ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray],
                              List[str]]:
  """``(lossconfig, loss.* state dict, notes)`` of a VQLPIPSWithDiscriminator.

  Args:
    discriminator: PatchGAN variables (``params``, ``batch_stats``).
    lpips: LPIPS variables, or None (then the state dict lacks
      ``loss.perceptual_loss.*``: taming's ``init_from_ckpt``, which loads
      non-strictly, still reads it, with its own LPIPS weights).
    loss_settings: the training config's ``loss`` section (default:
      :data:`REFERENCE_LOSS`).
  """
  from vqgan_jax import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
  prefix = "loss.discriminator."
  sd = keymaps.discriminator.state_dict_from_variables(discriminator,
                                                       prefix=prefix)
  arch = keymaps.discriminator.config_from_state_dict(sd, prefix)
  lc = dict(REFERENCE_LOSS, **{k: v for k, v in (loss_settings or {}).items()
                               if k in REFERENCE_LOSS or k in _GAN_EXTRAS})
  notes = [f"loss.{k}={lc[k]!r}" for k, ref in _GAN_EXTRAS.items()
           if k in lc and lc[k] != ref]
  params = dict(disc_conditional=False, disc_in_channels=arch["input_nc"],
                disc_num_layers=arch["n_layers"], disc_ndf=arch["ndf"],
                use_actnorm=bool(arch["use_actnorm"]),
                disc_start=int(lc["disc_start"]),
                disc_weight=float(lc["disc_weight"]),
                disc_factor=float(lc["disc_factor"]),
                codebook_weight=float(lc["codebook_weight"]),
                pixelloss_weight=1.0,
                perceptual_weight=float(lc["perceptual_weight"]),
                disc_loss=str(lc["disc_loss"]))
  if lpips is not None:
    sd.update(keymaps.lpips.reference_state_dict(
        lpips["params"], prefix="loss.perceptual_loss.",
        shift=lpips_lib.SHIFT, scale=lpips_lib.SCALE))
  return {"target": LOSS_TARGET, "params": params}, sd, notes


def _stage1_source(path: str, use_ema: bool):
  """``(model, variables, extras, step, train_config)`` of a directory."""
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  info = checkpoint.read_model_json(path)
  if info["kind"] != "vqgan":
    raise ExportError(f"{path} holds a {info['kind']!r} model; export it with "
                      "export_taming_transformer")
  model = vqgan_lib.from_config(info["config"])
  check_exportable(model)
  train = info.get("train_config") or {}
  if os.path.isdir(os.path.join(path, "params")):  # a pretrained directory
    variables = checkpoint.restore_tree(os.path.join(path, "params"))
    return model, variables, checkpoint.load_extras(path), 0, train
  state, step = checkpoint.restore_workdir_state(path)
  params = state.get("ema_params") if use_ema else None
  extras = {}
  if "disc_params" in state:
    extras["discriminator"] = {"params": state["disc_params"],
                               **(state.get("disc_state") or {})}
  lc = train.get("loss") or {}
  if lc.get("lpips_vgg_path") and lc.get("lpips_lin_path") and all(
      os.path.isfile(lc[k]) for k in ("lpips_vgg_path", "lpips_lin_path")):
    from vqgan_jax import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
    extras["lpips"] = lpips_lib.load_lpips(lc["lpips_vgg_path"],
                                           lc["lpips_lin_path"])[1]
  elif train.get("init_from") and os.path.isdir(train["init_from"]):
    lp = checkpoint.load_extras(train["init_from"]).get("lpips")
    if lp is not None:
      extras["lpips"] = lp
  return model, {"params": params or state["params"]}, extras, int(step), train


def write_files(out_dir, model_cfg, state_dict, global_step, epoch, notes,
                overwrite) -> Exported:
  """Writes ``OUT/checkpoints/last.ckpt`` and ``OUT/configs/model.yaml``
  (``notes`` as comments at its top), refusing to replace files unless
  ``overwrite``."""
  ckpt = os.path.join(os.fspath(out_dir), CKPT_FILE)
  cfg = os.path.join(os.fspath(out_dir), YAML_FILE)
  if not overwrite:
    for f in (ckpt, cfg):
      if os.path.exists(f):
        raise ExportError(f"{f} exists; choose a new output directory "
                          "(nothing was overwritten)")
  for f in (ckpt, cfg):
    os.makedirs(os.path.dirname(f), exist_ok=True)
  for n in notes:
    logging.warning("export: not carried over (training only): %s", n)
  torch_write.save_torch_file(ckpt, {
      "state_dict": dict(state_dict), "global_step": int(global_step),
      "epoch": int(epoch)})
  head = ["# taming-transformers config written by vqgan-jax's exporter;",
          f"# weights: {CKPT_FILE}"]
  head += [f"# not carried over (training only): {n}" for n in notes]
  with open(cfg, "w") as f:
    f.write("\n".join(head) + "\n")
    yaml.safe_dump({"model": model_cfg}, f, sort_keys=False)
  return Exported(ckpt, cfg, list(notes))


def export_taming_vqgan(source, out_dir, *, variables=None,
                        discriminator=None, lpips=None, loss_settings=None,
                        include_loss: bool = True, use_ema: bool = True,
                        global_step: Optional[int] = None, epoch: int = 0,
                        overwrite: bool = False) -> Exported:
  """Writes a stage-1 model as a taming-transformers checkpoint and YAML.

  Args:
    source: a stage-1 training workdir (its newest complete step), a
      directory written by ``python -m vqgan_jax.convert``, or a
      :class:`vqgan_jax.VQGAN` (then pass ``variables``).
    out_dir: where ``checkpoints/last.ckpt`` and ``configs/model.yaml`` go.
    variables: ``{'params': ...}`` of a model ``source``.
    discriminator: PatchGAN variables (default: the workdir's, or those
      converted with the model).
    lpips: LPIPS variables (default: the files the workdir was trained with,
      or those converted with the model or with its ``init_from``).
    loss_settings: the training ``loss`` section for the YAML's
      ``lossconfig`` (default: the workdir's training config).
    include_loss: False writes the model alone with a ``DummyLoss``.
    use_ema: a workdir's EMA parameters when it keeps them.
    global_step: the checkpoint's ``global_step`` (default: the step).
    epoch: the checkpoint's ``epoch``.
    overwrite: replace files in ``out_dir``.

  Returns:
    :class:`Exported` (paths and the dropped training-only options).

  Raises:
    ExportError: a quantizer or option with no taming equivalent, or
      existing output files.
  """
  step, train = 0, {}
  if isinstance(source, (str, os.PathLike)):
    path = os.path.abspath(os.fspath(source))
    if not os.path.isdir(path):
      raise checkpoint.CheckpointNotFoundError(f"no such directory: {path}")
    model, variables, extras, step, train = _stage1_source(path, use_ema)
    if discriminator is None:
      discriminator = extras.get("discriminator")
    if lpips is None:
      lpips = extras.get("lpips")
  else:
    model = source
    if variables is None:
      raise ValueError("export_taming_vqgan(model, ...) needs variables=")
  lossconfig, loss_sd, notes = None, {}, []
  if include_loss and discriminator is not None:
    lossconfig, loss_sd, notes = loss_reference(
        discriminator, lpips,
        loss_settings if loss_settings is not None else train.get("loss"))
  model_cfg, sd, qnotes = first_stage_reference(
      model, variables["params"], lossconfig=lossconfig)
  sd.update(loss_sd)
  return write_files(out_dir, model_cfg, sd,
                     step if global_step is None else global_step, epoch,
                     qnotes + notes, overwrite)


# ----------------------------------------------------------------------------
# Command line


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "A training workdir or converted "
                      "directory (VQGAN or transformer).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (gets "
                      "checkpoints/last.ckpt and configs/model.yaml).",
                      flag_values=fv)
  flags.DEFINE_bool("use_ema", True, "Export a workdir's EMA parameters when "
                    "it keeps them.", flag_values=fv)
  flags.DEFINE_bool("include_loss", True, "VQGAN: include the discriminator "
                    "and LPIPS weights (loss.*).", flag_values=fv)
  flags.DEFINE_string("lpips_vgg_path", None, "VQGAN: torchvision VGG16 "
                      "weights for loss.perceptual_loss (with "
                      "--lpips_lin_path).", flag_values=fv)
  flags.DEFINE_string("lpips_lin_path", None, "VQGAN: the lpips package's "
                      "weights/v0.1/vgg.pth.", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


_USAGE = """Export a model trained here to taming-transformers' format
(checkpoints/last.ckpt + configs/model.yaml).

  python -m vqgan_jax.convert export --workdir=runs/digits_vqgan \\
      --out=exported/digits_vqgan
"""


def main(argv=None) -> int:
  """The command line; returns 0, or 2 (one ``error:`` line) on a mistake."""
  fv = flags.FlagValues()
  define_flags(fv)
  cli.parse(fv, argv, _USAGE, prog="python -m vqgan_jax.convert export")
  workdir, out = fv.workdir, fv.out
  try:
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"--workdir={workdir}: no such directory")
    kind = checkpoint.read_model_json(workdir)["kind"]
    lpips = None
    if kind == "vqgan" and (fv.lpips_vgg_path or fv.lpips_lin_path):
      from vqgan_jax import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
      lpips = lpips_lib.load_lpips(fv.lpips_vgg_path or "",
                                   fv.lpips_lin_path or "")[1]
    if kind == "vqgan":
      done = export_taming_vqgan(workdir, out, use_ema=fv.use_ema,
                                 include_loss=fv.include_loss, lpips=lpips)
    else:
      from vqgan_jax import export_transformer  # pylint: disable=g-import-not-at-top
      done = export_transformer.export_taming_transformer(
          workdir, out, use_ema=fv.use_ema)
  except (ExportError, ValueError, FileNotFoundError) as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return cli.EXIT_USAGE
  for n in done.notes:
    print(f"note: not carried over (training only): {n}", file=sys.stderr)
  print(f"wrote {done.checkpoint} and {done.config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
