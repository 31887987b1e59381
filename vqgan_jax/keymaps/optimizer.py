"""Adam states of reference (Lightning) checkpoints -> per-parameter moment trees.

A Lightning checkpoint keeps each optimizer's ``state_dict()`` in its
``optimizer_states`` list: ``{'state': {index: {'step', 'exp_avg',
'exp_avg_sq'}}, 'param_groups': [{'lr', 'betas', 'eps', 'weight_decay',
'amsgrad', 'params': [index, ...]}]}``. An index is a parameter's position in
the list the optimizer was built from, over all groups in order, so the
mapping needs the names of that list:

* a VQModel / GumbelVQ builds two Adams: the generator's over the parameters
  of ``encoder``, ``decoder``, ``quantize``, ``quant_conv`` and
  ``post_quant_conv`` in that order, the discriminator's over
  ``loss.discriminator``. Within a module, torch lists parameters in
  registration order, the order of the module's keys in the state dict (its
  buffers, e.g. BatchNorm statistics, interleave there and are skipped).

The moments of each named parameter then go through the same key map as the
parameter itself (:mod:`vqgan_jax.keymaps.vqgan`,
:mod:`vqgan_jax.keymaps.discriminator`), so they land in the layout of the
Flax parameter they belong to. Everything is checked first: any state that
cannot be mapped raises one ``ValueError`` line naming what is wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from flax import traverse_util

from vqgan_jax.keymaps import discriminator as disc_map
from vqgan_jax.keymaps import vqgan as vqgan_map

GENERATOR_MODULES = ("encoder", "decoder", "quantize", "quant_conv",
                     "post_quant_conv")
DISCRIMINATOR_PREFIX = "loss.discriminator."
# Buffers of the reference discriminator (BatchNorm statistics, ActNorm's flag).
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "initialized")


@dataclasses.dataclass
class AdamMoments:
  """One torch Adam's state, by parameter.

  Attributes:
    count: the optimizer's step count (torch's per-parameter ``step``, the
      same for every parameter).
    mu: the first moments (``exp_avg``) as a tree in the layout of the Flax
      parameters.
    nu: the second moments (``exp_avg_sq``), likewise.
    groups: each param group's hyperparameters (``lr``, ``betas``, ``eps``,
      ``weight_decay``, ``amsgrad``) and the torch names of its parameters
      (``names``).
  """
  count: int
  mu: Dict[str, Any]
  nu: Dict[str, Any]
  groups: List[Dict[str, Any]]


def generator_names(state_dict: Mapping[str, Any], abstract_params) -> List[str]:
  """Torch names of a VQModel's generator parameters, in the order of its
  ``configure_optimizers`` (``abstract_params``: the Flax parameter tree,
  whose leaves name exactly the parameters; buffers are skipped)."""
  params = {vqgan_map.flax_path_to_torch_key(p)
            for p in traverse_util.flatten_dict(abstract_params)}
  return [k for m in GENERATOR_MODULES for k in state_dict
          if k.startswith(m + ".") and k in params]


def discriminator_names(state_dict: Mapping[str, Any],
                        prefix: str = DISCRIMINATOR_PREFIX) -> List[str]:
  """Torch names of the discriminator's parameters, in registration order."""
  return [k for k in state_dict if k.startswith(prefix)
          and k.rsplit(".", 1)[-1] not in _BUFFERS]


def _step(value, what: str, name: str) -> int:
  step = np.asarray(value)
  if step.size != 1 or float(step.reshape(())) != int(step.reshape(())):
    raise ValueError(f"{what}: step of {name} is {value!r}, not a count")
  return int(step.reshape(()))


