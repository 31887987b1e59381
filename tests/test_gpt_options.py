"""Transformer options beyond the reference: RMSNorm, SwiGLU, RoPE, zero head, guidance.

Properties protected:
  * RMSNorm gives unit RMS features; the 'rmsnorm' model has no norm biases;
  * SwiGLU equals down(silu(x Wg) * (x Wu)) computed by hand;
  * a zero-initialised head gives exactly zero logits at init;
  * 1D RoPE: q.k after rotation depends only on the position offset;
    2D RoPE: only on (d_row, d_col) of the image grid, which the 1D one
    cannot tell apart across a row break; the prefix sits on its own row;
  * with every option on, cached decoding (unrolled, scanned and remat)
    equals the full forward within 1e-4, and greedy sampling equals a
    greedy full-forward loop;
  * every remat policy gives the gradients of the plain model (1e-5), saves
    what it names (XLA's FLOP count falls from 'full' to 'attention' to
    'dots' to no remat) and, with scanned layers, plans less memory than
    no remat;
  * the trainer fills the 2D grid from the token layout, model.json
    round-trips the options, and bad values are named; every option is
    declared once (`gpt.OPTIONS`: its default, which is the GPT field's,
    and its valid values), is a `config.gpt` field, and is checked alike
    for a config and a model;
  * classifier-free guidance through `sample_lib` (what sample.py calls):
    scale 1 reproduces the conditional samples and scale 0 the null class's,
    so the null token is the one fed; a model without one is refused.
"""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax_testing import train_utils as tu
from vqgan_jax import attention
from vqgan_jax import checkpoint as ckpt_lib
from vqgan_jax import config_io
from vqgan_jax import gpt as gpt_lib
from vqgan_jax import gpt_layers
from vqgan_jax import kv_cache
from vqgan_jax import losses
from vqgan_jax import sample_lib
from vqgan_jax import sampling
from vqgan_jax import vqgan as vqgan_lib
from vqgan_jax.training import transformer_trainer as tt

MODERN = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rope2d",
              zero_head=False)


def _tokens(batch, length, vocab, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0,
                            vocab)


# ----------------------------------------------------------------------------
# Pieces.


def test_rmsnorm_gives_unit_rms_and_the_model_has_no_norm_biases():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)) * 7.0 + 2.0
  norm = gpt_layers.make_norm("rmsnorm", jnp.float32, jnp.float32, "n")
  y, _ = jax.jit(norm.init_with_output)(jax.random.PRNGKey(1), x)
  rms = np.sqrt(np.mean(np.square(np.asarray(y)), axis=-1))
  np.testing.assert_allclose(rms, 1.0, atol=1e-4)
  model = gpt_lib.GPT(vocab_size=8, block_size=4, n_layer=1, n_head=2,
                      n_embd=8, norm="rmsnorm")
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          _tokens(1, 4, 8))["params"]
  for name in ("ln1", "ln2"):
    assert set(params["blocks_0"][name]) == {"scale"}
  assert set(params["ln_f"]) == {"scale"}


