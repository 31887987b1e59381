"""The training config schema: each section's defaults and checks together.

``vqgan_config()`` and ``transformer_config()`` build the defaults that the
files in ``configs/`` refine. ``validate_vqgan(config, num_devices)`` and
``validate_transformer(config, num_devices)`` run every check, before
anything compiles, loads data or writes; both trainers call them first thing
in ``train_and_evaluate``. ``check_vqgan`` / ``check_transformer`` are the
checks that need only the config (no devices, no files).

Each field is declared once, as ``name=(default, domain)``
(`training/domains.py`); :func:`check_domains` runs first, so the checks
between fields see values of the right type and range. The stage-1 model
section (``config.model``, its quantizer options and their checks) is
declared in `training/model_schema.py`.

Every problem raises :class:`ConfigError` (a ``ValueError``) with one line
that names the field, its value and what would be valid;
``training/launch.py`` prints it without a traceback and exits with
:data:`EXIT_CONFIG`. Importing this module imports neither JAX nor
TensorFlow.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import ml_collections

from vqgan_jax.training import domains as dom
from vqgan_jax.training.domains import (
    ConfigError, as_config_error, boolean, fraction, int_at_least, integer,
    nonneg, nonneg_int, one_of, optional, path, positive, positive_int, text,
    tuple_of, unit_interval)
# The model section (stage 1) lives in model_schema.py; its names are also
# this module's.
from vqgan_jax.training.model_schema import (  # pylint: disable=unused-import
    DTYPES, GROUPNORM_GROUPS, VQGAN_ARCH, check_model, check_quantizer,
    check_restart_threshold, model_fields)

# Exit codes of the training scripts (launch.py).
EXIT_CONFIG = 2  # a bad config, path or dataset, or a workdir of another
# architecture (checkpoints.CheckpointMismatchError): fix the command line
EXIT_NONFINITE = 3  # max_bad_steps non-finite steps in a row


# ----------------------------------------------------------------------------
# data (both stages)


def _data_fields():
  return dict(
      dataset=("tfds:imagenet2012", text(
          "dataset", note="'digits', 'tfds:NAME[:SPLIT]' or 'folder:PATH'")),
      data_dir=(ml_collections.FieldReference(None, field_type=str),
                optional(path(note="TFDS data_dir"))),
      eval_split=("validation", text("split")),
      # Where the periodic evaluation reads (its eval_split): '' = dataset;
      # e.g. folder:/data/held_out to measure generalisation, not fit.
      eval_dataset=("", text("dataset", nonempty=False, note=(
          "'' = config.dataset, or a dataset string as config.dataset"))))


def eval_source(config) -> Tuple[str, str]:
  """``(dataset, split)`` the periodic evaluation of either stage reads:
  ``config.eval_dataset`` or else ``config.dataset``, split
  ``config.eval_split`` (a folder is one split, ``'train'``)."""
  name = config.eval_dataset or config.dataset
  return name, "train" if name.startswith("folder:") else config.eval_split


def folder_and_preset(arg: str, presets: Tuple[str, ...]) -> Tuple[str, str]:
  """A folder config's argument, ``PATH`` or ``PATH,PRESET``, as ``(PATH,
  PRESET or '')``; an existing folder whose name holds a comma is never
  split.

  Raises:
    ValueError: PRESET is not one of ``presets``.
  """
  if os.path.isdir(os.path.expanduser(arg)):
    return arg, ""
  path, comma, preset = arg.rpartition(",")
  if not comma:
    return arg, ""
  if preset not in presets:
    raise ValueError(f"unknown preset {preset!r} in {arg!r}; valid: "
                     f"{', '.join(presets)} (PATH,{presets[0]}) or none (PATH)")
  return path, preset


def check_dataset(field: str, value: str) -> None:
  """A ``config.dataset``-style string has one of the known forms."""
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  with as_config_error():
    data.check_dataset(value, field)


# ----------------------------------------------------------------------------
# loss and discriminator (stage 1)

DISC_LOSSES = ("hinge", "vanilla")
DISC_FAKES = ("step", "updated")


def _loss_fields():
  from vqgan_jax import gan_options  # pylint: disable=g-import-not-at-top
  return dict(
      disc_start=(250001, nonneg_int()), disc_weight=(0.8, nonneg()),
      disc_factor=(1.0, nonneg()), codebook_weight=(1.0, nonneg()),
      perceptual_weight=(1.0, nonneg("0 = off")),
      disc_loss=("hinge", one_of(*DISC_LOSSES)),
      lpips_vgg_path=("", path()),
      lpips_lin_path=("", path()),
      # GAN options beyond the reference (defaults = the reference).
      # 'adaptive': the reference's gradient-norm ratio times disc_weight;
      # 'fixed': the GAN term weighs exactly gan_weight.
      gan_weight_mode=("adaptive", one_of(*gan_options.GAN_WEIGHT_MODES)),
      gan_weight=(0.1, nonneg()),
      # D trains from disc_start; its loss reaches G from disc_start +
      # disc_warmup_steps ('hold') or ramps up over them ('linear').
      disc_warmup_steps=(0, nonneg_int()),
      disc_warmup_mode=("hold", one_of(*gan_options.WARMUP_MODES)),
      # LeCam regulariser on D (EMA of D's real/fake outputs) and R1
      # gradient penalty on real images (r1_weight = gamma / 2).
      lecam_weight=(0.0, nonneg("0 = off")), lecam_decay=(0.999, fraction()),
      r1_weight=(0.0, nonneg("0 = off")),
      # Which reconstructions D trains on: 'step' (those the generator's
      # step made: one generator forward per step) or 'updated' (a second
      # forward of the updated generator, as the reference's Lightning
      # module runs one training_step per optimiser).
      disc_fake=("step", one_of(*DISC_FAKES)))


def _disc_fields():
  return dict(n_layers=(3, positive_int()), ndf=(64, positive_int()),
              use_actnorm=(False, boolean()))


# ----------------------------------------------------------------------------
# optimizer (both stages)

SCHEDULES = ("constant", "cosine")  # stage 2
# 'reference': lr = base_learning_rate * global batch (the reference's rule,
# with its per-device batch times devices); 'none': learning_rate.
LR_SCALINGS = ("reference", "none")


def _optim_fields(learning_rate: float, b1: float, b2: float):
  return dict(
      lr_scaling=("reference", one_of(*LR_SCALINGS)),
      base_learning_rate=(4.5e-6, nonneg()),
      learning_rate=(learning_rate, nonneg("0 freezes the weights")),
      b1=(b1, fraction()), b2=(b2, fraction()),
      grad_clip=(0.0, nonneg("0 = off")))


def _vqgan_optim_fields():
  return dict(**_optim_fields(1e-4, 0.5, 0.9),
              ema_decay=(0.0, fraction("0 = no EMA weights")))


def _transformer_optim_fields():
  return dict(
      **_optim_fields(3e-4, 0.9, 0.95), weight_decay=(0.01, nonneg()),
      schedule=("constant", one_of(*SCHEDULES)),  # 'cosine': warmup_steps
      warmup_steps=(0, nonneg_int()), grad_accum_steps=(1, positive_int()))


# ----------------------------------------------------------------------------
# conditioning and GPT (stage 2)

def _conditioning_fields():
  from vqgan_jax import conditioning as cond_lib  # pylint: disable=g-import-not-at-top
  return dict(
      kind=("class", one_of(*cond_lib.KINDS)),
      sos_token=(0, nonneg_int()),
      num_classes=(1000, positive_int()),
      # 'codes': a second VQGAN encodes the paired example of cond_dataset
      # (e.g. folder:/data/depth mirroring the image folder's file names),
      # or, without cond_dataset, a transform of the image itself.
      cond_vqgan_workdir=("", path()),
      cond_dataset=("", text("dataset", nonempty=False)),
      cond_transform=("identity", one_of(*cond_lib.COND_TRANSFORMS)),
      # classifier-free guidance: probability of the null class in training.
      label_dropout=(0.0, fraction()))


def _gpt_fields():
  """The reference's class-conditional ImageNet GPT (48 x 1536); the
  options' defaults and choices are `vqgan_jax.gpt.OPTIONS`."""
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  domains = dict(
      n_unmasked=nonneg_int(), embd_pdrop=fraction(), resid_pdrop=fraction(),
      attn_pdrop=fraction(), remat=boolean(), scan_layers=boolean(),
      attention_impl=optional(one_of("xla", "cudnn")), rope_base=positive(),
      zero_head=boolean())
  g = dict(n_layer=(48, positive_int()), n_head=(24, positive_int()),
           n_embd=(1536, positive_int()),
           block_size=(0, nonneg_int("0 = fit the sequence")),
           dtype=("float32", one_of(*DTYPES)),
           param_dtype=("float32", one_of(*DTYPES)))
  for name, option in gpt_lib.OPTIONS.items():
    g[name] = (option.default, one_of(*option.choices) if option.choices
               else domains.get(name))
  g["attention_impl"] = (ml_collections.FieldReference(None, field_type=str),
                         domains["attention_impl"])
  return g


