r"""The reference's ImageNet VQGAN recipes (f16, 256x256), with LPIPS.

  python train_vqgan.py --config=configs/imagenet_vqgan.py:f16_1024 \
      --workdir=runs/imagenet_f16_1024 --config.data_dir=/data/tfds \
      --config.loss.lpips_vgg_path=/weights/vgg16-397923af.pth \
      --config.loss.lpips_lin_path=/weights/lpips_vgg_v0.1.pth

Arguments: `f16_1024` (default) or `f16_16384` (codebook size), optionally
`,bf16` for bfloat16 compute. The dataset is TFDS `imagenet2012`, which
must be prepared in `data_dir` (its archives are not downloadable). LPIPS
needs torchvision's VGG16 ImageNet weights (`vgg16-397923af.pth`) and the
lin heads shipped in the `lpips` pip package (`lpips/weights/v0.1/vgg.pth`);
without them pass `--config.loss.perceptual_weight=0`. Learning rate follows
the reference: 4.5e-6 x global batch. On a pod, raise `batch_size` (global)
and shard with e.g. `--config.mesh.data=-1 --config.mesh.fsdp=4`.
"""
from vqgan_jax.training import schema


def get_config(arg: str = "f16_1024"):
  args = [a for a in (arg or "f16_1024").split(",") if a]
  c = schema.vqgan_config()
  c.dataset = "tfds:imagenet2012"
  sizes = {"f16_1024": 1024, "f16_16384": 16384}
  name = [a for a in args if a in sizes] or ["f16_1024"]
  c.model.n_embed = sizes[name[0]]
  if "bf16" in args:
    c.model.dtype = "bfloat16"
  unknown = set(args) - set(sizes) - {"bf16"}
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; valid: "
                     f"{sorted(sizes)} and 'bf16'")
  c.loss.disc_start = 250001
  c.batch_size = 12
  return c
