"""Export to taming-transformers: the reference loads what we write.

Models are initialised here (tiny: ch 32, 16 px, a 2-layer GPT of width 32),
exported, and loaded with the reference package from the YAML
(``instantiate_from_config``) and the checkpoint
(``torch.load(weights_only=True)`` + ``load_state_dict(strict=True)``).
Tolerances are those of the conversion parity tests: codes identical at
every position, images and logits within 1e-4 absolute, discriminator
logits within 1e-4 relative. Converting the exported files back gives the
original parameters bit for bit; for LPIPS, whose forward pass against the
reference is tested in test_lpips.py through the same key map, that exact
round trip and the reference's strict load stand for a forward comparison.
"""
import collections
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vqgan_jax_testing import oracle
from vqgan_jax_testing import reference_ckpt as rc
import vqgan_jax
from vqgan_jax import checkpoint
from vqgan_jax import config_io
from vqgan_jax import conditioning as cond_lib
from vqgan_jax import convert
from vqgan_jax import discriminator as disc_lib
from vqgan_jax import export
from vqgan_jax import lpips as lpips_lib
from vqgan_jax import torch_io
from vqgan_jax import torch_write
from vqgan_jax import vqgan as vqgan_lib

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,), dropout=0.0, in_channels=3, resolution=16,
            z_channels=32)


@pytest.fixture(scope="module")
def torch():
  return oracle.torch()


def _images(seed, n=2):
  rng = np.random.default_rng(seed)
  base = rng.uniform(-1, 1, (n, 4, 4, 3))
  img = np.repeat(np.repeat(base, 4, 1), 4, 2)
  return (0.7 * img + 0.3 * rng.uniform(-1, 1, img.shape)).astype(np.float32)