def _sampling_fields():
  """What `sample.py` uses when its flags leave a setting out; written to
  the workdir's ``model.json``, so a model carries the settings it was
  measured with."""
  return dict(
      temperature=(1.0, positive()),
      top_k=(0, nonneg_int("0 = no top-k")),
      top_p=(1.0, unit_interval("1 = no nucleus filter")),
      # uncond + scale * (cond - uncond) per token; needs label_dropout > 0
      guidance_scale=(1.0, nonneg("1 = no guidance")))


def check_sampling(config) -> None:
  """Guidance needs the null class that label dropout trains."""
  s = config.sampling
  if s.guidance_scale != 1.0 and not config.conditioning.label_dropout:
    raise ConfigError(
        f"config.sampling.guidance_scale={s.guidance_scale} needs a model "
        "trained with label dropout; set config.conditioning.label_dropout "
        "(e.g. 0.1) or config.sampling.guidance_scale=1 (no guidance)")


def check_conditioning(config) -> None:
  """What precedes the image tokens needs its VQGAN and dataset."""
  cc = config.conditioning
  if cc.kind == "codes" and not cc.cond_vqgan_workdir:
    raise ConfigError("config.conditioning.kind='codes' needs "
                      "config.conditioning.cond_vqgan_workdir (a stage-1 "
                      "workdir that encodes the conditioning images)")
  if cc.cond_dataset:
    check_dataset("conditioning.cond_dataset", cc.cond_dataset)


