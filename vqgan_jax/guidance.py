"""Classifier-free guidance: combining the logits, and guidance schedules.

`guided` mixes conditional and unconditional logits with a scale s:
uncond + s * (cond - uncond). `guidance_scales` gives the scale of every
decoding step under a schedule: constant (the same s at every step), linear
or power-law ramps from 1 at the first token to s at the last, a cosine
ramp, and a guidance interval (the schedule's scale only for the steps whose
progress lies in [a, b], scale 1, i.e. the conditional logits, outside).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEDULES = ("constant", "linear", "power", "cosine")


def guided(cond: Array, uncond: Array, scale: Array) -> Array:
  """uncond + scale * (cond - uncond), in float32.

  Args:
    cond: (..., V) conditional logits.
    uncond: (..., V) unconditional logits.
    scale: the guidance scale, broadcastable against cond[..., :1].

  Returns:
    float32 (..., V) guided logits.
  """
  cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
  return uncond + scale * (cond - uncond)


def schedule_progress(num_tokens: int) -> np.ndarray:
  """Progress r_t = t / (num_tokens - 1) of each token t (0 for one token)."""
  return np.arange(num_tokens, dtype=np.float64) / max(num_tokens - 1, 1)


def guidance_scales(scale: float, num_tokens: int, schedule: str = "constant",
                    power: float = 2.0,
                    interval: Sequence[float] | None = None) -> np.ndarray:
  """The guidance scale of every decoding step.

  With progress r = t / (num_tokens - 1) of token t:
    'constant': s;
    'linear':   1 + (s - 1) r;
    'power':    1 + (s - 1) r**power;
    'cosine':   1 + (s - 1) (1 - cos(pi r)) / 2.
  With `interval` (a, b), steps whose r lies outside [a, b] get scale 1.

  Args:
    scale: the guidance scale s (the value reached at the end of a ramp).
    num_tokens: number of decoding steps (tokens sampled).
    schedule: one of `SCHEDULES`.
    power: exponent of the 'power' schedule (> 0).
    interval: optional (a, b) with 0 <= a <= b <= 1.

  Returns:
    float32 (num_tokens,) scales.
  """
  check_schedule(schedule, power, interval)
  r = schedule_progress(num_tokens)
  s = float(scale)
  if schedule == "constant":
    values = np.full_like(r, s)
  elif schedule == "linear":
    values = 1.0 + (s - 1.0) * r
  elif schedule == "power":
    values = 1.0 + (s - 1.0) * r ** float(power)
  else:
    values = 1.0 + (s - 1.0) * (1.0 - np.cos(np.pi * r)) / 2.0
  if interval is not None:
    a, b = interval
    values = np.where((r >= a) & (r <= b), values, 1.0)
  return values.astype(np.float32)


def is_constant(schedule: str, interval: Sequence[float] | None) -> bool:
  """True when the schedule is the same scale at every step."""
  return schedule == "constant" and interval is None


def check_schedule(schedule: str, power: float = 2.0,
                   interval: Sequence[float] | None = None) -> None:
  """Raises ValueError on an unknown schedule, power <= 0 or a bad interval."""
  if schedule not in SCHEDULES:
    raise ValueError(f"guidance schedule {schedule!r}; valid: {SCHEDULES}")
  if not power > 0:
    raise ValueError(f"guidance power must be > 0, got {power}")
  if interval is not None:
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
      raise ValueError(f"guidance interval must be (a, b) with "
                       f"0 <= a <= b <= 1, got {tuple(interval)}")
