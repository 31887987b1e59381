"""Builds reference (taming) models with random weights and writes them as
Lightning-format checkpoints plus YAML configs, as the official releases are."""
import os

import numpy as np
import yaml

from vqgan_jax_testing import oracle


def lightning_checkpoint(path, state_dict, hyper_parameters=None):
  """Writes ``state_dict`` the way Lightning's ``save_checkpoint`` lays it out."""
  torch = oracle.torch()
  import omegaconf
  ckpt = {
      "epoch": 3,
      "global_step": 1234,
      "pytorch-lightning_version": "1.9.5",
      "state_dict": state_dict,
      "loops": {},
      "callbacks": {},
      "optimizer_states": [],
      "lr_schedulers": [],
      "hparams_name": "kwargs",
      # OmegaConf objects as the official checkpoints carry them.
      "hyper_parameters": omegaconf.OmegaConf.create(hyper_parameters or {}),
  }
  torch.save(ckpt, path)
  return path


def write_yaml(path, model_cfg):
  with open(path, "w") as f:
    yaml.safe_dump({"model": model_cfg}, f)
  return path


def vq_model_config(ddconfig, n_embed, embed_dim, gumbel=False, kl_weight=1e-8,
                    lossconfig=None):
  params = {
      "embed_dim": embed_dim,
      "n_embed": n_embed,
      "ddconfig": dict(ddconfig, double_z=False),
      "lossconfig": lossconfig or {
          "target": "taming.modules.losses.vqperceptual.DummyLoss"},
  }
  if gumbel:
    params["kl_weight"] = kl_weight
    params["temperature_scheduler_config"] = {
        "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
        "params": {"warm_up_steps": 0, "max_decay_steps": 1000,
                   "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}}
    target = "taming.models.vqgan.GumbelVQ"
  else:
    target = "taming.models.vqgan.VQModel"
  return {"target": target, "params": params}


def build_reference(model_cfg, seed=0):
  """Instantiates the reference model of ``model_cfg`` with random weights."""
  torch = oracle.torch()
  oracle.taming()
  from taming.models import vqgan as ref_vqgan
  torch.manual_seed(seed)
  p = dict(model_cfg["params"])
  cls = getattr(ref_vqgan, model_cfg["target"].rsplit(".", 1)[1])
  model = cls(**p)
  return model.eval()


def build_reference_without_perceptual(model_cfg, seed=0):
  """:func:`build_reference` for a ``VQLPIPSWithDiscriminator`` loss whose
  perceptual weight is 0: its LPIPS (VGG16 weights, a download) is built as
  an identity module instead."""
  torch = oracle.torch()
  oracle.taming()
  import taming.modules.losses.vqperceptual as vqp
  original = vqp.LPIPS
  vqp.LPIPS = lambda: torch.nn.Identity()
  try:
    return build_reference(model_cfg, seed=seed)
  finally:
    vqp.LPIPS = original


def spread_codebook(model, images, seed=0, noise=0.05):
  """Sets the codebook to perturbed encoder outputs so many codes get used."""
  torch = oracle.torch()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    h = model.quant_conv(model.encoder(images))
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    if hasattr(model.quantize, "embedding"):
      weight = model.quantize.embedding.weight
    else:
      weight = model.quantize.embed.weight
    n = weight.shape[0]
    pick = torch.randint(0, flat.shape[0], (n,), generator=g)
    scale = flat.std()
    weight.copy_(flat[pick] + noise * scale * torch.randn(weight.shape, generator=g))


def save_reference(tmpdir, model, model_cfg, name="model"):
  ckpt = os.path.join(tmpdir, f"{name}.ckpt")
  cfg = os.path.join(tmpdir, f"{name}.yaml")
  lightning_checkpoint(ckpt, model.state_dict(), {"n_embed": model_cfg["params"]["n_embed"]})
  write_yaml(cfg, model_cfg)
  return ckpt, cfg


def to_nchw(x):
  return oracle.torch().from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def to_nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def net2net_config(first_stage_cfg, gpt_params, cond_stage_config, **extra):
  params = {
      "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                             "params": gpt_params},
      "first_stage_config": first_stage_cfg,
      "cond_stage_config": cond_stage_config,
  }
  params.update(extra)
  return {"target": "taming.models.cond_transformer.Net2NetTransformer",
          "params": params}


def build_net2net(model_cfg, seed=0):
  """A reference Net2NetTransformer with random weights (and a non-zero pos_emb)."""
  torch = oracle.torch()
  oracle.taming()
  from taming.models.cond_transformer import Net2NetTransformer
  torch.manual_seed(seed)
  model = Net2NetTransformer(**model_cfg["params"]).eval()
  with torch.no_grad():
    model.transformer.pos_emb.normal_(0, 0.02)
  return model
