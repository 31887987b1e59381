"""Config checks that run before anything compiles, loads data or writes.

Both trainers call :func:`validate_vqgan` / :func:`validate_transformer`
first thing in ``train_and_evaluate``. Every problem raises
:class:`ConfigError` (a ``ValueError``) with one line that names the field,
its value and what would be valid; ``training/launch.py`` prints it without
a traceback and exits with :data:`EXIT_CONFIG`. Nothing here imports
TensorFlow, builds a mesh, touches the data or the workdir.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Optional

# Exit codes of the training scripts (launch.py).
EXIT_CONFIG = 2  # a bad config, path or dataset, or a workdir of another
# architecture (checkpoints.CheckpointMismatchError): fix the command line
EXIT_NONFINITE = 3  # max_bad_steps non-finite steps in a row

GROUPNORM_GROUPS = 32  # modules.Normalize
DISC_LOSSES = ("hinge", "vanilla")
SCHEDULES = ("constant", "cosine")  # stage 2


class ConfigError(ValueError):
  """A config value that cannot work; the message says how to fix it."""


# ----------------------------------------------------------------------------
# Pieces


def check_model(m) -> None:
  """The stage-1 architecture: GroupNorm widths, downsampling, attention."""
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
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
  if m.quantizer not in vqgan_lib.QUANTIZERS:
    raise ConfigError(f"config.model.quantizer={m.quantizer!r}; valid: "
                      f"{vqgan_lib.QUANTIZERS}")
  if m.in_channels not in (1, 3):
    raise ConfigError(f"config.model.in_channels={m.in_channels}; the data "
                      "pipeline gives 1 (grayscale) or 3 (RGB) channels")


def check_dataset(field: str, value: str) -> None:
  """A ``config.dataset``-style string has one of the known forms."""
  from vqgan_jax.data import DATASET_FORMS  # pylint: disable=g-import-not-at-top
  kind, sep, arg = str(value).partition(":")
  if value == "digits" or (kind in ("folder", "tfds") and sep and arg):
    return
  raise ConfigError(f"unknown dataset {value!r}; config.{field} must be one "
                    f"of {', '.join(DATASET_FORMS)}")


def check_mesh_and_batch(config, num_devices: int) -> Dict[str, int]:
  """The mesh fits ``num_devices`` and the batch divides over it.

  Returns:
    The resolved ``{axis: size}`` mesh.
  """
  from vqgan_jax.training import sharding  # pylint: disable=g-import-not-at-top
  try:
    names, sizes = sharding.mesh_shape(config.mesh.to_dict(), num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.batch_size <= 0:
    raise ConfigError(f"config.batch_size={config.batch_size} must be > 0")
  if config.batch_size % num_devices:
    lo = config.batch_size // num_devices * num_devices
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the "
        f"{num_devices} devices of the mesh {dict(zip(names, sizes))}; use a "
        f"multiple of {num_devices} (e.g. {max(lo, num_devices)} or "
        f"{lo + num_devices})")
  return dict(zip(names, sizes))


def check_schedule(config) -> None:
  if config.num_train_steps < 0:
    raise ConfigError(
        f"config.num_train_steps={config.num_train_steps} must be >= 0")
  for name in ("log_every", "checkpoint_every"):
    if config[name] <= 0:
      raise ConfigError(f"config.{name}={config[name]} must be > 0")
  if config.get("max_bad_steps", 1) < 1:
    raise ConfigError(f"config.max_bad_steps={config.max_bad_steps} must be "
                      ">= 1 (non-finite steps in a row before the run stops)")


def _arch_diff(have: Dict[str, Any], want: Dict[str, Any], keys) -> str:
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  diff = [f"{k}: checkpoint {have.get(k)!r} vs config {want[k]!r}"
          for k in keys if norm(have.get(k)) != norm(want[k])]
  return ", ".join(diff)


VQGAN_ARCH = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
              "in_channels", "resolution", "z_channels", "n_embed",
              "embed_dim", "quantizer")


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
          os.path.isdir(os.path.join(path, "checkpoints"))):
    raise ConfigError(f"config.{field}={path} has a model.json but neither "
                      "params/ nor checkpoints/; train stage 1 there first")
  return info


def check_init_from(config) -> None:
  """``config.init_from`` holds a VQGAN of the configured architecture."""
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  info = _read_vqgan_info("init_from", config.init_from)
  want = vqgan_lib.model_config(vqgan_lib.from_config(config.model.to_dict()))
  diff = _arch_diff(dict(info["config"]), want, VQGAN_ARCH)
  if diff:
    raise ConfigError(
        f"config.init_from={config.init_from} holds a different architecture:"
        f" {diff}; set config.model to the checkpoint's values")


# ----------------------------------------------------------------------------
# Entry points


@contextlib.contextmanager
def as_config_error():
  """Re-raises a ``ValueError`` of a trainer's own checks as ConfigError."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_training(config, num_devices: Optional[int],
                    extra: Optional[Callable[[Any], None]]) -> None:
  """Checks both stages share: schedule, learning rate, the trainer's own
  `extra` checks, and the mesh and batch against the devices."""
  from vqgan_jax.training import loop  # pylint: disable=g-import-not-at-top
  check_schedule(config)
  with as_config_error():
    loop.learning_rate(config)
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  if extra is not None:
    with as_config_error():
      extra(config)
  check_mesh_and_batch(config, num_devices)


