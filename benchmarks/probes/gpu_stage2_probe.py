"""Stage-2 training step: variants timed in one process, and a kernel profile.

    python3 -m benchmarks.probes.gpu_stage2_probe         # GPU sizes
    python3 -m benchmarks.probes.gpu_stage2_probe --tiny  # e.g. on CPU

Times our bfloat16 training step (the trainer's `make_train_step`, donated
state, as in `python -m benchmarks --only=train_transformer`) for several
variants of one GPT (default: the 24 x 1024 GPT of the gpu preset, vocab
16384, 512 tokens), each as the median of single synchronised steps and as
the mean of steps dispatched back to back, with MFU by model FLOPs
(`suite.gpt_train_flops`) against the card's bf16 peak. Then it traces a few
steps of the first variant with `jax.profiler` and sums the device's kernel
time by kernel, in classes (matrix products, attention, the rest), so the
gap between the step time and the matrix-product time has names: each of
the top kernels that XLA generated is printed with its HLO result shape and
the JAX source path it came from (`--hlo_out` also saves the HLO).

Parameters are drawn on the host (normal, std 0.02) rather than by the jitted
initialiser: the values do not change the step's work, and initialising 336M
parameters through XLA took most of a minute on the H200.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import glob
import os
import re
import statistics
import tempfile
import time

from absl import flags

from vqgan_jax import cli

VARIANTS = {
    # name: (gpt options, batch multiplier[, patch while tracing])
    "base": ({}, 1),
    "batch2x": ({}, 2),
    "xla_attention": ({"attention_impl": "xla"}, 1),
    # The exact GELU's backward was the largest element-wise kernel on the
    # H200 (2.7 ms of a 43 ms step); this prices the tanh form (not the
    # reference's function: an option, `gpt.mlp='gelu_tanh'`).
    "gelu_tanh": ({"mlp": "gelu_tanh"}, 1),
    # The step as autodiff differentiates it: jax.nn.gelu and flax's norms
    # instead of `gpt_layers.gelu_exact` and the lean norms, which keep one
    # tensor for the backward pass where these keep three (the price of
    # those).
    "autodiff_backward": ({}, 1, "autodiff"),
}


@contextlib.contextmanager
def _patched(patch):
  """Swaps the GPT's GELU and norms for autodiff's while a step is traced."""
  if patch != "autodiff":
    yield
    return
  import jax  # pylint: disable=import-outside-toplevel
  from vqgan_jax import gpt_layers  # pylint: disable=import-outside-toplevel
  saved = gpt_layers.gelu_exact, gpt_layers.make_norm
  norm = saved[1]
  gpt_layers.gelu_exact = functools.partial(jax.nn.gelu, approximate=False)
  gpt_layers.make_norm = lambda *a, lean=True, **k: norm(*a, lean=False, **k)
  try:
    yield
  finally:
    gpt_layers.gelu_exact, gpt_layers.make_norm = saved


def compile_variant_step(variant, cfg, layout, model, tx, state, data):
  """The trainer's step (donated state) for `state` and `data`, concrete or
  abstract, compiled as `VARIANTS[variant]` asks."""
  import jax  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel
  patch = VARIANTS[variant][2] if len(VARIANTS[variant]) > 2 else None
  step, _ = tt.make_train_step(model, tx, cfg, layout)
  with _patched(patch):
    return jax.jit(step, donate_argnums=(0,)).lower(state, data).compile()


_GEMM = ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul", "dot")
# Lines of a GPU plane that summarise the kernels on its stream lines.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "TensorFlow",
                  "Steps", "Source", "Framework", "Launch")
_ATTN = ("cudnn", "flash", "fmha", "sdpa", "attention")


def _classify(name: str) -> str:
  low = name.lower()
  if any(k in low for k in _ATTN):
    return "attention"
  if any(k in low for k in _GEMM):
    return "matmul"
  return "other"


def hlo_index(hlo_text: str) -> dict:
  """``{instruction name: (result shape, op_name)}`` of an HLO module's text.

  Names are indexed as written and with '.' and '-' as '_', the form XLA:GPU
  gives a fusion's kernel ("loop_convert_multiply_fusion.3" runs as
  "loop_convert_multiply_fusion_3"). `op_name` is JAX's name stack, e.g.
  "jit(step)/transpose(jvp(GPT))/blocks/mlp/...": the model code a kernel
  came from.
  """
  index = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\(([^\n]*)",
                       hlo_text, re.M):
    name, shape, rest = m.group(1), m.group(2), m.group(3)
    op = re.search(r'op_name="([^"]*)"', rest)
    entry = (shape.split("{")[0], op.group(1) if op else "")
    index.setdefault(name, entry)
    index.setdefault(re.sub(r"[.\-]", "_", name), entry)
  return index


def kernel_profile(trace_dir: str, steps: int, top: int = 15,
                   hlo_text: str = ""):
  """Prints device kernel time per step from a `jax.profiler` trace.

  With the step's compiled HLO text, each of the top kernels that XLA
  generated (not cuBLAS's or cuDNN's) is followed by its HLO result shape
  and JAX source path.
  """
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  if not files:
    print("  profile: no trace written")
    return
  data = ProfileData.from_file(files[0])
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  where = "GPU kernels"
  if not planes:  # CPU: XLA's thunks on the client's threads
    planes = [p for p in data.planes if p.name == "/host:CPU"]
    where = "CPU (XLA ops on the client's threads; no GPU plane)"
  on_device = planes[0].name.startswith("/device")
  by_name = collections.defaultdict(lambda: [0.0, 0])
  for plane in planes:
    names = [line.name for line in plane.lines]
    if on_device:
      print(f"  profile: {plane.name} lines {names}")
    for line in plane.lines:
      if on_device and line.name.startswith(_DERIVED_LINES):
        continue  # derived lines repeat the kernels of the stream lines
      if not on_device and "XLA" not in line.name:
        continue
      for ev in line.events:
        if ev.name.startswith("ThreadpoolListener"):
          continue
        rec = by_name[ev.name]
        rec[0] += ev.duration_ns / 1e6
        rec[1] += 1
  total = sum(v[0] for v in by_name.values())
  classes = collections.defaultdict(float)
  for name, (ms, _) in by_name.items():
    classes[_classify(name)] += ms
  print(f"  profile ({where}): {total / steps:.2f} ms of kernel time per "
        f"step, {len(by_name)} distinct kernels")
  for cls in ("matmul", "attention", "other"):
    print(f"    {cls:10s} {classes[cls] / steps:8.2f} ms/step "
          f"({100 * classes[cls] / max(total, 1e-9):5.1f}%)")
  index = hlo_index(hlo_text) if hlo_text else {}
  print(f"  top {top} kernels (ms per step, launches per step):")
  for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"    {ms / steps:8.3f}  {n / steps:6.1f}  [{_classify(name)}] "
          f"{name[:110]}")
    found = index.get(name) or index.get(re.sub(r"[.\-]", "_", name))
    if found:
      print(f"{'':24s}= {found[0]} from {found[1][-150:]}")


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_bool("tiny", False, "Tiny sizes (e.g. on a CPU) instead of "
                    "the gpu preset's.", flag_values=fv)
  flags.DEFINE_string("variants",
                      "base,autodiff_backward,gelu_tanh,xla_attention",
                      f"Comma-separated subset of {','.join(VARIANTS)}.",
                      flag_values=fv)
  flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed steps per variant.",
                       flag_values=fv)
  flags.DEFINE_integer("trace_steps", 3, "Steps of the first variant traced "
                       "for the kernel profile (0: none).", flag_values=fv)
  flags.DEFINE_string("out", "", "Also append the output here.",
                      flag_values=fv)
  flags.DEFINE_string("hlo_out", "", "Write the first variant's compiled "
                      "HLO text here.", flag_values=fv)
  cli.parse(fv, argv, __doc__,
            prog="python -m benchmarks.probes.gpu_stage2_probe")
  a = fv

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import suite, table  # pylint: disable=import-outside-toplevel

  sizes = dict(suite.PRESETS["tiny" if a.tiny else "gpu"]["train_transformer"])
  layers, width, heads = sizes["layers"], sizes["width"], sizes["heads"]
  vocab, tokens, batch0 = sizes["vocab"], sizes["tokens"], sizes["batch"]
  peak = table.peak_for(a.dtype)
  print(f"stage-2 probe: {jax.devices()[0].device_kind}, GPT {layers}x{width}"
        f", {heads} heads, vocab {vocab}, {tokens} tokens, batch {batch0}, "
        f"{a.dtype}, peak {peak} TFLOP/s", flush=True)
  t0 = time.perf_counter()
  rng = np.random.default_rng(0)
  host_state = None
  results = []
  for vi, name in enumerate(a.variants.split(",")):
    opts, mult = VARIANTS[name][:2]
    batch = batch0 * mult
    cfg, layout, model, tx = suite.gpt_train_setup(
        layers, width, heads, vocab, tokens, a.dtype, **opts)
    if host_state is None:
      host_state = suite.gpt_host_drawn_state(model, tx)
      print(f"  [{time.perf_counter() - t0:6.1f} s] parameters drawn on the "
            "host", flush=True)
    state = jax.tree.map(jnp.copy, host_state)  # each variant donates
    z = rng.integers(0, vocab, (batch, 1, tokens)).astype(np.int32)
    c = rng.integers(0, 10, (batch, 1)).astype(np.int32)
    data = {"codes": jnp.asarray(z), "cond": jnp.asarray(c)}
    t = time.perf_counter()
    compiled = compile_variant_step(name, cfg, layout, model, tx, state, data)
    secs = time.perf_counter() - t
    plan = table.xla_memory(compiled)
    for _ in range(2):
      state, m = compiled(state, data)
    jax.block_until_ready(m["loss"])
    single = []
    for _ in range(a.steps):
      t = time.perf_counter()
      state, m = compiled(state, data)
      jax.block_until_ready(m["loss"])
      single.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(a.steps):
      state, m = compiled(state, data)
    jax.block_until_ready(m["loss"])
    piped = (time.perf_counter() - t) / a.steps
    med = statistics.median(single)
    flops = suite.gpt_train_flops(layers, width, vocab, tokens, batch)
    mfu = (100 * flops / min(med, piped) / 1e12 / peak) if peak else None
    loss = float(m["loss"])
    results.append((name, batch, med, piped, mfu, secs, plan, loss))
    print(f"  [{time.perf_counter() - t0:6.1f} s] {name}: batch {batch}, "
          f"compile {secs:.1f} s, median {1e3 * med:.2f} ms/step, back to "
          f"back {1e3 * piped:.2f} ms/step, "
          f"{batch * tokens / min(med, piped):,.0f} tokens/s"
          + (f", MFU {mfu:.1f}%" if mfu else "")
          + (f", XLA plan {plan / 2**30:.3g} GiB" if plan else "")
          + f", loss {loss:.3f}",
          flush=True)
    if vi == 0 and a.trace_steps:
      trace_dir = tempfile.mkdtemp()
      with jax.profiler.trace(trace_dir):
        for _ in range(a.trace_steps):
          state, m = compiled(state, data)
        jax.block_until_ready(m["loss"])
      hlo_text = compiled.as_text() or ""
      if a.hlo_out:
        with open(a.hlo_out, "w", encoding="utf-8") as f:
          f.write(hlo_text)
      kernel_profile(trace_dir, a.trace_steps, hlo_text=hlo_text)
    del state, compiled
  lines = ["| variant | batch | median ms/step | back-to-back ms/step | MFU |"
           " compile s | XLA plan GiB | loss |",
           "|---|---|---|---|---|---|---|---|"]
  for name, batch, med, piped, mfu, secs, plan, loss in results:
    lines.append(f"| {name} | {batch} | {1e3 * med:.2f} | {1e3 * piped:.2f} "
                 f"| {f'{mfu:.1f}%' if mfu else 'n/a'} | {secs:.1f} | "
                 f"{f'{plan / 2**30:.3g}' if plan else 'n/a'} | {loss:.3f} |")
  print("\n".join(lines), flush=True)
  if a.out:
    with open(a.out, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