def _check_gpt(config) -> None:
  """The GPT options, as declared in `vqgan_jax.gpt.OPTIONS`, and the head
  width."""
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  with as_config_error():
    gpt_lib.check_options(config.gpt)


# ----------------------------------------------------------------------------
# mesh and batch (both stages)


def mesh_config(**axes) -> ml_collections.ConfigDict:
  """Mesh axes in order; -1 takes the remaining devices."""
  return ml_collections.ConfigDict(axes or {"data": -1, "fsdp": 1})


def check_batch(config, mesh_shape: Dict[str, int]) -> None:
  """The global batch divides over the devices of ``mesh_shape``."""
  n = 1
  for size in mesh_shape.values():
    n *= size
  if config.batch_size % n:
    lo = config.batch_size // n * n
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{n} devices of the mesh {dict(mesh_shape)}; use a multiple of {n} "
        f"(e.g. {max(lo, n)} or {lo + n})")


def check_mesh_and_batch(config, num_devices: int) -> Dict[str, int]:
  """The mesh fits ``num_devices`` and the batch divides over it.

  Returns:
    The resolved ``{axis: size}`` mesh.
  """
  from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top
  with as_config_error():
    names, sizes = sharding.mesh_shape(config.mesh.to_dict(), num_devices)
  shape = dict(zip(names, sizes))
  check_batch(config, shape)
  return shape


