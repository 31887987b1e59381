"""The training loop both trainers run, and its pieces.

:func:`restore_or_init` resumes from the newest checkpoint or builds a fresh
state; :func:`train_loop` runs the steps: checkpointing on schedule, at the
end and on SIGTERM/SIGINT (:func:`save_or_stop`), the non-finite guard
(:class:`NonFiniteGuard`), ``metrics.jsonl`` logging, a progress bar, and
stage-specific callbacks (evaluation, image grids) on their own cadence.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import jax

from vqgan_jax import console
from vqgan_jax import digest
from vqgan_jax.training import checkpoints
from vqgan_jax.training import metrics as metrics_lib
from vqgan_jax.training import runtime

PyTree = Any
SETTLE_STEP_S = 1.0  # steps at least this long run one at a time


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
                 guard: NonFiniteGuard | None = None,
                 stop: Optional[bool] = None) -> bool:
  """Checkpoints on schedule, at the end, or on a signal; True means stop.

  ``stop`` is ``preempt.stop_at(step)`` (the decision every process shares)
  unless the caller has asked already. With a ``guard``, a scheduled
  checkpoint in the middle of a run of skipped (non-finite) steps is not
  written, so the newest checkpoint stays the last good one; the final and
  the preemption checkpoints are always written.
  """
  if stop is None:
    stop = preempt.stop_at(step)
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
  """A labelled tqdm bar on the primary process (no-op elsewhere).

  The label names the run (e.g. ``stage 1 VQGAN``); :meth:`show` puts the
  metrics ``keys`` of a log step beside tqdm's rate and ETA (values already
  fetched to the host for ``metrics.jsonl``, so the bar adds no device
  sync); :meth:`note` prints a line above the bar (eval results, the
  measured step time).
  """

  def __init__(self, enabled, start, total, label: Optional[str] = None,
               keys: Sequence[str] = ("loss",)):
    self._bar = None
    self._enabled = enabled
    self.keys = tuple(keys)
    if enabled:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm(total=total, initial=start, unit="step", desc=label,
                         dynamic_ncols=True, mininterval=2.0)
      except ImportError:  # pragma: no cover
        pass
    # Log lines written while the bar is open (checkpoint saves, warnings)
    # print above it rather than through the console handlers.
    self._logs = (console.LogsAboveBar(self._bar).open()
                  if self._bar is not None else None)

  def __call__(self, n):
    if self._bar is not None:
      self._bar.update(n)

  def show(self, metrics: Dict[str, Any]) -> None:
    """Shows the ``keys`` of ``metrics`` (host values) beside the bar."""
    parts = [f"{k} {float(metrics[k]):.4g}" for k in self.keys
             if k in metrics]
    if self._bar is not None and parts:
      self._bar.set_postfix_str(" ".join(parts), refresh=False)

  def note(self, text: str) -> None:
    """Prints ``text`` on its own line above the bar."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:  # pragma: no cover
      print(text, flush=True)

  def close(self):
    if self._logs is not None:
      self._logs.close()
      self._logs = None
    if self._bar is not None:
      self._bar.close()


def format_eval(step: int, metrics: Dict[str, Any]) -> Optional[str]:
  """``'step 400: eval psnr 31.20 dB, l1 0.0412, ...'`` for the ``eval_*``
  numbers of ``metrics`` (None when it has none)."""
  parts = []
  for key, v in metrics.items():
    if not key.startswith("eval_") or not isinstance(v, (int, float)):
      continue
    name = key[len("eval_"):]
    if name == "psnr":
      parts.append(f"psnr {v:.2f} dB")
    elif name in ("codebook_usage", "accuracy"):
      parts.append(f"{name.replace('_', ' ')} {100 * v:.1f}%")
    elif name == "images":
      parts.append(f"on {v} images")
    else:
      parts.append(f"{name.replace('_', ' ')} {v:.4g}")
  return f"step {step}: eval " + ", ".join(parts) if parts else None


