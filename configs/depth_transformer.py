r"""An image-conditioned transformer: the prefix is the code grid of a second
VQGAN (the reference's depth / segmentation models, 24 layers, d 1024).

  python train_transformer.py --config=configs/depth_transformer.py:/data/images \
      --workdir=runs/cond_transformer --config.vqgan_workdir=runs/rgb_vqgan \
      --config.conditioning.cond_vqgan_workdir=runs/cond_vqgan \
      --config.conditioning.cond_transform=grayscale

The conditioning VQGAN encodes `cond_transform(image)` ('identity',
'grayscale' or 'downsample'); paired datasets (an image plus its depth map)
are not read yet. Converted reference depth transformers (whose conditioning
stage is a VQGAN) sample with `sample.py --cond_images=FOLDER`.
"""
from vqgan_jax.training import defaults


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("give the images: --config=configs/depth_transformer.py:"
                     "/path/to/images or :tfds:NAME")
  c = defaults.transformer_config()
  c.dataset = arg if arg.startswith(("tfds:", "folder:")) else "folder:" + arg
  c.eval_split = "train"
  c.conditioning.kind = "codes"
  c.gpt.update(dict(n_layer=24, n_head=16, n_embd=1024))
  c.batch_size = 16
  return c
