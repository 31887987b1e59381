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
from vqgan_jax import digest
from vqgan_jax import discriminator as disc_lib
from vqgan_jax import image_io
from vqgan_jax import losses
from vqgan_jax import modules
from vqgan_jax import quantizers
from vqgan_jax import sharding as shard_lib
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.backends import xla_cpu
from vqgan_jax.sharding import to_host
from vqgan_jax.training import checkpoints
from vqgan_jax.training import loop
from vqgan_jax.training import metrics as metrics_lib
from vqgan_jax.training import runtime
from vqgan_jax.training import schema

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
    return lpips_lib.load_lpips(lc.lpips_vgg_path, lc.lpips_lin_path,
                                dtype=dtype)
  if "lpips" in extras:
    return lpips_lib.LPIPS(dtype=dtype), extras["lpips"]
  raise ValueError(
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
  if config.loss.get("lecam_weight", 0.0):
    state["lecam_ema"] = {"real": jnp.zeros((), jnp.float32),
                          "fake": jnp.zeros((), jnp.float32)}
  return state


# ----------------------------------------------------------------------------
# The step


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def _generator_grads(model, disc, lc, lpips_model) -> Callable:
  """``(state, x, rng, lpips_vars, disc_factor, warmup) -> (loss, grads,
  terms)``: :func:`losses.vqgan_generator_loss_and_grads` of the VQGAN split
  at ``decoder/conv_out``. The trunk's aux is ``(indices, quantizer_stats)``
  (an EMA codebook updates its statistics from this global batch), the GAN
  term's the discriminator's ``batch_stats`` after the call."""
  fixed = lc.get("gan_weight_mode", "adaptive") == "fixed"

  def generator(state, x, rng, lpips_vars, disc_factor, warmup):
    r_drop, r_drop2, r_gumbel = jax.random.split(rng, 3)
    qstats = state.get("quantizer_stats")

    def trunk(p):
      rngs = {"dropout": r_drop, "gumbel": r_gumbel,
              "quantizer": jax.random.fold_in(r_gumbel, 1)}
      if qstats is None:
        z_q, aux = model.apply({"params": p}, x, train=True,
                               method=model.encode, rngs=rngs)
        new_qstats = None
      else:
        (z_q, aux), upd = model.apply(
            {"params": p, "quantizer_stats": qstats}, x, train=True,
            method=model.encode, rngs=rngs, mutable=["quantizer_stats"])
        new_qstats = upd["quantizer_stats"]
      h = model.apply({"params": p}, z_q, train=True,
                      method=model.decode_features, rngs={"dropout": r_drop2})
      return (h, aux["q_loss"]), (aux["indices"], new_qstats)

    def head(kernel, bias, h):
      return modules.conv2d(h, kernel, bias, dtype=model.dtype).astype(
          jnp.float32)

    def perceptual(a, b):
      if a.shape[-1] == 1:  # LPIPS-VGG wants RGB
        a, b = jnp.tile(a, (1, 1, 1, 3)), jnp.tile(b, (1, 1, 1, 3))
      return lpips_model.apply(jax.lax.stop_gradient(lpips_vars), a, b)

    def nll_term(rec):
      nll, parts = losses.reconstruction_loss(
          x, rec, perceptual if lpips_model is not None else None,
          perceptual_weight=lc.perceptual_weight)
      return nll, (parts["l1_loss"], parts["p_loss"])

    def gan_term(rec):
      logits_fake, new_stats = disc.apply(
          {"params": state["disc_params"], **state["disc_state"]}, rec,
          train=True, mutable=list(state["disc_state"].keys()))
      return losses.generator_gan_loss(logits_fake), new_stats

    conv_out = state["params"]["decoder"]["conv_out"]
    loss, (grads, (d_kernel, d_bias)), terms = (
        losses.vqgan_generator_loss_and_grads(
            trunk, state["params"], head,
            (conv_out["kernel"], conv_out["bias"]), nll_term, gan_term,
            disc_factor=disc_factor, warmup=warmup,
            codebook_weight=lc.codebook_weight, disc_weight=lc.disc_weight,
            gan_weight=lc.gan_weight if fixed else None))
    grads["decoder"]["conv_out"] = {"kernel": d_kernel, "bias": d_bias}
    return loss, grads, terms

  return generator


def _discriminator_grads(disc, lc) -> Callable:
  """``(state, x, fake, disc_state) -> (loss, grads, terms)``:
  :func:`losses.vqgan_discriminator_loss_and_grads` from ``disc_state`` (the
  collections after the generator's call)."""
  lecam_weight = float(lc.get("lecam_weight", 0.0))
  r1_weight = float(lc.get("r1_weight", 0.0))

  def discriminator(state, x, fake, disc_state):
    keys = list(disc_state.keys())
    disc_fn = lambda dp, s, im: disc.apply({"params": dp, **s}, im,
                                           train=True, mutable=keys)
    return losses.vqgan_discriminator_loss_and_grads(
        disc_fn, state["disc_params"], disc_state, x, fake, state["step"],
        disc_factor=lc.disc_factor, disc_start=lc.disc_start,
        disc_loss=lc.disc_loss, r1_weight=r1_weight,
        lecam_weight=lecam_weight, lecam_ema=state.get("lecam_ema"),
        lecam_decay=lc.get("lecam_decay", 0.999))

  return discriminator


def _guarded_update(tx_g, tx_d, ema) -> Callable:
  """``(state, g, d) -> (state, finite, grad norms)``: both optimizer steps
  (and the EMA codebook and parameter EMA), applied only when the losses
  and gradient norms are all finite; otherwise the state stays as it was
  and ``bad_steps`` counts up. ``g``/``d`` are ``(loss, grads, terms)``."""

  def update(state, g, d):
    (loss, grads, gt), (d_loss, d_grads, dt) = g, d
    params, dparams = state["params"], state["disc_params"]
    qstats = state.get("quantizer_stats")
    new_qstats = gt.trunk_aux[1]
    g_norm, d_norm = _global_norm(grads), _global_norm(d_grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(d_loss) & jnp.isfinite(g_norm)
              & jnp.isfinite(d_norm))
    updates, opt_state = tx_g.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if qstats is not None:
      new_params = quantizers.with_ema_codebooks(new_params, new_qstats)
    d_updates, d_opt_state = tx_d.update(d_grads, state["disc_opt_state"],
                                         dparams)
    new_dparams = optax.apply_updates(dparams, d_updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = dict(state)
    new_state.update(
        step=state["step"] + 1,
        params=keep(new_params, params),
        opt_state=keep(opt_state, state["opt_state"]),
        disc_params=keep(new_dparams, dparams),
        disc_state=keep(dt.disc_state, state["disc_state"]),
        disc_opt_state=keep(d_opt_state, state["disc_opt_state"]),
        bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1),
    )
    if qstats is not None:
      new_state["quantizer_stats"] = keep(new_qstats, qstats)
    if dt.lecam_ema is not None:
      new_state["lecam_ema"] = keep(dt.lecam_ema, state["lecam_ema"])
    if ema:
      new_state["ema_params"] = keep(jax.tree.map(
          lambda e, p: ema * e + (1 - ema) * p, state["ema_params"],
          new_params), state["ema_params"])
    return new_state, finite, (g_norm, d_norm)

  return update


def _step_metrics(g, d, finite, norms, disc_factor, warmup, lc, n_embed):
  """The step's logged scalars (names listed in API.md)."""
  (loss, _, gt), (d_loss, _, dt) = g, d
  l1, p_loss = gt.nll_aux
  indices = gt.trunk_aux[0]
  metrics = {
      "loss": loss, "rec_loss": l1, "p_loss": p_loss,
      "nll_loss": gt.nll_loss, "g_loss": gt.g_loss, "d_weight": gt.d_weight,
      "disc_factor": disc_factor, "q_loss": gt.q_loss, "disc_loss": d_loss,
      "logits_real": dt.logits_real, "logits_fake": dt.logits_fake,
      "grad_norm": norms[0], "disc_grad_norm": norms[1],
      "codebook_usage": quantizers.codebook_usage(indices, n_embed),
      "perplexity": quantizers.perplexity(indices, n_embed),
      "skipped": 1 - finite.astype(jnp.int32),
  }
  metrics.update(dt.regs)
  if lc.get("disc_warmup_steps", 0):
    metrics["gan_warmup"] = warmup
  return metrics


def make_train_step(model, disc, tx_g, tx_d, config, lpips_model=None
                    ) -> Callable:
  """Returns ``step(state, batch, lpips_vars) -> (state, metrics)``.

  The generator's forward and gradients, then the discriminator's on the
  same reconstructions (gradient stopped) from the ``batch_stats`` the
  generator's call left, then both updates behind one finiteness guard.
  """
  lc = config.loss
  generator = _generator_grads(model, disc, lc, lpips_model)
  discriminator = _discriminator_grads(disc, lc)
  update = _guarded_update(tx_g, tx_d, config.optim.ema_decay)

  def step(state, batch, lpips_vars):
    x = batch["image"].astype(jnp.float32)
    rng = jax.random.fold_in(state["rng"], state["step"])
    disc_factor = losses.adopt_weight(lc.disc_factor, state["step"],
                                      lc.disc_start)
    warmup = losses.gan_warmup_factor(state["step"], lc.disc_start,
                                      lc.get("disc_warmup_steps", 0),
                                      lc.get("disc_warmup_mode", "hold"))
    g = generator(state, x, rng, lpips_vars, disc_factor, warmup)
    g_terms = g[2]
    d = discriminator(state, x, jax.lax.stop_gradient(g_terms.rec),
                      g_terms.gan_aux)
    new_state, finite, norms = update(state, g, d)
    return new_state, _step_metrics(g, d, finite, norms, disc_factor, warmup,
                                    lc, model.n_embed)

  return step


def make_eval_step(model) -> Callable:
  """``(params, x) -> (rec, indices, psnr, l1)``, per example."""

  def eval_step(params, x):
    rec, aux = model.apply({"params": params}, x)
    err = (x.astype(jnp.float32) - rec)
    mse = jnp.mean(err**2, axis=(1, 2, 3))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return rec, aux["indices"], psnr, jnp.mean(jnp.abs(err), axis=(1, 2, 3))

  return eval_step


# ----------------------------------------------------------------------------
# The loop


def _load_init_from(config, model, state, extras: Dict[str, Any]) -> PyTree:
  """Replaces parameters by those of ``config.init_from`` (checked), and the
  discriminator by the one saved beside it (``extras``) when it fits."""
  path = config.init_from
  info, variables = ckpt_lib.load_variables(path, "vqgan")
  shapes_ok = jax.tree.structure(variables["params"]) == jax.tree.structure(
      state["params"]) and all(
          np.shape(a) == np.shape(b) for a, b in zip(
              jax.tree.leaves(variables["params"]),
              jax.tree.leaves(state["params"])))
  schema.check_init_from(config, info["config"], shapes_ok)
  params = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype),
                        variables["params"], state["params"])
  state = dict(state, params=params)
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
  return state