# ----------------------------------------------------------------------------
# Entry points


def _run_fields(batch_size: int, num_train_steps: int, eval_batches: int):
  """Batch, length, cadence, mesh and the non-finite guard (both stages)."""
  return dict(
      batch_size=(batch_size, positive_int()),
      num_train_steps=(num_train_steps, nonneg_int()),
      seed=(0, integer()),
      log_every=(50, positive_int()),
      eval_every=(5000, nonneg_int("0 = never")),
      eval_batches=(eval_batches, nonneg_int("0 = the whole split")),
      checkpoint_every=(5000, positive_int()),
      keep_checkpoints=(3, positive_int()),
      mesh=(mesh_config(), dom.mesh_axes()),
      partition_rules=(((".*", "fsdp"),), dom.partition_rules()),
      max_bad_steps=(20, int_at_least(1, "non-finite steps in a row before "
                                         "the run stops")),
      # The trainers refuse a step whose memory (XLA's estimate) exceeds the
      # device's; True runs it anyway.
      ignore_memory_limit=(False, boolean()))


def vqgan_fields() -> Dict[str, Any]:
  """Stage 1, the reference's ImageNet f16 recipe at 256x256: every field
  as ``name: (default, domain)``, sections as nested dicts."""
  from vqgan_jax.data import images  # pylint: disable=g-import-not-at-top
  return dict(
      **_data_fields(),
      # Training-batch augmentations, drawn per example from (seed, step):
      # 'flip' (left-right), 'channels' (RGB order); evaluation never.
      augment=((), tuple_of(one_of(*images.AUGMENTATIONS))),
      model=model_fields(), loss=_loss_fields(),
      disc=_disc_fields(), optim=_vqgan_optim_fields(),
      **_run_fields(12, 500_000, 8),
      image_every=(5000, nonneg_int("0 = never")),
      # A directory written by `python -m vqgan_jax.convert` (or a stage-1
      # workdir) to start from: generator, and discriminator/LPIPS when saved.
      init_from=("", path()),
      # The official Lightning .ckpt that init_from was converted from: its
      # Adam states and global_step continue here
      # (training/optimizer_import.py).
      init_from_optimizer=("", path()))


def transformer_fields() -> Dict[str, Any]:
  """Stage 2, the reference's class-conditional ImageNet GPT (see
  :func:`vqgan_fields`)."""
  from vqgan_jax import conditioning as cond_lib  # pylint: disable=g-import-not-at-top
  return dict(
      **_data_fields(),
      # The frozen first stage: a stage-1 workdir or a converted checkpoint dir.
      vqgan_workdir=("", path(nonempty=True, note=(
          "a stage-1 workdir (train_vqgan.py) or a converted VQGAN (python -m "
          "vqgan_jax.convert)"))),
      codes_dir=("", path(note="'' = <vqgan_workdir>/codes")),
      conditioning=_conditioning_fields(),
      permuter=("identity", one_of(*cond_lib.PERMUTERS)),
      pkeep=(1.0, unit_interval()),
      gpt=_gpt_fields(), optim=_transformer_optim_fields(),
      **_run_fields(16, 1_000_000, 16),
      sample_every=(5000, nonneg_int("0 = never")),
      samples_per_class=(2, positive_int()),
      sample_top_k=(0, nonneg_int("0 = no top-k in the periodic samples")),
      sampling=_sampling_fields(),
      peak_tflops_per_device=(0.0, nonneg("0 = from the device kind")))


def vqgan_config() -> ml_collections.ConfigDict:
  """Stage-1 defaults: the reference's ImageNet f16 recipe at 256x256."""
  return dom.build(vqgan_fields())


def transformer_config() -> ml_collections.ConfigDict:
  """Stage-2 defaults: the reference's class-conditional ImageNet GPT."""
  return dom.build(transformer_fields())


STAGES = {"vqgan": vqgan_fields, "transformer": transformer_fields}


