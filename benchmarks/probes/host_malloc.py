"""One of our training steps, step after step, with glibc's malloc as it
comes or keeping freed memory (`host_memory.keep_freed_host_memory`): wall
time, minor page faults and resident memory per step. One setting per
process (it must be set before JAX starts); launch from the repository root:

  python -m benchmarks.probes.host_malloc --mode=default
  python -m benchmarks.probes.host_malloc --mode=keep
  python -m benchmarks.probes.host_malloc --workload=digits_gpt --mode=keep --steps=60

Workloads: ``vqgan`` (default), the 256x256 VQGAN step with LPIPS and the
PatchGAN (batch 1, float32; ``--small`` for a tiny trunk); ``digits_gpt``,
the main job's stage-2 step (`configs/digits_transformer.py`: 4 layers,
d 128, batch 64 x 65 tokens, dropout on), on random codes.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from vqgan_jax import cli  # noqa: E402
from vqgan_jax.backends import host_memory  # noqa: E402  (stdlib only: no JAX backend yet)


def _resident_gib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv=None) -> dict:
  fv = flags.FlagValues()
  flags.DEFINE_enum("mode", "keep", list(host_memory.HOST_MALLOC_MODES),
                    "glibc malloc setting (host_memory.keep_freed_host_memory).",
                    flag_values=fv)
  flags.DEFINE_enum("workload", "vqgan", ["vqgan", "digits_gpt"],
                    "The training step to repeat.", flag_values=fv)
  flags.DEFINE_integer("steps", 12, "Timed steps after a warm-up.",
                       flag_values=fv)
  flags.DEFINE_integer("size", 256, "vqgan: image size.", flag_values=fv)
  flags.DEFINE_bool("small", False, "vqgan: a tiny trunk.", flag_values=fv)
  cli.parse(fv, argv, __doc__, prog="python -m benchmarks.probes.host_malloc")
  args = fv
  args = fv

  applied = host_memory.keep_freed_host_memory(args.mode)
  if args.workload == "digits_gpt":
    step, what = _digits_gpt_step(), "digits GPT step (main job's stage 2)"
  else:
    step = _vqgan_step(args.size, args.small)
    what = f"{args.size}x{args.size} VQGAN step"
  step()  # compile + warm-up
  times, faults, resident = [], [], []
  for _ in range(args.steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident.append(_resident_gib())
  print(f"--mode={args.mode} (applied: {applied}), {what}, float32, "
        f"{args.steps} steps after a warm-up")
  print(f"median {statistics.median(times):.2f} s/step; minor faults per "
        f"step median {statistics.median(faults):.0f}; resident "
        f"{min(resident):.2f}-{max(resident):.2f} GiB")
  print("steps: " + ", ".join(f"{t:.2f} s/{n}" for t, n in zip(times, faults)))
  return dict(times=times, faults=faults, resident=resident)


def _vqgan_step(size: int, small: bool):
  """The suite's stage-1 step of ours (`suite.stage1_step`, random VGG16 for
  LPIPS)."""
  from benchmarks import suite  # pylint: disable=import-outside-toplevel
  from vqgan_jax_testing import oracle  # pylint: disable=import-outside-toplevel
  torch = oracle.torch()
  oracle.taming()
  import lpips  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1",
                          "vgg.pth")
  tmp = tempfile.mkdtemp()
  try:
    torch.manual_seed(0)
    vgg_path = os.path.join(tmp, "vgg16_random.pth")
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg_path)
    dd, n_embed, embed_dim = suite.vqgan_trunk(size, small, 1024)
    step, _, _ = suite.stage1_step(dd, n_embed, embed_dim, 1, "float32",
                                   vgg_path, lin_path,
                                   suite.block_images(size, 1), {})
  finally:
    shutil.rmtree(tmp)
  return step


def _digits_gpt_step():
  """The trainer's stage-2 step on `configs/digits_transformer.py`."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vqgan_jax.training import transformer_trainer as tt  # pylint: disable=import-outside-toplevel
  from vqgan_jax_testing import train_utils  # pylint: disable=import-outside-toplevel

  config = train_utils.load_config("digits_transformer")
  vq = train_utils.load_config("digits_vqgan").model  # its codes: 64, on 8 x 8
  n_embed = vq.n_embed
  grid = (vq.resolution // 2 ** (len(vq.ch_mult) - 1),) * 2
  layout = tt.make_layout(config, n_embed, grid)
  model = tt.build_model(config, layout)
  tx = tt.make_optimizer(config)
  step_py, _ = tt.make_train_step(model, tx, config, layout)
  fn = jax.jit(step_py, donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {
      "codes": rng.integers(0, n_embed, (config.batch_size,) + grid,
                            dtype=np.int32),
      "cond": rng.integers(0, config.conditioning.num_classes,
                           (config.batch_size, 1), dtype=np.int32)}
  box = [tt.init_state(model, tx, jax.random.PRNGKey(0))]

  def step():
    box[0], metrics = fn(box[0], batch)
    jax.block_until_ready(metrics)

  return step


if __name__ == "__main__":
  main()
