"""Encoding a dataset to code grids once, and caching them on disk.

Stage 2 trains on the codes of a frozen VQGAN. They are computed once per
(VQGAN weights, dataset, split, resolution), jitted and sharded over all
devices, and stored as ``.npz`` under a cache directory; a later run (or
another stage-2 workdir) with the same key reuses them. Changing the VQGAN
weights, the data (files, sizes, modification times) or the resolution
changes the key, so stale codes are never read.

Codes use the evaluation preprocessing (resize + centre crop): caching
fixes the crop, where the reference re-encodes a random crop every epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict

import jax
import numpy as np

from vqgan_jax import digest
from vqgan_jax import sharding as shard_lib
from vqgan_jax.sharding import to_host

CACHE_VERSION = 2  # bump when the stored arrays change


def dataset_fingerprint(dataset) -> str:
  """A hash of what a dataset holds: name, size and, for files, size+mtime."""
  h = hashlib.sha256()
  src = dataset.source
  h.update(f"{src.name}|{src.num_examples}|{dataset.resolution}|"
           f"{dataset.channels}".encode())
  paths = getattr(src, "paths", None)
  if paths is not None:
    for p in paths:
      try:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
      except OSError:
        h.update(f"{p}|missing".encode())
  else:
    pixels = getattr(src, "pixels", None)
    if pixels is not None:
      h.update(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest())
  return h.hexdigest()


def vqgan_fingerprint(model_config: Dict[str, Any], variables) -> str:
  h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
  h.update(digest.local_digest(variables["params"]).encode())
  return h.hexdigest()


def encode_dataset(model, variables, dataset, batch_size: int, mesh
                   ) -> Dict[str, np.ndarray]:
  """Codes (N, h, w) int32, labels (N,) and source ids (N,) of every
  readable example, in source order.

  All processes take part; each encodes its shard and the results are
  gathered so every process holds the whole array.
  """
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  batch_sh = shard_lib.batch_sharding(mesh)
  repl = shard_lib.replicated(mesh)
  variables = jax.device_put(variables, repl)
  enc = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_to_indices),
                in_shardings=(repl, batch_sh), out_shardings=batch_sh)
  codes, labels, ids = [], [], []
  for batch in dataset.eval_iterator(batch_size):
    local = {"image": batch["image"], "mask": batch["mask"],
             "index": batch["index"],
             "label": batch.get("label", np.zeros(len(batch["mask"]), np.int32))}
    gb = make_global_batch(local, batch_sh)
    idx = to_host(enc(variables, gb["image"]))
    mask = to_host(gb["mask"]).astype(bool)
    codes.append(idx[mask])
    labels.append(to_host(gb["label"])[mask])
    ids.append(to_host(gb["index"])[mask])
  ids = np.concatenate(ids)
  order = np.argsort(ids, kind="stable")  # source order, whatever the sharding
  out = {"codes": np.concatenate(codes).astype(np.int32)[order],
         "labels": np.concatenate(labels).astype(np.int32)[order],
         "ids": ids[order].astype(np.int64)}
  if not dataset.source.has_labels:
    out["labels"] = np.full(len(out["codes"]), -1, np.int32)
  return out


def cached_codes(cache_dir: str, model, model_config, variables, dataset,
                 batch_size: int, mesh, *, tag: str = "") -> Dict[str, np.ndarray]:
  """Codes of ``dataset`` from the cache, computing and storing them if needed."""
  key = hashlib.sha256(
      (f"v{CACHE_VERSION}" + vqgan_fingerprint(model_config, variables) +
       dataset_fingerprint(dataset) + tag).encode()).hexdigest()[:24]
  path = os.path.join(cache_dir, f"codes_{key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        logging.info("reusing cached codes %s", path)
        return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
      logging.warning("cached codes %s are unreadable (%s); recomputing", path, e)
  logging.info("encoding %s with the VQGAN (once; cached in %s)",
               dataset.source.name, cache_dir)
  out = encode_dataset(model, variables, dataset, batch_size, mesh)
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
  return out


def code_entropy(codes: np.ndarray, n_embed: int) -> float:
  """Entropy (nats) of the code histogram: a per-token loss baseline."""
  counts = np.bincount(codes.ravel(), minlength=n_embed).astype(np.float64)
  p = counts / counts.sum()
  p = p[p > 0]
  return float(-np.sum(p * np.log(p)))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int
                  ) -> np.ndarray:
  """Global batch ``step`` of a per-epoch shuffled order (pure in step)."""
  per_epoch = num_examples // batch_size
  if per_epoch == 0:
    raise ValueError(f"{num_examples} examples are fewer than one batch of "
                     f"{batch_size}; lower config.batch_size")
  epoch, pos = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[pos * batch_size:(pos + 1) * batch_size]


def local_slice(global_batch: np.ndarray) -> np.ndarray:
  """This process's part of a global batch (for make_array_from_process_local_data)."""
  n, p = jax.process_count(), jax.process_index()
  per = len(global_batch) // n
  return global_batch[p * per:(p + 1) * per]