class StepClock:
  """Measures seconds per step once, early in the run, and gives the ETA.

  Call :meth:`tick` after each step's non-finite check, which has waited
  for the step before it: the clock starts when the run's first step has
  finished (so its compile and warm-up are not counted) and reports after
  ``min_steps`` more steps, or after ``min_seconds`` if steps are slow.
  It adds no device sync.
  """

  def __init__(self, start: int, total: int, min_steps: int = 10,
               min_seconds: float = 20.0):
    self.start, self.total = start, total
    self.min_steps, self.min_seconds = min_steps, min_seconds
    self._t0: Optional[float] = None
    self.seconds_per_step: Optional[float] = None

  def tick(self, step: int) -> Optional[str]:
    """``step`` was just dispatched (``step - 1`` has finished); returns the
    measurement line the one time it is ready."""
    if self.seconds_per_step is not None:
      return None
    done = step - 1
    now = time.perf_counter()
    if done == self.start + 1:
      self._t0 = now
      return None
    if self._t0 is None:
      return None
    measured = done - self.start - 1
    elapsed = now - self._t0
    if measured < self.min_steps and elapsed < self.min_seconds:
      return None
    self.seconds_per_step = elapsed / measured
    left = self.total - done
    return (f"{self.seconds_per_step:.3g} s/step (measured over steps "
            f"{self.start + 2}-{done}, after the first); ETA "
            f"{console.format_duration(left * self.seconds_per_step)} for "
            f"the {left} steps left of {self.total}")


def restore_or_init(ckpt, abstract_state: PyTree, state_shardings: PyTree,
                    init: Callable[[], PyTree]) -> Tuple[PyTree, int]:
  """``(state, step)``: the newest checkpoint in ``ckpt``, restored onto
  ``state_shardings``, or ``(init(), 0)`` when there is none.

  First the workdir must have room for one more checkpoint of
  ``abstract_state`` (a ``ConfigError`` otherwise: exit 2 before any step).
  """
  checkpoints.check_workdir(os.path.dirname(ckpt.directory),
                            checkpoints.state_bytes(abstract_state))
  start = ckpt.latest_step()
  if start is None:
    return distinct_buffers(init()), 0
  state, _, start = ckpt.restore(checkpoints.abstract_with_shardings(
      abstract_state, state_shardings))
  logging.info("resumed from step %d in %s", start,
               os.path.dirname(ckpt.directory))
  return state, start


def distinct_buffers(state: PyTree) -> PyTree:
  """``state`` with every array that appears more than once copied.

  The train step donates its state, and XLA refuses to donate one buffer
  twice. An initial state can hold the same array in two places: loaded
  weights that also start the weight average (``ema_params``) or a
  codebook's EMA statistics.
  """
  seen = set()

  def buffers(x):
    try:
      return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
    except Exception:  # pylint: disable=broad-except
      return {("object", id(x))}  # a backend without raw pointers

  def once(x):
    if isinstance(x, jax.Array):
      mine = buffers(x)
      if mine & seen:
        x = x.copy()
        mine = buffers(x)
      seen.update(mine)
    return x

  return jax.tree.map(once, state)


class StepPacer:
  """Keeps one step in flight, not two, once steps are slow.

  The host normally dispatches step k+1 while step k runs, and the loop can
  stop only after the steps it has dispatched: with steps of minutes a
  signal cost two of them. Once an iteration takes ``SETTLE_STEP_S`` or
  more (the host's own time is then negligible) :meth:`settle` waits for
  the step just dispatched before the loop decides whether to stop, so a
  signal ends the run after the step that was running when it came.
  """

  def __init__(self):
    self._t = time.perf_counter()
    self.slow = False

  def settle(self, state: PyTree) -> None:
    if self.slow:
      jax.block_until_ready(state)
    now = time.perf_counter()
    self.slow, self._t = now - self._t >= SETTLE_STEP_S, now


class RunSummary(dict):
  """What :func:`train_loop` returns: the last logged metrics (a dict), and
  how the run ended: ``start_step``, ``step`` (the last step trained and
  saved), ``num_train_steps`` and ``stopped`` (a signal stopped it)."""
  start_step = 0
  step = 0
  num_train_steps = 0
  stopped = False

  def describe(self, workdir: str, command: str) -> str:
    """One line for the console: done, nothing to do, or where a signal
    stopped the run and the ``command`` that resumes it."""
    if self.stopped:
      return (f"stopped at step {self.step} of {self.num_train_steps} after a "
              f"signal; the checkpoint of step {self.step} is saved in "
              f"{workdir}. Resume with: {command}")
    if self.step == self.start_step:
      return (f"nothing to train: {workdir} already holds step {self.step} "
              f"of config.num_train_steps={self.num_train_steps}; raise it "
              "to train further, or pass a new --workdir")
    summary = ", ".join(f"{k} {v:.4g}" for k, v in self.items()
                        if isinstance(v, float))
    return (f"done: {workdir}, steps {self.start_step + 1}-{self.step} "
            f"({summary})")


def _report_speed(progress: Progress, clock: StepClock, step: int) -> None:
  line = clock.tick(step)
  if line:
    progress.note(line)


