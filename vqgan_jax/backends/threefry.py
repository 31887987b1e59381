"""Compiling a random initialiser quickly on GPUs.

Standard library only until called (JAX is imported then).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional


def gpu_kernel_threefry(init_fn: Callable[..., Any],
                        backend: Optional[str] = None) -> Callable[..., Any]:
  """`init_fn` compiled with threefry as one GPU kernel per draw on GPUs.

  XLA otherwise inlines the threefry hash into every parameter's
  initialiser, and a large model's jitted initialiser then compiles for a
  minute or more on a GPU. With ``jax_threefry_gpu_kernel_lowering`` each
  draw is one custom kernel; the random bits are the same, so is the state.
  Elsewhere (and if XLA refuses the kernel) `init_fn` runs as it is. The
  flag is set only around this call: the training steps' dropout keeps
  XLA's fused threefry.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def call(*args, **kwargs):
    if (backend or jax.default_backend()) != "gpu":
      return init_fn(*args, **kwargs)
    before = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
      return init_fn(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:
      if "threefry" not in str(e):  # not about the kernel: a real failure
        raise
      logging.warning("threefry GPU kernel refused (%s); compiling the "
                      "initialiser without it", str(e).splitlines()[0])
    finally:
      jax.config.update("jax_threefry_gpu_kernel_lowering", before)
    return init_fn(*args, **kwargs)  # the flag restored

  return call
