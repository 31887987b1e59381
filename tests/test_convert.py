"""Conversion: the torch-free reader, the project format, and clear errors."""
import argparse
import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
from vqgan_jax_testing import torch_pickle
import vqgan_jax
from vqgan_jax import checkpoint
from vqgan_jax import convert
from vqgan_jax import torch_io

TINY = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1,
            attn_resolutions=[8], dropout=0.0, in_channels=3, resolution=16,
            z_channels=32)


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


@pytest.fixture()
def tiny_ckpt(tmp_path, torch):
  cfg = rc.vq_model_config(TINY, 32, 8)
  ref = rc.build_reference(cfg, seed=0)
  ckpt, yml = rc.save_reference(tmp_path, ref, cfg)
  return ref, cfg, ckpt, yml


@pytest.mark.parametrize("legacy_format", [False, True])
def test_torch_free_reader_matches_torch_load(tmp_path, torch, legacy_format):
  sd = collections.OrderedDict(
      a=torch.randn(3, 4), transposed=torch.randn(4, 3).t(),
      ints=torch.arange(5), bf16=torch.randn(2, 2).bfloat16(),
      scalar=torch.tensor(3.0), view=torch.randn(10)[2:7],
      half=torch.randn(3).half())
  obj = {"state_dict": sd, "epoch": 3, "ns": argparse.Namespace(x=1)}
  path = tmp_path / "x.ckpt"
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy_format)
  out = torch_io.load_state_dict(path)
  assert list(out) == list(sd)
  for k, v in sd.items():
    ref = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    assert out[k].shape == tuple(v.shape), k
    np.testing.assert_array_equal(np.asarray(out[k], ref.dtype), ref, err_msg=k)
  assert isinstance(torch_io.load_torch_file(path)["ns"], torch_io.Placeholder)


def test_reader_never_executes_pickled_code(tmp_path):
  import pickle

  class Evil:

    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "pwned"),))

  path = tmp_path / "evil.pth"
  import zipfile
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {"x": Evil()}}))
  with pytest.raises(torch_io.CheckpointError):
    torch_io.load_state_dict(path)
  assert not (tmp_path / "pwned").exists()


def test_legacy_header_never_executes_pickled_code(tmp_path):
  """The legacy format's header records are plain data: a class in them is
  refused before anything runs (they used to go through pickle.load)."""
  import pickle

  class Evil:

    def __reduce__(self):
      return (os.system, ("touch " + str(tmp_path / "pwned"),))

  path = tmp_path / "evil_legacy.pth"
  path.write_bytes(pickle.dumps(Evil(), protocol=2))
  with pytest.raises(torch_io.CheckpointError, match="unexpected class"):
    torch_io.load_state_dict(path)
  assert not (tmp_path / "pwned").exists()


def test_not_a_checkpoint_and_missing_file(tmp_path):
  """Damaged files of every kind raise CheckpointError naming the file; the
  random bytes used to hit OverflowError or MemoryError now and then (a
  pickle length field asking for an impossible allocation)."""
  rng = np.random.default_rng(0)
  legacy_magic = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."
  bad = tmp_path / "random.ckpt"
  for i in range(600):
    prefix = (b"", b"\x80\x02", legacy_magic)[i % 3]
    bad.write_bytes(prefix + rng.bytes(int(rng.integers(1, 1500))))
    with pytest.raises(torch_io.CheckpointError,
                       match=re.escape(f"{bad} could not be read as a PyTorch checkpoint")):
      torch_io.load_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
    torch_io.load_state_dict(tmp_path / "nope.ckpt")


def _edit_embedding(ckpt, out, edit):
  """Writes ``ckpt`` with the record of ``quantize.embedding.weight`` (32x8
  float32, its own storage) changed by ``edit(args, entries) -> args``."""
  parsed = torch_pickle.parse(open(ckpt, "rb").read())
  record = parsed.obj["state_dict"]["quantize.embedding.weight"]
  entries = list(parsed.entries)
  record.args = edit(record.args, entries)
  out.write_bytes(parsed.to_bytes(entries=entries))
  return out


def _storage_offset(args, entries):  # the tensor starts at the storage's end
  return (args[0], 256) + args[2:]


