r"""The reference's unconditional FacesHQ / FFHQ / CelebA-HQ transformer:
24 layers, d 1024, 16 heads, over the 16x16 codes of the faces VQGAN.

  python train_transformer.py --config=configs/faces_transformer.py:/data/faces \
      --workdir=runs/faces_transformer --config.vqgan_workdir=runs/faces_vqgan

The argument is a folder of images or a `tfds:NAME` string. Sampling as the
reference's FFHQ FID: `python sample.py --workdir=... --top_k=300`.
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("give the images: --config=configs/faces_transformer.py:"
                     "/path/to/faces (a folder) or :tfds:NAME")
  c = schema.transformer_config()
  c.dataset = arg if arg.startswith(("tfds:", "folder:")) else "folder:" + arg
  c.eval_split = "train"
  c.conditioning.kind = "sos"
  c.gpt.update(dict(n_layer=24, n_head=16, n_embd=1024))
  c.pkeep = 1.0
  c.batch_size = 24
  return c
