"""JAX's persistent compilation cache, set up from a command-line flag.

Standard library only until the cache is enabled (JAX is imported then).
"""
from __future__ import annotations

import os
from typing import Optional


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
  """Keeps compiled programs in `path` across runs (JAX's persistent cache).

  A restarted or resumed run then loads its initialiser, step and sampler
  instead of compiling them again. None or '' leaves JAX's setting alone
  (JAX itself reads ``JAX_COMPILATION_CACHE_DIR``). Must run before the
  first compilation.

  Returns:
    The absolute cache directory, or None.

  Raises:
    ValueError: `path` exists and is not a directory, or cannot be created.
  """
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--compilation_cache_dir={path} is a file; pass a "
                     "directory (it is created if missing)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compilation_cache_dir={path}: cannot create it "
                     f"({e.strerror}); pass a writable directory") from e
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", path)
  return path