def _random_params(abstract, seed):
  """Random values for a tree of shapes (no Flax init to compile): kernels
  N(0, 1/fan_in), norm scales near 1, biases and the rest small."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(s.shape).astype(np.float32)
    if s.dtype != jnp.float32:
      return np.zeros(s.shape, s.dtype)
    if "kernel" in name:
      return z / np.sqrt(np.prod(s.shape[:-1]))
    if "'scale'" in name or "'var'" in name:
      return 1.0 + 0.1 * np.abs(z)
    if "embed" in name:
      return z
    return 0.1 * z

  return jax.tree_util.tree_map_with_path(
      lambda p, s: np.asarray(fill(p, s), s.dtype), abstract)


def _init(module, seed, *args, **kwargs):
  shapes = jax.eval_shape(lambda: module.init(
      {"params": jax.random.PRNGKey(0), "gumbel": jax.random.PRNGKey(0)},
      *args, **kwargs))
  return _random_params(dict(shapes), seed)


def _forward(model):
  """``(prequant, reconstruction, indices)``. Not jitted: op by op, the
  compiled operations are shared by every tiny model of these tests."""

  def run(variables, x):
    rec, aux = model.apply(variables, x)
    return (model.apply(variables, x, method=model.encode_to_prequant), rec,
            aux["indices"])

  return run


def _vqgan(quantizer="vq", n_embed=64, embed_dim=32, seed=0, spread=True,
           **options):
  """A random VQGAN; ``spread``: its codebook is spread over its encoder's
  outputs, so that many codes are used. The tests' models share their
  layer shapes, so that operations compiled for one serve the others."""
  model = vqgan_jax.VQGAN(**TINY, n_embed=n_embed, embed_dim=embed_dim,
                          quantizer=quantizer, quantizer_options=options)
  params = _init(model, seed, jnp.zeros((1, 16, 16, 3)))["params"]
  if quantizer == "vq" and spread:
    h = np.asarray(_forward(model)({"params": params},
                                   jnp.asarray(_images(9)))[0])
    q = params["quantize"]
    if "proj" in q:
      p = q["proj"]["proj_in"]
      h = h @ p["kernel"] + p["bias"]
    flat = h.reshape(-1, h.shape[-1])
    rng = np.random.default_rng(seed)
    pick = flat[rng.integers(0, len(flat), n_embed)]
    q = dict(q, embedding=(pick + 0.05 * flat.std() * rng.standard_normal(
        pick.shape)).astype(np.float32))
    params = dict(params, quantize=q)
  return model, {"params": params}


def _offline_reference_lpips(monkeypatch):
  """Lets the reference's LPIPS build offline: a random VGG16 trunk (the
  exported weights replace it) and no lin-head download."""
  oracle.taming()
  import taming.modules.losses.lpips as ref
  from torchvision.models import vgg
  monkeypatch.setattr(ref, "models", types.SimpleNamespace(
      vgg16=lambda *a, **k: types.SimpleNamespace(
          features=vgg.make_layers(vgg.cfgs["D"]))))
  monkeypatch.setattr(ref.LPIPS, "load_from_pretrained", lambda self, **k: None)


def _load_reference(done, torch, strict=True):
  """The reference model of an export: YAML -> instantiate_from_config, then
  the safe-mode torch.load and load_state_dict (strict, or returning the
  missing keys)."""
  oracle.taming()
  from omegaconf import OmegaConf
  from taming.main import instantiate_from_config
  model = instantiate_from_config(OmegaConf.load(done.config).model)
  ckpt = torch.load(done.checkpoint, map_location="cpu", weights_only=True)
  result = model.load_state_dict(ckpt["state_dict"], strict=strict)
  if strict:
    return model.eval(), ckpt
  assert not result.unexpected_keys, result.unexpected_keys
  return model.eval(), result.missing_keys


def _assert_tree_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]),
                                  err_msg=str(k))


def test_torch_file_loads_in_torch_safe_mode_and_in_our_reader(tmp_path, torch):
  import ml_dtypes
  sd = collections.OrderedDict(
      w=np.random.randn(3, 4).astype(np.float32),
      transposed=np.random.randn(4, 3).astype(np.float32).T,
      ids=np.arange(5), flag=np.array(1, np.uint8), mask=np.array([True, False]),
      half=np.ones(3, np.float16), bf16=np.full((2, 2), 1.5, ml_dtypes.bfloat16),
      big_endian=np.array([1.0, 2.0], ">f4"), scalar=np.array(3.0, np.float32))
  obj = {"state_dict": sd, "global_step": 2**40, "epoch": -3,
         "info": [1.5, "text", None, (1, 2), {"nested": True}]}
  path = torch_write.save_torch_file(tmp_path / "x.ckpt", obj)
  for mmap in (False, True):
    got = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(got["state_dict"], collections.OrderedDict)
    assert list(got["state_dict"]) == list(sd)
    for k, v in sd.items():
      t = got["state_dict"][k]
      t = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
      assert t.shape == v.shape, k
      np.testing.assert_array_equal(t, np.asarray(v, t.dtype), err_msg=k)
    assert got["global_step"] == 2**40 and got["epoch"] == -3
    assert got["info"] == [1.5, "text", None, (1, 2), {"nested": True}]
  ours = torch_io.load_state_dict(path)
  for k, v in sd.items():
    np.testing.assert_array_equal(np.asarray(ours[k], np.float32),
                                  np.asarray(v, np.float32), err_msg=k)
  with pytest.raises(TypeError, match="cannot write a object"):
    torch_write.save_torch_file(tmp_path / "y.ckpt", {"x": object()})


@pytest.mark.parametrize("kind", ["vq", "gumbel"])
def test_vqgan_export_loads_in_reference_and_converts_back(
    kind, tmp_path, torch, monkeypatch):
  _offline_reference_lpips(monkeypatch)
  if kind == "vq":
    model, variables = _vqgan("vq")
  else:
    model, variables = _vqgan("gumbel", seed=1, kl_weight=1e-3)
  x = _images(3)
  disc = disc_lib.NLayerDiscriminator(ndf=16, n_layers=2,
                                      use_actnorm=kind == "gumbel")
  dvars = _init(disc, 2, jnp.asarray(x))
  if kind == "gumbel":
    dvars["batch_stats"] = jax.tree.map(lambda a: np.ones((), np.int32),
                                        dvars["batch_stats"])
  lp = None
  if kind == "vq":  # one case carries LPIPS (59 MB of VGG16)
    lp = _init(lpips_lib.LPIPS(), 4, jnp.asarray(x), jnp.asarray(x))
  done = convert.export_taming_vqgan(
      model, tmp_path / "out", variables=variables, discriminator=dvars,
      lpips=lp, loss_settings={"disc_start": 7}, global_step=123)
  assert done.notes == []
  if lp is not None:
    ref, ckpt = _load_reference(done, torch)
    assert ckpt["global_step"] == 123
  else:  # without LPIPS weights, the reference keeps its own (non-strict)
    ref, missing = _load_reference(done, torch, strict=False)
    assert missing and all(k.startswith("loss.perceptual_loss.")
                           for k in missing), missing
  assert ref.loss.discriminator_iter_start == 7

  xt = rc.to_nchw(x)
  with torch.no_grad():
    h = ref.quant_conv(ref.encoder(xt))
    if kind == "gumbel":  # the reference adds Gumbel noise: compare argmaxes
      ref_idx = ref.quantize.proj(h).argmax(1)
      z_q = ref.quantize.embed(ref_idx).permute(0, 3, 1, 2)
    else:
      z_q, _, (_, _, ref_idx) = ref.quantize(h)
    ref_rec = rc.to_nhwc(ref.decode(z_q))
    ref_disc = rc.to_nhwc(ref.loss.discriminator(xt))
  ref_idx = ref_idx.numpy().reshape(2, 8, 8)
  _, rec, idx = _forward(model)(variables, jnp.asarray(x))
  assert len(np.unique(ref_idx)) > 8, "codes too concentrated for a real test"
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(rec), ref_rec, atol=1e-4, rtol=0)
  got_disc = disc.apply(dvars, jnp.asarray(x), train=False)
  np.testing.assert_allclose(np.asarray(got_disc), ref_disc, rtol=1e-4,
                             atol=1e-5)

  # Back: the same parameters, bit for bit, and the same loss networks.
  back, back_vars, extras = convert.convert_taming_vqgan(done.checkpoint,
                                                         done.config)
  assert back.quantizer == kind and back.n_embed == model.n_embed
  _assert_tree_equal(back_vars["params"], variables["params"])
  _assert_tree_equal(extras["discriminator"], dvars)
  if lp is not None:
    _assert_tree_equal(extras["lpips"], lp)


@pytest.mark.parametrize("case", ["l2_factorised_ema", "lfq"])
def test_beyond_reference_quantizers_give_the_same_codes(case, tmp_path, torch):
  if case == "lfq":
    model, variables = _vqgan("lfq", n_embed=16, seed=6)
  else:
    model, variables = _vqgan("vq", seed=7, l2_codes=True, codebook_dim=8,
                              codebook_update="ema")
  done = export.export_taming_vqgan(model, tmp_path, variables=variables,
                                    include_loss=False)
  assert done.notes == (["quantizer_options.vq.codebook_update='ema'"]
                        if case != "lfq" else [])
  ref, _ = _load_reference(done, torch)
  x = _images(8)
  with torch.no_grad():
    z_q, _, (_, _, ref_idx) = ref.quantize(ref.quant_conv(ref.encoder(
        rc.to_nchw(x))))
    ref_rec = rc.to_nhwc(ref.decode(z_q))
  ref_idx = ref_idx.numpy().reshape(2, 8, 8)
  _, rec, idx = _forward(model)(variables, jnp.asarray(x))
  assert len(np.unique(ref_idx)) > 4
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(rec), ref_rec, atol=1e-4, rtol=0)


def test_options_without_an_equivalent_are_refused(tmp_path):
  fsq = vqgan_jax.VQGAN(**TINY, n_embed=8 * 5 * 5, embed_dim=3,
                        quantizer="fsq",
                        quantizer_options={"levels": (8, 5, 5)})
  params = jax.eval_shape(lambda: vqgan_lib.init_variables(
      fsq, jax.random.PRNGKey(0)))["params"]
  with pytest.raises(export.ExportError, match="quantizer='fsq' has no"):
    export.export_taming_vqgan(fsq, tmp_path, variables={"params": params})
  gpt = vqgan_jax.GPT(vocab_size=16, block_size=8, n_layer=1, n_head=2,
                      n_embd=16, norm="rmsnorm")
  with pytest.raises(export.ExportError, match="gpt.norm='rmsnorm' has no"):
    convert.export_taming_transformer(
        gpt, tmp_path, variables={"params": {}}, vqgan=_vqgan(spread=False),
        conditioning={"kind": "sos"})
  assert not os.listdir(tmp_path)


def _gpt(vocab, block, seed):
  gpt = vqgan_jax.GPT(vocab_size=vocab, block_size=block, n_layer=2, n_head=2,
                      n_embd=32)
  return gpt, _init(gpt, seed, jnp.zeros((1, block), jnp.int32))


@pytest.mark.parametrize("cond", ["class_zcurve", "sos", "codes"])
def test_transformer_export_gives_the_reference_logits(cond, tmp_path, torch):
  vq = _vqgan("vq", seed=10)
  x = _images(11)
  z = np.asarray(_forward(vq[0])(vq[1], jnp.asarray(x))[2]).reshape(2, -1)
  permuter, cond_vq, labels = "identity", None, np.array([3, 7])
  if cond == "class_zcurve":
    conditioning = {"kind": "class", "num_classes": 10, "null_token": 10}
    permuter, c_tok, vocab = "zcurve", labels[:, None], 64
    c_in = torch.from_numpy(labels)
  elif cond == "sos":
    conditioning = {"kind": "sos", "sos_token": 5}
    c_tok, vocab, c_in = np.full((2, 1), 5), 64, rc.to_nchw(x)
  else:
    cond_vq = _vqgan("vq", seed=12)
    conditioning = {"kind": "codes", "cond_transform": "identity"}
    c_tok = np.asarray(_forward(cond_vq[0])(cond_vq[1], jnp.asarray(x))[2]
                       ).reshape(2, -1)
    vocab, c_in = 64, rc.to_nchw(x)
  gpt, gvars = _gpt(vocab, c_tok.shape[1] + 63, seed=13)
  perm = cond_lib.permutation(permuter, 8, 8)
  if cond == "class_zcurve":  # through a directory, as the CLI reads one
    src = tmp_path / "gpt"
    checkpoint.save_pretrained(str(src / "vqgan"), "vqgan",
                               vqgan_lib.model_config(vq[0]), vq[1])
    checkpoint.save_pretrained(
        str(src), "transformer", config_io.to_config(gpt), gvars,
        vqgan="vqgan", image_grid=[8, 8], permuter=permuter,
        conditioning=conditioning)
    assert convert.main(["export", f"--workdir={src}",
                         f"--out={tmp_path / 'out'}"]) == 0
    done = export.Exported(
        str(tmp_path / "out" / export.CKPT_FILE),
        str(tmp_path / "out" / export.YAML_FILE), [])
  else:
    done = convert.export_taming_transformer(
        gpt, tmp_path / "out", variables=gvars, vqgan=vq,
        conditioning=conditioning, cond_vqgan=cond_vq, permuter=permuter)
  ref, _ = _load_reference(done, torch)
  if permuter == "zcurve":
    oracle.taming()
    from taming.modules.transformer.permuter import ZCurve
    fresh = ZCurve(8, 8)
    for name, buf in fresh.named_buffers():
      np.testing.assert_array_equal(getattr(ref.permuter, name).numpy(),
                                    buf.numpy(), err_msg=name)
  if cond == "sos":  # the same GPT path as 'class'; its prefix is the token
    assert ref.be_unconditional and ref.cond_stage_model.sos_token == 5
    assert ref.cond_stage_model.encode(c_in)[0].flatten().tolist() == [5, 5]
  else:
    with torch.no_grad():
      ref_logits, ref_target = ref(rc.to_nchw(x), c_in)
    inputs, targets, start = cond_lib.sequence(
        jnp.asarray(c_tok, jnp.int32), jnp.asarray(cond_lib.permute(z, perm)))
    logits = jax.jit(gpt.apply)(gvars, inputs)[:, start:]  # one compile
    np.testing.assert_array_equal(np.asarray(targets), ref_target.numpy())
    np.testing.assert_allclose(np.asarray(logits), ref_logits.numpy(),
                               atol=1e-4)

  # Back: identical GPT and first-stage parameters.
  _, back = convert.load_taming_transformer(done.checkpoint, done.config)
  _assert_tree_equal(back["params"], gvars["params"])
  _, vq_back = convert.load_taming_vqgan(done.checkpoint, done.config)
  _assert_tree_equal(vq_back["params"], vq[1]["params"])


def _fake_workdir(path, model, params, disc_vars, step, quantizer_ema=None):
  """A stage-1 training workdir as the trainer lays it out."""
  import orbax.checkpoint as ocp
  state = {"step": np.int32(step), "params": params,
           "ema_params": quantizer_ema or params,
           "disc_params": disc_vars["params"],
           "disc_state": {"batch_stats": disc_vars["batch_stats"]}}
  with ocp.CheckpointManager(os.path.join(path, "checkpoints")) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
        jax.tree.map(np.asarray, state))))
    mngr.wait_until_finished()
  checkpoint.write_model_json(
      str(path), "vqgan", vqgan_lib.model_config(model),
      train_config={"loss": {"disc_start": 11, "lecam_weight": 0.5,
                             "perceptual_weight": 0.0}})


def test_cli_exports_a_training_workdir(tmp_path, torch, capsys):
  model, variables = _vqgan("vq", seed=20, spread=False)
  disc = disc_lib.NLayerDiscriminator(ndf=16, n_layers=2)
  dvars = _init(disc, 1, jnp.zeros((1, 16, 16, 3)))
  ema = jax.tree.map(lambda a: a + 1.0, variables["params"])
  wd = tmp_path / "wd"
  _fake_workdir(wd, model, variables["params"], dvars, 40, ema)
  out = tmp_path / "out"
  assert convert.main(["export", f"--workdir={wd}", f"--out={out}"]) == 0
  captured = capsys.readouterr()
  assert "note: not carried over (training only): loss.lecam_weight=0.5" in (
      captured.err)
  ckpt = torch.load(out / export.CKPT_FILE, weights_only=True)
  assert ckpt["global_step"] == 40
  assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])
  with open(out / export.YAML_FILE) as f:
    text = f.read()
  assert "# not carried over (training only): loss.lecam_weight=0.5" in text
  _, back, extras = convert.convert_taming_vqgan(out / export.CKPT_FILE,
                                                 out / export.YAML_FILE)
  _assert_tree_equal(back["params"], ema)  # EMA parameters by default
  _assert_tree_equal(extras["discriminator"], dvars)
  # --nouse_ema: the raw parameters; without the loss: a DummyLoss model.
  assert convert.main(["export", f"--workdir={wd}", f"--out={tmp_path / 'raw'}",
                       "--nouse_ema", "--noinclude_loss"]) == 0
  raw = torch_io.load_state_dict(tmp_path / "raw" / export.CKPT_FILE)
  assert not any(k.startswith("loss.") for k in raw)
  _, back, _ = convert.convert_taming_vqgan(
      tmp_path / "raw" / export.CKPT_FILE, tmp_path / "raw" / export.YAML_FILE)
  _assert_tree_equal(back["params"], variables["params"])
  capsys.readouterr()

  # Mistakes: one line on stderr, exit status 2, nothing written.
  for argv, message in [
      ([f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'o2'}"],
       "no such directory"),
      ([f"--workdir={wd}", f"--out={out}"], "exists; choose a new output"),
  ]:
    assert convert.main(["export"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1, err
  assert not (tmp_path / "o2").exists()
  fsq = vqgan_jax.VQGAN(**TINY, n_embed=8 * 5 * 5, embed_dim=3,
                        quantizer="fsq", quantizer_options={"levels": (8, 5, 5)})
  # Refused from model.json alone, before any weights are read.
  checkpoint.write_model_json(str(tmp_path / "fsq"), "vqgan",
                              vqgan_lib.model_config(fsq))
  assert convert.main(["export", f"--workdir={tmp_path / 'fsq'}",
                       f"--out={tmp_path / 'o3'}"]) == 2
  err = capsys.readouterr().err
  assert "quantizer='fsq' has no taming-transformers equivalent" in err
  assert not (tmp_path / "o3").exists()
