"""Device meshes, parameter shardings, and gathering arrays to the host.

The mesh is data: ``config.mesh`` maps axis names to sizes (one may be -1,
"the rest of the devices"), e.g. ``{'data': -1, 'fsdp': 1}``. Parameter
shardings come from ``config.partition_rules``: ``(regex, strategy)`` pairs
matched against the ``/``-joined parameter path, first match wins. A
strategy is

* ``'replicate'``: every device holds the whole array;
* ``'fsdp'``: the largest axis whose size the ``fsdp`` mesh axis divides is
  sharded over it (small or indivisible arrays stay replicated);
* a tuple of mesh-axis names / None, one per array axis (a PartitionSpec).

The batch is sharded over all mesh axes on its leading dimension. Training
and inference (encoding a dataset to codes) share these; :func:`to_host`
brings a global, possibly multi-host array back as one numpy array.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_RULES = ((".*", "fsdp"),)
# Arrays smaller than this stay replicated under the 'fsdp' strategy.
MIN_FSDP_SIZE = 2**14


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
  """Resolves a ``{name: size}`` mesh spec (one size may be -1)."""
  names = tuple(spec.keys())
  sizes = [int(v) for v in spec.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(spec)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={dict(spec)}: sizes must be positive or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh={dict(spec)} does not fit {num_devices} devices: "
          f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
        f"config.mesh={dict(spec)} has {int(np.prod(sizes))} devices but "
        f"{num_devices} are available; make the product of the sizes equal "
        f"{num_devices} or set one axis to -1")
  return names, tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with Auto axis types (Flax convolutions need them under jit)."""
  devices = list(devices if devices is not None else jax.devices())
  names, sizes = mesh_shape(spec, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) global array as one numpy array."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _fsdp_spec(shape, mesh: Mesh, axis: str = "fsdp") -> P:
  if axis not in mesh.shape or mesh.shape[axis] == 1:
    return P()
  n = mesh.shape[axis]
  if int(np.prod(shape)) < MIN_FSDP_SIZE:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % n == 0:
      spec = [None] * len(shape)
      spec[i] = axis
      return P(*spec)
  return P()


def spec_for(path: str, shape, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  for pattern, strategy in rules:
    if re.fullmatch(pattern, path):
      if strategy == "replicate":
        return P()
      if strategy == "fsdp":
        return _fsdp_spec(shape, mesh)
      spec = tuple(strategy)
      if len(spec) != len(shape):
        raise ValueError(f"partition rule {pattern!r} -> {spec} has {len(spec)} "
                         f"axes but {path} has shape {tuple(shape)}")
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for a train state: every array leaf through the rules.

  Optimizer states mirror their parameters' shapes, so matching on the
  leaf's path (which ends in the parameter path) and shape shards them the
  same way as the parameters.
  """
  def leaf_sharding(path, leaf):
    shape = getattr(leaf, "shape", ())
    name = "/".join(_key_name(k) for k in path)
    return NamedSharding(mesh, spec_for(name, shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)
