"""Stage-2 training: a GPT over the cached codes of a frozen VQGAN.

``train_and_evaluate(config, workdir)`` is what ``train_transformer.py``
calls. The dataset is encoded once (see :mod:`vqgan_jax.codes`); each step
builds ``[conditioning | image tokens]`` sequences (with the reference's
``pkeep`` corruption and, optionally, label dropout for classifier-free
guidance), and minimises the float32 cross-entropy of the image tokens.
AdamW (0.9, 0.95) decays Linear weights only, as the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import codes as codes_lib
from vqgan_jax import conditioning as cond_lib
from vqgan_jax import config_io
from vqgan_jax import gpt as gpt_lib
from vqgan_jax import losses as losses_lib
from vqgan_jax import image_io
from vqgan_jax import sampling
from vqgan_jax import sharding as shard_lib
from vqgan_jax.sharding import to_host
from vqgan_jax.backends import threefry
from vqgan_jax.training import checkpoints
from vqgan_jax.training import loop
from vqgan_jax.training import schema
from vqgan_jax.training import startup

PyTree = Any

# Dense bf16 peak TFLOP/s per device, for the MFU estimate.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0,
               "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0,
               "tpu v5p": 459.0, "tpu v6 lite": 918.0}


def peak_tflops(config) -> Optional[float]:
  if config.peak_tflops_per_device:
    return float(config.peak_tflops_per_device)
  kind = jax.devices()[0].device_kind.lower()
  for name, tf in PEAK_TFLOPS.items():
    if name in kind:
      return tf
  return None


learning_rate = loop.learning_rate


def weight_decay_mask(params: PyTree) -> PyTree:
  """True exactly for the weights the reference decays (Linear weights).

  Biases, LayerNorm scales, the token embedding and `pos_emb` are not
  decayed, as in the reference's `configure_optimizers`.

  Args:
    params: GPT params (either layer layout).

  Returns:
    A pytree of bools with the structure of `params`.
  """
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optim
  lr = learning_rate(config)
  if o.schedule == "constant":
    sched = optax.constant_schedule(lr)
    if o.warmup_steps:
      sched = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, o.warmup_steps),
           optax.constant_schedule(lr)], [o.warmup_steps])
  else:  # 'cosine', the other of schema.SCHEDULES
    total = max(config.num_train_steps, o.warmup_steps + 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, o.warmup_steps, total)
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(sched, b1=o.b1, b2=o.b2,
                           weight_decay=o.weight_decay,
                           mask=weight_decay_mask))
  tx = optax.chain(*parts)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx


@dataclasses.dataclass
class Layout:
  """Token layout of a run: conditioning length, grid, vocabulary."""
  kind: str
  cond_len: int
  grid: tuple
  n_embed: int
  vocab_size: int
  null_token: Optional[int]
  perm: np.ndarray

  @property
  def image_len(self) -> int:
    return self.grid[0] * self.grid[1]


def make_layout(config, n_embed: int, grid, cond_grid=None) -> Layout:
  cc = config.conditioning
  null = None
  vocab = n_embed
  if cc.kind == "class":
    cond_len = 1
    if cc.label_dropout > 0:
      null = cc.num_classes
    vocab = max(n_embed, cc.num_classes + (1 if null is not None else 0))
  elif cc.kind == "sos":
    cond_len = 1
    vocab = max(n_embed, cc.sos_token + 1)
  else:
    cond_len = int(np.prod(cond_grid))
  return Layout(cc.kind, cond_len, tuple(grid), n_embed, vocab, null,
                cond_lib.permutation(config.permuter, *grid))


def build_model(config, layout: Layout) -> gpt_lib.GPT:
  g = config.gpt.to_dict()
  need = layout.cond_len + layout.image_len - 1
  block = g.pop("block_size") or need
  if block < need:
    raise ValueError(f"config.gpt.block_size={block} is shorter than the "
                     f"sequence ({layout.cond_len} conditioning + "
                     f"{layout.image_len} image tokens - 1 = {need})")
  gpt_lib.check_options(g)
  if g["position_embedding"] == "rope2d":
    if config.permuter != "identity":
      raise ValueError("config.gpt.position_embedding='rope2d' places tokens "
                       "by raster order; it needs config.permuter='identity' "
                       f"(got {config.permuter!r}), or use 'rope'/'learned'")
    g.update(rope_grid=tuple(layout.grid), rope_prefix=layout.cond_len)
  return config_io.from_config(gpt_lib.GPT, dict(
      g, vocab_size=layout.vocab_size, block_size=block))


def init_state(model, tx, rng):
  r_init, r_state = jax.random.split(rng)
  tokens = jnp.zeros((1, model.block_size), jnp.int32)
  params = model.init(r_init, tokens)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params), "rng": r_state,
          "bad_steps": jnp.zeros((), jnp.int32)}


def make_train_step(model, tx, config, layout: Layout) -> Callable:
  """``step(state, batch) -> (state, metrics)``; batch has 'codes', 'cond'."""
  cc = config.conditioning
  perm = jnp.asarray(layout.perm)

  def loss_fn(params, batch, rng, train):
    r_drop, r_keep, r_label = jax.random.split(rng, 3)
    b = batch["codes"].shape[0]
    z = batch["codes"].reshape(b, -1)[:, perm]
    cond = batch["cond"]
    if train and layout.null_token is not None:
      cond = cond_lib.drop_labels(cond, r_label, cc.label_dropout,
                                  layout.null_token)
    inputs, targets, start = cond_lib.sequence(
        cond, z, rng=r_keep if train else None, pkeep=config.pkeep,
        vocab_size=layout.vocab_size)
    logits = model.apply({"params": params}, inputs, deterministic=not train,
                         rngs={"dropout": r_drop} if train else None)
    logits = logits[:, start:]
    return (losses_lib.token_loss(logits, targets),
            losses_lib.token_accuracy(logits, targets))

  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch, rng, True)
    g_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(g_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    new = dict(state, step=state["step"] + 1,
               params=keep(params, state["params"]),
               opt_state=keep(opt_state, state["opt_state"]),
               bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1))
    return new, {"loss": loss, "accuracy": acc, "grad_norm": g_norm,
                 "skipped": 1 - finite.astype(jnp.int32)}

  def eval_step(params, batch):
    return loss_fn(params, batch, jax.random.PRNGKey(0), False)

  return step, eval_step


# ----------------------------------------------------------------------------
# Data: codes and conditioning


def _resolve_dir(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def check_paired(ds, cond_ds) -> None:
  """Two datasets whose examples correspond one to one (same relative names)."""
  a, b = ds.source, cond_ds.source
  if a.num_examples != b.num_examples:
    raise ValueError(
        f"config.conditioning.cond_dataset ({b.name}) has {b.num_examples} "
        f"examples but config.dataset ({a.name}) has {a.num_examples}; the two "
        "must pair one to one (same relative file names)")
  pa, pb = getattr(a, "paths", None), getattr(b, "paths", None)
  if pa is not None and pb is not None:
    stem = lambda root, p: os.path.splitext(os.path.relpath(p, root))[0]
    for x, y in zip(pa, pb):
      if stem(a.root, x) != stem(b.root, y):
        raise ValueError(f"unpaired files: {x} vs {y}; the conditioning folder "
                         "must mirror the image folder's relative names")


class _TransformedSource:
  """A data source whose images pass through a conditioning transform."""

  def __init__(self, dataset, transform):
    self.dataset, self.transform = dataset, transform
    self.source = dataset.source
    self.resolution, self.channels = dataset.resolution, dataset.channels

  def eval_iterator(self, batch_size):
    for b in self.dataset.eval_iterator(batch_size):
      yield dict(b, image=cond_lib.cond_images(b["image"], self.transform))


def load_codes(config, mesh, split: str, vqgan, vqgan_vars, vqgan_dir,
               cond=None, dataset: Optional[str] = None):
  """{'codes', 'labels'[, 'cond_codes']} of a split of ``dataset`` (default
  ``config.dataset``), cached."""
  from vqgan_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  kind = config.conditioning.kind
  ds = data_lib.build_dataset(
      dataset or config.dataset, resolution=vqgan.resolution, split=split,
      data_dir=config.data_dir, channels=vqgan.in_channels,
      with_labels=kind == "class")
  cache = config.codes_dir or os.path.join(vqgan_dir, "codes")
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:
    cache = os.path.join(os.getcwd(), "codes_cache")
  out = codes_lib.cached_codes(cache, vqgan, config_io.to_config(vqgan),
                               vqgan_vars, ds, config.batch_size, mesh,
                               tag=split)
  if kind == "codes":
    c_model, c_vars, c_dir = cond
    c_cache = config.codes_dir or os.path.join(c_dir, "codes")
    if config.conditioning.cond_dataset:  # paired data, e.g. depth maps
      c_ds = data_lib.build_dataset(
          config.conditioning.cond_dataset, resolution=c_model.resolution,
          split=split, data_dir=config.data_dir,
          channels=c_model.in_channels)
      check_paired(ds, c_ds)
      tag = split
    else:
      c_ds = _TransformedSource(ds, config.conditioning.cond_transform)
      tag = split + ":" + config.conditioning.cond_transform
    c = codes_lib.cached_codes(c_cache, c_model, config_io.to_config(c_model),
                               c_vars, c_ds, config.batch_size, mesh, tag=tag)
    # Keep the examples readable on both sides, paired by source id.
    common = np.intersect1d(out["ids"], c["ids"])
    pick = lambda d: np.searchsorted(d["ids"], common)
    out = {k: v[pick(out)] for k, v in out.items()}
    out["cond_codes"] = c["codes"][pick(c)]
  if kind == "class":
    n = config.conditioning.num_classes
    if out["labels"].max() >= n:
      raise ValueError(f"the data has label {out['labels'].max()} but "
                       f"config.conditioning.num_classes={n}")
  return out


def cond_array(config, layout: Layout, data: Dict[str, np.ndarray]) -> np.ndarray:
  n = len(data["codes"])
  kind = config.conditioning.kind
  if kind == "class":
    return data["labels"].reshape(n, 1).astype(np.int32)
  if kind == "sos":
    return np.full((n, 1), config.conditioning.sos_token, np.int32)
  if kind == "codes":
    return data["cond_codes"].reshape(n, -1).astype(np.int32)
  # coord: a crop covers the whole (centre-cropped) image; coordinates of
  # its rows run 0..1 top to bottom, as the reference's coord maps.
  h, w = layout.grid
  ys = np.linspace(0, 1, h * 16)[:, None] * np.ones((1, w * 16))
  tok = cond_lib.coord_tokens(jnp.asarray(ys[None], jnp.float32),
                              layout.n_embed, 16)
  return np.repeat(np.asarray(tok), n, axis=0)


def _global_batch(data, cond, step, config, batch_sh):
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  idx = codes_lib.batch_indices(len(data["codes"]), config.batch_size, step,
                                config.seed)
  local = codes_lib.local_slice(idx)
  return make_global_batch({"codes": data["codes"][local],
                            "cond": cond[local]}, batch_sh)


# ----------------------------------------------------------------------------
# Samples


def sample_grid(model, params, vq_model, vq_vars, layout: Layout, config,
                rng, n_per_class: int, cond: Optional[np.ndarray] = None):
  """Decoded samples: one row per class (class conditioning) or a grid."""
  kind = config.conditioning.kind
  if kind == "class":
    classes = np.arange(config.conditioning.num_classes)
    prefix = np.repeat(classes, n_per_class)[:, None]
  elif kind == "sos":
    prefix = np.full((n_per_class * 4, 1), config.conditioning.sos_token)
  else:
    prefix = cond[:n_per_class * 4]
  toks = sampling.sample(model, {"params": params},
                         jnp.asarray(prefix, jnp.int32), layout.image_len, rng,
                         top_k=config.sample_top_k or None)
  toks = cond_lib.permute(np.asarray(toks), layout.perm, inverse=True)
  grid = jnp.asarray(toks.reshape(-1, *layout.grid))
  imgs = vq_model.apply(vq_vars, grid, method=vq_model.decode_indices)
  ncol = n_per_class if kind == "class" else 4
  return np.asarray(imgs), ncol


# ----------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Trains (or resumes) a stage-2 GPT in ``workdir``; returns last metrics."""
  schema.validate_transformer(config)
  workdir = os.path.abspath(workdir)
  checkpoints.check_resume(  # another architecture in this workdir: exit 2
      workdir, config.gpt.to_dict(), gpt_lib.ARCH_FIELDS,
      section=("train_config", "gpt"))
  mesh = shard_lib.make_mesh(config.mesh.to_dict())
  n_dev = mesh.devices.size
  primary = jax.process_index() == 0
  vq_dir = _resolve_dir(config.vqgan_workdir)
  vq_model, vq_vars = ckpt_lib.load_vqgan(vq_dir)
  cond = None
  if config.conditioning.kind == "codes":
    c_dir = _resolve_dir(config.conditioning.cond_vqgan_workdir)
    c_model, c_vars = ckpt_lib.load_vqgan(c_dir)
    cond = (c_model, c_vars, c_dir)
  train = load_codes(config, mesh, "train", vq_model, vq_vars, vq_dir, cond)
  val = None
  if config.eval_every:
    eval_name, eval_split = schema.eval_source(config)
    val = load_codes(config, mesh, eval_split, vq_model, vq_vars, vq_dir,
                     cond, dataset=eval_name)
  grid = train["codes"].shape[1:]
  cond_grid = train["cond_codes"].shape[1:] if "cond_codes" in train else None
  layout = make_layout(config, vq_model.n_embed, grid, cond_grid)
  model = build_model(config, layout)
  tx = make_optimizer(config)
  train_cond = cond_array(config, layout, train)
  val_cond = cond_array(config, layout, val) if val is not None else None

  init = functools.partial(init_state, model, tx)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = tuple(tuple(r) for r in config.partition_rules)
  state_sh = shard_lib.state_shardings(abstract, mesh, rules)
  batch_sh = shard_lib.batch_sharding(mesh)
  repl = shard_lib.replicated(mesh)
  step_py, eval_py = make_train_step(model, tx, config, layout)
  step_fn = jax.jit(step_py, in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_fn = jax.jit(eval_py, in_shardings=(state_sh["params"], batch_sh),
                    out_shardings=repl)

  # Compiled once, before the workdir is touched: the header, the memory
  # check and the FLOPs for the MFU come from this program, which trains
  # (a finished run, which only restores, compiles nothing).
  if not startup.finished(config, workdir):
    first = _global_batch(train, train_cond, 0, config, batch_sh)
    step_fn, seconds = startup.compile_step(
        step_fn, startup.abstract(abstract, state_sh),
        startup.abstract(first, batch_sh))
    startup.start(config, stage="stage 2 transformer", mesh=mesh,
                  compiled=step_fn, compile_seconds=seconds,
                  sizes=[("GPT", startup.param_count(abstract["params"]))],
                  smaller="--config.gpt.n_embd or --config.gpt.n_layer")
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  init_fn = threefry.gpu_kernel_threefry(jax.jit(init, out_shardings=state_sh))
  state, start = loop.restore_or_init(
      ckpt, abstract, state_sh,
      lambda: init_fn(jax.random.PRNGKey(config.seed)))
  entropy = codes_lib.code_entropy(train["codes"], vq_model.n_embed)
  if primary:
    ckpt_lib.write_model_json(
        workdir, "transformer", config_io.to_config(model),
        vqgan=vq_dir, image_grid=list(grid), permuter=config.permuter,
        conditioning=dict(config.conditioning.to_dict(),
                          null_token=layout.null_token,
                          cond_len=layout.cond_len,
                          cond_vqgan=cond[2] if cond else None),
        sampling=config.sampling.to_dict(), code_entropy=entropy,
        train_config=config.to_dict())

  flops = _step_flops(step_fn)
  peak = peak_tflops(config)
  tokens_per_step = config.batch_size * layout.image_len

  def log_extras(steps_per_sec, skipped):
    extra = {"tokens_per_sec": steps_per_sec * tokens_per_step,
             "skipped_total": skipped,
             "code_entropy": entropy}
    if flops and peak:
      extra["mfu"] = flops * steps_per_sec / (peak * 1e12 * n_dev)
    return extra

  def evaluate_now(step, state, batch):
    del step, batch
    return evaluate(eval_fn, state["params"], val, val_cond, config, batch_sh)

  def save_samples(step, state, batch):
    del batch
    imgs, ncol = sample_grid(model, to_host_tree(state["params"]),
                             vq_model, vq_vars, layout, config,
                             jax.random.PRNGKey(step),
                             config.samples_per_class, val_cond)
    if primary:
      image_io.save_png(
          os.path.join(workdir, "images", f"samples_{step:07d}.png"),
          image_io.image_grid(imgs, ncol=ncol))

  return loop.train_loop(
      config, workdir, ckpt, state, start,
      next_batch=lambda step: _global_batch(train, train_cond, step, config,
                                            batch_sh),
      step_fn=step_fn, log_extras=log_extras,
      periodic=[loop.Periodic(config.eval_every, evaluate_now),
                loop.Periodic(config.sample_every, save_samples)],
      label="stage 2 transformer")


def to_host_tree(tree):
  return jax.tree.map(to_host, tree)


def _step_flops(compiled) -> Optional[float]:
  """FLOPs of one call of the compiled step (XLA's cost analysis)."""
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def evaluate(eval_fn, params, data, cond, config, batch_sh) -> Dict[str, float]:
  """Validation loss per token and accuracy (whole batches)."""
  from vqgan_jax.data import make_global_batch  # pylint: disable=g-import-not-at-top
  n = len(data["codes"]) // config.batch_size
  if config.eval_batches:
    n = min(n, config.eval_batches)
  losses, accs = [], []
  for i in range(n):
    idx = np.arange(i * config.batch_size, (i + 1) * config.batch_size)
    local = codes_lib.local_slice(idx)
    b = make_global_batch({"codes": data["codes"][local],
                           "cond": cond[local]}, batch_sh)
    l, a = eval_fn(params, b)
    losses.append(float(l))
    accs.append(float(a))
  if not losses:
    return {}
  return {"eval_loss": float(np.mean(losses)),
          "eval_accuracy": float(np.mean(accs))}
