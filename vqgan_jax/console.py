"""What the command-line tools print, and the chatter they keep quiet.

* :func:`quiet_logs` silences third-party INFO chatter: the checkpoint
  library's (orbax logs each save and restore through absl) and JAX's probe
  for a TPU backend (``Unable to initialize backend 'tpu'``), unless the
  tool runs with ``--verbose``. `vqgan_jax.cli` calls it for every entry
  point once the flags are parsed; the project's own log lines are kept.
* :class:`LogsAboveBar` prints log records as plain lines above a tqdm
  bar while the bar is open, instead of through the console handlers
  (absl's among them) that would cut the bar's line in two.
* :class:`CompileClock` measures the seconds JAX spends tracing, lowering
  and compiling while it is open, so that a throughput line can leave
  compilation out (:class:`Stopwatch`).

Importing this module does not import JAX.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, List, Optional, Tuple

# Loggers whose INFO lines are third-party chatter (orbax logs through
# absl's logger; some of its modules log under their own names).
CHATTY_LOGGERS = ("absl", "orbax")
# JAX logs every backend it probes and cannot start (libtpu not installed,
# on every CPU/GPU machine); the backend that does start is all that matters.
_BACKEND_LOGGER = "jax._src.xla_bridge"
_BACKEND_PROBE = "Unable to initialize backend"


class _DropBackendProbe(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BACKEND_PROBE)


_FILTER = _DropBackendProbe()


class PlainFormatter(logging.Formatter):
  """A log line as the console prints it: the message alone, warnings and
  errors prefixed with their level (``WARNING: ...``), a traceback after
  it when there is one."""

  def format(self, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.levelno >= logging.WARNING:
      text = f"{record.levelname}: {text}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


_PLAIN = PlainFormatter()


def quiet_logs(verbose: bool = False) -> None:
  """Silences third-party INFO chatter (``verbose=False``) or lets it
  through again (``verbose=True``); warnings and errors always pass.

  Without ``verbose`` absl's handler (the one ``absl.app`` installs) prints
  plain lines (:class:`PlainFormatter`) instead of its
  ``I1204 18:57:46.362693 140564225177280 file.py:277]`` prefix; with it,
  the prefix is back.
  """
  absl_logging = sys.modules.get("absl.logging")
  if absl_logging is not None:
    absl_logging.get_absl_handler().setFormatter(
        absl_logging.PythonFormatter() if verbose else _PLAIN)
  probe = logging.getLogger(_BACKEND_LOGGER)
  for name in CHATTY_LOGGERS:
    logging.getLogger(name).setLevel(logging.NOTSET if verbose
                                     else logging.WARNING)
  if verbose:
    probe.removeFilter(_FILTER)
  else:
    probe.addFilter(_FILTER)


def _is_console(handler: logging.Handler) -> bool:
  """True for a handler that writes to the terminal: absl's (which wraps
  a stream handler on stderr) or a stream handler on stdout/stderr."""
  if type(handler).__name__ == "ABSLHandler":
    return True
  return (isinstance(handler, logging.StreamHandler)
          and getattr(handler, "stream", None) in (sys.stdout, sys.stderr))


class _Mute(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return False


class LogsAboveBar(logging.Handler):
  """While open, log records print through ``bar.write`` above the bar.

  The root logger's console handlers are muted for that time (handlers
  that do not write to the terminal, such as pytest's capture, are left
  alone) and this handler takes their place: a warning reads
  ``WARNING: text``, an INFO line reads as its text. Records the muted
  handlers' levels would have dropped are dropped.

      with LogsAboveBar(bar):
        ... steps that may log ...
  """

  def __init__(self, bar: Any):
    super().__init__()
    self._bar = bar
    self._mute = _Mute()
    self._muted: List[logging.Handler] = []

  def emit(self, record: logging.LogRecord) -> None:
    try:
      self._bar.write(_PLAIN.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def open(self) -> "LogsAboveBar":
    root = logging.getLogger()
    self._muted = [h for h in root.handlers if _is_console(h)]
    for h in self._muted:
      h.addFilter(self._mute)
    # What the muted handlers would have let through, this one lets through.
    self.setLevel(min((h.level for h in self._muted), default=logging.NOTSET))
    root.addHandler(self)
    return self

  def close(self) -> None:
    root = logging.getLogger()
    root.removeHandler(self)
    for h in self._muted:
      h.removeFilter(self._mute)
    self._muted = []
    super().close()

  def __enter__(self) -> "LogsAboveBar":
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()


# JAX's monitoring events that time one compilation's stages.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Seconds of wall time JAX spent compiling while the clock was open.

  A context manager over ``jax.monitoring``'s time spans of tracing,
  lowering and XLA compilation (a persistent-cache hit counts as its
  lookup); nested spans (a jit traced inside another) count once.

      with CompileClock() as clock:
        ... run jitted functions ...
      steady = wall_seconds - clock.seconds
  """

  def __init__(self):
    self._spans: List[Tuple[float, float]] = []

  def _listen(self, event, start_time, end_time, **kwargs):
    del kwargs
    if event in COMPILE_EVENTS:
      self._spans.append((float(start_time), float(end_time)))

  def __enter__(self) -> "CompileClock":
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.register_event_time_span_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    try:
      monitoring.unregister_event_time_span_listener(self._listen)
    except (AssertionError, ValueError):  # already gone
      pass

  @property
  def seconds(self) -> float:
    """The union of the compile spans seen so far, in seconds."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(self._spans):
      if b <= end:
        continue
      total += b - max(a, end)
      end = b
    return total


class Stopwatch:
  """Wall time of jitted calls, with compilation left out.

  Each ``with watch:`` block adds its wall time (and the compile time in
  it); :meth:`count` adds the items done.

      watch = Stopwatch()
      for batch in batches:
        with watch:
          out = jax.device_get(fn(batch))
        watch.count(len(batch))
      watch.rate  # items per second, compilation not counted
  """

  def __init__(self):
    self.clock = CompileClock()
    self.items = 0
    self._t0: Optional[float] = None
    self.wall = 0.0

  def __enter__(self) -> "Stopwatch":
    self.clock.__enter__()
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self.wall += time.perf_counter() - self._t0
    self.clock.__exit__(*exc)

  def count(self, n: int) -> None:
    self.items += int(n)

  @property
  def compile_seconds(self) -> float:
    return min(self.clock.seconds, self.wall)

  @property
  def steady_seconds(self) -> float:
    return max(self.wall - self.clock.seconds, 0.0)

  @property
  def rate(self) -> float:
    """Items per second of the time not spent compiling (0.0 when no item
    was counted; never NaN)."""
    return rate(self.items, self.steady_seconds)


def rate(items: float, seconds: float) -> float:
  """``items / seconds``; 0.0 when nothing was timed (never NaN)."""
  return float(items) / seconds if items and seconds > 0 else 0.0


def format_duration(seconds: float) -> str:
  """``75 -> '1 min 15 s'``, ``5400 -> '1 h 30 min'``, ``0.25 -> '0.25 s'``."""
  if seconds < 10:
    return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
  s = int(round(seconds))
  if s < 60:
    return f"{s} s"
  if s < 3600:
    return f"{s // 60} min {s % 60} s"
  if s < 48 * 3600:
    return f"{s // 3600} h {s % 3600 // 60} min"
  return f"{s / 86400:.1f} days"
