"""Every shipped config builds, validates, and its model has the stated shape."""
import jax
import numpy as np
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.training import schema
from vqgan_jax.training import vqgan_trainer as vt

VQGAN_CONFIGS = [("digits_vqgan", ""), ("digits_vqgan", "test"),
                 ("imagenet_vqgan", "f16_1024"), ("imagenet_vqgan", "f16_16384,bf16"),
                 ("faces_vqgan", "/data/faces"), ("folder_vqgan", "/data/x"),
                 ("folder_vqgan", "/data/x,cpu"), ("folder_vqgan", "/data/x,photos")]


@pytest.mark.parametrize("name,arg", VQGAN_CONFIGS)
def test_vqgan_configs_validate(name, arg):
  c = tu.load_config(name, arg)
  schema.check_vqgan(c)
  model = vqgan_lib.from_config(c.model.to_dict())
  shapes = jax.eval_shape(lambda: vqgan_lib.init_variables(model, jax.random.PRNGKey(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if name == "imagenet_vqgan":
    assert n == {"f16_1024": 76_073_859 - (16384 - 1024) * 256, "f16_16384,bf16": 76_073_859}[arg]
    assert c.loss.disc_start == 250001 and vt.learning_rate(c) == pytest.approx(4.5e-6 * 12)


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="unknown config arguments"):
    tu.load_config("imagenet_vqgan", "f8")
  with pytest.raises(ValueError, match="give the image folder"):
    tu.load_config("folder_vqgan", "")
  with pytest.raises(ValueError, match="unknown preset 'gpu'.*valid: cpu"):
    tu.load_config("folder_vqgan", "/data/x,gpu")
  with pytest.raises(ValueError, match="give the image folder"):
    tu.load_config("folder_transformer", "")
  with pytest.raises(ValueError, match="unknown preset 'cpu'.*valid: photos"):
    tu.load_config("folder_transformer", "/data/x,cpu")


def test_folder_cpu_preset_is_small(tmp_path):
  c = tu.load_config("folder_vqgan", "/data/x,cpu")
  assert c.dataset == "folder:/data/x" and c.model.resolution <= 64
  assert c.loss.perceptual_weight == 0  # no weights to download
  comma = tmp_path / "a,cpu"  # an existing folder is never split
  comma.mkdir()
  assert tu.load_config("folder_vqgan", str(comma)).dataset == f"folder:{comma}"


TRANSFORMER_CONFIGS = [("digits_transformer", ""), ("digits_transformer", "test"),
                       ("imagenet_transformer", "bf16,cfg"), ("faces_transformer", "/d"),
                       ("depth_transformer", "/d"), ("folder_transformer", "/d"),
                       ("folder_transformer", "/d,photos")]


@pytest.mark.parametrize("name,arg", TRANSFORMER_CONFIGS)
def test_transformer_configs_build(name, arg):
  from vqgan_jax.training import transformer_trainer as tt
  c = tu.load_config(name, arg)
  c.vqgan_workdir = "/somewhere"
  if c.conditioning.kind == "codes":
    c.conditioning.cond_vqgan_workdir = "/elsewhere"
  schema.check_transformer(c)
  n_embed, grid = {"digits_transformer": (64, (8, 8)),
                   "folder_transformer": (256, (8, 8)),
                   "imagenet_transformer": (16384, (16, 16))}.get(name, (1024, (16, 16)))
  layout = tt.make_layout(c, n_embed, grid, cond_grid=(16, 16))
  model = tt.build_model(c, layout)
  shapes = jax.eval_shape(lambda: tt.init_state(model, tt.make_optimizer(c),
                                                jax.random.PRNGKey(0))["params"])
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if name == "imagenet_transformer":
    assert model.block_size == 256 and layout.vocab_size == 16384
    assert 1.40e9 < n < 1.45e9, n  # the reference cIN transformer: 1.4B
  if name == "depth_transformer":  # the reference's: 304.9M (block 512, vocab 1024)
    assert abs(n - 304.9e6) < 0.6e6, n
