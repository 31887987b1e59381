"""One config schema: each check exists once, so both trainers (and the data
pipeline) give the same message for the same mistake; every field has a
declared domain, and the values just outside each domain are refused with
one line before anything is touched."""
import copy
import math
import os
import re

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
    ("optim.learning_rate", -1e-3, r"config\.optim\.learning_rate=-0\.001 must be >= 0"),
    ("mesh", {"data": 0}, r"config\.mesh\.data=0 must be >= 1 or -1"),
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


# ----------------------------------------------------------------------------
# Declared domains: every field has one, and the values just outside it are
# derived from it, so a new field is covered without a new test.

STAGES = ("vqgan", "transformer")
SHIPPED = {"vqgan": [("digits_vqgan", ""), ("digits_vqgan", "test"),
                     ("imagenet_vqgan", "f16_16384,bf16"), ("folder_vqgan", "/d"),
                     ("faces_vqgan", "/d")],
           "transformer": [("digits_transformer", ""), ("imagenet_transformer", "bf16,cfg"),
                           ("faces_transformer", "/d"), ("depth_transformer", "/d")]}


def _valid(stage):
  if stage == "vqgan":
    return schema.vqgan_config()
  c = schema.transformer_config()
  c.vqgan_workdir = "/somewhere"
  return c


def _fields(config, table, prefix=""):
  """The dotted fields of ``config``; a field the table declares is a leaf
  even when its value is a mapping (the mesh)."""
  out = []
  for key, value in config.items():
    field = prefix + key
    if hasattr(value, "items") and field not in table:
      out += _fields(value, table, field + ".")
    else:
      out.append(field)
  return out


def _outside(d):
  """Values just outside domain ``d`` and values of the wrong type."""
  bad = [None]
  if d.kind in ("int", "float"):
    step = (lambda x, up: x + (1 if up else -1)) if d.kind == "int" else (
        lambda x, up: math.nextafter(x, math.inf if up else -math.inf))
    if d.lo is not None:
      bad.append(d.lo if d.lo_open else step(d.lo, False))
    if d.hi is not None:
      bad.append(d.hi if d.hi_open else step(d.hi, True))
    bad += ["1", True] + ([1.5] if d.kind == "int" else [math.nan, math.inf])
  elif d.kind == "bool":
    bad += [1, "true"]
  elif d.kind == "str":
    bad += [3, ("a",)] + ([""] if d.nonempty else [])
  elif d.kind == "choice":
    c = d.choices[0]
    bad += ([c + "_x", 1] if isinstance(c, str) else
            [max(d.choices) + 1, str(c), True, float(c)])
  elif d.kind == "tuple":
    bad += ["16", ("",)] + [(x,) for x in _outside(d.item)[1:3]]
    bad += [()] if d.nonempty else []
  elif d.kind == "mesh":
    bad += ["data"] + [{"data": x} for x in _outside(d.item)[1:]]
  elif d.kind == "rules":
    bad += ["fsdp", (("(", "fsdp"),), ((".*", "shard"),), ((".*",),), ((1, "fsdp"),)]
  else:
    raise AssertionError(f"no bad values derived for a {d.kind!r} domain")
  return [b for b in bad if not (b is None and d.optional) and b not in d.also]


def _inside(d):
  """Valid values at the edges of ``d``."""
  if d.kind in ("int", "float"):
    one = 1 if d.kind == "int" else 1e-9
    out = [d.lo + one if d.lo_open else d.lo] if d.lo is not None else [7]
    out += [d.hi - one if d.hi_open else d.hi] if d.hi is not None else []
    return out + list(d.also)
  if d.kind == "tuple":
    return [(_inside(d.item)[0],)] + [()] * (not d.nonempty)
  return {"bool": [True, False], "choice": list(d.choices),
          "str": ["x"] + [""] * (not d.nonempty),
          "mesh": [{"data": -1, "fsdp": 2}], "rules": [((".*", ("data", None)),)]}[d.kind]


def _value(config, field):
  for key in field.split("."):
    config = config[key]
  return config


def _set_any(config, field, value):
  with config.ignore_type():
    _set(config, field, value)


