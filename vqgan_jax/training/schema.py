"""The training config schema: each section's defaults and checks together.

``vqgan_config()`` and ``transformer_config()`` build the defaults that the
files in ``configs/`` refine. ``validate_vqgan(config, num_devices)`` and
``validate_transformer(config, num_devices)`` run every check, before
anything compiles, loads data or writes; both trainers call them first thing
in ``train_and_evaluate``. ``check_vqgan`` / ``check_transformer`` are the
checks that need only the config (no devices, no files).

Every problem raises :class:`ConfigError` (a ``ValueError``) with one line
that names the field, its value and what would be valid;
``training/launch.py`` prints it without a traceback and exits with
:data:`EXIT_CONFIG`. Importing this module imports neither JAX nor
TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Sequence

import ml_collections

# Exit codes of the training scripts (launch.py).
EXIT_CONFIG = 2  # a bad config, path or dataset, or a workdir of another
# architecture (checkpoints.CheckpointMismatchError): fix the command line
EXIT_NONFINITE = 3  # max_bad_steps non-finite steps in a row


class ConfigError(ValueError):
  """A config value that cannot work; the message says how to fix it."""


@contextlib.contextmanager
def as_config_error():
  """Re-raises a ``ValueError`` of a library check as ConfigError."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _choice(field: str, value, valid: Sequence[Any]) -> None:
  if value not in valid:
    raise ConfigError(f"config.{field}={value!r}; valid: {tuple(valid)}")


# ----------------------------------------------------------------------------
# data (both stages)


def _data_defaults(c: ml_collections.ConfigDict) -> None:
  c.dataset = "tfds:imagenet2012"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.eval_split = "validation"


def check_dataset(field: str, value: str) -> None:
  """A ``config.dataset``-style string has one of the known forms."""
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  with as_config_error():
    data.check_dataset(value, field)


# ----------------------------------------------------------------------------
# model and quantizer (stage 1)

GROUPNORM_GROUPS = 32  # modules.Normalize

# config.model fields that make another model: a workdir or init_from
# checkpoint with other values is refused.
VQGAN_ARCH = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "in_channels", "resolution", "z_channels", "n_embed",
              "embed_dim", "quantizer")


def _model_defaults() -> ml_collections.ConfigDict:
  """The reference's ImageNet f16 VQGAN at 256x256."""
  from vqgan_jax import quantizers  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=256,
      z_channels=256, n_embed=1024, embed_dim=256,
      # 'vq' | 'gumbel' | 'fsq' (n_embed = prod of its levels) | 'lfq'
      # (n_embed = 2**bits): a family of vqgan_jax.quantizers.REGISTRY.
      quantizer="vq",
      # Each family's options under its name, e.g.
      # --config.model.quantizer_options.vq.codebook_update=ema; the defaults
      # (vqgan_jax/quantizers/<family>.py OPTIONS) are the reference's.
      quantizer_options=quantizers.config_defaults(),
      dtype="float32", param_dtype="float32"))


def check_model(m) -> None:
  """The stage-1 architecture: GroupNorm widths, downsampling, attention,
  input channels, then the quantizer and its options."""
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
  if m.in_channels not in (1, 3):
    raise ConfigError(f"config.model.in_channels={m.in_channels}; the data "
                      "pipeline gives 1 (grayscale) or 3 (RGB) channels")
  check_quantizer(m)


def check_quantizer(m) -> None:
  """The quantizer name and options (the model library's own check)."""
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  with as_config_error():
    vqgan_lib.check_quantizer_options(m)


# ----------------------------------------------------------------------------
# loss and discriminator (stage 1)

DISC_LOSSES = ("hinge", "vanilla")


def _loss_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      disc_start=250001, disc_weight=0.8, disc_factor=1.0,
      codebook_weight=1.0, perceptual_weight=1.0, disc_loss="hinge",
      lpips_vgg_path="", lpips_lin_path="",
      # GAN options beyond the reference (defaults = the reference).
      # 'adaptive': the reference's gradient-norm ratio times disc_weight;
      # 'fixed': the GAN term weighs exactly gan_weight.
      gan_weight_mode="adaptive", gan_weight=0.1,
      # D trains from disc_start; its loss reaches G from disc_start +
      # disc_warmup_steps ('hold') or ramps up over them ('linear').
      disc_warmup_steps=0, disc_warmup_mode="hold",
      # LeCam regulariser on D (EMA of D's real/fake outputs) and R1
      # gradient penalty on real images (r1_weight = gamma / 2).
      lecam_weight=0.0, lecam_decay=0.999, r1_weight=0.0))


def _disc_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(n_layers=3, ndf=64,
                                        use_actnorm=False))


