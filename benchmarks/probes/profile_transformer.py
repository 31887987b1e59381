"""Stage-2 step in pieces, ours vs the reference, by CPU time per call.

    python -m benchmarks.probes.profile_transformer [--threads 1] [--repeats 3]

Times forward, forward + backward and the full training step (and ours
without the non-finite guard) of the bench_train_transformer workload
(GPT 12 x 512, batch 8 x 256, vocab 1024, float32), alternating, medians.
With ``--threads 1`` (torch.set_num_threads(1) and single-threaded XLA) the
process CPU time of a call measures its work even on a loaded machine,
where wall-clock times are not comparable.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

from absl import flags

from vqgan_jax import cli


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_integer("threads", 1, "torch threads; 1 also makes XLA "
                       "single-threaded.", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "Timed calls per piece.", flag_values=fv)
  flags.DEFINE_integer("layers", 12, "GPT layers.", flag_values=fv)
  flags.DEFINE_integer("width", 512, "GPT width.", flag_values=fv)
  flags.DEFINE_integer("heads", 8, "Attention heads.", flag_values=fv)
  flags.DEFINE_integer("vocab", 1024, "Codebook size.", flag_values=fv)
  flags.DEFINE_integer("tokens", 256, "Tokens per sequence.", flag_values=fv)
  flags.DEFINE_integer("batch", 8, "Sequences per step.", flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.probes.profile_transformer")
  a = fv
  if a.threads == 1:  # must precede the first jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1")
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from benchmarks import refcompat  # pylint: disable=import-outside-toplevel
  from benchmarks import suite  # pylint: disable=import-outside-toplevel
  from vqgan_jax import losses  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import schema  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel

  torch, _ = refcompat.reference()
  torch.set_num_threads(a.threads)
  rng = np.random.default_rng(0)
  z = rng.integers(0, a.vocab, (a.batch, a.tokens))
  c = rng.integers(0, 10, (a.batch, 1))
  env = suite.Env(("float32",), ("float32",), 1, 0)
  env._torch = (torch, "cpu")  # pylint: disable=protected-access
  ref_step = suite._reference_gpt_step(  # pylint: disable=protected-access
      env, a.layers, a.width, a.heads, a.vocab, a.tokens, z, c)
  from taming.modules.transformer.mingpt import GPT as RefGPT  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = RefGPT(a.vocab, a.tokens, n_layer=a.layers, n_head=a.heads,
               n_embd=a.width)
  zt, ct = torch.from_numpy(z), torch.from_numpy(c)

  def ref_loss():
    logits, _ = ref(torch.cat([ct, zt], 1)[:, :-1])
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, a.vocab), zt.reshape(-1))

  def ref_fwd():
    with torch.no_grad():
      return ref_loss().item()

  def ref_fwd_bwd():
    ref.zero_grad(set_to_none=True)
    loss = ref_loss()
    loss.backward()
    return loss.item()

  cfg = schema.transformer_config()
  cfg.conditioning.num_classes = 10
  cfg.optim.update(dict(lr_scaling="none", learning_rate=1e-4))
  cfg.gpt.update(dict(n_layer=a.layers, n_head=a.heads, n_embd=a.width))
  layout = tt.make_layout(cfg, a.vocab, (1, a.tokens))
  model = tt.build_model(cfg, layout)
  tx = tt.make_optimizer(cfg)
  state = jax.jit(lambda r: tt.init_state(model, tx, r))(
      jax.random.PRNGKey(0))
  batch = {"codes": jnp.asarray(z.reshape(a.batch, 1, -1), jnp.int32),
           "cond": jnp.asarray(c, jnp.int32)}
  params = jax.tree.map(jnp.copy, state["params"])

  def loss(params, batch):
    seq = jnp.concatenate([batch["cond"], batch["codes"][:, 0]], 1)[:, :-1]
    return losses.token_loss(model.apply({"params": params}, seq),
                             batch["codes"][:, 0])

  def no_guard(state, batch):
    value, grads = jax.value_and_grad(loss)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt_state"], state["params"])
    return dict(state, params=optax.apply_updates(state["params"], updates),
                opt_state=opt), {"loss": value}

  def stepper(fn):
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
    holder = {"s": jax.tree.map(jnp.copy, state)}

    def run():
      holder["s"], m = compiled(holder["s"], batch)
      return jax.block_until_ready(m["loss"])

    return run

  fwd = jax.jit(loss).lower(params, batch).compile()
  grad = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
  step, _ = tt.make_train_step(model, tx, cfg, layout)
  fns = {
      "forward: reference": ref_fwd,
      "forward: ours": lambda: jax.block_until_ready(fwd(params, batch)),
      "forward + backward: reference": ref_fwd_bwd,
      "forward + backward: ours": lambda: jax.block_until_ready(
          grad(params, batch)),
      "training step: reference": lambda: ref_step(
          contextlib.nullcontext).item(),
      "training step: ours": stepper(step),
      "training step without the non-finite guard: ours": stepper(no_guard),
  }
  for fn in fns.values():
    fn()
  cpu = {k: [] for k in fns}
  for _ in range(a.repeats):
    for k, fn in fns.items():
      t = time.process_time()
      fn()
      cpu[k].append(time.process_time() - t)
  print(f"# GPT {a.layers} x {a.width}, batch {a.batch} x {a.tokens}, vocab "
        f"{a.vocab}; {a.threads} thread(s); process CPU s per call, median "
        f"of {a.repeats}")
  print("| piece | CPU s | all |")
  print("|---|---|---|")
  for k, ts in cpu.items():
    print(f"| {k} | {statistics.median(ts):.3f} | "
          + ", ".join(f"{t:.3f}" for t in ts) + " |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
