"""Every shipped config builds, validates, and its model has the stated shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_utils as tu
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.training import vqgan_trainer as vt

VQGAN_CONFIGS = [("digits_vqgan", ""), ("digits_vqgan", "test"),
                 ("imagenet_vqgan", "f16_1024"), ("imagenet_vqgan", "f16_16384,bf16"),
                 ("faces_vqgan", "/data/faces"), ("folder_vqgan", "/data/x")]


@pytest.mark.parametrize("name,arg", VQGAN_CONFIGS)
def test_vqgan_configs_validate(name, arg):
  c = tu.load_config(name, arg)
  vt.validate_config(c)
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