def _huge_stride(args, entries):  # rows 8e9 elements apart
  return args[:3] + ((8 * 10**9, 1),) + args[4:]


def _short_entry(args, entries):  # the storage's archive entry loses 4 bytes
  name = next(n for n, _ in entries if n.endswith("data/" + args[0].pid[2]))
  i = [n for n, _ in entries].index(name)
  entries[i] = (name, entries[i][1][:-4])
  return args


@pytest.mark.parametrize("edit, what", [
    (_storage_offset, r"size \(32, 8\), stride \(8, 1\) and offset 256 "
                      r"address element 511, but its storage holds 256 "
                      r"elements of float32"),
    (_huge_stride, r"size \(32, 8\), stride \(8000000000, 1\) and offset 0 "
                   r"address element 248000000007, but its storage holds 256"),
    (_short_entry, r"declared as 256 elements of FloatStorage \(1024 bytes\), "
                   r"but the archive entry .*data/\d+ holds 1020 bytes"),
], ids=["offset", "stride", "short_entry"])
def test_tensor_outside_its_storage_is_refused_naming_file_and_tensor(
    tiny_ckpt, tmp_path, capsys, edit, what):
  """A tensor record that reaches past its storage used to be read from
  process memory past the buffer (the conversion succeeded, exit 0), and
  with large strides `convert` and `load_taming_vqgan` died with a
  segmentation fault; a storage entry shorter than declared was read the
  same way. torch.load refuses all three; so does the reader, before it
  reads an element."""
  _, _, ckpt, yml = tiny_ckpt
  bad = _edit_embedding(ckpt, tmp_path / "bad.ckpt", edit)
  message = (re.escape(f"{bad} could not be read as a PyTorch checkpoint: "
                       "tensor state_dict/quantize.embedding.weight (storage ")
             + r"\d+\): " + what)
  with pytest.raises(torch_io.CheckpointError, match=message):
    convert.load_taming_vqgan(bad, yml)
  out = tmp_path / "out"
  assert convert.main(["--checkpoint", str(bad), "--config", str(yml),
                       "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert re.fullmatch("error: " + message + r".*\n", err), err
  assert not out.exists()


def test_keymaps_import_no_model():
  """The key maps are pure functions of state dicts and shapes: importing
  them loads no model module of the package."""
  code = ("import sys, vqgan_jax.keymaps; print(' '.join(sorted("
          "m for m in sys.modules if m.startswith('vqgan_jax'))))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, check=True, timeout=300, cwd=root,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  loaded = set(r.stdout.split())
  assert loaded == {"vqgan_jax", "vqgan_jax.keymaps"} | {
      f"vqgan_jax.keymaps.{m}"
      for m in ("discriminator", "gpt", "inception", "lpips", "optimizer",
                "vqgan")}, loaded


def test_unknown_target_is_named(tiny_ckpt, tmp_path):
  _, cfg, ckpt, _ = tiny_ckpt
  yml = rc.write_yaml(tmp_path / "bad.yaml", dict(cfg, target="taming.models.vqgan.Foo"))
  with pytest.raises(convert.ConversionError, match="unknown first-stage target 'taming.models.vqgan.Foo'"):
    convert.load_taming_vqgan(ckpt, yml)


def test_missing_and_unexpected_keys_are_listed(tiny_ckpt, tmp_path, torch):
  ref, cfg, _, yml = tiny_ckpt
  sd = ref.state_dict()
  del sd["decoder.conv_out.bias"]
  sd["encoder.extra.weight"] = torch.zeros(1)
  ckpt = rc.lightning_checkpoint(tmp_path / "broken.ckpt", sd)
  with pytest.raises(convert.ConversionError) as e:
    convert.load_taming_vqgan(ckpt, yml)
  msg = str(e.value)
  assert "missing keys (1)" in msg and "decoder.conv_out.bias" in msg
  assert "unexpected keys (1)" in msg and "encoder.extra.weight" in msg


def test_shape_mismatch_names_key_and_both_shapes(tiny_ckpt, tmp_path):
  _, cfg, ckpt, _ = tiny_ckpt
  wrong = rc.vq_model_config(TINY, 64, 8)  # the checkpoint has 32 codes
  yml = rc.write_yaml(tmp_path / "wrong.yaml", wrong)
  with pytest.raises(convert.ConversionError,
                     match=r"quantize.embedding.weight: checkpoint \(32, 8\), model expects \(64, 8\)"):
    convert.load_taming_vqgan(ckpt, yml)


def test_config_errors(tmp_path, tiny_ckpt):
  _, _, ckpt, _ = tiny_ckpt
  with pytest.raises(FileNotFoundError, match="config file not found"):
    convert.load_taming_vqgan(ckpt, tmp_path / "none.yaml")
  (tmp_path / "x.yaml").write_text("foo: 1\n")
  with pytest.raises(convert.ConversionError, match="not a taming-transformers config"):
    convert.load_taming_vqgan(ckpt, tmp_path / "x.yaml")


def test_cli_writes_project_format_and_load_vqgan_reads_it(tiny_ckpt, tmp_path, capsys):
  ref, _, ckpt, yml = tiny_ckpt
  out = tmp_path / "converted"
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(out)]) == 0
  model, variables = vqgan_jax.load_vqgan(str(out))
  ref_model, ref_vars = convert.load_taming_vqgan(ckpt, yml)
  assert model == ref_model
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ref_vars)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A second conversion into the same directory refuses and changes nothing.
  before = sorted(os.listdir(out))
  assert convert.main(["--checkpoint", str(ckpt), "--config", str(yml), "--out", str(out)]) == 2
  assert "already holds a converted model" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == before
  # A corrupt file is an error with exit code 2, not a traceback.
  bad = tmp_path / "bad.ckpt"
  bad.write_bytes(b"\x00" * 100)
  assert convert.main(["--checkpoint", str(bad), "--config", str(yml), "--out", str(tmp_path / "o2")]) == 2
  assert not (tmp_path / "o2").exists()


