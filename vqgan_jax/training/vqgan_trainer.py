"""Stage-1 training: VQGAN generator and PatchGAN discriminator in one jitted step.

``train_and_evaluate(config, workdir)`` is what ``train_vqgan.py`` calls.
One step runs the generator once and takes two gradients from that forward
(magvit's "one forward, two gradients"): the generator's, with the adaptive
GAN weight computed from the gradients of the reconstruction and GAN terms
with respect to the decoder's last conv kernel, and the discriminator's on
the same (stopped) reconstructions. The reference instead re-runs the
generator for its discriminator step after updating it; the discriminator
here sees the reconstructions of the pre-update generator.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import discriminator as disc_lib
from vqgan_jax import image_io
from vqgan_jax import quantizers
from vqgan_jax import sharding as shard_lib
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.backends import threefry
from vqgan_jax.backends import xla_cpu
from vqgan_jax.sharding import to_host
from vqgan_jax.training import checkpoints
from vqgan_jax.training import config_paths
from vqgan_jax.training import loop
from vqgan_jax.training import optimizer_import
from vqgan_jax.training import schema
from vqgan_jax.training import startup
from vqgan_jax.training.vqgan_step import make_eval_step
from vqgan_jax.training.vqgan_step import make_train_step

PyTree = Any


# ----------------------------------------------------------------------------
# Construction


def build_model(config) -> vqgan_lib.VQGAN:
  return vqgan_lib.from_config(config.model.to_dict())


def build_discriminator(config) -> disc_lib.NLayerDiscriminator:
  return disc_lib.NLayerDiscriminator(
      input_nc=config.model.out_ch, ndf=config.disc.ndf,
      n_layers=config.disc.n_layers, use_actnorm=config.disc.use_actnorm,
      dtype=jnp.dtype(config.model.dtype))


learning_rate = loop.learning_rate


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adam(learning_rate(config), b1=o.b1, b2=o.b2))
  return optax.chain(*parts)


def load_perceptual(config, extras: Dict[str, Any]):
  """LPIPS ``(model, variables)`` or ``(None, None)`` when the term is off."""
  lc = config.loss
  if not lc.perceptual_weight:
    return None, None
  from vqgan_jax import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(config.model.dtype)  # the VGG trunk; distances stay f32
  if lc.lpips_vgg_path or lc.lpips_lin_path:
    try:
      return lpips_lib.load_lpips(lc.lpips_vgg_path, lc.lpips_lin_path,
                                  dtype=dtype)
    except FileNotFoundError as e:  # one line naming the field (exit 2)
      field = ("lpips_vgg_path" if repr(os.fspath(lc.lpips_vgg_path)) in
               str(e) else "lpips_lin_path")
      raise schema.ConfigError(f"config.loss.{field}: {e}") from None
  if "lpips" in extras:
    return lpips_lib.LPIPS(dtype=dtype), extras["lpips"]
  raise schema.ConfigError(
      f"config.loss.perceptual_weight={lc.perceptual_weight} needs LPIPS "
      "weights, and none were given. Either set "
      "--config.loss.lpips_vgg_path=PATH/vgg16-397923af.pth (torchvision's "
      "VGG16 ImageNet weights) and --config.loss.lpips_lin_path="
      "PATH/lpips/weights/v0.1/vgg.pth (shipped inside the `lpips` pip "
      "package), or start from a converted reference checkpoint that carries "
      "them (--config.init_from=DIR), or turn the term off with "
      "--config.loss.perceptual_weight=0.")


def _disc_variables(disc, rng, config):
  x = jnp.zeros((1, config.model.resolution, config.model.resolution,
                 config.model.out_ch), jnp.float32)
  return disc.init(rng, x, train=False)


def init_state(model, disc, tx_g, tx_d, config, rng) -> PyTree:
  """A fresh train state (call under jit with out_shardings)."""
  r_model, r_disc, r_state = jax.random.split(rng, 3)
  variables = vqgan_lib.init_variables(model, r_model)
  params = variables["params"]
  dvars = dict(_disc_variables(disc, r_disc, config))
  disc_params = dvars.pop("params")
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx_g.init(params),
      "disc_params": disc_params,
      "disc_state": dvars,
      "disc_opt_state": tx_d.init(disc_params),
      "rng": r_state,
      "bad_steps": jnp.zeros((), jnp.int32),
  }
  if config.optim.ema_decay:
    state["ema_params"] = params
  if "quantizer_stats" in variables:  # EMA codebook statistics
    state["quantizer_stats"] = variables["quantizer_stats"]
  if config.loss.lecam_weight:
    state["lecam_ema"] = {"real": jnp.zeros((), jnp.float32),
                          "fake": jnp.zeros((), jnp.float32)}
  return state


# ----------------------------------------------------------------------------
# The loop


def _load_init_from(config, model, state, extras: Dict[str, Any],
                    optimizers: Optional[optimizer_import.Stage1Optimizers]
                    = None) -> PyTree:
  """Replaces parameters by those of ``config.init_from`` (checked), and the
  discriminator by the one saved beside it (``extras``) when it fits. With
  ``optimizers`` (read from ``config.init_from_optimizer``) both Adam states
  and the step continue the reference run
  (:mod:`vqgan_jax.training.optimizer_import`)."""
  path = config.init_from
  info, variables = ckpt_lib.load_variables(path, "vqgan")
  shapes_ok = jax.tree.structure(variables["params"]) == jax.tree.structure(
      state["params"]) and all(
          np.shape(a) == np.shape(b) for a, b in zip(
              jax.tree.leaves(variables["params"]),
              jax.tree.leaves(state["params"])))
  config_paths.check_init_from(config, info["config"], shapes_ok)
  params = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype),
                        variables["params"], state["params"])
  state = dict(state, params=params)
  if "ema_params" in state:  # the weight average starts at the loaded weights
    state["ema_params"] = params
  if "quantizer_stats" in state:  # EMA statistics follow the loaded codes
    state["quantizer_stats"] = quantizers.ema_stats_from_params(
        params, state["quantizer_stats"],
        model.quantizer_options.get("l2_codes", False))
  if "discriminator" in extras:
    dv = dict(extras["discriminator"])
    dp = dv.pop("params")
    if jax.tree.structure(dp) == jax.tree.structure(state["disc_params"]):
      state["disc_params"] = dp
      state["disc_state"] = {k: v for k, v in dv.items()
                             if k in state["disc_state"]}
    else:
      logging.warning("init_from: discriminator architecture differs from "
                      "config.disc; starting the discriminator from scratch")
  if optimizers is not None:
    state = optimizer_import.apply_stage1(state, optimizers)
  return state


def _disc_initialized(state) -> bool:
  flags = [v for p, v in jax.tree_util.tree_leaves_with_path(state["disc_state"])
           if "initialized" in jax.tree_util.keystr(p)]
  return bool(flags) and all(int(jax.device_get(f)) for f in flags)


def build_eval_dataset(config):
  """The dataset the periodic evaluation reads: ``config.eval_dataset`` (or
  ``config.dataset``), split ``config.eval_split`` (a folder is one split)."""
  from vqgan_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  name, split = schema.eval_source(config)
  return data_lib.build_dataset(
      name, resolution=config.model.resolution, split=split,
      data_dir=config.data_dir, channels=config.model.in_channels)


def _init_actnorm(run, state, train_ds, config):
  """Data-dependent ActNorm init on the first batch's reconstructions (the
  discriminator's first input in the reference, whose ActNorm initialises
  on its first training call)."""
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  it = train_ds.train_iterator(config.batch_size, seed=config.seed,
                               augment=config.augment)
  x = make_global_batch({"image": next(it)["image"]}, run.batch_sharding)
  it.close()
  rec = run.eval_fn(state["params"], x["image"])[0]
  variables = disc_lib.initialize_actnorm(
      run.disc, {"params": state["disc_params"], **state["disc_state"]}, rec)
  variables = dict(variables)
  new = dict(state, disc_params=variables.pop("params"), disc_state=variables)
  return jax.device_put(new, run.state_shardings)


def _save_images(workdir, step, x, rec):
  n = min(8, x.shape[0])
  grid = image_io.image_grid(
      np.concatenate([np.asarray(x[:n]), np.asarray(rec[:n])]), ncol=n)
  image_io.save_png(os.path.join(workdir, "images", f"rec_{step:07d}.png"),
                       grid)


def evaluate(eval_fn, params, dataset, config, batch_sharding, n_embed):
  """Held-out PSNR, L1, codebook usage and perplexity (all processes join)."""
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  psnr, l1, hist = [], [], np.zeros(n_embed)
  for i, batch in enumerate(dataset.eval_iterator(config.batch_size)):
    if config.eval_batches and i >= config.eval_batches:
      break
    gb = make_global_batch({"image": batch["image"], "mask": batch["mask"]},
                           batch_sharding)
    _, idx, p, a = eval_fn(params, gb["image"])
    mask = to_host(gb["mask"]).astype(bool)
    psnr.append(to_host(p)[mask])
    l1.append(to_host(a)[mask])
    hist += np.bincount(to_host(idx)[mask].ravel(), minlength=n_embed)
  psnr, l1 = np.concatenate(psnr), np.concatenate(l1)
  prob = hist / max(hist.sum(), 1)
  nz = prob[prob > 0]
  return {
      "eval_psnr": float(np.mean(psnr)),
      "eval_l1": float(np.mean(l1)),
      "eval_codebook_usage": float(np.mean(hist > 0)),
      "eval_perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
      "eval_images": int(len(psnr)),
  }


@dataclasses.dataclass
class Setup:
  """Everything a stage-1 run compiles, for a given config and mesh."""
  model: vqgan_lib.VQGAN
  disc: disc_lib.NLayerDiscriminator
  mesh: Any
  abstract_state: PyTree
  state_shardings: PyTree
  batch_sharding: Any
  init_fn: Callable  # rng -> sharded state
  step_fn: Callable  # (state, batch, lpips_vars) -> (state, metrics); donates
  eval_fn: Callable  # (params, images) -> (rec, indices, psnr, l1)
  lpips_vars: PyTree


def create(config, mesh, extras: Optional[Dict[str, Any]] = None,
           tx: Optional[Tuple[Any, Any]] = None) -> Setup:
  """Builds the model, shardings and jitted functions of a stage-1 run."""
  schema.check_vqgan(config)
  schema.check_batch(config, dict(mesh.shape))
  model, disc = build_model(config), build_discriminator(config)
  tx_g, tx_d = tx or (make_optimizer(config), make_optimizer(config))
  init = functools.partial(init_state, model, disc, tx_g, tx_d, config)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = tuple(tuple(r) for r in config.partition_rules)
  state_sh = shard_lib.state_shardings(abstract, mesh, rules)
  batch_sh = shard_lib.batch_sharding(mesh)
  repl = shard_lib.replicated(mesh)
  lpips_model, lpips_vars = load_perceptual(config, extras or {})
  lpips_vars = jax.device_put(lpips_vars, repl) if lpips_vars else {}
  # XLA:CPU's convolution kernel gradients, rewritten (traced inside).
  cpu_rewrites = jax.default_backend() == "cpu"
  step_fn = jax.jit(
      xla_cpu.with_conv_rewrites(
          make_train_step(model, disc, tx_g, tx_d, config, lpips_model),
          cpu_rewrites),
      in_shardings=(state_sh, {"image": batch_sh}, repl),
      out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_fn = jax.jit(xla_cpu.with_conv_rewrites(make_eval_step(model),
                                               cpu_rewrites),
                    in_shardings=(state_sh["params"], batch_sh),
                    out_shardings=batch_sh)
  return Setup(model, disc, mesh, abstract, state_sh, batch_sh,
               threefry.gpu_kernel_threefry(
                   jax.jit(init, out_shardings=state_sh)), step_fn, eval_fn,
               lpips_vars)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Trains (or resumes) a VQGAN in ``workdir``; returns the last metrics."""
  from vqgan_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  schema.validate_vqgan(config)
  workdir = os.path.abspath(workdir)
  checkpoints.check_resume(  # another architecture in this workdir: exit 2
      workdir, vqgan_lib.model_config(vqgan_lib.from_config(
          config.model.to_dict())), schema.VQGAN_ARCH)
  mesh = shard_lib.make_mesh(config.mesh.to_dict())
  primary = jax.process_index() == 0

  train_ds = data_lib.build_dataset(
      config.dataset, resolution=config.model.resolution, split="train",
      data_dir=config.data_dir, channels=config.model.in_channels)
  eval_ds = build_eval_dataset(config) if config.eval_every else None

  extras = ckpt_lib.load_extras(config.init_from) if config.init_from else {}
  run = create(config, mesh, extras)
  optimizers = None  # read and checked before the workdir is touched
  if config.init_from_optimizer and ckpt_lib.latest_step(
      os.path.join(workdir, ckpt_lib.CHECKPOINTS_DIR)) is None:
    optimizers = optimizer_import.read_stage1(config, run.abstract_state,
                                              extras)
  step_fn = (run.step_fn if startup.finished(config, workdir) else
             compile_and_report(config, run))  # before the workdir is touched
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)

  def fresh_state():
    state = run.init_fn(jax.random.PRNGKey(config.seed))
    if config.init_from:
      state = _load_init_from(config, run.model, state, extras, optimizers)
      state = jax.device_put(state, run.state_shardings)
    if config.disc.use_actnorm and not _disc_initialized(state):
      state = _init_actnorm(run, state, train_ds, config)
    return state

  state, start_step = loop.restore_or_init(ckpt, run.abstract_state,
                                           run.state_shardings, fresh_state)
  if primary:
    ckpt_lib.write_model_json(workdir, "vqgan",
                              vqgan_lib.model_config(run.model),
                              train_config=config.to_dict())

  def save_images(step, state, batch):
    rec = to_host(run.eval_fn(state["params"], batch["image"])[0])
    if primary:
      _save_images(workdir, step, to_host(batch["image"]), rec)

  def evaluate_now(step, state, batch):
    del step, batch
    return evaluate(run.eval_fn, state["params"], eval_ds, config,
                    run.batch_sharding, run.model.n_embed)

  it = train_ds.train_iterator(config.batch_size, seed=config.seed,
                               start_step=start_step, augment=config.augment)
  host_batches = data_lib.ThreadPrefetcher(it, buffer_size=2)
  batches = data_lib.prefetch_to_device(host_batches, 2, run.batch_sharding)
  return loop.train_loop(
      config, workdir, ckpt, state, start_step,
      next_batch=lambda step: next(batches),
      step_fn=lambda state, batch: step_fn(
          state, {"image": batch["image"]}, run.lpips_vars),
      units_per_step=config.batch_size,
      log_extras=lambda rate, skipped: dict(
          img_per_sec=rate, skipped_total=skipped, **train_ds.stats),
      periodic=[loop.Periodic(config.image_every, save_images, at_end=False),
                loop.Periodic(config.eval_every, evaluate_now)],
      checkpoint_meta={"dataset": config.dataset},
      # no data thread left running at interpreter exit
      on_exit=[host_batches.close],
      label="stage 1 VQGAN", progress_keys=("loss", "rec_loss"))


def compile_and_report(config, run: Setup):
  """``run.step_fn`` compiled for the run's state and batch shapes; prints
  the run's header and refuses a step that would not fit the device
  (`vqgan_jax.training.startup`). The returned object replaces
  ``run.step_fn`` (the same program, compiled once)."""
  m = config.model
  images = jax.ShapeDtypeStruct(
      (config.batch_size, m.resolution, m.resolution, m.in_channels),
      jnp.float32, sharding=run.batch_sharding)
  compiled, seconds = startup.compile_step(
      run.step_fn, startup.abstract(run.abstract_state, run.state_shardings),
      {"image": images}, run.lpips_vars)
  startup.start(
      config, stage="stage 1 VQGAN", mesh=run.mesh, compiled=compiled,
      compile_seconds=seconds,
      sizes=[("generator", startup.param_count(run.abstract_state["params"])),
             ("discriminator",
              startup.param_count(run.abstract_state["disc_params"]))],
      smaller="--config.model.ch or --config.model.resolution")
  return compiled
