"""The four side-by-side benchmarks behind ``python -m benchmarks``.

Each section builds our implementation and the reference on the same
configuration and batch, runs them alternately after warm-up
(:func:`_alternate`) and returns :class:`table.Row` s plus
note lines. Our models get their own random initialisation (timings do not
depend on the weights), so our rows do not need the reference to import.

Sections: ``train_vqgan`` (stage-1 step: L1 + LPIPS + PatchGAN, both
optimisers), ``train_transformer`` (stage-2 step: GPT, float32
cross-entropy, AdamW), ``sampling`` (cached decoding with top-k) and
``encode_decode`` (image -> codes -> image).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import table
from benchmarks.table import Row

SECTIONS = ("train_transformer", "train_vqgan", "sampling", "encode_decode")

# Per preset: shared timing settings and each section's sizes.
PRESETS = {
    "tiny": dict(
        repeats=2, warmup=1,
        train_vqgan=dict(size=32, batch=1, n_embed=64, small=True),
        train_transformer=dict(layers=2, width=64, heads=2, vocab=128,
                               tokens=64, batch=2),
        sampling=dict(layers=2, width=64, heads=2, vocab=128, tokens=16,
                      batch=2, top_k=10),
        encode_decode=dict(size=32, batch=1, n_embed=64, small=True)),
    "cpu": dict(
        repeats=3, warmup=1,
        train_vqgan=dict(size=256, batch=1, n_embed=1024, small=False),
        train_transformer=dict(layers=12, width=512, heads=8, vocab=1024,
                               tokens=256, batch=8),
        sampling=dict(layers=12, width=512, heads=8, vocab=1024, tokens=256,
                      batch=16, top_k=100),
        encode_decode=dict(size=256, batch=2, n_embed=16384, small=False)),
    "gpu": dict(
        repeats=10, warmup=2,
        train_vqgan=dict(size=256, batch=8, n_embed=1024, small=False),
        # ~300M parameters: 12 * 24 * 1024^2 + embeddings and head.
        # Batch x tokens sized so the reference's float32 attention matrices
        # (B H T^2 floats per layer, kept for backward) fit next to ours.
        train_transformer=dict(layers=24, width=1024, heads=16, vocab=16384,
                               tokens=512, batch=16),
        sampling=dict(layers=12, width=512, heads=8, vocab=1024, tokens=256,
                      batch=16, top_k=100),
        encode_decode=dict(size=256, batch=8, n_embed=16384, small=False)),
}


# ----------------------------------------------------------------------------
# Shared plumbing

_T0 = [time.perf_counter()]


def log(msg: str) -> None:
  """Progress line with seconds since the section started (flushed)."""
  print(f"  [{time.perf_counter() - _T0[0]:6.1f} s] {msg}", flush=True)


class Env:
  """Run-wide settings: precisions, device peaks, the torch side."""

  def __init__(self, dtypes, ref_precisions, repeats, warmup,
               cpu_peak: Optional[float] = None):
    self.dtypes = tuple(dtypes)
    self.ref_precisions = tuple(ref_precisions)
    self.repeats = repeats
    self.warmup = warmup
    self.cpu_peak = cpu_peak
    self._torch = None

  def peak(self, precision: str) -> Optional[float]:
    return table.peak_for(precision, cpu_peak=self.cpu_peak)

  def torch(self, reference: bool = True):
    """``(torch, device)``; the reference runs on CUDA when JAX does.

    With ``reference=False`` only torch and torchvision are imported.
    """
    from benchmarks import refcompat  # pylint: disable=import-outside-toplevel
    if not reference:
      torch = refcompat.torch_with_torchvision()
      gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
      return torch, "cuda" if gpu else "cpu"
    if self._torch is None:
      torch, _ = refcompat.reference()
      gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
      if gpu:
        torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
      self._torch = (torch, "cuda" if gpu else "cpu")
    return self._torch

  def ref_fn(self, step: Callable[[Callable], object], precision: str,
             peak: Dict[str, float]) -> Callable[[], object]:
    """Wraps a reference call: autocast, CUDA sync and peak memory.

    ``step(amp)`` runs its forward passes inside ``with amp():`` (autocast
    to bfloat16 unless ``precision`` is float32) and backward outside it.
    """
    torch, device = self.torch()

    def amp():
      return (torch.autocast(device_type=device, dtype=torch.bfloat16)
              if precision != "float32" else contextlib.nullcontext())

    def call():
      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      out = step(amp)
      if device == "cuda":
        torch.cuda.synchronize()
        peak[precision] = max(peak.get(precision, 0.0),
                              float(torch.cuda.max_memory_allocated()))
      return out

    return call


def _ref_label(precision: str) -> str:
  return "float32" if precision == "float32" else "autocast bf16"


def _rows(bench, unit, items, times, ours, ref_peak, flops32) -> List[Row]:
  """Rows from alternate()'s times; ``ours[dtype] = (compile_s, mem, flops)``."""
  rows = []
  for key, ts in times.items():
    impl, prec = key.split(":")
    if impl == "ours":
      compile_s, mem, flops = ours[prec]
      rows.append(Row(bench, "vqgan-jax", prec, unit, items, ts, compile_s,
                      mem, "XLA plan" if mem else "", flops, None))
    else:
      mem = ref_peak.get(prec)
      rows.append(Row(bench, "reference", _ref_label(prec), unit, items, ts,
                      None, mem, "torch.cuda peak" if mem else "", flops32,
                      None))
  return rows