def adam_moments(optimizer_state: Any, names: Sequence[str],
                 shapes: Mapping[str, Sequence[int]], *, what: str
                 ) -> Dict[str, Any]:
  """Checks one torch Adam ``state_dict()`` and names its entries.

  Args:
    optimizer_state: ``{'state', 'param_groups'}`` as torch saves it.
    names: torch names of the optimizer's parameters, in its order.
    shapes: torch shape of each named parameter (from the state dict).
    what: the optimizer, as errors name it (e.g. "the generator's Adam").

  Returns:
    ``{'count', 'exp_avg': {name: array}, 'exp_avg_sq': {...}, 'groups'}``.

  Raises:
    ValueError: not an Adam state (another optimizer, AMSGrad), a number of
      parameters other than ``len(names)``, missing entries, or shapes that
      differ from the parameters', in one line.
  """
  if not (isinstance(optimizer_state, Mapping)
          and isinstance(optimizer_state.get("state"), Mapping)
          and isinstance(optimizer_state.get("param_groups"), list)):
    raise ValueError(f"{what}: not a torch optimizer state (expected a dict "
                     "with 'state' and 'param_groups')")
  groups, order = [], []
  for g in optimizer_state["param_groups"]:
    if not isinstance(g, Mapping) or "betas" not in g or "params" not in g:
      raise ValueError(f"{what}: a param group without 'betas' is not Adam's "
                       f"(keys {sorted(g) if isinstance(g, Mapping) else g})")
    if g.get("amsgrad"):
      raise ValueError(f"{what}: AMSGrad (amsgrad=True) has no optax "
                       "counterpart here; only plain Adam states import")
    order += list(g["params"])
  if len(order) != len(names):
    raise ValueError(
        f"{what} holds {len(order)} parameters where the model has "
        f"{len(names)}; the checkpoint's model is not the one configured")
  index_name = dict(zip(order, names))
  for g in optimizer_state["param_groups"]:
    groups.append({"lr": float(g["lr"]),
                   "betas": tuple(float(b) for b in g["betas"]),
                   "eps": float(g.get("eps", 1e-8)),
                   "weight_decay": float(g.get("weight_decay", 0.0)),
                   "amsgrad": bool(g.get("amsgrad", False)),
                   "names": [index_name[i] for i in g["params"]]})
  state = optimizer_state["state"]
  missing = [index_name[i] for i in order if i not in state]
  if missing:
    raise ValueError(
        f"{what} has no state for {len(missing)} of {len(order)} parameters "
        f"(first: {missing[0]}); they never had a gradient in that run")
  exp_avg, exp_avg_sq, steps = {}, {}, {}
  for i in order:
    name, entry = index_name[i], state[i]
    keys = set(entry) if isinstance(entry, Mapping) else set()
    if not {"exp_avg", "exp_avg_sq", "step"} <= keys:
      raise ValueError(f"{what}: the state of {name} has {sorted(keys)}, not "
                       "Adam's step, exp_avg and exp_avg_sq")
    for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
      value = np.asarray(entry[key])
      if tuple(value.shape) != tuple(shapes[name]):
        raise ValueError(
            f"{what}: {key} of {name} has shape {tuple(value.shape)}, the "
            f"parameter {tuple(shapes[name])}; the parameter order does not "
            "match the model's")
      out[name] = value
    steps[name] = _step(entry["step"], what, name)
  counts = sorted(set(steps.values()))
  if len(counts) != 1:
    raise ValueError(f"{what}: step counts differ across parameters "
                     f"({counts[0]}..{counts[-1]}); one count is needed")
  return {"count": counts[0], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
          "groups": groups}


def _optimizer_states(checkpoint: Mapping[str, Any], n: int) -> List[Any]:
  states = checkpoint.get("optimizer_states")
  if not isinstance(states, list) or len(states) != n:
    have = (f"{len(states)} optimizer states" if isinstance(states, list)
            else "no 'optimizer_states' entry")
    raise ValueError(f"the checkpoint has {have} where a VQGAN run keeps {n} "
                     "(generator Adam, discriminator Adam)")
  return states


def global_step(checkpoint: Mapping[str, Any]) -> int:
  """The checkpoint's ``global_step`` (training batches done)."""
  if "global_step" not in checkpoint:
    raise ValueError("the checkpoint has no 'global_step' entry")
  return _step(checkpoint["global_step"], "the checkpoint", "global_step")


def vqgan_adam(checkpoint: Mapping[str, Any], abstract_params,
               abstract_disc_variables=None) -> Dict[str, AdamMoments]:
  """The two Adam states of a reference VQGAN run, in Flax layout.

  Args:
    checkpoint: the whole Lightning checkpoint (``state_dict``,
      ``optimizer_states``), as :func:`vqgan_jax.torch_io.load_torch_file`
      returns it.
    abstract_params: the generator's Flax parameter tree (shapes suffice).
    abstract_disc_variables: the discriminator's ``{'params',
      'batch_stats'}`` shapes, or None to skip its optimizer.

  Returns:
    ``{'generator': AdamMoments, 'discriminator': AdamMoments}`` (the second
    only with ``abstract_disc_variables``).
  """
  sd = checkpoint.get("state_dict")
  if not isinstance(sd, Mapping):
    raise ValueError("the checkpoint has no 'state_dict' entry")
  opt_g, opt_d = _optimizer_states(checkpoint, 2)
  shapes = {k: np.shape(v) for k, v in sd.items()}
  names = generator_names(sd, abstract_params)
  g = adam_moments(opt_g, names, shapes, what="the generator's Adam")
  out = {}

  def tree(moments):
    try:
      return vqgan_map.params_from_state_dict(moments, abstract_params,
                                              what="generator's Adam state")
    except ValueError as e:
      raise ValueError(" ".join(str(e).split())) from None
  out["generator"] = AdamMoments(g["count"], tree(g["exp_avg"]),
                                 tree(g["exp_avg_sq"]), g["groups"])
  if abstract_disc_variables is None:
    return out
  names = discriminator_names(sd)
  d = adam_moments(opt_d, names, shapes, what="the discriminator's Adam")
  buffers = {k: v for k, v in sd.items() if k.startswith(DISCRIMINATOR_PREFIX)
             and k not in d["exp_avg"]}

  def dtree(moments):
    params = disc_map.variables_from_state_dict(
        {**buffers, **moments}, abstract_disc_variables,
        prefix=DISCRIMINATOR_PREFIX, what="the configured discriminator",
        dtype=np.float32)["params"]
    return {m: {k: np.asarray(v) for k, v in leaves.items()}
            for m, leaves in params.items()}
  out["discriminator"] = AdamMoments(d["count"], dtree(d["exp_avg"]),
                                     dtree(d["exp_avg_sq"]), d["groups"])
  return out
