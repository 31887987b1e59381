"""Stage-2 training throughput (tokens/s), ours vs the reference, one run.

    python -m benchmarks.bench_train_transformer [--layers 12] [--width 512] \
        [--heads 8] [--vocab 1024] [--tokens 256] [--batch 8] [--repeats 5]

Both sides train the same GPT (the reference's minGPT with random weights,
converted) on the same random code sequences with a class prefix: forward,
float32 cross-entropy, backward and AdamW (0.9, 0.95) with the reference's
decay groups. The reference's Net2NetTransformer also re-encodes the images
with its first stage on every step; here codes are cached, so the comparison
covers the transformer step alone (the caching saves the rest on top).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from benchmarks import common  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)

  import oracle
  torch = oracle.torch()
  oracle.taming()
  from taming.modules.transformer.mingpt import GPT as RefGPT
  from vqgan_jax import gpt as gpt_lib
  from vqgan_jax.training import transformer_trainer as tt
  from vqgan_jax.training import schema

  block = args.tokens  # 1 class token + tokens - 1 inputs
  torch.manual_seed(0)
  ref = RefGPT(args.vocab, block, n_layer=args.layers, n_head=args.heads,
               n_embd=args.width)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

  # The reference's decay groups (Net2NetTransformer.configure_optimizers).
  decay, no_decay = [], []
  for mn, m in ref.named_modules():
    for pn, prm in m.named_parameters(recurse=False):
      (decay if pn.endswith("weight") and isinstance(m, torch.nn.Linear)
       else no_decay).append(prm)
  ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-4, betas=(0.9, 0.95))
  rng = np.random.default_rng(0)
  z = rng.integers(0, args.vocab, (args.batch, args.tokens)).astype(np.int64)
  c = rng.integers(0, 10, (args.batch, 1)).astype(np.int64)
  zt, ct = torch.from_numpy(z), torch.from_numpy(c)

  def ref_step():
    ref.train()
    seq = torch.cat([ct, zt], 1)[:, :-1]
    logits, _ = ref(seq)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), zt.reshape(-1))
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()
    return loss.item()

  cfg = schema.transformer_config()
  cfg.conditioning.kind = "class"
  cfg.conditioning.num_classes = 10
  cfg.optim.update(dict(lr_scaling="none", learning_rate=1e-4))
  cfg.gpt.update(dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width))
  batch = {"codes": jnp.asarray(z.reshape(args.batch, 1, -1), jnp.int32),
           "cond": jnp.asarray(c, jnp.int32)}
  fns = {"reference (float32)": ref_step}
  compile_times = {}
  for dtype in ("float32", "bfloat16"):
    cfg.gpt.dtype = dtype
    layout = tt.make_layout(cfg, args.vocab, (1, args.tokens))
    model = tt.build_model(cfg, layout)
    tx = tt.make_optimizer(cfg)
    params = gpt_lib.params_from_state_dict(sd, prefix="", model=model)
    state = {"step": jnp.zeros((), jnp.int32),
             "params": jax.tree.map(jnp.asarray, params),
             "opt_state": tx.init(params), "rng": jax.random.PRNGKey(0),
             "bad_steps": jnp.zeros((), jnp.int32)}
    step, _ = tt.make_train_step(model, tx, cfg, layout)
    jitted = jax.jit(step, donate_argnums=(0,))
    compile_times[dtype] = common.timed(
        lambda: jitted.lower(state, batch).compile())
    holder = {"s": state}

    def ours(holder=holder, jitted=jitted):
      holder["s"], m = jitted(holder["s"], batch)
      return jax.block_until_ready(m["loss"])

    fns[f"vqgan-jax ({dtype})"] = ours
  times = common.alternate(fns, repeats=args.repeats)
  tokens = args.batch * args.tokens
  print(f"# transformer training step: GPT {args.layers} layers, d {args.width}, "
        f"{args.heads} heads, vocab {args.vocab}, {args.tokens} tokens, batch "
        f"{args.batch}; {common.machine()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print("| implementation | median s/step | tokens/s | ratio |")
  print("|---|---|---|---|")
  ref_med = common.median(times["reference (float32)"])
  for k, ts in times.items():
    med = common.median(ts)
    print(f"| {k} | {med:.3f} | {tokens / med:.0f} | {ref_med / med:.2f}x |")
  print("\ncompile time (ours, once): " + ", ".join(
      f"{k} {v:.1f} s" for k, v in compile_times.items()))


if __name__ == "__main__":
  main()
