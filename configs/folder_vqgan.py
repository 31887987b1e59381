r"""A VQGAN on your own folder of images (found recursively).

`--config=configs/folder_vqgan.py:PATH[,PRESET]`, PRESET one of:

  cpu   a small f4 VQGAN at 64x64 (1.1M parameters, 512 codes updated by
        EMA with dead-code restart, no perceptual term, GAN from step 1001),
        batch 8, 2000 steps; it writes reconstructions of the folder to
        WORKDIR/images/ every 50 steps (docs/own_images.md has the
        measurements):

  python train_vqgan.py --config=configs/folder_vqgan.py:/data/my_images,cpu \
      --workdir=runs/my_vqgan

  photos  a small f4 VQGAN at 32x32 (1.0M parameters, 256 codes of 32
        channels updated by EMA with dead-code restart: 0.5 bits per pixel),
        L1 + codebook loss, no GAN, training crops mirrored at random, Adam
        at 2e-3, batch 16, 4000 steps,
        for the crops `python -m benchmarks.photos prepare` cuts
        (docs/photos.md; scripts/run_photos.sh runs it all):

  python -m benchmarks.photos prepare --out=runs/photos_data
  python train_vqgan.py \
      --config=configs/folder_vqgan.py:runs/photos_data/train,photos \
      --workdir=runs/photos_vqgan

  (none) the reference's f16/1024 ImageNet model at 256x256, batch 8, for a
        GPU or TPU (it does not fit a CPU: about 150 s per step); the
        perceptual term needs the LPIPS weights (or turn it off):

  python train_vqgan.py --config=configs/folder_vqgan.py:/data/my_images \
      --workdir=runs/my_vqgan --config.loss.perceptual_weight=0
      # or --config.loss.lpips_vgg_path=vgg16-397923af.pth
      #    --config.loss.lpips_lin_path=lpips_vgg_v0.1.pth

Either starts from an official checkpoint with `--config.init_from=DIR` (a
directory written by `python -m vqgan_jax.convert`, which also carries the
reference's discriminator and LPIPS weights; set config.model to its
architecture). The full-size default: GAN from step 10001, learning rate
4.5e-6 x batch. Evaluation reads the same folder (centre crops), so its PSNR
measures fit, not generalisation, unless `--config.eval_dataset=folder:DIR`
names a held-out folder.
"""
from vqgan_jax.training import schema

PRESETS = ("cpu", "photos")


def _small_f4_model(c, resolution, code_dim, n_embed):
  """The CPU-sized f4 VQGAN the small presets share: ch 32, one res-block
  per level, no attention, an EMA codebook with dead-code restart."""
  c.model.update(dict(
      ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
      resolution=resolution, z_channels=code_dim, n_embed=n_embed,
      embed_dim=code_dim))
  c.model.quantizer_options.vq.update(dict(
      legacy_loss=False, codebook_update="ema", dead_code_threshold=1.0))


def get_config(arg: str = ""):
  path, preset = schema.folder_and_preset(arg, PRESETS)
  if not path:
    raise ValueError("give the image folder: --config=configs/folder_vqgan.py:"
                     "/path/to/images (or /path/to/images,cpu)")
  c = schema.vqgan_config()
  c.dataset = "folder:" + path
  c.eval_split = "train"
  c.loss.disc_start = 10001
  c.batch_size = 8
  c.num_train_steps = 100_000
  c.eval_every = 2000
  c.image_every = 1000
  c.checkpoint_every = 2000
  if preset == "cpu":
    _small_f4_model(c, resolution=64, code_dim=64, n_embed=512)
    c.loss.update(dict(disc_start=1001, disc_weight=0.1,
                       perceptual_weight=0.0))
    c.disc.update(dict(n_layers=2, ndf=32))
    c.optim.update(dict(lr_scaling="none", learning_rate=1e-3))
    c.num_train_steps = 2000
    c.log_every = 25
    c.eval_every = 50
    c.eval_batches = 0  # the whole folder
    c.image_every = 50
    c.checkpoint_every = 500
  if preset == "photos":
    # 32x32 crops cut by `python -m benchmarks.photos prepare`: f4 (an 8x8
    # grid) and 256 codes, 0.5 bits per pixel; L1 + codebook loss only (no
    # GAN within the run), EMA codebook with dead-code restart. Crops are
    # mirrored; reordering their colour channels too turned one seed's
    # reconstructions gray (docs/photos.md).
    _small_f4_model(c, resolution=32, code_dim=32, n_embed=256)
    c.loss.update(dict(disc_start=10**9, perceptual_weight=0.0))
    c.disc.update(dict(n_layers=1, ndf=8))  # unused before disc_start
    c.optim.update(dict(lr_scaling="none", learning_rate=2e-3))
    c.augment = ("flip",)
    c.batch_size = 16
    c.num_train_steps = 4000
    c.log_every = 50
    c.eval_every = 1000
    c.eval_batches = 2
    c.image_every = 1000
    c.checkpoint_every = 1000
  return c