def test_swiglu_equals_its_formula():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 24))
  mlp = gpt_layers.SwiGLU(24)
  y, variables = mlp.init_with_output(jax.random.PRNGKey(1), x)
  p = variables["params"]
  hidden = gpt_layers.swiglu_hidden(24)
  assert hidden == 64 and p["gate"]["kernel"].shape == (24, 64)
  assert set(p) == {"gate", "up", "down"} and "bias" not in p["gate"]
  want = (jax.nn.silu(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])
          ) @ p["down"]["kernel"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_mlp_is_the_tanh_formula_on_the_gelu_parameters():
  """mlp='gelu_tanh' keeps the reference MLP's parameters (a 'gelu' model's
  params load as they are) and applies GPT-2's tanh GELU between them."""
  base = gpt_lib.GPT(vocab_size=11, block_size=6, n_layer=2, n_head=2,
                     n_embd=16)
  tanh = base.clone(mlp="gelu_tanh")
  toks = _tokens(2, 6, 11)
  variables = base.init(jax.random.PRNGKey(0), toks)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(tanh.init(jax.random.PRNGKey(0), toks)))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
  p = variables["params"]["blocks_0"]["mlp"]
  h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  c = np.sqrt(2 / np.pi)
  want = (0.5 * h * (1 + jnp.tanh(c * (h + 0.044715 * h ** 3)))
          ) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  got = gpt_layers.MLP(16, approximate=True).apply({"params": p}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  exact = gpt_layers.MLP(16).apply({"params": p}, x)
  assert 0 < float(jnp.abs(exact - got).max()) < 1e-2  # a different GELU
  np.testing.assert_allclose(tanh.apply(variables, toks),
                             base.apply(variables, toks), atol=1e-2)


def test_zero_head_gives_zero_logits_at_init():
  model = gpt_lib.GPT(vocab_size=11, block_size=6, n_layer=2, n_head=2,
                      n_embd=16, **dict(MODERN, zero_head=True,
                                        rope_grid=(1, 5)))
  toks = _tokens(2, 6, 11)
  logits = jax.jit(lambda t: model.apply(model.init(
      jax.random.PRNGKey(0), t), t))
  np.testing.assert_array_equal(logits(toks), 0.0)
  ref = model.clone(zero_head=False)
  ref_logits = jax.jit(lambda t: ref.apply(ref.init(jax.random.PRNGKey(0), t),
                                           t))
  assert np.abs(np.asarray(ref_logits(toks))).max() > 0


def _score(angles_q, angles_k, q, k):
  """q.k after rotating q by angles_q and k by angles_k (one head)."""
  rq = attention.apply_rope(q[None, None, None], angles_q[None])[0, 0, 0]
  rk = attention.apply_rope(k[None, None, None], angles_k[None])[0, 0, 0]
  return float(jnp.dot(rq, rk))


def test_rope_score_depends_only_on_the_offset():
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 16))
  ang = lambda p: attention.rope_angles(jnp.asarray([p]), 16)[0]
  base = _score(ang(9), ang(4), q, k)
  for shift in (1, 7, 30):
    assert _score(ang(9 + shift), ang(4 + shift), q, k) == pytest.approx(
        base, rel=1e-4, abs=1e-5)
  assert abs(_score(ang(9), ang(3), q, k) - base) > 1e-3
  # Rotation keeps the norm.
  r = attention.apply_rope(q[None, None, None], ang(5)[None])
  np.testing.assert_allclose(jnp.linalg.norm(r), jnp.linalg.norm(q), rtol=1e-5)


def test_rope2d_score_depends_only_on_row_and_column_offsets():
  w, prefix, d = 5, 2, 16
  q, k = jax.random.normal(jax.random.PRNGKey(1), (2, d))

  def ang(r, c):  # image token at grid (r, c)
    s = prefix + r * w + c
    return attention.rope_angles(jnp.asarray([s]), d, grid_width=w,
                                 prefix_len=prefix)[0]

  base = _score(ang(2, 2), ang(1, 0), q, k)  # (d_row, d_col) = (1, 2)
  for sr, sc in ((1, 0), (0, 2), (2, 1), (-1, 1)):  # shift both tokens
    assert _score(ang(2 + sr, 2 + sc), ang(1 + sr, sc), q, k) == (
        pytest.approx(base, rel=1e-4, abs=1e-5))
  assert abs(_score(ang(2, 2), ang(1, 1), q, k) - base) > 1e-3
  # Raster neighbours across a row break, (0, w-1) -> (1, 0), are one step
  # apart in 1D but (1, -(w-1)) apart in 2D: unlike (0, 0) -> (0, 1).
  across, along = _score(ang(1, 0), ang(0, w - 1), q, k), _score(
      ang(0, 1), ang(0, 0), q, k)
  assert abs(across - along) > 1e-3
  rows, cols = attention.grid_positions(jnp.arange(prefix + 2 * w), w, prefix)
  np.testing.assert_array_equal(rows, [0, 0] + [1] * w + [2] * w)
  np.testing.assert_array_equal(cols, [0, 1] + list(range(w)) * 2)


# ----------------------------------------------------------------------------
# The model with all options: cached decoding, sampling, layouts.


def _modern(scan_layers=False, remat=False, prefix=2, grid=(3, 4)):
  return gpt_lib.GPT(vocab_size=23, block_size=prefix + grid[0] * grid[1] - 1,
                     n_layer=2, n_head=2, n_embd=16, rope_grid=grid,
                     rope_prefix=prefix, scan_layers=scan_layers, remat=remat,
                     **MODERN)


