"""Training-process concerns: multi-host start-up, SIGTERM and coordinated
stops.

Settings that inference shares (the host allocator, the compilation cache)
live in `vqgan_jax.backends`."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 auto: bool = False) -> None:
  """Calls ``jax.distributed.initialize`` when launched on several hosts.

  Explicit arguments (or the ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables) select a
  cluster by hand; ``auto=True`` lets JAX detect TPU pods, SLURM or
  Open MPI. Single-host runs call nothing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and "
                       "process_id (flags or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


class PreemptionHandler:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a stop the training loop polls.

  The loop asks :meth:`stop_at` once per step and, when it says so, saves a
  checkpoint of the current step and exits cleanly. After the first signal
  both signals get their default action back, so a second one ends the
  process at once, even while it waits for a step or a save; the newest
  committed checkpoint stays intact (a save caught half-written has no
  commit marker and is set aside on the next start).

  On several processes every one must stop at the same step. With JAX's
  preemption service (started by ``jax.distributed.initialize``) SIGTERM is
  left to its notifier, which tells every process, and
  ``reached_preemption_sync_point`` agrees on the step without any device
  work; SIGINT is passed on to it as SIGTERM. Without the service the flag
  is all-gathered every step (:func:`any_process`).

  Args:
    signals: the signals that ask for a stop.
    coordinated: use JAX's preemption sync point (default: when running on
      several processes and the service is up).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT),
               coordinated: Optional[bool] = None):
    self._event = threading.Event()
    self._previous = {}
    self.signum: Optional[int] = None
    self.coordinated = (_preemption_service() if coordinated is None
                        else coordinated)
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        if self.coordinated and sig == signal.SIGTERM:
          continue  # JAX's preemption notifier owns it
        self._previous[sig] = signal.getsignal(sig)
        signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._event.is_set():  # only reached if a handler was put back
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    self._event.set()
    for sig in self._previous:  # a second signal ends the process at once
      signal.signal(sig, signal.SIG_DFL)
    name = signal.Signals(signum).name
    logging.warning("received signal %d: saving a checkpoint and stopping "
                    "after the current step (%s; send it again to quit at "
                    "once, keeping the last complete checkpoint)", signum, name)
    if self.coordinated:
      os.kill(os.getpid(), signal.SIGTERM)  # tell every process

  @property
  def should_stop(self) -> bool:
    """A signal reached this process (see :meth:`stop_at` for the decision
    every process shares)."""
    return self._event.is_set()

  def stop_at(self, step: int) -> bool:
    """True on every process at the same step once any of them got a
    signal. Call it once per step, with the step number, on every process."""
    if self.coordinated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return any_process(self.should_stop)

  def restore(self):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)


def _preemption_service() -> bool:
  """JAX's preemption sync manager runs (several processes only)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return False
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any (for coordinated stops)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return flag
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray([int(flag)]))
  return bool(np.asarray(flags).any())
