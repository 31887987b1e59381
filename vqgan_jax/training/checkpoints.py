"""Workdir checkpoints: orbax CheckpointManager with atomic, async saves.

A step directory counts only once orbax has committed it, so a run killed in
the middle of a save leaves the previous step intact and the next start
resumes from it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``{'state': pytree, 'meta': json}`` per step."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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

    Returns:
      ``(state, meta, step)``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {}), step

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