@pytest.mark.parametrize("scan_layers,remat", [(False, False), (True, True)])
def test_cached_decoding_equals_full_forward_with_all_options(scan_layers,
                                                              remat):
  model = _modern(scan_layers, remat)
  toks = _tokens(2, model.block_size, 23, seed=3)
  variables = model.init(jax.random.PRNGKey(0), toks)
  full = jax.jit(model.apply)(variables, toks)
  run = jax.jit(lambda t, c, p: model.apply(variables, t, cache=c,
                                            position=p))
  cache = kv_cache.init_cache(model, 2, model.block_size)
  out, cache = run(toks[:, :2], cache, 0)
  pieces = [out]
  for i in range(2, model.block_size):
    out, cache = run(toks[:, i:i + 1], cache, i)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-4)
  assert "pos_emb" not in variables["params"]


def test_greedy_sampling_equals_a_full_forward_loop_with_all_options():
  model = _modern()
  prefix = np.asarray([[3, 7], [1, 2]], np.int32)
  variables = model.init(jax.random.PRNGKey(0), _tokens(1, 13, 23))
  got = sampling.sample(model, variables, prefix, 12, None, greedy=True)
  # Causal: the logits at position i do not see the zero padding after i.
  forward = jax.jit(lambda s: model.apply(variables, s))
  seq = np.zeros((2, 13), np.int32)
  seq[:, :2] = prefix
  want = []
  for i in range(12):
    nxt = np.asarray(jnp.argmax(forward(jnp.asarray(seq))[:, 1 + i], -1))
    want.append(nxt)
    if 2 + i < 13:
      seq[:, 2 + i] = nxt
  want = np.stack(want, axis=1)
  np.testing.assert_array_equal(got, want)


def test_trainer_fills_the_grid_and_model_json_round_trips():
  c = tu.load_config("digits_transformer", "test")
  c.conditioning.label_dropout = 0.1
  c.gpt.update(dict(norm="rmsnorm", mlp="swiglu", position_embedding="rope2d",
                    zero_head=True))
  layout = tt.make_layout(c, 32, (8, 8))
  model = tt.build_model(c, layout)
  assert (model.rope_grid, model.rope_prefix, model.block_size) == ((8, 8), 1,
                                                                    64)
  assert layout.null_token == 10 and model.vocab_size == 32
  again = config_io.from_config(gpt_lib.GPT, config_io.to_config(model))
  assert again == model
  c.permuter = "zcurve"
  with pytest.raises(ValueError, match="permuter='identity'"):
    tt.build_model(c, tt.make_layout(c, 32, (8, 8)))


@pytest.mark.parametrize("field,value,message", [
    ("norm", "batchnorm", "norm='batchnorm'"),
    ("mlp", "relu", "mlp='relu'"),
    ("position_embedding", "alibi", "position_embedding='alibi'"),
    ("remat_policy", "offload", "remat_policy='offload'"),
    ("n_head", 4, "divisible by 4"),  # head width 2 for rope2d
])
def test_bad_option_values_are_named(field, value, message):
  kw = dict(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=8,
            rope_grid=(2, 2), **MODERN)
  kw[field] = value
  model = gpt_lib.GPT(**kw)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.PRNGKey(0), _tokens(1, 4, 8))


