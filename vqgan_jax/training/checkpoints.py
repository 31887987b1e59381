"""Workdir checkpoints: orbax CheckpointManager with atomic, async saves.

A step directory counts only once orbax has committed it, so a run killed in
the middle of a save leaves the previous step intact and the next start
resumes from it. Steps that are there but incomplete (no commit marker, or
files missing or damaged so that restoring fails) are moved aside to
``checkpoints/STEP.incomplete-N`` with a warning, and the newest complete
step before them is used.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

COMMIT_MARKER = "commit_success.txt"  # written by orbax as a save's last file


class Checkpointer:
  """Saves and restores ``{'state': pytree, 'meta': json}`` per step."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._set_aside([str(step) for step in _step_dirs(self.directory)
                     if not os.path.exists(os.path.join(
                         self.directory, str(step), COMMIT_MARKER))] +
                    _tmp_dirs(self.directory),
                    "a save that never finished (no commit marker)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts an (asynchronous) save of ``state`` at ``step``."""
    saved = self._mngr.save(
        int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      logging.info("saving checkpoint at step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any], int]:
    """Restores onto ``abstract_state``'s shapes, dtypes and shardings.

    Without ``step``, the newest step that restores: a newer step that fails
    to restore while an older one succeeds is damaged (a config mismatch
    would fail on every step), so it is moved aside with a warning. When
    every step fails, the newest step's error is raised and nothing moves.

    Returns:
      ``(state, meta, step)``.
    """
    if step is not None:
      return self._restore(abstract_state, step) + (step,)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    errors = []
    for s in steps:
      try:
        state, meta = self._restore(abstract_state, s)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); "
                        "trying an older step", s, self.directory,
                        type(e).__name__, str(e)[:300])
        errors.append((s, e))
        continue
      if errors:
        self._set_aside([str(bad) for bad, _ in errors],
                        f"it does not restore while step {s} does")
      return state, meta, s
    raise errors[0][1]

  def _restore(self, abstract_state, step: int):
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def _set_aside(self, names, why: str) -> None:
    """Moves damaged step directories out of orbax's sight (process 0; every
    process calls this, with or without names, so the barrier lines up)."""
    for name in names:
      logging.warning("ignoring checkpoint %s in %s: %s; moving it to "
                      "%s.incomplete-N", name, self.directory, why,
                      name.split(".")[0])
    if jax.process_index() == 0:
      for name in names:
        dst = os.path.join(self.directory, name.split(".")[0] + ".incomplete")
        n = 0
        while os.path.exists(f"{dst}-{n}"):
          n += 1
        os.rename(os.path.join(self.directory, name), f"{dst}-{n}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints_set_aside")
    if names and getattr(self, "_mngr", None) is not None:
      self._mngr.reload()

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (for restore)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _step_dirs(directory: str):
  """Steps whose directories orbax would list (plain integer names)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _tmp_dirs(directory: str):
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory)
                if re.search(r"\.orbax-checkpoint-tmp", n))
