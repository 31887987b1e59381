r"""An unconditional GPT over the codes of a folder VQGAN (configs/folder_vqgan.py).

`--config=configs/folder_transformer.py:PATH[,PRESET]`, PATH the same image
folder the VQGAN trained on, PRESET one of:

  photos  4 layers, d 128, 4 heads over the 8x8 codes of the `photos` VQGAN
          (64 tokens per crop), batch 32, 2000 steps, cosine schedule; fits 2
          CPU cores (docs/photos.md; scripts/run_photos.sh runs it):

  python train_transformer.py \
      --config=configs/folder_transformer.py:runs/photos_data/train,photos \
      --workdir=runs/photos_transformer --config.vqgan_workdir=runs/photos_vqgan
  python sample.py --workdir=runs/photos_transformer --num_samples=16 \
      --grid=16x24      # a canvas 2x3 times the training grid (sliding window)

  (none)  the reference's unconditional GPT (24 layers, d 1024, 16 heads),
          batch 24, for a GPU or TPU:

  python train_transformer.py --config=configs/folder_transformer.py:/data/my_images \
      --workdir=runs/my_transformer --config.vqgan_workdir=runs/my_vqgan

The codes are those of the VQGAN's centre crops of every image (computed
once, cached under the VQGAN's workdir). Samples go to WORKDIR/images/ while
training; `sample.py` draws more, at any grid size.
"""
from vqgan_jax.training import schema

PRESETS = ("photos",)


def get_config(arg: str = ""):
  path, preset = schema.folder_and_preset(arg, PRESETS)
  if not path:
    raise ValueError("give the image folder: --config=configs/"
                     "folder_transformer.py:/path/to/images (or "
                     "/path/to/images,photos)")
  c = schema.transformer_config()
  c.dataset = "folder:" + path
  c.eval_split = "train"
  c.conditioning.kind = "sos"
  c.gpt.update(dict(n_layer=24, n_head=16, n_embd=1024))
  c.batch_size = 24
  if preset == "photos":
    c.gpt.update(dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.1,
                      resid_pdrop=0.1, attn_pdrop=0.1))
    c.optim.update(dict(lr_scaling="none", learning_rate=1e-3,
                        schedule="cosine", warmup_steps=100, grad_clip=1.0))
    c.batch_size = 32
    c.num_train_steps = 2000
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 8
    c.sample_every = 1000
    c.samples_per_class = 16
    c.checkpoint_every = 500
  return c