def test_options_are_declared_once_and_checked_for_configs_and_models():
  """`gpt.OPTIONS` holds each option's default (the GPT field's) and valid
  values; `check_options` names `config.gpt.FIELD` with the value and the
  choices for a config and for a GPT alike."""
  defaults = {f.name: f.default for f in dataclasses.fields(gpt_lib.GPT)}
  c = tu.load_config("digits_transformer", "test")
  config_gpt = c.gpt.to_dict()
  for name, option in gpt_lib.OPTIONS.items():
    assert defaults[name] == option.default, name
    assert name in config_gpt, name
  assert set(gpt_lib.ARCH_FIELDS) <= set(config_gpt)
  gpt_lib.check_options(c.gpt)
  small = dict(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=8)
  gpt_lib.check_options(gpt_lib.GPT(**small))
  for name, option in gpt_lib.OPTIONS.items():
    if option.choices is None:
      continue
    message = re.escape(f"config.gpt.{name}='bogus'; valid: {option.choices}")
    c.gpt[name] = "bogus"
    with pytest.raises(ValueError, match=message):
      gpt_lib.check_options(c.gpt)
    with pytest.raises(ValueError, match=message):
      gpt_lib.check_options(gpt_lib.GPT(**small, **{name: "bogus"}))
    c.gpt[name] = option.default


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_policies_keep_gradients_and_trade_flops_for_memory(
    scan_layers):
  model = gpt_lib.GPT(vocab_size=64, block_size=64, n_layer=3, n_head=4,
                      n_embd=64, scan_layers=scan_layers)
  tokens = _tokens(4, 64, 64)
  params = model.init(jax.random.PRNGKey(1), tokens)["params"]

  def grad_fn(m):
    def loss(p):
      logits = m.apply({"params": p}, tokens)
      return losses.token_loss(logits, tokens)
    return jax.jit(jax.grad(loss))

  expected = grad_fn(model)(params)
  flops, temp = {}, {}
  for name in (None,) + gpt_lib.REMAT_POLICIES:
    m = model if name is None else model.clone(remat=True, remat_policy=name)
    compiled = grad_fn(m).lower(params).compile()
    cost = compiled.cost_analysis()
    flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
    if name is not None:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                   compiled(params), expected)
  assert flops["full"] > flops["attention"] > flops["dots"] > flops[None], (
      flops)
  if scan_layers:  # unrolled, XLA:CPU's memory plan does not shrink
    assert all(temp[name] < temp[None] for name in gpt_lib.REMAT_POLICIES), (
        temp)


# ----------------------------------------------------------------------------
# Classifier-free guidance through sample_lib (what sample.py calls).


def _write_pipeline(tmp_path, null_token):
  """A random tiny VQGAN + modern class-conditional GPT as directories."""
  vq = vqgan_lib.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), resolution=8, z_channels=8,
                       n_embed=16, embed_dim=8)
  vq_vars = vqgan_lib.init_variables(vq, jax.random.PRNGKey(0))
  ckpt_lib.save_pretrained(str(tmp_path / "vq"), "vqgan",
                           vqgan_lib.model_config(vq), vq_vars)
  model = gpt_lib.GPT(vocab_size=16, block_size=16, n_layer=1, n_head=2,
                      n_embd=16, rope_grid=(4, 4), rope_prefix=1, **MODERN)
  variables = model.init(jax.random.PRNGKey(1), _tokens(1, 16, 16))
  # Make the null class's samples differ from the conditional ones.
  variables = jax.tree.map(lambda a: a * 3.0, variables)
  ckpt_lib.save_pretrained(
      str(tmp_path / "tr"), "transformer", config_io.to_config(model),
      variables, vqgan=str(tmp_path / "vq"), image_grid=[4, 4],
      permuter="identity",
      conditioning={"kind": "class", "num_classes": 3,
                    "null_token": null_token, "cond_len": 1})
  return model, variables


def test_guidance_in_sample_lib_uses_the_null_class(tmp_path):
  model, variables = _write_pipeline(tmp_path, null_token=3)
  run = lambda scale, out: sample_lib.sample_images(
      str(tmp_path / "tr"), str(tmp_path / out), classes=[0, 2],
      num_samples=2, batch_size=4, seed=5, guidance_scale=scale,
      progress=False)
  plain, one, zero = run(None, "a"), run(1.0, "b"), run(0.0, "c")
  np.testing.assert_array_equal(one["tokens"], plain["tokens"])
  # Scale 0 samples the unconditional model: the null token's samples.
  key = jax.random.split(jax.random.PRNGKey(5))[1]
  null = sampling.sample(model, variables, np.full((4, 1), 3, np.int32), 16,
                         key)
  np.testing.assert_array_equal(zero["tokens"].reshape(4, -1), null)
  assert not np.array_equal(zero["tokens"], plain["tokens"])
  assert sorted(p.name for p in (tmp_path / "b").iterdir())[:2] == [
      "0_0000.png", "0_0001.png"]


def test_guidance_without_a_null_class_is_refused(tmp_path):
  _write_pipeline(tmp_path, null_token=None)
  with pytest.raises(ValueError, match="label_dropout"):
    sample_lib.sample_images(str(tmp_path / "tr"), str(tmp_path / "o"),
                             num_samples=1, guidance_scale=2.0,
                             progress=False)