def _finish(rows: List[Row], env: Env) -> List[Row]:
  for r in rows:
    r.peak_tflops = env.peak(r.precision)
  return rows


def _timed_compile(jitted, *args):
  compiled = []
  seconds = common.timed(lambda: compiled.append(jitted.lower(*args).compile()))
  c = compiled[0]
  log(f"compiled in {seconds:.1f} s")
  return c, seconds, table.xla_memory(c), table.xla_flops(c)


def _error(errors: List[str], what: str, e: Exception) -> None:
  msg = f"{what} failed: {type(e).__name__}: {str(e)[:400]}"
  log(msg)
  errors.append(msg)


def _each_dtype(env: Env, build: Callable[[str], None],
                errors: List[str]) -> None:
  """Calls ``build(dtype)`` for our dtypes; one failing leaves the others."""
  for dtype in env.dtypes:
    try:
      build(dtype)
    except Exception as e:  # pylint: disable=broad-except
      _error(errors, f"vqgan-jax {dtype}", e)


def _alternate(fns, env, errors: List[str]) -> Dict[str, List[float]]:
  """Times each function ``env.repeats`` times, alternating between them,
  after ``env.warmup`` calls each; each must block until its result is
  ready. A call that raises drops its entry. Returns the seconds per timed
  call of each function that survived."""
  log(f"timing {', '.join(fns)}: {env.warmup} warm-up + {env.repeats} "
      "alternating calls each")
  live = dict(fns)

  def guarded(name):
    try:
      live[name]()
      return True
    except Exception as e:  # pylint: disable=broad-except
      _error(errors, f"{name} (while timing)", e)
      del live[name]
      _free_torch_memory()
      return False

  for name in list(live):
    for _ in range(env.warmup):
      if name in live:
        guarded(name)
  times = {k: [] for k in live}
  for _ in range(env.repeats):
    for name in list(live):
      t = time.perf_counter()
      if guarded(name):
        times[name].append(time.perf_counter() - t)
  log("timed")
  return {k: v for k, v in times.items() if k in live and v}


def _free_torch_memory() -> None:
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# Stage 2: transformer training step


