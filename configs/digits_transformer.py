r"""Class-conditional GPT on the codes of the `digits` VQGAN (embedded default).

  python train_transformer.py --config=configs/digits_transformer.py \
      --workdir=runs/digits_transformer --config.vqgan_workdir=runs/digits_vqgan

Runs offline on 2 CPU cores in minutes. One row of samples per digit is
written to `workdir/images/`. Sample afterwards with
`python sample.py --workdir=runs/digits_transformer`.
`:test` is a seconds-long variant for tests.
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  c = schema.transformer_config()
  c.dataset = "digits"
  c.conditioning.kind = "class"
  c.conditioning.num_classes = 10
  # 10% of training examples see the null class, so the model also samples
  # with classifier-free guidance; `sample.py` guides at scale 3 unless told
  # otherwise (--guidance_scale=1: unguided). docs/features.md compares the
  # scales and schedules.
  c.conditioning.label_dropout = 0.1
  c.sampling.guidance_scale = 3.0
  c.gpt.update(dict(n_layer=4, n_head=4, n_embd=128, embd_pdrop=0.1,
                    resid_pdrop=0.1, attn_pdrop=0.1))
  c.optim.update(dict(lr_scaling="none", learning_rate=1e-3, schedule="cosine",
                      warmup_steps=100, grad_clip=1.0))
  c.batch_size = 64
  c.num_train_steps = 1500
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 0
  c.sample_every = 500
  c.samples_per_class = 10
  c.checkpoint_every = 500
  if arg == "test":
    c.gpt.update(dict(n_layer=1, n_head=2, n_embd=32))
    c.batch_size = 8
    c.num_train_steps = 4
    c.log_every = 2
    c.eval_every = 4
    c.eval_batches = 2
    c.sample_every = 4
    c.samples_per_class = 1
    c.checkpoint_every = 2
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'test'")
  return c
