"""One config schema: each check exists once, so both trainers (and the data
pipeline) give the same message for the same mistake."""
import os

import jax
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import data as data_lib
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.training import schema
from vqgan_jax.training import transformer_trainer as tt
from vqgan_jax.training import vqgan_trainer as vt


def _set(config, field, value):
  node, keys = config, field.split(".")
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value


def _vqgan_dir(path):
  c = tu.load_config("digits_vqgan", "test")
  ckpt_lib.write_model_json(str(path), "vqgan", vqgan_lib.model_config(
      vqgan_lib.from_config(c.model.to_dict())))
  os.makedirs(os.path.join(path, "params"), exist_ok=True)
  return str(path)


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 6, r"config\.batch_size=6 is not divisible by the 4 devices of the mesh "
     r"\{'data': 4, 'fsdp': 1\}; use a multiple of 4 \(e\.g\. 4 or 8\)"),
    ("batch_size", 0, r"config\.batch_size=0 must be > 0"),
    ("mesh", {"data": 3}, r"config\.mesh=\{'data': 3\} has 3 devices but 4 are available"),
    ("dataset", "imagenet", r"unknown dataset 'imagenet'; config\.dataset must be one of"),
    ("max_bad_steps", 0, r"config\.max_bad_steps=0 must be >= 1"),
    ("log_every", 0, r"config\.log_every=0 must be > 0"),
    ("num_train_steps", -1, r"config\.num_train_steps=-1 must be >= 0"),
    ("optim.lr_scaling", "linear", r"config\.optim\.lr_scaling='linear'; valid"),
])
def test_both_trainers_raise_the_same_message_for_the_same_mistake(tmp_path, monkeypatch,
                                                                   field, value, message):
  monkeypatch.setattr(jax, "device_count", lambda: 4)  # what the mesh must fit
  configs = {vt: tu.load_config("digits_vqgan", "test"),
             tt: tu.load_config("digits_transformer", "test")}
  configs[tt].vqgan_workdir = _vqgan_dir(tmp_path / "vq")
  errors = []
  for trainer, c in configs.items():
    _set(c, field, value)
    wd = tmp_path / trainer.__name__
    with pytest.raises(schema.ConfigError, match=message) as e:
      trainer.train_and_evaluate(c, str(wd))
    assert not wd.exists()  # refused before anything was written
    errors.append(str(e.value))
  assert errors[0] == errors[1] and "\n" not in errors[0]


def test_the_data_pipeline_and_the_schema_share_the_dataset_check():
  with pytest.raises(ValueError) as built:
    data_lib.build_dataset("folder:", resolution=16)
  with pytest.raises(schema.ConfigError) as checked:
    schema.check_dataset("dataset", "folder:")
  assert str(built.value) == str(checked.value)
  with pytest.raises(schema.ConfigError, match=r"config\.conditioning\.cond_dataset must be"):
    schema.check_dataset("conditioning.cond_dataset", "depth")


def test_every_default_config_passes_its_stage_checks():
  vq = schema.vqgan_config()
  schema.check_vqgan(vq)
  schema.check_batch(vq, {"data": 4, "fsdp": 1})
  gpt = schema.transformer_config()
  gpt.vqgan_workdir = "/somewhere"
  schema.check_transformer(gpt)
  schema.check_batch(gpt, {"data": 8})