def gpt_train_flops(layers: int, width: int, vocab: int, tokens: int,
                    batch: int) -> float:
  """Model FLOPs of one training step: 6 N per token plus attention.

  N counts the blocks' and the head's weights (not the embeddings);
  attention adds 12 L T d per token (forward and backward of QK^T and AV,
  the causal mask not discounted), as in the PaLM paper's MFU.
  """
  n = 12 * layers * width ** 2 + width * vocab
  return batch * tokens * (6 * n + 12 * layers * tokens * width)


def gpt_train_setup(layers, width, heads, vocab, tokens, dtype, **gpt):
  """``(config, layout, model, optimizer)`` of the benchmarked stage-2 step:
  a class-conditional GPT over ``tokens`` codes at a fixed learning rate;
  ``gpt`` sets further `config.gpt` fields."""
  from vqgan_jax.training import schema  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel
  cfg = schema.transformer_config()
  cfg.conditioning.kind = "class"
  cfg.conditioning.num_classes = 10
  cfg.optim.update(dict(lr_scaling="none", learning_rate=1e-4))
  cfg.gpt.update(dict(n_layer=layers, n_head=heads, n_embd=width,
                      dtype=dtype))
  for k, v in gpt.items():
    cfg.gpt[k] = v
  layout = tt.make_layout(cfg, vocab, (1, tokens))
  return cfg, layout, tt.build_model(cfg, layout), tt.make_optimizer(cfg)


def gpt_host_drawn_state(model, tx):
  """The stage-2 train state with host-drawn parameters, on the device.

  Not XLA's initialiser: for the 336M GPU model it compiled for about a
  minute on the H200 (threefry per parameter).
  """
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel
  return jax.device_put(common.host_drawn_state(jax.eval_shape(
      lambda r: tt.init_state(model, tx, r), jax.random.PRNGKey(0))))


def train_transformer(env: Env, layers, width, heads, vocab, tokens,
                      batch) -> Tuple[List[Row], List[str]]:
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  z = rng.integers(0, vocab, (batch, tokens)).astype(np.int64)
  c = rng.integers(0, 10, (batch, 1)).astype(np.int64)
  batch_ = {"codes": jnp.asarray(z.reshape(batch, 1, -1), jnp.int32),
            "cond": jnp.asarray(c, jnp.int32)}
  fns, ours, errors, init = {}, {}, [], {}

  def build(dtype, attention_impl=None):
    cfg, layout, model, tx = gpt_train_setup(
        layers, width, heads, vocab, tokens, dtype,
        attention_impl=attention_impl)
    if "state" not in init:  # float32 master weights whatever the dtype
      init["state"] = gpt_host_drawn_state(model, tx)
      log("initialised (parameters drawn on the host)")
    state = jax.tree.map(jnp.copy, init["state"])  # each run donates its own
    step, _ = tt.make_train_step(model, tx, cfg, layout)
    compiled, secs, mem, flops = _timed_compile(
        jax.jit(step, donate_argnums=(0,)), state, batch_)
    ours[dtype] = (secs, mem, flops)
    holder = {"s": state}

    def run(holder=holder, compiled=compiled):
      holder["s"], m = compiled(holder["s"], batch_)
      return jax.block_until_ready(m["loss"])

    fns[f"ours:{dtype}"] = run

  def build_or_xla(dtype):
    try:
      build(dtype)
    except Exception as e:  # pylint: disable=broad-except
      if jax.default_backend() != "gpu":
        raise
      _error(errors, f"vqgan-jax {dtype} (default attention)", e)
      log("retrying with attention_impl='xla'")
      build(dtype, "xla")
      errors.append(f"vqgan-jax {dtype}: timed with attention_impl='xla'")

  _each_dtype(env, build_or_xla, errors)
  ref_peak, ref_err = {}, None
  log("building the reference")
  try:
    ref_step = _reference_gpt_step(env, layers, width, heads, vocab, tokens,
                                   z, c)
    for prec in env.ref_precisions:
      fns[f"ref:{prec}"] = env.ref_fn(ref_step, prec, ref_peak)
  except Exception as e:  # pylint: disable=broad-except
    ref_err = f"reference unavailable: {type(e).__name__}: {e}"
    log(ref_err)
  times = _alternate(fns, env, errors)
  model_flops = gpt_train_flops(layers, width, vocab, tokens, batch)
  flops32 = ours.get("float32", (None, None, model_flops))[2] or model_flops
  bench = "stage-2 training"
  rows = _finish(_rows(bench, "tokens/s", batch * tokens, times, ours,
                       ref_peak, flops32), env)
  notes = [f"{bench}: GPT {layers} layers, d {width}, {heads} heads, vocab "
           f"{vocab}, {tokens} tokens, batch {batch} "
           f"({(12 * layers * width ** 2 + 2 * width * vocab) / 1e6:.0f}M "
           "parameters); ours = the trainer's step (make_train_step, donated "
           "state); the reference = minGPT forward, float32 cross-entropy, "
           "backward, AdamW with its decay groups (codes given, no first "
           "stage). GFLOP/call: XLA cost analysis of our step; model FLOPs "
           f"(6N per token + attention) = {model_flops / 1e9:.4g} GFLOP."]
  for r in rows:
    if r.impl == "vqgan-jax" and r.peak_tflops:
      notes.append(f"{bench} {r.precision}: MFU by model FLOPs "
                   f"{100 * model_flops / r.median_s / 1e12 / r.peak_tflops:.1f}%")
  if ref_err:
    notes.append(f"{bench}: {ref_err}")
  notes += [f"{bench}: {e}" for e in errors]
  return rows, notes


