"""Pieces of the training loop shared by both trainers."""
from __future__ import annotations

import logging

import jax
import numpy as np

from vqgan_jax.training import runtime


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) global array as one numpy array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def learning_rate(config) -> float:
  """The reference's rule, base_lr x global batch x accumulation steps
  (``lr_scaling='reference'``), or ``learning_rate`` as given ('none')."""
  o = config.optim
  if o.lr_scaling == "reference":
    return float(o.base_learning_rate * config.batch_size *
                 o.get("grad_accum_steps", 1))
  if o.lr_scaling == "none":
    return float(o.learning_rate)
  raise ValueError(f"config.optim.lr_scaling={o.lr_scaling!r}; valid: "
                   "'reference' (base_learning_rate x batch_size) or 'none' "
                   "(learning_rate as given)")


class NonFiniteGuard:
  """Counts skipped updates and stops the run after too many in a row.

  The jitted steps skip any update whose loss or gradient is not finite
  (parameters, optimizer state, discriminator and EMA stay as they were) and
  report it as the ``skipped`` metric. ``update`` reads each step's flag one
  step late, so the host never waits for the step it has just dispatched;
  ``flush`` reads the newest one (at log and checkpoint steps, where the host
  syncs anyway). Every skipped step is logged and counted (``total``); after
  ``config.max_bad_steps`` in a row ``FloatingPointError`` names the steps and
  the last good checkpoint.

  Args:
    config: the run's config (``max_bad_steps``).
    ckpt: the run's ``Checkpointer`` (for the message).
    streak: skipped steps in a row before this run (the restored state's
      ``bad_steps``).
  """

  def __init__(self, config, ckpt, streak: int = 0):
    self.max_bad_steps = int(config.max_bad_steps)
    self.ckpt = ckpt
    self.streak = int(jax.device_get(streak))
    self.total = 0
    self._pending = None

  def update(self, step: int, metrics) -> None:
    """Checks the previous step, then holds ``metrics['skipped']`` of ``step``."""
    self.flush()
    self._pending = (step, metrics["skipped"])

  def flush(self) -> None:
    """Checks the held step (waits for it)."""
    if self._pending is None:
      return
    step, skipped = self._pending
    self._pending = None
    if not int(jax.device_get(skipped)):
      self.streak = 0
      return
    self.streak += 1
    self.total += 1
    logging.warning("step %d: the loss or a gradient is not finite; update "
                    "skipped (%d in a row, %d skipped in this run)", step,
                    self.streak, self.total)
    if self.streak >= self.max_bad_steps:
      raise FloatingPointError(
          f"{self.streak} non-finite steps in a row (steps "
          f"{step - self.streak + 1}-{step}, config.max_bad_steps="
          f"{self.max_bad_steps}); every one was skipped. The last good "
          f"checkpoint is step {self.ckpt.latest_step()} in "
          f"{self.ckpt.directory}: rerun the same command to resume from it, "
          "after lowering the learning rate or fixing the data")


def save_or_stop(ckpt, state, step: int, config, preempt, meta,
                 guard: NonFiniteGuard | None = None) -> bool:
  """Checkpoints on schedule, at the end, or on a signal; True means stop.

  With a ``guard``, a scheduled checkpoint in the middle of a run of skipped
  (non-finite) steps is not written, so the newest checkpoint stays the last
  good one; the final and the preemption checkpoints are always written.
  """
  stop = runtime.any_process(preempt.should_stop)
  final = step == config.num_train_steps
  if step % config.checkpoint_every == 0 or stop or final:
    if guard is not None:
      guard.flush()
    if guard is not None and guard.streak and not (stop or final):
      logging.warning("step %d: not checkpointing after %d non-finite steps "
                      "in a row", step, guard.streak)
    else:
      ckpt.save(step, state, meta, force=True)
  if stop:
    logging.warning("stopping at step %d after a signal", step)
  return stop


class Progress:
  """A tqdm bar on the primary process (no-op elsewhere)."""

  def __init__(self, enabled, start, total):
    self._bar = None
    if enabled:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm(total=total, initial=start, unit="step",
                         dynamic_ncols=True, mininterval=2.0)
      except ImportError:  # pragma: no cover
        pass

  def __call__(self, n):
    if self._bar is not None:
      self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
