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


def check_finite(state, config, ckpt, step: int) -> None:
  """Stops the run after ``config.max_bad_steps`` skipped updates in a row."""
  if int(jax.device_get(state["bad_steps"])) >= config.max_bad_steps:
    raise FloatingPointError(
        f"{config.max_bad_steps} non-finite steps in a row at step {step}; "
        f"the last good checkpoint is step {ckpt.latest_step()} in "
        f"{ckpt.directory}")


def save_or_stop(ckpt, state, step: int, config, preempt, meta) -> bool:
  """Checkpoints on schedule, at the end, or on a signal; True means stop."""
  stop = runtime.any_process(preempt.should_stop)
  if step % config.checkpoint_every == 0 or stop or (
      step == config.num_train_steps):
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