def test_load_vqgan_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    vqgan_jax.load_vqgan(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="holds no model.json"):
    vqgan_jax.load_vqgan(str(tmp_path))
  checkpoint.write_model_json(str(tmp_path), "transformer", {})
  with pytest.raises(ValueError, match="holds a 'transformer' model, not a 'vqgan'"):
    vqgan_jax.load_vqgan(str(tmp_path))


def test_load_vqgan_of_a_transformer_directory_loads_its_first_stage(tmp_path):
  """A transformer directory gives the VQGAN its model.json names (a
  training workdir records config.vqgan_workdir; relative or absolute), or
  its vqgan/ subfolder (a converted transformer)."""
  from vqgan_jax import vqgan as vqgan_lib
  model = vqgan_jax.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), resolution=8, z_channels=8,
                          n_embed=16, embed_dim=8)
  variables = vqgan_lib.init_variables(model, jax.random.PRNGKey(0))
  stage1 = tmp_path / "stage1"
  checkpoint.save_pretrained(str(stage1), "vqgan",
                             vqgan_lib.model_config(model), variables)
  (tmp_path / "converted").mkdir()
  os.symlink(stage1, tmp_path / "converted" / "vqgan")
  for name, info in [("relative", {"vqgan": "../stage1"}),
                     ("absolute", {"vqgan": str(stage1)}),
                     ("converted", {})]:
    checkpoint.write_model_json(str(tmp_path / name), "transformer", {}, **info)
    got_model, got = vqgan_jax.load_vqgan(str(tmp_path / name))
    assert got_model == model, name
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_f16_parameter_count_equals_reference():
  model = vqgan_jax.VQGAN(n_embed=16384)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 256, 256, 3))))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  assert count(shapes["params"]["encoder"]) == 29_298_176
  assert count(shapes["params"]["decoder"]) == 42_449_795
  assert count(shapes["params"]) == 76_073_859


def test_import_pulls_in_neither_tensorflow_nor_torch():
  import subprocess
  import sys
  code = ("import sys, vqgan_jax, vqgan_jax.vqgan, vqgan_jax.convert, vqgan_jax.checkpoint; "
          "m = vqgan_jax.VQGAN; "
          "bad = [k for k in ('tensorflow', 'torch', 'tensorflow_datasets') if k in sys.modules]; "
          "print(bad); sys.exit(1 if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