def _disc_initialized(state) -> bool:
  flags = [v for p, v in jax.tree_util.tree_leaves_with_path(state["disc_state"])
           if "initialized" in jax.tree_util.keystr(p)]
  return bool(flags) and all(int(jax.device_get(f)) for f in flags)


def _init_actnorm(run, state, train_ds, config):
  """Data-dependent ActNorm init on the first batch's reconstructions (the
  discriminator's first input in the reference, whose ActNorm initialises
  on its first training call)."""
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  it = train_ds.train_iterator(config.batch_size, seed=config.seed)
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
               runtime.gpu_kernel_threefry(
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
  eval_ds = None
  if config.eval_every:
    eval_split = config.eval_split
    if config.dataset.startswith("folder:"):
      eval_split = "train"
    eval_ds = data_lib.build_dataset(
        config.dataset, resolution=config.model.resolution, split=eval_split,
        data_dir=config.data_dir, channels=config.model.in_channels)

  extras = ckpt_lib.load_extras(config.init_from) if config.init_from else {}
  run = create(config, mesh, extras)
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)

  def fresh_state():
    state = run.init_fn(jax.random.PRNGKey(config.seed))
    if config.init_from:
      state = _load_init_from(config, run.model, state, extras)
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
                               start_step=start_step)
  host_batches = data_lib.ThreadPrefetcher(it, buffer_size=2)
  batches = data_lib.prefetch_to_device(host_batches, 2, run.batch_sharding)
  return loop.train_loop(
      config, workdir, ckpt, state, start_step,
      next_batch=lambda step: next(batches),
      step_fn=lambda state, batch: run.step_fn(
          state, {"image": batch["image"]}, run.lpips_vars),
      units_per_step=config.batch_size,
      log_extras=lambda rate, skipped: dict(
          img_per_sec=rate, skipped_total=skipped, **train_ds.stats),
      periodic=[loop.Periodic(config.image_every, save_images, at_end=False),
                loop.Periodic(config.eval_every, evaluate_now)],
      checkpoint_meta={"dataset": config.dataset},
      # no data thread left running at interpreter exit
      on_exit=[host_batches.close])