def _reference_gpt_step(env, layers, width, heads, vocab, tokens, z, c):
  torch, device = env.torch()
  from taming.modules.transformer.mingpt import GPT as RefGPT  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = RefGPT(vocab, tokens, n_layer=layers, n_head=heads,
               n_embd=width).to(device)
  decay, no_decay = [], []
  for _, m in ref.named_modules():
    for pn, prm in m.named_parameters(recurse=False):
      (decay if pn.endswith("weight") and isinstance(m, torch.nn.Linear)
       else no_decay).append(prm)
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.95))
  zt = torch.from_numpy(z).to(device)
  ct = torch.from_numpy(c).to(device)

  def step(amp):
    ref.train()
    seq = torch.cat([ct, zt], 1)[:, :-1]
    with amp():
      logits, _ = ref(seq)
      loss = torch.nn.functional.cross_entropy(
          logits.float().reshape(-1, logits.shape[-1]), zt.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return step


# ----------------------------------------------------------------------------
# Stage 1: VQGAN training step

# One step is a full stage-1 update with the reference's loss: L1 + LPIPS +
# adaptive-weight hinge PatchGAN (``disc_start=0``, so the GAN term and the
# discriminator are active from the first step) + codebook, Adam (0.5, 0.9)
# on generator and discriminator, lr = 4.5e-6 x batch. Both LPIPS use the
# same random torchvision VGG16 trunk and the ``lpips`` package's lin heads
# (nothing downloads).


def vqgan_trunk(size: int, small: bool, n_embed: int):
  """``(ddconfig, n_embed, embed_dim)`` of the f16 VQGAN, or of a tiny trunk
  (``small``: for checking the harness, not for numbers)."""
  if small:
    dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
              attn_resolutions=[size // 2], dropout=0.0, in_channels=3,
              resolution=size, z_channels=32)
    return dd, min(n_embed, 64), 16
  dd = dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
            attn_resolutions=[16], dropout=0.0, in_channels=3,
            resolution=size, z_channels=256)
  return dd, n_embed, 256