@pytest.mark.parametrize("stage", STAGES)
def test_every_field_has_a_domain_and_every_default_lies_in_it(stage):
  table = schema.field_domains(stage)
  fields = _fields(_valid(stage), table)
  assert not [f for f in fields if table.get(f, (0, None))[1] is None], "fields without a domain"
  assert not set(table) - set(fields), "domains of fields the builder lacks"
  valid = _valid(stage)  # the defaults, and a path where one is required
  assert not [f for f, (_, d) in table.items() if not d.contains(_value(valid, f))]
  for name, arg in SHIPPED[stage]:  # a config file adds no undeclared field
    c = tu.load_config(name, arg)
    assert set(_fields(c, table)) == set(fields), (name, arg)
    assert schema.stage_of(c) == stage


@pytest.mark.parametrize("stage", STAGES)
def test_values_outside_each_declared_domain_are_refused_naming_field_and_fix(stage):
  check = {"vqgan": schema.check_vqgan, "transformer": schema.check_transformer}[stage]
  base = _valid(stage)
  check(base)
  cases = 0
  for field, (_, domain) in schema.field_domains(stage).items():
    for v in _inside(domain):
      assert domain.contains(v), (field, v)
    for bad in _outside(domain):
      c = copy.deepcopy(base)
      _set_any(c, field, bad)
      bad = _value(c, field)  # as ConfigDict stores it (True in a float field: 1.0)
      if domain.contains(bad):
        continue
      with pytest.raises(schema.ConfigError) as e:  # not ZeroDivisionError & co.
        check(c)
      message = str(e.value)
      assert "\n" not in message, message
      if domain.kind == "mesh":
        assert message.startswith(f"config.{field}"), (field, bad, message)
      else:
        assert message.startswith(f"config.{field}={bad!r}"), (field, bad, message)
        assert "; valid: " in message or ("must be" in message and "--config." in message), \
            message
      cases += 1
  assert cases > 200


@pytest.mark.parametrize("field,value,message", [  # once a traceback or a silent run
    ("model.resolution", 0, "config.model.resolution=0 must be > 0"),
    ("model.n_embed", 0, "config.model.n_embed=0 must be > 0"),
    ("model.ch_mult", (), "config.model.ch_mult=() must be a non-empty tuple"),
    ("optim.learning_rate", -1e-4, "config.optim.learning_rate=-0.0001 must be >= 0"),
    ("model.quantizer_options.fsq.levels", (8, 1), "config.model.quantizer_options.fsq.levels"),
    ("eval_dataset", "imagenet", "unknown dataset 'imagenet'; config.eval_dataset must be"),
])
def test_reported_bad_values_are_refused(field, value, message):
  c = _valid("vqgan")
  _set(c, field, value)
  with pytest.raises(schema.ConfigError, match=re.escape(message)):
    schema.check_vqgan(c)


def test_channel_reordering_needs_rgb_data():
  c = _valid("vqgan")
  c.augment = ("flip", "channels")
  schema.check_vqgan(c)
  c.model.in_channels = 1
  with pytest.raises(schema.ConfigError, match=re.escape(
      "config.augment=('flip', 'channels'): 'channels' reorders R, G and B, "
      "but config.model.in_channels=1; drop 'channels' from config.augment")):
    schema.check_vqgan(c)


def test_ema_restart_threshold_the_batch_cannot_meet_is_refused():
  """At most vectors-per-step / threshold codes can keep an EMA count of
  threshold: above vectors / n_embed the codebook churns and collapses."""
  c = _valid("vqgan")
  c.model.update(dict(resolution=32, ch_mult=(1, 2, 2, 2), n_embed=4096))
  c.batch_size = 16  # 16 x 4 x 4 = 256 vectors a step
  vq = c.model.quantizer_options.vq
  vq.update(dict(codebook_update="ema", dead_code_threshold=1.0))
  with pytest.raises(schema.ConfigError, match=re.escape(
      "config.model.quantizer_options.vq.dead_code_threshold=1.0: a step "
      "quantizes 256 vectors (batch 16 x 4x4), so at most 256 of the 4096 "
      "codes can keep an EMA count of 1.0 and the rest restart every step; "
      "set it to at most 0.0625 (vectors per step / n_embed), or raise "
      "config.batch_size, or lower config.model.n_embed")):
    schema.check_vqgan(c)
  vq.dead_code_threshold = 0.0625  # the largest that every code can meet
  schema.check_vqgan(c)
  vq.dead_code_threshold = 0.0  # off
  schema.check_vqgan(c)
  vq.update(dict(codebook_update="loss", dead_code_threshold=1.0))  # unused
  schema.check_vqgan(c)


