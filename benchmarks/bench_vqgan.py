"""Encode+decode throughput of the f16 VQGAN, ours vs the reference, one run.

    python -m benchmarks.bench_vqgan [--size 256] [--batch 2] [--repeats 5] [--small]

Both sides get the same random weights (the reference VQModel converted with
``load_taming_vqgan``); the reference runs in eval mode under
``torch.no_grad()``. Calls alternate, after warm-up; medians are reported,
compile time separately. Also measures our bfloat16 path against our float32
path: the fraction of positions with the same code and the reconstruction
error. ``--small`` uses a tiny trunk (for checking the script, not numbers).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from benchmarks import common  # noqa: E402


def build(size: int, small: bool, tmp: str):
  import reference_ckpt as rc  # tests/ helper: reference model -> .ckpt + YAML
  from vqgan_jax import convert
  if small:
    dd = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
              attn_resolutions=[16], dropout=0.0, in_channels=3,
              resolution=size, z_channels=32)
    n_embed, embed_dim = 64, 16
  else:
    dd = dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
              attn_resolutions=[16], dropout=0.0, in_channels=3,
              resolution=size, z_channels=256)
    n_embed, embed_dim = 16384, 256
  cfg = rc.vq_model_config(dd, n_embed, embed_dim)
  ref = rc.build_reference(cfg, seed=0)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  rc.spread_codebook(ref, rc.to_nchw(x))
  ckpt, yml = rc.save_reference(tmp, ref, cfg)
  model, variables = convert.load_taming_vqgan(ckpt, yml)
  return ref, model, variables, ckpt, yml


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--small", action="store_true")
  args = p.parse_args(argv)

  import oracle
  torch = oracle.torch()
  from vqgan_jax import convert
  tmp = tempfile.mkdtemp()
  try:
    _run(args, torch, convert, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _run(args, torch, convert, tmp):
  ref, model, variables, ckpt, yml = build(args.size, args.small, tmp)
  rng = np.random.default_rng(1)
  base = rng.uniform(-1, 1, (args.batch, args.size // 16, args.size // 16, 3))
  x = np.repeat(np.repeat(base, 16, 1), 16, 2).astype(np.float32)
  x += 0.1 * rng.normal(size=x.shape).astype(np.float32)
  xj, xt = jnp.asarray(x), torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  @jax.jit
  def ours(variables, x):
    codes = model.apply(variables, x, method=model.encode_to_indices)
    return codes, model.apply(variables, codes, method=model.decode_indices)

  compile_s = common.timed(
      lambda: jax.block_until_ready(ours.lower(variables, xj).compile()))

  def run_ref():
    with torch.no_grad():
      q, _, _ = ref.encode(xt)
      return ref.decode(q)

  times = common.alternate({
      "vqgan-jax (float32)": lambda: jax.block_until_ready(ours(variables, xj)),
      "reference (float32)": run_ref,
  }, repeats=args.repeats)

  # bfloat16 fidelity against our float32 path.
  bf_model, bf_vars = convert.load_taming_vqgan(ckpt, yml, dtype=jnp.bfloat16)
  bf = jax.jit(lambda v, x: (bf_model.apply(v, x, method=bf_model.encode_to_indices),
                             bf_model.apply(v, x)[0]))
  codes32, rec32 = ours(variables, xj)
  codes16, rec16 = bf(bf_vars, xj)
  dec16 = bf_model.apply(bf_vars, codes32, method=bf_model.decode_indices)
  match = float(jnp.mean(codes16 == codes32))
  dec_err = float(jnp.max(jnp.abs(dec16 - rec32)))
  dec_mean = float(jnp.mean(jnp.abs(dec16 - rec32)))

  print(f"# encode+decode, f16 VQGAN{' (small)' if args.small else ''}, "
        f"{args.size}x{args.size}, batch {args.batch}; {common.machine()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print("| implementation | median s/batch | images/s | ratio |")
  print("|---|---|---|---|")
  ref_med = common.median(times["reference (float32)"])
  for k, ts in times.items():
    med = common.median(ts)
    print(f"| {k} | {med:.3f} | {args.batch / med:.2f} | {ref_med / med:.2f}x |")
  print(f"\ncompile time (ours, once): {compile_s:.1f} s")
  print(f"bfloat16 vs float32 (ours): same code at {100 * match:.1f}% of positions; "
        f"decoder on the float32 codes: max abs error {dec_err:.3f}, "
        f"mean abs error {dec_mean:.4f}")


if __name__ == "__main__":
  main()
