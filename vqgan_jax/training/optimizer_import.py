"""Continue an official training run: its Adam states as this trainer's.

With ``config.init_from_optimizer=last.ckpt`` (the official Lightning
checkpoint that ``config.init_from`` was converted from), a fresh stage-1
run starts where the reference run stopped instead of restarting Adam from
zero:

* the generator's and the discriminator's Adam moments (``exp_avg``,
  ``exp_avg_sq``) and step counts become the optax ``ScaleByAdamState`` of
  ``opt_state`` / ``disc_opt_state``, mapped parameter by parameter
  (:mod:`vqgan_jax.keymaps.optimizer`);
* the train state's ``step`` continues from the checkpoint's
  ``global_step``. That step decides, as the reference's ``global_step``
  does, whether the GAN term is on (``loss.disc_start``) and where the GAN
  warm-up stands; the loop's own count (``num_train_steps``, logging,
  checkpoint names) still counts the steps of this run.

The learning rate, betas and eps are this config's: where the checkpoint's
param groups say otherwise, a warning names each difference. What cannot be
mapped (another optimizer, missing entries, other shapes, weights that are
not those of ``init_from``) is a one-line :class:`schema.ConfigError` raised
before the workdir is touched.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import keymaps
from vqgan_jax import torch_io
from vqgan_jax.keymaps.optimizer import AdamMoments
from vqgan_jax.training import loop
from vqgan_jax.training import schema

PyTree = Any
ADAM_EPS = 1e-8  # optax.adam's default, which make_optimizer keeps


@dataclasses.dataclass
class Stage1Optimizers:
  """What a reference VQGAN checkpoint carries over (see the module doc).

  Attributes:
    global_step: the reference's ``global_step``; the train state's ``step``.
    generator: the generator's Adam, in the layout of ``state['params']``.
    discriminator: the discriminator's, in that of ``state['disc_params']``.
    differences: hyperparameters in which the checkpoint's param groups
      differ from this config, one line each (also logged as warnings).
  """
  global_step: int
  generator: AdamMoments
  discriminator: AdamMoments
  differences: List[str]


def _fail(message: str) -> schema.ConfigError:
  field = "config.init_from_optimizer"
  return schema.ConfigError(f"{field}: " + " ".join(str(message).split()))


def _first_difference(a: PyTree, b: PyTree) -> str:
  fa, fb = (traverse_util.flatten_dict(jax.tree.map(np.asarray, t))
            for t in (a, b))
  if set(fa) != set(fb):
    return "/".join(sorted(set(fa) ^ set(fb))[0])
  for path in sorted(fa):
    if fa[path].shape != fb[path].shape or not np.array_equal(fa[path],
                                                              fb[path]):
      return "/".join(path)
  return ""


def hyperparameter_differences(config, moments: Dict[str, AdamMoments]
                               ) -> List[str]:
  """Lines naming each param-group value that differs from this config."""
  o = config.optim
  ours = {"lr": loop.learning_rate(config), "betas": (float(o.b1),
                                                      float(o.b2)),
          "eps": ADAM_EPS, "weight_decay": 0.0}
  out = []
  for who, m in moments.items():
    for i, group in enumerate(m.groups):
      for key, want in ours.items():
        have = group[key]
        if not np.allclose(have, want, rtol=1e-6, atol=0.0):
          where = f" (group {i})" if len(m.groups) > 1 else ""
          out.append(f"the checkpoint's {who} Adam{where} has {key}={have!r}, "
                     f"this run {key}={want!r}")
  return out


def read_stage1(config, abstract_state: PyTree,
                extras: Mapping[str, Any]) -> Stage1Optimizers:
  """Reads and checks ``config.init_from_optimizer`` for a stage-1 run.

  Args:
    config: the stage-1 config (``init_from`` and ``init_from_optimizer``).
    abstract_state: the train state's shapes (``Setup.abstract_state``).
    extras: what ``init_from`` holds beside the generator (its
      discriminator must be the checkpoint's).

  Raises:
    schema.ConfigError: one line naming what cannot be mapped.
  """
  path = os.path.abspath(os.path.expanduser(config.init_from_optimizer))
  try:
    ckpt = torch_io.load_torch_file(path)
  except (torch_io.CheckpointError, FileNotFoundError) as e:
    raise _fail(e) from None
  if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"),
                                                     Mapping):
    raise _fail(f"{path} is not a Lightning checkpoint (no 'state_dict')")
  disc_abstract = {"params": abstract_state["disc_params"],
                   **abstract_state["disc_state"]}
  try:
    moments = keymaps.optimizer.vqgan_adam(ckpt, abstract_state["params"],
                                           disc_abstract)
    step = keymaps.optimizer.global_step(ckpt)
    weights = keymaps.vqgan.params_from_state_dict(
        ckpt["state_dict"], abstract_state["params"])
    disc_weights = keymaps.discriminator.variables_from_state_dict(
        ckpt["state_dict"], disc_abstract,
        prefix=keymaps.optimizer.DISCRIMINATOR_PREFIX,
        what="the configured discriminator (config.disc)")["params"]
  except ValueError as e:
    raise _fail(f"{path}: {e}") from None
  # The moments belong to these weights: they must be those of init_from.
  _, init = ckpt_lib.load_variables(config.init_from, "vqgan")
  diff = _first_difference(weights, init["params"])
  if diff:
    raise _fail(f"{path} is not the checkpoint config.init_from="
                f"{config.init_from} was converted from ({diff} differs)")
  if "discriminator" not in extras:
    raise _fail(f"config.init_from={config.init_from} holds no "
                "discriminator, so the discriminator's Adam state has no "
                "weights to go with; convert the checkpoint again with its "
                "loss.discriminator entries")
  diff = _first_difference(disc_weights, extras["discriminator"]["params"])
  if diff:
    raise _fail(f"{path}: its discriminator is not the one in "
                f"config.init_from={config.init_from} ({diff} differs)")
  differences = hyperparameter_differences(config, moments)
  for line in differences:
    logging.warning("init_from_optimizer: %s; the moments carry over and "
                    "this run's value applies", line)
  return Stage1Optimizers(step, moments["generator"],
                          moments["discriminator"], differences)


def with_adam_moments(opt_state: PyTree, moments: AdamMoments,
                      what: str) -> PyTree:
  """``opt_state`` (an optax chain's state) with its one
  ``ScaleByAdamState`` replaced by ``moments`` (dtypes kept)."""
  found = []

  def fill(new: Mapping[str, Any], old: PyTree) -> PyTree:
    flat = traverse_util.flatten_dict(new)

    def leaf(path, x):
      key = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
      if key not in flat or np.shape(flat[key]) != np.shape(x):
        raise _fail(f"{what}: no moment of shape {np.shape(x)} for "
                    f"{'/'.join(map(str, key))}")
      return jnp.asarray(flat[key], x.dtype)
    if len(flat) != len(jax.tree.leaves(old)):
      raise _fail(f"{what}: {len(flat)} moments for "
                  f"{len(jax.tree.leaves(old))} parameters")
    return jax.tree_util.tree_map_with_path(leaf, old)

  def replace(s):
    if not isinstance(s, optax.ScaleByAdamState):
      return s
    found.append(s)
    return s._replace(count=jnp.asarray(moments.count, s.count.dtype),
                      mu=fill(moments.mu, s.mu), nu=fill(moments.nu, s.nu))

  out = jax.tree.map(replace, opt_state,
                     is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
  if len(found) != 1:
    raise _fail(f"{what} holds {len(found)} Adam states; the import needs "
                "exactly one (config.optim builds the optimizer)")
  return out


def apply_stage1(state: PyTree, imported: Stage1Optimizers) -> PyTree:
  """The train state continuing the reference run (see the module doc)."""
  return dict(
      state,
      step=jnp.asarray(imported.global_step, state["step"].dtype),
      opt_state=with_adam_moments(state["opt_state"], imported.generator,
                                  "opt_state"),
      disc_opt_state=with_adam_moments(state["disc_opt_state"],
                                       imported.discriminator,
                                       "disc_opt_state"))
