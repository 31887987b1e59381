r"""VQGAN on the embedded `digits` dataset (scikit-learn's handwritten digits).

Runs offline on 2 CPU cores in minutes:

  python train_vqgan.py --config=configs/digits_vqgan.py --workdir=runs/digits_vqgan

The perceptual (LPIPS) term is off: its VGG16 weights are a download, and
this config must run without network. The rest is the reference's loss
(L1 + adaptive-weight hinge PatchGAN from `disc_start` + commitment), with
the codebook kept by moving averages and dead codes restarted.
`--config=configs/digits_vqgan.py:test` is a seconds-long variant for tests.
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  c = schema.vqgan_config()
  c.dataset = "digits"
  c.model.update(dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
      resolution=16, z_channels=32, n_embed=64, embed_dim=32))
  vq = c.model.quantizer_options.vq
  vq.legacy_loss = False
  # Codebook by exponential moving averages, and codes no image chose for
  # a while restarted on encoder outputs: more of the 64 codes in use and a
  # sharper reconstruction than the reference's loss-trained codebook
  # (docs/features.md, "Quantizers").
  vq.update(dict(codebook_update="ema", codebook_ema_decay=0.99,
                 dead_code_threshold=1.0))
  c.loss.update(dict(disc_start=800, disc_weight=0.1, perceptual_weight=0.0))
  c.disc.update(dict(n_layers=2, ndf=32))
  c.optim.update(dict(lr_scaling="none", learning_rate=2e-3, b1=0.5, b2=0.9))
  c.batch_size = 32
  c.num_train_steps = 1200
  c.log_every = 50
  c.eval_every = 400
  c.eval_batches = 0  # the whole validation split (180 digits)
  c.image_every = 400
  c.checkpoint_every = 400
  if arg == "test":
    # The reference's quantizer: the tests compare this config's step with
    # the reference loss (the EMA codebook has its own tests).
    vq.update(dict(codebook_update="loss", dead_code_threshold=0.0))
    c.model.update(dict(n_embed=32, embed_dim=16))
    c.disc.update(dict(n_layers=1, ndf=16))
    c.loss.disc_start = 3
    c.batch_size = 8
    c.num_train_steps = 6
    c.log_every = 2
    c.eval_every = 6
    c.eval_batches = 2
    c.image_every = 6
    c.checkpoint_every = 4
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'test'")
  return c
