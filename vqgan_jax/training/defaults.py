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
      # Quantizer options beyond the reference (defaults = the reference's
      # VectorQuantizer); see vqgan_jax/vqgan.py and quantizers.py.
      # quantizer: 'vq' | 'gumbel' | 'fsq' (fsq_levels) | 'lfq' (2**bits codes)
      codebook_dim=0, l2_codes=False, codebook_update="loss",
      codebook_ema_decay=0.99, codebook_ema_eps=1e-5, dead_code_threshold=0.0,
      entropy_weight=0.0, entropy_temperature=0.01, fsq_levels=(8, 5, 5, 5),
      quantizer_grad="ste",
      dtype="float32", param_dtype="float32"))

  c.loss = ml_collections.ConfigDict(dict(
      disc_start=250001, disc_weight=0.8, disc_factor=1.0,
      codebook_weight=1.0, perceptual_weight=1.0, disc_loss="hinge",
      lpips_vgg_path="", lpips_lin_path="",
      # GAN options beyond the reference (defaults = the reference).
      # 'adaptive': the reference's gradient-norm ratio times disc_weight;
      # 'fixed': the GAN term weighs exactly gan_weight.
      gan_weight_mode="adaptive", gan_weight=0.1,
      # D trains from disc_start; its loss reaches G from disc_start +
      # disc_warmup_steps ('hold') or ramps up over them ('linear').
      disc_warmup_steps=0, disc_warmup_mode="hold",
      # LeCam regulariser on D (EMA of D's real/fake outputs) and R1
      # gradient penalty on real images (r1_weight = gamma / 2).
      lecam_weight=0.0, lecam_decay=0.999, r1_weight=0.0))
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


def transformer_config() -> ml_collections.ConfigDict:
  """Stage-2 defaults: the reference's class-conditional ImageNet GPT."""
  c = ml_collections.ConfigDict()
  c.dataset = "tfds:imagenet2012"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.eval_split = "validation"
  # The frozen first stage: a stage-1 workdir or a converted checkpoint dir.
  c.vqgan_workdir = ""
  # Where the dataset's codes are cached ('' = <vqgan_workdir>/codes).
  c.codes_dir = ""
  c.conditioning = ml_collections.ConfigDict(dict(
      kind="class",          # 'sos' | 'class' | 'codes' | 'coord'
      sos_token=0,
      num_classes=1000,
      # 'codes': a second VQGAN encodes the paired example of cond_dataset
      # (e.g. folder:/data/depth mirroring the image folder's file names),
      # or, without cond_dataset, a transform of the image itself.
      cond_vqgan_workdir="",
      cond_dataset="",
      cond_transform="identity",   # 'identity' | 'grayscale' | 'downsample'
      # classifier-free guidance: probability of the null class in training.
      label_dropout=0.0,
  ))
  c.permuter = "identity"
  c.pkeep = 1.0
  c.gpt = ml_collections.ConfigDict(dict(
      n_layer=48, n_head=24, n_embd=1536, block_size=0,  # 0: fit the sequence
      embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, n_unmasked=0,
      dtype="float32", param_dtype="float32", remat=False, scan_layers=False,
      # with remat: 'full' | 'attention' | 'dots' (gpt.REMAT_POLICIES: what
      # each block keeps for the backward pass).
      remat_policy="full", attention_impl=None,
      # Options beyond the reference (defaults = the reference's block):
      # norm 'layernorm'|'rmsnorm', mlp 'gelu'|'gelu_tanh'|'swiglu', position_embedding
      # 'learned'|'rope'|'rope2d' (2D rotary over the code grid), zero_head.
      norm="layernorm", mlp="gelu", position_embedding="learned",
      rope_base=10000.0, zero_head=False))
  c.gpt.attention_impl = ml_collections.FieldReference(None, field_type=str)
  c.optim = ml_collections.ConfigDict(dict(
      lr_scaling="reference", base_learning_rate=4.5e-6, learning_rate=3e-4,
      b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=0.0,
      schedule="constant",  # or 'cosine' (with warmup_steps)
      warmup_steps=0, grad_accum_steps=1))
  c.batch_size = 16
  c.num_train_steps = 1_000_000
  c.seed = 0
  c.log_every = 50
  c.eval_every = 5000
  c.eval_batches = 16
  c.sample_every = 5000
  c.samples_per_class = 2
  c.sample_top_k = 0  # 0: no top-k in the periodic samples
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.mesh = mesh_config()
  c.partition_rules = ((".*", "fsdp"),)
  c.peak_tflops_per_device = 0.0  # 0: from the device kind when known
  c.max_bad_steps = 20
  return c
