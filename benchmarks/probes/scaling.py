r"""Expected throughput of the ImageNet recipes on 8 GPUs and a v5e-64 slice.

    python -m benchmarks.probes.scaling --stage1_images_per_s=98.87 --stage2_mfu=0.389

Inputs are single-device measurements (``benchmarks/gpu.sh``): stage-1
training images/s on one H100 at the recipe's per-device batch, and the
stage-2 MFU of the bfloat16 GPT. Stage 2 is projected to the 1.4B cIN GPT
(configs/imagenet_transformer.py) through its model FLOPs; TPU v5e numbers
assume the same MFU against v5e's peak (an assumption, not a measurement).

Communication per step follows ``vqgan_jax/sharding.py``'s mesh: with
``data`` only, an all-reduce of the float32 gradients (2 (n-1)/n x bytes per
device); with ``fsdp``, an all-gather of the parameters for the forward pass
and again for the backward pass plus a reduce-scatter of the gradients
(3 (n-1)/n x bytes). Step time is bounded below by max(compute, comm) when
XLA overlaps the collectives and above by compute + comm.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from benchmarks import suite
from vqgan_jax import cli
from vqgan_jax.training.transformer_trainer import PEAK_TFLOPS

# Effective per-device collective bandwidth (GB/s), approximate: H100 SXM
# NVLink 4 is 900 GB/s bidirectional per GPU (450 each way; NCCL's bus
# bandwidth on 8 GPUs is typically ~350-400); TPU v5e ICI is 1,600 Gbps per
# chip (200 GB/s over its 4 links), about half usable by one collective on
# the 8x8 torus. Per system: devices, bf16 peak TFLOP/s, that bandwidth.
LINKS = {"8x H100 (NVLink)": (8, PEAK_TFLOPS["h100"], 350.0),
         "v5e-64 (ICI)": (64, PEAK_TFLOPS["tpu v5e"], 100.0)}


@dataclasses.dataclass
class Recipe:
  name: str
  params: float          # trained parameters (generator + discriminator)
  flops_per_item: float  # training FLOPs per image or per token
  item: str
  batch_per_device: int
  mesh: str              # 'data' or 'fsdp'


def stage2_recipe() -> Recipe:
  layers, width, vocab, tokens = 48, 1536, 16384, 256
  flops = suite.gpt_train_flops(layers, width, vocab, tokens, 1) / tokens
  params = 12 * layers * width ** 2 + 2 * width * vocab
  return Recipe("stage 2: cIN GPT 48x1536 (1.4B), 256 tokens", params, flops,
                "tokens", 16 * tokens, "fsdp")


def project(recipe: Recipe, per_device_rate: float, n: int, comm_gbs: float,
            rate_scale: float = 1.0):
  """(compute s, comm s, overlapped rate, serial rate) for n devices."""
  rate = per_device_rate * rate_scale
  compute = recipe.batch_per_device / rate
  factor = 3.0 if recipe.mesh == "fsdp" else 2.0
  comm = factor * (n - 1) / n * 4 * recipe.params / (comm_gbs * 1e9)
  items = n * recipe.batch_per_device
  return compute, comm, items / max(compute, comm), items / (compute + comm)


def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_float("stage1_images_per_s", None, "One H100, stage-1 "
                     "training, recipe batch.", flag_values=fv)
  flags.DEFINE_float("stage1_params", 74.9e6, "Generator 72.1M + "
                     "discriminator 2.8M (f16 recipe).", flag_values=fv)
  flags.DEFINE_float("stage2_mfu", None, "bfloat16 GPT training MFU "
                     "measured on one H100.", flag_values=fv)
  flags.DEFINE_string("label", "measured", "Where the inputs came from "
                      "(printed).", flag_values=fv)
  flags.mark_flags_as_required(["stage1_images_per_s", "stage2_mfu"],
                               flag_values=fv)
  cli.parse(fv, argv, __doc__, prog="python -m benchmarks.probes.scaling")
  args = fv
  args = fv
  s2 = stage2_recipe()
  s1 = Recipe("stage 1: f16 VQGAN 256x256 (LPIPS + PatchGAN)",
              args.stage1_params, 0.0, "images", 12, "data")
  print(f"Inputs ({args.label}): stage 1 {args.stage1_images_per_s:g} "
        f"images/s per H100; stage 2 MFU {100 * args.stage2_mfu:.0f}%.\n")
  print("| recipe | system | per-device batch | compute s/step | comm s/step "
        "| throughput (overlapped .. serial) |")
  print("|---|---|---|---|---|---|")
  for system, (n, peak, gbs) in LINKS.items():
    scale = peak / LINKS["8x H100 (NVLink)"][1]
    c, m, hi, lo = project(s1, args.stage1_images_per_s, n, gbs, scale)
    print(f"| {s1.name} | {system} | {s1.batch_per_device} | {c:.3f} | "
          f"{m:.4f} | {hi:.0f} .. {lo:.0f} images/s |")
    rate = args.stage2_mfu * peak * 1e12 / s2.flops_per_item
    c, m, hi, lo = project(s2, rate, n, gbs)
    print(f"| {s2.name} | {system} | {s2.batch_per_device} tokens | "
          f"{c:.3f} | {m:.3f} | {hi / 1e3:.0f}k .. {lo / 1e3:.0f}k tokens/s "
          f"({hi / 256:.0f} .. {lo / 256:.0f} images/s) |")


if __name__ == "__main__":
  main()
