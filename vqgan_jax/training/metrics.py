"""Metrics to ``metrics.jsonl`` and TensorBoard, and throughput timers."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import types
from typing import Any, Dict, Mapping

import numpy as np


def _scalar(v) -> Any:
  v = np.asarray(v)
  if v.size != 1:
    raise ValueError(f"metric is not a scalar: shape {v.shape}")
  v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; keep them visible
  return v


def _event_file_writer():
  """TensorBoard's event-file writer, without letting it import TensorFlow.

  tensorboard uses its TensorFlow stub when ``tensorboard.compat.notf``
  exists; registering that marker keeps a 2 GB TensorFlow out of training
  processes (and off the accelerators).
  """
  sys.modules.setdefault("tensorboard.compat.notf",
                         types.ModuleType("tensorboard.compat.notf"))
  try:
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return EventFileWriter


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard.

  On resume, lines of steps after the restored step (written after the last
  checkpoint of the interrupted, killed or failed run) are dropped, so the
  file stays a single history: each step once, none missing.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0,
               is_primary: bool = True, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.is_primary = is_primary
    self._tb = None
    if not is_primary:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_step:
              keep.append(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill
      tmp = self.path + ".tmp"  # replaced in one step: a kill loses nothing
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    if tensorboard:
      writer_cls = _event_file_writer()
      if writer_cls is None:
        logging.info("tensorboard not installed: metrics go to metrics.jsonl only")
      else:
        self._tb = writer_cls(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.is_primary:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                for k, v in row.items()
                if k != "step" and isinstance(v, (int, float))]
      self._tb.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=summary_pb2.Summary(value=values)))
      self._tb.flush()
    return row

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str):
  """All rows of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class RateTimer:
  """Measures items per second between logging points (host-side only)."""

  def __init__(self):
    self._t = time.perf_counter()
    self._n = 0

  def add(self, n: int):
    self._n += n

  def rate(self) -> float:
    now = time.perf_counter()
    r = self._n / max(now - self._t, 1e-9)
    self._t, self._n = now, 0
    return r