def test_guidance_by_default_needs_label_dropout():
  c = _valid("transformer")
  c.sampling.guidance_scale = 3.0
  c.conditioning.label_dropout = 0.0
  with pytest.raises(schema.ConfigError, match=re.escape(
      "config.sampling.guidance_scale=3.0 needs a model trained with label dropout")):
    schema.check_transformer(c)
  c.conditioning.label_dropout = 0.1
  schema.check_transformer(c)


def test_the_tuple_override_syntax_is_told_by_the_error():
  c = _valid("vqgan")
  c.model.attn_resolutions = ("",)  # what `--config.model.attn_resolutions=` gives
  with pytest.raises(schema.ConfigError, match=re.escape(
      "config.model.attn_resolutions=('',) must be a tuple of (integer > 0); write it as "
      "'--config.model.attn_resolutions=(16,)', or '--config.model.attn_resolutions=()' "
      "for none")):
    schema.check_vqgan(c)


def _digest(directory):
  return {os.path.relpath(os.path.join(root, n), directory):
          open(os.path.join(root, n), "rb").read()
          for root, _, files in os.walk(directory) for n in files}


def test_a_bad_value_exits_2_with_one_line_and_leaves_the_workdir_untouched(tmp_path):
  wd = _vqgan_dir(tmp_path / "wd")
  (tmp_path / "wd" / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5}\n')
  (tmp_path / "wd" / "checkpoints" / "2").mkdir(parents=True)
  (tmp_path / "wd" / "checkpoints" / "2" / "data").write_bytes(b"\0" * 64)
  before = _digest(wd)
  r = tu.run_python(["train_vqgan.py", "--config=configs/digits_vqgan.py:test",
                     f"--workdir={wd}", "--config.optim.learning_rate=-1e-3"],
                    check=False, timeout=300)
  assert r.returncode == schema.EXIT_CONFIG, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines == ["error: config.optim.learning_rate=-0.001 must be >= 0 (0 freezes the "
                   "weights); set --config.optim.learning_rate to a valid value (--config_help "
                   "lists every field and its domain)"], r.stderr[-3000:]
  assert _digest(wd) == before


def test_config_help_lists_every_field_with_its_value_and_domain():
  r = tu.run_python(["train_transformer.py", "--config=configs/digits_transformer.py:test",
                     "--config.gpt.n_layer=3", "--config_help"], check=False, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.splitlines()
  c = tu.load_config("digits_transformer", "test")
  assert len(lines) == len(_fields(c, {})), r.stdout  # the mesh's axes one per line
  assert not [l for l in lines if "no declared domain" in l]
  assert "--config.gpt.n_layer=3  " in r.stdout and "integer > 0" in r.stdout
  assert "'--config.gpt.remat=false" not in r.stdout and "--config.gpt.remat=false" in r.stdout


def test_stage_two_evaluates_on_eval_dataset_but_not_with_paired_conditioning():
  c = _valid("transformer")
  c.dataset, c.eval_dataset = "folder:/data/train", "folder:/data/heldout"
  schema.check_transformer(c)
  assert schema.eval_source(c) == ("folder:/data/heldout", "train")
  c.eval_dataset = ""
  c.eval_split = "validation"
  assert schema.eval_source(c) == ("folder:/data/train", "train")  # one split
  c.dataset = "digits"
  assert schema.eval_source(c) == ("digits", "validation")
  c.eval_dataset = "imagenet"
  with pytest.raises(schema.ConfigError, match=re.escape(
      "unknown dataset 'imagenet'; config.eval_dataset must be")):
    schema.check_transformer(c)
  c.eval_dataset = "folder:/data/heldout"
  c.conditioning.update(dict(kind="codes", cond_vqgan_workdir="/depth_vq",
                             cond_dataset="folder:/data/depth"))
  with pytest.raises(schema.ConfigError, match=re.escape(
      "config.eval_dataset with config.conditioning.cond_dataset: the "
      "conditioning images are paired with config.dataset's")):
    schema.check_transformer(c)