def block_images(size: int, batch: int) -> np.ndarray:
  """(batch, size, size, 3) float32 images: 16x16 blocks plus noise."""
  rng = np.random.default_rng(1)
  base = rng.uniform(-1, 1, (batch, size // 16, size // 16, 3))
  x = np.repeat(np.repeat(base, 16, 1), 16, 2).astype(np.float32)
  return x + 0.1 * rng.normal(size=x.shape).astype(np.float32)


def stage1_reference_step(torch, dd, n_embed, embed_dim, vgg, lin_path, lr,
                          device="cpu"):
  """``step(xt, amp=nullcontext) -> [aeloss, discloss]`` of the reference.

  Forward passes and losses run inside ``with amp():`` (e.g. autocast),
  backward and the optimiser steps outside it.
  """
  import taming.modules.losses.lpips as ref_lpips  # pylint: disable=import-outside-toplevel
  from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=import-outside-toplevel
  # Offline LPIPS: our random VGG16 trunk and the lpips package's lin heads.
  ref_lpips.models = types.SimpleNamespace(vgg16=lambda *a, **k: vgg)
  ref_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": (
      self.load_state_dict(torch.load(lin_path, map_location="cpu"),
                           strict=False))
  loss = {"target":
          "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
          "params": dict(disc_conditional=False, disc_in_channels=3,
                         disc_start=0, disc_weight=0.8, codebook_weight=1.0)}
  cfg = rc.vq_model_config(dd, n_embed, embed_dim, lossconfig=loss)
  ref = rc.build_reference(cfg, seed=0).to(device).train()
  ref.learning_rate = lr
  opts, _ = ref.configure_optimizers()
  groups = [[p for g in o.param_groups for p in g["params"]] for o in opts]

  def step(xt, amp=contextlib.nullcontext):
    out = []
    for idx, opt in enumerate(opts):
      for j, ps in enumerate(groups):  # Lightning's toggle_optimizer
        for p in ps:
          p.requires_grad_(j == idx)
      with amp():
        xrec, qloss = ref(xt)
        loss, _ = ref.loss(qloss, xt, xrec, idx, 0,
                           last_layer=ref.get_last_layer(), split="train")
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      out.append(float(loss.detach()))
    return out

  return step


def stage1_step(dd, n_embed, embed_dim, batch, dtype, vgg_path, lin_path, x,
                init_cache=None, host_init=False):
  """``(step, compile seconds, compiled)`` of our stage-1 trainer's step.

  With a dict `init_cache`, the first call keeps its initial state there and
  later calls (another compute dtype: the same float32 state) start from a
  copy of it instead of building it again. With `host_init` the state is
  drawn on the host (`common.host_drawn_state`) instead of by the trainer's
  jitted initialiser, whose compilation took ~75 s on the H200.
  """
  from vqgan_jax.training import schema  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sharding  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import vqgan_trainer as vt  # pylint: disable=import-outside-toplevel
  c = schema.vqgan_config()
  c.model.update(dict(
      ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
      num_res_blocks=dd["num_res_blocks"],
      attn_resolutions=tuple(dd["attn_resolutions"]),
      resolution=dd["resolution"],
      z_channels=dd["z_channels"], n_embed=n_embed, embed_dim=embed_dim,
      dtype=dtype))
  c.loss.update(dict(disc_start=0, disc_weight=0.8, codebook_weight=1.0,
                     perceptual_weight=1.0, lpips_vgg_path=vgg_path,
                     lpips_lin_path=lin_path))
  c.batch_size = batch
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  run = vt.create(c, mesh)
  if init_cache is not None and "state" in init_cache:
    state = jax.device_put(jax.tree.map(jnp.copy, init_cache["state"]),
                           run.state_shardings)
  else:
    if host_init:
      state = jax.device_put(common.host_drawn_state(run.abstract_state),
                             run.state_shardings)
    else:
      state = run.init_fn(jax.random.PRNGKey(0))
    if init_cache is not None:  # the step donates its state: keep a copy
      init_cache["state"] = jax.tree.map(jnp.copy, state)
  holder = {"state": state}
  batch_ = {"image": jax.device_put(jnp.asarray(x), run.batch_sharding)}
  compiled = []
  compile_s = common.timed(lambda: compiled.append(
      run.step_fn.lower(holder["state"], batch_, run.lpips_vars).compile()))

  def step():
    holder["state"], m = compiled[0](holder["state"], batch_, run.lpips_vars)
    return jax.block_until_ready(m)

  return step, compile_s, compiled[0]


def train_vqgan(env: Env, size, batch, n_embed, small
                ) -> Tuple[List[Row], List[str]]:
  torch, device = env.torch(reference=False)  # LPIPS's VGG16: torchvision
  import lpips  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1",
                          "vgg.pth")
  tmp = tempfile.mkdtemp()
  try:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    vgg_path = os.path.join(tmp, "vgg16_random.pth")
    torch.save(vgg.state_dict(), vgg_path)
    log("random VGG16 for LPIPS saved")
    dd, n_embed, embed_dim = vqgan_trunk(size, small, n_embed)
    x = block_images(size, batch)
    fns, ours, errors, init_cache = {}, {}, [], {}

    def build(dtype):
      run, secs, compiled = stage1_step(
          dd, n_embed, embed_dim, batch, dtype, vgg_path, lin_path, x,
          init_cache, host_init=jax.default_backend() == "gpu")
      log(f"ours {dtype}: compiled in {secs:.1f} s")
      ours[dtype] = (secs, table.xla_memory(compiled),
                     table.xla_flops(compiled))
      fns[f"ours:{dtype}"] = run

    _each_dtype(env, build, errors)
    ref_peak, ref_err = {}, None
    log("building the reference")
    try:
      torch, device = env.torch()
      ref_step = stage1_reference_step(torch, dd, n_embed, embed_dim, vgg,
                                     lin_path, 4.5e-6 * batch, device=device)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
      for prec in env.ref_precisions:
        fns[f"ref:{prec}"] = env.ref_fn(lambda amp: ref_step(xt, amp), prec,
                                        ref_peak)
    except Exception as e:  # pylint: disable=broad-except
      ref_err = f"reference unavailable: {type(e).__name__}: {e}"
      log(ref_err)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  times = _alternate(fns, env, errors)
  bench = "stage-1 training"
  flops32 = ours.get("float32", (None, None, None))[2]
  rows = _finish(_rows(bench, "images/s", batch, times, ours, ref_peak,
                       flops32), env)
  notes = [f"{bench}: f16 VQGAN{' (small trunk)' if small else ''}, "
           f"{size}x{size}, batch {batch}, {n_embed} codes; L1 + LPIPS + "
           "PatchGAN active from step 0, Adam on generator and "
           "discriminator. Ours: vqgan_trainer.create().step_fn (one "
           "generator forward, two gradients); the reference: VQModel + "
           "VQLPIPSWithDiscriminator stepped as Lightning 1.x steps two "
           "optimisers (generator forward twice). The reference's FLOPs/MFU "
           "use our step's FLOPs."]
  if ref_err:
    notes.append(f"{bench}: {ref_err}")
  notes += [f"{bench}: {e}" for e in errors]
  return rows, notes


