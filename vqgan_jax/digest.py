"""Digests of the array data a process holds.

:func:`local_digest` keys the code cache on a VQGAN's weights, and lets
multi-process runs check that their replicas agree
(:func:`write_replica_digest`).
"""
import hashlib
import os

import jax
import numpy as np


def local_digest(tree) -> str:
  """SHA-256 over every addressable shard of every leaf, in a fixed order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "addressable_shards"):  # numpy / host data
      h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
      continue
    shards = sorted(leaf.addressable_shards, key=lambda s: str(s.index))
    for shard in shards[:1] if leaf.is_fully_replicated else shards:
      h.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
  return h.hexdigest()


def write_replica_digest(workdir: str, tree) -> None:
  """Writes ``workdir/replica_digest.<process>`` for multi-process checks."""
  if jax.process_count() == 1:
    return
  path = os.path.join(workdir, f"replica_digest.{jax.process_index()}")
  with open(path, "w") as f:
    f.write(local_digest(tree) + "\n")