def test_sample_py_takes_the_settings_it_is_not_given_from_the_model(tmp_path):
  """`sample.py` resolves its flags through `resolve_sampling` and the
  `sampling` section of model.json (the trainer writes config.sampling)."""
  _write_pipeline(tmp_path, null_token=3)
  path = tmp_path / "tr" / "model.json"
  assert sample_lib.sampling_defaults(str(tmp_path / "tr")) == sample_lib.SAMPLING_DEFAULTS
  assert sample_lib.resolve_sampling(sample_lib.SAMPLING_DEFAULTS) == (
      dict(temperature=1.0, top_k=None, top_p=None, guidance_scale=None), [])
  info = json.loads(path.read_text())
  info["sampling"] = dict(temperature=0.9, top_k=5, top_p=1.0, guidance_scale=3.0)
  path.write_text(json.dumps(info))
  d = sample_lib.sampling_defaults(str(tmp_path / "tr"))
  assert sample_lib.resolve_sampling(d) == (
      dict(temperature=0.9, top_k=5, top_p=None, guidance_scale=3.0),
      ["temperature", "top_k", "guidance_scale"])
  # Given flags win; 0 / 1 / 1 switch top-k, top-p and guidance off.
  kw, names = sample_lib.resolve_sampling(d, guidance_scale=1.0, top_k=0, top_p=0.8)
  assert kw == dict(temperature=0.9, top_k=None, top_p=0.8, guidance_scale=None)
  assert names == ["temperature"]
  # The sliding window drops the model's guidance, not a scale asked for.
  kw, names = sample_lib.resolve_sampling(d, sliding_window=True)
  assert kw["guidance_scale"] is None and "guidance_scale" not in names
  kw, _ = sample_lib.resolve_sampling(d, sliding_window=True, guidance_scale=2.0)
  assert kw["guidance_scale"] == 2.0
  # The resolved settings sample what the same explicit arguments sample.
  a = sample_lib.sample_images(str(tmp_path / "tr"), str(tmp_path / "a"), num_samples=1,
                               batch_size=3, seed=1, progress=False,
                               **sample_lib.resolve_sampling(d)[0])
  b = sample_lib.sample_images(str(tmp_path / "tr"), str(tmp_path / "b"), num_samples=1,
                               batch_size=3, seed=1, progress=False, temperature=0.9,
                               top_k=5, guidance_scale=3.0)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


@pytest.mark.slow
def test_digits_options_benchmark_runs_tiny(tmp_path):
  """The comparison script trains both blocks with label dropout, samples
  unguided and guided through sample_lib, and judges them (tiny config)."""
  vq = vqgan_lib.VQGAN(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), resolution=8, z_channels=8,
                       n_embed=16, embed_dim=8)
  ckpt_lib.save_pretrained(str(tmp_path / "vq"), "vqgan",
                           vqgan_lib.model_config(vq),
                           vqgan_lib.init_variables(vq, jax.random.PRNGKey(0)))
  out = tmp_path / "out"
  r = tu.run_python(["-m", "benchmarks.ablations.digits_transformer_options",
                     f"--vqgan_workdir={tmp_path / 'vq'}", f"--workdir={out}",
                     "--steps=2", "--config_arg=test", "--num_samples=1",
                     "--guidance_scales=3"])
  res = json.loads((out / "results.json").read_text())
  rows = {(x["variant"], x["guidance_scale"]): x for x in res["rows"]}
  assert sorted(rows, key=str) == sorted(
      [("reference", None), ("reference", 3.0), ("modern", None),
       ("modern", 3.0)], key=str)
  for x in rows.values():
    assert np.isfinite(x["eval_loss"]) and x["samples"] == 10
    assert 0.0 <= x["judge_accuracy"] <= 1.0
  # A zero-initialised head predicts uniformly: loss ln(16) after 2 steps.
  assert abs(rows[("modern", None)]["eval_loss"] - np.log(16)) < 0.1
  info = json.loads((out / "modern" / "model.json").read_text())
  assert info["config"]["position_embedding"] == "rope2d"
  assert info["config"]["rope_grid"] == [4, 4]
  assert info["conditioning"]["null_token"] == 10
  assert "| modern | 3 |" in r.stdout
