"""Default ml_collections configs that the files in ``configs/`` refine."""
from __future__ import annotations

import ml_collections


def mesh_config(**axes) -> ml_collections.ConfigDict:
  """Mesh axes in order; -1 takes the remaining devices."""
  return ml_collections.ConfigDict(axes or {"data": -1, "fsdp": 1})


def vqgan_config() -> ml_collections.ConfigDict:
  """Stage-1 defaults: the reference's ImageNet f16 recipe at 256x256."""
  c = ml_collections.ConfigDict()
  c.dataset = "tfds:imagenet2012"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.eval_split = "validation"

  c.model = ml_collections.ConfigDict(dict(
      ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=256,
      z_channels=256, n_embed=1024, embed_dim=256, quantizer="vq", beta=0.25,
      legacy_loss=True, kl_weight=1e-8, temperature=1.0,
      dtype="float32", param_dtype="float32"))

  c.loss = ml_collections.ConfigDict(dict(
      disc_start=250001, disc_weight=0.8, disc_factor=1.0,
      codebook_weight=1.0, perceptual_weight=1.0, disc_loss="hinge",
      lpips_vgg_path="", lpips_lin_path=""))
  c.disc = ml_collections.ConfigDict(dict(n_layers=3, ndf=64,
                                          use_actnorm=False))
  c.optim = ml_collections.ConfigDict(dict(
      # 'reference': lr = base_learning_rate * global batch (the reference's
      # rule, with its per-device batch times devices); 'none': learning_rate.
      lr_scaling="reference", base_learning_rate=4.5e-6, learning_rate=1e-4,
      b1=0.5, b2=0.9, grad_clip=0.0, ema_decay=0.0))

  c.batch_size = 12
  c.num_train_steps = 500_000
  c.seed = 0
  c.log_every = 50
  c.eval_every = 5000
  c.eval_batches = 8
  c.image_every = 5000
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.mesh = mesh_config()
  c.partition_rules = ((".*", "fsdp"),)
  # A directory written by `python -m vqgan_jax.convert` (or a stage-1
  # workdir) to start from: generator, and discriminator/LPIPS when saved.
  c.init_from = ""
  c.max_bad_steps = 20
  return c
