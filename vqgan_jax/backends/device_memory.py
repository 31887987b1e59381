"""How much memory one compiled call needs, and how much a device has.

Standard library only at import (JAX objects are passed in), so the
trainers, the tools and the benchmarks share one reading of XLA's plan.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

# Overrides the memory a device is taken to have (bytes, or a number with a
# K/M/G/T suffix, powers of 1024), e.g. to rehearse a smaller machine.
LIMIT_ENV = "VQGAN_JAX_MEMORY_LIMIT"


def compiled_bytes(compiled: Any) -> Optional[int]:
  """Bytes XLA plans for one call of ``compiled`` (a ``jax.stages.Compiled``)
  on one device: arguments + outputs + temporaries - aliased (donated
  buffers that outputs reuse). None when XLA gives no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(m, (list, tuple)):
    m = m[0] if m else None
  if m is None:
    return None
  total = 0
  for name, sign in (("argument_size_in_bytes", 1), ("output_size_in_bytes", 1),
                     ("alias_size_in_bytes", -1), ("temp_size_in_bytes", 1)):
    total += sign * int(getattr(m, name, 0) or 0)
  return total if total > 0 else None


def parse_bytes(text: str) -> int:
  """``'123'``, ``'512M'``, ``'4G'``, ``'1.5GiB'`` -> bytes (powers of 1024)."""
  m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
  if not m:
    raise ValueError(f"{text!r} is not a size in bytes (e.g. 4G, 512M)")
  scale = 1024**"_kmgt".index(m.group(2).lower() or "_")
  return int(float(m.group(1)) * scale)


def available_host_bytes() -> Optional[int]:
  """The machine's available physical memory (``MemAvailable`` in
  /proc/meminfo, else the free pages ``os.sysconf`` reports)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_limit_bytes(device: Any) -> Optional[int]:
  """The memory ``device`` offers one program, or None when unknown.

  GPUs and TPUs: ``bytes_limit`` of ``device.memory_stats()``. CPU: the
  machine's available physical memory (shared by all its CPU devices).
  ``$VQGAN_JAX_MEMORY_LIMIT`` overrides both.
  """
  if os.environ.get(LIMIT_ENV):
    return parse_bytes(os.environ[LIMIT_ENV])
  if getattr(device, "platform", "cpu") == "cpu":
    return available_host_bytes()
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def format_bytes(n: Optional[float]) -> str:
  """``1536 -> '1.5 KiB'``; 'unknown' for None."""
  if n is None:
    return "unknown"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"