def _report_eval(progress: Progress, step: int, out: Dict[str, Any]) -> None:
  line = format_eval(step, out)
  if line:
    progress.note(line)


@dataclasses.dataclass
class Periodic:
  """A callback of :func:`train_loop` every ``every`` steps (0: never).

  ``fn(step, state, batch)`` runs after the step's logging; what it returns
  (a metrics dict, or None) is written to ``metrics.jsonl`` at that step.
  With ``at_end`` it also runs after the last step.
  """
  every: int
  fn: Callable[[int, PyTree, Any], Optional[Dict[str, Any]]]
  at_end: bool = True

  def due(self, step: int, final: bool) -> bool:
    return bool(self.every) and (step % self.every == 0 or
                                 (self.at_end and final))


def train_loop(config, workdir: str, ckpt, state: PyTree, start_step: int, *,
               next_batch: Callable[[int], Any],
               step_fn: Callable[[PyTree, Any], Tuple[PyTree, Any]],
               log_extras: Callable[[float, int], Dict[str, Any]],
               units_per_step: int = 1,
               periodic: Sequence[Periodic] = (),
               checkpoint_meta: Optional[Dict[str, Any]] = None,
               on_exit: Iterable[Callable[[], None]] = (),
               label: Optional[str] = None,
               progress_keys: Sequence[str] = ("loss",)) -> Dict[str, Any]:
  """Trains from ``start_step`` to ``config.num_train_steps``.

  Each step: ``batch = next_batch(step)`` (the step before it runs), then
  ``state, metrics = step_fn(state, batch)``. Every ``config.log_every``
  steps and at the last one the metrics, with ``log_extras(rate,
  skipped_total)`` added (``rate``: ``units_per_step`` per second since the
  last log), go to ``metrics.jsonl``; then the ``periodic`` callbacks run
  in order; then :func:`save_or_stop` checkpoints (``{'step': step,
  **checkpoint_meta}``) and stops the loop on a signal. At the end every
  process writes its replica digest. ``on_exit`` callables run first when
  the loop exits, however it exits, then the checkpointer (waiting for an
  async save), the metrics writer, the signal handlers and the progress
  bar close.

  On a signal (:class:`runtime.PreemptionHandler`, the same step on every
  process) the current step is checkpointed without its periodic callbacks
  and the loop ends; no further step is dispatched. A checkpoint that cannot
  be written raises ``checkpoints.CheckpointSaveError``.

  The progress bar carries ``label`` (default: the workdir's name) and the
  ``progress_keys`` metrics of the last log step; the seconds per step and
  the ETA measured after the first steps (:class:`StepClock`) and each
  callback's ``eval_*`` numbers print as lines above it.

  Returns:
    a :class:`RunSummary`: the last logged metrics, updated with those of
    the periodic callbacks, and where the run ended.
  """
  primary = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step,
                                     is_primary=primary)
  preempt = runtime.PreemptionHandler()
  timer = metrics_lib.RateTimer()
  progress = Progress(primary, start_step, config.num_train_steps,
                      label=label or os.path.basename(workdir),
                      keys=progress_keys)
  clock = StepClock(start_step, config.num_train_steps)
  guard = NonFiniteGuard(config, ckpt, state["bad_steps"])
  pacer = StepPacer()
  last: Dict[str, Any] = {}
  step = start_step
  stopped = False
  try:
    while step < config.num_train_steps:
      batch = next_batch(step)
      state, m = step_fn(state, batch)
      step += 1
      guard.update(step, m)
      _report_speed(progress, clock, step)
      timer.add(units_per_step)
      progress(1)
      final = step == config.num_train_steps
      if step % config.log_every == 0 or final:
        m = jax.device_get(m)
        guard.flush()
        last = writer.write(step, dict(m, **log_extras(timer.rate(),
                                                       guard.total)))
        progress.show(last)
      pacer.settle(state)
      stop = preempt.stop_at(step)
      for p in periodic:
        if p.due(step, final) and not stop:
          out = p.fn(step, state, batch)
          if out is not None:
            last.update(writer.write(step, out))
            _report_eval(progress, step, out)
      if save_or_stop(ckpt, state, step, config, preempt,
                      {"step": step, **(checkpoint_meta or {})}, guard=guard,
                      stop=stop):
        stopped = True
        break
    digest.write_replica_digest(workdir, state["params"])
  finally:
    for fn in on_exit:
      fn()
    ckpt.close()
    writer.close()
    preempt.restore()
    progress.close()
  result = RunSummary(last)
  result.start_step, result.step, result.stopped = start_step, step, stopped
  result.num_train_steps = int(config.num_train_steps)
  return result
