"""Our 256x256 VQGAN training step, step after step, with glibc's malloc as
it comes or keeping freed memory (`runtime.keep_freed_host_memory`): wall
time, minor page faults and resident memory per step. One setting per
process (it must be set before JAX starts); launch from the repository root:

  python -m benchmarks.host_malloc --mode=default
  python -m benchmarks.host_malloc --mode=keep
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _resident_gib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("default", "keep"), default="keep")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--small", action="store_true")
  args = p.parse_args(argv)

  from vqgan_jax.training import runtime  # pylint: disable=import-outside-toplevel
  applied = runtime.keep_freed_host_memory(args.mode)
  from benchmarks import bench_train_vqgan as b  # pylint: disable=import-outside-toplevel
  import oracle  # pylint: disable=import-outside-toplevel  (tests/, on the path via b)
  torch = oracle.torch()
  oracle.taming()
  import lpips  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1",
                          "vgg.pth")
  tmp = tempfile.mkdtemp()
  torch.manual_seed(0)
  vgg_path = os.path.join(tmp, "vgg16_random.pth")
  torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg_path)
  dd, n_embed, embed_dim = b.trunk(args.size, args.small, 1024)
  step, _, _ = b.build_ours(dd, n_embed, embed_dim, 1, "float32", vgg_path,
                            lin_path, b.images(args.size, 1), {})
  shutil.rmtree(tmp)
  step()  # compile + warm-up
  times, faults, resident = [], [], []
  for _ in range(args.steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident.append(_resident_gib())
  print(f"--mode={args.mode} (applied: {applied}), {args.size}x{args.size} "
        f"VQGAN step, float32, {args.steps} steps after a warm-up")
  print(f"median {statistics.median(times):.2f} s/step; minor faults per "
        f"step median {statistics.median(faults):.0f}; resident "
        f"{min(resident):.2f}-{max(resident):.2f} GiB")
  print("steps: " + ", ".join(f"{t:.2f} s/{n}" for t, n in zip(times, faults)))
  return dict(times=times, faults=faults, resident=resident)


if __name__ == "__main__":
  main()