def field_domains(stage: str) -> Dict[str, Tuple[Any, Optional[dom.Domain]]]:
  """``{dotted field: (default, domain)}`` of stage 'vqgan' or 'transformer'
  (the domain is None only for a field declared without one)."""
  return dom.flatten(STAGES[stage]())


def stage_of(config) -> str:
  return "transformer" if "gpt" in config else "vqgan"


def check_domains(config, stage: Optional[str] = None) -> None:
  """Each field's value lies in its declared domain. Fields the config lacks
  are left out (the checks after this one name unknown or moved fields)."""
  message = dom.first_violation(config,
                                field_domains(stage or stage_of(config)))
  if message:
    raise ConfigError(message)


def config_help(config) -> str:
  """Every field of ``config``, one per line: the override that sets its
  current value, then its domain (``--config_help``)."""
  return dom.describe_config(config, field_domains(stage_of(config)))


def check_vqgan(config) -> None:
  """The stage-1 checks that need only the config (no devices, no files)."""
  check_domains(config, "vqgan")
  check_model(config.model)
  if "channels" in config.augment and config.model.in_channels != 3:
    raise ConfigError(
        f"config.augment={tuple(config.augment)!r}: 'channels' reorders R, G "
        f"and B, but config.model.in_channels={config.model.in_channels}; "
        "drop 'channels' from config.augment")
  check_restart_threshold(config)
  check_dataset("dataset", config.dataset)
  if config.eval_dataset:
    check_dataset("eval_dataset", config.eval_dataset)


def check_transformer(config) -> None:
  """The stage-2 checks that need only the config (no devices, no files)."""
  check_domains(config, "transformer")
  check_conditioning(config)
  check_sampling(config)
  _check_gpt(config)
  check_dataset("dataset", config.dataset)
  if config.eval_dataset:
    check_dataset("eval_dataset", config.eval_dataset)
    if config.conditioning.kind == "codes" and config.conditioning.cond_dataset:
      raise ConfigError(
          "config.eval_dataset with config.conditioning.cond_dataset: the "
          "conditioning images are paired with config.dataset's, and a "
          "separate evaluation set has no pairs; leave config.eval_dataset "
          "empty (evaluation reads config.eval_split of both)")


def _num_devices(num_devices: Optional[int]) -> int:
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  return num_devices


def validate_vqgan(config, num_devices: Optional[int] = None) -> None:
  """Every stage-1 check, before any device work.

  Args:
    config: the stage-1 config.
    num_devices: devices the mesh must fit (default ``jax.device_count()``).

  Raises:
    ConfigError: the first problem found.
  """
  from vqgan_jax.training import config_paths  # pylint: disable=g-import-not-at-top
  check_vqgan(config)
  check_mesh_and_batch(config, _num_devices(num_devices))
  if config.init_from:
    config_paths.check_init_from(config)
  opt_from = config.init_from_optimizer
  if opt_from and not config.init_from:
    raise ConfigError("config.init_from_optimizer needs config.init_from, the "
                      "directory `python -m vqgan_jax.convert` wrote from it")
  if opt_from and not os.path.isfile(os.path.expanduser(opt_from)):
    raise ConfigError(f"config.init_from_optimizer={opt_from} does not exist; "
                      "point it to the official .ckpt that config.init_from "
                      "was converted from")


def validate_transformer(config, num_devices: Optional[int] = None) -> None:
  """Every stage-2 check that needs no data and no compiled function (see
  :func:`validate_vqgan` for the arguments)."""
  from vqgan_jax.training import config_paths  # pylint: disable=g-import-not-at-top
  check_transformer(config)
  check_mesh_and_batch(config, _num_devices(num_devices))
  config_paths.read_vqgan_info("vqgan_workdir", config.vqgan_workdir)
  cc = config.conditioning
  if cc.kind == "codes":
    config_paths.read_vqgan_info("conditioning.cond_vqgan_workdir",
                                 cc.cond_vqgan_workdir)
