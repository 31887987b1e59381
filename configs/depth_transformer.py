r"""An image-conditioned transformer: the prefix is the code grid of a second
VQGAN (the reference's depth / segmentation models, 24 layers, d 1024).

  python train_transformer.py --config=configs/depth_transformer.py:/data/images \
      --workdir=runs/depth_transformer --config.vqgan_workdir=runs/rgb_vqgan \
      --config.conditioning.cond_vqgan_workdir=runs/depth_vqgan \
      --config.conditioning.cond_dataset=folder:/data/depth

`cond_dataset` mirrors the image folder (same relative file names, e.g.
/data/images/a/1.jpg and /data/depth/a/1.png); its examples are encoded by
the conditioning VQGAN (trained on depth maps with in_channels=out_ch=1).
Without `cond_dataset`, the conditioning VQGAN encodes
`cond_transform(image)` ('identity', 'grayscale' or 'downsample').
Converted reference depth transformers sample with
`sample.py --cond_images=FOLDER_OF_DEPTH_MAPS`.
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("give the images: --config=configs/depth_transformer.py:"
                     "/path/to/images or :tfds:NAME")
  c = schema.transformer_config()
  c.dataset = arg if arg.startswith(("tfds:", "folder:")) else "folder:" + arg
  c.eval_split = "train"
  c.conditioning.kind = "codes"
  c.gpt.update(dict(n_layer=24, n_head=16, n_embd=1024))
  c.batch_size = 16
  return c