def check_loss(lc) -> None:
  """The GAN loss, its weighting, warm-up and regularisers."""
  from vqgan_jax import losses  # pylint: disable=g-import-not-at-top
  _choice("loss.disc_loss", lc.disc_loss, DISC_LOSSES)
  _choice("loss.gan_weight_mode", lc.gan_weight_mode, losses.GAN_WEIGHT_MODES)
  _choice("loss.disc_warmup_mode", lc.disc_warmup_mode, losses.WARMUP_MODES)
  for name in ("gan_weight", "disc_warmup_steps", "lecam_weight",
               "r1_weight"):
    if lc[name] < 0:
      raise ConfigError(f"config.loss.{name}={lc[name]} is negative; use a "
                        "value >= 0 (0 turns the option off)")
  if not 0.0 <= lc.lecam_decay < 1.0:
    raise ConfigError(f"config.loss.lecam_decay={lc.lecam_decay} must be in "
                      "[0, 1), e.g. 0.999")


# ----------------------------------------------------------------------------
# optimizer (both stages)

SCHEDULES = ("constant", "cosine")  # stage 2


def _vqgan_optim_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # 'reference': lr = base_learning_rate * global batch (the reference's
      # rule, with its per-device batch times devices); 'none': learning_rate.
      lr_scaling="reference", base_learning_rate=4.5e-6, learning_rate=1e-4,
      b1=0.5, b2=0.9, grad_clip=0.0, ema_decay=0.0))


def _transformer_optim_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr_scaling="reference", base_learning_rate=4.5e-6, learning_rate=3e-4,
      b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=0.0,
      schedule="constant",  # or 'cosine' (with warmup_steps)
      warmup_steps=0, grad_accum_steps=1))


def check_optim(config) -> None:
  """The learning-rate rule (``loop.learning_rate`` rejects an unknown
  ``lr_scaling``) and, in stage 2, the schedule."""
  from vqgan_jax.training import loop  # pylint: disable=g-import-not-at-top
  with as_config_error():
    loop.learning_rate(config)
  if "schedule" in config.optim:
    _choice("optim.schedule", config.optim.schedule, SCHEDULES)


# ----------------------------------------------------------------------------
# conditioning and GPT (stage 2)

def _conditioning_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="class",          # 'sos' | 'class' | 'codes' | 'coord'
      sos_token=0,
      num_classes=1000,
      # 'codes': a second VQGAN encodes the paired example of cond_dataset
      # (e.g. folder:/data/depth mirroring the image folder's file names),
      # or, without cond_dataset, a transform of the image itself.
      cond_vqgan_workdir="",
      cond_dataset="",
      cond_transform="identity",   # 'identity' | 'grayscale' | 'downsample'
      # classifier-free guidance: probability of the null class in training.
      label_dropout=0.0,
  ))


def _gpt_defaults() -> ml_collections.ConfigDict:
  """The reference's class-conditional ImageNet GPT (48 x 1536).

  The options beyond the sizes (dropout, remat, norm, mlp, position
  embedding, ...) and their defaults are `vqgan_jax.gpt.OPTIONS`.
  """
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  g = ml_collections.ConfigDict(dict(
      n_layer=48, n_head=24, n_embd=1536, block_size=0,  # 0: fit the sequence
      dtype="float32", param_dtype="float32"))
  for name, option in gpt_lib.OPTIONS.items():
    g[name] = option.default
  g.attention_impl = ml_collections.FieldReference(None, field_type=str)
  return g


def check_conditioning(config) -> None:
  """What precedes the image tokens, their order and their corruption."""
  from vqgan_jax import conditioning as cond_lib  # pylint: disable=g-import-not-at-top
  cc = config.conditioning
  _choice("conditioning.kind", cc.kind, cond_lib.KINDS)
  _choice("permuter", config.permuter, cond_lib.PERMUTERS)
  if not 0.0 < config.pkeep <= 1.0:
    raise ConfigError(f"config.pkeep={config.pkeep} must be in (0, 1]")
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
  if config.batch_size <= 0:
    raise ConfigError(f"config.batch_size={config.batch_size} must be > 0")
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
# schedule and cadence (both stages)


def check_cadence(config) -> None:
  if config.num_train_steps < 0:
    raise ConfigError(
        f"config.num_train_steps={config.num_train_steps} must be >= 0")
  for name in ("log_every", "checkpoint_every"):
    if config[name] <= 0:
      raise ConfigError(f"config.{name}={config[name]} must be > 0")
  if config.max_bad_steps < 1:
    raise ConfigError(f"config.max_bad_steps={config.max_bad_steps} must be "
                      ">= 1 (non-finite steps in a row before the run stops)")


# ----------------------------------------------------------------------------
# checkpoints named by the config (init_from, vqgan_workdir)