def validate_vqgan(config, num_devices: Optional[int] = None,
                   extra: Optional[Callable[[Any], None]] = None) -> None:
  """Every stage-1 check, before any device work.

  Args:
    config: the stage-1 config.
    num_devices: devices the mesh must fit (default ``jax.device_count()``).
    extra: the trainer's own ``validate_config``; its ValueErrors become
      ConfigErrors.

  Raises:
    ConfigError: the first problem found.
  """
  check_model(config.model)
  if config.loss.disc_loss not in DISC_LOSSES:
    raise ConfigError(f"config.loss.disc_loss={config.loss.disc_loss!r}; "
                      f"valid: {DISC_LOSSES}")
  check_dataset("dataset", config.dataset)
  _check_training(config, num_devices, extra)
  if config.init_from:
    check_init_from(config)


def validate_transformer(config, num_devices: Optional[int] = None,
                         extra: Optional[Callable[[Any], None]] = None
                         ) -> None:
  """Every stage-2 check that needs no data and no compiled function (see
  :func:`validate_vqgan` for the arguments)."""
  from vqgan_jax import conditioning as cond_lib  # pylint: disable=g-import-not-at-top
  if not config.vqgan_workdir:
    raise ConfigError("config.vqgan_workdir is empty: point it to a stage-1 "
                      "workdir (train_vqgan.py) or a converted VQGAN "
                      "(python -m vqgan_jax.convert)")
  cc = config.conditioning
  if cc.kind not in cond_lib.KINDS:
    raise ConfigError(f"config.conditioning.kind={cc.kind!r}; valid: "
                      f"{cond_lib.KINDS}")
  if config.permuter not in cond_lib.PERMUTERS:
    raise ConfigError(f"config.permuter={config.permuter!r}; valid: "
                      f"{cond_lib.PERMUTERS}")
  if not 0.0 < config.pkeep <= 1.0:
    raise ConfigError(f"config.pkeep={config.pkeep} must be in (0, 1]")
  if cc.kind == "codes" and not cc.cond_vqgan_workdir:
    raise ConfigError("config.conditioning.kind='codes' needs "
                      "config.conditioning.cond_vqgan_workdir (a stage-1 "
                      "workdir that encodes the conditioning images)")
  g = config.gpt
  if g.n_embd % g.n_head:
    raise ConfigError(f"config.gpt.n_embd={g.n_embd} is not divisible by "
                      f"config.gpt.n_head={g.n_head}; use a multiple of "
                      f"{g.n_head}")
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  for field, valid in (("norm", gpt_lib.NORMS), ("mlp", gpt_lib.MLPS),
                       ("position_embedding", gpt_lib.POSITION_EMBEDDINGS),
                       ("remat_policy", gpt_lib.REMAT_POLICIES)):
    if field in g and g[field] not in valid:
      raise ConfigError(f"config.gpt.{field}={g[field]!r}; valid: {valid}")
  if config.optim.schedule not in SCHEDULES:
    raise ConfigError(f"config.optim.schedule={config.optim.schedule!r}; "
                      f"valid: {SCHEDULES}")
  check_dataset("dataset", config.dataset)
  if cc.get("cond_dataset"):
    check_dataset("conditioning.cond_dataset", cc.cond_dataset)
  _check_training(config, num_devices, extra)
  _read_vqgan_info("vqgan_workdir", config.vqgan_workdir)
  if cc.kind == "codes":
    _read_vqgan_info("conditioning.cond_vqgan_workdir", cc.cond_vqgan_workdir)