# ----------------------------------------------------------------------------
# Sampling


def sampling_floor_s(param_bytes: float, layers: int, width: int, batch: int,
                     prefix: int, tokens: int, cache_itemsize: int,
                     tb_per_s: float) -> float:
  """Memory-bandwidth floor of sampling ``tokens`` tokens (seconds).

  Each decoding step reads every weight once and the keys/values of the
  positions filled so far: 2 L B p d elements at position p.
  """
  steps = range(prefix, prefix + tokens - 1)
  cache = sum(2 * layers * batch * p * width * cache_itemsize for p in steps)
  return (param_bytes * tokens + cache) / (tb_per_s * 1e12)


def sampling(env: Env, layers, width, heads, vocab, tokens, batch, top_k
             ) -> Tuple[List[Row], List[str]]:
  from vqgan_jax import gpt as gpt_lib  # pylint: disable=import-outside-toplevel
  from vqgan_jax import sampling as sampling_lib  # pylint: disable=import-outside-toplevel
  prefix_len = 1
  block = prefix_len + tokens - 1
  prefix = np.random.RandomState(0).randint(
      0, vocab, (batch, prefix_len)).astype(np.int32)
  fns, ours, floors, errors = {}, {}, {}, []
  _, _, tbs = table.peaks()

  def build(dtype):
    model = gpt_lib.GPT(vocab_size=vocab, block_size=block, n_layer=layers,
                        n_head=heads, n_embd=width, dtype=dtype)
    params = model.init(jax.random.PRNGKey(0),
                        jnp.zeros((1, block), jnp.int32))["params"]
    if dtype != "float32":  # weights stored in the compute dtype to sample
      params = jax.tree.map(lambda a: a.astype(dtype), params)
    variables = {"params": params}
    rng = [jax.random.key(0)]

    def run(model=model, variables=variables, rng=rng):
      rng[0], key = jax.random.split(rng[0])
      return jax.block_until_ready(sampling_lib.sample(
          model, variables, prefix, tokens, key, top_k=top_k))

    first = common.timed(run)
    warm = common.timed(run)
    log(f"ours {dtype}: first call {first:.1f} s, warm call {warm:.2f} s")
    ours[dtype] = (max(first - warm, 0.0), None, None)
    fns[f"ours:{dtype}"] = run
    if tbs:
      floors[dtype] = sampling_floor_s(
          table.tree_bytes(params), layers, width, batch, prefix_len, tokens,
          jnp.dtype(dtype).itemsize, tbs)

  _each_dtype(env, build, errors)
  ref_peak, ref_err = {}, None
  log("building the reference")
  try:
    torch, device = env.torch()
    from taming.modules.transformer import mingpt  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    ref = mingpt.GPT(vocab_size=vocab, block_size=block, n_layer=layers,
                     n_head=heads, n_embd=width).eval().to(device)
    prefix_t = torch.from_numpy(prefix.astype(np.int64)).to(device)

    def ref_run(amp):
      with torch.no_grad(), amp():
        return mingpt.sample_with_past(prefix_t, ref, steps=tokens,
                                       top_k=top_k, top_p=1.0,
                                       sample_logits=True)

    for prec in env.ref_precisions:
      fns[f"ref:{prec}"] = env.ref_fn(ref_run, prec, ref_peak)
  except Exception as e:  # pylint: disable=broad-except
    ref_err = f"reference unavailable: {type(e).__name__}: {e}"
    log(ref_err)
  times = _alternate(fns, env, errors)
  bench = "sampling"
  rows = _finish(_rows(bench, "tokens/s", batch * tokens, times, ours,
                       ref_peak, None), env)
  notes = [f"{bench}: GPT {layers} layers, d {width}, {heads} heads, vocab "
           f"{vocab}; batch {batch}, {tokens} tokens after a 1-token "
           f"prefix, top-k {top_k}; ours = vqgan_jax.sampling.sample "
           "(bfloat16 row: weights and cache in bfloat16), the reference = "
           "mingpt.sample_with_past (top_p=1.0). Compile s = first call "
           "minus a warm call."]
  for r in rows:
    if r.impl == "vqgan-jax" and r.precision in floors:
      f = floors[r.precision]
      notes.append(f"{bench} {r.precision}: memory-bandwidth floor "
                   f"{1e3 * f:.2f} ms per call (weights + filled KV cache "
                   f"per step at {tbs} TB/s); ours is {r.median_s / f:.1f}x "
                   "the floor")
  if ref_err:
    notes.append(f"{bench}: {ref_err}")
  notes += [f"{bench}: {e}" for e in errors]
  return rows, notes


