"""What the ablations read back from finished runs, and the machine they ran
on (standard library only)."""
from __future__ import annotations

import json
import os
import platform
from typing import Any, Dict, List


def metrics_rows(path: str) -> List[Dict[str, Any]]:
  """The rows of a run's ``metrics.jsonl`` (``path``: the file or the
  workdir that holds it)."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def last_row(path: str, key: str) -> Dict[str, Any]:
  """The last row of a ``metrics.jsonl`` that holds ``key``."""
  rows = [r for r in metrics_rows(path) if key in r]
  if not rows:
    raise RuntimeError(f"{path} has no row with {key!r}: did the run finish?")
  return rows[-1]


def cpu_model() -> str:
  """The CPU's model name and core count (Linux), else what `platform`
  knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
  except OSError:
    pass
  return (platform.processor() or platform.machine()) + (
      f", {os.cpu_count()} cores")
