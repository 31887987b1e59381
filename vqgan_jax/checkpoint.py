"""This project's checkpoint formats, and loading models from them.

The one home of the on-disk format, for inference and training alike: file
names, the commit marker, which steps a workdir holds, ``model.json``, and
restoring a workdir's state. The training side (asynchronous saves, checks
on resume, setting damaged steps aside) builds on these in
``vqgan_jax/training/checkpoints.py``.

Two layouts, both readable by :func:`load_vqgan` / :func:`load_transformer`:

* a *pretrained directory* (written by ``python -m vqgan_jax.convert`` and by
  :func:`save_pretrained`)::

    DIR/model.json     {"format": "vqgan-jax", "kind": ..., "config": {...}}
    DIR/params/        orbax checkpoint of the model variables
    DIR/extras/        optional: discriminator and LPIPS variables
    DIR/vqgan/         transformers only: their first stage (a pretrained dir)
    DIR/cond_vqgan/    transformers conditioned on codes: that VQGAN

* a *training workdir*: ``model.json`` as above plus ``checkpoints/`` (an
  orbax ``CheckpointManager`` with one directory per step, named by the step
  number, whose item ``state`` holds ``params`` and, when kept,
  ``ema_params``). A step counts once orbax has written its commit marker
  (the last file of a save); the newest such step is used.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

FORMAT = "vqgan-jax"
VERSION = 1
MODEL_FILE = "model.json"
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's step directories
COMMIT_MARKER = "commit_success.txt"  # written by orbax as a save's last file


class CheckpointNotFoundError(FileNotFoundError):
  """A path that holds no checkpoint of the expected kind."""


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def write_model_json(directory: str, kind: str, config: Dict[str, Any],
                     **info) -> None:
  """Writes ``model.json`` (kind, model config, anything else in ``info``)."""
  os.makedirs(directory, exist_ok=True)
  payload = {"format": FORMAT, "version": VERSION, "kind": kind,
             "config": config, **info}
  tmp = os.path.join(directory, MODEL_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MODEL_FILE))


def read_model_json(directory: str, expected_kind: Optional[str] = None) -> Dict:
  path = os.path.join(os.fspath(directory), MODEL_FILE)
  if not os.path.isfile(path):
    raise CheckpointNotFoundError(
        f"{directory} holds no {MODEL_FILE}: expected a training workdir or a "
        "directory written by `python -m vqgan_jax.convert`")
  try:
    with open(path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt ({e}); restore it from a backup or "
                     "convert the checkpoint again") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"{path} is not a vqgan-jax model file")
  if expected_kind and info.get("kind") != expected_kind:
    raise ValueError(
        f"{directory} holds a {info.get('kind')!r} model, not a "
        f"{expected_kind!r}; point to the matching directory")
  return info


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def save_tree(path: str, tree) -> None:
  """Saves a pytree of arrays with orbax (atomically: a temp dir is renamed)."""
  ocp = _ocp()
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, _to_numpy(tree), force=True)
    ckptr.wait_until_finished()


def restore_tree(path: str, target=None):
  """Restores a pytree saved by :func:`save_tree` (onto ``target``'s shardings if given)."""
  ocp = _ocp()
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f"no checkpoint at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(path)
    return ckptr.restore(path, target)


def save_pretrained(directory: str, kind: str, config: Dict[str, Any],
                    variables, extras: Optional[Dict[str, Any]] = None,
                    **info) -> str:
  """Writes a pretrained directory (see the module docstring)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  save_tree(os.path.join(directory, "params"), variables)
  if extras:
    save_tree(os.path.join(directory, "extras"), extras)
  write_model_json(directory, kind, config, **info)
  return directory


def step_dirs(checkpoint_dir: str) -> List[int]:
  """Steps whose directories orbax would list (plain integer names),
  committed or not."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def is_committed(checkpoint_dir: str, step) -> bool:
  """Whether the save of ``step`` finished (its commit marker is there)."""
  return os.path.exists(os.path.join(checkpoint_dir, str(step), COMMIT_MARKER))


def committed_steps(checkpoint_dir: str) -> List[int]:
  """The steps whose saves finished, oldest first (orbax itself lists
  uncommitted step directories on local disks)."""
  return [s for s in step_dirs(checkpoint_dir)
          if is_committed(checkpoint_dir, s)]


def unfinished_dirs(checkpoint_dir: str) -> List[str]:
  """Names of directories a save left unfinished: step directories without
  the commit marker, then orbax's temporary directories."""
  steps = [str(s) for s in step_dirs(checkpoint_dir)
           if not is_committed(checkpoint_dir, s)]
  tmp = sorted(n for n in os.listdir(checkpoint_dir)
               if re.search(r"\.orbax-checkpoint-tmp", n)
               ) if os.path.isdir(checkpoint_dir) else []
  return steps + tmp


def latest_step(checkpoint_dir: str) -> Optional[int]:
  """Newest complete step in an orbax ``CheckpointManager`` directory."""
  done = committed_steps(checkpoint_dir)
  return done[-1] if done else None


def restore_workdir_state(workdir: str) -> Tuple[Dict, int]:
  """``(state, step)`` of a training workdir's newest complete step; reads
  without moving or writing anything."""
  ocp = _ocp()
  ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
  step = latest_step(ckpt_dir)
  if step is None:
    raise CheckpointNotFoundError(
        f"{ckpt_dir} holds no complete checkpoint yet; train longer or "
        "point to another workdir")
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  return restored["state"], step


def first_stage_dir(path: str, info: Optional[Dict] = None) -> str:
  """The VQGAN directory of a transformer directory: the one its
  ``model.json`` names (``vqgan``, relative to ``path`` or absolute; a
  training workdir records its ``config.vqgan_workdir`` there), else
  ``path/vqgan`` (a converted transformer)."""
  path = os.path.abspath(os.fspath(path))
  info = read_model_json(path, "transformer") if info is None else info
  named = info.get("vqgan")
  first = os.path.join(path, named) if named else os.path.join(path, "vqgan")
  if not os.path.isdir(first):
    raise ValueError(f"{path} holds a 'transformer' model, not a 'vqgan', "
                     f"and its first stage {first} is missing; pass the "
                     "VQGAN's own directory")
  return first


def load_variables(path: str, kind: str, *, use_ema: bool = True
                   ) -> Tuple[Dict[str, Any], Dict]:
  """Returns ``(model.json contents, variables)`` of a pretrained dir or workdir."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f"no such directory: {path}")
  info = read_model_json(path)
  if info["kind"] == "transformer" and kind == "vqgan":
    return load_variables(first_stage_dir(path, info), kind, use_ema=use_ema)
  if info["kind"] != kind:
    raise ValueError(f"{path} holds a {info['kind']!r} model, not a {kind!r}")
  if os.path.isdir(os.path.join(path, "params")):
    return info, restore_tree(os.path.join(path, "params"))
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    state, step = restore_workdir_state(path)
    params = state.get("ema_params") if use_ema else None
    if params is None:
      params = state["params"]
    info = dict(info, step=int(step))
    return info, {"params": params}
  raise CheckpointNotFoundError(
      f"{path} has a {MODEL_FILE} but neither params/ nor {CHECKPOINTS_DIR}/")


def load_vqgan(path: str, *, dtype=None, use_ema: bool = True):
  """Loads ``(model, variables)`` of a VQGAN.

  Args:
    path: a stage-1 training workdir (newest complete checkpoint), a
      directory written by ``python -m vqgan_jax.convert``, or a transformer
      directory (a workdir or converted): its first stage, the VQGAN that
      its ``model.json`` names (see :func:`first_stage_dir`).
    dtype: compute dtype override (e.g. ``jnp.bfloat16``).
    use_ema: prefer the EMA parameters of a training workdir when kept.
  """
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  info, variables = load_variables(path, "vqgan", use_ema=use_ema)
  return vqgan_lib.from_config(info["config"], dtype=dtype), variables


def load_extras(path: str) -> Dict[str, Any]:
  """Discriminator/LPIPS variables saved next to a converted VQGAN ({} if none)."""
  extras = os.path.join(os.path.abspath(path), "extras")
  return restore_tree(extras) if os.path.isdir(extras) else {}


def load_transformer(path: str, *, dtype=None, use_ema: bool = True):
  """Loads ``(model, variables)`` of a stage-2 GPT.

  ``model.json`` of the directory records the conditioning (``info['conditioning']``)
  and where its VQGAN is; read it with :func:`read_model_json`.
  """
  from vqgan_jax import config_io  # pylint: disable=g-import-not-at-top
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
  info, variables = load_variables(path, "transformer", use_ema=use_ema)
  return config_io.from_config(gpt_lib.GPT, info["config"], dtype=dtype), variables
