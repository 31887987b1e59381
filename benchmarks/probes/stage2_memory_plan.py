"""XLA's memory plan for the stage-2 training step, compiled but not run.

    python -m benchmarks.probes.stage2_memory_plan                 # 24 x 1024 GPT
    python -m benchmarks.probes.stage2_memory_plan --preset=cpu    # 12 x 512 GPT
    python -m benchmarks.probes.stage2_memory_plan --tiny

Compiles the trainer's step (`make_train_step`, donated state, as in
`python -m benchmarks --only=train_transformer`) for abstract parameters, so
the 336M-parameter GPT of the gpu preset needs no memory to plan, and prints
the bytes of temporaries XLA plans per step for each dtype and variant of
`gpu_stage2_probe.VARIANTS` ('base' and 'autodiff_backward' by default: the
step with and without the lean backward passes of the GELU and the norms).
On a CPU this is XLA:CPU's plan, not a GPU's: compare the rows with each
other.
"""
from __future__ import annotations

import time

from absl import flags

from vqgan_jax import cli


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_enum("preset", "gpu", ["cpu", "gpu", "tiny"], "Suite preset "
                    "whose stage-2 sizes to plan.", flag_values=fv)
  flags.DEFINE_bool("tiny", False, "= --preset=tiny.", flag_values=fv)
  flags.DEFINE_string("dtypes", "bfloat16,float32", "Comma-separated "
                      "compute dtypes.", flag_values=fv)
  flags.DEFINE_string("variants", "base,autodiff_backward", "Comma-separated "
                      "gpu_stage2_probe.VARIANTS.", flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.probes.stage2_memory_plan")
  a = fv

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks.probes import gpu_stage2_probe as probe  # pylint: disable=import-outside-toplevel
  from benchmarks import suite  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel

  preset = "tiny" if a.tiny else a.preset
  sizes = dict(suite.PRESETS[preset]["train_transformer"])
  layers, width, heads = sizes["layers"], sizes["width"], sizes["heads"]
  vocab, tokens, batch0 = sizes["vocab"], sizes["tokens"], sizes["batch"]
  print(f"stage-2 memory plan on {jax.devices()[0].device_kind}: GPT "
        f"{layers}x{width}, {heads} heads, vocab {vocab}, {tokens} tokens, "
        f"batch {batch0}", flush=True)
  lines = ["| dtype | variant | batch | temporaries GiB | arguments GiB |"
           " compile s |", "|---|---|---|---|---|---|"]
  plans = {}
  for dtype in a.dtypes.split(","):
    for name in a.variants.split(","):
      opts, mult = probe.VARIANTS[name][:2]
      batch = batch0 * mult
      cfg, layout, model, tx = suite.gpt_train_setup(
          layers, width, heads, vocab, tokens, dtype, **opts)
      state = jax.eval_shape(lambda r, m=model, o=tx: tt.init_state(m, o, r),
                             jax.random.PRNGKey(0))
      data = {"codes": jax.ShapeDtypeStruct((batch, 1, tokens), jnp.int32),
              "cond": jax.ShapeDtypeStruct((batch, 1), jnp.int32)}
      t = time.perf_counter()
      compiled = probe.compile_variant_step(name, cfg, layout, model, tx,
                                            state, data)
      secs = time.perf_counter() - t
      m = compiled.memory_analysis()
      temp, args = m.temp_size_in_bytes, m.argument_size_in_bytes
      plans[(dtype, name)] = temp
      lines.append(f"| {dtype} | {name} | {batch} | {temp / 2**30:.3g} | "
                   f"{args / 2**30:.3g} | {secs:.1f} |")
      print(f"  {dtype} {name}: compiled in {secs:.1f} s", flush=True)
  print("\n".join(lines), flush=True)
  return plans


if __name__ == "__main__":
  main()
