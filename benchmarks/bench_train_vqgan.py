"""Training steps/s of the f16 VQGAN, ours vs the reference, one run.

    python -m benchmarks.bench_train_vqgan [--size 256] [--batch 1]
        [--repeats 3] [--n_embed 1024] [--small] [--warmup 1]
        [--torch_threads 2]

One step is a full stage-1 update with the reference's loss: L1 + LPIPS +
adaptive-weight hinge PatchGAN (``disc_start=0``, so the GAN term and the
discriminator are active from the first step) + codebook, Adam (0.5, 0.9) on
generator and discriminator, lr = 4.5e-6 x batch.

Reference: ``taming.models.vqgan.VQModel`` with ``VQLPIPSWithDiscriminator``,
in train mode, stepped by hand the way Lightning 1.x steps two optimizers:
for optimizer 0 then 1, only that optimizer's parameters require grad
(``toggle_optimizer``), forward, loss, backward, Adam step; so the generator
runs forward twice. Ours: ``vqgan_trainer.create(...).step_fn`` (one
generator forward, two gradients), float32, plus a bfloat16-compute row.
Both LPIPS use the same random torchvision VGG16 trunk and the ``lpips``
package's lin heads (nothing downloads). Generator weights are independent
random initialisations (timing does not depend on them). Calls alternate,
after ``--warmup`` steps each; medians are reported, compile time separately.
``--small`` uses a tiny trunk (for checking the script, not numbers).

On a shared 2-core machine torch's two OpenMP threads spin at barriers and
small steps can vary 0.3-18 s when other processes run; ``--torch_threads 1``
is steadier there. The per-step times are printed to show the spread.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from benchmarks import common  # noqa: E402


def trunk(size: int, small: bool, n_embed: int):
  if small:
    dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
              attn_resolutions=[size // 2], dropout=0.0, in_channels=3,
              resolution=size, z_channels=32)
    return dd, min(n_embed, 64), 16
  dd = dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
            attn_resolutions=[16], dropout=0.0, in_channels=3,
            resolution=size, z_channels=256)
  return dd, n_embed, 256


def images(size: int, batch: int) -> np.ndarray:
  """(batch, size, size, 3) float32 images: 16x16 blocks plus noise."""
  rng = np.random.default_rng(1)
  base = rng.uniform(-1, 1, (batch, size // 16, size // 16, 3))
  x = np.repeat(np.repeat(base, 16, 1), 16, 2).astype(np.float32)
  return x + 0.1 * rng.normal(size=x.shape).astype(np.float32)


def build_reference(torch, dd, n_embed, embed_dim, vgg, lin_path, lr,
                    device="cpu"):
  """``step(xt, amp=nullcontext) -> [aeloss, discloss]`` of the reference.

  Forward passes and losses run inside ``with amp():`` (e.g. autocast),
  backward and the optimiser steps outside it.
  """
  import reference_ckpt as rc  # tests/ helper
  import taming.modules.losses.lpips as ref_lpips
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


def build_ours(dd, n_embed, embed_dim, batch, dtype, vgg_path, lin_path, x,
               init_cache=None, host_init=False):
  """``(step, compile seconds, compiled)`` of our stage-1 trainer's step.

  With a dict `init_cache`, the first call keeps its initial state there and
  later calls (another compute dtype: the same float32 state) start from a
  copy of it instead of building it again. With `host_init` the state is
  drawn on the host (`common.host_drawn_state`) instead of by the trainer's
  jitted initialiser, whose compilation took ~75 s on the H200.
  """
  from vqgan_jax.training import schema
  from vqgan_jax.training import sharding
  from vqgan_jax.training import vqgan_trainer as vt
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


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--n_embed", type=int, default=1024)
  p.add_argument("--small", action="store_true")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--torch_threads", type=int, default=2,
                 help="1 is steadier on a loaded 2-core machine")
  args = p.parse_args(argv)

  import oracle
  torch = oracle.torch()
  torch.set_num_threads(args.torch_threads)
  oracle.taming()
  import lpips
  import torchvision
  lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1",
                          "vgg.pth")
  tmp = tempfile.mkdtemp()
  torch.manual_seed(0)
  vgg = torchvision.models.vgg16(weights=None).eval()
  vgg_path = os.path.join(tmp, "vgg16_random.pth")
  torch.save(vgg.state_dict(), vgg_path)

  dd, n_embed, embed_dim = trunk(args.size, args.small, args.n_embed)
  x = images(args.size, args.batch)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  lr = 4.5e-6 * args.batch

  ref_step = build_reference(torch, dd, n_embed, embed_dim, vgg, lin_path, lr)
  init_cache = {}
  ours32, c32, _ = build_ours(dd, n_embed, embed_dim, args.batch, "float32",
                              vgg_path, lin_path, x, init_cache)
  ours16, c16, _ = build_ours(dd, n_embed, embed_dim, args.batch, "bfloat16",
                              vgg_path, lin_path, x, init_cache)
  shutil.rmtree(tmp)  # the 528 MB VGG16 file is loaded by now
  last = {}

  def keep(name, fn):
    return lambda: last.__setitem__(name, fn())

  times = common.alternate({
      "vqgan-jax (float32)": keep("ours32", ours32),
      "vqgan-jax (bfloat16 compute)": keep("ours16", ours16),
      "reference (float32)": keep("ref", lambda: ref_step(xt)),
  }, repeats=args.repeats, warmup=args.warmup)

  print(f"# training step, f16 VQGAN{' (small)' if args.small else ''}, "
        f"{args.size}x{args.size}, batch {args.batch}, n_embed {n_embed}, "
        f"LPIPS + PatchGAN (disc_start 0); {common.machine()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print("| implementation | median s/step | steps/s | images/s | ratio |")
  print("|---|---|---|---|---|")
  ref_med = common.median(times["reference (float32)"])
  for k, ts in times.items():
    med = common.median(ts)
    print(f"| {k} | {med:.3f} | {1 / med:.3f} | {args.batch / med:.2f} | "
          f"{ref_med / med:.2f}x |")
  print(f"\ncompile time (ours, once each): float32 {c32:.1f} s, "
        f"bfloat16 {c16:.1f} s")
  print("all step times (s): " + "; ".join(
      f"{k}: " + ", ".join(f"{t:.2f}" for t in ts) for k, ts in times.items()))
  parts = [f"ours {n}: loss {float(m['loss']):.4f}, "
           f"disc {float(m['disc_loss']):.4f}, "
           f"d_weight {float(m['d_weight']):.3g}, "
           f"disc_factor {float(m['disc_factor']):.0f}"
           for n, m in (("f32", last["ours32"]), ("bf16", last["ours16"]))]
  parts.append(f"reference: aeloss {last['ref'][0]:.4f}, "
               f"discloss {last['ref'][1]:.4f}")
  print("last step losses: " + "; ".join(parts))


if __name__ == "__main__":
  main()
