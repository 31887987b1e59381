"""What a trainer prints before its first step, and the memory check.

:func:`compile_step` compiles the jitted training step ahead of time
(``lower(...).compile()``) on the abstract state and batch; the trainer then
runs that compiled object, so the step compiles once, and XLA's memory plan
for it (`vqgan_jax.backends.device_memory.compiled_bytes`) is known before
any data is trained on or anything is written. :func:`start` prints the
header (stage, model size, batch, devices, memory and compile time) on the
primary process and refuses, with :class:`MemoryLimitError`, a step that
would not fit the device, unless ``config.ignore_memory_limit``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence, Tuple

import jax

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import console
from vqgan_jax.backends import device_memory
from vqgan_jax.training import schema

PyTree = Any


class MemoryLimitError(schema.ConfigError):
  """One training step needs more memory than the device has."""


def abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves of ``tree`` (arrays or abstract values)
  placed on ``shardings`` (one sharding for all, or a matching tree)."""
  def one(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                weak_type=bool(getattr(x, "weak_type", False)))
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def finished(config, workdir: str) -> bool:
  """Whether ``workdir`` already holds the run's last step (a re-run that
  will only restore: no step to compile, no header)."""
  step = ckpt_lib.latest_step(os.path.join(workdir, ckpt_lib.CHECKPOINTS_DIR))
  return step is not None and step >= config.num_train_steps


def compile_step(jitted, *args) -> Tuple[Any, float]:
  """``(compiled, seconds)``: ``jitted`` compiled for ``args`` (arrays or
  ``ShapeDtypeStruct``); call ``compiled`` in its place (same program)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def param_count(tree: PyTree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _count(n: int) -> str:
  if n >= 1e9:
    return f"{n / 1e9:.2f} B"
  if n >= 1e6:
    return f"{n / 1e6:.2f} M"
  if n >= 1e3:
    return f"{n / 1e3:.1f} K"
  return str(n)


def _devices(mesh) -> Tuple[str, Any]:
  devices = list(mesh.devices.flat)
  d = devices[0]
  kind = d.device_kind if d.platform != "cpu" else "cpu"
  if d.platform == "cpu":
    try:
      kind += f", {len(os.sched_getaffinity(0))} cores"
    except AttributeError:  # pragma: no cover (not Linux)
      kind += f", {os.cpu_count()} cores"
  n = len(devices)
  return f"{n} device{'s' if n > 1 else ''} ({kind})", d


def start(config, *, stage: str, sizes: Sequence[Tuple[str, int]], mesh,
          compiled, compile_seconds: float, smaller: str) -> Optional[int]:
  """Prints the run's header (primary process) and checks its memory.

  Args:
    config: the run's config (``batch_size``, ``ignore_memory_limit``).
    stage: e.g. ``'stage 1 VQGAN'``.
    sizes: ``(name, parameter count)`` of each trained network.
    mesh: the run's device mesh.
    compiled: the compiled training step.
    compile_seconds: how long compiling it took.
    smaller: the overrides that shrink this stage's step, for the message.

  Returns:
    XLA's estimate of one step's bytes per device (None when unknown).

  Raises:
    MemoryLimitError: the estimate exceeds the device's memory (on CPU, the
      machine's available memory, shared by its CPU devices).
  """
  estimate = device_memory.compiled_bytes(compiled)
  devices, first = _devices(mesh)
  limit = device_memory.device_limit_bytes(first)
  # CPU devices share the host's memory: every one of them needs the plan.
  local = sum(1 for d in mesh.devices.flat
              if d.process_index == jax.process_index())
  need = estimate * local if estimate and first.platform == "cpu" else estimate
  n = mesh.devices.size
  if jax.process_index() == 0:
    params = ", ".join(f"{name} {_count(c)}" for name, c in sizes)
    where = ("available on this machine" if first.platform == "cpu"
             else "per device")
    fits = (f"of {device_memory.format_bytes(limit)} {where}" if limit
            else "(device memory unknown)")
    print(f"{stage}: {params} parameters\n"
          f"  batch {config.batch_size} ({config.batch_size // n} per "
          f"device) on {devices}\n"
          f"  one step: {device_memory.format_bytes(need)} by XLA's estimate "
          f"{fits}; compiled in {console.format_duration(compile_seconds)}",
          flush=True)
  if need and limit and need > limit and not config.get("ignore_memory_limit",
                                                        False):
    have = device_memory.format_bytes(limit)
    have = (f"only {have} is available on this machine"
            if first.platform == "cpu" else f"the device has {have}")
    raise MemoryLimitError(
        f"one training step needs about {device_memory.format_bytes(need)} "
        f"(XLA's estimate) but {have}; use a smaller preset "
        f"(e.g. --config=configs/folder_vqgan.py:PATH,cpu) or lower "
        f"--config.batch_size or {smaller}, or run anyway with "
        "--config.ignore_memory_limit=True")
  return estimate
