"""vqgan-jax: VQGAN and taming transformers in JAX/Flax.

Importing the package is cheap and pulls in neither TensorFlow nor torch:
the public names below are loaded on first use.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "VQGAN": "vqgan_jax.vqgan",
    "GPT": "vqgan_jax.gpt",
    "load_vqgan": "vqgan_jax.checkpoint",
    "load_transformer": "vqgan_jax.checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'vqgan_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
