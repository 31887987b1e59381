r"""The reference's FacesHQ (FFHQ + CelebA-HQ) VQGAN recipe, f16 at 256x256.

  python train_vqgan.py --config=configs/faces_vqgan.py:/data/faces \
      --workdir=runs/faces_vqgan \
      --config.loss.lpips_vgg_path=/weights/vgg16-397923af.pth \
      --config.loss.lpips_lin_path=/weights/lpips_vgg_v0.1.pth

The argument is a folder of face images (read recursively), or a
`tfds:NAME` string. Same trunk as ImageNet, 1024 codes, GAN from step 30001.
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("give the face images: --config=configs/faces_vqgan.py:"
                     "/path/to/faces (a folder) or :tfds:NAME")
  c = schema.vqgan_config()
  c.dataset = arg if arg.startswith(("tfds:", "folder:")) else "folder:" + arg
  c.eval_split = "train"
  c.model.n_embed = 1024
  c.loss.disc_start = 30001
  c.batch_size = 12
  return c