# ----------------------------------------------------------------------------
# Encode + decode


def encode_decode(env: Env, size, batch, n_embed, small
                  ) -> Tuple[List[Row], List[str]]:
  from vqgan_jax import vqgan as vqgan_lib  # pylint: disable=import-outside-toplevel
  dd, n_embed, embed_dim = vqgan_trunk(size, small, n_embed)
  model_kw = dict(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                  num_res_blocks=dd["num_res_blocks"],
                  attn_resolutions=tuple(dd["attn_resolutions"]),
                  resolution=size, z_channels=dd["z_channels"],
                  n_embed=n_embed, embed_dim=embed_dim)
  x = block_images(size, batch)
  xj = jnp.asarray(x)
  fns, ours, errors, outputs = {}, {}, [], {}

  init = {}

  def build(dtype):
    model = vqgan_lib.VQGAN(**model_kw, dtype=dtype)
    if "v" not in init:  # float32 parameters whatever the compute dtype
      init["v"] = jax.jit(model.init)(jax.random.PRNGKey(0), xj[:1])
      log("initialised")
    variables = init["v"]

    def enc_dec(variables, x, model=model):
      codes = model.apply(variables, x, method=model.encode_to_indices)
      return codes, model.apply(variables, codes, method=model.decode_indices)

    compiled, secs, mem, flops = _timed_compile(jax.jit(enc_dec), variables,
                                                xj)
    ours[dtype] = (secs, mem, flops)
    fns[f"ours:{dtype}"] = (lambda c=compiled, v=variables:
                            jax.block_until_ready(c(v, xj)))
    outputs[dtype] = lambda c=compiled, v=variables: c(v, xj)

  _each_dtype(env, build, errors)
  ref_peak, ref_err = {}, None
  log("building the reference")
  try:
    torch, device = env.torch()
    from vqgan_jax_testing import reference_ckpt as rc  # pylint: disable=import-outside-toplevel
    cfg = rc.vq_model_config(dict(dd, out_ch=3, in_channels=3, dropout=0.0),
                             n_embed, embed_dim)
    ref = rc.build_reference(cfg, seed=0).to(device)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)

    def ref_run(amp):
      with torch.no_grad(), amp():
        q, _, _ = ref.encode(xt)
        return ref.decode(q)

    for prec in env.ref_precisions:
      fns[f"ref:{prec}"] = env.ref_fn(ref_run, prec, ref_peak)
  except Exception as e:  # pylint: disable=broad-except
    ref_err = f"reference unavailable: {type(e).__name__}: {e}"
    log(ref_err)
  times = _alternate(fns, env, errors)
  bench = "encode+decode"
  flops32 = ours.get("float32", (None, None, None))[2]
  rows = _finish(_rows(bench, "images/s", batch, times, ours, ref_peak,
                       flops32), env)
  notes = [f"{bench}: f16 VQGAN{' (small trunk)' if small else ''}, "
           f"{size}x{size}, batch {batch}, {n_embed} codes; image -> codes "
           "-> image, the reference in eval mode under no_grad."]
  if "float32" in outputs and "bfloat16" in outputs:
    (c32, r32), (c16, r16) = outputs["float32"](), outputs["bfloat16"]()
    err = jnp.abs(r16.astype(jnp.float32) - r32)
    notes.append(f"{bench}: bfloat16 vs float32 (ours, same weights): same "
                 f"code at {100 * float(jnp.mean(c16 == c32)):.1f}% of "
                 f"positions; reconstructions differ by {float(err.max()):.3f}"
                 f" max, {float(err.mean()):.4f} mean abs")
  if ref_err:
    notes.append(f"{bench}: {ref_err}")
  notes += [f"{bench}: {e}" for e in errors]
  return rows, notes


RUNNERS = {"train_transformer": train_transformer, "train_vqgan": train_vqgan,
           "sampling": sampling, "encode_decode": encode_decode}


def run_section(name: str, env: Env, sizes: Dict) -> Tuple[List[Row],
                                                           List[str]]:
  if name not in RUNNERS:
    raise ValueError(f"--only={name!r}; valid sections: {SECTIONS}")
  _T0[0] = time.perf_counter()
  log(f"{name} {sizes}")
  return RUNNERS[name](env, **sizes)
