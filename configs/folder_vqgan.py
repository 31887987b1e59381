r"""A VQGAN on your own folder of images (found recursively), f16.

  python train_vqgan.py --config=configs/folder_vqgan.py:/data/my_images \
      --workdir=runs/my_vqgan --config.model.resolution=256 \
      --config.loss.perceptual_weight=0            # or give the LPIPS paths

Starts from an official checkpoint with
`--config.init_from=DIR` (a directory written by `python -m vqgan_jax.convert`,
which also carries the reference's discriminator and LPIPS weights).
Defaults: the f16/1024 trunk, GAN from step 10001, learning rate
4.5e-6 x batch. Evaluation reads the same folder (centre crops).
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("give the image folder: --config=configs/folder_vqgan.py:"
                     "/path/to/images")
  c = schema.vqgan_config()
  c.dataset = "folder:" + arg
  c.eval_split = "train"
  c.loss.disc_start = 10001
  c.batch_size = 8
  c.num_train_steps = 100_000
  c.eval_every = 2000
  c.image_every = 1000
  c.checkpoint_every = 2000
  return c
