r"""The reference's class-conditional ImageNet transformer (cIN): 48 layers,
d 1536, 24 heads, over the 16x16 codes of the f16/16384 VQGAN (1.4B params).

  python train_transformer.py --config=configs/imagenet_transformer.py \
      --workdir=runs/cin_transformer --config.vqgan_workdir=converted/vqgan_f16_16384 \
      --config.data_dir=/data/tfds

Argument `,bf16` computes in bfloat16 (float32 master weights and logits);
`,cfg` adds classifier-free-guidance label dropout (10%). At this size shard
parameters and optimizer state: e.g. `--config.mesh.data=-1 --config.mesh.fsdp=8`,
and `--config.gpt.remat=True --config.gpt.scan_layers=True` (with
`--config.gpt.remat_policy=full|attention|dots`: what each block keeps for
the backward pass, from least memory to least recomputation).
"""
from vqgan_jax.training import schema


def get_config(arg: str = ""):
  args = {a for a in (arg or "").split(",") if a}
  unknown = args - {"bf16", "cfg"}
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; valid: bf16, cfg")
  c = schema.transformer_config()
  c.dataset = "tfds:imagenet2012"
  c.conditioning.kind = "class"
  c.conditioning.num_classes = 1000
  c.gpt.update(dict(n_layer=48, n_head=24, n_embd=1536))
  if "bf16" in args:
    c.gpt.dtype = "bfloat16"
  if "cfg" in args:
    c.conditioning.label_dropout = 0.1
  c.batch_size = 16
  return c