def _read_vqgan_info(field: str, path: str) -> Dict[str, Any]:
  """``model.json`` of a VQGAN directory (a transformer's ``vqgan/`` too)."""
  from vqgan_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ConfigError(f"config.{field}={path} does not exist; point it to a "
                      "stage-1 workdir or a directory written by `python -m "
                      "vqgan_jax.convert`")
  try:
    info = ckpt_lib.read_model_json(path)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.{field}={path}: {e}") from None
  if info.get("kind") != "vqgan" and os.path.isdir(os.path.join(path, "vqgan")):
    return _read_vqgan_info(field, os.path.join(path, "vqgan"))
  if info.get("kind") != "vqgan":
    raise ConfigError(f"config.{field}={path} holds a {info.get('kind')!r} "
                      "model, not a 'vqgan'; point it to a stage-1 workdir")
  if not (os.path.isdir(os.path.join(path, "params")) or
          os.path.isdir(os.path.join(path, ckpt_lib.CHECKPOINTS_DIR))):
    raise ConfigError(f"config.{field}={path} has a model.json but neither "
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
    have = _read_vqgan_info("init_from", config.init_from)["config"]
  have = dict(have)
  want = vqgan_lib.model_config(vqgan_lib.from_config(config.model.to_dict()))
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  diff = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs config {want[k]!r}"
                   for k in VQGAN_ARCH if norm(have.get(k)) != norm(want[k]))
  if not shapes_ok and not diff:
    diff = "parameter shapes differ"
  if diff:
    raise ConfigError(
        f"config.init_from={config.init_from} holds a different architecture:"
        f" {diff}; set config.model to the checkpoint's values")


# ----------------------------------------------------------------------------
# Entry points


def _run_defaults(c: ml_collections.ConfigDict, *, batch_size: int,
                  num_train_steps: int, eval_batches: int) -> None:
  """Batch, length, cadence, mesh and the non-finite guard (both stages)."""
  c.batch_size = batch_size
  c.num_train_steps = num_train_steps
  c.seed = 0
  c.log_every = 50
  c.eval_every = 5000
  c.eval_batches = eval_batches
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.mesh = mesh_config()
  c.partition_rules = ((".*", "fsdp"),)
  c.max_bad_steps = 20


def vqgan_config() -> ml_collections.ConfigDict:
  """Stage-1 defaults: the reference's ImageNet f16 recipe at 256x256."""
  c = ml_collections.ConfigDict()
  _data_defaults(c)
  c.model = _model_defaults()
  c.loss = _loss_defaults()
  c.disc = _disc_defaults()
  c.optim = _vqgan_optim_defaults()
  _run_defaults(c, batch_size=12, num_train_steps=500_000, eval_batches=8)
  c.image_every = 5000
  # A directory written by `python -m vqgan_jax.convert` (or a stage-1
  # workdir) to start from: generator, and discriminator/LPIPS when saved.
  c.init_from = ""
  # The official Lightning .ckpt that init_from was converted from: its Adam
  # states and global_step continue here (training/optimizer_import.py).
  c.init_from_optimizer = ""
  return c


def transformer_config() -> ml_collections.ConfigDict:
  """Stage-2 defaults: the reference's class-conditional ImageNet GPT."""
  c = ml_collections.ConfigDict()
  _data_defaults(c)
  # The frozen first stage: a stage-1 workdir or a converted checkpoint dir.
  c.vqgan_workdir = ""
  # Where the dataset's codes are cached ('' = <vqgan_workdir>/codes).
  c.codes_dir = ""
  c.conditioning = _conditioning_defaults()
  c.permuter = "identity"
  c.pkeep = 1.0
  c.gpt = _gpt_defaults()
  c.optim = _transformer_optim_defaults()
  _run_defaults(c, batch_size=16, num_train_steps=1_000_000, eval_batches=16)
  c.sample_every = 5000
  c.samples_per_class = 2
  c.sample_top_k = 0  # 0: no top-k in the periodic samples
  c.peak_tflops_per_device = 0.0  # 0: from the device kind when known
  return c


def check_vqgan(config) -> None:
  """The stage-1 checks that need only the config (no devices, no files)."""
  check_model(config.model)
  check_loss(config.loss)
  check_dataset("dataset", config.dataset)
  check_cadence(config)
  check_optim(config)


def check_transformer(config) -> None:
  """The stage-2 checks that need only the config (no devices, no files)."""
  if not config.vqgan_workdir:
    raise ConfigError("config.vqgan_workdir is empty: point it to a stage-1 "
                      "workdir (train_vqgan.py) or a converted VQGAN "
                      "(python -m vqgan_jax.convert)")
  check_conditioning(config)
  _check_gpt(config)
  check_dataset("dataset", config.dataset)
  check_cadence(config)
  check_optim(config)


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
  check_vqgan(config)
  check_mesh_and_batch(config, _num_devices(num_devices))
  if config.init_from:
    check_init_from(config)
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
  check_transformer(config)
  check_mesh_and_batch(config, _num_devices(num_devices))
  _read_vqgan_info("vqgan_workdir", config.vqgan_workdir)
  cc = config.conditioning
  if cc.kind == "codes":
    _read_vqgan_info("conditioning.cond_vqgan_workdir", cc.cond_vqgan_workdir)
